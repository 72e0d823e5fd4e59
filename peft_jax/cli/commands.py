"""``peft-jax generate``, ``merge``, ``export-hf`` and ``compare``.

A *run directory* is what ``peft-jax finetune`` writes: ``summary.json``
(which model, seed and dtype) and either ``adapter/`` (an Orbax adapter
checkpoint) or ``params/`` (full params, for full fine-tuning, GaLore and
LISA). Commands accept the run directory or the ``adapter/`` folder itself;
a bare adapter checkpoint without a summary works too, with ``--model``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import peft_jax as pj
from peft_jax import checkpoint
from peft_jax.checkpoint import untrusted
from peft_jax.cli import compare as compare_lib
from peft_jax.cli import finetune as ft
from peft_jax.cli import gemma as gemma_lib
from peft_jax.models import params_scanned_to_unrolled


class Run(NamedTuple):
  """A resolved run directory.

  Attributes:
    adapter_dir: the Orbax adapter checkpoint, or ``None``.
    params_dir: the full-params checkpoint, or ``None``.
    summary: ``summary.json``'s contents (``{}`` when there is none).
  """

  adapter_dir: pathlib.Path | None
  params_dir: pathlib.Path | None
  summary: dict[str, Any]


def _summary(directory: pathlib.Path) -> dict[str, Any]:
  path = directory / ft.SUMMARY_FILE
  if not path.is_file():
    return {}
  try:  # a file: its fields are checked before any is used
    summary = untrusted.require_dict(path, "summary", untrusted.read_json(path))
    for name in ("model", "dtype"):
      if name in summary:
        untrusted.require_str(path, name, summary[name])
    if "seed" in summary:
      untrusted.require_int(path, "seed", summary["seed"], low=-2**63, high=2**63)
  except ValueError as error:
    raise ft.CliError(str(error)) from None
  return summary


def resolve_run(path: str) -> Run:
  """Finds the adapter (or params) and summary of a run directory or adapter folder.

  Raises:
    ft.CliError: nothing there, or no checkpoint in it.
  """
  directory = pathlib.Path(path)
  if not directory.exists():
    raise ft.CliError(f"no adapter or run directory at {directory}.")
  for run_dir in (directory, directory.parent):
    summary = _summary(run_dir)
    if (run_dir / ft.ADAPTER_DIR).is_dir() and directory in (run_dir, run_dir / ft.ADAPTER_DIR):
      return Run(run_dir / ft.ADAPTER_DIR, None, summary)
    if (run_dir / ft.PARAMS_DIR).is_dir() and directory in (run_dir, run_dir / ft.PARAMS_DIR):
      return Run(None, run_dir / ft.PARAMS_DIR, summary)
  if not (directory / "_CHECKPOINT_METADATA").exists() and not any(directory.glob("*.json")):
    raise ft.CliError(f"{directory} holds no peft-jax checkpoint (expected {ft.ADAPTER_DIR}/, "
                      f"{ft.PARAMS_DIR}/ or an Orbax adapter checkpoint).")
  return Run(directory, None, {})


def _model_for(args, run: Run | None) -> ft.LoadedModel:
  summary = run.summary if run else {}
  name = args.model if args.model_given else summary.get("model", args.model)
  dtype = summary.get("dtype", args.dtype) if not args.dtype_given else args.dtype
  seed = summary.get("seed", args.seed) if not args.seed_given else args.seed
  return ft.load_model(name, dtype=dtype, seed=seed, fallback=False)


def load_adapted(args, run: Run, model: ft.LoadedModel) -> tuple[dict, pj.LoRAConfig | None]:
  """``(params, config)`` of ``run`` on ``model``: base + adapters, or the full params.

  Raises:
    ft.CliError: the checkpoint is unreadable or does not fit the model.
  """
  if run.params_dir is not None:
    try:
      params = checkpoint.restore_params(run.params_dir)
    except (FileNotFoundError, ValueError) as error:
      raise ft.CliError(f"cannot read params at {run.params_dir}: {error}") from None
    _check_same_shapes(params, model)
    return params, None
  try:
    adapters, config = checkpoint.restore(run.adapter_dir, model.params, layouts=model.layouts)
  except FileNotFoundError as error:
    raise ft.CliError(f"no finished adapter checkpoint at {run.adapter_dir}: {error}") from None
  except untrusted.FileFormatError as error:
    raise ft.CliError(f"cannot read the adapter at {run.adapter_dir}: {error}") from None
  except ValueError as error:
    raise ft.CliError(f"the adapter at {run.adapter_dir} does not fit the {model.name} model: "
                      f"{error}") from None
  base = model.params
  if isinstance(config, pj.QLoRAConfig):  # trained on the 4-bit base: run it on that
    base = pj.quantize(base, config.quant_spec(), target_modules=config.quantize_modules)
  return pj.combine(base, adapters), config


def _check_same_shapes(params, model: ft.LoadedModel) -> None:
  got = jax.tree.map(jnp.shape, params)
  want = jax.tree.map(jnp.shape, model.params)
  if got != want:
    raise ft.CliError(f"the params checkpoint does not fit the {model.name} model "
                      "(different tree or shapes).")


# ----------------------------------------------------------------------------- generate


def greedy_generate(model: ft.LoadedModel, params, config, prompt_ids: np.ndarray,
                    max_new_tokens: int) -> np.ndarray:
  """Greedy decoding: the ids that follow ``prompt_ids`` (stops at EOS).

  The whole sequence lives in one fixed-length buffer, so one compiled
  forward pass serves every position (causal attention ignores the padding).
  """
  total = len(prompt_ids) + max_new_tokens
  buffer = np.zeros((1, total), np.int32)
  buffer[0, :len(prompt_ids)] = prompt_ids

  @jax.jit
  def next_token(params, buffer, position):
    with pj.intercept(config):
      logits = model.module.apply({"params": params}, buffer)
    return jnp.argmax(logits[0, position - 1])

  new = []
  for position in range(len(prompt_ids), total):
    token = int(next_token(params, buffer, position))
    if model.eos_token_id is not None and token == model.eos_token_id:
      break
    buffer[0, position] = token
    new.append(token)
  return np.asarray(new, np.int32)


def run_generate(args) -> str:
  """``peft-jax generate``: greedy completion of ``--prompt``, printed and returned."""
  if args.max_tokens <= 0:
    raise ft.CliError(f"--max-tokens must be > 0, got {args.max_tokens}.")
  run = resolve_run(args.adapter) if args.adapter else None
  model = _model_for(args, run)
  params, config = (load_adapted(args, run, model) if run else (model.params, None))
  prompt_ids = np.asarray(model.tokenizer.encode(args.prompt), np.int32)
  if prompt_ids.size == 0:
    raise ft.CliError("--prompt is empty.")
  completion = model.tokenizer.decode(
      greedy_generate(model, params, config, prompt_ids, args.max_tokens))
  print(args.prompt + completion)
  return completion


# ----------------------------------------------------------------------------- merge, export


def _require_adapter(run: Run, what: str) -> None:
  if run.adapter_dir is None:
    raise ft.CliError(f"{run.params_dir} holds full params (no adapter) — nothing to {what}.")


_HF_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


def _check_merge_output(out: pathlib.Path, fmt: str, overwrite: bool) -> None:
  """``--output`` must be new or empty, or (with ``--overwrite``) a checkpoint of that format."""
  if not out.exists() or (out.is_dir() and not any(out.iterdir())):
    return
  ours = (checkpoint.is_peft_jax_checkpoint(out) if fmt != "hf"
          else out.is_dir() and (out / "config.json").is_file()
          and any((out / n).is_file() for n in _HF_FILES[1:]))
  if not overwrite:
    raise ft.CliError(f"--output {out} exists; pass --overwrite to replace it.")
  if not ours:
    raise ft.CliError(f"--output {out} is not a {fmt} checkpoint written by peft-jax; "
                      "refusing to replace it (choose a new or empty folder).")


def run_merge(args) -> pathlib.Path:
  """``peft-jax merge``: folds the adapter into the base; writes Orbax params or HF safetensors."""
  run = resolve_run(args.adapter)
  _require_adapter(run, "merge")
  out = pathlib.Path(args.output)
  _check_merge_output(out, args.format, args.overwrite)  # before any loading
  model = _model_for(args, run)
  params, config = load_adapted(args, run, model)
  merged = pj.merge(params, config, layouts=model.layouts)
  if args.format == "hf" and model.name in gemma_lib.MODELS:
    try:
      gemma_lib.save_hf(out, model.config, merged)
    except ValueError as error:
      raise ft.CliError(f"cannot write {out}: {error}") from None
    if hasattr(model.tokenizer, "save"):
      model.tokenizer.save(out)
  elif args.format == "hf":
    from peft_jax.models import hf_checkpoint  # pylint: disable=import-outside-toplevel
    unrolled = dataclasses.replace(model.config, scan_layers=False)
    hf_checkpoint.save_hf_checkpoint(out, unrolled, params_scanned_to_unrolled(merged))
    if hasattr(model.tokenizer, "save"):
      model.tokenizer.save(out)
  else:
    checkpoint.save_params(out, merged, overwrite=args.overwrite)
  print(f"merged {model.name} + {run.adapter_dir} written to {out} ({args.format})")
  return out


def run_export_hf(args) -> dict[str, Any]:
  """``peft-jax export-hf``: the adapter as a Hugging Face PEFT directory."""
  run = resolve_run(args.adapter)
  _require_adapter(run, "export")
  try:
    adapters, config = checkpoint.restore(run.adapter_dir)
  except (FileNotFoundError, ValueError) as error:
    raise ft.CliError(f"cannot read the adapter at {run.adapter_dir}: {error}") from None
  base = {"smollm2": ft.SMOLLM2_HUB_ID, "gemma3-270m": gemma_lib.HUB_ID}.get(
      run.summary.get("model", "smollm2"))
  try:
    written = pj.export_peft(args.output, adapters, config, base_model_name_or_path=base)
  except ValueError as error:
    raise ft.CliError(f"cannot export {run.adapter_dir}: {error}") from None
  targets = written.get("target_modules")
  described = f"{len(targets)} modules" if isinstance(targets, list) else "modules matching a regex"
  print(f"Hugging Face PEFT adapter written to {args.output} (r={written.get('r')}, {described})")
  return written


# ----------------------------------------------------------------------------- compare


def run_compare(args) -> list[dict[str, Any]]:
  """``peft-jax compare``: every chosen method on a short schedule, as one table."""
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = [m for m in methods if m not in ft.METHODS]
  if unknown or not methods:
    raise ft.CliError(f"unknown method(s) {', '.join(unknown) or '(none)'}; choose from "
                      f"{', '.join(ft.METHODS)}.")
  hp = ft.hyperparameters_from_args(args)
  hp = dataclasses.replace(hp, lr=args.lr)  # None: each method's default learning rate
  dataclasses.replace(hp, lr=1.0 if args.lr is None else args.lr).validate()
  model = ft.load_model(args.model, dtype=args.dtype, seed=args.seed,
                        fallback=not args.model_given)
  tokens = ft.load_tokens(model, args.data)
  ft.check_windows(tokens, args.batch, args.seq_len)
  print(f"peft-jax compare: {model.name}, {len(methods)} methods x {args.steps} steps of "
        f"{args.batch} x {args.seq_len}")
  rows = compare_lib.compare_methods(model, tokens, methods, hp, batch=args.batch,
                                     seq_len=args.seq_len, steps=args.steps,
                                     eval_batches=args.eval_batches, dtype=args.dtype)
  print(compare_lib.comparison_table(rows))
  if args.output:
    out = pathlib.Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": model.name, "rows": rows}, indent=1, default=str))
  return rows
