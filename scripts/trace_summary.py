"""Where GPU time goes, from a `jax.profiler` Perfetto trace (no viewer needed).

  python scripts/trace_summary.py TRACE.json.gz [--top 25]

`python -m flowlm_jax.bench --profile_dir DIR` writes the traces (DIR/<name>/plugins/profile/*/
perfetto_trace.json.gz); `scripts/gpu_bench.sh profile` brings them back. Prints GPU busy time by
kernel class (GEMM, attention, copies, sorts, reductions, other fusions), the busiest kernels, and how
much of the traced span the GPU sat idle (launch gaps, host work).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re

CLASSES = (  # first match wins
    ("attention", re.compile(r"cudnn|fmha|flash|attention", re.I)),
    ("gemm", re.compile(r"gemm|cublas|cutlass|sm90_xmma|nvjet|dot", re.I)),
    ("memcpy/memset", re.compile(r"memcpy|memset|copy", re.I)),
    ("sort", re.compile(r"sort", re.I)),
    ("reduce", re.compile(r"reduc", re.I)),
)


def kernel_class(name: str) -> str:
  return next((label for label, pattern in CLASSES if pattern.search(name)), "other fusion")


def gpu_kernel_events(trace: dict) -> list[dict]:
  """Complete ("X") events on the GPU's stream tracks.

  GPU processes are those whose name mentions the GPU; of their threads, only CUDA streams hold kernels
  (the "XLA Ops" / "XLA Modules" tracks repeat the same time at op level and are left out).
  """
  meta = [e for e in trace["traceEvents"] if e.get("ph") == "M"]
  gpu_pids = {e["pid"] for e in meta if e.get("name") == "process_name" and re.search(r"GPU|device:", e["args"]["name"])}
  streams = {(e["pid"], e["tid"]) for e in meta
             if e.get("name") == "thread_name" and e["pid"] in gpu_pids and "stream" in e["args"]["name"].lower()}
  return [e for e in trace["traceEvents"]
          if e.get("ph") == "X" and "dur" in e and e.get("pid") in gpu_pids
          and (not streams or (e["pid"], e.get("tid")) in streams)]


def summarise(events: list[dict], top: int) -> str:
  busy_us = sum(e["dur"] for e in events)
  span_us = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
  by_class, by_name, count = collections.Counter(), collections.Counter(), collections.Counter()
  for e in events:
    by_class[kernel_class(e["name"])] += e["dur"]
    by_name[e["name"]] += e["dur"]
    count[e["name"]] += 1
  lines = [f"GPU busy {busy_us / 1e3:.1f} ms of a {span_us / 1e3:.1f} ms span "
           f"({1 - busy_us / span_us:.0%} idle); {len(events)} kernels",
           "", "| class | ms | share |", "|---|---|---|"]
  lines += [f"| {c} | {us / 1e3:.2f} | {us / busy_us:.1%} |" for c, us in by_class.most_common()]
  lines += ["", "| kernel | calls | ms | mean us | share |", "|---|---|---|---|---|"]
  for name, us in by_name.most_common(top):
    lines.append(f"| {name[:90]} | {count[name]} | {us / 1e3:.2f} | {us / count[name]:.1f} | {us / busy_us:.1%} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("traces", nargs="+")
  p.add_argument("--top", type=int, default=25)
  args = p.parse_args(argv)
  for path in args.traces:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
      events = gpu_kernel_events(json.load(f))
    print(f"## {path}\n")
    print(summarise(events, args.top) if events else "no GPU kernel events in this trace")
    print()


if __name__ == "__main__":
  main()
