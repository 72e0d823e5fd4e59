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

import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from peft_jax import targeting
from peft_jax.checkpoint import files
from peft_jax.checkpoint import leaves as leaves_lib
from peft_jax.checkpoint import untrusted as ut
from peft_jax.lora import fit
from peft_jax.lora import layout as layout_lib
from peft_jax.lora.config import LoRAConfig
from peft_jax.lora import saved as saved_lib
from peft_jax.lora.tree import adapter_modules, is_adapter_path

# 2: the manifest lists every array with its CRC-32; quantized leaves by type tag.
CHECKPOINT_FORMAT_VERSION = 2

_ITEMS = ("adapters", "config", "manifest")
_STEP_NAME = re.compile(r"\d+")
_KINDS = ("adapters", "params")


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
  copies = {p: v for p, v in adapter_flat.items() if saved_lib.is_saved_path(p)}
  problems = saved_lib.misfits(copies, base_flat)
  problems += [f"{p}: the base already holds this saved copy" for p in sorted(copies) if p in base_flat]
  by_module: dict[str, dict[str, Any]] = {}
  for path, leaf in adapter_flat.items():
    if path in copies:
      continue
    module, name = targeting.split_path(path)
    by_module.setdefault(module, {})[name] = leaf
  for module, leaves in sorted(by_module.items()):
    weight = targeting.site_weight(base_flat, module)
    if weight is None:
      problems.append(fit.no_kernel(module, modules))
      continue
    kernel = base_flat[weight]
    kernel_shape = tuple(kernel.shape)
    already = [n for n in leaves if f"{module}/{n}" in base_flat]
    if already:
      problems.append(f"{module}: the base already holds {already}")
    lora_a, lora_b = leaves.get("lora_a"), leaves.get("lora_b")
    if lora_a is None or lora_b is None:
      problems.append(f"{module}: lora_a and lora_b must come together, found {sorted(leaves)}")
      continue
    try:
      layout = ((layouts or {}).get(module) or (layouts or {}).get(targeting.site_target(module))
                or layout_lib.layout_from_adapters(kernel_shape, lora_a.shape, lora_b.shape))
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


def _file_config(config: LoRAConfig, tree: Mapping[str, Any]) -> dict[str, Any]:
  """``config.to_dict()`` with regex pattern keys resolved to the exact module names.

  Files hold only literal module names (what PEFT writes too), so reading a
  checkpoint never compiles a regular expression from it.
  """
  d = config.to_dict()
  modules = sorted(adapter_modules(tree))
  if config.ensure_weight_tying and saved_lib.TIED_HEAD not in modules:
    modules.append(saved_lib.TIED_HEAD)  # a tied head's own alpha (see saved.tied_head_scale)
  for name, value_for, default in (("rank_pattern", config.rank_for, config.rank),
                                   ("alpha_pattern", config.alpha_for, config.alpha)):
    pattern = d[name]
    if all(ut.is_plain(k) for k in pattern):
      continue
    d[name] = {re.escape(targeting.site_target(m)): value_for(m) for m in modules
               if value_for(m) != default}
  return d


def _composite_save_args(tree, config: LoRAConfig | None, kind: str, wrapped: bool):
  arrays, specs, quantized = leaves_lib.encode_tree(tree)
  manifest = {"format_version": CHECKPOINT_FORMAT_VERSION, "kind": kind,
              "wrapped": wrapped, "arrays": specs, "quantized": quantized}
  items = {"adapters": ocp.args.StandardSave(arrays), "manifest": ocp.args.JsonSave(manifest)}
  if config is not None:
    items["config"] = ocp.args.JsonSave(_file_config(config, tree))
  return ocp.args.Composite(**items)


def _checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _is_checkpoint(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "manifest"))


def is_peft_jax_checkpoint(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a finished single checkpoint whose manifest peft_jax wrote."""
  return _is_ours(os.fspath(path))


def _is_ours(path: str) -> bool:
  """A finished single checkpoint whose manifest peft_jax wrote."""
  manifest = os.path.join(path, "manifest", "metadata")
  if not os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA")) or not os.path.isfile(manifest):
    return False
  try:
    content = ut.read_json(manifest)
  except ValueError:
    return False
  return isinstance(content, dict) and content.get("kind") in _KINDS


def finished_steps(directory: str | os.PathLike) -> list[int]:
  """Steps under ``directory`` whose save completed (unfinished ones are skipped)."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if _STEP_NAME.fullmatch(n) and _is_checkpoint(os.path.join(directory, n)))


def _step(step: Any) -> int:
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
    raise ValueError(f"step must be a non-negative integer, got {ut.show(step)}.")
  return int(step)


def _resolve(directory: str | os.PathLike, step: int | None) -> str:
  directory = os.path.abspath(os.fspath(directory))
  if step is not None:
    path = os.path.join(directory, str(_step(step)))
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


def _check_manifest(manifest: Any, path: str, kind: str) -> int:
  file = os.path.join(path, "manifest")
  manifest = ut.require_dict(file, "manifest", manifest)
  version = ut.require_int(file, "format_version",
                           manifest.get("format_version", 1), low=1)
  if version > CHECKPOINT_FORMAT_VERSION:
    raise ValueError(
        f"Checkpoint {path} has format version {version}, newer than this peft_jax "
        f"reads ({CHECKPOINT_FORMAT_VERSION}); upgrade peft_jax to restore it.")
  if manifest.get("kind") != kind:
    raise ValueError(f"Checkpoint {path} holds {ut.show(manifest.get('kind'))}, not {kind!r}.")
  ut.require_bool(file, "wrapped", manifest.get("wrapped", False))
  return version


def _restore_item(checkpointer, path: str, name: str, args) -> Any:
  """One item of the composite; any failure to read it names the item's folder."""
  try:
    return checkpointer.restore(path, args=ocp.args.Composite(**{name: args}))[name]
  except (KeyboardInterrupt, MemoryError):
    raise
  except Exception as error:  # pylint: disable=broad-except  # untrusted bytes
    raise ut.FileFormatError(f"{os.path.join(path, name)}: cannot read this checkpoint "
                             f"item: {type(error).__name__}: {ut.show(str(error), 300)}"
                             ) from None


def _target_shardings(shardings: Any) -> dict[str, Any]:
  """``{stored array path: sharding}`` from the caller's ``shardings`` tree."""
  return targeting.flatten(targeting.unwrap_params(shardings)[0])


def _sharding_for(path: str, wanted: dict[str, Any], name: str) -> Any:
  if name not in wanted:
    raise ValueError(f"The checkpoint at {path} holds {name!r}; shardings has no entry for it.")
  return wanted[name]


def _restore_target(path: str, shardings: Any) -> Any:
  """Abstract arrays, shaped as the checkpoint's metadata says, on ``shardings``.

  Orbax refuses to restore without a target onto another device topology
  (8 devices -> 4 or 1); this target is what lets it (format-1 checkpoints,
  which list no arrays in their manifest).
  """
  meta = ocp.StandardCheckpointer().metadata(os.path.join(path, "adapters")).item_metadata
  wanted = _target_shardings(shardings)

  def leaf(key_path, m):
    name = "/".join(str(getattr(k, "key", k)) for k in key_path)
    return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=_sharding_for(path, wanted, name))

  return jax.tree_util.tree_map_with_path(leaf, meta)


def _read(path: str, kind: str, with_config: bool, shardings: Any = None):
  """Reads a checkpoint without calling anything it names, verifying every array.

  ``shardings``: a tree of shardings (paths as stored) to restore onto, e.g.
  another mesh; default: Orbax's own placement.
  """
  checkpointer = _checkpointer()
  manifest = _restore_item(checkpointer, path, "manifest", ocp.args.JsonRestore())
  version = _check_manifest(manifest, path, kind)
  config = None
  if with_config:
    # Refuse a newer or malformed config before reading any array.
    config = ut.config_from_file(
        _restore_item(checkpointer, path, "config", ocp.args.JsonRestore()),
        os.path.join(path, "config"))
  file = os.path.join(path, "adapters")
  if version >= 2:
    specs = leaves_lib.array_specs(os.path.join(path, "manifest"), manifest.get("arrays"))
    try:
      wanted = {} if shardings is None else _target_shardings(shardings)
      target = targeting.unflatten({
          p: jax.ShapeDtypeStruct(shape, dtype, sharding=(
              None if shardings is None else _sharding_for(path, wanted, p)))
          for p, (shape, dtype, _) in specs.items()})
    except (ValueError, TypeError, KeyError) as error:
      raise ut.FileFormatError(f"{path}/manifest: the array paths clash: {error}") from None
    arrays = _restore_item(checkpointer, path, "adapters", ocp.args.StandardRestore(target))
    flat = targeting.flatten(arrays)
    leaves_lib.verify(file, flat, specs)
  else:  # version 1 stored no checksums
    target = None if shardings is None else _restore_target(path, shardings)
    flat = targeting.flatten(_restore_item(checkpointer, path, "adapters",
                                           ocp.args.StandardRestore(target)))
  tree = leaves_lib.decode_tree(os.path.join(path, "manifest"), flat,
                                manifest.get("quantized", {}))
  tree = jax.tree.map(jnp.asarray, tree)
  if config is not None:
    problems = saved_lib.config_misfits(targeting.flatten(tree), config)
    if problems:
      raise ut.FileFormatError(f"{file}: the saved copies do not match the config: "
                               + "; ".join(problems))
  if manifest.get("wrapped"):
    tree = {"params": tree}
  return tree, config


def _write(path: str, args, overwrite: bool, what: str) -> str:
  """Writes a composite at ``path``; an existing checkpoint is swapped out only when whole."""
  if os.path.lexists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True or save under a new step.")
  files.check_replaceable(path, _is_ours, what)
  files.remove_stale_temps(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if not os.path.lexists(path):
    _checkpointer().save(path, args=args)  # Orbax renames its temporary folder at the end
    return path
  new = files.temp_sibling(path)
  try:
    _checkpointer().save(new, args=args)
    files.replace_dir(new, path)
  finally:
    if os.path.lexists(new):
      shutil.rmtree(new, ignore_errors=True)
  return path


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
    overwrite: replace an existing peft_jax checkpoint at the same place (an
      empty folder is fine; anything else is refused). The new checkpoint is
      written beside the old one and swapped in when complete, so a crash
      leaves one whole checkpoint there.

  Returns:
    The absolute path of the written checkpoint.

  Raises:
    FileExistsError: something is already there and ``overwrite`` is False, or
      it is not a peft_jax checkpoint.
  """
  if not isinstance(config, LoRAConfig):
    raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}.")
  tree, wrapped = _only_adapters(adapters)
  problems = saved_lib.config_misfits(targeting.flatten(tree), config)
  if problems:
    raise ValueError("The saved copies do not match the config: " + "; ".join(problems))
  directory = os.path.abspath(os.fspath(directory))
  path = directory if step is None else os.path.join(directory, str(_step(step)))
  return _write(path, _composite_save_args(tree, config, "adapters", wrapped), overwrite,
                "peft_jax checkpoint")


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
  ``overwrite`` replaces only a peft_jax checkpoint (or an empty folder), and
  only once the new one is complete, as :func:`save` does.
  """
  inner, wrapped = targeting.unwrap_params(params)
  directory = os.path.abspath(os.fspath(directory))
  return _write(directory, _composite_save_args(inner, None, "params", wrapped), overwrite,
                "peft_jax params checkpoint")


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
  state can ride along. One manager writes a directory at a time: it holds a
  lock file (``.peft_jax.lock``, with its pid and host) until :meth:`close`;
  a second manager on the same directory is refused, and a lock left by a
  dead process on this host is taken over.

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
    if not isinstance(config, LoRAConfig):
      raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}.")
    if max_to_keep is not None and (isinstance(max_to_keep, bool)
                                    or not isinstance(max_to_keep, int) or max_to_keep < 1):
      raise ValueError(f"max_to_keep must be a positive integer or None (keep all), got "
                       f"{max_to_keep!r}.")
    if (isinstance(save_interval_steps, bool) or not isinstance(save_interval_steps, int)
        or save_interval_steps < 1):
      raise ValueError(f"save_interval_steps must be a positive integer, got "
                       f"{save_interval_steps!r}.")
    if not isinstance(async_save, bool):
      raise TypeError(f"async_save must be a bool, got {async_save!r}.")
    self.directory = os.path.abspath(os.fspath(directory))
    if os.path.lexists(self.directory) and not os.path.isdir(self.directory):
      raise FileExistsError(f"{self.directory} exists and is not a folder.")
    if _is_checkpoint(self.directory):
      raise FileExistsError(f"{self.directory} is a single checkpoint, not a run folder of "
                            "steps; give the manager its own folder.")
    self.config = config
    os.makedirs(self.directory, exist_ok=True)
    self._lock = files.WriterLock(self.directory)
    try:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
          enable_async_checkpointing=async_save, create=True)
      self._manager = ocp.CheckpointManager(
          self.directory, options=options, item_names=_ITEMS + ("opt_state",))
    except BaseException:
      self._lock.release()
      raise

  def save(self, step: int, adapters: Mapping[str, Any], *, opt_state: Any = None,
           force: bool = False) -> bool:
    """Saves when ``step`` is due (or ``force``); returns whether it saved."""
    tree, wrapped = _only_adapters(adapters)
    step = _step(step)
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
    """Finishes background saves and releases the directory's writer lock."""
    try:
      self._manager.close()
    finally:
      self._lock.release()

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
