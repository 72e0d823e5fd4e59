"""Whether adapter leaves can act on the params they sit in (for :func:`combine`).

An adapter whose module has no kernel, or whose shapes cannot multiply that
kernel's, would run with no effect and no error. The check is layout-agnostic
(interleaved ``nn.Einsum`` kernels included): the leading stacked-layer axes
must equal the kernel's, ``lora_a`` and ``lora_b`` must share a rank, and
their non-rank axes must be the kernel's axes.
"""

from __future__ import annotations

import collections
import difflib
from collections.abc import Mapping
from typing import Any

from peft_jax import targeting


def _shape(leaf: Any) -> tuple[int, ...]:
  return tuple(getattr(leaf, "shape", ()))


def no_kernel(module: str, modules) -> str:
  """The line for an adapter site without a weight, naming the closest base modules."""
  close = difflib.get_close_matches(module, list(modules), n=3, cutoff=0.5)
  return f"{module}: no kernel or embedding at this path in the base (closest: {close})"


def misfits(flat: Mapping[str, Any]) -> list[str]:
  """One line per adapter module of a flattened params tree that cannot act."""
  modules = targeting.adaptable_modules(targeting.unflatten(dict(flat)))
  leaves: dict[str, dict[str, Any]] = collections.defaultdict(dict)
  for path, leaf in flat.items():
    module, name = targeting.split_path(path)
    if name in targeting.ADAPTER_LEAVES:
      leaves[module][name] = leaf
  problems = []
  for module, found in sorted(leaves.items()):
    weight = targeting.site_weight(flat, module)  # a module's kernel, or a `<weight>_lora` site's weight
    if weight is None:
      problems.append(no_kernel(module, modules))
      continue
    if "lora_a" not in found or "lora_b" not in found:
      continue
    kernel = _shape(flat[weight])
    a, b = _shape(found["lora_a"]), _shape(found["lora_b"])
    batch = len(a) + len(b) - 2 - len(kernel)
    ok = (batch >= 0 and len(a) - batch >= 2 and len(b) - batch >= 2
          and a[:batch] == b[:batch] == kernel[:batch] and a[-1] == b[batch]
          and sorted(a[batch:-1] + b[batch + 1:]) == sorted(kernel[batch:]))
    if not ok:
      problems.append(f"{module}: lora_a {a} / lora_b {b} do not fit its kernel {kernel}")
  return problems
