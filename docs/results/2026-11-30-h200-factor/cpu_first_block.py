"""Where parallel decoding's wrong tokens are: decode a task's long-answer test records (answer 256) with the
LLaDA sampler under each parallel rule and print, per record, the answer positions that differ from the reference.

  uv run python docs/results/2026-11-30-h200-factor/cpu_first_block.py models/flowlm-long-prefix copy,reverse 40 \
      0.9:0 0.99:0 0:1 0:0.5 0:0.25      # rules as parallel_threshold:parallel_factor

Run from the repository root (it reads scripts/fast_sampling.py's record file); ~10 minutes on 2 CPU cores.
`--records=FILE` first reads another record file (the 2026-11-30 mixed run's held-out records).
"""
import sys, numpy as np, time
sys.path.insert(0, "scripts")
import fast_sampling as fs
from flowlm_jax import loading, evaluate, sampling, data
records_file = sys.argv.pop(1).split("=", 1)[1] if sys.argv[1].startswith("--records=") else fs.LONG_TEST_FILE
run = loading.load(sys.argv[1])
task = sys.argv[2]; n = int(sys.argv[3]); rules = [tuple(map(float, r.split(":"))) for r in sys.argv[4:]]
recs = [r for r in evaluate.load_records(records_file, 0) if r["task"] in task.split(",")]
tok, vocab = run.tokenizer, run.vocab
chat = run.config.dataset.prompt_format == "chat"
end_id = data.answer_end_id(tok, chat, vocab)
refs = [tok.encode(r["answer"], add_special_tokens=False) for r in recs]
recs = [r for r, ref in zip(recs, refs) if len(ref) + 1 <= 256][:n]
refs = [tok.encode(r["answer"], add_special_tokens=False) for r in recs]
prompts = [sampling.encode_prompt(tok, r["prompt"], chat) for r in recs]
bucket = sampling.prompt_columns(prompts)
outs = {}
for t in rules:
  icfg = sampling.run_config(run.config.inference, answer_length=256, steps=256, max_steps=256, block_length=32,
                             cache="none", cache_refresh=0, parallel_threshold=t[0], parallel_factor=t[1])
  t0 = time.time()
  o = sampling.generate(run.graphdef, run.params, prompts, run.vocab, icfg, mode="llada", prompt_bucket=bucket, padded=True)
  outs[t] = [sampling.answer_ids(row, vocab, end_id) for row in o.answer]
  print("thr", t, "s", time.time() - t0, "passes", o.passes.mean())
for i, ref in enumerate(refs):
  print("record", i, "len", len(ref), recs[i]["prompt"][:80])
  for t in rules:
    a = outs[t][i]
    bad = [j for j in range(max(len(ref), len(a))) if j >= len(a) or j >= len(ref) or a[j] != ref[j]]
    print("  thr", t, "len", len(a), "wrong at", bad[:12], "n", len(bad))
    if bad:
      j = bad[0]; print("    ref", tok.decode(ref[max(0,j-5):j+6]), "| got", tok.decode(a[max(0,j-5):j+6]))

for t in rules:
  bad = [sum(1 for j in range(max(len(ref), len(a))) if j >= len(a) or j >= len(ref) or a[j] != ref[j]) for a, ref in zip(outs[t], refs)]
  print("SUMMARY", t, "exact", sum(b == 0 for b in bad), "of", len(bad), "wrong tokens", sum(bad))
