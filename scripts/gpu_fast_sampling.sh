#!/usr/bin/env bash
# The fast-sampling measurements of issue 18 on a lent GPU (docs/performance.md, "Fast sampling").
# Usage there, one section per call (a section stops after 580 s, within the 10-minute limit of a call;
# runs/ stays between calls while the machine is warm), in this order:
#   bash scripts/gpu_fast_sampling.sh speed_small     # synthetic weights: cache x answer x batch (then speed_1b)
#   bash scripts/gpu_fast_sampling.sh train_llada     # the tasks_long preset (then train_flowlm)
#   bash scripts/gpu_fast_sampling.sh quality_llada   # speed/quality table on the long-answer set (then quality_flowlm)
# Sections joined by + run side by side, each on a GPU of its own where the machine has one per section
# (nvidia-h200-x2), otherwise sharing the GPU (0.9/n of its memory each; timings then share it too):
#   bash scripts/gpu_fast_sampling.sh train_llada+train_flowlm quality_llada+quality_flowlm
#   bash scripts/gpu_fast_sampling.sh pair       (the same, each phase stopping after SECTION_TIMEOUT, default 280 s)
# Writes JSON + logs under $OUT (or ./gpu_out). LIMIT: records per task of the quality table (default 15);
# TRAIN_ARGS: more --config overrides for the training sections; TRAIN_TIMEOUT: their time limit.
# LONG_TRAIN_PER_TASK: the training sections train on that many generated records per task instead of the
# shipped 600 (the same test set; scripts/build_assets.py writes them under /tmp first, ~30 s for 10000).
# RESUME_ONLY=1: a training section whose run has no checkpoint fails at once instead of starting from step 0
# (the second call of a training split over calls, on a machine that was not kept warm).
#   bash scripts/gpu_fast_sampling.sh export_llada   # the trained weights, ~36 MiB, back under $OUT/llada-long
# (then export_flowlm, one per call: a call brings back 8 files of 16 MiB, 64 MiB in all, so the export comes as a tar in
# parts: scripts/device_transfer.sh). Here `bash scripts/device_transfer.sh unpack FILES_AT/llada-long models`
# puts it in the git-ignored models/, and a later session measures without training again: carry
# models/llada-long and set LLADA_RUN (FLOWLM_RUN), the run the quality sections read (default: the training
# sections' runs/llada-long, runs/flowlm-long).
# train_/quality_/export_llada_prefix and _flowlm_prefix: the same runs with half the training rows keeping a
# clean answer start (masking.clean_prefix_prob=0.5; LLADA_PREFIX_RUN / FLOWLM_PREFIX_RUN as above).
# QUALITY_ARGS: more fast_sampling.py options, after the table's (the last of a repeated option counts), e.g.
# "--steps 1 --block 512 --caches none --thresholds 0 --probe_ratios=" decodes each answer in one pass. Split on
# spaces, no quoting (a value cannot hold a space); quality_flowlm's own --modes and --out come after it.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
[ -n "${SIDE_BY_SIDE_CHILD:-}" ] || nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
grid="--answers 256,512 --batches 1,32 --caches none,prefix,dual --sampler_steps 0 --sampler_reps 1"
table="--answers 256,512 --caches none,prefix,dual --thresholds 0,0.9 --batch 1 --limit ${LIMIT:-15} ${QUALITY_ARGS:-}"
llada_train=runs/llada-long flowlm_train=runs/flowlm-long  # the training sections' runs
llada_run=${LLADA_RUN:-$llada_train} flowlm_run=${FLOWLM_RUN:-$flowlm_train}
# *_prefix: half the training rows keep a clean answer start in whole blocks of 32 (the semi-autoregressive
# sampler's states; masking.keep_clean_prefix), against the decoding gap of docs/performance.md
llada_prefix_train=runs/llada-long-prefix flowlm_prefix_train=runs/flowlm-long-prefix
llada_prefix_run=${LLADA_PREFIX_RUN:-$llada_prefix_train} flowlm_prefix_run=${FLOWLM_PREFIX_RUN:-$flowlm_prefix_train}
prefix_args="--config.masking.clean_prefix_prob=0.5 --config.masking.clean_prefix_block=32"
# The section's command (and, for a training, its workdir): one rule per kind of section.
train() { workdir=$2; cmd="python3 launch.py --config=configs/$1.py:tasks_long --workdir=$2 ${3:-} ${data_args:-} ${TRAIN_ARGS:-}"; }
quality() { cmd="python3 scripts/fast_sampling.py --workdir=$1 $table ${3:-} --out $OUT/$2.json"; }
export_run() { cmd="bash $(dirname "$0")/device_transfer.sh export $1 $OUT/$(basename "$1")"; }
if [ -n "${LONG_TRAIN_PER_TASK:-}" ] && [[ " $* " == *"train_"* || " $* " == *" pair "* ]]; then
  # LONG_HELDOUT_PER_TASK / LONG_CONFIRM_PER_TASK: also draw the held-out and confirmation records in this build (the
  # training records are the same either way), so gpu_seed_finetunes.sh on this machine finds them built
  long=$(long_tasks "$LONG_TRAIN_PER_TASK" "${LONG_HELDOUT_PER_TASK:-0}" "${LONG_CONFIRM_PER_TASK:-0}") || exit 1
  data_args="--config.dataset.name= --config.dataset.train_files=$long/train.jsonl \
    --config.dataset.validation_files=$long/test.jsonl"
fi
gpus=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU")
side_by_side() {  # side_by_side "a+b": each section in a child process of this script; fails if one fails
  local sections=(${1//+/ }) i=0 one pids=() failed=0
  local share=$(awk "BEGIN { print 0.9 / ${#sections[@]} }")
  for one in "${sections[@]}"; do
    if [ "$gpus" -ge "${#sections[@]}" ]; then
      echo "=== $one on GPU $i"; SIDE_BY_SIDE_CHILD=1 CUDA_VISIBLE_DEVICES=$i bash "$0" "$one" &
    else
      echo "=== $one sharing the GPU"; SIDE_BY_SIDE_CHILD=1 XLA_PYTHON_CLIENT_MEM_FRACTION=$share bash "$0" "$one" &
    fi
    pids+=($!); i=$((i + 1))
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  return $failed
}
status=0  # the script's exit status: 1 if any section failed (a training stopped by its time limit has not)
for section in "$@"; do
  if [[ $section == *+* ]]; then side_by_side "$section" || status=1; continue; fi
  case $section in
    speed_small) cmd="python3 -m flowlm_jax.bench --no-train --shapes small --samplers llada,flowlm $grid --out $OUT/fast_small.json" ;;
    speed_1b) cmd="python3 -m flowlm_jax.bench --no-train --shapes 1b --samplers llada $grid --out $OUT/fast_1b.json" ;;
    train_llada) train llada $llada_train ;;
    train_flowlm) train flowlm $flowlm_train ;;
    train_llada_prefix) train llada $llada_prefix_train "$prefix_args" ;;
    train_flowlm_prefix) train flowlm $flowlm_prefix_train "$prefix_args" ;;
    quality_llada) quality $llada_run fast_llada ;;
    quality_llada_prefix) quality $llada_prefix_run fast_llada_prefix ;;
    quality_flowlm) quality $flowlm_run fast_flowlm "--modes llada,flowlm" ;;
    quality_flowlm_prefix) quality $flowlm_prefix_run fast_flowlm_prefix "--modes llada,flowlm" ;;
    export_llada) export_run $llada_train ;;
    export_flowlm) export_run $flowlm_train ;;
    export_llada_prefix) export_run $llada_prefix_train ;;
    export_flowlm_prefix) export_run $flowlm_prefix_train ;;
    pair) # two phases must fit one 600 s call
          for two in train_llada+train_flowlm quality_llada+quality_flowlm; do
            SECTION_TIMEOUT=${SECTION_TIMEOUT:-280} side_by_side "$two" || status=1
          done; continue ;;
    *) echo "unknown section $section"; status=1; continue ;;
  esac
  if [[ -n "${RESUME_ONLY:-}" && $section == train_* && ! -d $workdir/checkpoints ]]; then
    # a later call of a training split over calls: runs/ is gone when the machine was given back in between
    echo "=== $section: RESUME_ONLY, but $workdir has no checkpoint (a fresh machine?): not training from step 0"
    status=1; continue
  fi
  limit=${SECTION_TIMEOUT:-580}
  [[ $section == train_* ]] && limit=${TRAIN_TIMEOUT:-$limit}  # a stopped training saves where it is
  echo "=== $section: $cmd"
  timeout "$limit" $cmd 2>&1 | quiet | tee "$OUT/$section.log" | tail -30 | sed "s/^/[$section] /"
  rc=${PIPESTATUS[0]}
  [[ $rc == 124 && $section == train_* ]] && rc=0
  [ "$rc" = 0 ] || { echo "=== $section failed (exit $rc): $OUT/$section.log"; status=1; }
done
exit $status
