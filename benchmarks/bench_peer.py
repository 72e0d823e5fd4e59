"""Side by side with the PyTorch peer (Hugging Face transformers + peft + bitsandbytes).

The same model (our GGUF-loaded params, written once as a Hugging Face
safetensors directory that `AutoModelForCausalLM.from_pretrained` reads),
the same token windows (4 x 128 from the shipped Shakespeare, cut from the
model's own tokenization; Gemma's each start with `<bos>`), the same LoRA
(q_proj, v_proj, r=8, alpha=16, float32), AdamW, and the same warm-up and
timed steps. Two models
(`--model smollm2` (default), `gemma3-270m` or `all`):

* SmolLM2-135M (linen), three methods:
  - LoRA: ours (`lora_transform` + `make_train_step`) vs `peft.get_peft_model`;
  - full fine-tuning: ours vs plain `torch.optim.AdamW` on every parameter;
  - QLoRA: ours (`apply_qlora`, NF4 double-quant, float32 compute) vs
    bitsandbytes' 4-bit model + peft LoRA.
* Gemma 3 270M (Flax NNX, 262,144-token vocabulary), LoRA and QLoRA: ours is
  the README's NNX loop: `load_gemma3_270m()`, `pj.nnx.lora_transform` /
  `pj.nnx.apply_qlora`, `nnx.Optimizer(model, adamw, wrt=pj.nnx.Adapter)`
  and an `nnx.jit` step over `nnx.value_and_grad` of `gemma3_lm_loss` (the
  tied head fused into a chunked cross-entropy); the peer is
  `Gemma3ForCausalLM` (+ bitsandbytes 4-bit) + peft with transformers'
  default attention.

Each child also reports its first step's loss: the same weights and tokens
give the same number on both sides (the adapters start at B = 0), which the
table shows as a check.

The harness is fair and checks itself:

* each (side, method) runs in a fresh subprocess (torch through the peer's
  interpreter, both sides with `--threads` threads: torch via `set_num_threads`, XLA
  with all cores (the machine's 2 by default) or, for `--threads 1`,
  `--xla_cpu_multi_thread_eigen=false`);
* every round runs ours and the peer back to back for every method, the
  side that goes first alternating between rounds, so drift hits both;
* the parent measures, for each child, the CPU time that *other* processes
  used while it ran (the machine's busy time from `/proc/stat` minus the
  child's own CPU time), as cores on average: the "foreign load". A round in
  which it exceeds `--max-foreign` (default 0.25 cores) is flagged and
  retried up to `--retries` times after `--cool-down` seconds; the table uses
  the clean rounds (all rounds, marked noisy, if none is clean). The 1-minute
  load average is recorded too, but it cannot judge a 2-thread child on 2
  cores: the child's own threads push it to ~2;
* results are medians over rounds with [min, max];
* each step is split into forward, backward and optimizer time on both
  sides: the peer times `model(...)` + loss, `loss.backward()` and
  `optimizer.step()` inside its loop; ours times separately jitted phases
  (loss; loss and gradients, minus the loss; optimizer update) after the
  real fused step has been timed (and its peak RSS read), so they do not
  touch its memory figure.

Our side is what a library user gets by default: for SmolLM2
`load_smollm2()` (unrolled layers), `lora_transform`/`apply_qlora`,
`make_train_step`; for Gemma the NNX loop above. We report our tokens/s and
peak RSS (`VmHWM`) over theirs (goals: LoRA >= 1.3x tokens/s and <= 0.8x
memory; full fine-tuning >= 1.0x; QLoRA >= 1.5x tokens/s).
Writes `benchmarks/results/peer.{json,md}`: one block per model; a run of
one model replaces that model's block and keeps the others. Usage::

    python benchmarks/bench_peer.py [--model all] [--rounds 3] [--peer-python /work/refvenv/bin/python]
    python benchmarks/bench_peer.py --quick   # 1 round, 1 warm-up + 2 timed steps (~5 min), writes nothing
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
# model -> (label, methods). Gemma 3 270M: the adapter methods (issue 12).
MODELS = {"smollm2": ("SmolLM2-135M", METHODS), "gemma3-270m": ("Gemma 3 270M", ("lora", "qlora"))}
GOALS = {"lora": {"tokens_per_s": 1.3, "peak_rss": 0.8}, "full": {"tokens_per_s": 1.0},
         "qlora": {"tokens_per_s": 1.5}}
PHASES = ("forward", "backward", "optimizer")
LR = {"lora": 1e-4, "full": 1e-5, "qlora": 1e-4}
DEFAULT_PEER_PYTHON = "/work/refvenv/bin/python"


def _peak_rss() -> int:
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) * 1024
  import resource  # pylint: disable=import-outside-toplevel
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _load() -> float:
  return os.getloadavg()[0]


def _machine_busy_s() -> float:
  """CPU seconds the whole machine has spent busy, all cores (``/proc/stat``)."""
  ticks = [int(x) for x in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
  user, nice, system, idle, iowait, irq, softirq, steal = ticks
  del idle, iowait
  return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
  import resource  # pylint: disable=import-outside-toplevel
  return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF,
                                                             resource.RUSAGE_CHILDREN)
             for f in ("ru_utime", "ru_stime"))


def _report(args, seconds, losses, phases, peak_rss, load_start) -> None:
  batch, seq_len = args.batch_shape
  timed = seconds[args.warmup:]
  median = statistics.median(timed)
  print(json.dumps({
      "method": args.method, "median_step_s": median, "min_step_s": min(timed),
      "max_step_s": max(timed), "raw_step_s": seconds, "tokens_per_s": batch * seq_len / median,
      "losses": losses, "peak_rss_bytes": peak_rss,
      "phases_s": {k: statistics.median(v) for k, v in phases.items()},
      "load_start": load_start, "load_end": _load()}))


# ----------------------------------------------------------------------------- the peer


def peer_child(args) -> None:
  """Runs in the peer's interpreter: torch only, nothing of ours is imported."""
  load_start = _load()
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  kwargs = {"torch_dtype": torch.float32}
  if args.method == "qlora":
    kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)
  # SmolLM2 -> LlamaForCausalLM, Gemma 3 -> Gemma3ForCausalLM (config.json's architecture).
  model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir, **kwargs)
  if args.method in ("lora", "qlora"):
    import peft  # pylint: disable=import-outside-toplevel
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
        task_type="CAUSAL_LM"))
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trainable, lr=LR[args.method], weight_decay=0.0)
  windows = torch.from_numpy(np.load(args.windows).astype(np.int64))
  args.batch_shape = (windows.shape[1], windows.shape[2] - 1)
  seconds, losses, phases = [], [], {k: [] for k in PHASES}
  for i in range(args.warmup + args.timed):
    window = windows[i % len(windows)]
    t0 = time.perf_counter()
    logits = model(input_ids=window[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             window[:, 1:].reshape(-1))
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    seconds.append(t3 - t0)
    losses.append(float(loss))
    if i >= args.warmup:
      for k, v in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2)):
        phases[k].append(v)
  _report(args, seconds, losses, phases, _peak_rss(), load_start)


# ----------------------------------------------------------------------------- ours


def ours_child(args) -> None:
  """Our side as a library user writes it: SmolLM2 (unrolled), the same windows and optimizer."""
  if args.model == "gemma3-270m":
    ours_gemma_child(args)
    return
  load_start = _load()
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import peft_jax as pj  # pylint: disable=import-outside-toplevel
  from peft_jax import training  # pylint: disable=import-outside-toplevel
  from peft_jax.models import LlamaForCausalLM, pretrained  # pylint: disable=import-outside-toplevel
  loaded = pretrained.load_smollm2()
  module = LlamaForCausalLM(loaded.config)
  layouts = pj.kernel_layouts(module, jnp.zeros((1, 8), jnp.int32))
  key = jax.random.key(0)
  if args.method == "full":
    config, trainable, base = None, loaded.params, {}
  else:
    kw = dict(rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
    if args.method == "qlora":
      config = pj.QLoRAConfig(**kw, compute_dtype="float32")
      adapted = pj.apply_qlora(loaded.params, config, key=key, layouts=layouts)
    else:
      config = pj.LoRAConfig(**kw)
      adapted = pj.lora_transform(loaded.params, config, key=key, layouts=layouts)
    trainable, base = pj.split(adapted)
    del adapted
  del loaded  # the float base is garbage for QLoRA now
  optimizer = optax.adamw(LR[args.method], weight_decay=0.0)
  step = training.make_train_step(module, config, optimizer)
  held = {"state": training.init_train_state(trainable, optimizer)}
  del trainable

  def run(i, inputs, labels):
    held["state"], loss = step(held["state"], base, inputs, labels, jax.random.key(i))
    return loss

  windows, seconds, losses = _timed_steps(args, run)
  state = held["state"]
  peak_rss = _peak_rss()  # before the phase programs below add their own buffers
  phases = _ours_phases(module, config, optimizer, state, base, windows, args)
  _report(args, seconds, losses, phases, peak_rss, load_start)


def _ours_phases(module, config, optimizer, state, base, windows, args) -> dict:
  """Forward, backward and optimizer time of our step, as separately jitted phases."""
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import peft_jax as pj  # pylint: disable=import-outside-toplevel
  from peft_jax import training  # pylint: disable=import-outside-toplevel

  # The frozen base is an argument, as in the real step: closed over, it would be
  # baked into each program as constants (compile-time folding of the whole
  # model: minutes and ~10 GB for QLoRA).
  def loss_fn(trainable, base, inputs, labels):
    params = pj.combine(base, trainable) if base else trainable
    return training.lm_loss(module, config, params, inputs, labels)

  def update(grads, opt_state, trainable):
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  forward = jax.jit(loss_fn)
  forward_backward = jax.jit(jax.value_and_grad(loss_fn))
  opt = jax.jit(update)
  window = windows[0]
  inputs, labels = window[:, :-1], window[:, 1:]
  _, grads = forward_backward(state.trainable, base, inputs, labels)
  runs = {"forward": lambda: forward(state.trainable, base, inputs, labels),
          "forward_backward": lambda: forward_backward(state.trainable, base, inputs, labels),
          "optimizer": lambda: opt(grads, state.opt_state, state.trainable)}
  return _time_phases(jax, runs, args.timed)


def ours_gemma_child(args) -> None:
  """Gemma 3 270M through the NNX API, as the README's Flax NNX section writes the loop."""
  load_start = _load()
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import peft_jax as pj  # pylint: disable=import-outside-toplevel
  from peft_jax.models import gemma3_lm_loss, load_gemma3_270m  # pylint: disable=import-outside-toplevel
  model = load_gemma3_270m().model
  kw = dict(rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
  if args.method == "qlora":
    pj.nnx.apply_qlora(model, pj.QLoRAConfig(**kw, compute_dtype="float32"), key=jax.random.key(0))
  elif args.method == "lora":
    pj.nnx.lora_transform(model, pj.LoRAConfig(**kw), key=jax.random.key(0))
  else:
    raise SystemExit(f"gemma3-270m has no {args.method!r} row (only {MODELS['gemma3-270m'][1]}).")
  optimizer = nnx.Optimizer(model, optax.adamw(LR[args.method], weight_decay=0.0),
                            wrt=pj.nnx.Adapter)

  def loss_fn(m, inputs, labels):
    return gemma3_lm_loss(m, inputs, labels)

  train_step = gemma_train_step()
  windows, seconds, losses = _timed_steps(
      args, lambda i, inputs, labels: train_step(model, optimizer, inputs, labels))
  peak_rss = _peak_rss()  # before the phase programs below add their own buffers
  window = windows[0]
  inputs, labels = window[:, :-1], window[:, 1:]
  # The forward and backward phases are `jax.jit` over split state: an undonated
  # `nnx.jit` returns (copies) every variable of the model, ~1 GB per call
  # (benchmarks/bench_gemma_body.py), which the real, donated step does not.
  graphdef, adapters, rest = nnx.split(model, pj.nnx.Adapter, ...)
  split_loss = lambda adapters, rest, *batch: loss_fn(nnx.merge(graphdef, adapters, rest), *batch)
  forward = jax.jit(split_loss)
  forward_backward = jax.jit(jax.value_and_grad(split_loss))
  _, grads = forward_backward(adapters, rest, inputs, labels)

  @nnx.jit
  def update(optimizer, model, grads):
    optimizer.update(model, grads)  # moves the adapters: the timed steps are over

  runs = {"forward": lambda: forward(adapters, rest, inputs, labels),
          "forward_backward": lambda: forward_backward(adapters, rest, inputs, labels),
          "optimizer": lambda: update(optimizer, model, grads)}
  _report(args, seconds, losses, _time_phases(jax, runs, args.timed), peak_rss, load_start)


def gemma_train_step():
  """Our Gemma child's step, ``step(model, optimizer, inputs, labels) -> loss`` (``nnx.jit``).

  The model and the optimizer are donated: ``nnx.jit`` returns every variable
  of its graph arguments, the frozen base included, so without donation each
  step wrote a second copy of the whole model (270M LoRA, 4 x 128:
  ``memory_analysis`` args 1027 MiB, output 1027 MiB, aliased 0; peak RSS
  after 2 steps 4,370 MiB, 2,338 MiB donated).
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import peft_jax as pj  # pylint: disable=import-outside-toplevel
  from peft_jax.models import gemma3_lm_loss  # pylint: disable=import-outside-toplevel
  diff = nnx.DiffState(0, pj.nnx.Adapter)

  def train_step(model, optimizer, inputs, labels):
    loss_fn = lambda m: gemma3_lm_loss(m, inputs, labels)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=diff)(model)
    optimizer.update(model, grads)
    return loss

  return nnx.jit(train_step, donate_argnames=("model", "optimizer"))


def _timed_steps(args, run_step):
  """Warm-up + timed steps of ``run_step(i, inputs, labels) -> loss`` over the shared windows.

  Returns ``(windows, seconds per step, losses)``; sets ``args.batch_shape``.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  windows = np.load(args.windows)
  args.batch_shape = (windows.shape[1], windows.shape[2] - 1)
  seconds, losses = [], []
  for i in range(args.warmup + args.timed):
    window = windows[i % len(windows)]
    t0 = time.perf_counter()
    losses.append(float(run_step(i, window[:, :-1], window[:, 1:])))
    seconds.append(time.perf_counter() - t0)
  return windows, seconds, losses


def _time_phases(jax, runs: dict, timed: int) -> dict:
  """Median-ready lists of forward, backward (= forward+backward - forward) and optimizer time."""
  for run in runs.values():  # compile
    jax.block_until_ready(run())
  times = {k: [] for k in runs}
  for _ in range(max(2, timed)):
    for k, run in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(run())
      times[k].append(time.perf_counter() - t0)
  return {"forward": times["forward"],
          "backward": [fb - f for fb, f in zip(times["forward_backward"], times["forward"])],
          "optimizer": times["optimizer"]}


# ----------------------------------------------------------------------------- the parent


def prepare(workdir: pathlib.Path, batch: int, seq_len: int, n_windows: int,
            model_name: str = "smollm2") -> None:
  """Writes the shared token windows and the model as a Hugging Face directory."""
  workdir.mkdir(parents=True, exist_ok=True)
  if model_name == "gemma3-270m":
    _prepare_gemma(workdir, batch, seq_len, n_windows)
    return
  import dataclasses  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from peft_jax.cli import finetune as ft  # pylint: disable=import-outside-toplevel
  from peft_jax.models import hf_checkpoint, params_scanned_to_unrolled  # pylint: disable=import-outside-toplevel
  model = ft.load_model("smollm2")
  tokens = ft.load_tokens(model, None)
  np.save(workdir / "windows.npy", _windows(tokens, batch, seq_len, n_windows))
  hf_checkpoint.save_hf_checkpoint(workdir / "hf", dataclasses.replace(model.config,
                                                                       scan_layers=False),
                                   params_scanned_to_unrolled(model.params))


def _windows(tokens, batch: int, seq_len: int, n_windows: int, bos_id: int | None = None):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from peft_jax import data  # pylint: disable=import-outside-toplevel
  windows = [np.concatenate([x, y[:, -1:]], axis=1) for x, y in data.batches(
      tokens, batch, seq_len, seed=1, split="train", num_batches=n_windows, bos_id=bos_id)]
  return np.stack(windows).astype(np.int32)


def _prepare_gemma(workdir: pathlib.Path, batch: int, seq_len: int, n_windows: int) -> None:
  """Gemma 3 270M: windows of its tokenization of the shipped text, its params as an HF dir."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from peft_jax import data  # pylint: disable=import-outside-toplevel
  from peft_jax.models import gemma3_params, load_gemma3_270m, save_gemma3_hf  # pylint: disable=import-outside-toplevel
  gemma = load_gemma3_270m()
  # Each window starts with <bos> (as transformers' tokenizer gives Gemma every text); both
  # sides read these windows.
  tokens = np.asarray(gemma.tokenizer.encode(data.load_text(None), add_bos=False), np.int32)
  bos = data.window_bos(gemma.tokenizer)
  np.save(workdir / "windows.npy", _windows(tokens, batch, seq_len, n_windows, bos))
  save_gemma3_hf(workdir / "hf", gemma.config, gemma3_params(gemma.model))


def _child_env(threads: int) -> dict:
  env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
             OPENBLAS_NUM_THREADS=str(threads))
  if threads == 1:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
  return env


def _run_child(python: str, argv: list[str], threads: int, timeout: float) -> dict:
  t0, busy0, own0 = time.perf_counter(), _machine_busy_s(), _own_cpu_s()
  proc = subprocess.run([python, __file__, *argv, "--threads", str(threads)], capture_output=True,
                        text=True, timeout=timeout, env=_child_env(threads), check=False)
  wall = time.perf_counter() - t0
  foreign = max(0.0, (_machine_busy_s() - busy0) - (_own_cpu_s() - own0)) / wall
  if proc.returncode:
    return {"error": proc.stderr.strip().splitlines()[-1][-400:] if proc.stderr else
            f"exit {proc.returncode}"}
  result = json.loads([line for line in proc.stdout.splitlines() if line.strip()][-1])
  result["wall_s"], result["foreign_load"] = wall, foreign
  return result


def run_round(args, method: str, workdir: pathlib.Path, peer_first: bool,
              model: str = "smollm2") -> dict:
  """One interleaved pair (ours, peer) for ``method``, retried while the load is too high."""
  common = ["--model", model, "--windows", str(workdir / "windows.npy"), "--warmup",
            str(args.warmup), "--timed", str(args.timed)]
  for attempt in range(args.retries + 1):
    sides = {"ours": lambda: _run_child(sys.executable, ["--ours", method, *common], args.threads,
                                        args.timeout),
             "peer": lambda: _run_child(args.peer_python, ["--peer", method, "--hf-dir",
                                                           str(workdir / "hf"), *common],
                                        args.threads, args.timeout)}
    order = ("peer", "ours") if peer_first else ("ours", "peer")
    pair = {side: sides[side]() for side in order}
    loads = [pair[s].get(k) for s in pair for k in ("load_start", "load_end")]
    pair["max_load"] = max((x for x in loads if x is not None), default=float("nan"))
    foreign = max((pair[s].get("foreign_load", float("nan")) for s in order), default=float("nan"))
    pair["foreign_load"] = foreign
    pair["noisy"] = not foreign <= args.max_foreign
    pair["attempt"] = attempt
    if not pair["noisy"] or attempt == args.retries:
      return pair
    print(f"  {method}: other processes used {foreign:.2f} cores > {args.max_foreign}; "
          f"retrying in {args.cool_down} s", flush=True)
    time.sleep(args.cool_down)
  raise AssertionError("unreachable")


def _span(values, fmt="{:,.0f}") -> str:
  if not values:
    return "n/a"
  med = statistics.median(values)
  if len(values) == 1:
    return fmt.format(med)
  return f"{fmt.format(med)} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def _fmt_ratio(ratios, goal=None, higher_is_better=True) -> str:
  if not ratios:
    return "n/a"
  text = _span(ratios, "{:.2f}x")
  if goal is None:
    return text
  met = statistics.median(ratios) >= goal if higher_is_better else statistics.median(ratios) <= goal
  return f"{text} ({'meets' if met else 'misses'} {'>=' if higher_is_better else '<='} {goal}x)"


def summarize(rounds: dict) -> dict:
  """Per method: the rounds the table uses (clean ones, else all) and their figures."""
  out = {}
  for method, pairs in rounds.items():
    ok = [p for p in pairs if "tokens_per_s" in p["ours"] and "tokens_per_s" in p["peer"]]
    clean = [p for p in ok if not p["noisy"]]
    used = clean or ok
    get = lambda side, key, used=used: [p[side][key] for p in used]
    out[method] = {
        "rounds": len(pairs), "clean_rounds": len(clean), "noisy": not clean,
        "max_load": [p["max_load"] for p in pairs],
        "foreign_load": [p.get("foreign_load", float("nan")) for p in pairs],
        "ours_tokens_per_s": get("ours", "tokens_per_s"),
        "peer_tokens_per_s": get("peer", "tokens_per_s"),
        "tokens_ratio": [p["ours"]["tokens_per_s"] / p["peer"]["tokens_per_s"] for p in used],
        "ours_peak_rss": get("ours", "peak_rss_bytes"), "peer_peak_rss": get("peer", "peak_rss_bytes"),
        "rss_ratio": [p["ours"]["peak_rss_bytes"] / p["peer"]["peak_rss_bytes"] for p in used],
        "phases": {side: {k: [p[side]["phases_s"][k] for p in used] for k in PHASES}
                   for side in ("ours", "peer")},
        "first_loss": {side: [p[side]["losses"][0] for p in used if p[side].get("losses")]
                       for side in ("ours", "peer")},
        "errors": [p[s]["error"] for p in pairs for s in ("ours", "peer") if "error" in p[s]],
    }
  return out


def _first_loss(s: dict) -> str:
  """The loss check: both sides' first-step loss (same weights, same tokens, B = 0)."""
  first = s.get("first_loss", {})
  if not first.get("ours") or not first.get("peer"):
    return "n/a"
  return f"{statistics.median(first['ours']):.4f} / {statistics.median(first['peer']):.4f}"


def tables(summary: dict) -> str:
  """Markdown: tokens/s and peak RSS side by side, then the per-phase breakdown."""
  sys.path.insert(0, str(HERE))
  import _common as C  # pylint: disable=import-outside-toplevel
  rows, phase_rows = [], []
  for method, s in summary.items():
    goals = GOALS.get(method, {})
    mib = lambda xs: _span([x / 2**20 for x in xs], "{:,.0f}") + " MiB" if xs else "n/a"
    note = (f"{s['clean_rounds']}/{s['rounds']} clean" if not s["noisy"] else
            f"NOISY: 0/{s['rounds']} rounds under the foreign-load limit")
    if s["errors"]:
      note += "; errors: " + " | ".join(e[:120] for e in s["errors"])
    rows.append([method, _span(s["ours_tokens_per_s"]), _span(s["peer_tokens_per_s"]),
                 _fmt_ratio(s["tokens_ratio"], goals.get("tokens_per_s")),
                 mib(s["ours_peak_rss"]), mib(s["peer_peak_rss"]),
                 _fmt_ratio(s["rss_ratio"], goals.get("peak_rss"), higher_is_better=False),
                 _first_loss(s), _span(s["foreign_load"], "{:.2f}"), _span(s["max_load"], "{:.2f}"),
                 note])
    for side in ("ours", "peer"):
      ph = s["phases"][side]
      phase_rows.append([method, side] + [_span([x * 1e3 for x in ph[k]], "{:,.0f}") + " ms"
                                          if ph[k] else "n/a" for k in PHASES])
  main_table = C.markdown_table(["Method", "Ours tokens/s", "Peer tokens/s", "Ours / peer",
                                 "Ours peak RSS", "Peer peak RSS", "Ours / peer",
                                 "First loss ours / peer", "Other processes (cores)",
                                 "Load avg", "Rounds"], rows)
  phase_table = C.markdown_table(["Method", "Side", "Forward", "Backward", "Optimizer"],
                                 phase_rows)
  return f"{main_table}\n\nPer phase (median [min, max] over rounds):\n\n{phase_table}"


def plan_methods(model_arg: str, methods_arg: str | None) -> dict[str, list[str]]:
  """``{model: [method, ...]}`` to run; raises SystemExit naming what cannot run.

  ``--methods`` (comma-separated; default: each model's own) is filtered per
  model under ``--model all``; for one model a method it lacks is an error.
  """
  if model_arg != "all" and model_arg not in MODELS:
    raise SystemExit(f"--model {model_arg!r}: choose from {sorted(MODELS)} or 'all'.")
  names = list(MODELS) if model_arg == "all" else [model_arg]
  wanted = [m for m in (methods_arg or "").split(",") if m]
  unknown = [m for m in wanted if m not in METHODS]
  if unknown:
    raise SystemExit(f"--methods {unknown}: unknown (known: {list(METHODS)}).")
  plan = {}
  for name in names:
    supported = MODELS[name][1]
    chosen = [m for m in wanted if m in supported] if wanted else list(supported)
    if model_arg != "all" and len(chosen) < len(wanted):
      raise SystemExit(f"--model {name} has no {sorted(set(wanted) - set(chosen))} rows "
                       f"(it has {list(supported)}).")
    if chosen:
      plan[name] = chosen
  if not plan:
    raise SystemExit(f"No model has the methods {wanted}.")
  return plan


def merge_results(existing: dict | None, existing_md: str | None,
                  blocks: dict[str, dict]) -> tuple[dict, str]:
  """peer.json / peer.md holding ``blocks`` (model -> result) and the other models' old ones.

  A file from before the per-model layout is SmolLM2's block (its text: the
  old peer.md).
  """
  sys.path.insert(0, str(HERE))
  import _common as C  # pylint: disable=import-outside-toplevel  # jax: not in a peer child
  return C.merge_model_blocks(existing, existing_md, blocks,
                              {name: label for name, (label, _) in MODELS.items()})


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON)
  parser.add_argument("--model", default="smollm2",
                      help=f"{', '.join(MODELS)} or all (default smollm2)")
  parser.add_argument("--methods", default=None,
                      help="comma-separated subset of lora,full,qlora (default: the model's own; "
                           "gemma3-270m has lora,qlora)")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--timed", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--max-foreign", type=float, default=0.25,
                      help="flag (and retry) a round in which other processes used more than "
                           "this many cores on average")
  parser.add_argument("--retries", type=int, default=2)
  parser.add_argument("--cool-down", type=float, default=60.0)
  parser.add_argument("--timeout", type=float, default=1800.0)
  parser.add_argument("--quick", action="store_true",
                      help="1 round, 1 warm-up + 2 timed steps, no retries; writes nothing")
  parser.add_argument("--peer", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--ours", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--windows", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--prepare", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.quick:
    args.warmup, args.timed, args.rounds, args.retries = 1, 2, 1, 0
  if args.prepare:  # a child: the parent stays small while the sides run
    prepare(pathlib.Path(args.prepare), args.batch, args.seq_len, args.warmup + args.timed,
            args.model)
    return
  if args.peer or args.ours:
    args.method = args.peer or args.ours
    (peer_child if args.peer else ours_child)(args)
    return
  plan = plan_methods(args.model, args.methods)
  if not pathlib.Path(args.peer_python).exists():
    sys.exit(f"No peer interpreter at {args.peer_python} (needs torch, transformers, peft, "
             "bitsandbytes); pass --peer-python.")
  rounds = {name: {m: [] for m in methods} for name, methods in plan.items()}
  with tempfile.TemporaryDirectory() as tmp:
    for name in plan:
      print(f"preparing {name} (windows, Hugging Face directory) ...", flush=True)
      subprocess.run([sys.executable, __file__, "--prepare", str(pathlib.Path(tmp) / name),
                      "--model", name, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
                      "--warmup", str(args.warmup), "--timed", str(args.timed)], check=True)
    for r in range(args.rounds):
      for name, methods in plan.items():
        for method in methods:
          pair = run_round(args, method, pathlib.Path(tmp) / name, peer_first=bool(r % 2),
                           model=name)
          rounds[name][method].append(pair)
          print("PAIR " + json.dumps({"round": r, "model": name, "method": method, **pair}),
                flush=True)
          print(f"round {r} {name} {method}: ours "
                f"{pair['ours'].get('tokens_per_s', pair['ours'].get('error'))} tok/s, peer "
                f"{pair['peer'].get('tokens_per_s', pair['peer'].get('error'))} tok/s, "
                f"other processes {pair['foreign_load']:.2f} cores, load avg "
                f"{pair['max_load']:.2f}{' (noisy)' if pair['noisy'] else ''}", flush=True)
  sys.path.insert(0, str(HERE))
  import _common as C  # pylint: disable=import-outside-toplevel
  machine = C.machine_info()
  machine["peer"] = subprocess.run(
      [args.peer_python, "-c", "import torch, peft, transformers, bitsandbytes as b; "
       "print(f'torch {torch.__version__}, peft {peft.__version__}, transformers "
       "{transformers.__version__}, bitsandbytes {b.__version__}')"],
      capture_output=True, text=True, check=False).stdout.strip()
  blocks = {}
  for name in plan:
    summary = summarize(rounds[name])
    ours = (" Ours: the NNX model, `nnx.jit` step, tied head fused into a chunked cross-entropy."
            if name == "gemma3-270m" else "")
    text = (f"{MODELS[name][0]}, float32, batch {args.batch} x {args.seq_len}, LoRA "
            f"q_proj,v_proj r=8, AdamW; {args.warmup} warm-up + {args.timed} timed steps per "
            f"child, {args.rounds} interleaved round(s), {args.threads} threads per side, foreign-"
            f"load limit {args.max_foreign} cores.{ours}\n\n{tables(summary)}\n\nMachine: "
            f"{C.machine_line(machine)} Peer: {machine['peer']}.")
    print(f"\n## {MODELS[name][0]}\n\n{text}")
    blocks[name] = {"machine": machine, "args": vars(args), "summary": summary,
                    "rounds": rounds[name], "text": text}
  if not args.quick:
    json_path, md_path = C.RESULTS / "peer.json", C.RESULTS / "peer.md"
    existing = json.loads(json_path.read_text()) if json_path.exists() else None
    existing_md = md_path.read_text() if md_path.exists() else None
    merged, text = merge_results(existing, existing_md, blocks)
    C.write_json(json_path, merged)
    md_path.write_text(text)


if __name__ == "__main__":
  main()
