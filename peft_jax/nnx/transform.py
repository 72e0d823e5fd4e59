"""peft_jax on Flax NNX models: the linen tools applied to the model's params.

Each function reads the model's ``nnx.Param`` values as the linen-shaped
params dict (:mod:`peft_jax.nnx.state`), runs the linen tool on it
(``lora_transform``, ``quantize``, ``merge``, ...), and writes the result
back into the model in place: changed values are set, new adapter leaves
become :class:`Adapter` variables of their module, removed ones are deleted,
and every module holding adapters or a quantized kernel gets its
``Peft<Name>`` class (:mod:`peft_jax.nnx.modules`). Base paths never change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from peft_jax import targeting
from peft_jax.checkpoint.orbax import check_adapters_fit
from peft_jax.lora import adalora as adalora_lib
from peft_jax.lora import layout as layout_lib
from peft_jax.lora import saved as saved_lib
from peft_jax.lora import transform as transform_lib
from peft_jax.lora.config import LoRAConfig
from peft_jax.lora.merge import merge as linen_merge
from peft_jax.lora.merge import merge_into_quantized
from peft_jax.lora.nnx_guard import idle_adapters
from peft_jax.lora.tree import is_adapter_path
from peft_jax.nnx import modules as modules_lib
from peft_jax.nnx import state as state_lib
from peft_jax.nnx.state import Adapter
from peft_jax.qlora import apply_qlora as linen_apply_qlora
from peft_jax.quant import tree as quant_tree
from peft_jax.quant.nf4 import NF4, is_quantized

_STATIC = ("lora_config", "lora_path", "lora_dropout")


def layouts(model: nnx.Module, *args, weight_names=targeting.KERNEL_LEAVES,
            **kwargs) -> dict[str, layout_lib.KernelLayout]:
  """Kernel layouts of the model's layers, for :func:`lora_transform`.

  Built-in layers' layouts are read off their attributes. With sample inputs
  ``args``/``kwargs`` the model is also traced abstractly (``nnx.eval_shape``:
  no FLOPs) and every custom module's weights named in ``weight_names`` get
  the layout of their first product (contracted axes = input axes), as
  :func:`peft_jax.kernel_layouts` does for linen. Stacked layers
  (``nnx.vmap``-created, run with ``nnx.scan``) get their leading layer axes
  as batch axes. ``nnx.Einsum`` layers that take their equation at call time
  need sample inputs.
  """
  found = {}
  mods = state_lib.modules(model)
  for path, module in mods.items():
    if not isinstance(module, modules_lib.BUILTINS):
      continue
    layout = modules_lib.builtin_layout(module)
    var = getattr(module, modules_lib.kernel_name(module), None)
    if layout is None or var is None:
      continue
    batch = len(var.get_value().shape) - layout.kernel_ndim
    found[path] = layout_lib.KernelLayout(layout.in_axes, layout.out_axes, batch)
  if args or kwargs:
    found.update(_traced_layouts(model, mods, tuple(weight_names), args, kwargs))
  return found


def _traced_layouts(model, mods, weight_names, args, kwargs):
  swapped = {}
  for path, module in mods.items():
    if (not isinstance(module, modules_lib.BUILTINS + (nnx.List, nnx.Dict))
        and not modules_lib.is_peft_module(module)
        and any(modules_lib._candidates(module, weight_names, path))):  # pylint: disable=protected-access
      swapped[path] = type(module)
      module.__class__ = modules_lib.recorder_class(type(module))
      module.lora_path, module.lora_weight_names = path, weight_names
  modules_lib._RECORDED.clear()  # pylint: disable=protected-access
  try:
    nnx.eval_shape(lambda m: m(*args, **kwargs), model)
    recorded = dict(modules_lib._RECORDED)  # pylint: disable=protected-access
  finally:
    for path, cls in swapped.items():
      mods[path].__class__ = cls
      del mods[path].lora_path, mods[path].lora_weight_names
    modules_lib._RECORDED.clear()  # pylint: disable=protected-access
  flat = targeting.flatten(state_lib.params(model))
  out = {}
  for target, layout in recorded.items():
    weight = flat.get(f"{target}/kernel", flat.get(f"{target}/embedding", flat.get(target)))
    out[target] = layout_lib.KernelLayout(layout.in_axes, layout.out_axes,
                                          len(weight.shape) - layout.kernel_ndim)
  return out


def _is_dict_site(module_path: str) -> bool:
  """A dict of leaves inside a module: ``m/w_lora`` (a weight's adapters), ``m/saved`` (copies)."""
  return (module_path.endswith(targeting.SITE_SUFFIX)
          or targeting.split_path(module_path)[1] == targeting.SAVED)


def _owner(module_path: str) -> str:
  """The module that runs an adapter site or weight: ``m/w_lora`` -> ``m``."""
  if _is_dict_site(module_path):
    return targeting.split_path(module_path)[0]
  return module_path


def _adapter_holders(flat: Mapping[str, Any], leaf: str = "lora_a") -> set[str]:
  return {_owner(targeting.split_path(p)[0]) for p in flat
          if p.endswith("/" + leaf) or (leaf == "lora_a" and saved_lib.is_saved_path(p))}


def _check_supported(mods, holders: set[str], quantized: set[str]) -> None:
  for path in sorted(holders | quantized):
    module = mods.get(path)
    if isinstance(module, nnx.LinearGeneral) and module.batch_axis:
      raise ValueError(f"LoRA on nnx.LinearGeneral with batch_axis is not supported ({path!r}).")
    if isinstance(module, (nnx.List, nnx.Dict)) or not callable(module):
      raise ValueError(
          f"Adapters or a quantized weight at {path!r} would sit in a "
          f"{type(module).__name__}, which has no __call__ to run them: they would "
          "contribute nothing. Exclude it from target_modules.")


def _site(mods, module_path: str, create: bool):
  """The module or ``<weight>_lora`` dict holding the leaves of ``module_path``."""
  if module_path in mods or not _is_dict_site(module_path):
    return mods.get(module_path)
  parent, name = targeting.split_path(module_path)
  owner = mods.get(parent)
  if owner is None:
    return None
  if create and not isinstance(getattr(owner, name, None), nnx.Dict):
    setattr(owner, name, nnx.Dict())
  site = getattr(owner, name, None)
  mods[module_path] = site
  return site


def _set_leaf(site, name, value):
  if isinstance(site, nnx.Dict):
    site[name] = value
  else:
    setattr(site, name, value)


def _del_leaf(mods, module_path, name):
  site = mods[module_path]
  if isinstance(site, nnx.Dict):
    del site[name]
    if not len(site):
      parent, attr = targeting.split_path(module_path)
      delattr(mods[parent], attr)
  else:
    delattr(site, name)


def _dropout_layer(rate: float, rngs: nnx.Rngs, layers: tuple[int, ...]) -> nnx.Dropout:
  """The adapter dropout of one layer; of ``nnx.vmap``-stacked layers, with one key per
  layer (as ``nnx.split_rngs`` gives them), so that under ``nnx.scan`` each layer draws
  its own masks and every call new ones."""
  if not layers:
    return nnx.Dropout(rate, rngs=rngs)
  dropout = nnx.Dropout(rate)
  dropout.rngs = nnx.RngStream(jax.random.split(rngs["dropout"](), layers), tag="dropout")
  return dropout


def _reclass(module, path: str, config: LoRAConfig | None, adapted: bool, quantized: bool,
             rngs: nnx.Rngs | None) -> None:
  cls = type(module)
  if not (adapted or quantized):
    if modules_lib.is_peft_class(cls):
      module.__class__ = modules_lib.plain_class(cls)
      for name in _STATIC:
        if name in vars(module):
          delattr(module, name)
    return
  builtin = isinstance(module, modules_lib.BUILTINS) and not any(
      isinstance(getattr(module, n, None), nnx.Dict) for n in vars(module) if n != targeting.SAVED)
  module.__class__ = (modules_lib.peft_class if builtin else modules_lib.op_class)(cls)
  module.lora_path = path
  module.lora_config = config if adapted else None
  dropout = config.dropout if adapted and config is not None else 0.0
  if dropout > 0.0 and getattr(module, "lora_dropout", None) is None:
    if rngs is None:
      raise ValueError(f"config.dropout={dropout} needs rngs (nnx.Rngs with a 'dropout' stream).")
    module.lora_dropout = _dropout_layer(dropout, rngs, modules_lib.layer_shape(module))
  elif dropout == 0.0:
    module.lora_dropout = None


def sync(model: nnx.Module, params: Mapping[str, Any], config: LoRAConfig | None, *,
         rngs: nnx.Rngs | None = None) -> nnx.Module:
  """Makes ``model`` hold exactly the linen-shaped ``params`` (see module docstring).

  Raises:
    ValueError: a base leaf would be added or removed, or adapters would sit
      in a module peft_jax.nnx cannot run.
  """
  new = targeting.flatten(targeting.unwrap_params(params)[0])
  old = state_lib.variables(model)
  mods = state_lib.modules(model)
  for path in sorted(set(new) ^ set(old)):
    module_path, name = targeting.split_path(path)
    if (name not in targeting.ADAPTER_LEAVES + modules_lib.STACK_LEAVES
        and not saved_lib.is_saved_path(path)):
      what = "added to" if path in new else "missing from"
      raise ValueError(f"The base leaf {path!r} would be {what} the NNX model; only adapter "
                       "leaves can be added or removed.")
    if _owner(module_path) not in mods:
      raise ValueError(f"Adapter leaf {path!r} has no module at that path in the NNX model.")
  holders = _adapter_holders(new)
  stacked = _adapter_holders(new, "lora_a_stack")
  quantized = {_owner(targeting.split_path(p)[0]) for p, v in new.items() if is_quantized(v)}
  _check_supported(mods, holders | stacked, quantized)
  if holders and config is None:
    raise ValueError("Adapters need their LoRAConfig.")
  for path in sorted(old.keys() - new.keys()):
    _del_leaf(mods, *targeting.split_path(path))
  for path, value in new.items():
    module_path, name = targeting.split_path(path)
    var = old.get(path)
    if var is None:
      kind = Adapter if is_adapter_path(path, config) else nnx.Param
      _set_leaf(_site(mods, module_path, create=True), name, kind(value))
    elif var.get_value() is not value:
      site = _site(mods, module_path, create=False)
      (site[name] if isinstance(site, nnx.Dict) else getattr(site, name)).set_value(value)
  for path, module in state_lib.modules(model).items():
    if path in holders | stacked | quantized or modules_lib.is_peft_module(module):
      _reclass(module, path, config, path in holders, path in quantized or path in stacked, rngs)
  return model


def _layouts(model, given):
  found = layouts(model)
  found.update(given or {})
  return found


def _dropout_rngs(config, key, rngs):
  if rngs is not None or config.dropout == 0.0:
    return rngs
  return nnx.Rngs(dropout=jax.random.fold_in(key, 1))


def lora_transform(model: nnx.Module | nnx.State, config: LoRAConfig, *, key: jax.Array,
                   layouts: Mapping[str, layout_lib.KernelLayout] | None = None,
                   rngs: nnx.Rngs | None = None) -> nnx.Module:
  """Adds adapters to an NNX model in place (and returns it).

  Given an ``nnx.State`` instead, returns a new State with the adapter
  variables added (to inspect or save; a model runs adapters only when the
  model itself was transformed).

  The same config, targeting, leaf names, shapes and initial values as
  :func:`peft_jax.lora_transform` on the linen twin (module paths as in
  :mod:`peft_jax.nnx.state`). Adapter leaves are :class:`Adapter`
  variables (a ``nnx.LoRAParam``); a DoRA magnitude with
  ``magnitude_trainable=False`` is an ``nnx.Param``.

  Args:
    model: the NNX model.
    config: what to adapt and how.
    key: PRNG key of the adapter initialisation (as for linen).
    layouts: layouts of ``nnx.Einsum`` layers that take their equation at
      call time (others are read off the modules).
    rngs: ``nnx.Rngs`` with a ``'dropout'`` stream for adapter dropout
      (default: one derived from ``key``).
  """
  if isinstance(model, nnx.State):
    new = transform_lib.lora_transform(state_lib.params(model), config, key=key, layouts=layouts)
    return _state_with(model, new, config)
  params = state_lib.params(model)
  new = transform_lib.lora_transform(params, config, key=key, layouts=_layouts(model, layouts))
  return sync(model, new, config, rngs=_dropout_rngs(config, key, rngs))


def _state_with(state: nnx.State, params: Mapping[str, Any], config: LoRAConfig) -> nnx.State:
  """``state`` holding the values of linen-shaped ``params`` (a new State; NNX paths)."""
  new = targeting.flatten(targeting.unwrap_params(params)[0])
  flat = []
  module_paths = {}
  for path, var in nnx.to_flat_state(state):
    linen = state_lib.linen_path(path)
    module_paths[targeting.split_path(linen)[0]] = path[:-1]
    value = new.pop(linen, None)
    flat.append((path, var if value is None else var.replace(value)))
  for path, value in new.items():
    module, name = targeting.split_path(path)
    kind = Adapter if is_adapter_path(path, config) else nnx.Param
    if module not in module_paths and _is_dict_site(module):  # a new `m/saved` or `m/w_lora` dict
      owner, site = targeting.split_path(module)
      flat.append((module_paths[owner] + (site, name), kind(value)))
    else:
      flat.append((module_paths[module] + (name,), kind(value)))
  return nnx.from_flat_state(flat)


def adalora_transform(model: nnx.Module, config: adalora_lib.AdaLoRAConfig, *, key: jax.Array,
                      rngs: nnx.Rngs | None = None) -> nnx.Module:
  """:func:`peft_jax.adalora_transform` on an NNX model (in place)."""
  new = adalora_lib.adalora_transform(state_lib.params(model), config, key=key)
  return sync(model, new, config, rngs=_dropout_rngs(config, key, rngs))


def quantize(model: nnx.Module, spec: NF4 = NF4(), target_modules: targeting.TargetSpec = None,
             **kwargs) -> nnx.Module:
  """:func:`peft_jax.quantize` on an NNX model: NF4 kernels, in place."""
  new = quant_tree.quantize(state_lib.params(model), spec, target_modules, **kwargs)
  return sync(model, new, model_config(model))


def apply_qlora(model: nnx.Module, config, *, key: jax.Array, **kwargs) -> nnx.Module:
  """QLoRA on an NNX model: quantize the base (``config.quant_spec()``), then add adapters."""
  params = state_lib.params(model)
  new = linen_apply_qlora(params, config, key=key, layouts=_layouts(model, kwargs.pop("layouts", None)))
  return sync(model, new, config, rngs=_dropout_rngs(config, key, kwargs.pop("rngs", None)))


def model_config(model: nnx.Module) -> LoRAConfig | None:
  """The config the model's adapters were made with (None without adapters)."""
  configs = {m.lora_config for m in state_lib.modules(model).values()
             if modules_lib.is_peft_module(m) and m.lora_config is not None}
  if len(configs) > 1:
    raise ValueError(f"The model's adapters were made with {len(configs)} different configs.")
  return next(iter(configs), None)


def merge(model: nnx.Module, *, requantize: NF4 | None = None) -> nnx.Module:
  """Folds the adapters into their kernels: plain NNX modules again (in place).

  ``W' = W + s B A`` (DoRA: rescaled to the magnitude), as
  :func:`peft_jax.merge`. An NF4 kernel merges into a dense kernel of its
  compute dtype, or, with ``requantize``, into a new NF4 kernel of that spec
  (as :func:`peft_jax.merge_into_quantized`).
  """
  config = model_config(model)
  if config is None:
    raise ValueError("This model holds no adapters: nothing to merge.")
  params = state_lib.params(model)
  kwargs = {"layouts": _layouts(model, None)}
  if requantize is None:
    new = linen_merge(params, config, **kwargs)
  else:
    new, _ = merge_into_quantized(params, config, requantize, **kwargs)
  return sync(model, new, None)


def load_adapters(model: nnx.Module, adapters: Mapping[str, Any], config: LoRAConfig, *,
                  rngs: nnx.Rngs | None = None) -> nnx.Module:
  """Attaches saved adapters (linen-shaped, e.g. from :func:`peft_jax.checkpoint.restore`
  or :func:`peft_jax.import_peft`) to an NNX model, in place.

  Raises:
    ValueError: listing every adapter that does not fit the model (path,
      shape, rank), or when the model already holds adapters.
  """
  if model_config(model) is not None:
    raise ValueError("This model already holds adapters: merge them first.")
  params = state_lib.params(model)
  check_adapters_fit(adapters, params, config, layouts=_layouts(model, None))
  flat = targeting.flatten(targeting.unwrap_params(params)[0])
  flat.update(targeting.flatten(targeting.unwrap_params(adapters)[0]))
  if rngs is None and config.dropout > 0.0:
    rngs = nnx.Rngs(dropout=0)
  return sync(model, targeting.unflatten(flat), config, rngs=rngs)


def check(model: nnx.Module) -> None:
  """Raises when a module holds adapter leaves it does not run (naming the paths).

  Adapters attached by hand (``linear.lora_a = nnx.Param(...)``) to a plain
  ``nnx.Linear`` would be ignored by its ``__call__``: output change 0.
  """
  idle = []
  mods = state_lib.modules(model)
  for path, module in mods.items():
    held = idle_adapters(module)
    if held:
      idle.append(f"{path or '<root>'} ({type(module).__name__}: {held})")
    parent = mods.get(targeting.split_path(path)[0])
    if (isinstance(module, nnx.Dict) and _is_dict_site(path)
        and not modules_lib.is_peft_module(parent)):
      idle.append(f"{path} ({type(parent).__name__}: {sorted(module.keys())})")
  if idle:
    raise ValueError(
        "These modules hold adapter leaves that their __call__ never uses (they would "
        f"train nothing): {idle}. Attach adapters with peft_jax.nnx.lora_transform or "
        "peft_jax.nnx.load_adapters.")
