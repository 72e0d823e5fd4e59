"""Helpers shared by the benchmarks (see ../shared/BENCHMARKS.md for the method).

* :func:`machine_info`: CPU model, core count, load, library versions, date.
* :func:`time_interleaved`: A B C A B C ... repetitions, median / min / max.
* :func:`ratio`: a method's timing over its baseline from the same run.
* :func:`memory_analysis`: ``compiled.memory_analysis()`` as a dict, with
  ``step_bytes = arguments + temporaries + outputs - aliased``.
* :func:`flops`: ``compiled.cost_analysis()["flops"]``.
* :func:`peak_rss_subprocess`: peak RSS of a fresh Python subprocess.
* :func:`merge_model_blocks`: one results file, one block per model.
* :func:`tree_bytes`, :func:`write_json`, :func:`markdown_table`, :func:`mib`.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _version(module: str) -> str | None:
  try:
    return __import__(module).__version__
  except Exception:  # pylint: disable=broad-except
    return None


def machine_info() -> dict[str, Any]:
  """The machine and software a result was measured on."""
  try:
    load = list(os.getloadavg())
  except OSError:
    load = None
  return {
      "cpu": cpu_model(),
      "cpu_count": os.cpu_count(),
      "load_average_1_5_15": load,
      "platform": platform.platform(),
      "python": platform.python_version(),
      "jax": _version("jax"),
      "jaxlib": _version("jaxlib"),
      "flax": _version("flax"),
      "optax": _version("optax"),
      "numpy": np.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def summarize(times: Sequence[float]) -> dict[str, Any]:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "raw_s": list(times)}


def time_interleaved(fns: Mapping[str, Callable[[], Any]], *, reps: int, inner: int = 1,
                     warmup: int = 1) -> dict[str, dict[str, Any]]:
  """Times each zero-argument ``fn`` interleaved: A B C A B C ...

  Each ``fn()`` runs one unit of work and returns what to block on; a rep
  runs it ``inner`` times and counts the mean. Stateful work (a train step
  that donates its state) keeps its state in a closure.

  Returns:
    ``{name: {"median_s", "min_s", "max_s", "raw_s"}}`` per unit of work.
  """
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  raw: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      for _ in range(inner):
        out = fn()
      jax.block_until_ready(out)
      raw[name].append((time.perf_counter() - t0) / inner)
  return {name: summarize(t) for name, t in raw.items()}


def ratio(timings: Mapping[str, Mapping[str, Any]], name: str, baseline: str) -> dict[str, float]:
  """``name`` over ``baseline``: ratio of medians, and the spread of per-rep ratios.

  Rep i of both methods ran back to back, so the per-rep ratios cancel slow
  drift of the machine; their min and max are the spread shown.
  """
  a, b = timings[name], timings[baseline]
  paired = [x / y for x, y in zip(a["raw_s"], b["raw_s"])]
  return {"ratio": a["median_s"] / b["median_s"], "paired_median": statistics.median(paired),
          "paired_min": min(paired), "paired_max": max(paired)}


def memory_analysis(compiled) -> dict[str, int] | None:
  """Bytes of a compiled executable; ``step_bytes`` = args + temps + outputs - aliased."""
  try:
    m = compiled.memory_analysis()
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "generated_code_bytes": int(m.generated_code_size_in_bytes),
    }
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    return None
  out["step_bytes"] = (out["argument_bytes"] + out["temp_bytes"] + out["output_bytes"]
                       - out["alias_bytes"])
  return out


def flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    return float(cost["flops"])
  except Exception:  # pylint: disable=broad-except
    return None


def _leaf_bytes(x) -> int:
  if not hasattr(x, "dtype"):
    return 0
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return 8
  return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def tree_bytes(tree) -> int:
  return int(sum(_leaf_bytes(x) for x in jax.tree.leaves(tree)))


def _proc_status_bytes(field: str) -> int | None:
  try:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024  # kB
  except (OSError, ValueError, IndexError):
    pass
  return None


def peak_rss_self() -> int:
  """This process's peak resident set size in bytes.

  ``VmHWM`` from ``/proc/self/status`` where there is one: on Linux
  ``ru_maxrss`` of a process started by fork + exec also counts the parent's
  RSS at the fork, so a fresh child of a large parent would report the
  parent's size. Elsewhere ``ru_maxrss`` (Linux and BSD report KiB).
  """
  hwm = _proc_status_bytes("VmHWM")
  return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_now() -> int | None:
  """This process's current resident set size in bytes (``VmRSS``), or None."""
  return _proc_status_bytes("VmRSS")


def peak_rss_subprocess(argv: Sequence[str], *, timeout: float = 600) -> dict[str, Any]:
  """Runs ``python argv...`` in a fresh process; returns its last stdout JSON line.

  The child is expected to print one JSON object as its last line (with its
  own :func:`peak_rss_self`); the parent adds the wall time.
  """
  t0 = time.perf_counter()
  proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    stdout, stderr = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    stdout, stderr = proc.communicate()
    raise RuntimeError(f"{argv} timed out after {timeout}s:\n{stderr[-2000:]}") from None
  if proc.returncode:
    raise RuntimeError(f"{argv} failed ({proc.returncode}):\n{stderr[-4000:]}")
  lines = [line for line in stdout.splitlines() if line.strip()]
  result = json.loads(lines[-1])
  result["wall_s"] = time.perf_counter() - t0
  return result


def write_json(path: pathlib.Path, result: Mapping[str, Any]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1, default=str) + "\n")


def merge_model_blocks(existing: Mapping[str, Any] | None, existing_md: str | None,
                       blocks: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str]
                       ) -> tuple[dict, str]:
  """A results file holding ``blocks`` (model -> result with a ``"text"``) and the others' old ones.

  ``existing`` is the file's JSON; one from before the per-model layout (no
  ``"models"`` key) is the first model's block, its text the old markdown.
  Blocks are ordered as ``labels``, then unknown models by name; the
  markdown has one ``## <label>`` section per block.
  """
  old = {}
  if existing and "models" in existing:
    old = dict(existing["models"])
  elif existing:
    old = {next(iter(labels)): dict(existing, text=(existing_md or "").strip())}
  old.update(blocks)
  ordered = {name: old[name] for name in [*labels, *sorted(set(old) - set(labels))]
             if name in old}
  text = "\n\n".join(f"## {labels.get(name, name)}\n\n{block['text'].strip()}"
                      for name, block in ordered.items())
  return {"models": ordered}, text + "\n"


def mib(b: float | None) -> str:
  return "n/a" if b is None else f"{b / 2**20:.1f} MiB"


def ms(s: float | None) -> str:
  return "n/a" if s is None else f"{s * 1e3:.1f} ms"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def machine_line(m: Mapping[str, Any]) -> str:
  load = m.get("load_average_1_5_15")
  load_s = f", load {load[0]:.1f}" if load else ""
  return (f"{m['cpu']} ({m['cpu_count']} cores{load_s}), {m['backend']}, python {m['python']}, "
          f"jax {m['jax']}, flax {m['flax']}, optax {m['optax']}, {m['date']}.")
