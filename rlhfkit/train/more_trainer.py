"""MORE's trainers (`rm_train.py --objective multitask|more`): batches holding every source
(`SourceBalancedBatchSampler`), the source-weighted training loss of `rlhfkit.train.more`, per-source evaluation
metrics, and the momentum saved in each checkpoint so a resume continues it."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence

import torch

from rlhfkit.errors import UserError
from rlhfkit.train.more import OBJECTIVES, SourceWeightedLoss, base_model, capture_reward_head
from rlhfkit.train.reward_trainer import PairCollator, RewardModelTrainer

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# per-step batches that contain every source
# ---------------------------------------------------------------------------------------------------------------
class SourceBalancedBatchSampler(torch.utils.data.Sampler):
    """Batches of `batch_size` row indices holding every source in (nearly) equal numbers.

    Each source is read from its own endless stream of shuffled permutations (seeded by `seed` and the source), so
    small sources repeat more often than large ones and a large source is covered in full across epochs. An epoch is
    `ceil(len(dataset) / batch_size)` batches, the number a plain shuffled loader would give, so `--objective more`
    and `--objective bt` take the same number of steps. `batch_size % K` sources get one extra row, rotating.
    """

    def __init__(self, source_index: Sequence[int], batch_size: int, seed: int = 0, num_batches: int | None = None):
        by_source: dict[int, list[int]] = {}
        for row, index in enumerate(source_index):
            by_source.setdefault(int(index), []).append(row)
        if not by_source:
            raise UserError("MORE/multitask training needs a non-empty training set")
        self.source_ids = sorted(by_source)
        self.groups: list[list[int]] = [by_source[index] for index in self.source_ids]
        if batch_size < len(self.groups):
            raise UserError(
                f"--per_device_train_batch_size {batch_size} is smaller than the number of sources "
                f"({len(self.groups)}); every batch must hold every source"
            )
        self.batch_size = batch_size
        self.seed = seed
        self.num_batches = num_batches or math.ceil(len(source_index) / batch_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def _counts(self, batch: int) -> list[int]:
        k = len(self.groups)
        base, extra = divmod(self.batch_size, k)
        counts = [base] * k
        for i in range(extra):
            counts[(batch + i) % k] += 1
        return counts

    def __iter__(self):
        k = len(self.groups)
        first = self.epoch * self.num_batches
        # rows drawn from each source before this epoch: over any k consecutive batches each source gets batch_size
        full_cycles, rest = divmod(first, k)
        drawn = [full_cycles * self.batch_size + sum(self._counts(b)[group] for b in range(rest)) for group in range(k)]
        permutations: dict[tuple[int, int], torch.Tensor] = {}
        for batch in range(first, first + self.num_batches):
            rows = []
            for group, count in enumerate(self._counts(batch)):
                rows.extend(self._stream(group, drawn[group], count, permutations))
                drawn[group] += count
            yield rows

    def _stream(self, group: int, start: int, count: int, cache: dict) -> list[int]:
        rows = self.groups[group]
        out = []
        for position in range(start, start + count):
            cycle, offset = divmod(position, len(rows))
            key = (group, cycle)
            if key not in cache:
                generator = torch.Generator().manual_seed((self.seed * 7919 + group) * 104_729 + cycle)
                cache[key] = torch.randperm(len(rows), generator=generator)
            out.append(rows[int(cache[key][offset])])
        return out


# ---------------------------------------------------------------------------------------------------------------
# trainers (rm_train.py --objective multitask|more)
# ---------------------------------------------------------------------------------------------------------------
MORE_STATE_FILE = "more_state.pt"


def _momentum_callback(weighting):
    """A Trainer callback writing MORE's per-source gradient momentum into each checkpoint as it is saved
    (public `on_save`, so no Trainer internals are overridden)."""
    from transformers import TrainerCallback

    class MomentumCallback(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            import os

            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            directory = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if args.should_save and os.path.isdir(directory):
                torch.save(weighting.state_dict(), os.path.join(directory, MORE_STATE_FILE))
            return control

    return MomentumCallback()


class _SourceWeightedTrainer(RewardModelTrainer):
    """`RewardModelTrainer` whose training loss is Σ_k w_k·L_k over sources, on batches holding every source.

    Evaluation keeps the parent's pooled BT loss and exact accuracy, and adds the exact accuracy of each source and
    the worst of them (`eval_accuracy/<source>`, `eval_worst_source_accuracy`). Training logs `loss/<source>`,
    `accuracy/<source>`, `weight/<source>` (averaged over the logging interval).
    """

    objective = ""

    def __init__(self, *args, source_names: Sequence[str], alpha: float = 0.99, normalize: str = "l2",
                 more_weighting: str = "reference", **kwargs):
        super().__init__(*args, **kwargs)
        if not source_names:
            raise UserError(f"--objective {self.objective} needs a 'source' on every training row")
        self.source_names = list(source_names)
        if not isinstance(self.data_collator, PairCollator) and hasattr(self.data_collator, "pad_token_id"):
            # TRL's default preference collator drops `source_index`; ours passes it through
            self.data_collator = PairCollator(pad_token_id=self.data_collator.pad_token_id,
                                              pad_to_multiple_of=self.data_collator.pad_to_multiple_of)
        reduce_fn = None
        if self.accelerator.num_processes > 1:
            def reduce_fn(tensor):
                return self.accelerator.reduce(tensor.to(self.accelerator.device), "sum").cpu()
        self.source_loss = SourceWeightedLoss(self.objective, self.source_names, alpha, normalize,
                                              self.center_coefficient, reduce_fn, weighting=more_weighting)
        self._source_logs: dict[str, list[float]] = {}
        if self.source_loss.weighting is not None:  # before the fault callback's seal: the file is in checksums.json
            self.add_callback(_momentum_callback(self.source_loss.weighting))
        self._eval_source_counts: dict[int, list[int]] = {}
        if len(self.source_names) == 1:
            logger.warning("--objective %s with a single source is plain Bradley-Terry training", self.objective)

    # -- data: every batch holds every source ----------------------------------------------------------------------
    def get_train_dataloader(self):
        import datasets

        dataset = self.train_dataset  # all columns kept: the collators read only theirs
        if isinstance(dataset, datasets.Dataset):
            columns = dataset.column_names
        else:
            columns = list(dataset[0].keys()) if len(dataset) else []
        if "source_index" not in columns:
            raise UserError(f"--objective {self.objective} needs a 'source_index' per training record")
        source_index = dataset["source_index"] if isinstance(dataset, datasets.Dataset) else [
            row["source_index"] for row in dataset]
        sampler = SourceBalancedBatchSampler(source_index, self.args.train_batch_size, seed=self.args.seed)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    # -- loss -------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.model.training or "source_index" not in inputs:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            if "source_index" in inputs:
                self._count_eval_sources(outputs["chosen_rewards"], outputs["rejected_rewards"], inputs["source_index"])
            return (loss, outputs) if return_outputs else loss
        capture_context = capture_reward_head(model) if self.objective == "more" else contextlib.nullcontext()
        with capture_context as capture:
            chosen, rejected = self.pairwise_rewards(model, inputs)
        features = None
        if capture is not None:
            pad_token_id = getattr(base_model(model).config, "pad_token_id", None)
            features = capture.pooled_features(torch.cat([chosen, rejected]), inputs.get("input_ids"), pad_token_id)
        loss, source_metrics = self.source_loss(chosen, rejected, inputs["source_index"], inputs.get("margin"),
                                                features)
        self._record("train", chosen, rejected, source_metrics, inputs)
        for key, value in source_metrics.items():
            self._source_logs.setdefault(key, []).append(value)
        if return_outputs:
            return loss, {"chosen_rewards": chosen, "rejected_rewards": rejected}
        return loss

    def _count_eval_sources(self, chosen, rejected, source_index) -> None:
        """Exact per-source accuracy over the whole eval set (gathered across processes), like the parent's."""
        with torch.no_grad():
            stacked = torch.stack([chosen.detach().float(), rejected.detach().float(), source_index.float()], dim=1)
            gathered = self.accelerator.gather_for_metrics(stacked).cpu()
        for chosen_k, rejected_k, index in gathered.tolist():
            counts = self._eval_source_counts.setdefault(int(index), [0, 0])
            counts[0] += int(chosen_k > rejected_k)
            counts[1] += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and self._source_logs:
            logs.update({key: sum(values) / len(values) for key, values in self._source_logs.items()})
            self._source_logs = {}
        if not self.model.training and self._eval_source_counts:
            accuracies = {}
            for index, (correct, pairs) in sorted(self._eval_source_counts.items()):
                name = self.source_names[index] if index < len(self.source_names) else str(index)
                accuracies[name] = correct / pairs
                logs[f"{self.eval_prefix}accuracy/{name}"] = correct / pairs
            logs[f"{self.eval_prefix}worst_source_accuracy"] = min(accuracies.values())
            self._eval_source_counts = {}
        super().log(logs, start_time)

    # -- MORE's momentum survives a resume (saved by `_MomentumCallback`, added in __init__) -----------------------
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        import os

        weighting = self.source_loss.weighting
        if weighting is not None and isinstance(resume_from_checkpoint, str):
            path = os.path.join(resume_from_checkpoint, MORE_STATE_FILE)
            if os.path.isfile(path):
                weighting.load_state_dict(torch.load(path, weights_only=True))
                logger.info("MORE: restored the per-source gradient momentum from %s", path)
        return super().train(resume_from_checkpoint, *args, **kwargs)


class MultitaskRewardTrainer(_SourceWeightedTrainer):
    """`--objective multitask`: every batch holds every source in equal numbers; loss = mean over sources of the
    per-source BT loss (the reference's MultiTask baseline: `--more False`, one row per source per group)."""

    objective = "multitask"


class MoreRewardTrainer(_SourceWeightedTrainer):
    """`--objective more`: per-source BT losses weighted by MORE's min-norm solution (see the module docstring)."""

    objective = "more"


def trainer_class(objective: str):
    """The trainer class for `rm_train.py --objective`: None for "bt" (rm_train uses `RewardModelTrainer`)."""
    if objective == "bt":
        return None
    if objective == "multitask":
        return MultitaskRewardTrainer
    if objective == "more":
        return MoreRewardTrainer
    raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)}, not '{objective}'")
