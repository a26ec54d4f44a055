import json

from flowlm_jax import bench
from flowlm_jax.model import ModelConfig


def test_flops_per_token_follows_the_stated_formula():
  m = ModelConfig(vocab_size=32000, num_real_tokens=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                  d_ff=2048)
  d, L, ff, V, S = 768, 12, 2048, 32000, 1024
  assert bench.train_flops_per_token(m, S) == 6 * (L * (4 * d * d + 3 * d * ff) + d * V) + 12 * L * S * d
  assert bench.forward_flops_per_token(m, S) * 3 == bench.train_flops_per_token(m, S)


def test_smoke_run_prints_a_table_and_writes_json(tmp_path, capsys):
  out = tmp_path / "bench.json"
  bench.main(["--smoke", f"--out={out}"])
  report = json.loads(out.read_text())
  printed = capsys.readouterr().out
  assert "| smoke |" in printed and "x floor" in printed
  row = report["train"][0]
  assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and 0 < row["mfu"] and row["compile_s"] > 0
  assert {r["mode"] for r in report["samplers"]} == {"llada", "flowlm"}
  assert all(r["x_floor"] > 0 for r in report["samplers"])
