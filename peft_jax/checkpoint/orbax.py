"""Orbax checkpoints of adapters (never the base), with their config beside them.

A checkpoint is an Orbax composite with three items::

    <checkpoint>/adapters   the adapter leaves (a PyTree item)
    <checkpoint>/config     the LoRAConfig as JSON (``LoRAConfig.to_dict``)
    <checkpoint>/manifest   JSON: format version, wrapping, quantized leaves

:func:`save` writes one such checkpoint either at ``directory`` itself or,
given ``step``, at ``directory/<step>`` (the layout of an Orbax
``CheckpointManager``, so :class:`AdapterCheckpointManager` and :func:`restore`
read each other's files). Orbax writes into a temporary folder and renames it
when every array is on disk, so a save killed midway never replaces or
damages a finished checkpoint: :func:`restore` on a step root picks the latest
*finished* step.

:func:`save_params` / :func:`restore_params` store a whole params tree (for
example a quantized base with ``NF4Array`` leaves) in the same format.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from peft_jax import targeting
from peft_jax.lora import layout as layout_lib
from peft_jax.lora.config import LoRAConfig, config_from_dict
from peft_jax.lora.transform import is_quantized
from peft_jax.lora.tree import is_adapter_path

CHECKPOINT_FORMAT_VERSION = 1

_ITEMS = ("adapters", "config", "manifest")
_STEP_NAME = re.compile(r"\d+")
# Quantized leaves are rebuilt by class name; only our own classes are trusted.
_TRUSTED_MODULE_PREFIX = "peft_jax."


# -- tree encoding ----------------------------------------------------------------
def _encode_static(value: Any) -> Any:
  """JSON form of a quantized array's static field (tuples, dtypes, None)."""
  if isinstance(value, tuple):
    return {"tuple": [_encode_static(v) for v in value]}
  if isinstance(value, (np.dtype, type)):
    return {"dtype": jnp.dtype(value).name}
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(f"Cannot store static field value {value!r} of type {type(value).__name__}.")


def _decode_static(value: Any) -> Any:
  if isinstance(value, dict) and set(value) == {"tuple"}:
    return tuple(_decode_static(v) for v in value["tuple"])
  if isinstance(value, dict) and set(value) == {"dtype"}:
    return np.dtype(jnp.dtype(value["dtype"]))
  return value


def _encode_tree(tree: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """Plain nested dict of arrays + JSON description of the quantized leaves."""
  flat = targeting.flatten(tree)
  arrays, quantized = {}, {}
  for path, leaf in flat.items():
    if is_quantized(leaf) and dataclasses.is_dataclass(leaf):
      cls = type(leaf)
      array_fields, static_fields = {}, {}
      for field in dataclasses.fields(leaf):
        value = getattr(leaf, field.name)
        if isinstance(value, (jax.Array, np.ndarray)):
          arrays[f"{path}/{field.name}"] = jnp.asarray(value)
          array_fields[field.name] = True
        elif value is None:
          static_fields[field.name] = None
        else:
          static_fields[field.name] = _encode_static(value)
      quantized[path] = {"class": f"{cls.__module__}.{cls.__qualname__}",
                         "arrays": sorted(array_fields), "static": static_fields}
    elif isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
      arrays[path] = jnp.asarray(leaf)
    else:
      raise TypeError(f"Leaf {path!r} of type {type(leaf).__name__} is not an array.")
  return targeting.unflatten(arrays), quantized


def _quantized_class(name: str) -> type:
  module_name, _, qualname = name.rpartition(".")
  if not module_name.startswith(_TRUSTED_MODULE_PREFIX):
    raise ValueError(f"Refusing to rebuild a leaf of class {name!r}: not a peft_jax class.")
  return getattr(importlib.import_module(module_name), qualname)


def _decode_tree(arrays: Mapping[str, Any], quantized: Mapping[str, Any]) -> dict[str, Any]:
  flat = targeting.flatten(arrays)
  for path, spec in quantized.items():
    cls = _quantized_class(spec["class"])
    fields = {name: _decode_static(v) for name, v in spec["static"].items()}
    for name in spec["arrays"]:
      fields[name] = flat.pop(f"{path}/{name}")
    flat[path] = cls(**fields)
  return targeting.unflatten(flat)


# -- validation -------------------------------------------------------------------
def adapter_mismatches(adapters: Mapping[str, Any], base_params: Mapping[str, Any],
                       config: LoRAConfig | None = None, *,
                       layouts: Mapping[str, layout_lib.KernelLayout] | None = None) -> list[str]:
  """Every reason why ``adapters`` do not fit ``base_params`` (empty when they fit).

  Args:
    adapters: adapter leaves (``lora_a``, ``lora_b``, ``lora_magnitude``, ...).
    base_params: the base params the adapters are meant for (kernels may be
      quantized arrays).
    config: when given, each module's rank must equal ``config.rank_for``.
    layouts: kernel layouts for interleaved ``nn.Einsum`` kernels.

  Returns:
    Human-readable mismatch lines, one per problem.
  """
  adapter_flat = targeting.flatten(targeting.unwrap_params(adapters)[0])
  base_flat = targeting.flatten(targeting.unwrap_params(base_params)[0])
  modules = targeting.adaptable_modules(targeting.unwrap_params(base_params)[0])
  problems = []
  by_module: dict[str, dict[str, Any]] = {}
  for path, leaf in adapter_flat.items():
    module, name = targeting.split_path(path)
    by_module.setdefault(module, {})[name] = leaf
  for module, leaves in sorted(by_module.items()):
    if module not in modules:
      close = difflib.get_close_matches(module, list(modules), n=3, cutoff=0.5)
      problems.append(f"{module}: no kernel or embedding at this path in the base "
                      f"(closest: {close})")
      continue
    kernel = base_flat[f"{module}/{modules[module]}"]
    kernel_shape = tuple(kernel.shape)
    already = [n for n in leaves if f"{module}/{n}" in base_flat]
    if already:
      problems.append(f"{module}: the base already holds {already}")
    lora_a, lora_b = leaves.get("lora_a"), leaves.get("lora_b")
    if lora_a is None or lora_b is None:
      problems.append(f"{module}: lora_a and lora_b must come together, found {sorted(leaves)}")
      continue
    try:
      layout = (layouts or {}).get(module) or layout_lib.layout_from_adapters(
          kernel_shape, lora_a.shape, lora_b.shape)
      layout_lib.check_adapter_shapes(module, kernel_shape, lora_a.shape, lora_b.shape, layout)
    except ValueError as e:
      problems.append(f"{module}: {e}")
      continue
    magnitude = leaves.get("lora_magnitude")
    want = kernel_shape[: layout.batch_ndim] + layout.out_shape(kernel_shape)
    if magnitude is not None and tuple(magnitude.shape) != want:
      problems.append(f"{module}: lora_magnitude {tuple(magnitude.shape)} should be {want}")
    rank = lora_a.shape[-1]
    if config is not None and "lora_e" not in leaves and rank != config.rank_for(module):
      problems.append(f"{module}: rank {rank} but the config gives {config.rank_for(module)}")
  return problems


def check_adapters_fit(adapters: Mapping[str, Any], base_params: Mapping[str, Any],
                       config: LoRAConfig | None = None, **kwargs) -> None:
  """Raises a ``ValueError`` listing every mismatch of :func:`adapter_mismatches`."""
  problems = adapter_mismatches(adapters, base_params, config, **kwargs)
  if problems:
    listing = "\n  ".join(problems)
    raise ValueError(f"The adapters do not fit the base params ({len(problems)} "
                     f"mismatches):\n  {listing}")


# -- single checkpoints -----------------------------------------------------------
def _only_adapters(tree: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
  inner, wrapped = targeting.unwrap_params(tree)
  flat = targeting.flatten(inner)
  kept = {p: v for p, v in flat.items() if is_adapter_path(p)}
  if not kept:
    raise ValueError("No adapter leaves (lora_a, lora_b, ...) to save.")
  return targeting.unflatten(kept), wrapped


def _composite_save_args(tree, config: LoRAConfig | None, kind: str, wrapped: bool):
  arrays, quantized = _encode_tree(tree)
  manifest = {"format_version": CHECKPOINT_FORMAT_VERSION, "kind": kind,
              "wrapped": wrapped, "quantized": quantized}
  items = {"adapters": ocp.args.StandardSave(arrays), "manifest": ocp.args.JsonSave(manifest)}
  if config is not None:
    items["config"] = ocp.args.JsonSave(config.to_dict())
  return ocp.args.Composite(**items)


def _checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _is_checkpoint(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "manifest"))


def finished_steps(directory: str | os.PathLike) -> list[int]:
  """Steps under ``directory`` whose save completed (unfinished ones are skipped)."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if _STEP_NAME.fullmatch(n) and _is_checkpoint(os.path.join(directory, n)))


def _resolve(directory: str | os.PathLike, step: int | None) -> str:
  directory = os.path.abspath(os.fspath(directory))
  if step is not None:
    path = os.path.join(directory, str(step))
    if not _is_checkpoint(path):
      raise FileNotFoundError(f"No finished checkpoint for step {step} in {directory} "
                              f"(finished steps: {finished_steps(directory)}).")
    return path
  if _is_checkpoint(directory):
    return directory
  steps = finished_steps(directory)
  if not steps:
    raise FileNotFoundError(f"No finished peft_jax checkpoint at or under {directory}.")
  return os.path.join(directory, str(steps[-1]))


def _check_manifest(manifest: Mapping[str, Any], path: str, kind: str) -> None:
  version = manifest.get("format_version", CHECKPOINT_FORMAT_VERSION)
  if version > CHECKPOINT_FORMAT_VERSION:
    raise ValueError(
        f"Checkpoint {path} has format version {version}, newer than this peft_jax "
        f"reads ({CHECKPOINT_FORMAT_VERSION}); upgrade peft_jax to restore it.")
  if manifest.get("kind") != kind:
    raise ValueError(f"Checkpoint {path} holds {manifest.get('kind')!r}, not {kind!r}.")


def _restore_target(path: str, shardings: Any) -> Any:
  """Abstract arrays, shaped as the checkpoint says, on the caller's ``shardings``.

  Orbax refuses to restore without a target onto another device topology
  (8 devices -> 4 or 1); this target is what lets it.
  """
  meta = ocp.StandardCheckpointer().metadata(os.path.join(path, "adapters")).item_metadata
  wanted = targeting.flatten(targeting.unwrap_params(shardings)[0])

  def leaf(key_path, m):
    name = "/".join(str(getattr(k, "key", k)) for k in key_path)
    if name not in wanted:
      raise ValueError(f"The checkpoint at {path} holds {name!r}; shardings has no entry for it.")
    return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=wanted[name])

  return jax.tree_util.tree_map_with_path(leaf, meta)


def _read(path: str, kind: str, with_config: bool, shardings: Any = None):
  checkpointer = _checkpointer()
  manifest = checkpointer.restore(
      path, args=ocp.args.Composite(manifest=ocp.args.JsonRestore()))["manifest"]
  _check_manifest(manifest, path, kind)
  config_dict = None
  if with_config:
    config_dict = checkpointer.restore(
        path, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    # Refuse a newer config before reading any array.
    config = config_from_dict(config_dict)
  target = None if shardings is None else _restore_target(path, shardings)
  arrays = checkpointer.restore(
      path, args=ocp.args.Composite(adapters=ocp.args.StandardRestore(target)))["adapters"]
  tree = _decode_tree(arrays, manifest.get("quantized", {}))
  tree = jax.tree.map(jnp.asarray, tree)
  if manifest.get("wrapped"):
    tree = {"params": tree}
  return tree, (config if with_config else None)


def save(directory: str | os.PathLike, adapters: Mapping[str, Any], config: LoRAConfig,
         step: int | None = None, *, overwrite: bool = False) -> str:
  """Saves adapter leaves and their config as one Orbax checkpoint.

  Only adapter leaves are written: passing full params (base + adapters) saves
  the adapters alone, so a checkpoint is megabytes, not the model.

  Args:
    directory: the checkpoint folder (``step=None``) or the root of a run's
      step folders (``directory/<step>``).
    adapters: adapter tree from :func:`peft_jax.split` (or full params).
    config: the config the adapters were made with.
    step: training step; the checkpoint goes to ``directory/<step>``.
    overwrite: replace an existing checkpoint at the same place. Replacing is
      not crash-safe; keep steps for that.

  Returns:
    The absolute path of the written checkpoint.

  Raises:
    FileExistsError: a checkpoint is already there and ``overwrite`` is False.
  """
  tree, wrapped = _only_adapters(adapters)
  directory = os.path.abspath(os.fspath(directory))
  path = directory if step is None else os.path.join(directory, str(int(step)))
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True or save under a new step.")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  _checkpointer().save(path, args=_composite_save_args(tree, config, "adapters", wrapped),
                       force=overwrite)
  return path


def restore(directory: str | os.PathLike, base_params: Mapping[str, Any] | None = None, *,
            step: int | None = None,
            layouts: Mapping[str, layout_lib.KernelLayout] | None = None,
            shardings: Any = None) -> tuple[dict[str, Any], LoRAConfig]:
  """Restores ``(adapters, config)`` saved by :func:`save` or the manager.

  Args:
    directory: a checkpoint folder, or a root of step folders (the latest
      finished step is read unless ``step`` is given).
    base_params: when given, the adapters are checked against it: every
      module must exist with a kernel whose shape fits the adapter shapes.
    step: the step to read under a root.
    layouts: kernel layouts for interleaved ``nn.Einsum`` kernels.
    shardings: a tree of ``jax.sharding.Sharding`` shaped like the adapters
      (e.g. ``peft_jax.sharding.to_shardings(specs, mesh)``): the adapters
      are placed there, whatever mesh saved them (8 devices -> 4, or one).

  Returns:
    ``(adapters, config)``, the adapters wrapped as they were saved.

  Raises:
    FileNotFoundError: no finished checkpoint there.
    ValueError: a checkpoint or config from a newer format version, or
      adapters that do not fit ``base_params`` (every mismatch is listed).
  """
  path = _resolve(directory, step)
  adapters, config = _read(path, "adapters", with_config=True, shardings=shardings)
  if base_params is not None:
    check_adapters_fit(adapters, base_params, config, layouts=layouts)
  return adapters, config


def save_params(directory: str | os.PathLike, params: Mapping[str, Any], *,
                overwrite: bool = False) -> str:
  """Saves a whole params tree, quantized (``NF4Array``) leaves included, exactly.

  For a base you quantized once and want to reload without quantizing again.
  Adapter checkpoints should use :func:`save`, which never writes the base.
  """
  inner, wrapped = targeting.unwrap_params(params)
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory) and not overwrite:
    raise FileExistsError(f"{directory} exists; pass overwrite=True.")
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  _checkpointer().save(directory, args=_composite_save_args(inner, None, "params", wrapped),
                       force=overwrite)
  return directory


def restore_params(directory: str | os.PathLike) -> dict[str, Any]:
  """Inverse of :func:`save_params`: the identical tree, leaf classes included."""
  path = os.path.abspath(os.fspath(directory))
  if not _is_checkpoint(path):
    raise FileNotFoundError(f"No finished peft_jax checkpoint at {path}.")
  params, _ = _read(path, "params", with_config=False)
  return params


# -- training runs ------------------------------------------------------------------
class AdapterCheckpointManager:
  """Periodic adapter checkpoints for a training run (an Orbax ``CheckpointManager``).

  Keeps the last ``max_to_keep`` steps, saves only every
  ``save_interval_steps``, and writes in the background (Orbax async
  checkpointing) so training continues while arrays go to disk. An optimizer
  state can ride along.

  Example::

    with AdapterCheckpointManager(run_dir, config, max_to_keep=3,
                                  save_interval_steps=100) as manager:
      for step in range(num_steps):
        adapters, opt_state = train_step(adapters, opt_state, batch)
        manager.save(step, adapters, opt_state=opt_state)
    adapters, config = restore(run_dir, base_params=base)
  """

  def __init__(self, directory: str | os.PathLike, config: LoRAConfig, *,
               max_to_keep: int | None = 3, save_interval_steps: int = 1,
               async_save: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    self.config = config
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=_ITEMS + ("opt_state",))

  def save(self, step: int, adapters: Mapping[str, Any], *, opt_state: Any = None,
           force: bool = False) -> bool:
    """Saves when ``step`` is due (or ``force``); returns whether it saved."""
    tree, wrapped = _only_adapters(adapters)
    args = dict(_composite_save_args(tree, self.config, "adapters", wrapped).items())
    if opt_state is not None:
      args["opt_state"] = ocp.args.StandardSave(opt_state)
    return self._manager.save(int(step), args=ocp.args.Composite(**args), force=force)

  def restore(self, step: int | None = None, *, base_params: Mapping[str, Any] | None = None,
              shardings: Any = None) -> tuple[dict[str, Any], LoRAConfig]:
    """``(adapters, config)`` of ``step`` (default: the latest finished one).

    ``shardings``: where to place the adapters (see :func:`restore`).
    """
    self.wait_until_finished()
    return restore(self.directory, base_params, step=step, shardings=shardings)

  def restore_opt_state(self, target: Any, step: int | None = None) -> Any:
    """The optimizer state saved with ``step``, restored into ``target``'s structure.

    The arrays take ``target``'s shardings (arrays, or ``jax.ShapeDtypeStruct``
    with ``sharding=``), so a state saved on one mesh restores onto another.
    """
    self.wait_until_finished()
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(
        step, args=ocp.args.Composite(opt_state=ocp.args.StandardRestore(target)))
    return restored["opt_state"]

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def wait_until_finished(self) -> None:
    """Blocks until background saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> "AdapterCheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def save_lora_state_dict(directory: str | os.PathLike, adapters: Mapping[str, Any],
                         config: LoRAConfig, **kwargs) -> str:
  """The seed document's name for :func:`save`: the adapters alone, with their config."""
  return save(directory, adapters, config, **kwargs)


def load_lora_state_dict(directory: str | os.PathLike,
                         base_params: Mapping[str, Any] | None = None, **kwargs
                         ) -> tuple[dict[str, Any], LoRAConfig]:
  """The seed document's name for :func:`restore`."""
  return restore(directory, base_params, **kwargs)
