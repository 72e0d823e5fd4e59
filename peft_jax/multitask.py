"""Several task adapters over one base: named adapters, switching, mixed-adapter batches.

Named adapters are plain data, a ``{name: TaskAdapter(adapters, config)}``
mapping; switching task is :func:`with_adapter`, which puts another
adapter tree beside the *same* base arrays (nothing is reloaded or copied)::

    library = {"task1": load_named(run_dir, "task1"), "task2": load_named(run_dir, "task2")}
    params, config = with_adapter(base, library, "task1")
    logits = peft_jax.apply(model, params, tokens, config=config)

Mixed-adapter batches serve many tasks in one call: :func:`stack_adapters`
stacks K adapters (ranks zero-padded to the largest; a module an adapter
does not touch gets zeros), :func:`attach` puts the stack beside the base
kernels, and inside :func:`mixed_adapters` every module holding a stack
(``nn.Dense``, ``nn.Embed``, ``DenseGeneral``, ``Einsum``, custom modules) adds,
for example ``b`` of the batch,
``scale[k_b] * (x_b A[k_b]) B[k_b]`` with ``k_b = adapter_index[b]`` (a
per-example gather of the stacked A and B, as in S-LoRA/Punica). Index ``-1``
runs the base alone. Each row equals running it alone with its own adapter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peft_jax import targeting
from peft_jax.lora.tree import adapter_modules
from peft_jax.checkpoint import orbax as checkpoint_lib
from peft_jax.checkpoint.untrusted import check_name
from peft_jax.lora.config import LoRAConfig
from peft_jax.lora.interceptor import intercept
from peft_jax.lora.layout import KernelLayout
from peft_jax.lora.saved import is_saved_path
from peft_jax.lora.tree import combine

STACK_LEAVES = ("lora_a_stack", "lora_b_stack", "lora_scale_stack")


class TaskAdapter(NamedTuple):
  """One named task's adapter leaves and the config they were trained with."""

  adapters: dict[str, Any]
  config: LoRAConfig


# -- named adapters -----------------------------------------------------------------
def save_named(directory: str | os.PathLike, name: str, adapters: Mapping[str, Any],
               config: LoRAConfig, **kwargs) -> str:
  """Saves one task's adapters alone to ``directory/name`` (:func:`peft_jax.checkpoint.save`)."""
  check_name(name)
  return checkpoint_lib.save(os.path.join(os.fspath(directory), name), adapters, config, **kwargs)


def load_named(directory: str | os.PathLike, name: str,
               base_params: Mapping[str, Any] | None = None) -> TaskAdapter:
  """Loads one task's adapters, checked against ``base_params`` when given."""
  check_name(name)
  adapters, config = checkpoint_lib.restore(os.path.join(os.fspath(directory), name), base_params)
  return TaskAdapter(adapters, config)


def saved_names(directory: str | os.PathLike) -> list[str]:
  """Names of the task adapters saved under ``directory``."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    return []
  return sorted(n for n in os.listdir(directory)
                if os.path.isdir(os.path.join(directory, n, "manifest"))
                or checkpoint_lib.finished_steps(os.path.join(directory, n)))


def with_adapter(base_params: Mapping[str, Any], library: Mapping[str, TaskAdapter],
                 name: str) -> tuple[dict[str, Any], LoRAConfig]:
  """``(params, config)`` running task ``name`` on the unchanged base arrays.

  Raises:
    KeyError: ``name`` is not in the library (the known names are listed).
  """
  if name not in library:
    raise KeyError(f"No adapter named {name!r}; known: {sorted(library)}.")
  adapters, config = library[name]
  return combine(base_params, adapters), config


# -- mixed-adapter batches -----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AdapterStack:
  """K adapters stacked for mixed batches.

  Attributes:
    names: the adapter names; ``adapter_index`` values index this tuple.
    leaves: nested dict, per module ``lora_a_stack`` (batch + ``(K, in, r)``),
      ``lora_b_stack`` (batch + ``(K, r, out)``) and ``lora_scale_stack``
      (batch + ``(K,)``), ``batch`` being the stacked-layer axes of scanned
      models.
  """

  names: tuple[str, ...]
  leaves: dict[str, Any]

  def index(self, names: Sequence[str | None]) -> jax.Array:
    """``adapter_index`` for a batch given each example's adapter name (None: base)."""
    lookup = {n: i for i, n in enumerate(self.names)}
    missing = sorted({n for n in names if n is not None and n not in lookup})
    if missing:
      raise KeyError(f"Unknown adapter names {missing}; stacked: {list(self.names)}.")
    return jnp.asarray([-1 if n is None else lookup[n] for n in names], jnp.int32)


def _module_leaves(adapters: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  return adapter_modules(adapters)


def stack_adapters(library: Mapping[str, TaskAdapter], *,
                   layouts: Mapping[str, KernelLayout] | None = None) -> AdapterStack:
  """Stacks named LoRA adapters for :func:`mixed_adapters`.

  Adapters may differ in rank, alpha, rsLoRA and targets: ranks are
  zero-padded (zero columns add nothing), each adapter keeps its own scale,
  and a module an adapter lacks holds zeros for it.

  Args:
    library: ``{name: TaskAdapter}``; the order fixes the indices.
    layouts: stacked-layer axes of adapters whose kernels have more than one
      input or output axis (default: one input axis, so ``lora_a.ndim - 2``
      leading layer axes).

  Returns:
    The :class:`AdapterStack`.

  Raises:
    ValueError: DoRA or AdaLoRA adapters (their magnitudes and singular
      values are per adapter and per kernel; merge them per task instead),
      saved copies (``modules_to_save``, ``bias``: use :func:`with_adapter`), or
      adapters whose shapes disagree across tasks.
  """
  if not library:
    raise ValueError("Pass at least one adapter to stack.")
  names = tuple(library)
  for name in names:
    copies = [p for p in targeting.flatten(targeting.unwrap_params(library[name].adapters)[0])
              if is_saved_path(p)]
    if copies:
      raise ValueError(
          f"Adapter {name!r} holds saved copies ({copies[0]!r}, modules_to_save or bias): "
          "mixed-adapter batches stack LoRA factors only. Serve it with with_adapter.")
  per_task = [_module_leaves(library[n].adapters) for n in names]
  modules = sorted({m for leaves in per_task for m in leaves})
  flat = {}
  for module in modules:
    present = [(k, leaves[module]) for k, leaves in enumerate(per_task) if module in leaves]
    for k, leaves in present:
      extra = sorted(set(leaves) - {"lora_a", "lora_b"})
      if extra:
        raise ValueError(f"Adapter {names[k]!r} holds {extra} at {module!r}: only LoRA/rsLoRA "
                         "adapters mix in one batch; merge DoRA adapters per task instead.")
    lora_a0, lora_b0 = present[0][1]["lora_a"], present[0][1]["lora_b"]
    layout = (layouts or {}).get(module) or (layouts or {}).get(targeting.site_target(module))
    batch = layout.batch_ndim if layout is not None else lora_a0.ndim - 2
    lead, in_shape = lora_a0.shape[:batch], lora_a0.shape[batch:-1]
    out_shape = lora_b0.shape[batch + 1:]
    max_rank = max(leaves["lora_a"].shape[-1] for _, leaves in present)
    dtype = jnp.result_type(*[leaves[n] for _, leaves in present for n in ("lora_a", "lora_b")])
    a_stack = jnp.zeros(lead + (len(names),) + in_shape + (max_rank,), dtype)
    b_stack = jnp.zeros(lead + (len(names), max_rank) + out_shape, dtype)
    scales = jnp.zeros(lead + (len(names),), jnp.float32)
    for k, leaves in present:
      lora_a, lora_b = leaves["lora_a"], leaves["lora_b"]
      rank = lora_a.shape[-1]
      if lora_a.shape[:-1] != lead + in_shape or lora_b.shape != lead + (rank,) + out_shape:
        raise ValueError(f"Adapter {names[k]!r} at {module!r} has shapes {lora_a.shape} / "
                         f"{lora_b.shape}, unlike {names[present[0][0]]!r}.")
      at = (slice(None),) * batch + (k,)
      a_stack = a_stack.at[at + (Ellipsis, slice(0, rank))].set(lora_a.astype(dtype))
      b_stack = b_stack.at[at + (slice(0, rank),)].set(lora_b.astype(dtype))
      scales = scales.at[at].set(library[names[k]].config.scale_for(module, rank))
    flat[f"{module}/lora_a_stack"] = a_stack
    flat[f"{module}/lora_b_stack"] = b_stack
    flat[f"{module}/lora_scale_stack"] = scales
  return AdapterStack(names, targeting.unflatten(flat))


def attach(base_params: Mapping[str, Any], stack: AdapterStack) -> dict[str, Any]:
  """The base params with the stacked leaves beside their kernels."""
  base_inner, wrapped = targeting.unwrap_params(base_params)
  base_flat = targeting.flatten(base_inner)
  missing = sorted(targeting.split_path(p)[0] for p in targeting.flatten(stack.leaves)
                   if p.endswith("/lora_a_stack")
                   and targeting.site_weight(base_flat, targeting.split_path(p)[0]) is None)
  if missing:
    raise ValueError(f"Stacked adapters for modules the base lacks: {missing}.")
  out = combine(base_inner, stack.leaves)
  return {"params": out} if wrapped else out


@contextlib.contextmanager
def mixed_adapters(adapter_index: jax.Array, config: LoRAConfig | None = None
                   ) -> Iterator[None]:
  """Runs a batch whose example ``b`` uses stacked adapter ``adapter_index[b]``.

  :func:`peft_jax.intercept` with the stacked leaves of :func:`attach`
  active (quantized base kernels and ordinary adapter leaves keep working).
  Every module kind of the single-adapter path mixes: ``nn.Dense`` and
  ``nn.Embed`` directly, ``DenseGeneral``, ``Einsum`` and custom modules
  through their products (:mod:`peft_jax.lora.ops`); ``nn.Conv`` refuses.
  Serving only: no adapter dropout.

  Args:
    adapter_index: int ``(batch,)``; ``-1`` runs an example on the base alone.
      Concrete indices outside ``[-1, K)`` raise; under ``jax.jit`` the
      indices are traced and cannot be checked in Python, so those rows
      come out NaN (check first with :meth:`AdapterStack.index`).
    config: config for ordinary adapters or a quantized base, if any.

  Example::

    stack = stack_adapters(library)
    params = attach(base, stack)
    with mixed_adapters(stack.index(["task1", "task2", None])):
      logits = model.apply({"params": params}, tokens)
  """
  with intercept(config, deterministic=True, adapter_index=adapter_index):
    yield
