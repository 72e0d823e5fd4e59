"""Configuration of LoRA-family adapters (LoRA, rsLoRA, DoRA, PiSSA, OLoRA)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from flax.core import FrozenDict

from peft_jax import targeting
from peft_jax import validation

CONFIG_FORMAT_VERSION = 1
# The largest alpha accepted: alpha / r scales adapter outputs, and beyond this
# the first update overflows float32/bfloat16 (1e300 is inf in float32).
MAX_ALPHA = 1e6

_INITS = ("default", "gaussian", "pissa", "olora", "loftq")
BIAS_OPTIONS = ("none", "lora_only", "all")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def _check_init(init: str | bool) -> str:
  if init is True:
    return "default"
  if not isinstance(init, str) or not (init in _INITS or _PISSA_NITER.fullmatch(init)):
    raise ValueError(
        f"Unknown init {init!r}; expected one of {_INITS} or 'pissa_niter_K'.")
  return init


CONFIG_CLASSES: dict[str, type] = {}
"""``{class name: class}`` of :class:`LoRAConfig` and its subclasses (see :func:`config_from_dict`)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
  """What to adapt and how.

  Attributes:
    rank: the adapter rank ``r``.
    alpha: scaling numerator: the update is ``alpha / r * B A`` (``alpha /
      sqrt(r)`` with ``use_rslora``).
    target_modules: names (exact or ``/``-suffix of the module path), a regex
      (``re.fullmatch`` on the ``/``-joined path), or ``"all-linear"``.
    exclude_modules: the same forms; matching modules are not adapted.
    layers_to_transform: only adapt these unrolled layer indices (``layers_3``).
    dropout: dropout rate on the adapter input (training only).
    use_rslora: rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski 2023).
    use_dora: weight-decomposed adaptation (Liu et al. 2024): adds a trainable
      ``lora_magnitude`` per output feature.
    magnitude_trainable: DoRA only; ``False`` keeps the magnitude frozen (it
      then goes to the base tree in :func:`peft_jax.split`).
    init: ``"default"`` (Kaiming-uniform A, zero B, as Hugging Face PEFT),
      ``"gaussian"`` (A ~ N(0, 1/r^2)), ``"pissa"``, ``"pissa_niter_K"``,
      ``"olora"`` (these rewrite the base kernel, see ALGORITHMS.md 9), or
      ``"loftq"`` (for NF4 bases, see :mod:`peft_jax.quant`).
    rank_pattern: ``{regex: rank}`` per-module ranks (first match wins).
    alpha_pattern: ``{regex: alpha}`` per-module alphas (first match wins).
    adapter_dtype: dtype of adapter leaves; ``None`` takes the kernel's dtype
      (the compute dtype for quantized kernels).
    loftq_iter: LoftQ alternations (``init="loftq"``).
    weight_names: leaf names that can be adapted. ``kernel`` and
      ``embedding`` (the built-in modules) adapt the module holding them;
      add others (``"w"``, ``"weight"``, ``"gating_einsum"``) to adapt the
      params of custom modules: each such weight is its own target
      (``target_modules=("mlp/gating_einsum",)``) and its adapter leaves live
      in ``<weight>_lora`` beside it (see :mod:`peft_jax.targeting`).
    modules_to_save: module names (exact or ``/``-suffix, as PEFT) trained in
      full: each gets a trainable copy of its params in ``<module>/saved``
      (the base kept), which the model uses instead (see
      :mod:`peft_jax.lora.saved`).
    bias: which biases train, as PEFT: ``"none"``, ``"lora_only"`` (biases of
      adapted modules) or ``"all"``; each gets a trainable copy in
      ``<module>/saved/bias``. A model without such biases is an error.
    ensure_weight_tying: PEFT's option for tied embeddings: a saved embedding
      or tied ``lm_head`` becomes ONE trainable copy
      ``<embedding>/saved/tied_embedding`` that the input lookup and the tied
      head both read (see :mod:`peft_jax.lora.saved`).
  """

  rank: int = 8
  alpha: float = 16.0
  target_modules: str | tuple[str, ...] = ("q_proj", "v_proj")
  exclude_modules: str | tuple[str, ...] | None = None
  layers_to_transform: tuple[int, ...] | None = None
  dropout: float = 0.0
  use_rslora: bool = False
  use_dora: bool = False
  magnitude_trainable: bool = True
  init: str = "default"
  rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=FrozenDict)
  alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=FrozenDict)
  adapter_dtype: str | None = None
  loftq_iter: int = 1
  weight_names: tuple[str, ...] = targeting.KERNEL_LEAVES
  modules_to_save: tuple[str, ...] | None = None
  bias: str = "none"
  ensure_weight_tying: bool = False

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    CONFIG_CLASSES[cls.__name__] = cls

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)
    set_("target_modules", _check_targets(self.target_modules, "target_modules"))
    if self.exclude_modules is not None:
      set_("exclude_modules", _check_targets(self.exclude_modules, "exclude_modules"))
    if self.layers_to_transform is not None:
      layers = self.layers_to_transform
      layers = (layers,) if isinstance(layers, (int, str)) else layers
      try:
        layers = tuple(layers)
      except TypeError:
        raise validation.InvalidValue(
            f"layers_to_transform must be layer indices, got {layers!r}.") from None
      for i in layers:
        validation.integer(i, "layers_to_transform entries", low=0)
      set_("layers_to_transform", layers)
    set_("init", _check_init(self.init))
    names = (self.weight_names,) if isinstance(self.weight_names, str) else tuple(self.weight_names)
    set_("weight_names", names)
    for name in names:
      if (not isinstance(name, str) or not name or "/" in name or name in targeting.ADAPTER_LEAVES
          or name.endswith(targeting.SITE_SUFFIX)):
        raise ValueError(f"weight_names entry {name!r} is not a usable param name.")
    # FrozenDicts keep the config hashable, so it can be a static jit argument.
    set_("rank_pattern", FrozenDict(_check_pattern(self.rank_pattern, "rank_pattern")))
    set_("alpha_pattern", FrozenDict(_check_pattern(self.alpha_pattern, "alpha_pattern")))
    if self.adapter_dtype is not None:
      set_("adapter_dtype", validation.float_dtype(self.adapter_dtype, "adapter_dtype").name)
    _check_rank(self.rank, "rank")
    _check_alpha(self.alpha, "alpha")
    for key, r in self.rank_pattern.items():
      _check_rank(r, f"rank_pattern[{key!r}]")
    for key, a in self.alpha_pattern.items():
      _check_alpha(a, f"alpha_pattern[{key!r}]")
    validation.number(self.dropout, "dropout", low=0.0, high=1.0, high_open=True)
    for name in ("use_rslora", "use_dora", "magnitude_trainable", "ensure_weight_tying"):
      set_(name, validation.boolean(getattr(self, name), name))
    validation.integer(self.loftq_iter, "loftq_iter", low=1)
    if self.modules_to_save is not None:
      saved = self.modules_to_save
      saved = _check_targets((saved,) if isinstance(saved, str) else saved, "modules_to_save")
      set_("modules_to_save", saved or None)
    if self.bias not in BIAS_OPTIONS:
      raise validation.InvalidValue(f"bias must be one of {BIAS_OPTIONS}, got {self.bias!r}.")

  def rank_for(self, module_path: str) -> int:
    """The rank of the adapter at ``module_path`` (``rank_pattern`` first).

    An adapter site of a named weight (``m/w_lora``) is looked up by the
    weight's path (``m/w``), its target (see :mod:`peft_jax.targeting`).
    """
    module_path = targeting.site_target(module_path)
    return int(targeting.resolve_pattern(self.rank_pattern, module_path, self.rank))

  def alpha_for(self, module_path: str) -> float:
    """The alpha of the adapter at ``module_path`` (``alpha_pattern`` first; sites as
    :meth:`rank_for`)."""
    module_path = targeting.site_target(module_path)
    return float(targeting.resolve_pattern(self.alpha_pattern, module_path, self.alpha))

  def scale_for(self, module_path: str, rank: int | None = None) -> float:
    """``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA) for one module."""
    rank = self.rank_for(module_path) if rank is None else rank
    alpha = self.alpha_for(module_path)
    return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

  def replace(self, **changes: Any) -> "LoRAConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready dict (stored beside saved adapters)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    for key, value in d.items():
      if isinstance(value, Mapping):
        d[key] = dict(value)
    for key in ("target_modules", "exclude_modules", "layers_to_transform", "weight_names",
                "modules_to_save"):
      if isinstance(d[key], tuple):
        d[key] = list(d[key])
    d["format_version"] = CONFIG_FORMAT_VERSION
    d["config_class"] = type(self).__name__
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LoRAConfig":
    """Inverse of :meth:`to_dict`; refuses configs from a newer format."""
    d = dict(d)
    version = d.pop("format_version", CONFIG_FORMAT_VERSION)
    if version > CONFIG_FORMAT_VERSION:
      raise ValueError(
          f"Config format version {version} is newer than this peft_jax supports "
          f"({CONFIG_FORMAT_VERSION}); upgrade peft_jax to read it.")
    d.pop("config_class", None)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"Unknown {cls.__name__} fields {unknown}.")
    return cls(**d)


CONFIG_CLASSES["LoRAConfig"] = LoRAConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class DoRAConfig(LoRAConfig):
  """:class:`LoRAConfig` with ``use_dora=True`` (the seed document's name)."""

  use_dora: bool = True


def _check_rank(rank: Any, what: str) -> None:
  try:
    validation.integer(rank, what, low=1)
  except validation.InvalidValue:
    raise validation.InvalidValue(f"{what} must be a positive integer, got {rank!r}.") from None


def _check_alpha(alpha: Any, what: str) -> None:
  try:
    validation.number(alpha, what, low=0.0, high=MAX_ALPHA, low_open=True)
  except validation.InvalidValue:
    raise validation.InvalidValue(f"{what} must be a positive number <= {MAX_ALPHA:g} (a "
                                  f"finite scale), got {alpha!r}.") from None


def _check_targets(spec: Any, what: str) -> str | tuple[str, ...]:
  """A module spec: a string, or a sequence of non-empty strings."""
  if isinstance(spec, str):
    return spec
  try:
    names = tuple(spec)
  except TypeError:
    names = None
  if names is None or not all(isinstance(n, str) and n for n in names):
    raise validation.InvalidValue(
        f"{what} must be a string or a sequence of non-empty strings, got {spec!r}.")
  return names


def _check_pattern(pattern: Any, what: str) -> Mapping[str, Any]:
  if not isinstance(pattern, Mapping):
    raise validation.InvalidValue(f"{what} must be a mapping {{pattern: value}}, got {pattern!r}.")
  for key in pattern:
    if not isinstance(key, str) or not key:
      raise validation.InvalidValue(f"{what} keys must be non-empty strings, got {key!r}.")
  return pattern


def config_from_dict(d: Mapping[str, Any]) -> LoRAConfig:
  """Rebuilds a config saved with :meth:`LoRAConfig.to_dict` (any subclass).

  ``config_class`` names a class from the registry that every subclass of
  :class:`LoRAConfig` joins when it is defined (``AdaLoRAConfig``,
  ``QLoRAConfig`` once :mod:`peft_jax` is imported); a saved name never
  makes us import or call anything else.
  """
  name = d.get("config_class", "LoRAConfig")
  if name not in CONFIG_CLASSES:
    raise ValueError(f"Unknown config class {name!r} in saved config; known: {sorted(CONFIG_CLASSES)}.")
  return CONFIG_CLASSES[name].from_dict(d)
