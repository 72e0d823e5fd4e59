"""The peer benchmark's self-checks: load flagging, retries, clean-round medians, phases."""

import importlib.util
import pathlib
import types

import pytest

_PATH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_peer.py"
_SPEC = importlib.util.spec_from_file_location("bench_peer", _PATH)
bench_peer = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_peer)


def _child(tokens, rss, foreign, phases=(0.5, 1.0, 0.1)):
  # The 1-min load average includes the child's own threads: it never decides.
  return {"tokens_per_s": tokens, "peak_rss_bytes": rss, "load_start": 2.0, "load_end": 2.0,
          "foreign_load": foreign, "phases_s": dict(zip(bench_peer.PHASES, phases))}


def test_noisy_rounds_are_retried_then_flagged(monkeypatch):
  loads = iter([1.0, 1.0, 0.1, 0.1])  # first pair disturbed, the retry is clean
  calls = []

  def fake_run(python, argv, threads, timeout):
    calls.append(argv[0])
    return _child(100.0, 2**30, next(loads))

  monkeypatch.setattr(bench_peer, "_run_child", fake_run)
  monkeypatch.setattr(bench_peer.time, "sleep", lambda s: None)
  args = types.SimpleNamespace(warmup=1, timed=2, retries=2, threads=2, timeout=10,
                               peer_python="py", max_foreign=0.25, cool_down=0)
  pair = bench_peer.run_round(args, "lora", pathlib.Path("/tmp"), peer_first=True)
  assert calls == ["--peer", "--ours", "--peer", "--ours"]  # retried once, peer first
  assert not pair["noisy"] and pair["attempt"] == 1
  loads = iter([1.0] * 6)
  pair = bench_peer.run_round(args, "lora", pathlib.Path("/tmp"), peer_first=False)
  assert pair["noisy"] and pair["attempt"] == 2 and pair["foreign_load"] == 1.0


def test_summary_uses_clean_rounds_and_reports_phases():
  clean = {"ours": _child(200.0, 1000, 0.05), "peer": _child(100.0, 2000, 0.1),
           "max_load": 2.0, "foreign_load": 0.1, "noisy": False}
  noisy = {"ours": _child(10.0, 1000, 3.0), "peer": _child(100.0, 2000, 3.0),
           "max_load": 9.0, "foreign_load": 3.0, "noisy": True}
  summary = bench_peer.summarize({"lora": [clean, noisy]})["lora"]
  assert summary["tokens_ratio"] == [2.0] and summary["rss_ratio"] == [0.5]
  assert summary["clean_rounds"] == 1 and not summary["noisy"]
  text = bench_peer.tables({"lora": summary})
  assert "2.00x (meets >= 1.3x)" in text and "0.50x (meets <= 0.8x)" in text
  assert "| lora | ours | 500 ms | 1,000 ms | 100 ms |" in text
  only_noisy = bench_peer.summarize({"lora": [noisy]})["lora"]
  assert only_noisy["noisy"] and "NOISY" in bench_peer.tables({"lora": only_noisy})


def test_errors_are_reported_not_hidden():
  failed = {"ours": {"error": "boom"}, "peer": _child(100.0, 2000, 0.1), "max_load": 2.0,
            "foreign_load": 0.1, "noisy": False}
  summary = bench_peer.summarize({"qlora": [failed]})["qlora"]
  assert summary["errors"] == ["boom"] and summary["tokens_ratio"] == []
  assert "boom" in bench_peer.tables({"qlora": summary})


def test_foreign_load_counts_other_processes_not_the_child(monkeypatch):
  """While a child ran 2 s: machine busy 3.5 CPU-s, the child (and we) 2.5: 0.5 cores foreign."""
  clock = {"wall": 0.0, "busy": 0.0, "own": 0.0}

  def fake_subprocess_run(cmd, **kwargs):
    clock["wall"] += 2.0
    clock["busy"] += 3.5
    clock["own"] += 2.5
    return types.SimpleNamespace(returncode=0, stdout='{"tokens_per_s": 1.0}\n', stderr="")

  monkeypatch.setattr(bench_peer.subprocess, "run", fake_subprocess_run)
  monkeypatch.setattr(bench_peer.time, "perf_counter", lambda: clock["wall"])
  monkeypatch.setattr(bench_peer, "_machine_busy_s", lambda: clock["busy"])
  monkeypatch.setattr(bench_peer, "_own_cpu_s", lambda: clock["own"])
  result = bench_peer._run_child("py", ["--ours", "lora"], 2, 10)
  assert result["foreign_load"] == pytest.approx(0.5)
  assert result["wall_s"] == 2.0


def test_machine_counters_move_with_our_own_work():
  busy0, own0 = bench_peer._machine_busy_s(), bench_peer._own_cpu_s()
  total = 0
  while bench_peer._own_cpu_s() - own0 < 0.3:
    total += sum(range(10_000))
  assert bench_peer._machine_busy_s() - busy0 >= 0.2  # our own CPU time is machine busy time


def test_gemma_rows_run_their_own_model_and_methods(monkeypatch):
  argvs = []
  monkeypatch.setattr(bench_peer, "_run_child",
                      lambda python, argv, threads, timeout: argvs.append(argv) or
                      _child(100.0, 2**30, 0.5))
  args = types.SimpleNamespace(warmup=1, timed=2, retries=0, threads=2, timeout=10,
                               peer_python="py", max_foreign=0.25, cool_down=0)
  bench_peer.run_round(args, "qlora", pathlib.Path("/w"), peer_first=False, model="gemma3-270m")
  assert [a[:3] for a in argvs] == [["--ours", "qlora", "--model"], ["--peer", "qlora", "--hf-dir"]]
  assert all(a[a.index("--model") + 1] == "gemma3-270m" for a in argvs)
  plan = bench_peer.plan_methods
  assert plan("smollm2", None) == {"smollm2": ["lora", "full", "qlora"]}
  assert plan("gemma3-270m", None) == {"gemma3-270m": ["lora", "qlora"]}
  assert plan("all", "full,lora") == {"smollm2": ["full", "lora"], "gemma3-270m": ["lora"]}
  with pytest.raises(SystemExit, match="no \\['full'\\] rows"):
    plan("gemma3-270m", "lora,full")
  with pytest.raises(SystemExit, match="unknown"):
    plan("all", "dora")
  with pytest.raises(SystemExit, match="choose from"):
    plan("llama", None)


def test_first_step_losses_are_shown_side_by_side():
  ours, peer = _child(200.0, 1000, 0.5), _child(100.0, 2000, 0.5)
  ours["losses"], peer["losses"] = [3.12346, 3.0], [3.12351, 3.0]
  pair = {"ours": ours, "peer": peer, "max_load": 0.5, "noisy": False}
  text = bench_peer.tables(bench_peer.summarize({"lora": [pair]}))
  assert "| 3.1235 / 3.1235 |" in text
  assert "| n/a |" in bench_peer.tables(bench_peer.summarize(
      {"lora": [{"ours": _child(1.0, 1, 0.5), "peer": _child(1.0, 1, 0.5), "max_load": 0.5,
                 "noisy": False}]}))


def test_results_keep_other_models_blocks():
  legacy = {"machine": {}, "results": {"lora": 1}}  # the file before per-model blocks
  merged, text = bench_peer.merge_results(legacy, "old smollm2 table\n",
                                          {"gemma3-270m": {"text": "gemma table", "summary": {}}})
  assert list(merged["models"]) == ["smollm2", "gemma3-270m"]
  assert merged["models"]["smollm2"]["results"] == {"lora": 1}
  assert text == "## SmolLM2-135M\n\nold smollm2 table\n\n## Gemma 3 270M\n\ngemma table\n"
  again, text = bench_peer.merge_results(merged, text, {"smollm2": {"text": "new smollm2"}})
  assert again["models"]["gemma3-270m"]["text"] == "gemma table"
  assert text.startswith("## SmolLM2-135M\n\nnew smollm2\n\n## Gemma 3 270M")
  fresh, text = bench_peer.merge_results(None, None, {"gemma3-270m": {"text": "g"}})
  assert list(fresh["models"]) == ["gemma3-270m"] and text == "## Gemma 3 270M\n\ng\n"


if __name__ == "__main__":
  pytest.main([__file__])


def test_gemma_step_donates_the_model_and_optimizer():
  """nnx.jit returns every variable of the model: undonated, each step held two models."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import peft_jax as pj  # pylint: disable=import-outside-toplevel
  from peft_jax.models import Gemma3Config, Gemma3ForCausalLM  # pylint: disable=import-outside-toplevel
  model = Gemma3ForCausalLM(Gemma3Config.tiny(num_hidden_layers=1,
                                              layer_types=("full_attention",)),
                            rngs=nnx.Rngs(0))
  pj.nnx.lora_transform(model, pj.LoRAConfig(rank=2, target_modules=("q_proj",)),
                        key=jax.random.key(0))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=pj.nnx.Adapter)
  frozen = model.model.layers[0].mlp.down_proj.kernel.get_value()
  ids = jnp.arange(8, dtype=jnp.int32)[None] + 3
  loss = bench_peer.gemma_train_step()(model, optimizer, ids, ids)
  assert jnp.isfinite(loss)
  assert frozen.is_deleted()  # its buffer went to the step's output: one model, not two
  assert not model.model.layers[0].mlp.down_proj.kernel.get_value().is_deleted()
