"""GaLore projector refresh on SmolLM2-135M's 210 projected matrices: ours vs galore-torch.

The matrices: the 7 attention/MLP weights of each of the 30 layers, in
PyTorch's `(out, in)` layout (q, o: 576x576; k, v: 192x576; gate, up:
1536x576; down: 576x1536), filled with gradient-like values (a sum of 512
token outer products `dy xᵀ` with decaying feature scales, so the spectrum
decays like a real gradient's). The same `.npy` file goes to both sides.

* ours: the whole refresh as GaLore's step runs it (one jitted function
  over all matrices, `peft_jax.optim.galore._refresh`), for `refresh="svd"`
  (exact) and the default `"auto"` (randomized range finder on these
  shapes), compiled first, then timed;
* galore-torch: `GaLoreProjector.get_orthogonal_matrix` (a float32
  `torch.linalg.svd(full_matrices=False)` per matrix), in the peer's
  interpreter.

Quality: the gradient energy `||Pᵀ G||² / ||G||²` each projector captures,
ours relative to the exact SVD's (1.0 = the same). Each side runs in a fresh
process, alternating, `--rounds` times; `--threads` sets the threads of both
(XLA's pool and torch's), and the load average is recorded per child.
Writes `benchmarks/results/galore_refresh.{json,md}` (not with `--quick`)::

    python benchmarks/bench_galore_refresh.py [--rounds 3] [--threads 2] [--quick]
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


def ours_child(args) -> dict:
  import importlib  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  galore = importlib.import_module("peft_jax.optim.galore")
  mats = _load(args.matrices)
  # Flax kernels (L, in, out): GaLore's own plans decide the side and rank.
  kernels = {k: jax.numpy.asarray(np.swapaxes(v, -1, -2)) for k, v in mats.items()}
  plans = {k: galore._make_plan(k, v.shape, galore.GaLoreDimensionNumbers(), RANK, "std")  # pylint: disable=protected-access
           for k, v in kernels.items()}
  result = {"load_before": os.getloadavg()[0]}
  for method in ("svd", "auto"):
    def refresh_all(ks, method=method):
      out = {}
      for j, (k, g) in enumerate(sorted(ks.items())):
        key = jax.random.fold_in(jax.random.key(0), j)
        a, b = galore._refresh(plans[k].to_3d(g), plans[k], method, key, 8,  # pylint: disable=protected-access
                               args.power_iterations, g.dtype)
        out[k] = a if a is not None else b
      return out
    fn = jax.jit(refresh_all).lower(kernels).compile()
    t0 = time.perf_counter()
    projectors = jax.block_until_ready(fn(kernels))
    result[f"{method}_s"] = time.perf_counter() - t0
    energies = {}
    for k, p in projectors.items():
      g = np.swapaxes(mats[k], -1, -2).astype(np.float64)  # (L, in, out)
      p = np.asarray(p, np.float64)
      low = np.einsum("lir,lio->lro", p, g) if plans[k].side == "in" else np.einsum(
          "lio,lor->lir", g, p)
      energies[k] = (np.sum(low**2, axis=(1, 2)) / np.sum(g**2, axis=(1, 2))).tolist()
    result[f"{method}_energy"] = energies
  result["load_after"] = os.getloadavg()[0]
  return result


def peer_child(args) -> dict:
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from galore_torch.galore_projector import GaLoreProjector  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(args.threads)
  mats = {k: torch.from_numpy(v) for k, v in _load(args.matrices).items()}
  result = {"load_before": os.getloadavg()[0]}
  projector = GaLoreProjector(RANK, proj_type="std")
  projector.get_orthogonal_matrix(mats["q_proj"][0], RANK, "right")  # warm-up
  t0 = time.perf_counter()
  energies = {}
  for k, g in sorted(mats.items()):
    energies[k] = []
    for layer in range(g.shape[0]):
      w = g[layer]
      side = "right" if w.shape[0] >= w.shape[1] else "left"
      p = projector.get_orthogonal_matrix(w, RANK, side)
      low = w @ p.T if side == "right" else p.T @ w
      energies[k].append(float((low.double() ** 2).sum() / (w.double() ** 2).sum()))
  result["svd_s"] = time.perf_counter() - t0
  result["svd_energy"] = energies
  result["load_after"] = os.getloadavg()[0]
  del np
  return result


def _child_env(threads: int) -> dict:
  env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
             MKL_NUM_THREADS=str(threads))
  flags = env.get("XLA_FLAGS", "")
  if threads == 1:
    flags += " --xla_cpu_multi_thread_eigen=false"
  env["XLA_FLAGS"] = flags.strip()
  return env


def _run(python, side, args, matrices) -> dict:
  cmd = [python, __file__, "--child", side, "--matrices", str(matrices), "--threads",
         str(args.threads), "--power-iterations", str(args.power_iterations)]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(args.threads),
                        timeout=1800, check=False)
  if proc.returncode:
    return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][-400:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(xs):
  return statistics.median(xs) if xs else float("nan")


def summarize(rounds: list[dict]) -> dict:
  ok = [r for r in rounds if "error" not in r["ours"] and "error" not in r["peer"]]
  ours_svd = [r["ours"]["svd_s"] for r in ok]
  ours_auto = [r["ours"]["auto_s"] for r in ok]
  torch_svd = [r["peer"]["svd_s"] for r in ok]
  speedup = [p / o for p, o in zip(torch_svd, ours_auto)]
  last = ok[-1] if ok else None
  rel = []
  if last:
    for k, exact in last["ours"]["svd_energy"].items():
      rel += [a / e for a, e in zip(last["ours"]["auto_energy"][k], exact)]
  return {"ours_svd_s": ours_svd, "ours_auto_s": ours_auto, "torch_svd_s": torch_svd,
          "torch_over_ours_auto": speedup,
          "auto_energy_vs_svd_mean": _median(rel) if not rel else sum(rel) / len(rel),
          "auto_energy_vs_svd_min": min(rel) if rel else float("nan"),
          "loads": [(r["ours"].get("load_before"), r["peer"].get("load_before")) for r in rounds]}


def markdown(summary: dict, args) -> str:
  def span(xs, unit="s"):
    if not xs:
      return "n/a"
    return f"{_median(xs):.2f} {unit} [{min(xs):.2f}, {max(xs):.2f}]"
  loads = [x for pair in summary["loads"] for x in pair if x is not None]
  return "\n".join([
      f"GaLore refresh of SmolLM2-135M's 210 projected matrices (rank {RANK}, gradient-like "
      f"values), {args.threads} thread(s) per side, {args.rounds} alternating rounds; "
      f"load average at the children's start {min(loads):.1f}-{max(loads):.1f}."
      if loads else "",
      "",
      "| refresh | time, median [min, max] | galore-torch / this | energy vs exact SVD |",
      "|---|---|---|---|",
      f"| galore-torch (torch.linalg.svd) | {span(summary['torch_svd_s'])} | 1.00x | 1.000 |",
      f"| ours, exact SVD (`refresh=\"svd\"`) | {span(summary['ours_svd_s'])} | "
      f"{_median([t / o for t, o in zip(summary['torch_svd_s'], summary['ours_svd_s'])]):.2f}x | 1.000 |",
      f"| ours, default (`refresh=\"auto\"`: randomized, q={args.power_iterations}) | "
      f"{span(summary['ours_auto_s'])} | {span(summary['torch_over_ours_auto'], 'x')} | "
      f"mean {summary['auto_energy_vs_svd_mean']:.4f}, worst {summary['auto_energy_vs_svd_min']:.4f} |",
  ])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--layers", type=int, default=30)
  parser.add_argument("--power-iterations", type=int, default=1)
  parser.add_argument("--quick", action="store_true", help="one round, 4 layers, writes nothing")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--matrices", default=None, help=argparse.SUPPRESS)
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
    rounds = []
    for r in range(args.rounds):
      ours = _run(sys.executable, "ours", args, matrices)
      peer = _run(args.peer_python, "peer", args, matrices)
      rounds.append({"ours": ours, "peer": peer})
      print(f"round {r}: ours svd {ours.get('svd_s', ours.get('error'))} s, auto "
            f"{ours.get('auto_s')} s; galore-torch {peer.get('svd_s', peer.get('error'))} s; "
            f"load {ours.get('load_before')}/{peer.get('load_before')}", flush=True)
  summary = summarize(rounds)
  text = markdown(summary, args)
  print(text)
  if not args.quick:
    sys.path.insert(0, str(HERE))
    import _common as C  # pylint: disable=import-outside-toplevel
    C.write_json(C.RESULTS / "galore_refresh.json", {"machine": C.machine_info(), "args": vars(args),
                                                     "summary": summary, "rounds": rounds})
    (C.RESULTS / "galore_refresh.md").write_text(text + "\n")


if __name__ == "__main__":
  main()
