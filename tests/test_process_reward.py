"""Process reward model (rlhfkit/process_reward.py, prm_train.py): the published layouts and their bad rows, step
positions, aggregates, best-of-N, per-step PPO rewards on the right tokens; one chain on a tiny model."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from rlhfkit.cli import parse_args
from rlhfkit.errors import UserError
from rlhfkit.process_reward import (StepFormat, aggregate, convert_record, from_math_shepherd, from_prm800k,
                                    load_step_rows, split_steps, step_sequence)
from tests.conftest import QUIET_RUN, write_jsonl

# the published layouts, one row each (written here in their shape; the values are ours)
MATH_SHEPHERD = {
    "input": "Tom has 3 apples and buys 2 more. How many now? Step 1: He buys 2 apples. ки\n"
             "Step 2: 3 + 2 = 6. ки\nStep 3: The answer is 6. ки",
    "label": "Tom has 3 apples and buys 2 more. How many now? Step 1: He buys 2 apples. +\n"
             "Step 2: 3 + 2 = 6. -\nStep 3: The answer is 6. -",
    "task": "GSM8K",
}
PRM800K = {
    "question": {"problem": "What is 2 + 2?", "ground_truth_answer": "4"},
    "label": {"steps": [
        {"completions": [{"text": "2 + 2 = 4.", "rating": 1, "flagged": False},
                         {"text": "2 + 2 = 5.", "rating": -1, "flagged": False}],
         "human_completion": None, "chosen_completion": 0},
        {"completions": [{"text": "So the answer is 4.", "rating": 1, "flagged": False}],
         "human_completion": None, "chosen_completion": None},
    ], "total_time": 1, "finish_reason": "solution"},
}


def test_math_shepherd_as_trl_converts_it():
    (row,) = from_math_shepherd(MATH_SHEPHERD, "ms.jsonl: row 1")
    assert row["prompt"] == [{"role": "user", "content": "Tom has 3 apples and buys 2 more. How many now?"}]
    assert row["steps"] == ["Step 1: He buys 2 apples.", "Step 2: 3 + 2 = 6.", "Step 3: The answer is 6."]
    assert row["labels"] == [True, False, False]


def test_prm800k_expands_as_trl_does():
    rows = from_prm800k(PRM800K, "prm800k.jsonl: row 1")
    # the unchosen completion of step 0 ends a row; step 1 has no chosen one, so it ends a row too and the chosen
    # path (step 0 only) is the last row
    assert [(r["steps"], r["labels"]) for r in rows] == [
        (["2 + 2 = 5."], [False]),
        (["2 + 2 = 4.", "So the answer is 4."], [True, True]),
        (["2 + 2 = 4."], [True]),
    ]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "completions": ["a", "b"], "labels": [True]}, "field 'labels': expected one label per step"),
    ({"prompt": "q", "completions": ["a", " "], "labels": [1, 0]}, "field 'completions': step 1 is empty"),
    ({"prompt": "q", "completions": ["a"], "labels": ["yes"]}, "field 'labels': expected true/false or 0/1"),
    ({"prompt": 3, "completions": ["a"], "labels": [1]}, "field 'prompt'"),
    ({"input": "Q? Step 1: a ки", "label": "Q? Step 1: a *"}, "field 'label': character 13 is '\\*'"),
    ({"input": "no question ки", "label": "no question +"}, "field 'input': cannot find where the question ends"),
    ({"question": {"problem": "x"}, "label": {"steps": 3}}, "field 'label.steps'"),
    ({"question": {"problem": "x"}, "label": {"steps": [{"completions": [{"text": "a"}], "chosen_completion": 4}]}},
     "chosen_completion: 4 is not an index"),
    ({"text": "hello"}, "not a step-labelled row"),
])
def test_bad_rows_are_one_line_errors(record, message):
    with pytest.raises(UserError, match=message) as error:
        convert_record(record, "data.jsonl: row 7")
    assert "\n" not in str(error.value) and str(error.value).startswith("data.jsonl: row 7")


def test_load_names_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "steps.jsonl", [{"prompt": "q", "completions": ["a"], "labels": [1]},
                                                  {"prompt": "q", "completions": ["a"], "labels": []}])
    with pytest.raises(UserError, match=f"{path}: row 2: field 'labels'"):
        load_step_rows([str(path)])
    rows, report = load_step_rows([str(path)], skip_invalid=True)
    assert len(rows) == 1 and report["skipped"] == 1 and report["formats"] == {"stepwise": 1}


def test_split_steps_rules():
    fmt = StepFormat("\n")
    text = "first step\n\n  second  \nthird"
    assert split_steps(text, fmt) == [("first step", 10), ("second", 20), ("third", len(text))]
    assert split_steps("\n \n", fmt) == []


def test_aggregates():
    scores = [0.9, 0.5, 0.8]
    assert aggregate(scores, "min") == 0.5 and aggregate(scores, "last") == 0.8
    assert aggregate(scores, "prod") == pytest.approx(0.36) and aggregate(scores, "mean") == pytest.approx(2.2 / 3)
    with pytest.raises(ValueError):
        aggregate(scores, "max")


def test_best_of_n_selection_first_on_ties():
    from rlhfkit.eval.prm import best_of_n_report

    steps = [[[0.9, 0.2], [0.6, 0.7], [0.6, 0.7]],  # min picks 1 (correct); last picks 1; mean picks 1
             [[0.9], [0.9]]]  # a tie: the first answer is selected
    report = best_of_n_report(steps, [[False, True, False], [False, True]], "min")
    assert report["best_of_n_min"] == 0.5 and report["best_of_n_mean"] == 0.5
    assert report["first_answer"] == 0.0 and report["any_correct"] == 1.0


def test_step_ends_are_separator_tokens_and_gae_takes_step_rewards(tiny_llama_dir):
    from transformers import AutoTokenizer

    from rlhfkit.rl.estimators import compute_advantages
    from rlhfkit.rl.model_rewards import step_end_tokens

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    fmt = StepFormat("\n")
    ids, ends = step_sequence(tokenizer, fmt, [{"role": "user", "content": "q"}], ["the number 4", "the number 7"])
    assert [tokenizer.decode(ids[e]) for e in ends] == ["\n", "\n"]
    assert tokenizer.decode(ids[ends[0] - 1]) == "4" and tokenizer.decode(ids[ends[1] - 1]) == "7"
    with pytest.raises(UserError, match="contains the step separator"):
        step_sequence(tokenizer, fmt, [{"role": "user", "content": "q"}], ["a\nb"])
    # in a policy's own tokens, each step's reward goes on the token that completes its last character
    text = "the number 4\nthe number 7"
    response = tokenizer.encode(text, add_special_tokens=False)
    positions = step_end_tokens(tokenizer, response, text, [end for _, end in split_steps(text, fmt)])
    assert [tokenizer.decode(response[p]) for p in positions] == ["4", "7"]
    # GAE with γ = λ = 1, no KL, zero values: every token's advantage is the sum of the step rewards after it
    mask = torch.ones(1, len(response))
    step_rewards = torch.zeros(1, len(response))
    step_rewards[0, positions[0]], step_rewards[0, positions[1]] = -1.0, -3.0
    advantages, _ = compute_advantages("gae", torch.zeros(1), torch.zeros_like(mask), mask, torch.zeros_like(mask),
                                       0.0, gamma=1.0, lam=1.0, whiten_advantages=False, step_rewards=step_rewards)
    assert advantages[0, 0].item() == pytest.approx(-4.0) and advantages[0, positions[0] + 1].item() == pytest.approx(-3.0)
    with pytest.raises(ValueError, match="per-token estimator"):
        compute_advantages("rloo", torch.zeros(2), torch.zeros(2, 3), torch.ones(2, 3), None, 0.0, group_size=2,
                           step_rewards=torch.zeros(2, 3))


def parity_rows(n: int, seed: int) -> list[dict]:
    """A toy step rule: a step 'the number d' is correct iff d is even."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        digits = [rng.randint(0, 9) for _ in range(rng.randint(2, 4))]
        rows.append({"prompt": "Say some even numbers.", "completions": [f"the number {d}" for d in digits],
                     "labels": [d % 2 == 0 for d in digits]})
    return rows


@pytest.mark.slow
def test_prm_chain_learns_a_step_rule_evaluates_and_rewards_steps_in_ppo(tmp_path):
    import eval_benchmark
    import ppo_train
    import prm_train
    from rlhfkit.rl.model_rewards import ProcessReward

    train = write_jsonl(tmp_path / "train.jsonl", parity_rows(64, seed=1))
    heldout = write_jsonl(tmp_path / "heldout.jsonl", parity_rows(24, seed=2))
    out = tmp_path / "prm"
    metrics = prm_train.main(*parse_args(prm_train.ARGUMENTS, [
        "--model_name_or_path", "tiny-random-llama", "--dataset_path", str(train), "--eval_dataset_path", str(heldout),
        "--output_dir", str(out), "--num_train_epochs", "6", "--learning_rate", "5e-3",
        "--per_device_train_batch_size", "8", *QUIET_RUN]))
    assert metrics["eval_step_accuracy_before"] < 0.7 and metrics["eval_step_accuracy"] == 1.0
    assert metrics["eval_negative_f1"] == 1.0

    # step accuracy and best-of-N (a problem is solved when every number is even)
    rng = random.Random(3)
    problems = []
    for number in range(12):
        answers = [[rng.randint(0, 9) for _ in range(2)] + [1 + 2 * rng.randint(0, 4)] for _ in range(4)]
        if number % 3:  # two problems in three have one all-even answer, never the first
            answers[1 + number % 3] = [2 * rng.randint(0, 4) for _ in range(3)]
        problems.append({"prompt": "Say some even numbers.", "answers": ["\n".join(f"the number {d}" for d in a)
                                                                         for a in answers],
                         "label": [int(all(d % 2 == 0 for d in a)) for a in answers]})
    bon = write_jsonl(tmp_path / "bon.jsonl", problems)
    (args,) = parse_args(eval_benchmark.ARGUMENTS, ["--reward_model_path", str(out), "--dataset_path", str(heldout),
                                                    str(bon), "--output_dir", str(tmp_path / "eval")])
    results = eval_benchmark.main(args)
    assert results["steps"]["step_accuracy"] == 1.0
    assert results["best_of_n"]["best_of_n_min"] == results["best_of_n"]["any_correct"] > results["best_of_n"][
        "first_answer"]

    # per-step rewards land on the step's last token: log P(+) there, zero elsewhere
    reward = ProcessReward(str(out))
    tokenizer = reward.scorer.tokenizer
    texts = ["the number 4\nthe number 7", "the number 2"]
    encoded = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    width = max(map(len, encoded))
    responses = torch.tensor([e + [0] * (width - len(e)) for e in encoded])
    mask = torch.tensor([[1.0] * len(e) + [0.0] * (width - len(e)) for e in encoded])
    prompts = [[{"role": "user", "content": "Say some even numbers."}]] * 2
    per_token = reward.token_rewards(prompts, texts, responses, mask, tokenizer)
    steps = reward.scorer.steps(prompts, texts)
    assert steps[0][0] > 0.5 > steps[0][1] and steps[1][0] > 0.5
    placed = {(b, t): v for b in range(2) for t, v in enumerate(per_token[b].tolist()) if v != 0.0}
    assert {(b, tokenizer.decode(encoded[b][t])) for b, t in placed} == {(0, "4"), (0, "7"), (1, "2")}
    assert sorted(placed.values()) == pytest.approx(sorted(math.log(v) for s in steps for v in s))
    assert reward(prompts, texts) == pytest.approx([min(steps[0]), steps[1][0]])

    # and a GAE run takes them (prompts whose samples have newlines or not: both are rewarded)
    prompts_file = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Say some even numbers.", "id": "0"},
                                                            {"prompt": "Count.", "id": "1"}])
    ppo_metrics = ppo_train.main(*parse_args(ppo_train.ARGUMENTS, [
        "--model_name_or_path", "tiny-random-llama", "--reward_model_path", str(out), "--dataset_path",
        str(prompts_file), "--output_dir", str(tmp_path / "ppo"), "--max_steps", "2", "--max_new_tokens", "8",
        "--rollout_batch_size", "2", "--per_device_train_batch_size", "2", "--ppo_epochs", "1", "--save_strategy",
        "no", "--disable_tqdm", "true", "--report_to", "none", "--seed", "0"]))
    assert ppo_metrics["steps"] == 2
    described = json.loads((tmp_path / "ppo" / "run_info.json").read_text())["reward"]
    described = described[0] if isinstance(described, list) else described  # one source, or the list of sources
    assert described["aggregate"] == "min"
