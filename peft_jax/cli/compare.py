"""Every method side by side on the same model, tokens and batches.

:func:`compare_methods` builds each method's train step, compiles it ahead of
time (its ``memory_analysis`` gives the step's memory), then trains all of
them together, one step of each in turn (A B C A B C ...) so that drift of a
shared machine hits every method alike, and finally measures held-out loss
and the size of the saved checkpoint. :func:`comparison_table` prints the
result with every figure also as a ratio to full fine-tuning. Used by
``peft-jax compare`` and ``benchmarks/bench_methods.py``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from peft_jax import training
from peft_jax.cli import finetune as ft
from peft_jax.models import count_params


def step_memory(compiled) -> dict[str, int] | None:
  """``compiled.memory_analysis()`` with ``step_bytes = args + temps + outputs - aliased``."""
  try:
    m = compiled.memory_analysis()
    out = {"argument_bytes": int(m.argument_size_in_bytes),
           "output_bytes": int(m.output_size_in_bytes),
           "temp_bytes": int(m.temp_size_in_bytes),
           "alias_bytes": int(m.alias_size_in_bytes)}
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    return None
  out["step_bytes"] = (out["argument_bytes"] + out["temp_bytes"] + out["output_bytes"]
                       - out["alias_bytes"])
  return out


@dataclasses.dataclass
class _Runner:
  """One method's compiled step and evolving state."""

  name: str
  setup: ft.MethodSetup
  compiled: Any
  state: training.TrainState
  memory: dict[str, int] | None
  compile_s: float
  losses: list[float] = dataclasses.field(default_factory=list)
  seconds: list[float] = dataclasses.field(default_factory=list)


def _runner(name: str, hp: ft.Hyperparameters, model: ft.LoadedModel, sample, dtype: str
            ) -> _Runner:
  hp = dataclasses.replace(hp, method=name, lr=ft.DEFAULT_LR[name] if hp.lr is None else hp.lr,
                           nf4_embedding=hp.nf4_embedding and name == "qlora")
  hp.validate()
  setup = ft.build_method(hp, model, dtype=dtype)
  step = training.make_train_step(model.module, setup.config, setup.optimizer,
                                  loss_fn=setup.loss_fn)
  state = training.init_train_state(setup.trainable, setup.optimizer)
  t0 = time.perf_counter()
  compiled = step.lower(state, setup.base, *sample, jax.random.key(0)).compile()
  return _Runner(name, setup, compiled, state, step_memory(compiled), time.perf_counter() - t0)


def compare_methods(model: ft.LoadedModel, tokens: np.ndarray, methods: Sequence[str],
                    hp: ft.Hyperparameters, *, batch: int, seq_len: int, steps: int,
                    eval_batches: int, dtype: str = "float32", verbose: bool = True
                    ) -> list[dict[str, Any]]:
  """Trains every method for ``steps`` steps on the same batches; measures each.

  Args:
    model: the loaded model (shared, not modified).
    tokens: the token stream (train and held-out splits come from it).
    methods: names from :data:`peft_jax.cli.finetune.METHODS`.
    hp: shared hyperparameters; ``hp.lr=None`` uses each method's default.
    batch, seq_len: the batch shape.
    steps: training steps per method (step 0 is warm-up, not timed).
    eval_batches: held-out batches for the loss after training.
    dtype: compute dtype (QLoRA's too).
    verbose: print one line per method as it compiles and finishes.

  Returns:
    One dict per method (in ``methods`` order) with ``trainable_params``,
    ``step_memory`` (from ``memory_analysis``), ``median_step_s`` (and min,
    max), ``tokens_per_s``, ``checkpoint_bytes``, ``eval_loss_after``,
    ``train_losses`` and ``compile_s``.
  """
  hp = dataclasses.replace(hp, steps=steps)
  sample = next(ft.model_batches(model, tokens, batch, seq_len, seed=hp.seed + 1,
                                 split="train"))
  runners = []
  for name in methods:
    runners.append(_runner(name, hp, model, sample, dtype))
    if verbose:
      print(f"  compiled {name} in {runners[-1].compile_s:.1f}s", flush=True)
  key = jax.random.fold_in(jax.random.key(hp.seed), 2)
  train = ft.model_batches(model, tokens, batch, seq_len, seed=hp.seed + 1, split="train")
  for i in range(steps):
    inputs, labels = next(train)
    for r in runners:  # interleaved: the same batch for every method, back to back
      t0 = time.perf_counter()
      r.state, loss = r.compiled(r.state, r.setup.base, inputs, labels, jax.random.fold_in(key, i))
      r.losses.append(float(loss))
      r.seconds.append(time.perf_counter() - t0)
    if verbose:
      print(f"  step {i + 1}/{steps}: " + ", ".join(
          f"{r.name} {r.losses[-1]:.3f}" for r in runners), flush=True)
  return [_measure(r, model, tokens, batch, seq_len, eval_batches, hp.seed) for r in runners]


def _measure(r: _Runner, model, tokens, batch, seq_len, eval_batches, seed) -> dict[str, Any]:
  timed = r.seconds[1:] or r.seconds
  median = statistics.median(timed)
  after = ft.evaluate(model, r.setup, r.state.trainable, tokens, batch=batch, seq_len=seq_len,
                      num_batches=eval_batches, seed=seed)
  with tempfile.TemporaryDirectory() as tmp:
    saved, _ = ft.save_result(pathlib.Path(tmp), r.setup, r.state)
    size = ft.dir_bytes(saved)
  return {
      "method": r.name, "trainable_params": count_params(r.setup.trainable),
      "step_memory": r.memory, "compile_s": r.compile_s,
      "median_step_s": median, "min_step_s": min(timed), "max_step_s": max(timed),
      "raw_step_s": r.seconds, "tokens_per_s": batch * seq_len / median,
      "checkpoint_bytes": size, "eval_loss_after": after, "train_losses": r.losses,
  }


def _ratio(row, base, key) -> str:
  if base is None or not base.get(key) or row.get(key) is None:
    return ""
  return f" ({row[key] / base[key]:.2f}x)"


def _mem(row) -> float | None:
  return row["step_memory"]["step_bytes"] if row.get("step_memory") else None


def comparison_table(rows: Sequence[dict[str, Any]], baseline: str = "full") -> str:
  """A markdown table of :func:`compare_methods`' rows, ratios to ``baseline`` in brackets."""
  base = next((r for r in rows if r["method"] == baseline), None)
  header = ["Method", "Trainable params", "Step memory (MiB)", "Step time (ms)", "Tokens/s",
            "Checkpoint (MiB)", "Held-out loss"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    mem = _mem(row)
    base_mem = {"m": _mem(base)} if base else None
    cells = [
        row["method"],
        f"{row['trainable_params']:,}{_ratio(row, base, 'trainable_params')}",
        ("n/a" if mem is None else f"{mem / 2**20:.0f}") + _ratio({"m": mem}, base_mem, "m"),
        f"{row['median_step_s'] * 1e3:.0f}{_ratio(row, base, 'median_step_s')}",
        f"{row['tokens_per_s']:,.0f}{_ratio(row, base, 'tokens_per_s')}",
        f"{row['checkpoint_bytes'] / 2**20:.2f}{_ratio(row, base, 'checkpoint_bytes')}",
        f"{row['eval_loss_after']:.3f}{_ratio(row, base, 'eval_loss_after')}",
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
