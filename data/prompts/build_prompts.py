"""Build the bundled prompt set: data/prompts/train.jsonl and data/prompts/heldout.jsonl.

Short, open-ended requests (stories, poems, descriptions, notes, reviews, opinions) about everyday subjects, where a
reply can be written in a cheerful or a gloomy tone; that is what the demo's stand-in rater (VADER sentiment)
measures. Every prompt is a template filled with a subject. Subjects, not prompts, are split between train and
held-out, so the held-out prompts are about things the policy never saw during alignment.

Deterministic: rerunning writes byte-identical files. Run from the repository root:

    python data/prompts/build_prompts.py
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

SEED = 20260522
HELDOUT_FRACTION = 0.25
TEMPLATES_PER_SUBJECT = 5

# (template, kinds of subject it reads naturally with)
TEMPLATES = [
    ("Write a two-sentence story about {s}.", "thing place person event"),
    ("Tell me a very short story that involves {s}.", "thing place person event"),
    ("Write a four-line poem about {s}.", "thing place person event"),
    ("Write a haiku about {s}.", "thing place event"),
    ("Describe {s} in three sentences.", "thing place person event"),
    ("In a few sentences, what do you think about {s}?", "thing place event"),
    ("Write a short diary entry about {s}.", "thing place person event"),
    ("Write a short review of {s}.", "place event"),
    ("Write a postcard message to a friend about {s}.", "thing place event"),
    ("Give me a one-paragraph description of {s} for a travel blog.", "place"),
    ("Write a short note to {s}.", "person"),
    ("Write a brief toast for {s}.", "person"),
    ("How would you describe {s} to someone who has never seen it?", "thing place"),
    ("Write the opening lines of a song about {s}.", "thing place person event"),
    ("Summarize in two sentences how {s} might feel to a child.", "thing place event"),
    ("Write a short social media post about {s}.", "thing place event"),
    ("Write a short text message to your sister about {s}.", "thing event"),
]

SUBJECTS = {
    "thing": [
        "an old bicycle", "a cup of morning coffee", "a rainy afternoon", "the first snow of winter", "a broken umbrella",
        "a second-hand bookshop find", "a houseplant that will not grow", "a long train ride", "a power cut at night",
        "a stray cat in the garden", "a forgotten birthday card", "homemade bread", "a thunderstorm", "a paper boat",
        "an empty playground", "a new pair of shoes", "a crowded bus", "a letter that arrives years late",
        "a burnt dinner", "a kite stuck in a tree", "autumn leaves", "a lost key", "a quiet Sunday morning",
        "a noisy alarm clock", "the last day of summer", "a handwritten recipe", "a foggy harbour", "a flat tire",
    ],
    "place": [
        "a small seaside town", "an abandoned train station", "a busy night market", "a mountain village",
        "a public library", "a hospital waiting room", "a city park in spring", "an airport at midnight",
        "a tiny apartment", "a desert road", "a school cafeteria", "a lighthouse on a cliff", "a farmers' market",
        "an office on a Monday morning", "a riverside cafe", "a snowed-in cabin", "a football stadium",
        "a laundromat", "a museum of old clocks", "a garden after the rain",
    ],
    "person": [
        "a lighthouse keeper", "a retired teacher", "a new neighbour", "a night-shift nurse", "a street musician",
        "a grandmother learning to use a phone", "a lost tourist", "a baker who starts work at 4 a.m.",
        "a shy student", "a bus driver", "a mail carrier", "an old friend you have not seen in years",
        "a coworker who is leaving", "a child on the first day of school", "a fisherman", "a museum guard",
    ],
    "event": [
        "moving to a new city", "a job interview", "a family reunion", "a cancelled flight", "a first day at work",
        "a school play", "a power outage during dinner", "a surprise party", "a hospital visit", "a long winter",
        "a wedding in the rain", "a missed train", "a neighbourhood cleanup", "the end of a holiday",
        "learning to swim as an adult", "a garage sale", "a week without internet", "a marathon",
    ],
}


def _row_id(split: str, text: str) -> str:
    return f"{split}-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    subjects = [(kind, subject) for kind in sorted(SUBJECTS) for subject in SUBJECTS[kind]]
    rng.shuffle(subjects)
    n_heldout = round(len(subjects) * HELDOUT_FRACTION)
    splits = {"heldout": subjects[:n_heldout], "train": subjects[n_heldout:]}
    out: dict[str, list[dict]] = {}
    for split, chosen in splits.items():
        rows = []
        for kind, subject in chosen:
            fitting = [template for template, kinds in TEMPLATES if kind in kinds.split()]
            for template in rng.sample(fitting, min(TEMPLATES_PER_SUBJECT, len(fitting))):
                text = template.format(s=subject)
                rows.append({"id": _row_id(split, text), "prompt": [{"role": "user", "content": text}]})
        rng.shuffle(rows)
        out[split] = rows
    return out["train"], out["heldout"]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main() -> None:
    here = Path(__file__).resolve().parent
    train, heldout = build()
    _write_jsonl(here / "train.jsonl", train)
    _write_jsonl(here / "heldout.jsonl", heldout)
    print(f"wrote {len(train)} train and {len(heldout)} held-out prompts to {here}")


if __name__ == "__main__":
    main()
