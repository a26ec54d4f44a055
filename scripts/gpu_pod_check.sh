#!/usr/bin/env bash
# Multi-GPU checks on one lent host, in one call (docs/scaling.md). Sections, in the order given:
#   meshes     every mesh shape on 2 and 4 GPUs vs 1 GPU, cuDNN attention, checkpoints across meshes
#   processes  one process per GPU (2 and 4) vs one process driving them all
#   scaling    weak scaling of the bench shapes (small: data; 1b: fsdp, data x fsdp) at 1, 2, 4 GPUs
#   faults     one process per GPU (2): test prompts sampled at evaluations, and a relaunch after process 1's
#              own file of the newest checkpoint was truncated (set aside by both, the step before restored)
#   8b         the 8b preset with FSDP on 4 GPUs, capped at 80 GB each: 30+ steps, save, restore
# Usage there: bash scripts/gpu_pod_check.sh meshes processes scaling   (JSON + report.md under $OUT, or ./gpu_out)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
GPUS=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
quiet() { grep -v "^W0000\|^I0000\|^E0000"; }
[ $# -gt 0 ] || set -- meshes processes scaling
for section in "$@"; do
  echo "=== $section ($(date -u +%H:%M:%S))"
  case $section in
    meshes) timeout 300 python3 scripts/pod_check.py meshes --out "$OUT/meshes.json" 2>&1 | quiet | tail -5 ;;
    processes)
      for n in 2 4; do
        [ "$n" -le "$GPUS" ] && timeout 240 python3 scripts/pod_check.py processes --gpus $n --out "$OUT/processes$n.json" 2>&1 | quiet | tail -3
      done ;;
    scaling|scaling_small|scaling_1b)
      what=${section#scaling_}; case $what in small) s=small:data ;; 1b) s=1b:fsdp,1b:data_fsdp ;; *) s=small:data,1b:fsdp,1b:data_fsdp ;; esac
      timeout 420 python3 -m flowlm_jax.bench --scaling $s --gpus 1,2,4 --samplers= --steps 10 \
        --out "$OUT/$section.json" 2>&1 | quiet | tail -12 ;;
    faults) timeout 560 python3 scripts/pod_check.py faults --gpus 2 --timeout 250 --out "$OUT/faults.json" 2>&1 | quiet | tail -3 ;;
    8b) XLA_PYTHON_CLIENT_MEM_FRACTION=0.55 timeout 560 python3 scripts/pod_check.py big --gpus 4 --out "$OUT/8b.json" 2>&1 | quiet | tail -20 ;;
    *) echo "unknown section $section" ;;
  esac
done
python3 scripts/pod_check.py report --out "$OUT/report.md" "$OUT"/*.json 2>&1 | quiet
