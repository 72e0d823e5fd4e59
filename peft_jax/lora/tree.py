"""Separating adapter leaves from base leaves, and putting them back."""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

from peft_jax import targeting
from peft_jax.lora import fit
from peft_jax.lora import saved as saved_lib
from peft_jax.lora.config import LoRAConfig


def is_adapter_path(path: str, config: LoRAConfig | None = None) -> bool:
  """Whether a flattened leaf path names a trainable adapter leaf (or a saved copy)."""
  if saved_lib.is_saved_path(path):
    return True
  leaf = path.rsplit("/", 1)[-1]
  if leaf == "lora_magnitude" and config is not None and not config.magnitude_trainable:
    return False
  return leaf in targeting.ADAPTER_LEAVES


def split(params: Mapping[str, Any], config: LoRAConfig | None = None
          ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Splits params into ``(adapters, base)`` nested dicts.

  Both keep the original nesting, holding only their own leaves, so that
  ``jax.grad(loss)(adapters)`` with ``base`` closed over allocates no gradient
  or optimizer state for the frozen weights.

  Args:
    params: params with adapter leaves (``{'params': ...}`` or the inner dict).
    config: when given with ``use_dora`` and ``magnitude_trainable=False``,
      DoRA magnitudes stay in the base.

  Returns:
    ``(adapters, base)``, wrapped as the input was.

  Raises:
    ValueError: when the tree holds no adapter leaves (nothing would train).
  """
  inner, wrapped = targeting.unwrap_params(params)
  flat = targeting.flatten(inner)
  adapters = {p: v for p, v in flat.items() if is_adapter_path(p, config)}
  if not adapters:
    raise ValueError("These params hold no adapter leaves (lora_a, lora_b, ...): "
                     "call peft_jax.lora_transform first, or nothing would train.")
  base = {p: v for p, v in flat.items() if p not in adapters}
  adapters, base = targeting.unflatten(adapters), targeting.unflatten(base)
  if wrapped:
    return {"params": adapters}, {"params": base}
  return adapters, base


def combine(base: Mapping[str, Any], adapters: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of :func:`split`: a deep union of two disjoint trees.

  Raises:
    ValueError: a leaf in both trees, or adapters that cannot act on the base
      (no kernel at their module, shapes that do not fit it); all are named.
  """
  base_inner, base_wrapped = targeting.unwrap_params(base)
  adapters_inner, _ = targeting.unwrap_params(adapters)
  flat = targeting.flatten(base_inner)
  for path, value in targeting.flatten(adapters_inner).items():
    if path in flat:
      raise ValueError(f"Leaf {path!r} is in both trees; combine expects disjoint trees.")
    flat[path] = value
  problems = fit.misfits(flat) + saved_lib.misfits(flat)
  if problems:
    raise ValueError(f"{len(problems)} adapter module(s) would do nothing on this base:\n  "
                     + "\n  ".join(problems))
  out = targeting.unflatten(flat)
  return {"params": out} if base_wrapped else out


def adapter_paths(params: Mapping[str, Any]) -> list[str]:
  """Module paths that hold ``lora_a``."""
  inner, _ = targeting.unwrap_params(params)
  return [p[: -len("/lora_a")] for p in targeting.flatten(inner) if p.endswith("/lora_a")]


def adapter_modules(adapters: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """Groups adapter leaves by module: ``{module_path: {'lora_a': ..., ...}}``."""
  flat = targeting.flatten(targeting.unwrap_params(adapters)[0])
  modules: dict[str, dict[str, Any]] = collections.defaultdict(dict)
  for path, leaf in flat.items():
    module, name = targeting.split_path(path)
    if name in targeting.ADAPTER_LEAVES:
      modules[module][name] = leaf
  return dict(modules)
