#!/usr/bin/env bash
# Rejection sampling (best-of-K fine-tuning, RAFT): N iterations of generate K → score → keep the best → SFT.
#
#   scripts/rejection_sampling.sh --model runs/sft --prompts data/prompts.jsonl --reward_model runs/rm \
#       --work_dir runs/rs --iterations 2 --num_samples 8 --train_config configs/recipes/x/sft.yaml
#
# Iteration i (1..N) in WORK_DIR/iter<i>/: gen/ (generation/generate.py), annotated/ (annotate/get_rewards.py with
# --pair_strategy best_of_k: rewards.jsonl, sft.jsonl, reward_hist.png), policy/ (sft_train.py on sft.jsonl).
# Iteration i starts from iteration i−1's policy (iteration 1 from --model).
#
# Flags: --model --prompts (may contain {i})   --reward_model DIR | --labeler SPEC   --work_dir   --iterations (2)
#   --num_samples (4)   --max_new_tokens (256)   --temperature (1.0)   --top_p (1.0)   --seed (42; +i per iteration)
#   --min_margin (0: a prompt is kept when its best reward beats its worst by at least this)   --num_processes (1)
#   --accelerate_config   --gen_world_size (1)   --gen_args "..."   --annotate_args "..."   --train_args "..."
#   --train_config FILE (YAML for sft_train.py)
# Environment: PYTHON (default: python).
#
# Failure and resume: as scripts/iterative_dpo.sh (set -euo pipefail; a rerun resumes at the first unfinished stage).
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
source "$(dirname "${BASH_SOURCE[0]}")/_chain_common.sh"
parse_chain_flags "$@"
[[ -z $PAIR_STRATEGY || $PAIR_STRATEGY == best_of_k ]] || die "rejection sampling uses --pair_strategy best_of_k"

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
  annotate_step "$iter_dir" "$i" best_of_k
  log "iteration $i: SFT on the best of $NUM_SAMPLES from $policy"
  # shellcheck disable=SC2046  # resume_flag prints zero or two words
  accelerate_launch "$REPO_ROOT/sft_train.py" --model_name_or_path "$policy" \
    --dataset_path "$iter_dir/annotated/sft.jsonl" --output_dir "$next" $(resume_flag "$next") "${TRAIN_EXTRA[@]}"
  is_complete "$next" || die "iteration $i: sft_train.py exited without completing $next"
  policy=$next
done
log "done: final policy $policy"
echo "$policy"
