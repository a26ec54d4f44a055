#!/usr/bin/env bash
# Runs the benchmark variants on the lent GPU in one call (see docs/performance.md).
# Usage there: bash scripts/gpu_bench.sh   (writes JSON + logs under $OUT, or ./gpu_out)
#   bash scripts/gpu_bench.sh fp8   FP8 vs bf16 (issue 19; one H200, ~8 min, at most 9.3): the FP8 GEMM check, the train
#                                   step of small and 1b with each, then the small preset trained 1,000 steps
#                                   with each (same seed) and the relative gap of their losses at every logged step.
#   On a CPU, FP8_SMOKE=1 PYTHON=.venv/bin/python bash scripts/gpu_bench.sh fp8 runs the same path at toy sizes.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"

# The small preset trained with one matmul dtype: no sampling, evaluation and checkpoint only at the end (forced),
# warmup 100 steps (the preset's 2000 would cover the whole run). A fresh workdir: a kept one would be resumed.
# Both dtypes train at once, sharing the GPU (its memory split in two): their losses do not depend on it, and
# their compiles overlap; their tokens/s do, so speed comes from the bench alone.
fp8_train() {
  local dtype=$1 workdir=runs/fp8_$1
  rm -rf "$workdir"
  echo "=== fp8: train $train_preset, model.matmul_dtype=$dtype, $train_steps steps"
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 timeout "$train_timeout" $PY launch.py --config="$train_preset" \
    --workdir="$workdir" --config.model.matmul_dtype="$dtype" \
    --config.training.max_steps="$train_steps" --config.training.warmup_steps="$train_warmup" \
    --config.training.save_steps="$train_steps" --config.inference.at_evaluation=False \
    --config.evaluation.eval_steps=0 --config.logging.progress_bar=False $train_extra 2>&1 | quiet \
    | tee "$OUT/fp8_train_$dtype.log" | grep -E "^finished|^  train |^  eval |Error" | sed "s/^/[$dtype] /"
  cp "$workdir/metrics.jsonl" "$OUT/fp8_train_$dtype.metrics.jsonl"
}

fp8_section() {
  if [ -n "${FP8_SMOKE:-}" ]; then  # CPU: the same commands at toy sizes
    bench_args="--smoke"; check_args="--smoke"; train_preset=configs/llada.py:demo; train_steps=4; train_warmup=1
    train_extra="--config.model.d_model=32 --config.model.n_layers=2 --config.model.n_heads=2 --config.model.d_ff=64
      --config.dataset.max_length=32 --config.dataset.max_train_examples=200 --config.training.batch_size=4
      --config.evaluation.eval_batches=1 --config.logging.log_every=1"
  else
    bench_args="--shapes small,1b --steps 10"; check_args=""; train_preset=configs/llada.py:small; train_steps=1000
    train_warmup=100; train_extra=""
  fi
  train_timeout=250
  echo "=== fp8: does XLA make FP8 GEMMs of an FP8 product and its backward?"
  timeout 45 $PY -m flowlm_jax.bench --fp8_check $check_args --out "$OUT/fp8_check.json" 2>&1 | quiet \
    | tee "$OUT/fp8_check.log"
  echo "=== fp8: train step, bf16 and fp8"
  timeout 250 $PY -m flowlm_jax.bench $bench_args --matmul_dtype bfloat16,fp8 --samplers= --out "$OUT/bench_fp8.json" \
    2>&1 | quiet | tee "$OUT/bench_fp8.log" | tail -12
  fp8_train bfloat16 & fp8_train fp8 & wait
  echo "=== fp8: loss curves (fp8 relative to bf16; plot: python -m flowlm_jax.plot $OUT/fp8_train_*.metrics.jsonl)"
  $PY -m flowlm_jax.bench --loss_gap "$OUT/fp8_train_bfloat16.metrics.jsonl,$OUT/fp8_train_fp8.metrics.jsonl" \
    --out "$OUT/fp8_loss_gap.json" 2>&1 | quiet | tail -2
  $PY -m flowlm_jax.plot "$OUT/fp8_train_bfloat16.metrics.jsonl" "$OUT/fp8_train_fp8.metrics.jsonl" \
    --labels bfloat16,fp8 --out "$OUT/fp8_plots" 2>&1 | quiet | tail -2
}

for variant in "${@:-default}"; do
  case $variant in
    fp8) fp8_section; continue ;;
    default) args="--shapes small,1b" ;;
    nochunk) args="--shapes small --loss_chunk 0 --samplers=" ;;
    noremat) args="--shapes small,1b --remat none --samplers=" ;;
    full)    args="--shapes 1b --remat full --samplers=" ;;
    samplers) args="--shapes small,1b --no-train --samplers=llada,flowlm" ;;
    sampler_profile) args="--shapes small,1b --no-train --samplers=llada,flowlm --profile_dir /tmp/prof" ;;
    rolled)  args="--shapes small,1b --no-unroll --samplers=" ;;
    profile) args="--shapes small,1b --samplers= --steps 5 --profile_dir /tmp/prof" ;;
    cublas)  args="--shapes small,1b --samplers=llada"; export XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" ;;
    *) echo "unknown variant $variant"; continue ;;
  esac
  echo "=== $variant: $args"
  timeout 300 $PY -m flowlm_jax.bench $args --out "$OUT/bench_$variant.json" 2>&1 | quiet | tee "$OUT/bench_$variant.log" | tail -20
done
# Perfetto traces (if any) come back as one file per run, with a summary of where GPU time went.
for f in /tmp/prof/*/plugins/profile/*/perfetto_trace.json.gz; do
  [ -f "$f" ] || continue
  name=$(echo "$f" | cut -d/ -f4)
  cp "$f" "$OUT/trace_$name.json.gz"
  $PY scripts/trace_summary.py "$f" --top 15 > "$OUT/trace_$name.md" 2>&1
done
rm -rf /tmp/prof
