"""The alignment report: `report.md` and PNG plots comparing a base policy with aligned ones on held-out prompts.

    python -m rlhfkit.eval.report --output_dir runs/demo/report \
        --generations base=runs/demo/gen_base.jsonl dpo=runs/demo/gen_dpo.jsonl \
        --labeler vader --reward_model runs/demo/rm \
        --reference_model smollm2-135m-instruct --policy_models dpo=runs/demo/dpo \
        --rm_eval runs/demo/rm_eval --stages rm=runs/demo/rm dpo=runs/demo/dpo

What it shows, per policy (the first `--generations` entry is the baseline):
- the labeler's score (the stand-in for a human rater, e.g. VADER) and the reward model's reward on every
  response: mean with a confidence interval, the paired difference to the baseline with its interval, and
  histograms of both distributions;
- KL to the reference: the Monte-Carlo estimate E_y~π[log π(y|x) − log π_ref(y|x)] (nats per response) on the
  policy's own held-out samples, via `rlhfkit.logprobs.implicit_rewards`. The samples come from the sampler the
  generation stage used (temperature, top-p, a token cap), so this estimates the KL under that sampler's
  distribution, not exactly under π; the response span is re-tokenised from the text (see `rlhfkit.logprobs`);
- the reward model's held-out accuracy (from an `eval_benchmark.py` or `rm_train.py` output);
- training curves read from each stage's log history; a few sample outputs side by side.

Statistics: the unit is the prompt. Responses to one prompt are not independent, so each prompt's scores are
averaged first; means and paired differences (over prompts both policies answered) get a percentile bootstrap
interval over prompts (default 10,000 resamples, 95%). Hand-written: no maintained library computes this table.

The output dir is written like every stage's (`OUT.partial` renamed to `OUT`), with metrics.json holding all the
numbers of the report.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rlhfkit.eval.bootstrap import Interval, bootstrap_mean_ci, paired_differences, per_prompt_means
from rlhfkit.errors import UserError
from rlhfkit.eval.report_inputs import (Generations, curve_series, final_values, load_generations, parse_named,
                                        read_log_history, read_rm_accuracy)
from rlhfkit.eval.report_plots import plot_curves, plot_histograms, plot_means

logger = logging.getLogger(__name__)



@dataclass
class ReportArguments:
    output_dir: str = field(default=None, metadata={"help": "Where report.md, the plots and metrics.json go."})
    generations: list[str] = field(
        default_factory=list,
        metadata={"help": "name=path of generation JSONL files (generation/generate.py output) on the same "
                  "held-out prompts; the first one is the baseline, e.g. base=gen_base.jsonl dpo=gen_dpo.jsonl."},
    )
    labeler: str | None = field(
        default="vader",
        metadata={"help": "The rater whose score is the headline (built-in name, RM dir or module:function); "
                  "'none' to skip."},
    )
    reward_model: str | None = field(default=None, metadata={"help": "Reward-model dir to score responses with."})
    reference_model: str | None = field(
        default=None, metadata={"help": "Reference policy (dir or built-in name) for the KL column."}
    )
    baseline_is_reference: bool = field(
        default=False,
        metadata={"help": "The baseline's samples come from --reference_model itself (its KL is 0 by definition)."},
    )
    policy_models: list[str] = field(
        default_factory=list,
        metadata={"help": "name=dir of the policies whose KL to --reference_model is estimated on their samples."},
    )
    rm_eval: list[str] = field(
        default_factory=list,
        metadata={"help": "Reward-model evaluation outputs (eval_benchmark.py or rm_train.py dirs, or metrics "
                  "JSON files) whose accuracy is reported; name=path or path."},
    )
    stages: list[str] = field(
        default_factory=list, metadata={"help": "name=dir of stage outputs whose training curves are plotted."}
    )
    confidence: float = field(default=0.95, metadata={"help": "Confidence level of the intervals."})
    bootstrap_samples: int = field(default=10000, metadata={"help": "Bootstrap resamples (over prompts)."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap and of the choice of sample outputs."})
    num_examples: int = field(default=4, metadata={"help": "Sample outputs shown side by side."})
    batch_size: int = field(default=8, metadata={"help": "Batch size for reward-model scoring and KL log-probs."})
    kl_samples_per_prompt: int = field(
        default=0, metadata={"help": "KL to the reference from the first N samples of each prompt (0: all); the "
                             "estimate stays unbiased (each sample is a draw from the policy), only noisier."})
    title: str = field(default="rlhfkit alignment report", metadata={"help": "Title of report.md."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing report dir."})

    def __post_init__(self):
        if not 0.5 <= self.confidence < 1:
            raise ValueError(f"--confidence must be in [0.5, 1), not {self.confidence}")
        if self.bootstrap_samples < 100:
            raise ValueError(f"--bootstrap_samples must be at least 100, not {self.bootstrap_samples}")
        if self.labeler is not None and self.labeler.lower() == "none":
            self.labeler = None


# ---------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# scoring and KL
# ---------------------------------------------------------------------------------------------------------------
def score_generations(labeler, generations: Generations) -> list[list[float]]:
    """One score per response, in the shape of `generations.responses`."""
    flat_prompts, flat_responses, shape = [], [], []
    for prompt, responses in zip(generations.prompts, generations.responses):
        flat_prompts += [prompt] * len(responses)
        flat_responses += responses
        shape.append(len(responses))
    flat = labeler(flat_prompts, flat_responses)
    out, begin = [], 0
    for count in shape:
        out.append(list(flat[begin : begin + count]))
        begin += count
    return out


def kl_to_reference(policy_path: str, reference_path: str, generations: Generations, batch_size: int,
                    samples_per_prompt: int = 0) -> list[list[float]]:
    """Per response: Σ_t log π(y_t|x, y_<t) − Σ_t log π_ref(y_t|x, y_<t), on the policy's own samples (k1); with
    `samples_per_prompt`, on each prompt's first N samples only."""
    from rlhfkit.logprobs import implicit_rewards
    from rlhfkit.models import ensure_pad_token, load_causal_lm, load_tokenizer, resolve_model

    policy_local, _ = resolve_model(policy_path, role="policy")
    reference_local, _ = resolve_model(reference_path, role="reference model")
    tokenizer = load_tokenizer(policy_local)
    policy = load_causal_lm(policy_local)
    reference = load_causal_lm(reference_local)
    ensure_pad_token(tokenizer)
    conversations, shape = [], []
    for prompt, responses in zip(generations.prompts, generations.responses):
        responses = responses[:samples_per_prompt] if samples_per_prompt else responses
        conversations += [list(prompt) + [{"role": "assistant", "content": text}] for text in responses]
        shape.append(len(responses))
    flat = implicit_rewards(policy, reference, tokenizer, conversations, batch_size=batch_size, progress=True)
    out, begin = [], 0
    for count in shape:
        out.append(flat[begin : begin + count])
        begin += count
    return out


# ---------------------------------------------------------------------------------------------------------------
# the summary (pure given scores)
# ---------------------------------------------------------------------------------------------------------------
def summarize(generations: list[Generations], scores: dict[str, dict[str, list[list[float]]]],
              confidence: float = 0.95, n_resamples: int = 10000, seed: int = 0) -> dict:
    """Per policy and metric: mean [CI] over prompts, and the paired difference to the first (baseline) policy.

    scores: metric name → policy name → per-row response scores (shape of that policy's `responses`).
    """
    baseline = generations[0]
    out: dict[str, Any] = {"baseline": baseline.name, "confidence": confidence, "bootstrap_samples": n_resamples,
                           "interval": "percentile bootstrap over prompts", "policies": OrderedDict()}
    for gen in generations:
        words = [len(text.split()) for texts in gen.responses for text in texts]
        entry: dict[str, Any] = {
            "file": gen.path, "prompts": len(gen.ids), "responses": sum(len(t) for t in gen.responses),
            "mean_words": float(np.mean(words)) if words else math.nan, "metrics": OrderedDict(),
        }
        for metric, by_policy in scores.items():
            if gen.name not in by_policy:
                continue
            means = per_prompt_means(gen.ids, by_policy[gen.name])
            record = {"mean": bootstrap_mean_ci(means.values(), confidence, n_resamples, seed).to_dict()}
            if gen is not baseline and baseline.name in by_policy:
                base_means = per_prompt_means(baseline.ids, by_policy[baseline.name])
                diffs = paired_differences(means, base_means)
                interval = bootstrap_mean_ci(diffs, confidence, n_resamples, seed)
                record["diff_vs_baseline"] = {**interval.to_dict(), "excludes_zero": interval.excludes_zero(),
                                              "prompts_improved": int(sum(d > 0 for d in diffs)),
                                              "prompts_worse": int(sum(d < 0 for d in diffs))}
            entry["metrics"][metric] = record
        out["policies"][gen.name] = entry
    return out


def _interval(record: dict | None) -> Interval | None:
    if not record:
        return None
    return Interval(record["mean"], record["ci_low"], record["ci_high"], record["n"])


def _cell(text: str, limit: int = 400) -> str:
    """Text made safe for one markdown table cell."""
    text = " ".join(text.split()) if "\n" not in text else "<br>".join(" ".join(line.split()) for line in text.splitlines())
    if len(text) > limit:
        text = text[:limit].rstrip() + " …"
    return text.replace("|", "\\|") or "*(empty)*"


def pick_examples(generations: list[Generations], count: int, seed: int) -> list[str]:
    """Ids of `count` prompts every policy answered, chosen at random (seeded) so they are not cherry-picked."""
    common = [i for i in generations[0].ids if all(i in set(g.ids) for g in generations[1:])]
    rng = np.random.default_rng(seed)
    if len(common) <= count:
        return common
    return [common[i] for i in sorted(rng.choice(len(common), size=count, replace=False))]


def render_markdown(title: str, summary: dict, generations: list[Generations], scores: dict,
                    rm_accuracy: dict[str, dict[str, float]], stage_finals: dict[str, dict], plots: dict[str, str],
                    example_ids: list[str], metric_labels: dict[str, str]) -> str:
    level = int(round(summary["confidence"] * 100))
    lines = [f"# {title}", ""]
    baseline = summary["baseline"]
    policies = summary["policies"]
    headline_metric = next(iter(scores), None)

    # headline
    if headline_metric is not None:
        for name, entry in policies.items():
            diff = _interval(entry["metrics"].get(headline_metric, {}).get("diff_vs_baseline"))
            if diff is None:
                continue
            base = _interval(policies[baseline]["metrics"][headline_metric]["mean"])
            mine = _interval(entry["metrics"][headline_metric]["mean"])
            verdict = ("the interval excludes zero" if diff.excludes_zero() else "the interval includes zero: "
                       "no clear difference")
            lines.append(f"**{name} vs {baseline}, {metric_labels[headline_metric]}:** {mine.mean:.3f} vs "
                         f"{base.mean:.3f}; difference {diff.fmt()} ({level}% CI; {verdict}).  ")
        lines.append("")

    # the main table
    lines += ["## Held-out prompts: base vs aligned", "",
              f"Means over prompts (each prompt's responses averaged first) with {level}% percentile-bootstrap "
              f"intervals over prompts ({summary['bootstrap_samples']} resamples); Δ is the paired difference to "
              f"`{baseline}` on the same prompts. KL: nats per response, E_y~π[log π(y|x) − log π_ref(y|x)] on "
              f"the policy's own samples.", ""]
    header = ["policy", "prompts", "responses", "mean words"]
    for metric in scores:
        header += [metric_labels[metric], f"Δ {metric_labels[metric]}"]
    if any("kl" in entry["metrics"] for entry in policies.values()):
        header.append("KL to reference")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for name, entry in policies.items():
        row = [f"`{name}`", str(entry["prompts"]), str(entry["responses"]), f"{entry['mean_words']:.1f}"]
        for metric in scores:
            record = entry["metrics"].get(metric, {})
            mean = _interval(record.get("mean"))
            diff = _interval(record.get("diff_vs_baseline"))
            row.append(mean.fmt() if mean else "n/a")
            if diff is None:
                row.append("—")
            else:
                mark = " ✓" if diff.excludes_zero() and diff.mean > 0 else ""
                row.append(diff.fmt() + mark)
        if "KL to reference" in header:
            kl = _interval(entry["metrics"].get("kl", {}).get("mean"))
            if kl is None and name == baseline and summary.get("baseline_is_reference"):
                row.append("0 (is the reference)")
            else:
                row.append(kl.fmt(2) if kl else "not measured")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for metric in scores:
        for name, entry in policies.items():
            diff = entry["metrics"].get(metric, {}).get("diff_vs_baseline")
            if diff:
                lines.append(f"- {metric_labels[metric]}: `{name}` beats `{baseline}` on {diff['prompts_improved']} "
                             f"of {diff['n']} prompts, loses on {diff['prompts_worse']}.")
    lines.append("")
    for key in ("means", "hist_" + (headline_metric or ""), "hist_reward_model"):
        if key in plots:
            lines += [f"![{key}]({plots[key]})", ""]

    # reward model
    if rm_accuracy:
        lines += ["## Reward model", "", "| evaluation | metric | value |", "|---|---|---|"]
        for source, values in rm_accuracy.items():
            for key, value in values.items():
                lines.append(f"| {source} | {key} | {value:.4f} |")
        lines.append("")

    # training curves
    if any(stage_finals.values()) or "curves" in plots:
        lines += ["## Training", ""]
        if "curves" in plots:
            lines += [f"![training curves]({plots['curves']})", ""]
        for stage, finals in stage_finals.items():
            if finals:
                shown = ", ".join(f"{k} = {v:.4g}" for k, v in finals.items())
                lines.append(f"- `{stage}` (last logged): {shown}")
        lines.append("")

    # examples
    if example_ids:
        lines += ["## Sample outputs (first response per prompt; prompts chosen at random)", ""]
        names = [g.name for g in generations]
        lines.append("| prompt | " + " | ".join(f"`{n}`" for n in names) + " |")
        lines.append("|" + "---|" * (len(names) + 1))
        index = {g.name: {i: k for k, i in enumerate(g.ids)} for g in generations}
        for row_id in example_ids:
            first = generations[0]
            prompt = first.prompts[index[first.name][row_id]][-1].get("content", "")
            cells = [_cell(str(prompt), 200)]
            for gen in generations:
                k = index[gen.name][row_id]
                text = gen.responses[k][0]
                tags = []
                for metric in scores:
                    if gen.name in scores[metric]:
                        tags.append(f"{metric_labels[metric]} {scores[metric][gen.name][k][0]:+.2f}")
                cells.append(_cell(text) + (f"<br>*({', '.join(tags)})*" if tags else ""))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------
ARGUMENTS = (ReportArguments,)  # what main takes, in order (CLI, YAML, tests)


def main(args: ReportArguments) -> dict:
    from rlhfkit.checkpoints import StageOutput, check_parent
    from rlhfkit.cli import setup_logging, to_dict
    from rlhfkit.labelers import load_labeler

    # ---- setup ----
    setup_logging()
    if not args.output_dir:
        raise UserError("--output_dir is required")
    named_generations = parse_named(args.generations, "generations")
    if not named_generations:
        raise UserError("--generations needs at least one name=path (the first is the baseline)")
    policy_models = parse_named(args.policy_models, "policy_models")
    stages = parse_named(args.stages, "stages")
    rm_evals = parse_named(args.rm_eval, "rm_eval", default_names=True)
    unknown = [name for name in policy_models if name not in named_generations]
    if unknown:
        raise UserError(f"--policy_models: '{unknown[0]}' has no --generations entry of that name")
    if policy_models and not args.reference_model:
        raise UserError("--policy_models needs --reference_model (the KL is measured against it)")
    for name, path in stages.items():
        check_parent(path, role=f"stage '{name}'")
    output = StageOutput(args.output_dir, stage="report", overwrite=args.overwrite_output_dir)

    # ---- data ----
    generations = [load_generations(name, path) for name, path in named_generations.items()]
    base_ids = set(generations[0].ids)
    for gen in generations[1:]:
        shared = len(base_ids & set(gen.ids))
        if shared == 0:
            raise UserError(f"{gen.path}: shares no prompt ids with the baseline {generations[0].path}")
        if shared < len(base_ids):
            logger.warning("%s answers %d of the baseline's %d prompts; differences use those", gen.name, shared,
                           len(base_ids))

    # ---- score ----
    scores: dict[str, dict[str, list[list[float]]]] = OrderedDict()
    metric_labels: dict[str, str] = {}
    labelers_info: dict[str, Any] = {}
    if args.labeler:
        labeler = load_labeler(args.labeler)
        key = "labeler"
        metric_labels[key] = f"{args.labeler} score" if args.labeler.isidentifier() else "labeler score"
        scores[key] = OrderedDict((g.name, score_generations(labeler, g)) for g in generations)
        labelers_info[key] = labeler.info
    if args.reward_model:
        rm = load_labeler(args.reward_model, batch_size=args.batch_size)
        metric_labels["reward_model"] = "RM reward"
        scores["reward_model"] = OrderedDict((g.name, score_generations(rm, g)) for g in generations)
        labelers_info["reward_model"] = rm.info
        del rm
    summary = summarize(generations, scores, args.confidence, args.bootstrap_samples, args.seed)
    summary["reference_model"] = args.reference_model
    summary["baseline_is_reference"] = bool(args.baseline_is_reference and args.reference_model)
    by_name = {g.name: g for g in generations}
    for name, path in policy_models.items():
        logger.info("KL of %s to %s on its %s samples", name, args.reference_model, by_name[name].path)
        kl = kl_to_reference(path, args.reference_model, by_name[name], args.batch_size, args.kl_samples_per_prompt)
        means = per_prompt_means(by_name[name].ids, kl)
        summary["policies"][name]["metrics"]["kl"] = {
            "mean": bootstrap_mean_ci(means.values(), args.confidence, args.bootstrap_samples, args.seed).to_dict()
        }
    rm_accuracy = {name: read_rm_accuracy(path) for name, path in rm_evals.items()}

    # ---- plots ----
    plots: dict[str, str] = {}
    staging = output.staging
    for metric, by_policy in scores.items():
        file = f"hist_{metric}.png"
        plot_histograms(staging / file, metric_labels[metric], by_policy)
        plots[f"hist_{metric}"] = file
    if scores:
        plot_means(staging / "means.png", summary, metric_labels)
        plots["means"] = "means.png"
    curves, stage_finals = OrderedDict(), OrderedDict()
    for name, path in stages.items():
        history = read_log_history(path)
        if not history:
            logger.warning("stage '%s' (%s): no log history found; no curve", name, path)
        curves[name] = curve_series(history)
        stage_finals[name] = final_values(history)
    if any(curves.values()):
        plot_curves(staging / "training_curves.png", curves)
        plots["curves"] = "training_curves.png"

    # ---- save ----
    example_ids = pick_examples(generations, args.num_examples, args.seed)
    markdown = render_markdown(args.title, summary, generations, scores, rm_accuracy, stage_finals, plots,
                               example_ids, metric_labels)
    (staging / "report.md").write_text(markdown + "\n", encoding="utf-8")
    metrics = {"summary": summary, "rm_accuracy": rm_accuracy, "training_final": stage_finals,
               "labelers": labelers_info, "plots": plots}
    final = output.finalize({"inputs": {"generations": dict(named_generations), "stages": dict(stages),
                                        "policy_models": dict(policy_models), "rm_eval": dict(rm_evals),
                                        "reference_model": args.reference_model}},
                            metrics=metrics, args=to_dict(args))
    # what the demo prints: the headline and the main table
    print(markdown.split("\n## Reward model")[0].split("\n![")[0].strip())
    for source, values in rm_accuracy.items():
        print(f"reward model ({source}): " + ", ".join(f"{k} = {v:.4f}" for k, v in values.items()))
    print(f"report: {final / 'report.md'}")
    return metrics


if __name__ == "__main__":
    from rlhfkit.cli import run_stage

    run_stage(main, ARGUMENTS)
