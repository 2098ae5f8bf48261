"""eval_benchmark.py's scorer for a reward model (one scalar per response) or a DPO policy (the implicit reward of
rewardbench/dpo.py), on any benchmark of rlhfkit/eval/benchmarks.py.

`Scorer` holds the model (and reference) loaded once for every benchmark of a run; `Scorer.evaluate` scores one
benchmark's rows (the responses to one prompt together through the pairwise forward, rlhfkit/pairwise.py, in
length-sorted batches; with several processes each sequence is scored by exactly one process), hands the scores to
the benchmark's `summarize`, adds the diagnostics every run reports (length correlation, batch invariance, ECE) and
writes the run's files. What is benchmark-specific lives in the benchmark's module; what is model-specific here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.errors import UserError

logger = logging.getLogger("eval_benchmark")


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


def dpo_groups(module, row: dict) -> list[list[int]]:
    """Completions whose DPO truncation is decided together (rewardbench/dpo.py tokenize_row: the prompt is cut when
    prompt + the longer response of the pair exceed max_length): the benchmark's own pairing when it has one
    (RM-Bench's run_dpo.py: chosen[k] with rejected[k]); JudgeBench and RMB pairwise rows are one pair; a larger
    group (RMB best-of-N) is cut by the rule of the pair with its longest response (extra: no DPO script there)."""
    own = getattr(module, "dpo_groups", None)
    return own(row) if own else [list(range(len(row["completions"])))]


@dataclass
class Scorer:
    """The model (and reference) loaded once for every benchmark of a run, and how it scores conversations."""

    args: object  # eval_benchmark.ScriptArguments
    accelerator: object
    tokenizer: object
    model: object
    reference: object | None
    implicit: bool
    model_limit: int | None
    record: dict  # resolve_model's record of the model (and its reference)

    def runs(self, args) -> tuple[list[dict], list[dict]]:
        from rlhfkit.eval.benchmarks import plan_runs

        return plan_runs(args, dpo=self.implicit)

    def evaluate(self, run: dict, directory: Path) -> dict:
        from rlhfkit.eval.benchmarks import get

        return evaluate(get(run["benchmark"]), run["paths"], directory, self, self.record)

    def plan(self, module):
        """`--max_length`, else the benchmark's own (DPO: rewardbench/dpo.py's 2048), never beyond the model."""
        from rlhfkit.eval.dpo_scoring import DPO_MAX_LENGTH
        from rlhfkit.eval.rewardbench import TruncationPlan

        requested = self.args.max_length
        if requested is None:
            requested = DPO_MAX_LENGTH if self.implicit else module.MAX_LENGTH
        if self.implicit:
            side = "keep_end prompt (DPO)"
        else:
            side = module.TRUNCATION_SIDE or getattr(self.tokenizer, "truncation_side", "right")
        return TruncationPlan(requested=requested, model_limit=self.model_limit, side=side)

    def dpo_scores(self, pair_rows: list[dict], max_length: int, size: int, progress: bool = True):
        """DPO implicit rewards of (prompt, chosen, rejected) rows, as rewardbench/dpo.py: [(chosen, rejected)] and
        the tokenized pairs."""
        from rlhfkit.eval.dpo_scoring import dpo_sequence_scores, dpo_tokenize_pair
        from rlhfkit.scoring import linked_groups

        tokenized = [dpo_tokenize_pair(self.tokenizer, r["prompt"], r["chosen"], r["rejected"], max_length)
                     for r in pair_rows]
        sequences, mapping = unique_items([(t.chosen_ids, t.chosen_start) for t in tokenized]
                                          + [(t.rejected_ids, t.rejected_start) for t in tokenized])
        how = "sum" if self.reference is not None else self.args.ref_free_type
        n = len(pair_rows)
        groups = linked_groups(len(sequences), [(mapping[i], mapping[n + i]) for i in range(n)])
        layout = self.args.pairwise_forward
        pad = self.tokenizer.pad_token_id
        values = dpo_sequence_scores(self.model, sequences, pad, size, how, progress, "policy log-probs",
                                     groups=groups, layout=layout)
        if self.reference is not None:
            ref_values = dpo_sequence_scores(self.reference, sequences, pad, size, "sum", progress,
                                             "reference log-probs", groups=groups, layout=layout)
            values = [p - r for p, r in zip(values, ref_values)]
        values = [values[i] for i in mapping]
        return list(zip(values[:n], values[n:])), tokenized

    def dpo_pair_rows(self, module, rows: list[dict]) -> tuple[list[dict], list[tuple[int, int, int]]]:
        """Group rows as DPO pairs: the pair rows and, per pair, (row, completion scored as chosen, completion scored
        as rejected) — a completion whose score comes from the rejected side is listed there, otherwise -1."""
        from rlhfkit.eval.dpo_scoring import dpo_tokenize_pair

        def message(text: str) -> list[dict]:
            return [{"role": "assistant", "content": text}]

        pair_rows, where = [], []
        for r, row in enumerate(rows):
            texts = row["completions"]
            for group in dpo_groups(module, row):
                if len(group) == 2:
                    pair_rows.append({"prompt": row["prompt"], "chosen": message(texts[group[0]]),
                                      "rejected": message(texts[group[1]])})
                    where.append((r, group[0], group[1]))
                    continue
                # the group's longest response (untruncated response tokens) decides the cut for every member
                lengths = []
                for i in group:
                    t = dpo_tokenize_pair(self.tokenizer, row["prompt"], message(texts[i]), message(texts[i]),
                                          max_length=10**9)
                    lengths.append(len(t.chosen_ids) - t.chosen_start)
                longest = group[max(range(len(group)), key=lambda k: lengths[k])]
                for i in group:
                    pair_rows.append({"prompt": row["prompt"], "chosen": message(texts[i]),
                                      "rejected": message(texts[longest])})
                    where.append((r, i, -1))
        return pair_rows, where


def evaluate(module, paths: list[str], directory: Path, scorer: Scorer, model_record: dict) -> dict:
    """Score one benchmark's files (`module`: rlhfkit/eval/benchmarks.py) and write its files into `directory`;
    returns its results (what results.json holds) with its flat `metrics`."""
    from rlhfkit.eval import benchmarks
    from rlhfkit.eval import diagnostics as rm_diagnostics
    from rlhfkit.eval.dpo_scoring import DPO_MAX_PROMPT_LENGTH, dpo_tokenize_pair
    from rlhfkit.scoring import encode_conversations, score_conversations, shard_and_gather

    args, accelerator, tokenizer, model = scorer.args, scorer.accelerator, scorer.tokenizer, scorer.model
    implicit = scorer.implicit

    # ---------------------------------------------------------------- data
    benchmark = module.NAME
    data = module.load(paths, args.dataset_split, args.skip_invalid_rows)
    rows = data.rows
    if not rows:
        raise UserError(f"{paths[0]}: no rows to evaluate")
    group = module.GROUP
    plan = scorer.plan(module)
    requested = plan.requested

    # ---------------------------------------------------------------- score
    batch_size = args.batch_size
    if group:
        conversations = [row["prompt"] + [{"role": "assistant", "content": text}]
                         for row in rows for text in row["completions"]]
        texts = [text for row in rows for text in row["completions"]]
    else:
        conversations = ([row["prompt"] + row["chosen"] for row in rows]
                         + [row["prompt"] + row["rejected"] for row in rows])
        texts = ([" ".join(m["content"] for m in row["chosen"]) for row in rows]
                 + [" ".join(m["content"] for m in row["rejected"]) for row in rows])
    offsets = _offsets(rows) if group else None
    dpo_max_length = plan.max_length

    def dpo_completion_scores(selected: list[int], size: int, distributed: bool):
        """Implicit rewards of the completions of rows `selected` (group benchmarks), in their order, and which
        were truncated; `distributed`: the pairs shared among the processes (the run), or all scored here (the
        batch-invariance sample)."""
        part = [rows[i] for i in selected]
        pair_rows, where = scorer.dpo_pair_rows(module, part)

        def score_part(items):
            return scorer.dpo_scores(items, dpo_max_length, size, distributed and accelerator.is_main_process)[0]

        pair_scores = shard_and_gather(score_part, pair_rows, accelerator) if distributed else score_part(pair_rows)
        local_offsets = _offsets(part)
        values = [None] * sum(len(row["completions"]) for row in part)
        cut = [False] * len(values)
        for (r, i, j), (chosen, rejected), pair in zip(where, pair_scores, pair_rows):
            tokenized = dpo_tokenize_pair(tokenizer, pair["prompt"], pair["chosen"], pair["rejected"], dpo_max_length)
            truncated = tokenized.prompt_truncated or tokenized.response_truncated
            values[local_offsets[r] + i] = chosen
            cut[local_offsets[r] + i] = truncated
            if j >= 0:
                values[local_offsets[r] + j] = rejected
                cut[local_offsets[r] + j] = truncated
        return values, cut

    if implicit and group:
        scores, sequence_truncated = dpo_completion_scores(list(range(len(rows))), batch_size, True)
        truncation = {**plan.to_dict(), "max_prompt_length": DPO_MAX_PROMPT_LENGTH,
                      "truncated_sequences": sum(sequence_truncated),
                      "rule": "rewardbench/dpo.py tokenize_row (keep_end, max_prompt_length 128)"}
    elif implicit:
        def score_pair_list(part):
            return scorer.dpo_scores(part, dpo_max_length, batch_size, accelerator.is_main_process)[0]

        pair_scores = shard_and_gather(score_pair_list, rows, accelerator)
        scores = [c for c, _ in pair_scores] + [r for _, r in pair_scores]
        tokenized_all = [dpo_tokenize_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"], dpo_max_length)
                         for r in rows]
        truncated_pairs = [t.prompt_truncated or t.response_truncated for t in tokenized_all]
        truncation = {**plan.to_dict(), "max_prompt_length": DPO_MAX_PROMPT_LENGTH,
                      "truncated_pairs": sum(truncated_pairs),
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
                                            layout=args.pairwise_forward)
        scores = [unique_scores[i] for i in mapping]
        limit = plan.max_length
        sequence_truncated = [limit is not None and n > limit for n in full_lengths]
        truncation = {**plan.to_dict(), "truncated_sequences": sum(sequence_truncated),
                      "longest_sequence": max(full_lengths), "rule": module.TRUNCATION_RULE}
        if not group:
            n = len(rows)
            truncation["truncated_pairs"] = sum(a or b for a, b in zip(sequence_truncated[:n], sequence_truncated[n:]))
    trunc_count = truncation.get("truncated_sequences", truncation.get("truncated_pairs", 0))
    if truncation.get("capped_by_model") and (requested is not None or trunc_count) and accelerator.is_main_process:
        logger.warning("the model takes at most %d positions: sequences are truncated to %d tokens, not %s "
                       "(the benchmark's script would pass them whole and the model would fail)", plan.model_limit,
                       plan.max_length, requested)

    # ---------------------------------------------------------------- results (the benchmark's own rules)
    lengths = response_lengths(tokenizer, texts)
    results: dict = {
        "model": args.reward_model_path,
        "model_record": model_record,
        "benchmark": benchmark,
        "scoring": ("implicit_reward" if scorer.reference is not None else
                    f"implicit_reward_ref_free_{args.ref_free_type}" if implicit else "reward_model"),
        "datasets": list(paths),
        "data_report": data.report,
        "processes": accelerator.num_processes,
        "truncation": truncation,
    }
    diagnostics: dict = {}
    summary = benchmarks.summarize(module, rows, scores, sequence_truncated, data.totals())
    results.update(summary["results"])
    table = summary["table"]
    chosen_scores = [scores[i] for i, _, _ in summary["pairs"]]
    rejected_scores = [scores[j] for _, j, _ in summary["pairs"]]
    chosen_lengths = [lengths[i] for i, _, _ in summary["pairs"]]
    rejected_lengths = [lengths[j] for _, j, _ in summary["pairs"]]
    pair_sources = [source for _, _, source in summary["pairs"]]
    results["accuracy_pairs_for_diagnostics"] = len(chosen_scores)
    unit = "sequences" if "truncated_sequences" in truncation else "pairs"
    limit_text = f"longer than {plan.max_length} tokens" if plan.max_length is not None else "(no limit)"
    table += (f"\n{'Truncated':<28}{trunc_count:>16}   {unit} {limit_text} ({truncation['rule']}"
              + (f"; capped from {requested} at the model's {plan.model_limit} positions" if plan.capped_by_model
                 and requested is not None else "")
              + (f"; the model's {plan.model_limit} positions" if plan.capped_by_model and requested is None else "")
              + ")")

    # ---------------------------------------------------------------- diagnostics (extra)
    diagnostics["length"] = rm_diagnostics.length_report(scores, lengths, chosen_scores, rejected_scores,
                                                         chosen_lengths, rejected_lengths)
    sample = rm_diagnostics.sample_rows(len(rows), args.batch_invariance_rows, seed=0)
    if sample:
        if implicit and group:
            single, _ = dpo_completion_scores(sample, 1, False)
            batched = [scores[offsets[i] + j] for i in sample for j in range(len(rows[i]["completions"]))]
        elif implicit:
            pairs_once, _ = scorer.dpo_scores([rows[i] for i in sample], dpo_max_length, 1, progress=False)
            single = [c for c, _ in pairs_once] + [r for _, r in pairs_once]
            batched = [scores[i] for i in sample] + [scores[len(rows) + i] for i in sample]
        else:
            if group:
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
    if args.calibration and accelerator.is_main_process and chosen_scores:
        from rlhfkit.eval.calibration import calibration_report

        results["calibration"] = calibration_report(chosen_scores, rejected_scores, pair_sources, directory)
        calibration = results["calibration"]
        table += f"\n{'ECE (all pairs)':<28}{calibration['overall']['ece']:>16.4f}"
        if len(calibration["per_source"]) > 1:
            for name, stats in calibration["per_source"].items():
                table += f"\n  {name:<26}{stats['ece']:>16.4f}   accuracy {100 * stats['accuracy']:.2f}%"

    # ---------------------------------------------------------------- save
    if accelerator.is_main_process:
        write_run(directory, results, summary["lines"], summary["metrics"], table)
    accelerator.wait_for_everyone()
    results["metrics"] = summary["metrics"]
    return results


def write_run(directory: Path, results: dict, lines: list[dict], metrics: dict, table: str) -> None:
    """One benchmark run's files (each written to a temp path and renamed): scores.jsonl (per row), results.json,
    metrics.json and table.txt, which is also printed."""
    from rlhfkit.files import write_text_atomic

    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(directory / "scores.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    write_text_atomic(directory / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    write_text_atomic(directory / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_text_atomic(directory / "table.txt", table + "\n")
    print(table)



def _offsets(rows: list[dict]) -> list[int]:
    offsets, cursor = [], 0
    for row in rows:
        offsets.append(cursor)
        cursor += len(row["completions"])
    return offsets


def load(args, accelerator, dtype, model_path: str, model_record: dict) -> Scorer:
    """The reward model, or with --ref_model_path / --ref_free the DPO policy (and its reference), loaded once."""
    from rlhfkit.eval.rewardbench import model_position_limit
    from rlhfkit.models import (ensure_pad_token, load_causal_lm, load_reward_model, load_tokenizer, match_vocabulary,
                                resolve_model)

    implicit = args.ref_model_path is not None or args.ref_free
    tokenizer = load_tokenizer(model_path, args.chat_template)
    reference = None
    if implicit:
        model = load_causal_lm(model_path, dtype=dtype).to(accelerator.device).eval()
        vocab_before_pad = model.get_input_embeddings().num_embeddings
        ensure_pad_token(tokenizer, model)
        if args.ref_model_path:
            ref_path, ref_record = resolve_model(args.ref_model_path, role="reference model")
            reference = load_causal_lm(ref_path, dtype=dtype).to(accelerator.device).eval()
            match_vocabulary(reference, model, vocab_before_pad, args.ref_model_path)
            model_record["reference"] = ref_record
    else:
        model = load_reward_model(model_path, dtype=dtype).to(accelerator.device).eval()
        ensure_pad_token(tokenizer, model)
    limits = [v for v in (model_position_limit(model), model_position_limit(reference) if reference else None) if v]
    return Scorer(args, accelerator, tokenizer, model, reference, implicit, min(limits) if limits else None,
                  model_record)
