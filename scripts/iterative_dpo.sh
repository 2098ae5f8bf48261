#!/usr/bin/env bash
# Iterative (online) DPO: N iterations of generate K → score → pairs → DPO, each starting from the last policy.
#
#   scripts/iterative_dpo.sh --model runs/sft --prompts data/prompts.jsonl --reward_model runs/rm \
#       --work_dir runs/idpo --iterations 3 --num_samples 4 --train_config configs/recipes/x/dpo.yaml
#
# Iteration i (1..N) in WORK_DIR/iter<i>/: gen/ (generation/generate.py), annotated/ (annotate/get_rewards.py:
# rewards.jsonl, pairs.jsonl, sft.jsonl, reward_hist.png), policy/ (dpo_train.py). Iteration i starts from
# iteration i−1's policy (iteration 1 from --model). The DPO reference is the iteration's starting policy
# (--reference iteration, as in Online-RLHF) or a fixed model (--reference fixed: --ref_model, default --model).
#
# Flags: --model --prompts (may contain {i}, replaced by the iteration number, for a fresh prompt set per iteration)
#   --reward_model DIR | --labeler SPEC   --work_dir   --iterations (2)   --num_samples (4)   --max_new_tokens (256)
#   --temperature (1.0)   --top_p (1.0)   --seed (42; iteration i samples with seed+i)   --pair_strategy (max_min)
#   --min_margin (0)   --reference iteration|fixed   --ref_model   --num_processes (1)   --accelerate_config
#   --gen_world_size (1: one process; N: N generation shards, one per GPU, then merge_data.py)
#   --gen_args "..."   --annotate_args "..."   --train_args "..." (extra flags per stage, space-separated)
#   --train_config FILE (YAML for dpo_train.py)
# Environment: PYTHON (default: python).
#
# Failure and resume: set -euo pipefail stops the chain at the first failing stage; every stage writes OUT.partial
# and renames it when complete, so no later stage can read a half-written dir. A rerun with the same flags skips
# complete stages and resumes at the first unfinished one (generation resumes its prompts, DPO its checkpoints).
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
source "$(dirname "${BASH_SOURCE[0]}")/_chain_common.sh"
parse_chain_flags "$@"
PAIR_STRATEGY=${PAIR_STRATEGY:-max_min}
[[ $PAIR_STRATEGY != best_of_k ]] || die "--pair_strategy best_of_k makes no DPO pairs; use scripts/rejection_sampling.sh"
FIXED_REF=${REF_MODEL:-$MODEL}

policy=$MODEL
for ((i = 1; i <= ITERATIONS; i++)); do
  iter_dir=$WORK_DIR/iter$i
  next=$iter_dir/policy
  if is_complete "$next"; then
    log "iteration $i: complete ($next)"
    policy=$next
    continue
  fi
  mkdir -p "$iter_dir"
  generate_step "$iter_dir" "$policy" "$i"
  annotate_step "$iter_dir" "$i" "$PAIR_STRATEGY"
  reference=$policy
  if [[ $REFERENCE == fixed ]]; then reference=$FIXED_REF; fi
  log "iteration $i: DPO from $policy (reference $reference)"
  # shellcheck disable=SC2046  # resume_flag prints zero or two words
  accelerate_launch "$REPO_ROOT/dpo_train.py" --model_name_or_path "$policy" --ref_model_path "$reference" \
    --dataset_path "$iter_dir/annotated/pairs.jsonl" --output_dir "$next" $(resume_flag "$next") "${TRAIN_EXTRA[@]}"
  is_complete "$next" || die "iteration $i: dpo_train.py exited without completing $next"
  policy=$next
done
log "done: final policy $policy"
echo "$policy"
