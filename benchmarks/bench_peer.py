"""Side by side with the PyTorch peer (Hugging Face transformers + peft + bitsandbytes).

The same model (SmolLM2-135M: our GGUF-loaded params, written once as a
Hugging Face safetensors directory that `LlamaForCausalLM.from_pretrained`
reads), the same token windows (4 x 128 from the shipped Shakespeare), the
same LoRA (q_proj, v_proj, r=8, alpha=16, float32), AdamW, and the same
warm-up and timed steps, for three methods:

* LoRA: ours (`lora_transform` + `make_train_step`) vs `peft.get_peft_model`;
* full fine-tuning: ours vs plain `torch.optim.AdamW` on every parameter;
* QLoRA: ours (`apply_qlora`, NF4 double-quant, float32 compute) vs
  bitsandbytes' 4-bit `LlamaForCausalLM` + peft LoRA.

Each (side, method) runs in a fresh subprocess (torch through the peer's
interpreter with `torch.set_num_threads(2)`), in the order ours, theirs,
ours, theirs ... so drift hits both alike; each reports the median step
time over the timed steps and its peak RSS (`VmHWM`). We report our tokens/s
and peak RSS over theirs (goals: LoRA >= 1.3x tokens/s and <= 0.8x memory;
QLoRA >= 1.5x tokens/s). Writes `benchmarks/results/peer.{json,md}`. Usage::

    python benchmarks/bench_peer.py [--peer-python /work/refvenv/bin/python]
    python benchmarks/bench_peer.py --quick   # 1 warm-up + 2 timed steps, writes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
METHODS = ("lora", "full", "qlora")
GOALS = {"lora": {"tokens_per_s": 1.3, "peak_rss": 0.8}, "qlora": {"tokens_per_s": 1.5}}
LR = {"lora": 1e-4, "full": 1e-5, "qlora": 1e-4}
DEFAULT_PEER_PYTHON = "/work/refvenv/bin/python"


def _peak_rss() -> int:
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) * 1024
  import resource  # pylint: disable=import-outside-toplevel
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _report(method, seconds, batch, seq_len, warmup, losses) -> None:
  timed = seconds[warmup:]
  median = statistics.median(timed)
  print(json.dumps({"method": method, "median_step_s": median, "min_step_s": min(timed),
                    "max_step_s": max(timed), "raw_step_s": seconds,
                    "tokens_per_s": batch * seq_len / median, "losses": losses,
                    "peak_rss_bytes": _peak_rss()}))


# ----------------------------------------------------------------------------- the peer


def peer_child(args) -> None:
  """Runs in the peer's interpreter: torch only, nothing of ours is imported."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(2)
  torch.manual_seed(0)
  kwargs = {"torch_dtype": torch.float32}
  if args.method == "qlora":
    kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)
  model = transformers.LlamaForCausalLM.from_pretrained(args.hf_dir, **kwargs)
  if args.method in ("lora", "qlora"):
    import peft  # pylint: disable=import-outside-toplevel
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
        task_type="CAUSAL_LM"))
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trainable, lr=LR[args.method], weight_decay=0.0)
  windows = torch.from_numpy(np.load(args.windows).astype(np.int64))
  seconds, losses = [], []
  for i in range(args.warmup + args.timed):
    window = windows[i % len(windows)]
    t0 = time.perf_counter()
    logits = model(input_ids=window[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             window[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds.append(time.perf_counter() - t0)
    losses.append(float(loss))
  _report(args.method, seconds, windows.shape[1], windows.shape[2] - 1, args.warmup, losses)


# ----------------------------------------------------------------------------- ours


def ours_child(args) -> None:
  """Our side: SmolLM2 (scanned layers), the same windows, the same optimizer settings."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import peft_jax as pj  # pylint: disable=import-outside-toplevel
  from peft_jax import training  # pylint: disable=import-outside-toplevel
  from peft_jax.cli import finetune as ft  # pylint: disable=import-outside-toplevel
  model = ft.load_model("smollm2")
  key = jax.random.key(0)
  adapted = None
  if args.method == "full":
    config, trainable, base = None, model.params, {}
  else:
    kw = dict(rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
    if args.method == "qlora":
      config = pj.QLoRAConfig(**kw, compute_dtype="float32")
      adapted = pj.apply_qlora(model.params, config, key=key, layouts=model.layouts)
    else:
      config = pj.LoRAConfig(**kw)
      adapted = pj.lora_transform(model.params, config, key=key, layouts=model.layouts)
    trainable, base = pj.split(adapted)
  model = model._replace(params=None)  # the float base is garbage for QLoRA now
  optimizer = optax.adamw(LR[args.method], weight_decay=0.0)
  step = training.make_train_step(model.module, config, optimizer)
  state = training.init_train_state(trainable, optimizer)
  del trainable, adapted
  _ours_loop(step, state, base, np.load(args.windows), args.warmup, args.timed, args.method)


def _ours_loop(step, state, base, windows, warmup, timed, method) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  seconds, losses = [], []
  for i in range(warmup + timed):
    window = windows[i % len(windows)]
    t0 = time.perf_counter()
    state, loss = step(state, base, window[:, :-1], window[:, 1:], jax.random.key(i))
    losses.append(float(loss))
    seconds.append(time.perf_counter() - t0)
  _report(method, seconds, windows.shape[1], windows.shape[2] - 1, warmup, losses)


# ----------------------------------------------------------------------------- the parent


def prepare(workdir: pathlib.Path, batch: int, seq_len: int, n_windows: int) -> None:
  """Writes the shared token windows and the model as a Hugging Face directory."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from peft_jax import data  # pylint: disable=import-outside-toplevel
  from peft_jax.cli import finetune as ft  # pylint: disable=import-outside-toplevel
  from peft_jax.models import hf_checkpoint, params_scanned_to_unrolled  # pylint: disable=import-outside-toplevel
  model = ft.load_model("smollm2")
  tokens = ft.load_tokens(model, None)
  windows = [np.concatenate([x, y[:, -1:]], axis=1) for x, y in data.batches(
      tokens, batch, seq_len, seed=1, split="train", num_batches=n_windows)]
  np.save(workdir / "windows.npy", np.stack(windows).astype(np.int32))
  hf_checkpoint.save_hf_checkpoint(workdir / "hf", dataclasses.replace(model.config,
                                                                       scan_layers=False),
                                   params_scanned_to_unrolled(model.params))


def _run_child(python: str, argv: list[str], timeout: float) -> dict:
  t0 = time.perf_counter()
  env = dict(os.environ, OMP_NUM_THREADS="2")
  proc = subprocess.run([python, __file__, *argv], capture_output=True, text=True,
                        timeout=timeout, env=env, check=False)
  if proc.returncode:
    return {"error": proc.stderr.strip().splitlines()[-1][-400:] if proc.stderr else
            f"exit {proc.returncode}"}
  result = json.loads([line for line in proc.stdout.splitlines() if line.strip()][-1])
  result["wall_s"] = time.perf_counter() - t0
  return result


def _fmt_ratio(ours, theirs, goal=None, higher_is_better=True) -> str:
  if not ours or not theirs:
    return "n/a"
  r = ours / theirs
  if goal is None:
    return f"{r:.2f}x"
  met = r >= goal if higher_is_better else r <= goal
  return f"{r:.2f}x ({'meets' if met else 'misses'} {'>=' if higher_is_better else '<='} {goal}x)"


def table(results: dict) -> str:
  """Markdown: our tokens/s and peak RSS over the peer's, per method."""
  sys.path.insert(0, str(HERE))
  import _common as C  # pylint: disable=import-outside-toplevel
  rows = []
  for method, pair in results.items():
    ours, theirs = pair["ours"], pair["peer"]
    goals = GOALS.get(method, {})
    rows.append([
        method, f"{ours.get('tokens_per_s', 0):,.0f}" if "tokens_per_s" in ours else ours.get("error", "n/a"),
        f"{theirs.get('tokens_per_s', 0):,.0f}" if "tokens_per_s" in theirs else theirs.get("error", "n/a"),
        _fmt_ratio(ours.get("tokens_per_s"), theirs.get("tokens_per_s"), goals.get("tokens_per_s")),
        C.mib(ours.get("peak_rss_bytes")), C.mib(theirs.get("peak_rss_bytes")),
        _fmt_ratio(ours.get("peak_rss_bytes"), theirs.get("peak_rss_bytes"),
                   goals.get("peak_rss"), higher_is_better=False)])
  return C.markdown_table(["Method", "Ours tokens/s", "Peer tokens/s", "Ours / peer",
                           "Ours peak RSS", "Peer peak RSS", "Ours / peer"], rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON)
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--timed", type=int, default=5)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--peer", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--ours", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--windows", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.quick:
    args.warmup, args.timed = 1, 2
  if args.peer or args.ours:
    args.method = args.peer or args.ours
    (peer_child if args.peer else ours_child)(args)
    return
  if not pathlib.Path(args.peer_python).exists():
    sys.exit(f"No peer interpreter at {args.peer_python} (needs torch, transformers, peft, "
             "bitsandbytes); pass --peer-python.")
  with tempfile.TemporaryDirectory() as tmp:
    workdir = pathlib.Path(tmp)
    prepare(workdir, args.batch, args.seq_len, args.warmup + args.timed)
    common = ["--windows", str(workdir / "windows.npy"), "--warmup", str(args.warmup),
              "--timed", str(args.timed)]
    results = {}
    for method in [m for m in args.methods.split(",") if m]:
      ours = _run_child(sys.executable, ["--ours", method, *common], 1200)
      peer = _run_child(args.peer_python,
                        ["--peer", method, "--hf-dir", str(workdir / "hf"), *common], 1200)
      results[method] = {"ours": ours, "peer": peer}
      print(f"{method}: ours {ours.get('tokens_per_s', ours.get('error'))} tok/s, "
            f"peer {peer.get('tokens_per_s', peer.get('error'))} tok/s", flush=True)
  sys.path.insert(0, str(HERE))
  import _common as C  # pylint: disable=import-outside-toplevel
  machine = C.machine_info()
  machine["peer"] = subprocess.run(
      [args.peer_python, "-c", "import torch, peft, transformers, bitsandbytes as b; "
       "print(f'torch {torch.__version__}, peft {peft.__version__}, transformers "
       "{transformers.__version__}, bitsandbytes {b.__version__}')"],
      capture_output=True, text=True, check=False).stdout.strip()
  text = (f"SmolLM2-135M, float32, batch {args.batch} x {args.seq_len}, AdamW, "
          f"{args.warmup} warm-up + {args.timed} timed steps, each side in a fresh process "
          f"(median step).\n\n{table(results)}\n\nMachine: {C.machine_line(machine)} "
          f"Peer: {machine['peer']}.")
  print(text)
  if not args.quick:
    C.write_json(C.RESULTS / "peer.json", {"machine": machine, "batch": args.batch,
                                           "seq_len": args.seq_len, "warmup": args.warmup,
                                           "timed": args.timed, "results": results})
    (C.RESULTS / "peer.md").write_text(text + "\n")


if __name__ == "__main__":
  main()
