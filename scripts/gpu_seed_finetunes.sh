#!/usr/bin/env bash
# Issue 18's fine-tune-and-decode per seed on a lent GPU (docs/performance.md, "Fast sampling"). For each seed in
# SEEDS: fine-tune BASE (default models/METHOD-long: carried; models/flowlm-long is in git) with METHOD's objective
# (flowlm, the default, or llada) for 3,000 steps with clean answer prefixes in half the rows, as the 2026-11-30
# fine-tunes, plus FT_EXTRA (more --config overrides). TRAIN=0 decodes BASE itself instead (one seed: more decode
# the same model again), which must have been trained on this LONG_TRAIN_PER_TASK build, the one the held-out and
# confirmation records avoid.
# Then decode the 200 test records (TEST_LIMIT per task, 0 = all) at answers 256 and 512, batch 1, with the LLaDA
# sampler (caches none,dual x thresholds RULES, default 0,0.9, then factors FACTORS, default 1,0.5,0.25, empty:
# none; the parallel rules only with the caches PARALLEL_CACHES where it is set) and, for FlowLM models unless
# OWN=0, FlowLM's own sampler (no cache; threshold 0, factors 1 and 0.25). HELDOUT_PER_TASK=N also decodes N
# held-out records per task (drawn after the training records: build_assets.py --long-heldout-per-task) the same
# way at batch 32, threshold 0 only; CONFIRM_PER_TASK=M as many confirmation records (drawn after the held-out
# ones; needs HELDOUT_PER_TASK), likewise. DECODE (default "test heldout confirm", space-separated) names the sets
# decoded ("none": no set). Seeds run side by side, PER_GPU (default 1) on each GPU sharing its memory, in rounds
# of as many seeds as GPUs x PER_GPU (not with the test set, whose seconds are the speed). EXPORT=1 (one
# seed, trained here) also brings the fine-tuned weights back, as $OUT/NAME-sSEED/ in 15 MiB parts, before decoding
# (scripts/device_transfer.sh; here: `bash scripts/device_transfer.sh unpack FILES_AT/NAME-sSEED models`).
# Output: $OUT/NAME_sSEED.tgz per seed (train log, decoding logs and JSON; a call brings back only 8 files), and
# every row printed.
#   SEEDS="0 1" NAME=mix FT_EXTRA="--config.masking.mix_strategy=LLADA_STRATEGY --config.masking.mix_prob=0.25" \
#     bash scripts/gpu_seed_finetunes.sh          # carry: [".whl"]
#   METHOD=llada SEEDS="0 1" NAME=llada HELDOUT_PER_TASK=250 bash scripts/gpu_seed_finetunes.sh  # models/llada-long
#   TRAIN=0 METHOD=llada BASE=models/llada-long-prefix SEEDS=0 NAME=lp HELDOUT_PER_TASK=250 CONFIRM_PER_TASK=250 \
#     DECODE="test confirm" PARALLEL_CACHES=dual bash scripts/gpu_seed_finetunes.sh      # decode a carried model only
# TRAIN_TIMEOUT (default 250 s) and DECODE_TIMEOUT (170 s) bound each step, and every step ends by BUDGET seconds
# after the start (560), inside a call's 600 s, so the packing still runs. A stopped training saves a checkpoint
# and is decoded; a stopped decoding keeps its rows in the JSON. LONG_TRAIN_PER_TASK (10000): generated training
# records per task, as in the fine-tunes before.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
deadline=$((SECONDS + ${BUDGET:-560}))
limit() { local left=$((deadline - SECONDS)); echo $((left < $1 ? (left > 1 ? left : 1) : $1)); }  # limit DEFAULT_S
: "${SEEDS:?SEEDS, e.g. \"0 1\"}" "${NAME:?NAME, the prefix of the output files}"
sets=" ${DECODE:-test heldout confirm} "
for set in $sets; do
  [[ $set == test || $set == heldout || $set == confirm || $set == none ]] \
    || { echo "DECODE: unknown set '$set' (test heldout confirm, space-separated, or none)"; exit 1; }
done
if [ "${EXPORT:-0}" = 1 ]; then  # three parts + SHA256SUMS per model: a call brings back only 8 files
  [ "$(wc -w <<< "$SEEDS")" = 1 ] && [ "${TRAIN:-1}" != 0 ] || { echo "EXPORT=1 needs one seed, trained here (TRAIN=1)"; exit 1; }
fi
method=${METHOD:-flowlm}
[[ $method == flowlm || $method == llada ]] || { echo "METHOD must be flowlm or llada, got $method"; exit 1; }
base=${BASE:-models/$method-long} per_task=${LONG_TRAIN_PER_TASK:-10000}
[ -d "$base" ] || { echo "no $base here: carry it"; exit 1; }
[ "${TRAIN:-1}" = 0 ] || [ -f "$base/config.json" ] \
  || { echo "BASE=$base is not an export (fine-tunes start from one): python3 -m flowlm_jax.export RUN --out DIR"; exit 1; }
per_gpu=${PER_GPU:-1}
[[ $per_gpu =~ ^[1-9]$ ]] || { echo "PER_GPU must be 1-9, got $per_gpu"; exit 1; }
[[ $per_gpu = 1 || $sets != *" test "* ]] \
  || { echo "PER_GPU=$per_gpu with DECODE holding test: the test set's batch-1 seconds need the GPU alone"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
heldout=${HELDOUT_PER_TASK:-0} confirm=${CONFIRM_PER_TASK:-0}
long=  # the records are built (gpu_env.sh: once per machine) only where training or a set needs them:
if [[ ${TRAIN:-1} != 0 || ($heldout != 0 && $sets == *" heldout "*) || ($confirm != 0 && $sets == *" confirm "*) ]]; then
  long=$(long_tasks "$per_task" "$heldout" "$confirm" "$(limit 120)") || exit 1  # the test set is in the run's config
fi
train_args="--config.dataset.name= --config.dataset.train_files=$long/train.jsonl
  --config.dataset.validation_files=$long/test.jsonl --config.training.init_from=$base
  --config.training.max_steps=3000 --config.training.learning_rate=3e-4 --config.training.warmup_steps=100
  --config.training.save_steps=1000 --config.evaluation.eval_steps=1000
  --config.masking.clean_prefix_prob=0.5 --config.masking.clean_prefix_block=32 ${FT_EXTRA:-}"
gpus=$(nvidia-smi -L | grep -c "^GPU")
[ "$per_gpu" = 1 ] || export XLA_PYTHON_CLIENT_MEM_FRACTION=$(awk "BEGIN { print 0.9 / $per_gpu }")

decode() {  # decode RUN OUT_PREFIX THRESHOLDS MORE_ARGS...: the LLaDA grid, then FlowLM's own sampler (FlowLM models)
  local run=$1 out=$2 thresholds=$3; shift 3
  local common="--workdir=$run --answers 256,512 --probe_ratios= $*"
  timeout -k 10 "$(limit "${DECODE_TIMEOUT:-170}")" python3 scripts/fast_sampling.py $common --modes llada --caches none,dual \
    --thresholds "$thresholds" --factors "${FACTORS-1,0.5,0.25}" --parallel_caches "${PARALLEL_CACHES:-}" \
    --out "${out}_llada.json" 2>&1 | quiet > "${out}_llada.log"
  [ "$method" = flowlm ] && [ "${OWN:-1}" != 0 ] || return 0
  timeout -k 10 "$(limit "${DECODE_TIMEOUT:-170}")" python3 scripts/fast_sampling.py $common --modes flowlm --caches none \
    --thresholds 0 --factors 1,0.25 --out "${out}_flowlm.json" 2>&1 | quiet > "${out}_flowlm.log"
}

one_seed() {  # one_seed SEED GPU: train (unless TRAIN=0), then decode both ways; a stopped training saves and is decoded
  local seed=$1 run=runs/${NAME}_s$1 out=$OUT/${NAME}_s$1
  export CUDA_VISIBLE_DEVICES=$2
  if [ "${TRAIN:-1}" = 0 ]; then
    run=$base
  else
    rm -rf "$run"
    timeout -k 30 "$(limit "${TRAIN_TIMEOUT:-250}")" python3 launch.py --config="configs/$method.py:tasks_long" --workdir="$run" $train_args \
      --config.training.seed="$seed" --config.dataloader.seed="$seed" 2>&1 | quiet > "${out}_train.log"
    [ "${EXPORT:-0}" != 1 ] || bash "$(dirname "$0")/device_transfer.sh" export "$run" "$OUT/${NAME}-s$seed" 2>&1 | quiet
  fi
  [[ $sets != *" test "* ]] || decode "$run" "$out" "${RULES:-0,0.9}" --batch 1 --limit "${TEST_LIMIT:-0}"
  [[ $heldout = 0 || $sets != *" heldout "* ]] || decode "$run" "${out}_heldout" 0 --batch 32 --records "$long/heldout.jsonl"
  [[ $confirm = 0 || $sets != *" confirm "* ]] || decode "$run" "${out}_confirm" 0 --batch 32 --records "$long/confirm.jsonl"
  grep -h "^| llada\|^| flowlm" "$out"_*.log | grep -v "(0\.[0-9][0-9])\|(1\.00)" | sed "s/^/[seed $seed] /"  # each row
  (cd "$OUT" && tar czf "${NAME}_s$seed.tgz" --remove-files "${NAME}_s$seed"_*) && echo "=== seed $seed: $out.tgz"
}

i=0
for seed in $SEEDS; do  # PER_GPU on each GPU, in rounds of as many seeds as GPUs x PER_GPU
  one_seed "$seed" $((i % gpus)) &
  i=$((i + 1))
  [ $((i % (gpus * per_gpu))) = 0 ] && wait
done
wait
