"""Shared test fixtures: tiny models built locally (never from the hub), a per-session cache, small data."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tiny models are overhead-bound: one thread per process is faster, and stage subprocesses inherit it
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(1)
os.environ.setdefault("RLHFKIT_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / "rlhfkit-test-cache"))


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (tiny matrices: more threads only add contention on a shared machine);
    PPO modules use it for every test (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    from rlhfkit.builtin_models import materialize

    return materialize("tiny-random-llama")


@pytest.fixture(scope="session")
def tiny_bert_dir() -> Path:
    from rlhfkit.builtin_models import materialize

    return materialize("tiny-random-bert")


POSITIVE = ["good", "great", "happy", "kind", "wonderful", "nice", "joy", "love", "bright", "warm"]
NEGATIVE = ["bad", "terrible", "sad", "cruel", "awful", "mean", "hate", "dark", "cold", "rude"]
TOPICS = ["the sea", "a lighthouse keeper", "the moon", "a river", "the city", "a friend", "a teacher", "a dog",
          "a tree", "the mountain", "a bird", "a child", "the sun", "a ship", "a storm", "a doctor"]


def sentiment_pairs(n: int, seed: int, topics: list[str] | None = None) -> list[dict]:
    """A learnable preference: responses made of positive words beat responses made of negative words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(topics or TOPICS)
        good = " ".join(rng.sample(POSITIVE, 3))
        bad = " ".join(rng.sample(NEGATIVE, 3))
        rows.append({
            "prompt": [{"role": "user", "content": f"Tell me about {topic}."}],
            "chosen": [{"role": "assistant", "content": f"{topic.capitalize()} is {good}."}],
            "rejected": [{"role": "assistant", "content": f"{topic.capitalize()} is {bad}."}],
        })
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


@pytest.fixture
def sentiment_data(tmp_path):
    # held-out pairs use topics never seen in training, so no held-out pair can be memorised
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(64, seed=1, topics=TOPICS[:10]))
    heldout = write_jsonl(tmp_path / "heldout.jsonl", sentiment_pairs(32, seed=2, topics=TOPICS[10:]))
    return train, heldout


@pytest.fixture(autouse=True)
def _stage_runs_are_marked_slow(request, monkeypatch):
    """`make test-fast` (-m "not slow") runs no stage end to end: a test that finishes a stage in this process
    (every stage's `main` ends in `StageOutput.finalize`) must be marked slow, or it fails here naming the rule.
    Tests of `StageOutput` itself call `finalize` from the test, not from a stage's `main`, and pass."""
    if request.node.get_closest_marker("slow") is not None:
        return
    import inspect

    from rlhfkit.checkpoints import StageOutput

    original = StageOutput.finalize
    tests_dir = str(Path(__file__).resolve().parent)

    def guarded(self, *args, **kwargs):
        stage_main = [frame for frame in inspect.stack()[1:]
                      if frame.function == "main" and not frame.filename.startswith(tests_dir)]
        if stage_main:
            raise AssertionError(f"{request.node.nodeid} runs {stage_main[0].filename}'s main to the end: "
                                 f"mark it @pytest.mark.slow")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StageOutput, "finalize", guarded)


def crash_ppo_update_on_call(monkeypatch, n: int):
    """Make PPO's update raise KeyboardInterrupt("killed") on its n-th call, as a crash mid-run; returns the real
    update (monkeypatch it back to resume)."""
    from rlhfkit.rl import ppo

    real, calls = ppo.ppo_update, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(ppo, "ppo_update", crashing)
    return real

# prompts in every layout generation reads (a string, a question, messages, instruction + input), for the generation
# stage's tests (tests/test_generation.py, tests/test_vllm_generation.py)
GENERATION_PROMPTS = [
    {"prompt": "tell me a story about the sea"},
    {"question": "why is the sky blue and the sun bright?"},
    {"prompt": [{"role": "user", "content": "hi"}]},
    {"instruction": "write a poem", "input": "about a cat and a dog"},
    {"prompt": "list three colours"},
]


@pytest.fixture
def prompt_file(tmp_path):
    """GENERATION_PROMPTS as a JSONL file."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in GENERATION_PROMPTS), encoding="utf-8")
    return str(path)


# Trainer flags for a stage run inside a test: no reporting, no checkpoints, CPU, seed 0, no progress bars
QUIET_RUN = ["--report_to", "none", "--save_strategy", "no", "--use_cpu", "true", "--seed", "0", "--disable_tqdm", "true"]


@pytest.fixture(scope="session")
def tiny_rm_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """A reward model on tiny_llama_dir's weights: one-label sequence classifier with a random head (seed 0), and its
    tokenizer (the benchmark stages' tests)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("rm") / "tiny-rm"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=1).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


def fake_score(text: str) -> float:
    """The score a benchmark fixture's response announces at its end ("… [1.5]"); the empty response scores 0
    (tests/test_rmbench.py, test_rmb.py, test_judgebench.py write responses so)."""
    match = re.search(r"\[(-?[\d.]+)\]$", text)
    return float(match.group(1)) if match else 0.0


def scored(rows: list[dict]) -> list[dict]:
    """Group-benchmark rows with `scores`, each completion's `fake_score`, as eval_benchmark attaches real ones."""
    for row in rows:
        row["scores"] = [fake_score(t) for t in row["completions"]]
    return rows
