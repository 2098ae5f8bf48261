# Shared by iterative_dpo.sh and rejection_sampling.sh (sourced, not run): flag parsing, the completeness test of a
# stage dir, and the generate → annotate steps both chains run in every iteration.
#
# Resuming: every stage writes OUT.partial/ and renames it to OUT/ when it is complete (rlhfkit/checkpoints.py), so
# "OUT/run_info.json says complete" is the one test of whether a stage is done. A rerun skips complete stages,
# lets generate.py resume its shards, and passes --resume_from_checkpoint true to a training stage that left
# OUT.partial/ behind.

PYTHON=${PYTHON:-python}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

MODEL="" PROMPTS="" REWARD_MODEL="" LABELER="" WORK_DIR=""
ITERATIONS=2 NUM_SAMPLES=4 MAX_NEW_TOKENS=256 TEMPERATURE=1.0 TOP_P=1.0 SEED=42
PAIR_STRATEGY="" MIN_MARGIN=0.0 REFERENCE=iteration REF_MODEL=""
NUM_PROCESSES=1 ACCELERATE_CONFIG="$REPO_ROOT/configs/accelerate/single.yaml" GEN_WORLD_SIZE=1
GEN_ARGS="" ANNOTATE_ARGS="" TRAIN_ARGS="" TRAIN_CONFIG=""

log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
die() { log "error: $*"; exit 1; }

parse_chain_flags() {
  while [[ $# -gt 0 ]]; do
    [[ $# -ge 2 ]] || die "flag $1 needs a value (see --help)"
    case "$1" in
      --model) MODEL=$2 ;;
      --prompts) PROMPTS=$2 ;;
      --reward_model) REWARD_MODEL=$2 ;;
      --labeler) LABELER=$2 ;;
      --work_dir) WORK_DIR=$2 ;;
      --iterations) ITERATIONS=$2 ;;
      --num_samples) NUM_SAMPLES=$2 ;;
      --max_new_tokens) MAX_NEW_TOKENS=$2 ;;
      --temperature) TEMPERATURE=$2 ;;
      --top_p) TOP_P=$2 ;;
      --seed) SEED=$2 ;;
      --pair_strategy) PAIR_STRATEGY=$2 ;;
      --min_margin) MIN_MARGIN=$2 ;;
      --reference) REFERENCE=$2 ;;
      --ref_model) REF_MODEL=$2 ;;
      --num_processes) NUM_PROCESSES=$2 ;;
      --accelerate_config) ACCELERATE_CONFIG=$2 ;;
      --gen_world_size) GEN_WORLD_SIZE=$2 ;;
      --gen_args) GEN_ARGS=$2 ;;
      --annotate_args) ANNOTATE_ARGS=$2 ;;
      --train_args) TRAIN_ARGS=$2 ;;
      --train_config) TRAIN_CONFIG=$2 ;;
      *) die "unknown flag $1 (see --help)" ;;
    esac
    shift 2
  done
  [[ -n $MODEL ]] || die "--model is required"
  [[ -n $PROMPTS ]] || die "--prompts is required"
  [[ -n $WORK_DIR ]] || die "--work_dir is required"
  [[ -n $REWARD_MODEL || -n $LABELER ]] || die "give --reward_model or --labeler"
  [[ -z $REWARD_MODEL || -z $LABELER ]] || die "give only one of --reward_model and --labeler"
  [[ $ITERATIONS =~ ^[1-9][0-9]*$ ]] || die "--iterations must be a positive integer"
  [[ $GEN_WORLD_SIZE =~ ^[1-9][0-9]*$ ]] || die "--gen_world_size must be a positive integer"
  [[ $REFERENCE == iteration || $REFERENCE == fixed ]] || die "--reference must be 'iteration' or 'fixed'"
  [[ -f $ACCELERATE_CONFIG ]] || die "--accelerate_config $ACCELERATE_CONFIG not found"
  read -r -a GEN_EXTRA <<< "$GEN_ARGS"
  read -r -a ANNOTATE_EXTRA <<< "$ANNOTATE_ARGS"
  read -r -a TRAIN_EXTRA <<< "$TRAIN_ARGS"
  if [[ -n $TRAIN_CONFIG ]]; then TRAIN_EXTRA=(--config "$TRAIN_CONFIG" "${TRAIN_EXTRA[@]}"); fi
  mkdir -p "$WORK_DIR"
}

# true when $1 is a finished stage dir (run_info.json written last, with complete: true)
is_complete() {
  [[ -f $1/run_info.json ]] || return 1
  "$PYTHON" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get("complete") is True else 1)' \
    "$1/run_info.json"
}

# --resume_from_checkpoint true when an interrupted training run left OUT.partial behind
resume_flag() {
  if [[ -d $1.partial ]]; then echo "--resume_from_checkpoint true"; fi
}

# generate_step ITER_DIR POLICY ITERATION: K samples per prompt into ITER_DIR/gen (sharded when --gen_world_size > 1)
generate_step() {
  local dir=$1/gen policy=$2 iteration=$3
  local prompts=${PROMPTS//\{i\}/$iteration}
  if is_complete "$dir"; then log "iteration $iteration: generation done ($dir)"; return 0; fi
  local common=(--model_name_or_path "$policy" --dataset_path "$prompts" --output_dir "$dir"
                --num_samples "$NUM_SAMPLES" --max_new_tokens "$MAX_NEW_TOKENS" --temperature "$TEMPERATURE"
                --top_p "$TOP_P" --seed $((SEED + iteration)) "${GEN_EXTRA[@]}")
  log "iteration $iteration: generating $NUM_SAMPLES samples per prompt with $policy"
  if [[ $GEN_WORLD_SIZE -eq 1 ]]; then
    "$PYTHON" "$REPO_ROOT/generation/generate.py" "${common[@]}"
    return 0
  fi
  local pids=() shard failed=0
  for ((shard = 0; shard < GEN_WORLD_SIZE; shard++)); do  # one process per GPU, as in Online-RLHF
    CUDA_VISIBLE_DEVICES=$shard "$PYTHON" "$REPO_ROOT/generation/generate.py" "${common[@]}" \
      --local_index "$shard" --world_size "$GEN_WORLD_SIZE" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  [[ $failed -eq 0 ]] || die "iteration $iteration: a generation shard failed (rerun to resume it)"
  "$PYTHON" "$REPO_ROOT/generation/merge_data.py" --output_dir "$dir" --world_size "$GEN_WORLD_SIZE" \
    --dataset_path "$prompts"
}

# annotate_step ITER_DIR ITERATION STRATEGY: rewards, pairs and best-of-K rows into ITER_DIR/annotated
annotate_step() {
  local dir=$1/annotated iteration=$2 strategy=$3
  if is_complete "$dir"; then log "iteration $iteration: annotation done ($dir)"; return 0; fi
  local scorer=(--labeler "$LABELER")
  if [[ -n $REWARD_MODEL ]]; then scorer=(--reward_model_path "$REWARD_MODEL"); fi
  log "iteration $iteration: scoring with ${REWARD_MODEL:-$LABELER}"
  "$PYTHON" "$REPO_ROOT/annotate/get_rewards.py" --dataset_path "$1/gen" --output_dir "$dir" "${scorer[@]}" \
    --pair_strategy "$strategy" --min_margin "$MIN_MARGIN" --pair_seed $((SEED + iteration)) "${ANNOTATE_EXTRA[@]}"
}

accelerate_launch() {
  "$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" --num_processes "$NUM_PROCESSES" "$@"
}
