"""``peft-jax``: fine-tune SmolLM2-135M or Gemma 3 270M (or a tiny demo model) with any PEFT method.

With no arguments it runs ``peft-jax finetune``: LoRA on SmolLM2-135M over the
shipped Shakespeare excerpt for a short schedule, held-out perplexity before
and after, the adapter saved with Orbax and a JSON run summary.

Commands:
  finetune   train with --method lora | rslora | dora | qlora | loraplus |
             galore | lisa | adalora | full (the default command)
  generate   greedy completion of --prompt, with or without --adapter
  merge      fold an adapter into the base; write Orbax params or HF safetensors
  export-hf  write an adapter in the Hugging Face PEFT format
  compare    every chosen method side by side on a short schedule

User errors (a missing file, an adapter that does not fit the model, an
unknown method, bad hyperparameters, a bad --output) exit with status 2 and
one line on stderr, before any training. A training loss that becomes NaN or
infinite stops finetune with status 2 (the last good adapter saved). Ctrl-C
during finetune saves the adapter and a resumable checkpoint and exits with
status 130; rerun the same command with --resume to continue.
"""

from __future__ import annotations

import argparse
import sys

from peft_jax import validation
from peft_jax.cli import commands
from peft_jax.cli import finetune as ft

_COMMANDS = ("finetune", "generate", "merge", "export-hf", "compare")
# Options whose "was it given?" matters: a run's summary fills them otherwise.
_REMEMBERED = {"model": "smollm2", "dtype": "float32", "seed": 0}


class _Parser(argparse.ArgumentParser):
  """Reports a usage error as one line on stderr (status 2), like every user error."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} -h)\n")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model", choices=ft.MODELS, default=None,
                      help="smollm2 (pretrained SmolLM2-135M, default), tiny (random-init Llama), "
                           "gemma3-270m (pretrained Gemma 3 270M, Flax NNX) or gemma3-tiny "
                           "(random-init Gemma 3)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                      help="params and compute dtype (default float32)")
  parser.add_argument("--seed", type=int, default=None, help="random seed (default 0)")


def _add_training_options(parser: argparse.ArgumentParser, *, steps: int, batch: int,
                          seq_len: int, eval_batches: int) -> None:
  _add_model_options(parser)
  parser.add_argument("--rank", type=int, default=16, help="adapter rank (default 16)")
  parser.add_argument("--alpha", type=float, default=32.0, help="adapter alpha (default 32)")
  parser.add_argument("--targets", default="all-linear",
                      help="'all-linear', comma-separated module names, or a regex")
  parser.add_argument("--dropout", type=float, default=0.0)
  parser.add_argument("--modules-to-save", default=None,
                      help="comma-separated modules trained in full (PEFT's modules_to_save)")
  parser.add_argument("--bias", choices=("none", "lora_only", "all"), default="none",
                      help="which biases train (PEFT's bias option; default none)")
  parser.add_argument("--ensure-weight-tying", action="store_true",
                      help="tied embeddings: one trained copy (or LoRA) of the table serves the "
                           "input and the head (PEFT's ensure_weight_tying)")
  parser.add_argument("--lr", type=float, default=None,
                      help="learning rate (default per method: 1e-3 adapters, 2e-4 LoRA+, "
                           "1e-4 GaLore, 5e-5 LISA and full)")
  parser.add_argument("--weight-decay", type=float, default=0.0)
  parser.add_argument("--steps", type=int, default=steps)
  parser.add_argument("--batch", type=int, default=batch)
  parser.add_argument("--seq-len", type=int, default=seq_len)
  parser.add_argument("--eval-batches", type=int, default=eval_batches)
  parser.add_argument("--data", default=None,
                      help="a .txt file, or .jsonl with a 'text' field (default: Shakespeare)")
  parser.add_argument("--loraplus-ratio", type=float, default=16.0, help="LoRA+ lr_B / lr_A")
  parser.add_argument("--galore-rank", type=int, default=64)
  parser.add_argument("--galore-update-gap", type=int, default=200)
  parser.add_argument("--lisa-layers", type=int, default=2)
  parser.add_argument("--lisa-interval", type=int, default=10)
  parser.add_argument("--nf4-embedding", action="store_true",
                      help="QLoRA: store the token embedding (and a tied head) in NF4 too")


def build_parser() -> argparse.ArgumentParser:
  """The ``peft-jax`` argument parser."""
  parser = _Parser(
      prog="peft-jax", description=__doc__.replace("``", ""),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")

  finetune = sub.add_parser("finetune", help="fine-tune (the default command)")
  _add_training_options(finetune, steps=30, batch=4, seq_len=64, eval_batches=4)
  finetune.add_argument("--method", default="lora", choices=ft.METHODS)
  finetune.add_argument("--output", default="runs/peft-jax",
                        help="run directory: adapter/ (or params/) and summary.json")
  finetune.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in --output (same options)")
  finetune.add_argument("--save-every", type=int, default=0,
                        help="also save the adapter and a resumable checkpoint every N "
                             "steps (default 0: only on Ctrl-C or a non-finite loss)")
  finetune.add_argument("--mesh", default=None,
                        help="shard over a device mesh, e.g. data=2,fsdp=2,tp=2 (sizes must "
                             "multiply to jax.device_count(); see README 'Scaling out')")

  generate = sub.add_parser("generate", help="greedy completion, optionally with an adapter")
  _add_model_options(generate)
  generate.add_argument("--prompt", default="To be, or not to be,")
  generate.add_argument("--max-tokens", type=int, default=32)
  generate.add_argument("--adapter", default=None, help="run directory or adapter checkpoint")

  merge = sub.add_parser("merge", help="fold an adapter into the base model")
  _add_model_options(merge)
  merge.add_argument("--adapter", required=True, help="run directory or adapter checkpoint")
  merge.add_argument("--output", required=True)
  merge.add_argument("--format", choices=("orbax", "hf"), default="orbax",
                     help="orbax: peft_jax.checkpoint.restore_params reads it; hf: "
                          "config.json + model.safetensors (+ tokenizer)")
  merge.add_argument("--overwrite", action="store_true")

  export = sub.add_parser("export-hf", help="adapter -> Hugging Face PEFT directory")
  export.add_argument("--adapter", required=True, help="run directory or adapter checkpoint")
  export.add_argument("--output", required=True)

  compare = sub.add_parser("compare", help="methods side by side on a short schedule")
  _add_training_options(compare, steps=6, batch=4, seq_len=64, eval_batches=2)
  compare.add_argument("--methods", default="full,lora,dora,qlora,loraplus,galore,lisa,adalora")
  compare.add_argument("--output", default=None, help="also write the rows as JSON here")
  return parser


def _fill_remembered(args: argparse.Namespace) -> None:
  for name, default in _REMEMBERED.items():
    if hasattr(args, name):
      given = getattr(args, name) is not None
      setattr(args, f"{name}_given", given)
      if not given:
        setattr(args, name, default)


def _one_line(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return text if len(text) <= 400 else text[:397] + "..."


def _dispatch(args: argparse.Namespace) -> None:
  handlers = {"finetune": ft.run_finetune, "generate": commands.run_generate,
              "merge": commands.run_merge, "export-hf": commands.run_export_hf,
              "compare": commands.run_compare}
  handlers[args.command](args)


def main(argv: list[str] | None = None) -> int:
  """Runs the ``peft-jax`` command line.

  Args:
    argv: arguments without the program name (default ``sys.argv[1:]``);
      with no command, ``finetune`` is assumed.

  Returns:
    0 on success.

  Raises:
    SystemExit: status 2 on a user error, after one line on stderr; 130
      after Ctrl-C.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or (argv[0] not in _COMMANDS and argv[0] not in ("-h", "--help")):
    argv = ["finetune", *argv]
  args = build_parser().parse_args(argv)
  _fill_remembered(args)
  try:
    _dispatch(args)
  except (ft.CliError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
          IsADirectoryError, validation.InvalidValue) as error:
    print(f"peft-jax {args.command}: error: {_one_line(error)}", file=sys.stderr)
    raise SystemExit(2) from None
  except KeyboardInterrupt:
    print(f"peft-jax {args.command}: interrupted.", file=sys.stderr)
    raise SystemExit(130) from None
  return 0


if __name__ == "__main__":
  sys.exit(main())
