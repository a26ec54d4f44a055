#!/usr/bin/env bash
# The LLaDA-vs-FlowLM study of issue 16 (docs/study.md) on one lent GPU, one section per call:
#   bash scripts/gpu_study.sh tasks
# tasks: the `tasks` preset trained as LLaDA, FlowLM and FlowLM with the mixed-noise ELBO loss (gidd), three
# seeds each, all nine at once on the one GPU (tiny models: one alone leaves it mostly idle), then
# `flowlm_jax.compare` over the nine under one budget. Everything lands in $OUT/study_tasks.tar.gz
# (report.md, report.json, figures, every run's metrics.jsonl and log).
# STUDY_EPOCHS (default 24), STUDY_SEEDS (default "0 1 2"), STUDY_ARGS (more --config overrides) and
# COMPARE_ARGS (compare's budget flags) set the size; a CPU smoke test of the script:
#   OUT=/tmp/s STUDY_SEEDS=0 STUDY_ARGS=--config.training.max_steps=20 COMPARE_ARGS="--limit_per_task 5
#   --bound_rows 16 --steps 4,8 --seeds 0 --rates 0.3 --draws 2 --choice_draws 2" bash scripts/gpu_study.sh tasks
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # nine processes share the GPU's memory
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv 2>/dev/null | tee "$OUT/gpu.txt"
epochs=${STUDY_EPOCHS:-24}
declare -A METHOD=([llada]="configs/llada.py:tasks" [flowlm]="configs/flowlm.py:tasks"
                   [flowlm_gidd]="configs/flowlm.py:tasks --config.training.loss_weighting=gidd")
for section in "$@"; do
  case $section in
    tasks)
      root=runs/study_tasks; rm -rf "$root"; mkdir -p "$root"
      workdirs=(); labels=()
      start=$(date +%s)
      for name in llada flowlm flowlm_gidd; do
        for seed in ${STUDY_SEEDS:-0 1 2}; do
          w=$root/$name-$seed; workdirs+=("$w"); labels+=("$name")
          # Checkpoints and test-prompt samples only at the end; validation every 500 steps (the curves).
          timeout 330 python3 launch.py --config=${METHOD[$name]} --workdir="$w" --config.training.seed=$seed \
            --config.training.num_epochs=$epochs --config.training.save_steps=100000 \
            --config.evaluation.eval_steps=500 --config.inference.at_evaluation=false ${STUDY_ARGS:-} \
            >"$w.log" 2>&1 &
        done
      done
      wait
      echo "trained ${#workdirs[@]} runs in $(( $(date +%s) - start )) s"
      for w in "${workdirs[@]}"; do echo "$w: $(grep -v '^W0000\|^I0000' "$w.log" | tail -1)"; done
      start=$(date +%s)
      timeout 250 python3 -m flowlm_jax.compare "${workdirs[@]}" --labels "$(IFS=,; echo "${labels[*]}")" \
        --out "$root/report" ${COMPARE_ARGS:-} 2>&1 | grep -v "^W0000\|^I0000" | tee "$root/compare.log" | tail -60
      echo "compare took $(( $(date +%s) - start )) s"
      for w in "${workdirs[@]}"; do cp "$w/metrics.jsonl" "$w.metrics.jsonl" 2>/dev/null; done
      tar czf "$OUT/study_tasks.tar.gz" "$root"/report "$root"/*.log "$root"/*.metrics.jsonl
      ;;
    *) echo "unknown section $section" ;;
  esac
done
