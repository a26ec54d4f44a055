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
