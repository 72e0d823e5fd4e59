"""``peft-jax``: fine-tune a Llama-family model with LoRA on a text.

With no arguments it runs ``peft-jax finetune`` on its embedded default: a
small reference Llama, the shipped Shakespeare excerpt (byte tokens), LoRA on
every linear layer, and reports held-out loss before and after.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import peft_jax as pj
from peft_jax import data, training
from peft_jax.models import LlamaConfig, LlamaForCausalLM, count_params, init_params

METHODS = ("lora", "rslora", "dora", "full")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="peft-jax", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command")
  ft = sub.add_parser("finetune", help="fine-tune with an adapter method (the default command)")
  ft.add_argument("--method", default="lora", choices=METHODS)
  ft.add_argument("--rank", type=int, default=16)
  ft.add_argument("--alpha", type=float, default=32.0)
  ft.add_argument("--targets", default="all-linear",
                  help="comma-separated module names, a regex, or 'all-linear'")
  ft.add_argument("--dropout", type=float, default=0.0)
  ft.add_argument("--lr", type=float, default=3e-3)
  ft.add_argument("--steps", type=int, default=150)
  ft.add_argument("--batch", type=int, default=8)
  ft.add_argument("--seq-len", type=int, default=128)
  ft.add_argument("--seed", type=int, default=0)
  ft.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ft.add_argument("--data", default=None, help="a .txt file or .jsonl with a 'text' field")
  ft.add_argument("--eval-batches", type=int, default=8)
  ft.add_argument("--output", default="runs/peft-jax", help="directory for the run summary")
  return parser


def _targets(spec: str):
  if spec == "all-linear" or any(c in spec for c in "*.()[]|"):
    return spec
  return tuple(s.strip() for s in spec.split(",") if s.strip())


def _progress(step, total, loss, tokens_per_s, start):
  elapsed = time.perf_counter() - start
  eta = elapsed / max(step, 1) * (total - step)
  width = 24
  filled = int(width * step / total)
  bar = "#" * filled + "-" * (width - filled)
  print(f"\r[{bar}] {step}/{total} loss {loss:.4f} {tokens_per_s:,.0f} tok/s ETA {eta:5.1f}s",
        end="", flush=True)


def finetune(args) -> dict:
  if args.steps <= 0 or args.batch <= 0 or args.seq_len <= 1:
    raise SystemExit("peft-jax: --steps, --batch must be positive and --seq-len > 1.")
  text = data.load_text(args.data)
  tokenizer = data.ByteTokenizer()
  tokens = np.asarray(tokenizer.encode(text), np.int32)
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  model_config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344,
                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=args.seq_len, dtype=dtype)
  model = LlamaForCausalLM(model_config)
  key = jax.random.key(args.seed)
  params = init_params(model_config, key)

  if args.method == "full":
    config, trainable, base = None, params, {}
  else:
    config = pj.LoRAConfig(rank=args.rank, alpha=args.alpha, target_modules=_targets(args.targets),
                           dropout=args.dropout, use_rslora=args.method == "rslora",
                           use_dora=args.method == "dora")
    adapted = pj.lora_transform(params, config, key=jax.random.fold_in(key, 1))
    trainable, base = pj.split(adapted)
  optimizer = optax.adamw(args.lr, weight_decay=0.0)
  state = training.init_train_state(trainable, optimizer)
  step_fn = training.make_train_step(model, config, optimizer)
  eval_loss = training.make_eval_loss(model, config)

  def evaluate(trainable):
    params = pj.combine(base, trainable) if base else trainable
    losses = [float(eval_loss(params, x, y)) for x, y in data.batches(
        tokens, args.batch, args.seq_len, seed=args.seed, split="eval", num_batches=args.eval_batches)]
    return float(np.mean(losses))

  n_trainable = count_params(trainable)
  n_total = count_params(params)
  print(f"peft-jax finetune: {args.method}, {n_trainable:,} trainable of {n_total:,} params "
        f"({100 * n_trainable / n_total:.2f}%), {len(tokens):,} tokens, device {jax.devices()[0].platform}")
  before = evaluate(state.trainable)
  print(f"held-out loss before: {before:.4f} (perplexity {np.exp(before):.2f})")
  train = data.batches(tokens, args.batch, args.seq_len, seed=args.seed + 1, split="train")
  start = time.perf_counter()
  first_step_s = None
  losses = []
  for i in range(args.steps):
    inputs, labels = next(train)
    state, loss = step_fn(state, base, inputs, labels, jax.random.fold_in(key, 100 + i))
    if i == 0:
      loss.block_until_ready()
      first_step_s = time.perf_counter() - start
      start = time.perf_counter()
    losses.append(loss)
    if (i + 1) % 10 == 0 or i + 1 == args.steps:
      loss_value = float(loss)  # blocks until this step is done, so the timing is real
      elapsed = time.perf_counter() - start
      tps = max(i, 1) * args.batch * args.seq_len / max(elapsed, 1e-9)
      _progress(i + 1, args.steps, loss_value, tps, start)
  print()
  train_s = time.perf_counter() - start
  after = evaluate(state.trainable)
  print(f"held-out loss after:  {after:.4f} (perplexity {np.exp(after):.2f})")
  summary = {
      "method": args.method, "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
      "trainable_params": n_trainable, "total_params": n_total,
      "eval_loss_before": before, "eval_loss_after": after,
      "train_loss_first": float(losses[0]), "train_loss_last": float(losses[-1]),
      "compile_and_first_step_s": first_step_s,
      "tokens_per_s": (args.steps - 1) * args.batch * args.seq_len / max(train_s, 1e-9),
      "config": config.to_dict() if config is not None else None,
  }
  out = pathlib.Path(args.output)
  out.mkdir(parents=True, exist_ok=True)
  (out / "summary.json").write_text(json.dumps(summary, indent=2))
  print(f"summary written to {out / 'summary.json'}")
  return summary


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
    argv = ["finetune", *argv]
  args = _parser().parse_args(argv)
  if args.command == "finetune":
    finetune(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
