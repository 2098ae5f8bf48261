"""PPO stage: optimise a chat policy (an SFT checkpoint) against a reward model or a reward function.

    accelerate launch --config_file configs/accelerate/single.yaml ppo_train.py \
        --config configs/recipes/ppo/ppo_smollm2_lora.yaml --model_name_or_path runs/sft \
        --reward_model_path runs/rm --dataset_path data/prompts.jsonl --output_dir runs/ppo

Why our own loop: no maintained library provides PPO with a critic any more. TRL removed `PPOTrainer` and
`AutoModelForCausalLMWithValueHead` (2026); its GRPO/RLOO trainers have no value model, no GAE and no per-token KL
reward; OpenRLHF needs Ray and its own launcher. So the loop is written here on `accelerate`, with the math as pure
functions in `rlhfkit/rl/estimators.py` and `objectives.py` (tested against hand-computed values), and reuses TRL only for gathering ZeRO-3
weights once per rollout (`unwrap_model_for_generation`) and for preparing frozen models under DeepSpeed.

One PPO step (`rlhfkit.rl.rollout`, `.scoring`, `.ppo`; flags in `rlhfkit.rl.config.PPOConfig`):
    rollout() → score() → forward_rollout() / reference_logprobs() → step_advantages() → ppo_update()
- rollout: batched HF `generate` with the stop rules of `generation/` (`rlhfkit.sampling`: EOS plus the chat
  template's end-of-turn token), per-sample seeds derived from (seed, step, prompt position), so a resumed run draws
  the same samples; then one no-grad forward each for the policy's log-probs, the values and the reference log-probs.
- score: every reward source behind one interface (`rlhfkit/rl/rewards.py`), repeatable and weighted
  (`--reward_weights`), each logged as reward/<name>: reward-model dirs (`--reward_model_path`; the conversation
  re-rendered with the RM's own tokenizer and template; pairwise preference and process reward models too),
  verifiable rewards (`--reward_fn exact_answer` against the row's answer column, `--reward_fn format`), labelers
  (`vader`, `module:function(prompts, responses) -> list[float]`, `path/to/file.py:function`). The weighted sum is
  normalised (each RM by its `reward_stats`, or running moments), shaped (DAPO's `--overlong_penalty`),
  penalised when the response has no stop token (`--missing_eos_penalty`), optionally clipped. With
  `--dynamic_sampling`, prompts whose K samples all score the same are dropped and more are sampled (DAPO).
- advantages (`--advantage_estimator`): `gae` (critic; per-token rewards = −β·KL on every token + score on the last
  response token, i.e. the EOS when generated), or the critic-free `rloo`, `grpo`, `reinforce_pp` (K samples per
  prompt via `--num_samples_per_prompt` for the group-based ones). KL to the frozen reference: `--kl_estimator
  k1|k3` in the reward with a fixed or adaptive coefficient (`--kl_target`), and/or as a loss term
  (`--kl_loss_coef`, GRPO style).
- update: `--ppo_epochs` passes over the rollout in minibatches of per_device_train_batch_size ×
  gradient_accumulation_steps sequences; the policy objective of `rlhfkit/rl/objectives.py` (PPO-clip with
  `--cliprange_low/--cliprange_high`, or CISPO; token or sequence ratios (GSPO); `--loss_aggregation` token (DAPO)
  | sequence (GRPO) | dr_grpo | bnpo; `--mask_truncated_completions`) + `--vf_coef` × clipped value loss −
  entropy bonus.
- held-out evaluation (`--eval_dataset_path`): greedy answers before and after training, every reward source's
  mean with a bootstrap interval and the paired difference in metrics.json.

Models: the policy (LoRA with --use_peft; gradient checkpointing), a frozen reference (the policy's own checkpoint
by default; with LoRA the adapter is switched off instead of loading a copy), the reward model (frozen), the value
model (initialised from the RM as in InstructGPT, or from the policy with a zero-initialised head; LoRA too with
--use_peft).
Policy and value model are wrapped into one module so one optimizer/DeepSpeed engine trains both (ZeRO-2/3 work
with a single engine per accelerator).

Outputs (stage contract): OUT/ holds the policy (LoRA merged unless --save_adapter_only), its tokenizer,
metrics.json, log_history.jsonl (every step's metrics), args.yaml, run_info.json; OUT/value_model/ the value model
as a sequence-classification checkpoint (usable as a reward-model-shaped model). Checkpoints every --save_steps
in OUT.partial/checkpoints/ hold model, optimizer, scheduler, RNG, KL-controller and reward-normaliser state;
`--resume_from_checkpoint true` continues from the last one.

Assumptions: value model initialised from the RM needs the RM to share the policy's tokenizer (checked). Advantage
whitening and group statistics are per process (each process holds whole prompt groups). Generation is HF
`generate`; under ZeRO-3 the policy's weights are gathered once per rollout instead of at every token (~10× faster
on 2 processes, benchmarks/bench_ppo.py). `--use_vllm true` samples on a colocated vLLM engine instead
(`rlhfkit/rl/vllm_rollout.py`): the policy (LoRA merged) is pushed into it after every step and the push checked on
a probe sequence (the run stops with one line if the engine's log-probs are not the policy's); not under ZeRO-3.
Frozen models are replicated per process unless ZeRO-3 is on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhfkit.rl import estimators, networks, ppo, rewards, rollout, scoring
from rlhfkit.args import ModelArguments
from rlhfkit.checkpoints import LOG_HISTORY, StageOutput, parent_record
from rlhfkit.checkpoints import resume_requested as checkpoint_resume_requested
from rlhfkit.cli import run_stage, setup_logging, to_dict
from rlhfkit.errors import UserError
from rlhfkit.faults import PreemptionGuard, check_finite
from rlhfkit.rl.config import PPOConfig
from rlhfkit.rl.rewards import DEFAULT_FORMAT_REGEX

logger = logging.getLogger("ppo_train")


# ---------------------------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ScriptArguments:
    """Data and the models around the policy (the policy itself is --model_name_or_path, see ModelArguments)."""

    dataset_path: list[str] = field(
        default=None,
        metadata={"help": "Prompt sets in any format generation/ reads (rlhfkit.prompts.load_prompts); "
                  "'file:N' keeps the first N rows."},
    )
    reward_model_path: list[str] | None = field(
        default=None,
        metadata={"help": "A reward model dir (rm_train.py output or any 1-label *ForSequenceClassification; a "
                  "pm_train.py / prm_train.py model too, see --reward_model_type). Repeatable; with --reward_fn the "
                  "scores add up, weighted by --reward_weights (rlhfkit/rl/rewards.py).", "action": "extend"},
    )
    reward_fn: list[str] | None = field(
        default=None,
        metadata={"help": "A reward function, repeatable: exact_answer (the response's final answer vs the row's "
                  "--answer_field, numbers compared as numbers; rule in rlhfkit/rl/rewards.py), format (matches "
                  "--format_regex), a labeler of rlhfkit.labelers (vader), or 'module:function' / "
                  "'file.py:function' taking (prompts: list[list[dict]], responses: list[str]) and returning "
                  "list[float]. Each source is logged per step as reward/<name>.", "action": "extend"},
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "One weight per reward source, in the order: every --reward_model_path, then every "
                  "--reward_fn (default 1 each). reward/raw is the weighted sum.", "action": "extend"},
    )
    answer_field: str = field(
        default="answer", metadata={"help": "The prompt rows' column --reward_fn exact_answer compares with."}
    )
    format_regex: str = field(
        default=DEFAULT_FORMAT_REGEX,
        metadata={"help": "--reward_fn format: 1 when re.search(this, response) matches, else 0 (default: the last "
                  "line is 'Answer: …')."},
    )
    ref_model_path: str | None = field(
        default=None, metadata={"help": "Frozen reference for the KL penalty (default: the policy's checkpoint)."}
    )
    value_model_init: str = field(
        default="auto",
        metadata={"help": "reward_model | policy | auto (the RM when there is one sharing the policy's tokenizer, "
                  "else the policy with a new head)."},
    )
    max_prompt_length: int = field(default=512, metadata={"help": "Prompts longer than this (tokens) are dropped."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    rm_batch_size: int = field(default=16, metadata={"help": "Batch size of reward-model scoring."})
    reward_model_type: str = field(default="auto", metadata={"help": "What --reward_model_path is: auto (from its "
                                   "run_info.json) | rm (one score per response) | pm (pairwise preference model: "
                                   "each sample against the group's others, or the reference's greedy response) | "
                                   "prm (process reward model: per-step rewards). See rlhfkit/rl/model_rewards.py."})
    pm_reward: str = field(default="log_odds", metadata={"help": "A preference model's reward: log_odds (mean "
                           "log P/(1−P) against the baselines; Bradley-Terry-consistent) | win_rate (mean P)."})
    aggregate: str = field(default="min", metadata={"help": "A process reward model's score of a response for RLOO "
                           "/ GRPO: min | last | prod | mean of its step scores (GAE and REINFORCE++ get per-step "
                           "rewards)."})
    eval_dataset_path: list[str] | None = field(
        default=None,
        metadata={"help": "Held-out prompt rows (with their answer column for exact_answer): before and after training "
                  "the policy answers each once (--eval_temperature, 0 = greedy) and every reward source scores it; "
                  "metrics.json gets each mean with a 95%% bootstrap interval over prompts and the paired difference "
                  "after − before; OUT/eval_before.jsonl and OUT/eval_after.jsonl hold the responses."},
    )
    eval_temperature: float = field(default=0.0, metadata={"help": "Sampling temperature of the held-out answers."})
    rm_max_length: int | None = field(
        default=None,
        metadata={"help": "Truncate re-rendered conversations for the RM to this many tokens (from the left)."},
    )

    def __post_init__(self):
        if isinstance(self.dataset_path, str):
            self.dataset_path = [self.dataset_path]
        if isinstance(self.eval_dataset_path, str):
            self.eval_dataset_path = [self.eval_dataset_path]
        for name in ("reward_model_path", "reward_fn"):  # a YAML string or a single value is a list of one
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        if not self.reward_model_path and not self.reward_fn:
            raise ValueError("give at least one reward source: --reward_model_path DIR and/or --reward_fn NAME")
        sources = len(self.reward_model_path or []) + len(self.reward_fn or [])
        if self.reward_weights is not None and len(self.reward_weights) != sources:
            raise ValueError(f"--reward_weights: {len(self.reward_weights)} weights for {sources} reward sources "
                             f"(order: every --reward_model_path, then every --reward_fn)")
        if self.value_model_init not in ("auto", "reward_model", "policy"):
            raise ValueError(f"--value_model_init must be auto, reward_model or policy, not '{self.value_model_init}'")
        if self.value_model_init == "reward_model" and not self.reward_model_path:
            raise ValueError("--value_model_init reward_model needs --reward_model_path")


# ---------------------------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------------------------
ARGUMENTS = (ScriptArguments, ModelArguments, PPOConfig)  # what main takes, in order (CLI, YAML, tests)


def main(script_args: ScriptArguments, model_args: ModelArguments, training_args: PPOConfig) -> dict:
    from rlhfkit.distributed import new_accelerator, partial_state
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler
    from trl.models.utils import unwrap_model_for_generation

    from rlhfkit.models import ensure_pad_token, load_causal_lm, load_tokenizer, resolve_model
    from rlhfkit.prompts import load_prompts
    from rlhfkit.sampling import pad_token_id, render_generation_prompt, stop_token_ids
    from rlhfkit.threads import follow as follow_thread_hint

    # ---------------------------------------------------------------- setup
    args = training_args
    if not script_args.dataset_path:
        raise UserError("--dataset_path is required (a prompt set)")
    mixed = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
    setup_logging(partial_state().is_main_process)
    resume_requested = checkpoint_resume_requested(args.resume_from_checkpoint)
    out = StageOutput(args.output_dir, "ppo", overwrite=model_args.overwrite_output_dir, resume=resume_requested)
    resume_dir = out.resolve_resume(args.resume_from_checkpoint)
    accelerator = new_accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed,
        log_with=ppo.trackers_from_report_to(args.report_to),
        # trackers write beside the outputs, so the logs move with OUT.partial → OUT
        project_config=ProjectConfiguration(project_dir=str(out.staging), logging_dir=str(out.staging / "runs")),
        step_scheduler_with_optimizer=False,  # we step it per optimizer step of this process ourselves
    )
    set_seed(args.seed, device_specific=True)

    # ---------------------------------------------------------------- model & tokenizer
    policy_path, policy_record = resolve_model(model_args.model_name_or_path, role="policy")
    tokenizer = load_tokenizer(policy_path, model_args.chat_template, padding_side="left")
    policy = load_causal_lm(policy_path, model_args)
    vocab_before_pad = policy.get_input_embeddings().num_embeddings  # the reference and value model follow a resize
    ensure_pad_token(tokenizer, policy)
    stop_ids = stop_token_ids(tokenizer, policy)
    suppressed = networks.suppressed_token_ids(tokenizer, args.suppress_tokens)
    ignored_generation_config = networks.log_ignored_generation_config(policy)

    from rlhfkit.rl.model_rewards import ProcessReward, PreferenceReward

    # every --reward_model_path (rm | pm | prm), then every --reward_fn, weighted (rlhfkit/rl/rewards.py)
    sources = scoring.build_reward_sources(script_args, model_args)
    reward = sources[0].source if len(sources) == 1 else None  # what the single-source features below look at
    norm_mode = scoring.normalization_mode(args.reward_normalization, sources)

    ref_path = script_args.ref_model_path or policy_path
    ref_model = None
    if not (model_args.use_peft and ref_path == policy_path):  # with LoRA the base policy is the reference
        ref_resolved, _ = resolve_model(ref_path, role="reference model")
        ref_model = networks.load_reference(ref_resolved, model_args, policy, vocab_before_pad, tokenizer, ref_path)

    value_model, value_tokenizer, value_source = None, None, None
    if args.estimator.needs_critic:
        value_model, value_tokenizer, value_source = networks.build_value_model(
            script_args, model_args, policy_path, tokenizer,
            next((item.source for item in sources if isinstance(item.source, rewards.ModelReward)), None),
            policy, vocab_before_pad
        )
    if args.gradient_checkpointing:
        kwargs = args.gradient_checkpointing_kwargs or {"use_reentrant": False}
        for model in (policy, value_model):
            if model is not None:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
                model.config.use_cache = False
    policy = networks.apply_lora(policy, model_args, "CAUSAL_LM")
    if value_model is not None:
        value_model = networks.apply_lora(value_model, model_args, "SEQ_CLS", modules_to_save=["score"])
    model = networks.PolicyAndValue(policy, value_model, suppressed)
    # the log-prob forwards: K samples of a prompt share its computation when that is exact on this policy
    if value_model is not None:
        if args.pairwise_forward not in ("auto", "padded"):
            raise UserError(f"--pairwise_forward {args.pairwise_forward}: a run with a value model "
                            f"(--advantage_estimator {args.advantage_estimator}) uses the padded forward")
        layout = ref_layout = "padded"
    else:
        from rlhfkit.layout_check import choose_layout

        layout = choose_layout(policy, args.pairwise_forward)
        ref_layout = layout if ref_model is None else choose_layout(ref_model, args.pairwise_forward)

    groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": args.learning_rate}]
    if value_model is not None:
        groups.append({"params": [p for p in value_model.parameters() if p.requires_grad],
                       "lr": args.learning_rate if args.value_learning_rate is None else args.value_learning_rate})
    optimizer = torch.optim.AdamW(
        groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, weight_decay=args.weight_decay
    )

    # ---------------------------------------------------------------- data
    prompt_rows = load_prompts(script_args.dataset_path, max_prompts=script_args.max_prompts,
                               keep_fields=(script_args.answer_field,))  # for verifiable rewards
    kept_rows, kept_ids, too_long = [], [], 0
    for row in prompt_rows:
        ids = render_generation_prompt(tokenizer, row["prompt"])
        if len(ids) > script_args.max_prompt_length:
            too_long += 1
            continue
        kept_rows.append(row)
        kept_ids.append(ids)
    if too_long:
        logger.warning("dropped %d of %d prompts longer than --max_prompt_length %d", too_long, len(prompt_rows),
                       script_args.max_prompt_length)
    if not kept_rows:
        raise UserError(
            f"{', '.join(script_args.dataset_path)}: no prompt fits --max_prompt_length {script_args.max_prompt_length}"
        )
    eval_rows = []
    if script_args.eval_dataset_path:
        eval_rows = list(load_prompts(script_args.eval_dataset_path, keep_fields=(script_args.answer_field,)))
    for item in sources:  # a verifiable reward refuses rows without what it compares with, before any training
        if hasattr(item.source, "check_rows"):
            item.source.check_rows(kept_rows, ", ".join(script_args.dataset_path))
            if eval_rows:
                item.source.check_rows(eval_rows, ", ".join(script_args.eval_dataset_path))
    out.check_identity(resume_dir, (script_args, model_args, args), kept_rows,  # a resume is this run, or refused
                       (policy_path, ref_path, *(script_args.reward_model_path or [])), tokenizer,
                       accelerator.num_processes)
    per_step = args.rollout_batch_size * accelerator.num_processes
    if args.max_steps and args.max_steps > 0:
        total_steps = args.max_steps
    else:
        total_steps = max(1, math.ceil(args.num_train_epochs * len(kept_rows) / per_step))
    sequences = args.rollout_batch_size * args.num_samples_per_prompt
    minibatch = args.per_device_train_batch_size * args.gradient_accumulation_steps
    optimizer_steps = total_steps * args.ppo_epochs * (sequences // minibatch)
    warmup = args.warmup_steps if args.warmup_steps >= 1 else math.ceil(args.warmup_steps * optimizer_steps)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=int(warmup),
                              num_training_steps=optimizer_steps)

    if networks.is_deepspeed(accelerator):  # a custom loop passes no dataloader, so DeepSpeed's "auto" batch sizes are ours
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
        ds_config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
        ds_config["train_batch_size"] = minibatch * accelerator.num_processes
        ds_config["gradient_clipping"] = args.max_grad_norm
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # after the trained model: accelerate has then resolved the DeepSpeed config's "auto" values they reuse
    if ref_model is not None:
        ref_model = networks.prepare_frozen(ref_model, accelerator)
    scoring.place_reward_models(sources, accelerator)
    for item in sources:  # a PM's baseline with K = 1 (and in the held-out evaluation): the reference's greedy answer
        if isinstance(item.source, PreferenceReward):
            from rlhfkit.rl.model_rewards import greedy_generator

            reference_for_baseline = ref_model if ref_model is not None else accelerator.unwrap_model(model).policy
            item.source.group_size = args.num_samples_per_prompt
            item.source.attach_reference(greedy_generator(reference_for_baseline, tokenizer, args.max_new_tokens,
                                                          stop_ids, suppressed, adapter_off=ref_model is None))

    kl_controller = ppo.kl_controller(args)
    moments = estimators.RunningMoments()
    accelerator.register_for_checkpointing(kl_controller, moments)

    # ---------------------------------------------------------------- train
    start_step, history = 0, []
    if resume_dir is not None:
        accelerator.load_state(resume_dir)
        state = json.loads((Path(resume_dir) / ppo.TRAINER_STATE).read_text(encoding="utf-8"))
        start_step, history = int(state["step"]), list(state["log_history"])
        logger.info("resumed from %s at step %d (kl_coef %.4g)", resume_dir, start_step, kl_controller.value)
    if accelerator.is_main_process:
        accelerator.init_trackers("ppo", config={k: v for k, v in to_dict(script_args, model_args, args).items()
                                                 if isinstance(v, (int, float, str, bool))})
    log_file = out.staging / LOG_HISTORY
    if accelerator.is_main_process:  # rewritten from the checkpoint's history so a resumed log has no duplicates
        log_file.write_text("".join(json.dumps(row) + "\n" for row in history), encoding="utf-8")
    unwrapped = accelerator.unwrap_model(model)
    rollout_engine = None
    if args.use_vllm:  # colocated vLLM: gets the policy's weights now (the resumed ones on resume), checked
        from rlhfkit.rl.vllm_rollout import VLLMRollout

        rollout_engine = VLLMRollout(unwrapped.policy, tokenizer, args, stop_ids, suppressed, accelerator,
                                     max_model_len=script_args.max_prompt_length + args.max_new_tokens)
        rollout_engine.sync(unwrapped.policy, start_step)
    micro = args.per_device_train_batch_size
    save_every = int(args.save_steps) if str(args.save_strategy).lower().endswith("steps") and args.save_steps else 0
    progress = tqdm(total=total_steps, initial=start_step, desc="ppo",
                    disable=args.disable_tqdm or not accelerator.is_local_main_process)
    logger.info("PPO: %d steps × %d prompts × %d samples, estimator %s, value model %s, reward %s",
                total_steps, per_step, args.num_samples_per_prompt, args.advantage_estimator, value_source,
                [item.source.describe() for item in sources])
    eval_keys = ["reward", *(item.key for item in sources)]
    eval_before = None
    eval_sampler = None  # the held-out answers on the vLLM engine too, when every held-out prompt fits it
    if rollout_engine is not None and eval_rows:
        longest = max(len(render_generation_prompt(tokenizer, row["prompt"])) for row in eval_rows)
        if longest <= script_args.max_prompt_length:
            eval_sampler = rollout_engine.generate
        else:
            logger.info("held-out evaluation with our decoding loop: a held-out prompt of %d tokens is longer than "
                        "--max_prompt_length %d, which sizes the vLLM engine", longest, script_args.max_prompt_length)

    def evaluate():
        with unwrap_model_for_generation(model, accelerator) as generator, accelerator.autocast():
            return scoring.evaluate_policy(generator.policy, tokenizer, eval_rows, sources, args, stop_ids, suppressed,
                                           accelerator, script_args.eval_temperature, args.seed, eval_sampler)

    if eval_rows and start_step == 0:  # a resumed run has no untrained policy left to evaluate
        eval_before = evaluate()
        logger.info("held-out before training: %s", {key: round(sum(r[key] for r in eval_before) / len(eval_before), 4)
                                                     for key in eval_keys})

    # preemption (SIGTERM/SIGUSR1): checkpoint at the end of the step, exit 75 (rlhfkit/faults.py)
    guard = PreemptionGuard.from_args(args)
    for step in range(start_step, total_steps):
        follow_thread_hint()  # take the cores a finished partner stage left (RLHFKIT_THREADS_FILE)
        # -- rollout and score -- (with --dynamic_sampling: generation batches until enough groups carry a signal)
        t0 = time.perf_counter()
        used_positions: set[int] = set()
        scoring_seconds = [0.0]

        def draw(index: int, step=step, used_positions=used_positions, scoring_seconds=scoring_seconds):
            positions = scoring.draw_positions(step, index, per_step, len(kept_rows), args.seed, used_positions)
            used_positions.update(positions)
            mine = positions[accelerator.process_index * args.rollout_batch_size:][: args.rollout_batch_size]
            seeds = rollout.rollout_seeds(args.seed, step if index == 0 else f"{step}.{index}", mine)
            model.eval()
            # under --bf16 the sampler runs in the same autocast as the log-prob forwards (one distribution)
            if rollout_engine is not None:
                batch = rollout.rollout(None, tokenizer, [kept_rows[i] for i in mine], [kept_ids[i] for i in mine],
                                        seeds, args, stop_ids, accelerator.device, sampler=rollout_engine.generate)
            else:
                with unwrap_model_for_generation(model, accelerator) as generator, accelerator.autocast():
                    batch = rollout.rollout(generator.policy, tokenizer, [kept_rows[i] for i in mine],
                                            [kept_ids[i] for i in mine], seeds, args, stop_ids, accelerator.device)
            rows = [kept_rows[i] for i in mine for _ in range(args.num_samples_per_prompt)]
            begin = time.perf_counter()
            scored = scoring.score(sources, batch, rows, args, norm_mode, moments, accelerator)
            scoring_seconds[0] += time.perf_counter() - begin
            return batch, rows, scored

        batch, rows, scored, sampling_metrics = scoring.collect_rollouts(draw, args, accelerator, pad_token_id(tokenizer))
        raw, scores = scored.raw, scored.scores
        step_rewards = None
        if isinstance(reward, ProcessReward) and str(args.estimator) in ("gae", "reinforce_pp"):  # at step ends
            from rlhfkit.rl.model_rewards import per_token_scores

            step_rewards = reward.token_rewards(batch.prompts, batch.texts, batch.responses, batch.mask, tokenizer)
            scores = per_token_scores(raw, batch.has_stop, args.missing_eos_penalty)
        t2 = time.perf_counter()
        t1 = t2 - scoring_seconds[0]
        # -- advantages --
        logprobs, values = rollout.forward_rollout(model, batch, micro, args.temperature, layout)
        with accelerator.autocast():  # the frozen reference is not wrapped by accelerate; same precision as the policy
            ref_logprobs = rollout.reference_logprobs(ref_model, unwrapped.policy, batch, micro, args.temperature,
                                                      suppressed, ref_layout)
        kl = ppo.token_kl(args, logprobs, ref_logprobs, batch.mask)
        kl_coef = kl_controller.value
        advantages, returns = ppo.step_advantages(args, scores, kl, batch.mask, values, kl_coef, step_rewards)
        vllm_metrics = {}
        if rollout_engine is not None and args.vllm_importance_sampling_correction:
            advantages, vllm_metrics = rollout_engine.importance_correction(advantages, logprobs, batch)
        # -- update --
        stats = ppo.ppo_update(model, optimizer, scheduler, accelerator, args, batch, logprobs, ref_logprobs,
                               advantages, values, returns, layout)
        t3 = time.perf_counter()
        if rollout_engine is not None:  # the updated policy into the engine, checked; stops here if it is not there
            vllm_metrics.update(rollout_engine.sync(unwrapped.policy, step + 1))

        local = ppo.rollout_metrics(batch, raw, scores, logprobs, ref_logprobs, kl, kl_coef, values, returns)
        local.update(scoring.reward_metrics(scored, batch.has_stop), **sampling_metrics)
        gathered = {key: accelerator.gather(value.float().reshape(1)).mean().item() for key, value in local.items()}
        stats = {key: accelerator.gather(torch.tensor([value], device=accelerator.device)).mean().item()
                 for key, value in stats.items()}
        kl_controller.update(gathered["kl/penalty"], per_step * args.num_samples_per_prompt)
        generation_s, scoring_s, training_s = t1 - t0, t2 - t1, t3 - t2
        row = {
            "step": step + 1, **gathered, **stats, "kl/coef": kl_coef, "lr": scheduler.get_last_lr()[0],
            "time/generation_s": generation_s, "time/scoring_s": scoring_s, "time/training_s": training_s,
            "time/generation_share": generation_s / max(t3 - t0, 1e-9), **vllm_metrics,
        }
        history.append(row)
        if accelerator.is_main_process:
            with log_file.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
        if args.logging_steps and (step + 1) % max(1, int(args.logging_steps)) == 0:
            accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step + 1)
            progress.set_postfix(reward=f"{row['reward/raw']:.3f}", kl=f"{row['kl/k1']:.3f}")
        progress.update(1)
        saved = save_every and (step + 1) % save_every == 0 and step + 1 < total_steps
        if saved:
            ppo.save_checkpoint(accelerator, out, step + 1, history, args.save_total_limit)
        check_finite(stats.get("policy/pg_loss", 0.0), step + 1, out.checkpoints)  # diverged: stop, keep the last
        guard.save_and_exit_if_requested(
            step + 1, (lambda: None) if saved else
            (lambda done=step + 1: ppo.save_checkpoint(accelerator, out, done, history, args.save_total_limit)),
            out.checkpoints / f"checkpoint-{step + 1}", accelerator.device, accelerator.is_main_process)
    guard.uninstall()
    progress.close()
    evaluation = None
    if eval_rows:
        eval_after = evaluate()  # the engine was synced after the last update: it holds the trained weights
        evaluation = scoring.evaluation_summary(eval_before, eval_after, eval_keys, args.seed)
        if accelerator.is_main_process:
            for name, records in (("eval_before.jsonl", eval_before), ("eval_after.jsonl", eval_after)):
                if records is not None:
                    (out.staging / name).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        logger.info("held-out: %s", {key: {when: round(v["mean"], 4) for when, v in entry.items()}
                                     for key, entry in evaluation.items()})
    if rollout_engine is not None:
        rollout_engine.close()

    # ---------------------------------------------------------------- save
    state_dict = accelerator.get_state_dict(model)  # collective: gathers 16-bit weights under ZeRO-3
    merge = not model_args.save_adapter_only
    if accelerator.is_main_process:
        ppo.save_pretrained_from_state(unwrapped.policy, ppo.sub_state_dict(state_dict, "policy."), out.staging,
                                       merge)
        tokenizer.padding_side = "right"  # what the next stages (SFT/RM-style training) expect by default
        tokenizer.save_pretrained(out.staging)
        if value_model is not None and args.save_value_model:
            value_dir = out.staging / ppo.VALUE_MODEL_DIR
            value_state = ppo.sub_state_dict(state_dict, "value_model.")
            ppo.save_pretrained_from_state(unwrapped.value_model, value_state, value_dir, merge)
            value_tokenizer.save_pretrained(value_dir)
        shutil.rmtree(out.checkpoints, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    first, last = history[: max(1, len(history) // 5)], history[-max(1, len(history) // 5):]
    metrics = {
        "steps": total_steps,
        "reward_raw_first": sum(r["reward/raw"] for r in first) / len(first),
        "reward_raw_last": sum(r["reward/raw"] for r in last) / len(last),
        **{f"final/{k}": v for k, v in history[-1].items() if k != "step"},
        "time/generation_share_mean": sum(r["time/generation_share"] for r in history) / len(history),
        "prompts": {"kept": len(kept_rows), "dropped_too_long": too_long, "sources": prompt_rows.report},
        **({"eval": evaluation} if evaluation is not None else {}),
    }
    run_info = {
        **parent_record({"path": policy_path, "stage": policy_record.get("parent_stage")},
                        model_args.model_name_or_path, policy_record),
        "reference_model": os.path.abspath(ref_path) if ref_model is not None else "policy with LoRA disabled",
        "pairwise_forward": {"policy": layout, "reference": ref_layout},
        "rollouts": {"backend": "vllm", **rollout_engine.settings} if rollout_engine is not None else {"backend": "hf"},
        "reward": [{"key": item.key, "weight": item.weight, **item.source.describe()} for item in sources],
        "reward_normalization": norm_mode,
        "value_model": {
            "init": value_source, "dir": ppo.VALUE_MODEL_DIR if value_source and args.save_value_model else None
        },
        "dataset": {"paths": script_args.dataset_path, "fingerprint": _fingerprint(kept_rows)},
        "stop_token_ids": stop_ids,
        "suppressed_token_ids": suppressed,
        "ignored_generation_config": ignored_generation_config,
        "kl_controller": kl_controller.state_dict(),
    }
    out.finalize(run_info, metrics, to_dict(script_args, model_args, args))
    return metrics


def _fingerprint(rows: list[dict]) -> str:
    from rlhfkit.checkpoints import fingerprint

    return fingerprint([row["id"] for row in rows])


if __name__ == "__main__":
    run_stage(main, ARGUMENTS)
