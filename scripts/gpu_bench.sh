#!/usr/bin/env bash
# Runs the benchmark variants on the lent GPU in one call (see docs/performance.md).
# Usage there: bash scripts/gpu_bench.sh   (writes JSON + logs under $OUT, or ./gpu_out)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
for variant in "${@:-default}"; do
  case $variant in
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
  timeout 300 python3 -m flowlm_jax.bench $args --out "$OUT/bench_$variant.json" 2>&1 | grep -v "^W0000\|^I0000" | tee "$OUT/bench_$variant.log" | tail -20
done
# Perfetto traces (if any) come back as one file per run, with a summary of where GPU time went.
for f in /tmp/prof/*/plugins/profile/*/perfetto_trace.json.gz; do
  [ -f "$f" ] || continue
  name=$(echo "$f" | cut -d/ -f4)
  cp "$f" "$OUT/trace_$name.json.gz"
  python3 scripts/trace_summary.py "$f" --top 15 > "$OUT/trace_$name.md" 2>&1
done
rm -rf /tmp/prof
