"""Reward-model evaluation: RewardBench v1 and RewardBench 2 exactly as their own scripts score them, or pairwise
accuracy on any preference set; with reward-model diagnostics in every run.

    accelerate launch eval_benchmark.py --reward_name_or_path runs/rm --dataset_path reward-bench.jsonl --record_dir runs/rm-eval

What is scored, and how (`--benchmark auto` detects it from the rows; or `v1`, `v2`, `pairs`):
- v1 (rows `prompt, chosen, rejected, subset, id` with RewardBench subsets): every row is scored, identical and
  empty responses included (counted in the output); strict >, EXAMPLE_COUNTS weights, 4-section mean, legacy score
  with Prior; conversations longer than `--max_length` (2048, RewardBench's default) keep their last tokens and the
  tokenizer's own special tokens, as scripts/run_rm.py truncates (rlhfkit/rewardbench.py says exactly what is
  RewardBench and what is not).
- v2 (rows `id, prompt, chosen [list], rejected [list], num_correct, total_completions, subset`): every completion is
  scored; best-of-N with tie credit per row, the weighted Ties score, the mean of six subsets (rlhfkit/rewardbench2.py);
  truncation on the tokenizer's own side, as scripts/run_v2.py.
- pairs (any format rlhfkit.data reads): plain strict accuracy (per `subset` or `source` when present); rows are
  loaded by `load_preferences` (pairs with chosen == rejected are dropped and counted there); same truncation as v1.
- With `--ref_model_name_or_path` (or `--ref_free true`), `--reward_name_or_path` is a DPO policy scored as
  rewardbench/dpo.py does (its tokenization and truncation: 2048 tokens, prompts cut to their last 128; the score is
  Σ log π − Σ log π_ref over response tokens, or `--ref_free_type` avg|sum|norm of log π alone). RewardBench 2 has
  no DPO mode, and neither do we.
Extra, in every run: the length is capped at the model's own position limit (counted, reported; RewardBench would
crash there), the Spearman correlation of reward with response length in tokens, accuracy when chosen is the
longer vs the shorter response, a batch-invariance check (a sample of rows rescored at batch size 1), and the ECE of
σ(r_chosen − r_rejected) with a reliability diagram (rlhfkit/calibration.py, rlhfkit/rm_diagnostics.py).

In length-sorted batches; with several processes each sequence is scored by exactly one process.
Writes to --record_dir: results.json (everything), scores.jsonl (per row), table.txt (what is printed),
metrics.json and args.yaml; each file written to a temp path and renamed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.cli import run_stage, setup_logging, to_dict
from rlhfkit.errors import UserError

logger = logging.getLogger("eval_benchmark")

BENCHMARKS = ("auto", "v1", "v2", "pairs")


@dataclass
class ScriptArguments:
    reward_name_or_path: str = field(default=None, metadata={"help": "Reward model dir (rm_train.py output), a "
                                     "*ForSequenceClassification dir, or with --ref_model_name_or_path / --ref_free "
                                     "a DPO policy."})
    dataset_path: list[str] = field(default=None, metadata={"help": "RewardBench v1 / v2 rows, or any preference "
                                    "format rlhfkit.data reads."})
    record_dir: str = field(default=None, metadata={"help": "Where results are written."})
    benchmark: str = field(default="auto", metadata={"help": "auto | v1 | v2 | pairs: how rows are read and scored "
                           "(auto: v2 rows have list-valued chosen and num_correct; v1 rows RewardBench subsets)."})
    ref_model_name_or_path: str = field(default=None, metadata={"help": "Reference policy: switches to the DPO "
                                        "implicit reward (rewardbench/dpo.py)."})
    ref_free: bool = field(default=False, metadata={"help": "Score a DPO policy without a reference, as RewardBench's "
                           "run_dpo.py without --ref_model."})
    ref_free_type: str = field(default="avg", metadata={"help": "Reference-free reduction of the response log-probs: "
                               "avg (RewardBench's default) | sum | norm."})
    dataset_split: str = field(default="train", metadata={"help": "Split for hub datasets (RewardBench: 'filtered'; "
                               "RewardBench 2: 'test')."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass."})
    pairwise_forward: str = field(default="auto", metadata={"help": "prefix_shared | packed | padded | auto: how "
                                  "the responses to one prompt are laid out (rlhfkit/pairwise.py); every layout "
                                  "gives the same scores, auto the fastest."})
    max_length: int = field(default=2048, metadata={"help": "Truncate longer sequences as RewardBench does (its "
                            "default 2048); never beyond the model's own position limit."})
    chat_template: str = field(default=None, metadata={"help": "Template for a tokenizer without one."})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16."})
    skip_invalid_rows: bool = field(default=False, metadata={"help": "Skip (and count) malformed rows."})
    calibration: bool = field(default=True, metadata={"help": "Per-source accuracy, ECE and a reliability diagram."})
    batch_invariance_rows: int = field(default=16, metadata={"help": "Rows rescored at batch size 1 to check that "
                                       "batching does not change scores (0: skip)."})

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, not '{self.dtype}'")
        if self.batch_size < 1:
            raise ValueError("--batch_size must be ≥ 1")
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"--benchmark must be one of {', '.join(BENCHMARKS)}, not '{self.benchmark}'")
        if self.ref_free_type not in ("avg", "sum", "norm"):
            raise ValueError(f"--ref_free_type must be avg, sum or norm, not '{self.ref_free_type}'")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError("--max_length must be ≥ 2")
        if self.ref_free and self.ref_model_name_or_path:
            raise ValueError("--ref_free true and --ref_model_name_or_path exclude each other")
        if self.batch_invariance_rows < 0:
            raise ValueError("--batch_invariance_rows must be ≥ 0")


def _write(record_dir: Path, name: str, text: str) -> None:
    from rlhfkit.checkpoints import write_text_atomic

    write_text_atomic(record_dir / name, text)


def detect_benchmark(records: list[dict]) -> str:
    """v2, v1 or pairs, from the first rows (see --benchmark)."""
    from rlhfkit.eval.rewardbench import is_rewardbench
    from rlhfkit.eval.rewardbench2 import is_v2_record

    sample = records[:100]
    if sample and all(is_v2_record(r) for r in sample):
        return "v2"
    if is_rewardbench([r.get("subset") if isinstance(r, dict) else None for r in records]):
        return "v1"
    return "pairs"


def unique_items(items: list) -> tuple[list, list[int]]:
    """(distinct items in first-seen order, index of each item among them). Identical inputs are scored once, so an
    identical chosen/rejected pair is an exact tie (wrong, as RewardBench counts it) and not a coin flip decided by
    float noise from the other sequences in its batch."""
    index: dict[str, int] = {}
    unique, mapping = [], []
    for item in items:
        key = json.dumps(item, sort_keys=True)
        if key not in index:
            index[key] = len(unique)
            unique.append(item)
        mapping.append(index[key])
    return unique, mapping


def response_lengths(tokenizer, texts: list[str]) -> list[int]:
    """Tokens of each response text under the reward model's tokenizer, without special tokens."""
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


ARGUMENTS = (ScriptArguments,)  # what main takes (CLI, YAML, tests)


def main(script_args: ScriptArguments) -> dict:
    # ---------------------------------------------------------------- setup
    import torch
    import yaml

    from rlhfkit.eval import rewardbench2 as rb2
    from rlhfkit.eval import diagnostics as rm_diagnostics
    from rlhfkit.files import read_records
    from rlhfkit.distributed import new_accelerator
    from rlhfkit.models import (ensure_pad_token, load_causal_lm, load_reward_model, load_tokenizer, match_vocabulary,
                                resolve_model)
    from rlhfkit.eval.rewardbench import (DPO_MAX_PROMPT_LENGTH, RM_TRUNCATION_SIDE, TruncationPlan, dpo_sequence_scores,
                                     dpo_tokenize_pair, format_table, is_correct, is_rewardbench,
                                     load_rewardbench_rows, model_position_limit, rewardbench_summary,
                                     subset_accuracies)
    from rlhfkit.pairwise import PAIRWISE_FORWARDS, linked_groups
    from rlhfkit.scoring import encode_conversations, score_conversations, shard_and_gather

    if script_args.pairwise_forward not in PAIRWISE_FORWARDS:
        raise UserError(f"--pairwise_forward must be one of {', '.join(PAIRWISE_FORWARDS)}, "
                        f"not '{script_args.pairwise_forward}'")
    for flag in ("reward_name_or_path", "dataset_path", "record_dir"):
        if not getattr(script_args, flag):
            raise UserError(f"--{flag} is required")
    accelerator = new_accelerator()
    setup_logging(accelerator.is_main_process)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[script_args.dtype]

    # ---------------------------------------------------------------- data (read first: v2 decides the model mode)
    benchmark = script_args.benchmark
    if benchmark == "auto":
        benchmark = detect_benchmark(list(read_records(script_args.dataset_path[0], split=script_args.dataset_split,
                                                       skip_invalid=script_args.skip_invalid_rows)))
    implicit = script_args.ref_model_name_or_path is not None or script_args.ref_free
    if benchmark == "v2" and implicit:
        raise UserError("RewardBench 2 has no DPO (implicit reward) mode (scripts/run_v2.py scores reward models "
                        "only); drop --ref_model_name_or_path / --ref_free or use --benchmark v1|pairs")
    if benchmark == "v2":
        data = load_rewardbench_rows(script_args.dataset_path, script_args.dataset_split,
                                     script_args.skip_invalid_rows, convert=rb2.v2_row, flags=rb2.row_flags)
        rows = data.rows
    elif benchmark == "v1":
        data = load_rewardbench_rows(script_args.dataset_path, script_args.dataset_split, script_args.skip_invalid_rows)
        rows = data.rows
    else:
        from rlhfkit.data import load_preferences

        data = load_preferences(script_args.dataset_path, skip_invalid=script_args.skip_invalid_rows,
                                split=script_args.dataset_split)
        rows = data.rows
    if not rows:
        raise UserError(f"{script_args.dataset_path[0]}: no rows to evaluate")

    # ---------------------------------------------------------------- model & tokenizer
    model_path, model_record = resolve_model(script_args.reward_name_or_path, role="reward model")
    tokenizer = load_tokenizer(model_path, script_args.chat_template)
    reference = None
    if implicit:
        model = load_causal_lm(model_path, dtype=dtype).to(accelerator.device).eval()
        vocab_before_pad = model.get_input_embeddings().num_embeddings
        ensure_pad_token(tokenizer, model)
        if script_args.ref_model_name_or_path:
            ref_path, ref_record = resolve_model(script_args.ref_model_name_or_path, role="reference model")
            reference = load_causal_lm(ref_path, dtype=dtype).to(accelerator.device).eval()
            match_vocabulary(reference, model, vocab_before_pad, script_args.ref_model_name_or_path)
            model_record["reference"] = ref_record
    else:
        model = load_reward_model(model_path, dtype=dtype).to(accelerator.device).eval()
        ensure_pad_token(tokenizer, model)
    limits = [v for v in (model_position_limit(model), model_position_limit(reference) if reference else None) if v]
    side = getattr(tokenizer, "truncation_side", "right") if benchmark == "v2" else RM_TRUNCATION_SIDE
    requested = script_args.max_length  # 2048 by default: RewardBench's RM scripts and DPOInference.max_length
    plan = TruncationPlan(requested=requested, model_limit=min(limits) if limits else None,
                          side="keep_end prompt (DPO)" if implicit else side)

    # ---------------------------------------------------------------- score
    batch_size = script_args.batch_size
    if benchmark == "v2":
        conversations = [row["prompt"] + [{"role": "assistant", "content": text}]
                         for row in rows for text in row["completions"]]
        texts = [text for row in rows for text in row["completions"]]
    else:
        conversations = ([row["prompt"] + row["chosen"] for row in rows]
                         + [row["prompt"] + row["rejected"] for row in rows])
        texts = ([" ".join(m["content"] for m in row["chosen"]) for row in rows]
                 + [" ".join(m["content"] for m in row["rejected"]) for row in rows])

    if implicit:
        def dpo_scores(pairs_rows, size, progress=True):
            tokenized = [dpo_tokenize_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"], plan.max_length)
                         for r in pairs_rows]
            sequences, mapping = unique_items([(t.chosen_ids, t.chosen_start) for t in tokenized]
                                              + [(t.rejected_ids, t.rejected_start) for t in tokenized])
            how = "sum" if reference is not None else script_args.ref_free_type
            n = len(pairs_rows)
            groups = linked_groups(len(sequences), [(mapping[i], mapping[n + i]) for i in range(n)])
            layout = script_args.pairwise_forward
            values = dpo_sequence_scores(model, sequences, tokenizer.pad_token_id, size, how, progress,
                                         "policy log-probs", groups=groups, layout=layout)
            if reference is not None:
                ref_values = dpo_sequence_scores(reference, sequences, tokenizer.pad_token_id, size, "sum", progress,
                                                 "reference log-probs", groups=groups, layout=layout)
                values = [p - r for p, r in zip(values, ref_values)]
            values = [values[i] for i in mapping]
            return list(zip(values[:n], values[n:])), tokenized

        def score_pair_list(part):
            return dpo_scores(part, batch_size, accelerator.is_main_process)[0]

        pair_scores = shard_and_gather(score_pair_list, rows, accelerator)
        scores = [c for c, _ in pair_scores] + [r for _, r in pair_scores]
        tokenized_all = [dpo_tokenize_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"], plan.max_length)
                         for r in rows]
        truncated_pairs = [t.prompt_truncated or t.response_truncated for t in tokenized_all]
        truncation = {**plan.to_dict(), "max_prompt_length": DPO_MAX_PROMPT_LENGTH, "truncated_pairs": sum(truncated_pairs),
                      "prompt_truncated_pairs": sum(t.prompt_truncated for t in tokenized_all),
                      "response_truncated_pairs": sum(t.response_truncated for t in tokenized_all),
                      "rule": "rewardbench/dpo.py tokenize_row (keep_end, max_prompt_length 128)"}
        sequence_truncated = truncated_pairs + truncated_pairs
    else:
        truncate = plan.truncator(tokenizer)
        full_lengths = [len(ids) for ids in encode_conversations(tokenizer, conversations)]
        unique, mapping = unique_items(conversations)
        unique_scores = score_conversations(model, tokenizer, unique, batch_size, plan.max_length, progress=True,
                                            accelerator=accelerator, truncate=truncate,
                                            layout=script_args.pairwise_forward)
        scores = [unique_scores[i] for i in mapping]
        limit = plan.max_length
        sequence_truncated = [limit is not None and n > limit for n in full_lengths]
        truncation = {**plan.to_dict(), "truncated_sequences": sum(sequence_truncated),
                      "longest_sequence": max(full_lengths),
                      "rule": ("scripts/run_v2.py: tokenizer truncation, the tokenizer's own side" if benchmark == "v2"
                               else "scripts/run_rm.py: tokenizer truncation, side 'left'")}
        if benchmark != "v2":
            n = len(rows)
            truncation["truncated_pairs"] = sum(a or b for a, b in zip(sequence_truncated[:n], sequence_truncated[n:]))
    if truncation.get("capped_by_model") and accelerator.is_main_process:
        logger.warning("the model takes at most %d positions: sequences are truncated to %d tokens, not %s "
                       "(RewardBench would pass them whole and the model would fail)", plan.model_limit,
                       plan.max_length, requested)

    # ---------------------------------------------------------------- results
    lengths = response_lengths(tokenizer, texts)
    results: dict = {
        "model": script_args.reward_name_or_path,
        "model_record": model_record,
        "benchmark": benchmark,
        "scoring": ("implicit_reward" if reference is not None else
                    f"implicit_reward_ref_free_{script_args.ref_free_type}" if implicit else "reward_model"),
        "datasets": script_args.dataset_path,
        "data_report": data.report,
        "processes": accelerator.num_processes,
        "truncation": truncation,
    }
    diagnostics: dict = {}
    if benchmark == "v2":
        cursor = 0
        for row in rows:
            row["scores"] = scores[cursor : cursor + len(row["completions"])]
            cursor += len(row["completions"])
        per_subset, per_row = rb2.score_rows(rows)
        summary = rb2.summary(per_subset)
        totals = data.totals()
        results.update({"rows": len(rows), "completions": len(scores), "per_subset": per_subset,
                        "rewardbench2": summary,
                        "empty_completions": totals.get("empty_completions", 0),
                        "rows_with_identical_completions": totals.get("rows_with_identical_completions", 0)})
        # pairs for the diagnostics: every correct completion against every incorrect one of a row
        chosen_scores, rejected_scores, chosen_lengths, rejected_lengths, pair_sources = [], [], [], [], []
        cursor = 0
        for row in rows:
            k = len(row["completions"])
            good = range(row["num_correct"] if rb2.is_ties(row["subset"]) else 1)
            for i in good:
                for j in range(row["num_chosen"], k):
                    chosen_scores.append(row["scores"][i])
                    rejected_scores.append(row["scores"][j])
                    chosen_lengths.append(lengths[cursor + i])
                    rejected_lengths.append(lengths[cursor + j])
                    pair_sources.append(row["subset"])
            cursor += k
        table = rb2.format_table(per_subset, summary)
        table += (f"\n\n{'Rows scored':<28}{len(rows):>16}   ({len(scores)} completions; "
                  f"{results['empty_completions']} empty, {results['rows_with_identical_completions']} rows with "
                  "identical completions; all scored)")
    else:
        n = len(rows)
        chosen_scores, rejected_scores = scores[:n], scores[n:]
        chosen_lengths, rejected_lengths = lengths[:n], lengths[n:]
        correct = [is_correct(c, r) for c, r in zip(chosen_scores, rejected_scores)]
        subsets = [row.get("subset") for row in rows]
        rewardbench = benchmark == "v1" or is_rewardbench(subsets)
        if not any(subsets):
            sources = {row.get("source") for row in rows}
            subsets = [row.get("source") for row in rows] if len(sources) > 1 else [None] * n
        per_subset = subset_accuracies(subsets, correct)
        summary = rewardbench_summary(per_subset) if rewardbench else None
        totals = data.totals()
        results.update({
            "pairs": n,
            "accuracy": sum(correct) / n,
            "ties": sum(c == r for c, r in zip(chosen_scores, rejected_scores)),
            "identical_pairs": totals.get("identical_pairs", 0) if benchmark == "v1" else 0,
            "dropped_identical_pairs": totals.get("dropped_identical", 0),
            "empty_chosen": totals.get("empty_chosen", 0),
            "empty_rejected": totals.get("empty_rejected", 0),
            "per_subset": per_subset,
            "rewardbench": summary,
        })
        pair_sources = [row.get("source") or row.get("subset") or "all" for row in rows]
        table = format_table(per_subset, summary)
        table += (f"\n\n{'Accuracy (all pairs)':<28}{100 * results['accuracy']:>16.2f}   ({n} pairs, "
                  f"{results['ties']} ties)")
        if benchmark == "v1":
            table += (f"\n{'Rows scored':<28}{n:>16}   (every row: {results['identical_pairs']} identical "
                      f"chosen == rejected, {results['empty_chosen']} empty chosen, {results['empty_rejected']} "
                      "empty rejected)")
        elif results["dropped_identical_pairs"]:
            table += f"\n{'Dropped (chosen == rejected)':<28}{results['dropped_identical_pairs']:>16}"
    results["accuracy_pairs_for_diagnostics"] = len(chosen_scores)
    trunc_count = truncation.get("truncated_sequences", truncation.get("truncated_pairs", 0))
    unit = "sequences" if "truncated_sequences" in truncation else "pairs"
    table += (f"\n{'Truncated':<28}{trunc_count:>16}   {unit} longer than {plan.max_length} tokens "
              f"({truncation['rule']}"
              + (f"; capped from {requested} at the model's {plan.model_limit} positions" if plan.capped_by_model else "")
              + ")")

    # ---------------------------------------------------------------- diagnostics (extra)
    diagnostics["length"] = rm_diagnostics.length_report(scores, lengths, chosen_scores, rejected_scores,
                                                         chosen_lengths, rejected_lengths)
    sample = rm_diagnostics.sample_rows(len(rows), script_args.batch_invariance_rows, seed=0)
    if sample:
        if implicit:
            pairs_once, _ = dpo_scores([rows[i] for i in sample], 1, progress=False)
            single = [c for c, _ in pairs_once] + [r for _, r in pairs_once]
            batched = [chosen_scores[i] for i in sample] + [rejected_scores[i] for i in sample]
        else:
            if benchmark == "v2":
                offsets = _offsets(rows)
                picked = [offsets[i] + j for i in sample for j in range(len(rows[i]["completions"]))]
            else:
                picked = list(sample) + [len(rows) + i for i in sample]
            # each sequence alone in a plain forward: also checks the packed, prefix-shared layout of the run
            single = score_conversations(model, tokenizer, [conversations[i] for i in picked], 1, plan.max_length,
                                         progress=False, accelerator=None, truncate=truncate, layout="padded")
            batched = [scores[i] for i in picked]
        diagnostics["batch_invariance"] = rm_diagnostics.batch_invariance(batched, single, batch_size, len(sample))
    results["diagnostics"] = diagnostics
    diagnostic_lines = rm_diagnostics.format_lines(diagnostics)
    if diagnostic_lines:
        table += "\n" + "\n".join(diagnostic_lines)
    if script_args.calibration and accelerator.is_main_process and chosen_scores:
        from rlhfkit.eval.calibration import calibration_report

        results["calibration"] = calibration_report(chosen_scores, rejected_scores, pair_sources,
                                                    script_args.record_dir)
        calibration = results["calibration"]
        table += f"\n{'ECE (all pairs)':<28}{calibration['overall']['ece']:>16.4f}"
        if len(calibration["per_source"]) > 1:
            for name, stats in calibration["per_source"].items():
                table += f"\n  {name:<26}{stats['ece']:>16.4f}   accuracy {100 * stats['accuracy']:.2f}%"

    # ---------------------------------------------------------------- save
    if accelerator.is_main_process:
        record_dir = Path(script_args.record_dir)
        record_dir.mkdir(parents=True, exist_ok=True)
        if benchmark == "v2":
            scores_lines = [
                json.dumps({"id": row["id"], "subset": row["subset"], "num_correct": row["num_correct"],
                            "scores": row["scores"], "result": result,
                            "truncated": [sequence_truncated[offset + j] for j in range(len(row["completions"]))]})
                for row, result, offset in zip(rows, per_row, _offsets(rows))
            ]
            metrics = {"score": summary["score"], "rows": len(rows), **summary["subsets"]}
        else:
            n = len(rows)
            scores_lines = [
                json.dumps({"id": row.get("id", str(i)), "subset": row.get("subset"), "source": row.get("source"),
                            "chosen_score": c, "rejected_score": r, "correct": ok,
                            "truncated": bool(sequence_truncated[i] or sequence_truncated[n + i])})
                for i, (row, c, r, ok) in enumerate(zip(rows, chosen_scores, rejected_scores, correct))
            ]
            metrics = {"accuracy": results["accuracy"], "pairs": n}
            if summary:
                metrics.update({"score": summary["score"], "legacy_score": summary["legacy_score"],
                                **summary["sections"]})
        _write(record_dir, "scores.jsonl", "\n".join(scores_lines) + "\n")
        _write(record_dir, "results.json", json.dumps(results, indent=2, default=str) + "\n")
        _write(record_dir, "metrics.json", json.dumps(metrics, indent=2) + "\n")
        _write(record_dir, "args.yaml", yaml.safe_dump(to_dict(script_args), sort_keys=True))
        _write(record_dir, "table.txt", table + "\n")
        print(table)
    accelerator.wait_for_everyone()
    return results


def _offsets(rows: list[dict]) -> list[int]:
    offsets, cursor = [], 0
    for row in rows:
        offsets.append(cursor)
        cursor += len(row["completions"])
    return offsets


if __name__ == "__main__":
    run_stage(main, ARGUMENTS)
