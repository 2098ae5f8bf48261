"""Seeded problems with checkable answers, for reinforcement learning with a verifiable reward (`exact_answer`).

    python -m rlhfkit.rl.tasks --kind add --n 400 --seed 1 --output data.jsonl [--exclude other.jsonl]

Each row is a prompt row of `rlhfkit.prompts.load_prompts` plus its answer:
`{"id": "add-1-17", "prompt": [{"role": "user", "content": "..."}], "answer": "85", "kind": "add"}`.
Nothing is downloaded: the problems come from `random.Random(seed)`, so the same arguments write the same file.
`--exclude` drops problems whose question appears in another file (a held-out set disjoint from the train set).

Kinds (the question, then what the answer is):
- `add`: "What is a + b?" with a, b two-digit numbers; a + b.
- `sub`: "What is a - b?" with two-digit a ≥ b; a − b.
- `mul`: "What is a * b?" with a one-digit and b two-digit number; a·b.
- `count`: "How many times does the word 'w' appear in: …?" in a list of 5–9 short words; the count.
- `mixed`: each problem one of the above, chosen at random.
SmolLM2-135M-Instruct, greedy, solves `add` 18.5% of the time within 32 new tokens (200 problems; 33% of 40
within 48, where fewer answers are cut off), so GRPO has signal (README, "Reinforcement learning with a verifiable
reward": measured, not assumed); the other kinds are not measured.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

KINDS = ("add", "sub", "mul", "count")
INSTRUCTION = "Give the final answer as a number on the last line, as 'Answer: <number>'."
COUNT_WORDS = ["cat", "dog", "sun", "tree", "red", "blue", "car", "fish", "bird", "cup"]


def make_problem(kind: str, rng: random.Random) -> tuple[str, str]:
    """(question, answer) of one problem of `kind`, drawn from `rng`."""
    if kind == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"What is {a} + {b}?", str(a + b)
    if kind == "sub":
        a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
        return f"What is {a} - {b}?", str(a - b)
    if kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(11, 99)
        return f"What is {a} * {b}?", str(a * b)
    if kind == "count":
        word = rng.choice(COUNT_WORDS)
        others = [w for w in COUNT_WORDS if w != word]
        length = rng.randint(5, 9)
        times = rng.randint(1, min(4, length - 1))
        words = [word] * times + [rng.choice(others) for _ in range(length - times)]
        rng.shuffle(words)
        return f"How many times does the word '{word}' appear in: {' '.join(words)}?", str(times)
    raise ValueError(f"unknown problem kind '{kind}' (choose from {', '.join(KINDS)} or mixed)")


def make_problems(kind: str, n: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    """`n` distinct problems (prompt rows with an `answer`), none of whose questions is in `exclude`."""
    if kind != "mixed" and kind not in KINDS:
        raise ValueError(f"unknown problem kind '{kind}' (choose from {', '.join(KINDS)} or mixed)")
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct '{kind}' problems (only {len(rows)} exist outside --exclude)")
        this_kind = rng.choice(KINDS) if kind == "mixed" else kind
        question, answer = make_problem(this_kind, rng)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"id": f"{this_kind}-{seed}-{len(rows)}",
                     "prompt": [{"role": "user", "content": f"{question} {INSTRUCTION}"}],
                     "answer": answer, "kind": this_kind})
    return rows


def question_of(row: dict) -> str:
    """The question of a generated row (its user turn without the instruction)."""
    return row["prompt"][-1]["content"].removesuffix(f" {INSTRUCTION}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="add", help=f"{' | '.join(KINDS)} | mixed")
    parser.add_argument("--n", type=int, required=True, help="number of problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--exclude", nargs="*", default=[], help="files whose questions must not be repeated")
    args = parser.parse_args(argv)
    exclude = set()
    for path in args.exclude:
        with open(path, encoding="utf-8") as handle:
            exclude.update(question_of(json.loads(line)) for line in handle if line.strip())
    rows = make_problems(args.kind, args.n, args.seed, exclude)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = output.with_name(output.name + ".tmp")
    temp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    temp.replace(output)
    print(f"wrote {len(rows)} '{args.kind}' problems to {output}")


if __name__ == "__main__":
    main()
