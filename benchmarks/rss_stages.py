"""Where one method's process spends its memory: RSS at each stage, in one process.

Loads the model as ``bench_methods.py`` does, then builds the method
(``lora_transform`` and split), its train state, lowers and compiles the
train step, and runs two steps, printing ``VmRSS`` and ``VmHWM``
(``/proc/self/status``) after each stage and the compiled step's
``memory_analysis()``: peak RSS read against the plan, stage by stage.
Linux only (``/proc``). Usage::

    python benchmarks/rss_stages.py --model gemma3-270m --method dora
    python benchmarks/rss_stages.py --model gemma3-tiny --method lora   # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import pathlib
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_methods as B  # noqa: E402  pylint: disable=wrong-import-position

from peft_jax import training  # noqa: E402
from peft_jax.cli import finetune as ft  # noqa: E402


def _status() -> dict[str, float]:
  """``VmRSS`` and ``VmHWM`` in MiB."""
  out = {}
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith(("VmRSS", "VmHWM")):
        key, value = line.split(":")
        out[key] = int(value.split()[0]) / 1024
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="gemma3-tiny")
  parser.add_argument("--method", default="lora", choices=ft.METHODS)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=64)
  args = parser.parse_args(argv)
  start = time.perf_counter()

  def mark(label: str) -> None:
    s = _status()
    print(f"[{time.perf_counter() - start:7.1f}s] {label:30s} RSS {s['VmRSS']:8.0f} "
          f"HWM {s['VmHWM']:8.0f} MiB", flush=True)

  mark("start")
  model = B.load(args.model)
  tokens = ft.load_tokens(model, None)
  mark("load")
  hp = dataclasses.replace(B.hyperparameters(3), method=args.method,
                           lr=ft.DEFAULT_LR[args.method])
  train = ft.model_batches(model, tokens, args.batch, args.seq_len, seed=hp.seed + 1,
                           split="train")
  batches = [next(train) for _ in range(2)]
  setup = ft.build_method(hp, model)
  jax.block_until_ready(setup.trainable)
  mark("build (transform + split)")
  step = training.make_train_step(model.module, setup.config, setup.optimizer,
                                  loss_fn=setup.loss_fn)
  state = training.init_train_state(setup.trainable, setup.optimizer)
  jax.block_until_ready(state)
  mark("init_train_state")
  lowered = step.lower(state, setup.base, *batches[0], jax.random.key(0))
  mark("lower")
  compiled = lowered.compile()
  mark("compile")
  plan = compiled.memory_analysis()
  print("plan MiB: arguments %.0f, outputs %.0f, temporaries %.0f, aliased %.0f" % tuple(
      x / 2**20 for x in (plan.argument_size_in_bytes, plan.output_size_in_bytes,
                          plan.temp_size_in_bytes, plan.alias_size_in_bytes)), flush=True)
  del lowered
  gc.collect()
  for i, batch in enumerate(batches):
    state, loss = compiled(state, setup.base, *batch, jax.random.key(i))
    mark(f"step {i} (loss {float(loss):.4f})")


if __name__ == "__main__":
  main()
