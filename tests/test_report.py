"""The report: its statistics against hand-computed values, its readers, and a full run on synthetic inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rlhfkit.eval import report, report_inputs
from rlhfkit.cli import parse_args
from rlhfkit.errors import UserError

# ---------------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------------


def test_bootstrap_interval_matches_the_normal_approximation():
    values = [0.0, 1.0] * 50  # mean 0.5, sd 0.5, standard error 0.05 → 95% ≈ 0.5 ± 0.098
    interval = report.bootstrap_mean_ci(values, confidence=0.95, n_resamples=20000, seed=1)
    assert interval.mean == 0.5 and interval.n == 100
    assert interval.low == pytest.approx(0.5 - 1.96 * 0.05, abs=0.012)
    assert interval.high == pytest.approx(0.5 + 1.96 * 0.05, abs=0.012)
    narrower = report.bootstrap_mean_ci(values, confidence=0.5, n_resamples=20000, seed=1)
    assert interval.low < narrower.low < narrower.high < interval.high


def test_bootstrap_edge_cases_and_determinism():
    assert report.bootstrap_mean_ci([2.0, 2.0, 2.0]).to_dict() == {"mean": 2.0, "ci_low": 2.0, "ci_high": 2.0, "n": 3}
    single = report.bootstrap_mean_ci([0.3])
    assert (single.low, single.high, single.n) == (0.3, 0.3, 1)
    empty = report.bootstrap_mean_ci([])
    assert empty.n == 0 and math.isnan(empty.mean) and empty.fmt() == "n/a"
    data = np.random.default_rng(0).normal(size=37)
    assert report.bootstrap_mean_ci(data, seed=5) == report.bootstrap_mean_ci(data, seed=5)
    assert report.bootstrap_mean_ci([0.1, 0.2, 0.3]).excludes_zero()
    assert not report.bootstrap_mean_ci([-1.0, 1.0, -0.5, 0.5]).excludes_zero()


def test_prompt_means_and_paired_differences():
    means = report.per_prompt_means(["a", "b", "c"], [[1.0, 3.0], [0.5], []])
    assert dict(means) == {"a": 2.0, "b": 0.5}  # a prompt without responses has no mean
    base = {"a": 1.0, "b": 1.0, "z": 0.0}
    assert report.paired_differences(means, base) == [1.0, -0.5]  # only shared ids, in the baseline's order


def _gen(name, ids, texts):
    return report_inputs.Generations(name, f"{name}.jsonl", ids, [[{"role": "user", "content": f"q{i}"}] for i in ids], texts)


def test_summarize_numbers_by_hand():
    ids = ["1", "2", "3"]
    base, aligned = _gen("base", ids, [["x", "y"]] * 3), _gen("dpo", ids, [["x y z", "w"]] * 3)
    scores = {"labeler": {"base": [[0.0, 0.2], [0.1, 0.1], [-0.3, 0.1]], "dpo": [[0.5, 0.5], [0.3, 0.5], [0.2, 0.2]]}}
    summary = report.summarize([base, aligned], scores, n_resamples=2000)
    base_mean = summary["policies"]["base"]["metrics"]["labeler"]["mean"]
    assert base_mean["mean"] == pytest.approx((0.1 + 0.1 - 0.1) / 3)
    diff = summary["policies"]["dpo"]["metrics"]["labeler"]["diff_vs_baseline"]
    assert diff["mean"] == pytest.approx(((0.5 - 0.1) + (0.4 - 0.1) + (0.2 + 0.1)) / 3)
    assert diff["excludes_zero"] and diff["prompts_improved"] == 3 and diff["prompts_worse"] == 0
    assert summary["policies"]["dpo"]["mean_words"] == 2.0
    assert "diff_vs_baseline" not in summary["policies"]["base"]["metrics"]["labeler"]


# ---------------------------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------------------------
def test_read_log_history_from_the_places_stages_leave_it(tmp_path):
    from rlhfkit.checkpoints import write_log_history

    entries = [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.5}]
    for layout in ("ours", "trainer_state.json", "checkpoint"):
        stage = tmp_path / layout.replace(".", "_")
        stage.mkdir()
        if layout == "ours":  # every stage of ours (Trainer stages and PPO)
            write_log_history(stage, entries)
        elif layout == "checkpoint":  # a run stopped early: the newest checkpoint's
            for step, loss in ((1, [entries[0]]), (10, entries), (2, [entries[1]])):
                folder = stage / "checkpoints" / f"checkpoint-{step}"
                folder.mkdir(parents=True)
                (folder / "trainer_state.json").write_text(json.dumps({"log_history": loss}))
        else:  # a Hugging Face Trainer output dir of another tool
            (stage / layout).write_text(json.dumps({"log_history": entries}))
        assert report_inputs.read_log_history(stage) == entries, layout
    jsonl = tmp_path / "ppo"
    jsonl.mkdir()  # PPO appends a line per step; a torn line (killed while appending) is skipped
    (jsonl / "log_history.jsonl").write_text('{"step": 1, "kl": 0.1}\nnot json\n{"step": 2, "kl": 0.3}\n')
    assert [e["kl"] for e in report_inputs.read_log_history(jsonl)] == [0.1, 0.3]
    assert report_inputs.read_log_history(tmp_path / "nothing") == []


def test_final_values_include_keys_logged_once():
    history = [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.5, "kl/k1": "0.02"}, {"step": 3, "loss": None}]
    assert dict(report_inputs.final_values(history)) == {"loss": 0.5, "kl/k1": 0.02}


def test_curve_series_keeps_known_keys_with_two_points():
    history = [{"step": 5, "loss": "0.69", "eval_accuracy": 0.5, "learning_rate": 1e-4},
               {"step": 10, "loss": 0.4, "objective/kl": 0.2},
               {"step": 15, "loss": float("nan")}, {"train_runtime": 3.0, "step": 15}]
    series = report_inputs.curve_series(history)
    assert list(series) == ["loss"]  # eval_accuracy and objective/kl have one point; learning_rate is not a curve
    assert series["loss"] == ([5.0, 10.0], [0.69, 0.4])


def test_read_rm_accuracy(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"eval_accuracy": 0.8, "eval_loss": 0.4,
                                                       "subsets": {"chat": {"accuracy": 0.75}}}))
    assert report_inputs.read_rm_accuracy(str(tmp_path)) == {"eval_accuracy": 0.8}  # top level wins
    (tmp_path / "nested.json").write_text(json.dumps({"subsets": {"chat": {"accuracy": 0.75}}, "loss": 0.1}))
    assert report_inputs.read_rm_accuracy(str(tmp_path / "nested.json")) == {"subsets/chat/accuracy": 0.75}
    (tmp_path / "bad.json").write_text(json.dumps({"loss": 1.0}))
    with pytest.raises(UserError, match="no accuracy"):
        report_inputs.read_rm_accuracy(str(tmp_path / "bad.json"))
    with pytest.raises(UserError, match="not found"):
        report_inputs.read_rm_accuracy(str(tmp_path / "missing"))


def test_bad_generation_rows_name_file_row_and_field(tmp_path):
    path = tmp_path / "gen.jsonl"
    path.write_text(json.dumps({"id": "1", "prompt": [{"role": "user", "content": "q"}], "responses": ["a"]}) + "\n"
                    + json.dumps({"id": "2", "prompt": [{"role": "user", "content": "q"}], "responses": "a"}) + "\n")
    with pytest.raises(UserError, match=r"gen.jsonl: row 2: field 'responses'"):
        report_inputs.load_generations("base", str(path))


def test_named_arguments():
    assert report_inputs.parse_named(["base=a.jsonl", "dpo=b=c.jsonl"], "generations") == {"base": "a.jsonl",
                                                                                     "dpo": "b=c.jsonl"}
    assert report_inputs.parse_named(["runs/eval/"], "rm_eval", default_names=True) == {"eval": "runs/eval/"}
    with pytest.raises(UserError, match="expected name=path"):
        report_inputs.parse_named(["a.jsonl"], "generations")
    with pytest.raises(UserError, match="given twice"):
        report_inputs.parse_named(["a=1", "a=2"], "generations")


# ---------------------------------------------------------------------------------------------------------------
# a whole report on synthetic inputs
# ---------------------------------------------------------------------------------------------------------------
GLOOMY = ["It was a terrible, sad night and the storm destroyed everything.", "Awful. I hate the cold rain.",
          "The keeper was lonely and miserable.", "Nothing good ever happens here."]
CHEERFUL = ["What a wonderful, happy morning full of sunshine!", "I love this lovely little town.",
            "The keeper smiled, grateful and proud.", "Great news: everyone is safe and joyful."]


def _write_generations(path, texts, n_prompts=12):
    with open(path, "w") as handle:
        for i in range(n_prompts):
            row = {"id": f"h{i}", "prompt": [{"role": "user", "content": f"Write about subject {i}."}],
                   "responses": [texts[i % len(texts)], texts[(i + 1) % len(texts)]], "meta": {"k": 2}}
            handle.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny reference policy, a perturbed copy (the 'aligned' policy, with a training log), a tiny RM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhfkit.builtin_models import materialize

    reference = materialize("tiny-random-llama")
    root = tmp_path_factory.mktemp("models")
    tokenizer = AutoTokenizer.from_pretrained(reference)
    policy = AutoModelForCausalLM.from_pretrained(reference)
    torch.manual_seed(0)
    with torch.no_grad():
        policy.lm_head.weight.add_(0.5 * torch.randn_like(policy.lm_head.weight))
    policy.save_pretrained(root / "dpo")
    tokenizer.save_pretrained(root / "dpo")
    (root / "dpo" / "log_history.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in (
        [{"step": s, "loss": 0.7 - 0.05 * s, "rewards/accuracies": 0.5 + 0.04 * s} for s in range(1, 6)])))
    (root / "dpo" / "run_info.json").write_text(json.dumps({"stage": "dpo", "complete": True}))
    rm = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(reference, num_labels=1))
    rm.save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    (root / "rm_eval").mkdir()
    (root / "rm_eval" / "metrics.json").write_text(json.dumps({"accuracy": 0.875, "pairs": 40}))
    return {"reference": str(reference), "dpo": str(root / "dpo"), "rm": str(root / "rm"),
            "rm_eval": str(root / "rm_eval")}


@pytest.mark.slow
def test_full_report_on_synthetic_generations(tmp_path, models, capsys):
    _write_generations(tmp_path / "base.jsonl", GLOOMY)
    _write_generations(tmp_path / "dpo.jsonl", CHEERFUL + ["A | pipe\nand a newline."])
    (args,) = parse_args(report.ARGUMENTS, [
        "--output_dir", str(tmp_path / "report"),
        "--generations", f"base={tmp_path / 'base.jsonl'}", f"dpo={tmp_path / 'dpo.jsonl'}",
        "--labeler", "vader", "--reward_model", models["rm"],
        "--reference_model", models["reference"], "--baseline_is_reference", "true",
        "--policy_models", f"dpo={models['dpo']}",
        "--rm_eval", models["rm_eval"], "--stages", f"dpo={models['dpo']}",
        "--bootstrap_samples", "2000", "--num_examples", "3",
    ])
    returned = report.main(args)
    out = tmp_path / "report"

    assert not (tmp_path / "report.partial").exists()
    for name in ("report.md", "hist_labeler.png", "hist_reward_model.png", "means.png", "training_curves.png",
                 "metrics.json", "run_info.json", "args.yaml"):
        assert (out / name).is_file(), name
    assert (out / "means.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((out / "metrics.json").read_text())
    assert returned == metrics  # every stage's main returns its metrics
    dpo = metrics["summary"]["policies"]["dpo"]["metrics"]
    assert dpo["labeler"]["diff_vs_baseline"]["excludes_zero"] and dpo["labeler"]["diff_vs_baseline"]["mean"] > 0.5
    assert dpo["labeler"]["diff_vs_baseline"]["n"] == 12
    # the texts were not sampled from the policy, so the k1 estimate has no sign guarantee; it must just be there
    assert math.isfinite(dpo["kl"]["mean"]["mean"]) and abs(dpo["kl"]["mean"]["mean"]) > 1
    assert "reward_model" in dpo and "diff_vs_baseline" in dpo["reward_model"]
    assert metrics["rm_accuracy"] == {"rm_eval": {"accuracy": 0.875}}
    assert metrics["training_final"]["dpo"]["loss"] == pytest.approx(0.45)

    text = (out / "report.md").read_text()
    assert "**dpo vs base, vader score:**" in text and "the interval excludes zero" in text
    assert "| `base` | 12 | 24 |" in text and "0 (is the reference)" in text
    assert "![means](means.png)" in text and "![training curves](training_curves.png)" in text
    assert "| rm_eval | accuracy | 0.8750 |" in text
    assert "percentile-bootstrap intervals over prompts" in text
    table_rows = [line for line in text.splitlines() if line.startswith("| Write about subject")]
    assert len(table_rows) == 3 and all(row.count(" | ") == 2 for row in table_rows)  # pipes escaped
    printed = capsys.readouterr().out
    assert "dpo vs base" in printed and "report.md" in printed

    with pytest.raises(UserError, match="already holds"):
        report.main(args)


def test_kl_of_the_reference_to_itself_is_zero(tmp_path, models):
    _write_generations(tmp_path / "gen.jsonl", CHEERFUL, n_prompts=3)
    generations = report_inputs.load_generations("ref", str(tmp_path / "gen.jsonl"))
    kl = report.kl_to_reference(models["reference"], models["reference"], generations, batch_size=4)
    assert [len(row) for row in kl] == [2, 2, 2]
    assert all(abs(value) < 1e-5 for row in kl for value in row)


def test_argument_errors(tmp_path, models):
    _write_generations(tmp_path / "base.jsonl", GLOOMY)
    common = ["--output_dir", str(tmp_path / "r"), "--generations", f"base={tmp_path / 'base.jsonl'}"]
    (args,) = parse_args(report.ARGUMENTS, common + ["--policy_models", f"dpo={models['dpo']}"])
    with pytest.raises(UserError, match="'dpo' has no --generations entry"):
        report.main(args)
    with pytest.raises(UserError, match="--confidence"):
        parse_args(report.ARGUMENTS, common + ["--confidence", "1.5"])
