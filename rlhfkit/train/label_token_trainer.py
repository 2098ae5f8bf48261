"""Training a causal LM to emit one label token at chosen positions: the pairwise preference model ("A"/"B" after
each comparison, pm_train.py) and the process reward model ("+"/"−" at each step's end, prm_train.py).

The loss is the language-model cross-entropy of the label token over the whole vocabulary at those positions only,
as RLHFlow trains both (axolotl SFT on the one-token assistant turns of pair-pm/ and math-rm/: "We only train on
the assistant round (the “+” and “−”)", math-rm/README.md @ 002679ae). Examples are groups of token sequences laid
out by the pairwise forward (rlhfkit/pairwise.py): a PM pair's two orders share their prefix; a PRM row is one
sequence whose steps are all scored in one forward. The LM head runs only at the scored positions.

On top of HF `Trainer`: LoRA (a PEFT model is passed in), DeepSpeed/ZeRO-3 and checkpoints as every Trainer stage.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from rlhfkit import layout_check
from rlhfkit import pairwise as pw
from rlhfkit.args import TrainingDefaults


def label_token_loss(logits: torch.Tensor, targets: torch.Tensor, candidates: torch.Tensor):
    """Cross-entropy of the label token, and the two-way probability the metrics use.

    logits: [M, V] at the scored positions; targets: [M] label token ids; candidates: [C] the label tokens (("A","B")
    or ("+","−")). Returns (loss: mean over the M positions, p_target: [M] softmax over the candidates' logits at the
    target, detached). The loss is the full-vocabulary LM loss (what SFT on the label token trains); p_target is how
    every user of the model reads it (softmax over the candidates only, RLHFlow's scoring)."""
    loss = torch.nn.functional.cross_entropy(logits.float(), targets)
    with torch.no_grad():
        two_way = torch.softmax(logits[:, candidates].float(), dim=-1)
        target_class = (targets.unsqueeze(1) == candidates.unsqueeze(0)).float().argmax(dim=1)
        p_target = two_way.gather(1, target_class.unsqueeze(1)).squeeze(1)
    return loss, p_target


class LabelTokenCollator:
    """Examples {"sequences": [[ids]…], "positions": [[t…]…], "targets": [[id…]…]} → one plan (each example a group)
    plus `lt_index` [M] (flat positions) and `lt_targets` [M]."""

    def __init__(self, pad_token_id: int, kind: str):
        self.pad_token_id, self.kind = pad_token_id, kind

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        sequences, groups, positions, targets = [], [], [], []
        for example in examples:
            start = len(sequences)
            sequences.extend(list(s) for s in example["sequences"])
            groups.append(list(range(start, len(sequences))))
            positions.extend(list(p) for p in example["positions"])
            targets.extend(t for ts in example["targets"] for t in ts)
        plan_ = pw.plan(sequences, groups, kind=self.kind, pad_token_id=self.pad_token_id)
        batch = plan_.to_inputs()
        batch["lt_index"] = pw.flat_positions(plan_, sequences, groups, positions)
        batch["lt_targets"] = torch.tensor(targets, dtype=torch.long)
        batch["lt_per_example"] = torch.tensor([sum(len(p) for p in e["positions"]) for e in examples])
        return batch


class LabelTokenTrainer(Trainer):
    """`metric`: "pairs" (a PM: each example's two positions are the two orders of one pair; logs `accuracy`, the
    share of pairs whose mean two-order probability of the chosen is > 0.5, and `order_agreement`, the share whose
    two orders pick the same response) or "steps" (a PRM: `step_accuracy`, plus precision/recall/F1 of the negative
    label, the one a PRM exists to find)."""

    def __init__(self, *args, candidates: list[int], metric: str, pairwise_forward: str = "auto", **kwargs):
        if metric not in ("pairs", "steps"):
            raise ValueError(f"metric must be pairs or steps, not {metric!r}")
        model, tokenizer = kwargs.get("model"), kwargs.get("processing_class")
        self.pairwise_layout = layout_check.choose_layout(model, pairwise_forward)
        if self.pairwise_layout == "packed" and pw.is_encoder(model.config):
            raise ValueError("a label-token model must be a causal LM, not an encoder")
        kwargs["data_collator"] = LabelTokenCollator(tokenizer.pad_token_id, self.pairwise_layout)
        self.candidates, self.metric = candidates, metric
        super().__init__(*args, **kwargs)
        # our loss is a mean over the batch's positions: let Trainer divide it by the accumulation steps
        self.model_accepts_loss_kwargs = False
        self._stats = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        plan_ = pw.Plan.from_inputs(inputs)
        candidates = torch.tensor(self.candidates, device=inputs["lt_targets"].device)
        logits = pw.logits_at(model, plan_, inputs["lt_index"])
        loss, p_target = label_token_loss(logits, inputs["lt_targets"], candidates)
        self._record("train" if model.training else "eval", p_target, inputs["lt_targets"], candidates)
        return (loss, {"p_target": p_target}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = {key: value.to(self.args.device) if isinstance(value, torch.Tensor) else value
                  for key, value in inputs.items()}
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _record(self, mode: str, p_target: torch.Tensor, targets: torch.Tensor, candidates: torch.Tensor) -> None:
        stats = self._stats[mode]
        values = p_target.detach().float().cpu()
        if self.metric == "pairs":
            pairs = values.view(-1, 2)
            stats["accuracy"].extend((pairs.mean(1) > 0.5).float().tolist())
            stats["order_agreement"].extend(((pairs[:, 0] > 0.5) == (pairs[:, 1] > 0.5)).float().tolist())
        else:
            correct = (values > 0.5).float()
            negative = (targets == candidates[1]).cpu()
            stats["step_accuracy"].extend(correct.tolist())
            stats["negative_true"].extend((negative & (correct > 0)).float().tolist())
            stats["negative_predicted"].extend(((negative & (correct > 0)) | (~negative & (correct == 0))).float().tolist())
            stats["negative_actual"].extend(negative.float().tolist())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        stats, prefix = self._stats[mode], ("eval_" if mode == "eval" else "")
        if self.metric == "pairs":
            for key in ("accuracy", "order_agreement"):
                if stats[key]:
                    logs[prefix + key] = sum(stats[key]) / len(stats[key])
        elif stats["step_accuracy"]:
            logs[prefix + "step_accuracy"] = sum(stats["step_accuracy"]) / len(stats["step_accuracy"])
            logs.update({prefix + k: v for k, v in binary_f1(sum(stats["negative_true"]),
                                                             sum(stats["negative_predicted"]),
                                                             sum(stats["negative_actual"])).items()})
        self._stats[mode] = defaultdict(list)
        super().log(logs, start_time)


@dataclass
class LabelTokenArguments(TrainingDefaults, TrainingArguments):
    """HF TrainingArguments with this toolkit's defaults (rlhfkit.args.TrainingDefaults), for pm_train.py and
    prm_train.py (each says what its `max_length` counts)."""

    max_length: int | None = field(default=2048, metadata={"help": "Longest sequence in tokens."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept off: the collator reads our columns."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the checkpoint (as TRL's configs)."})


# the held-out numbers each metric reports "before training" (suffixed `_before` in metrics.json)
BEFORE_TRAINING_KEYS = {"pairs": ("eval_loss", "eval_accuracy", "eval_order_agreement"),
                        "steps": ("eval_loss", "eval_step_accuracy", "eval_negative_f1")}


def train_label_token_stage(stage: str, script_args, model_args, training_args, *, model, model_path: str, tokenizer,
                            candidates: list[int], train_rows: list, train_records: list[dict],
                            eval_records: list[dict], metric: str, run_info: dict, counts: dict) -> dict:
    """The train and save sections pm_train.py and prm_train.py share; returns the stage's metrics. The staging dir
    appears only here, so bad input found before leaves nothing behind; a resume must be the same run (flags,
    training rows, model, tokenizer: `StageOutput.for_trainer`). `run_info`: the stage's own part of run_info.json
    (the label tokens and the layout used are added); `counts`: the train/eval example counts, kept in metrics.json.

    "Before training" (`BEFORE_TRAINING_KEYS[metric]`, suffixed `_before`) is measured inside train() (eval_on_start), not by an
    evaluate() ahead of it: under ZeRO-3 that leaves HF's Trainer holding an inference engine and no training engine
    (backward on None)."""
    from datasets import Dataset

    from rlhfkit.checkpoints import StageOutput
    from rlhfkit.cli import to_dict
    from rlhfkit.faults import install_fault_handlers
    from rlhfkit.threads import follow_between_steps
    from rlhfkit.saving import save_final_model

    train_dataset = Dataset.from_list(train_records)
    eval_dataset = Dataset.from_list(eval_records) if eval_records else None
    output, resume_from = StageOutput.for_trainer(training_args, stage, overwrite=model_args.overwrite_output_dir,
                                                  arguments=(script_args, model_args), dataset=train_rows,
                                                  model=model_path, tokenizer=tokenizer)  # a resume is this run
    measure_start = eval_dataset is not None and resume_from is None
    training_args.eval_on_start = training_args.eval_on_start or measure_start
    trainer = LabelTokenTrainer(model=model, args=training_args, train_dataset=train_dataset,
                                eval_dataset=eval_dataset, processing_class=tokenizer, candidates=candidates,
                                metric=metric, pairwise_forward=script_args.pairwise_forward)
    install_fault_handlers(trainer, training_args)  # preemption → checkpoint + exit 75; non-finite loss → stop
    follow_between_steps(trainer)  # take the cores a finished partner stage left (RLHFKIT_THREADS_FILE)
    metrics: dict = {}
    train_result = trainer.train(resume_from_checkpoint=resume_from)
    if measure_start:  # the step-0 evaluation of eval_on_start
        start = next(entry for entry in trainer.state.log_history if "eval_loss" in entry)
        metrics.update({f"{k}_before": v for k, v in start.items() if k in BEFORE_TRAINING_KEYS[metric]})
    metrics.update({f"train_{k}" if not k.startswith("train") else k: v for k, v in train_result.metrics.items()})
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
    save_final_model(trainer, output.staging, tokenizer, merge_lora=not model_args.save_adapter_only)
    run_info = {**run_info, "label_token_ids": candidates, "pairwise_forward": trainer.pairwise_layout}
    metrics["data"] = counts
    output.finalize(run_info, metrics, to_dict(script_args, model_args, training_args))
    return metrics


def binary_f1(true_positive: float, predicted: float, actual: float) -> dict:
    """Precision, recall and F1 of one class from its counts (0 where undefined)."""
    precision = true_positive / predicted if predicted else 0.0
    recall = true_positive / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"negative_precision": precision, "negative_recall": recall, "negative_f1": f1}
