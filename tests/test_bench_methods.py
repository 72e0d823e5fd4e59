"""benchmarks/bench_methods.py: the Gemma 3 block, through the command line's model path."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from peft_jax.models import count_params

_PATH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_methods.py"
_SPEC = importlib.util.spec_from_file_location("bench_methods", _PATH)
bench_methods = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_methods)
C = bench_methods.C
LABELS = {name: label for name, (label, _) in bench_methods.MODELS.items()}


def test_results_keep_other_models_blocks():
  legacy = {"model": "smollm2", "rows": [{"method": "full"}]}
  merged, text = C.merge_model_blocks(legacy, "old smollm2 table\n",
                                      {"gemma3-270m": {"text": "gemma table"}}, LABELS)
  assert list(merged["models"]) == ["smollm2", "gemma3-270m"]
  assert merged["models"]["smollm2"]["rows"] == [{"method": "full"}]
  assert text == "## SmolLM2-135M\n\nold smollm2 table\n\n## Gemma 3 270M\n\ngemma table\n"
  again, text = C.merge_model_blocks(merged, text, {"smollm2": {"text": "new"}}, LABELS)
  assert again["models"]["gemma3-270m"] == {"text": "gemma table"}
  assert text.index("new") < text.index("gemma table") and "old" not in text


def test_all_writes_one_block_per_model_as_each_finishes(tmp_path, monkeypatch):
  written = []

  def fake_measure(args, name):
    written.append(json.loads(tmp_path.joinpath("m.json").read_text())["models"]
                   if tmp_path.joinpath("m.json").exists() else {})
    return {"model": name, "text": f"{name} rows"}

  monkeypatch.setattr(bench_methods, "measure", fake_measure)
  bench_methods.main(["--model", "all", "--quick", "--out", str(tmp_path / "m")])
  assert written == [{}, {"smollm2": {"model": "smollm2", "text": "smollm2 rows"}}]
  assert list(json.loads((tmp_path / "m.json").read_text())["models"]) == ["smollm2",
                                                                         "gemma3-270m"]


def test_quick_gemma_block_runs_the_cli_model_and_keeps_smollm2(tmp_path, monkeypatch, capsys):
  stem = tmp_path / "methods"
  stem.with_suffix(".json").write_text(json.dumps({"model": "smollm2", "rows": []}))
  stem.with_suffix(".md").write_text("smollm2 table\n")
  loaded, load_model = [], bench_methods.ft.load_model

  def spy(name, **kw):
    loaded.append(name)
    return load_model(name, **kw)

  monkeypatch.setattr(bench_methods.ft, "load_model", spy)
  bench_methods.main(["--model", "gemma3-270m", "--quick", "--methods", "lora", "--batch", "2",
                      "--seq-len", "16", "--eval-batches", "1", "--out", str(stem)])
  assert loaded == ["gemma3-tiny"]  # the CLI's own loader: the NNX model behind cli/gemma.py
  blocks = json.loads(stem.with_suffix(".json").read_text())["models"]
  assert blocks["smollm2"]["rows"] == [] and blocks["gemma3-270m"]["model"] == "gemma3-tiny"
  (row,) = blocks["gemma3-270m"]["rows"]  # one method keeps the default run short
  total = count_params(bench_methods.ft.load_model("gemma3-tiny").params)
  assert row["method"] == "lora" and len(row["train_losses"]) == 3
  assert 0 < row["trainable_params"] < total / 4 and 0 < row["checkpoint_bytes"] < 2**20
  assert row["step_memory"]["step_bytes"] > 0 and np.isfinite(row["eval_loss_after"])
  assert blocks["gemma3-270m"]["load_average_start"] is not None
  md = stem.with_suffix(".md").read_text()
  assert md.index("## SmolLM2-135M") < md.index("smollm2 table") < md.index("## Gemma 3 270M")
  assert "| lora |" in md and "Load average at the start" in md
  assert "## Gemma 3 270M" in capsys.readouterr().out


@pytest.mark.slow  # one more train-step compile; the default run covers the model path above
def test_rss_child_trains_the_gemma_model(capsys):
  bench_methods.main(["--child", "lora", "--model", "gemma3-270m", "--quick", "--batch", "2",
                      "--seq-len", "16"])
  result = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert result["method"] == "lora" and result["model"] == "gemma3-tiny"
  assert result["peak_rss_bytes"] >= result["rss_after_load_bytes"] > 0


def test_rss_only_adds_the_children_to_the_stored_block(tmp_path, monkeypatch):
  rows = [{"method": m, "trainable_params": n, "step_memory": {"step_bytes": 2**20 * n},
           "median_step_s": 1.0, "tokens_per_s": 8.0, "checkpoint_bytes": 2**20,
           "eval_loss_after": 3.0} for m, n in (("full", 4), ("lora", 1))]
  block = {"machine": C.machine_info(), "model": "gemma3-270m", "steps": 4, "batch": 3,
           "seq_len": 32, "eval_loss_base": 4.0, "rows": rows, "peak_rss": {}}
  stem = tmp_path / "methods"
  bench_methods.write_block(stem, "gemma3-270m", {**block, "text": "no rss yet"})
  calls = []

  def fake_rss(args, name, methods):
    calls.append((name, methods, args.batch, args.seq_len))
    return {m: {"peak_rss_bytes": 2**30 * (i + 1)} for i, m in enumerate(["none", "lora", "full"])}

  monkeypatch.setattr(bench_methods, "rss_per_method", fake_rss)
  bench_methods.main(["--model", "gemma3-270m", "--rss-only", "--out", str(stem)])
  assert calls == [("gemma3-270m", ["full", "lora"], 3, 32)]  # the block's methods and shape
  stored = json.loads(stem.with_suffix(".json").read_text())["models"]["gemma3-270m"]
  assert stored["rows"] == rows and stored["peak_rss"]["full"]["peak_rss_bytes"] == 3 * 2**30
  assert "| lora | 2048.0 MiB | 0.67x |" in stored["text"] and "in their own run" in stored["text"]
  assert "no rss yet" not in stem.with_suffix(".md").read_text()


def _part(key, seconds, ref_seconds=None, rss=2**30, steps=4):
  row = {"method": key, "trainable_params": {"full": 8}.get(key, 2),
         "step_memory": {"step_bytes": 2**20 * (8 if key == "full" else 2)},
         "median_step_s": seconds, "tokens_per_s": 1.0, "checkpoint_bytes": 2**20,
         "eval_loss_after": 3.0, "label": bench_methods.VARIANTS.get(key, (0, 0, key))[2]}
  part = {"key": key, "model": "gemma3-270m", "steps": steps, "solo_steps": 2, "batch": 4,
          "seq_len": 64, "hyperparameters": {}, "row": row, "eval_loss_base": None,
          "peak_rss": {"method": key, "rss_after_load_bytes": 2**29, "peak_rss_bytes": rss},
          "load_average_start": [5.0, 5.0, 5.0], "machine": C.machine_info()}
  if ref_seconds is not None:
    part["reference"] = {"method": "lora", "ratio": seconds / ref_seconds}
  return part


def test_merge_assembles_one_process_per_method_with_ratios_chained_through_lora(tmp_path):
  """``--one`` parts -> one block: time / full = (M / lora) / (full / lora), RSS per process."""
  parts = tmp_path / "parts" / "gemma3-270m"
  for key, part in {"lora": _part("lora", 9.0), "full": _part("full", 6.0, 3.0, rss=4 * 2**30),
                    "qlora-nf4emb": _part("qlora-nf4emb", 5.0, 4.0)}.items():
    C.write_json(parts / f"{key}.json", {**part, "commit": "abc1234+"} if key == "full" else part)
  stem = tmp_path / "methods"
  stem.with_suffix(".json").write_text(json.dumps({"models": {"smollm2": {"text": "kept"}}}))
  bench_methods.main(["--model", "gemma3-270m", "--merge", "--parts", str(tmp_path / "parts"),
                      "--out", str(stem)])
  block = json.loads(stem.with_suffix(".json").read_text())["models"]["gemma3-270m"]
  rows = {r["method"]: r for r in block["rows"]}
  assert [r["method"] for r in block["rows"]] == ["full", "lora", "qlora-nf4emb"]
  assert rows["full"]["time_vs_full"] == 1.0 and rows["lora"]["time_vs_full"] == 0.5
  assert rows["qlora-nf4emb"]["time_vs_full"] == 1.25 / 2.0
  text = block["text"]
  assert "| qlora + NF4 embedding |" in text and "| 0.62x |" in text and "1,024 (0.25x)" in text
  assert "Not measured in this block: dora, qlora, loraplus, galore, lisa, adalora." in text
  assert text.count("| abc1234+, ") == 1 and text.count("| ?, ") == 2  # each row's own commit
  assert "kept" in stem.with_suffix(".md").read_text()
  C.write_json(parts / "dora.json", _part("dora", 1.0, 1.0, steps=6))  # another schedule
  with pytest.raises(SystemExit, match="differ in steps"):
    bench_methods.main(["--model", "gemma3-270m", "--merge", "--parts", str(tmp_path / "parts"),
                        "--out", str(stem)])


@pytest.mark.slow  # two train-step compiles (the method and its lora reference)
def test_one_writes_a_part_with_the_reference_in_the_same_process(tmp_path):
  bench_methods.main(["--model", "gemma3-270m", "--quick", "--one", "qlora-nf4emb", "--parts",
                      str(tmp_path), "--batch", "2", "--seq-len", "16", "--eval-batches", "1"])
  part = json.loads((tmp_path / "gemma3-270m" / "qlora-nf4emb.json").read_text())
  assert part["row"]["method"] == "qlora-nf4emb" and len(part["row"]["train_losses"]) == 3
  assert part["reference"]["method"] == "lora" and len(part["reference"]["step_ratios"]) == 1
  assert part["peak_rss"]["peak_rss_bytes"] >= part["peak_rss"]["rss_after_load_bytes"] > 0
