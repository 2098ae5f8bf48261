"""Labelers: VADER, reward-model directories, user import paths, and the checks around all of them."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest
import torch

from rlhfkit.errors import UserError
from rlhfkit.labelers import CheckedLabeler, VaderLabeler, load_labeler

pytest.importorskip("vaderSentiment")

PROMPT = [{"role": "user", "content": "Write a two-sentence story about a lighthouse keeper."}]


def test_vader_is_the_compound_score_of_the_response():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    labeler = load_labeler("vader")
    responses = ["What a wonderful, happy day! I love it.", "This is terrible and sad. I hate it.",
                 "The keeper climbed the stairs.", ""]
    scores = labeler([PROMPT] * 4, responses)
    expected = [SentimentIntensityAnalyzer().polarity_scores(text)["compound"] for text in responses]
    assert scores == pytest.approx(expected)
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[3] == 0.0
    assert all(-1.0 <= s <= 1.0 for s in scores)
    assert labeler.info["labeler"] == "vader" and labeler.info["package"] == "vadersentiment"


def test_vader_ignores_the_prompt_and_handles_negation():
    labeler = VaderLabeler()
    gloomy_prompt = [{"role": "user", "content": "Describe something awful and depressing."}]
    assert labeler([PROMPT], ["It was good."]) == labeler([gloomy_prompt], ["It was good."])
    assert labeler([PROMPT], ["It was not good."])[0] < 0 < labeler([PROMPT], ["It was good."])[0]


def test_empty_batch_and_mismatched_lengths():
    labeler = load_labeler("vader")
    assert labeler([], []) == []
    with pytest.raises(ValueError, match="2 prompts for 1 responses"):
        labeler([PROMPT, PROMPT], ["x"])


# ---------------------------------------------------------------------------------------------------------------
# user labelers by import path
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def user_module(tmp_path, monkeypatch):
    source = textwrap.dedent(
        """
        def length(prompts, responses):
            return [len(r.split()) for r in responses]

        class Shouting:
            def __init__(self):
                self.info = {"labeler": "shouting", "kind": "import"}
            def __call__(self, prompts, responses):
                return [sum(c.isupper() for c in r) for r in responses]

        def too_few(prompts, responses):
            return [1.0]

        def not_finite(prompts, responses):
            return [float("nan")] * len(responses)

        def not_numbers(prompts, responses):
            return ["high"] * len(responses)

        NOT_CALLABLE = 3
        """
    )
    (tmp_path / "my_raters.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_raters", None)


def test_import_path_by_module_and_by_file(user_module):
    by_module = load_labeler("my_raters:length")
    by_file = load_labeler(f"{user_module / 'my_raters.py'}:length")
    for labeler in (by_module, by_file):
        assert isinstance(labeler, CheckedLabeler)
        assert labeler([PROMPT, PROMPT], ["one two three", "four"]) == [3.0, 1.0]


def test_import_path_naming_a_class_is_instantiated(user_module):
    labeler = load_labeler("my_raters:Shouting")
    assert labeler([PROMPT], ["HEllo"]) == [2.0]
    assert labeler.info == {"labeler": "shouting", "kind": "import"}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("my_raters:too_few", "returned 1 scores for 2 responses"),
        ("my_raters:not_finite", "score 0 is nan"),
        ("my_raters:not_numbers", "must return a list of numbers"),
    ],
)
def test_faulty_labelers_fail_with_one_line(user_module, spec, message):
    labeler = load_labeler(spec)
    with pytest.raises(UserError, match=message) as info:
        labeler([PROMPT, PROMPT], ["a", "b"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "--labeler is required"),
        ("sentiment-ish", "not a built-in labeler"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("my_raters:missing", "has no attribute 'missing'"),
        ("my_raters:NOT_CALLABLE", "is not callable"),
        ("/nonexistent/raters.py:f", "file /nonexistent/raters.py not found"),
    ],
)
def test_bad_specs_are_user_errors(user_module, spec, message):
    with pytest.raises(UserError, match=message):
        load_labeler(spec)


# ---------------------------------------------------------------------------------------------------------------
# a reward-model directory as a labeler
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from rlhfkit.builtin_models import materialize

    backbone = materialize("tiny-random-llama")
    out = tmp_path_factory.mktemp("rm")
    config = AutoConfig.from_pretrained(backbone, num_labels=1)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(backbone).save_pretrained(out)
    return out


def test_reward_model_dir_scores_each_conversation_as_alone(tiny_reward_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labeler = load_labeler(str(tiny_reward_model), batch_size=2)
    assert labeler.info["kind"] == "reward_model"
    responses = ["a good story", "the sea is very dark and cold tonight, said the keeper", "yes"]
    prompts = [PROMPT, PROMPT, [{"role": "user", "content": "hi"}]]
    scores = labeler(prompts, responses)

    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model)
    for prompt, response, score in zip(prompts, responses, scores):
        ids = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}],
                                            tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            alone = model(torch.tensor([ids])).logits[0, 0].item()  # no padding at all
        assert math.isclose(score, alone, rel_tol=1e-4, abs_tol=1e-5)
    assert len(set(round(s, 6) for s in scores)) == 3


# ---------------------------------------------------------------------------------------------------------------
# the bundled prompt set the demo labels (data/prompts/)
# ---------------------------------------------------------------------------------------------------------------
def test_bundled_prompts_are_reproducible_loadable_and_split_by_subject(tmp_path):
    import importlib.util
    from pathlib import Path

    from rlhfkit.prompts import load_prompts

    folder = Path(__file__).resolve().parent.parent / "data" / "prompts"
    spec = importlib.util.spec_from_file_location("build_prompts", folder / "build_prompts.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    train, heldout = builder.build()
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        committed = (folder / name).read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in committed] == rows, f"{name} differs from build_prompts.py's output"
        loaded = load_prompts([str(folder / name)])
        assert [row["id"] for row in loaded] == [row["id"] for row in rows]
    assert 250 <= len(train) <= 350 and 80 <= len(heldout) <= 120
    subjects = {s for kind in builder.SUBJECTS.values() for s in kind}

    def subjects_of(rows):
        return {s for row in rows for s in subjects if s in row["prompt"][0]["content"]}

    assert not subjects_of(train) & subjects_of(heldout)
