"""Scoring a rollout with the run's reward sources (`rlhfkit.rl.rewards`) and shaping the result for the objective;
the held-out evaluation (`--eval_dataset_path`) with the same sources, before and after training."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from rlhfkit.errors import UserError
from rlhfkit.rl import estimators as rl
from rlhfkit.rl import objectives, rewards
from rlhfkit.rl.rewards import ModelReward
from rlhfkit.rl.config import PPOConfig
from rlhfkit.rl.networks import prepare_frozen
from rlhfkit.rl.rollout import Rollout, concat_rollouts, prompt_positions

logger = logging.getLogger(__name__)


def build_reward_sources(script_args, model_args) -> list[rewards.WeightedReward]:
    """The stage's weighted reward sources (`rlhfkit.rl.rewards.build_reward_sources`), with the prompt-set
    independent checks done; logged once."""
    sources = rewards.build_reward_sources(script_args, model_args)
    logger.info("reward = %s", " + ".join(f"{item.weight:g} × {item.key}" for item in sources))
    return sources


def normalization_mode(requested: str, sources: list[rewards.WeightedReward]) -> str:
    """--reward_normalization resolved: auto → rm_stats when a source has reward statistics (a reward model from
    rm_train.py), else none. rm_stats standardises each such source by its own statistics."""
    with_stats = [item for item in sources if item.source.stats is not None]
    if requested == "auto":
        return "rm_stats" if with_stats else "none"
    if requested == "rm_stats" and not with_stats:
        raise UserError("--reward_normalization rm_stats: no reward model's run_info.json has 'reward_stats'")
    return requested


def place_reward_models(sources: list[rewards.WeightedReward], accelerator) -> None:
    """Frozen reward models onto the device (sharded under ZeRO-3 where the class allows it)."""
    from rlhfkit.rl.model_rewards import PreferenceReward, ProcessReward

    for item in sources:
        if isinstance(item.source, ModelReward):
            item.source.model = prepare_frozen(item.source.model, accelerator)
        elif isinstance(item.source, (PreferenceReward, ProcessReward)):  # rlhfkit/rl/model_rewards.py
            item.source.scorer.model.to(accelerator.device)


@dataclass
class Scored:
    """One rollout's rewards: what was measured and what the objective uses (all [B], prompt-major)."""

    raw: torch.Tensor  # Σ_i w_i · raw score of source i (reward/raw)
    scores: torch.Tensor  # what the advantages see: sources normalised and combined, penalised, clipped
    components: dict[str, torch.Tensor]  # key → raw scores of that source (reward/<key>)
    overlong: torch.Tensor | None  # the DAPO overlong penalty added to `scores` (≤ 0), or None when off


def reward_inputs(batch: Rollout, rows: list[dict]) -> rewards.RewardInputs:
    return rewards.RewardInputs(prompts=batch.prompts, responses=batch.texts, rows=rows,
                                lengths=batch.mask.sum(dim=1).long().tolist(), truncated=(~batch.has_stop).tolist())


def score(sources: list[rewards.WeightedReward], batch: Rollout, rows: list[dict], args: PPOConfig, norm_mode: str,
          moments: rl.RunningMoments, accelerator) -> Scored:
    """Score a rollout with every reward source and shape the result for the objective.

    Order: each source's raw scores (checked) → a reward model with `reward_stats` standardised by them
    (norm_mode rm_stats) → Σ w_i · s_i → running standardisation (norm_mode running) → + the overlong penalty →
    − the missing-EOS penalty → clip. The penalties and the clip are in normalised units.
    rows: [B] the prompt row of each sample (its `answer` and other columns, for verifiable rewards).
    """
    inputs = reward_inputs(batch, rows)
    components = {key: value.to(accelerator.device) for key, value in rewards.score_components(sources, inputs).items()}
    raw = rewards.combine(sources, components, normalize_by_stats=False)
    total = rewards.combine(sources, components, normalize_by_stats=norm_mode == "rm_stats")
    mean = std = None
    if norm_mode == "running":
        moments.update(accelerator.gather(total))  # the same statistics on every process
        mean, std = moments.mean, moments.std
    total = rl.shape_scores(total, batch.has_stop, mean, std)  # standardise only; penalties below
    overlong = None
    if args.overlong_penalty:
        overlong = rewards.overlong_penalty(batch.mask.sum(dim=1), args.max_new_tokens, args.overlong_buffer_length,
                                            args.overlong_penalty_factor)
        total = total + overlong
    scores = rl.shape_scores(total, batch.has_stop, None, None, args.missing_eos_penalty, args.reward_clip)
    return Scored(raw=raw, scores=scores, components=components, overlong=overlong)


@torch.no_grad()
def evaluate_policy(policy, tokenizer, rows: list[dict], sources: list[rewards.WeightedReward], args: PPOConfig,
                    stop_ids: list[int], suppressed: list[int], accelerator, temperature: float = 0.0,
                    seed: int = 0, sampler=None) -> list[dict]:
    """One response per held-out prompt row (greedy at temperature 0), scored by every reward source.

    Returns one record per row, in row order: {"id", "response", "truncated", "reward" (Σ w·raw), <key>: raw score
    of each source}. Each process answers rows[rank::P]; the records are gathered on every process.
    sampler: the rollouts' vLLM engine holding the policy's current weights (`VLLMRollout.generate`, called with
    `temperature`), else our decoding loop on `policy`.
    """
    from accelerate.utils import gather_object

    from rlhfkit.sampling import derive_seed, generate_batch, render_generation_prompt

    mine = rows[accelerator.process_index::accelerator.num_processes]
    chunk = args.generation_batch_size or max(1, args.rollout_batch_size * args.num_samples_per_prompt)
    records = []
    for start in range(0, len(mine), chunk):
        part = mine[start : start + chunk]
        if sampler is not None:
            samples = sampler([render_generation_prompt(tokenizer, row["prompt"]) for row in part],
                              [derive_seed(seed, "eval", row["id"]) for row in part], 1, temperature=temperature)
        else:
            generated = generate_batch(policy, tokenizer, [row["prompt"] for row in part], n=1,
                                       max_new_tokens=args.max_new_tokens, temperature=temperature, top_p=1.0,
                                       seed=seed, stop_ids=stop_ids, suppressed_tokens=suppressed)
            samples = [per_prompt[0] for per_prompt in generated]
        inputs = rewards.RewardInputs(
            prompts=[row["prompt"] for row in part], responses=[sample["text"] for sample in samples], rows=part,
            lengths=[len(sample["token_ids"]) for sample in samples],
            truncated=[not sample["finished"] for sample in samples])
        components = rewards.score_components(sources, inputs)
        total = rewards.combine(sources, components, normalize_by_stats=False)
        for index, (row, sample) in enumerate(zip(part, samples)):
            records.append({"id": row["id"], "response": sample["text"], "truncated": not sample["finished"],
                            "reward": float(total[index]),
                            **{key: float(values[index]) for key, values in components.items()}})
    if accelerator.num_processes > 1:
        records = gather_object(records)
    order = {row["id"]: index for index, row in enumerate(rows)}
    return sorted(records, key=lambda record: order[record["id"]])


def evaluation_summary(before: list[dict] | None, after: list[dict], keys: list[str], seed: int = 0) -> dict:
    """Mean of each key with a 95% percentile-bootstrap interval over prompts (10,000 resamples), before and after
    training, and the paired difference after − before (`rlhfkit.bootstrap`)."""
    from rlhfkit.bootstrap import bootstrap_mean_ci, paired_differences

    summary: dict[str, dict] = {}
    for key in keys:
        entry = {"after": bootstrap_mean_ci([r[key] for r in after], seed=seed).to_dict()}
        if before is not None:
            entry["before"] = bootstrap_mean_ci([r[key] for r in before], seed=seed).to_dict()
            delta = paired_differences({r["id"]: r[key] for r in after}, {r["id"]: r[key] for r in before})
            entry["delta"] = bootstrap_mean_ci(delta, seed=seed).to_dict()
        summary[key] = entry
    return summary


@torch.no_grad()
def reward_metrics(scored: Scored, has_stop: torch.Tensor) -> dict:
    """Per-process means of each reward source's raw scores (reward/<key>) and of the overlong penalty."""
    metrics = {f"reward/{key}": values.float().mean() for key, values in scored.components.items()}
    if scored.overlong is not None:
        metrics["reward/overlong"] = scored.overlong.mean()
        metrics["reward/overlong_fraction"] = (scored.overlong < 0).float().mean()
    metrics["response/truncated_fraction"] = (~has_stop).float().mean()
    return metrics


# dynamic sampling: more generation batches until enough prompt groups carry a signal
def draw_positions(step: int, draw: int, per_step: int, n_prompts: int, seed: int, used: set[int]) -> list[int]:
    """Prompt positions of generation batch `draw` of PPO step `step` (all processes).

    Draw 0 is the step's usual batch (`prompt_positions`). Further draws (dynamic sampling) take prompts not yet
    used in this step from a permutation seeded by (seed, step, draw), so a resumed run draws the same; a prompt
    set smaller than a few batches repeats prompts after exhausting the fresh ones.
    """
    if draw == 0:
        return prompt_positions(step, per_step, n_prompts, seed)
    from rlhfkit.sampling import derive_seed

    generator = torch.Generator().manual_seed(derive_seed(seed, "dynamic_sampling", step, draw))
    order = torch.randperm(n_prompts, generator=generator).tolist()
    fresh = [i for i in order if i not in used]
    while len(fresh) < per_step:
        fresh += order
    return fresh[:per_step]



def collect_rollouts(draw, args: PPOConfig, accelerator, pad_id: int):
    """This step's rollout: one generation batch, or with --dynamic_sampling as many as it takes (up to the cap)
    to gather --rollout_batch_size prompt groups whose K scores differ (`objectives.informative_groups`).

    draw(d) → (batch, rows, scored): generation batch d of this process, sampled and scored. Every process draws
    the same number of batches (the decision uses the gathered minimum), so collective calls stay in step.
    Returns (batch, rows, scored, metrics); with too few informative groups after the cap, the batch is filled
    with uninformative ones (zero advantage), as many as needed, and `sampling/filled_groups` says how many.
    """
    batch, rows, scored = draw(0)
    k = args.num_samples_per_prompt
    metrics: dict[str, torch.Tensor] = {}
    if args.estimator.min_samples_per_prompt >= 2:  # TRL's frac_reward_zero_std
        informative = objectives.informative_groups(scored.scores, k)
        metrics["sampling/zero_std_fraction"] = 1.0 - informative.float().mean()
    if not args.dynamic_sampling:
        return batch, rows, scored, metrics
    wanted = args.rollout_batch_size
    parts = [(batch, rows, scored, informative)]
    kept = int(informative.sum())
    draws = 1
    while draws < args.dynamic_sampling_max_batches:
        fewest = accelerator.gather(torch.tensor([kept], device=accelerator.device)).min().item()
        if fewest >= wanted:
            break
        batch, rows, scored = draw(draws)
        informative = objectives.informative_groups(scored.scores, k)
        parts.append((batch, rows, scored, informative))
        kept += int(informative.sum())
        draws += 1
    chosen = []  # (part, group): informative groups in draw order, then uninformative ones to fill
    for fill in (False, True):
        for index, (_, _, _, groups) in enumerate(parts):
            chosen += [(index, group) for group in range(groups.numel()) if bool(groups[group]) != fill]
    filled = max(0, wanted - kept)
    chosen = chosen[:wanted]
    row_index = [(part, group * k + j) for part, group in chosen for j in range(k)]
    batch = concat_rollouts([parts[part][0] for part in range(len(parts))], row_index, pad_id)
    rows = [parts[part][1][row] for part, row in row_index]
    scored = Scored(
        raw=torch.stack([parts[part][2].raw[row] for part, row in row_index]),
        scores=torch.stack([parts[part][2].scores[row] for part, row in row_index]),
        components={key: torch.stack([parts[part][2].components[key][row] for part, row in row_index])
                    for key in parts[0][2].components},
        overlong=None if parts[0][2].overlong is None else
        torch.stack([parts[part][2].overlong[row] for part, row in row_index]),
    )
    device = batch.responses.device
    metrics.update({
        "sampling/generation_batches": torch.tensor(float(draws), device=device),
        "sampling/prompts_sampled": torch.tensor(float(draws * args.rollout_batch_size), device=device),
        "sampling/informative_groups": torch.tensor(float(kept), device=device),
        "sampling/filled_groups": torch.tensor(float(filled), device=device),
    })
    return batch, rows, scored, metrics

