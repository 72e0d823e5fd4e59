"""GaLore projector refresh on SmolLM2-135M's 210 projected matrices: ours vs galore-torch.

The matrices: the 7 attention/MLP weights of each of the 30 layers, in
PyTorch's `(out, in)` layout (q, o: 576x576; k, v: 192x576; gate, up:
1536x576; down: 576x1536), filled with gradient-like values (a sum of 512
token outer products `dy xᵀ` with decaying feature scales, so the spectrum
decays like a real gradient's). The same `.npz` file goes to both sides.

* ours: the refresh exactly as GaLore's step runs it on a model whose layers
  are separate parameters (`peft_jax.optim.galore._refresh_all` over 210
  leaves, same-shape matrices batched, one jitted function, compiled first),
  for the default `refresh="auto"` (randomized range finder on these shapes)
  and, with `--svd`, once before the rounds, the exact `refresh="svd"`;
* galore-torch: `GaLoreProjector.get_orthogonal_matrix` (a float32
  `torch.linalg.svd(full_matrices=False)` per matrix), in the peer's
  interpreter, one warm-up matrix first.

Quality: the gradient energy `||Pᵀ G||² / ||G||²` each projector captures,
ours over galore-torch's exact SVD's on the same matrix (1.0 = the same).
Each side runs in a fresh process, alternating, `--rounds` times, timing
`--passes` full refreshes per process (the best is the process's figure);
`--threads` sets both sides' threads (XLA's pool and BLAS/LAPACK's; torch's
`set_num_threads`), and the load average is recorded around every child.
Writes `benchmarks/results/galore_refresh.{json,md}` (not with `--quick`)::

    python benchmarks/bench_galore_refresh.py [--rounds 2] [--threads 1] [--svd] [--quick]

The defaults take about 2-3 minutes on a quiet 2-core machine (`--svd` adds
one exact-SVD process, about 1.5 minutes more).
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
DEFAULT_PEER_PYTHON = "/work/refvenv/bin/python"
SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
          "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
RANK = 128
CHILD_TIMEOUT_S = 900


def make_matrices(layers: int, seed: int = 0):
  """{name: (layers, out, in) float32} gradient-like matrices."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  out = {}
  for name, (o, i) in SHAPES.items():
    mats = []
    for _ in range(layers):
      x = rng.standard_normal((512, i)) / (1.0 + np.arange(i)) ** 0.5
      dy = rng.standard_normal((512, o)) / (1.0 + np.arange(o)) ** 0.5
      mats.append((dy.T @ x).astype(np.float32))
    out[name] = np.stack(mats)
  return out


def _load(path):
  import numpy as np  # pylint: disable=import-outside-toplevel
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _energies(mats, projectors, sides) -> dict:
  """{name: [per-layer captured energy]}, float64, from (out, in) matrices."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  result = {}
  for name, per_layer in projectors.items():
    result[name] = []
    for layer, p in enumerate(per_layer):
      w = mats[name][layer].astype(np.float64)  # (out, in)
      p = np.asarray(p, np.float64)
      low = w @ p if sides[name] == "in" else p.T @ w
      result[name].append(float(np.sum(low**2) / np.sum(w**2)))
  return result


def _timed(fn, passes):
  times, cpu = [], []
  out = None
  for _ in range(passes):
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return out, times, cpu


def ours_child(args) -> dict:
  import importlib  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  galore = importlib.import_module("peft_jax.optim.galore")
  mats = _load(args.matrices)
  names = sorted(mats)
  layers = mats[names[0]].shape[0]
  # One Flax kernel (in, out) per layer and matrix, as an unrolled model has them.
  leaves = [(n, l) for n in names for l in range(layers)]
  kernels = [jax.numpy.asarray(mats[n][l].T) for n, l in leaves]
  plans = [galore._make_plan(n, k.shape, galore.GaLoreDimensionNumbers(), RANK, "std")  # pylint: disable=protected-access
           for (n, _), k in zip(leaves, kernels)]
  sides = {n: p.side for (n, _), p in zip(leaves, plans)}

  def refresh_all(ks):
    in_p, out_p = galore._refresh_all(plans, ks, args.method, jax.random.key(0), 8,  # pylint: disable=protected-access
                                       args.power_iterations)
    return [a if a is not None else b for a, b in zip(in_p, out_p)]

  result = {"load_before": os.getloadavg()[0], "method": args.method}
  t0 = time.perf_counter()
  fn = jax.jit(refresh_all).lower(kernels).compile()
  result["compile_s"] = time.perf_counter() - t0
  out, result["times_s"], result["cpu_s"] = _timed(
      lambda: jax.block_until_ready(fn(kernels)), args.passes)
  projectors = {n: [None] * layers for n in names}
  for (n, l), p in zip(leaves, out):
    projectors[n][l] = np.asarray(p)
  result["energy"] = _energies(mats, projectors, sides)
  result["load_after"] = os.getloadavg()[0]
  return result


def peer_child(args) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  from galore_torch.galore_projector import GaLoreProjector  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(args.threads)
  mats = _load(args.matrices)
  tensors = {k: torch.from_numpy(v) for k, v in mats.items()}
  result = {"load_before": os.getloadavg()[0], "method": "torch.linalg.svd"}
  projector = GaLoreProjector(RANK, proj_type="std")
  # Flax orientation: "right" (the reference's Vh) projects the `in` side.
  sides = {k: "in" if v.shape[1] >= v.shape[2] else "out" for k, v in tensors.items()}
  projector.get_orthogonal_matrix(tensors["q_proj"][0], RANK, "right")  # warm-up

  def refresh_all():
    out = {}
    for k, g in sorted(tensors.items()):
      kind = "right" if sides[k] == "in" else "left"
      # right: Vh[:r] (r, in) -> (in, r); left: U[:, :r] (out, r).
      out[k] = [projector.get_orthogonal_matrix(g[layer], RANK, kind) for layer in range(g.shape[0])]
    return out

  out, result["times_s"], result["cpu_s"] = _timed(refresh_all, args.passes)
  projectors = {k: [p.T.numpy() if sides[k] == "in" else p.numpy() for p in ps] for k, ps in out.items()}
  result["energy"] = _energies(mats, projectors, sides)
  result["load_after"] = os.getloadavg()[0]
  return result


def _child_env(threads: int) -> dict:
  env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
             MKL_NUM_THREADS=str(threads))
  flags = env.get("XLA_FLAGS", "")
  if threads == 1:
    flags += " --xla_cpu_multi_thread_eigen=false"
  env["XLA_FLAGS"] = flags.strip()
  return env


def _run(python, side, args, matrices, method="auto", passes=None) -> dict:
  cmd = [python, __file__, "--child", side, "--matrices", str(matrices), "--threads",
         str(args.threads), "--power-iterations", str(args.power_iterations), "--passes",
         str(passes or args.passes), "--method", method]
  load = os.getloadavg()[0]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(args.threads),
                          timeout=CHILD_TIMEOUT_S, check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {CHILD_TIMEOUT_S} s", "load_before": load}
  if proc.returncode:
    return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][-400:],
            "load_before": load}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(xs):
  return statistics.median(xs) if xs else float("nan")


def _relative(ours: dict, exact: dict) -> list[float]:
  return [a / e for k in exact for a, e in zip(ours[k], exact[k])]


def summarize(rounds: list[dict], exact_svd: dict) -> dict:
  ok = [r for r in rounds if "error" not in r["ours"] and "error" not in r["peer"]]
  ours = [min(r["ours"]["times_s"]) for r in ok]  # best pass of each process, both sides
  peer = [min(r["peer"]["times_s"]) for r in ok]
  rel = _relative(ok[-1]["ours"]["energy"], ok[-1]["peer"]["energy"]) if ok else []
  summary = {
      "ours_auto_s": ours, "torch_svd_s": peer,
      "torch_over_ours_auto": [p / o for p, o in zip(peer, ours)],
      "auto_energy_vs_torch_svd_mean": sum(rel) / len(rel) if rel else float("nan"),
      "auto_energy_vs_torch_svd_min": min(rel) if rel else float("nan"),
      "ours_cpu_s": [min(r["ours"]["cpu_s"]) for r in ok],
      "torch_cpu_s": [min(r["peer"]["cpu_s"]) for r in ok],
      "loads": [x for r in rounds for side in ("ours", "peer")
                for x in (r[side].get("load_before"), r[side].get("load_after")) if x is not None],
      "errors": [r[s]["error"] for r in rounds for s in ("ours", "peer") if "error" in r[s]],
  }
  if exact_svd and "error" not in exact_svd and ok:
    svd_rel = _relative(exact_svd["energy"], ok[-1]["peer"]["energy"])
    summary["ours_svd_s"] = _median(exact_svd["times_s"])
    summary["ours_svd_energy_vs_torch_svd_min"] = min(svd_rel)
  elif exact_svd:
    summary["ours_svd_error"] = exact_svd.get("error")
  return summary


def markdown(summary: dict, args) -> str:
  def span(xs, unit="s"):
    if not xs:
      return "n/a"
    return f"{_median(xs):.2f} {unit} [{min(xs):.2f}, {max(xs):.2f}]"
  loads = summary["loads"]
  lines = [
      f"GaLore refresh of SmolLM2-135M's {7 * args.layers} projected matrices (rank {RANK}, "
      f"gradient-like values), {args.threads} thread(s) per side, {args.rounds} alternating "
      f"rounds of fresh processes, {args.passes} passes each; load average around the children "
      f"{min(loads):.2f}-{max(loads):.2f}." if loads else "",
      "",
      "| refresh | time per refresh, median [min, max] | galore-torch time / this | "
      "captured energy / galore-torch's |",
      "|---|---|---|---|",
      f"| galore-torch (`torch.linalg.svd` per matrix) | {span(summary['torch_svd_s'])} | 1.00x | "
      "1 |",
  ]
  if "ours_svd_s" in summary:
    lines.append(
        f"| ours, exact (`refresh=\"svd\"`, one process) | {summary['ours_svd_s']:.2f} s | "
        f"{_median(summary['torch_svd_s']) / summary['ours_svd_s']:.2f}x | "
        f"worst {summary['ours_svd_energy_vs_torch_svd_min']:.4f} |")
  elif "ours_svd_error" in summary:
    lines.append(f"| ours, exact (`refresh=\"svd\"`) | error: {summary['ours_svd_error']} | | |")
  lines.append(
      f"| ours, default (`refresh=\"auto\"`, q={args.power_iterations}) | "
      f"{span(summary['ours_auto_s'])} | {span(summary['torch_over_ours_auto'], 'x')} | "
      f"mean {summary['auto_energy_vs_torch_svd_mean']:.4f}, worst "
      f"{summary['auto_energy_vs_torch_svd_min']:.4f} |")
  cpu = [p / o for p, o in zip(summary["torch_cpu_s"], summary["ours_cpu_s"])]
  if cpu:
    lines += ["", f"CPU time (load-robust check): ours {span(summary['ours_cpu_s'])}, galore-torch "
              f"{span(summary['torch_cpu_s'])}, galore-torch / ours {span(cpu, 'x')}."]
  if summary["errors"]:
    lines += ["", "Errors: " + "; ".join(summary["errors"])]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--passes", type=int, default=2)
  parser.add_argument("--threads", type=int, default=1)
  parser.add_argument("--layers", type=int, default=30)
  parser.add_argument("--power-iterations", type=int, default=1)  # the library's default
  parser.add_argument("--svd", action="store_true", help="also time our exact-SVD refresh once")
  parser.add_argument("--quick", action="store_true", help="one round, 4 layers, writes nothing")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--matrices", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--method", default="auto", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps((ours_child if args.child == "ours" else peer_child)(args)))
    return
  if args.quick:
    args.rounds, args.layers = 1, 4
  import numpy as np  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp:
    matrices = pathlib.Path(tmp) / "matrices.npz"
    np.savez(matrices, **make_matrices(args.layers))
    exact_svd = {} if not args.svd else _run(sys.executable, "ours", args, matrices, "svd", passes=1)
    if exact_svd:
      print(f"ours exact svd: {exact_svd.get('times_s', exact_svd.get('error'))} s", flush=True)
    rounds = []
    for r in range(args.rounds):
      ours = _run(sys.executable, "ours", args, matrices)
      peer = _run(args.peer_python, "peer", args, matrices)
      rounds.append({"ours": ours, "peer": peer})
      print(f"round {r}: ours auto {ours.get('times_s', ours.get('error'))} s; galore-torch "
            f"{peer.get('times_s', peer.get('error'))} s; cpu {ours.get('cpu_s')} / "
            f"{peer.get('cpu_s')} s; load {ours.get('load_before')}/{peer.get('load_before')}",
            flush=True)
  summary = summarize(rounds, exact_svd)
  text = markdown(summary, args)
  print(text)
  if not args.quick:
    sys.path.insert(0, str(HERE))
    import _common as C  # pylint: disable=import-outside-toplevel
    C.write_json(C.RESULTS / "galore_refresh.json", {
        "machine": C.machine_info(), "args": vars(args), "summary": summary,
        "exact_svd": exact_svd, "rounds": rounds})
    (C.RESULTS / "galore_refresh.md").write_text(text + "\n")


if __name__ == "__main__":
  main()
