# Sourced by the scripts/gpu_*.sh runners on a lent GPU machine: installs the carried wheels (.whl/,
# the packages that machine lacks) and sets PYTHONPATH, OUT and the environment every run needs.
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  # Once per machine and set of wheels (runs started side by side source this again; a warm machine keeps
  # /tmp between calls): the marker holds the wheels' hash and is written only after a good install.
  wheels=$(cat .whl/*.whl | sha1sum | cut -d' ' -f1)
  if [ "$(cat /tmp/site/.installed 2>/dev/null)" != "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && echo "$wheels" > /tmp/site/.installed
  fi
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
# NVLink multicast stays off (it can take a shared host's GPUs out of service: device README).
# Output without absl's per-line warning and info lines (XLA and jax write many): `cmd 2>&1 | quiet`.
quiet() { grep -v "^W0000\|^I0000"; }
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
# `long=$(long_tasks PER_TASK [HELDOUT_PER_TASK] [CONFIRM_PER_TASK] [TIMEOUT_S]) || exit 1`: the long-answer records
# with PER_TASK generated training records per task (and held-out and confirmation ones: build_assets.py
# --long-heldout-per-task, --long-confirm-per-task), built once per machine (a warm one keeps /tmp) and whole or not
# at all: a failed or stopped build leaves no folder to reuse.
long_tasks() {
  local dir=/tmp/long_tasks_${1}_${2:-0}_${3:-0}/sft_tasks_long
  if [ ! -d "$dir" ]; then
    rm -rf "$dir.partial"
    timeout -k 10 "${4:-600}" python3 scripts/build_assets.py --long-tasks-only --out "$dir.partial" \
      --long-train-per-task "$1" --long-heldout-per-task "${2:-0}" --long-confirm-per-task "${3:-0}" \
      >"$OUT/long_tasks.log" 2>&1 \
      || { echo "building the long-task records failed: $OUT/long_tasks.log" >&2; tail -3 "$OUT/long_tasks.log" >&2
           return 1; }
    mv "$dir.partial/sft_tasks_long" "$dir" && rm -rf "$dir.partial"
  fi
  echo "$dir"
}
