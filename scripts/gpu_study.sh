#!/usr/bin/env bash
# The LLaDA-vs-FlowLM study of issue 16 (docs/study.md) on one lent GPU, one section per call:
#   bash scripts/gpu_study.sh tasks      (then: text)
# tasks: the `tasks` preset trained as LLaDA, FlowLM and FlowLM with the mixed-noise ELBO loss (gidd), three
# seeds each, all nine at once on the one GPU (tiny models: one alone leaves it mostly idle), then
# `flowlm_jax.compare` over the nine under one budget. Everything lands in $OUT/study_tasks.tar.gz
# (report.md, report.json, figures, every run's metrics.jsonl and log).
# text: the same three objectives x three seeds on a byte-level Shakespeare model (TEXT_ARGS), likelihood
# bounds only (no task answers to score); $OUT/study_text.tar.gz.
# STUDY_EPOCHS (default 24), STUDY_SEEDS (default "0 1 2"), STUDY_ARGS (more --config overrides) and
# COMPARE_ARGS (compare's budget flags) set the size; a CPU smoke test of the script:
#   OUT=/tmp/s STUDY_SEEDS=0 STUDY_ARGS=--config.training.max_steps=20 COMPARE_ARGS="--limit_per_task 5
#   --bound_rows 16 --steps 4,8 --seeds 0 --rates 0.3 --draws 2 --choice_draws 2" bash scripts/gpu_study.sh tasks
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # nine processes share the GPU's memory
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv 2>/dev/null | tee "$OUT/gpu.txt"
epochs=${STUDY_EPOCHS:-24}
# The text model: the demo's byte-level Shakespeare (2.3M training bytes) with a 6-layer d384 network in
# bf16, 2,000 steps of 64 rows of 256 bytes (14 epochs); validation every 100 steps shows overfitting.
TEXT_ARGS=${TEXT_ARGS:-"--config.model.d_model=384 --config.model.n_layers=6 --config.model.n_heads=6 \
  --config.model.d_ff=1024 --config.model.compute_dtype=bfloat16 --config.dataset.max_length=256 \
  --config.training.batch_size=64 --config.training.max_steps=2000 --config.training.learning_rate=1e-3 \
  --config.training.warmup_steps=100 --config.evaluation.eval_steps=100"}

# study NAME VARIANT ARGS: three objectives x STUDY_SEEDS trained side by side on the one GPU, then compared;
# everything lands in $OUT/study_NAME.tar.gz.
study() {
  local name=$1 variant=$2 args=$3 root=runs/study_$1 start objective seed w
  rm -rf "$root"; mkdir -p "$root"
  local workdirs=() labels=()
  declare -A method=([llada]="configs/llada.py:$variant" [flowlm]="configs/flowlm.py:$variant"
                     [flowlm_gidd]="configs/flowlm.py:$variant --config.training.loss_weighting=gidd")
  start=$(date +%s)
  for objective in llada flowlm flowlm_gidd; do
    for seed in ${STUDY_SEEDS:-0 1 2}; do
      w=$root/$objective-$seed; workdirs+=("$w"); labels+=("$objective")
      # Checkpoints and test-prompt samples only at the end.
      timeout 330 python3 launch.py --config=${method[$objective]} --workdir="$w" --config.training.seed=$seed \
        --config.training.save_steps=100000 --config.inference.at_evaluation=false $args ${STUDY_ARGS:-} \
        >"$w.log" 2>&1 &
    done
  done
  wait
  echo "trained ${#workdirs[@]} runs in $(( $(date +%s) - start )) s"
  local steps=()
  for w in "${workdirs[@]}"; do
    steps+=("$(ls "$w/checkpoints" 2>/dev/null | sort -n | tail -1)")
    echo "$w: checkpoint step ${steps[-1]:-none}; $(quiet <"$w.log" | tail -1)"
  done
  # A run stopped by its time limit saves where it was: the pooled means would mix training lengths.
  if [ "$(printf '%s\n' "${steps[@]}" | sort -u | wc -l)" != 1 ]; then
    echo "WARNING: the runs ended at different steps (${steps[*]}): compare them with care" | tee "$root/WARNING"
  fi
  start=$(date +%s)
  timeout 250 python3 -m flowlm_jax.compare "${workdirs[@]}" --labels "$(IFS=,; echo "${labels[*]}")" \
    --out "$root/report" ${COMPARE_ARGS:-} 2>&1 | quiet | tee "$root/compare.log" | tail -60
  echo "compare took $(( $(date +%s) - start )) s"
  for w in "${workdirs[@]}"; do cp "$w/metrics.jsonl" "$w.metrics.jsonl" 2>/dev/null; done
  tar czf "$OUT/study_$name.tar.gz" "$root"/report "$root"/*.log "$root"/*.metrics.jsonl $(ls "$root"/WARNING 2>/dev/null)
}

for section in "$@"; do
  case $section in
    # validation every 500 steps (the curves)
    tasks) study tasks tasks "--config.training.num_epochs=$epochs --config.evaluation.eval_steps=500" ;;
    text) study text demo "$TEXT_ARGS" ;;
    *) echo "unknown section $section" ;;
  esac
done
