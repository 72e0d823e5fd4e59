"""AdaLoRA adapters: SVD-form ``P Λ Q`` updates whose rank is pruned in training.

AdaLoRA (Zhang et al. 2023) parametrises each adapted kernel's update like a
singular value decomposition. Beside the kernel it keeps three leaves, in the
layout of :mod:`peft_jax.lora.layout` (``batch`` = stacked layers, if any)::

    lora_a  Q (right singular vectors)  batch + in dims + (r,)
    lora_e  Λ (singular values)         batch + (r,)
    lora_b  P (left singular vectors)   batch + (r,) + out dims

and the adapted module computes, as Hugging Face PEFT's ``SVDLinear``::

    y = base(x) + dropout(x) (A ⊙ E) B · alpha / (init_r + 1e-5)

The rank allocator (:func:`peft_jax.optim.adalora`) zeroes the singular
values of the least important triplets ``(A[..., i], E[i], B[i, ...])``
during training; the arrays keep their ``init_r`` shape, so nothing
recompiles. After training, :func:`resize_adapters` slices every module down
to the triplets it kept and folds ``E`` into ``A``: plain LoRA adapters with
the same outputs and a smaller checkpoint. :func:`orthogonal_regularization`
is the penalty the reference adds to the loss to keep ``P`` and ``Q``
near-orthogonal.

Example::

    config = AdaLoRAConfig(init_r=12, target_r=4, total_step=1000, tinit=100,
                           tfinal=200, alpha=32.0, target_modules=("q_proj", "v_proj"))
    adapters, base = peft_jax.split(adalora_transform(params, config, key=key))
    tx = peft_jax.optim.adalora(optax.adamw(1e-3), config)
    opt_state = tx.init(adapters)

    def loss_fn(adapters, batch):
      with peft_jax.intercept(config):
        logits = model.apply({"params": peft_jax.combine(base, adapters)}, batch["x"])
      return (xent(logits, batch["y"])
              + config.orth_reg_weight * orthogonal_regularization(adapters))

    ...  # total_step steps of grad -> tx.update -> optax.apply_updates
    lora_adapters, lora_config = resize_adapters(adapters, opt_state, config)

References:
  Zhang, Q., Chen, M., Bukharin, A., He, P., Cheng, Y., Chen, W., Zhao, T.
  "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning". ICLR 2023.
  https://openreview.net/forum?id=lq62uWRJjiY

  Hugging Face PEFT, ``peft/tuners/adalora/{config,layer,model}.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax import targeting, validation
from peft_jax.lora.config import LoRAConfig
from peft_jax.lora.layout import KernelLayout
from peft_jax.lora.transform import lora_transform

# Hugging Face's SVDLinear divides by `ranknum + 1e-5`, ranknum = float(init_r).
RANKNUM_EPSILON = 1e-5
# Hugging Face's `AdaLoraLayer.reset_lora_parameters`: A, B ~ N(0, 0.02²), E = 0.
SINGULAR_VECTOR_INIT_STDDEV = 0.02


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaLoRAConfig(LoRAConfig):
  """AdaLoRA adapters and their rank-allocation schedule.

  Training runs in three phases over ``total_step`` optimizer steps
  ``t = 0, 1, ...``: a warm-up (``t <= tinit``) at the full budget, a
  budgeting phase whose total rank falls on a cubic schedule from
  ``init_r · M`` to ``target_r · M`` (``M`` adapted matrices; a stacked
  module of ``L`` layers counts ``L``), pruning every ``deltaT`` steps, and
  a final phase (``t >= total_step - tfinal``) that fine-tunes the rank
  pattern frozen at ``t = total_step - tfinal``.

  Attributes:
    init_r: rank of every adapter at the start (Hugging Face ``init_r``).
    target_r: average rank per matrix at the end (``target_r``).
    tinit: warm-up steps before any pruning.
    tfinal: final steps with a fixed rank pattern.
    deltaT: steps between two allocations in the budgeting phase (the
      reference's name).
    beta1: EMA factor of the sensitivity ``|p ⊙ g|``.
    beta2: EMA factor of its uncertainty.
    orth_reg_weight: weight of :func:`orthogonal_regularization` in the loss
      (the user adds it; see the function).
    total_step: total training steps; required.
    rank: must equal ``init_r`` when given (the allocator owns the ranks);
      it is set to ``init_r``.
    alpha: the scaling numerator: the update is ``alpha / (init_r + 1e-5)``
      times ``(A ⊙ E) B`` at every rank, as in the reference.

  The other fields are :class:`LoRAConfig`'s. DoRA, rsLoRA, inits other
  than the default and ``rank_pattern`` are rejected, as the reference does
  (its ``rank_pattern`` is the allocator's output, which here comes from
  :func:`rank_pattern`).

  Raises:
    ValueError: at construction, for a missing or non-positive
      ``total_step``, ``target_r > init_r``, ``tinit >= total_step -
      tfinal`` (no budgeting phase), betas outside ``(0, 1)``, ``deltaT <
      1``, a negative ``orth_reg_weight``, or an unsupported LoRA option.
  """

  rank: int | None = None
  init_r: int = 12
  target_r: int = 8
  tinit: int = 0
  tfinal: int = 0
  deltaT: int = 1  # pylint: disable=invalid-name
  beta1: float = 0.85
  beta2: float = 0.85
  orth_reg_weight: float = 0.5
  total_step: int | None = None

  def __post_init__(self):
    _check_positive_int(self.init_r, "init_r")
    _check_positive_int(self.target_r, "target_r")
    if self.rank is not None and self.rank != self.init_r:
      raise ValueError(
          f"AdaLoRA sets every adapter's rank from init_r={self.init_r}; got rank="
          f"{self.rank}. Leave rank unset (the allocator then prunes to target_r).")
    object.__setattr__(self, "rank", self.init_r)
    super().__post_init__()
    if self.total_step is None:
      raise ValueError(
          "AdaLoRA needs total_step (the number of training steps) for its budget "
          "schedule; pass total_step=<int> > 0.")
    _check_positive_int(self.total_step, "total_step")
    if self.target_r > self.init_r:
      raise ValueError(
          f"target_r={self.target_r} is larger than init_r={self.init_r}: AdaLoRA only "
          "prunes ranks, so target_r must be <= init_r.")
    for name in ("tinit", "tfinal"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
    if self.tinit >= self.total_step - self.tfinal:
      raise ValueError(
          f"tinit={self.tinit}, tfinal={self.tfinal} and total_step={self.total_step} "
          "leave no budgeting phase: need tinit < total_step - tfinal. Decrease "
          "tinit or tfinal, or increase total_step.")
    _check_positive_int(self.deltaT, "deltaT")
    for name in ("beta1", "beta2"):
      value = getattr(self, name)
      try:
        validation.number(value, name, low=0.0, high=1.0, low_open=True, high_open=True)
      except validation.InvalidValue:
        raise validation.InvalidValue(f"{name} must be in (0, 1), got {value!r}.") from None
    validation.number(self.orth_reg_weight, "orth_reg_weight", low=0.0)
    if self.use_dora:
      raise ValueError("AdaLoRA does not support DoRA (use_dora=True).")
    if self.use_rslora:
      raise ValueError(
          "AdaLoRA scales by alpha / (init_r + 1e-5) at every rank; use_rslora does not apply.")
    if self.init != "default":
      raise ValueError(
          f"AdaLoRA has its own init (A, B ~ N(0, 0.02²), E = 0); init={self.init!r} "
          "does not apply.")
    if self.rank_pattern:
      raise ValueError(
          "AdaLoRA allocates ranks itself: rank_pattern must be empty (read the "
          "allocation with peft_jax.lora.adalora.rank_pattern(opt_state)).")

  def __hash__(self):  # the parent's by-value hash (dict fields)
    return super().__hash__()

  def replace(self, **changes: Any) -> "AdaLoRAConfig":
    """A copy with ``changes``; ``rank`` follows a changed ``init_r``."""
    changes.setdefault("rank", None)
    return dataclasses.replace(self, **changes)

  def scale_for(self, module_path: str, rank: int | None = None) -> float:
    """``alpha / (init_r + 1e-5)``, at any rank (the reference's fixed ``ranknum``)."""
    del rank  # pruned or resized adapters keep the scale of init_r
    return self.alpha_for(module_path) / (self.init_r + RANKNUM_EPSILON)

  @property
  def final_phase_start(self) -> int:
    """The step at which the rank pattern is frozen: ``total_step - tfinal``."""
    return self.total_step - self.tfinal


def _check_positive_int(value: Any, name: str) -> None:
  try:
    validation.integer(value, name, low=1)
  except validation.InvalidValue:
    raise validation.InvalidValue(f"{name} must be a positive integer, got {value!r}.") from None


def _batch_ndim(kernel_shape, a_shape, b_shape) -> int:
  return len(a_shape) + len(b_shape) - 2 - len(kernel_shape)


@functools.partial(jax.jit, static_argnums=1)
def _svd_init(key: jax.Array, specs: tuple) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
  """``A, B ~ N(0, 0.02²)`` and ``E = 0`` for every ``(a_shape, b_shape, e_shape, dtype)``.

  One compiled program and one draw for all modules: a threefry draw is
  costly to compile, and eager calls would compile one per shape.
  """
  sizes = [math.prod(a_shape) + math.prod(b_shape) for a_shape, b_shape, _, _ in specs]
  draw = SINGULAR_VECTOR_INIT_STDDEV * jax.random.normal(key, (sum(sizes),), jnp.float32)
  leaves, offset = [], 0
  for a_shape, b_shape, e_shape, dtype in specs:
    a_size = math.prod(a_shape)
    lora_a = draw[offset: offset + a_size].reshape(a_shape).astype(dtype)
    lora_b = draw[offset + a_size: offset + a_size + math.prod(b_shape)].reshape(b_shape)
    leaves.append((lora_a, lora_b.astype(dtype), jnp.zeros(e_shape, dtype)))
    offset += a_size + math.prod(b_shape)
  return leaves


def adalora_transform(
    params: Mapping[str, Any],
    config: AdaLoRAConfig,
    *,
    key: jax.Array,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> dict[str, Any]:
  """Adds AdaLoRA leaves ``lora_a``, ``lora_e``, ``lora_b`` beside each target.

  The same tree transformation as :func:`peft_jax.lora_transform` (same
  targeting, layouts, checks), with the reference's initialisation::

      A, B ~ N(0, 0.02²),   E = 0    =>   (A ⊙ E) B = 0

  so the adapted model starts out computing exactly what the base computes.
  Run it under :func:`peft_jax.intercept` with the same ``config``.

  Args:
    params: Flax params (``{'params': ...}`` or the inner dict).
    config: the AdaLoRA configuration.
    key: PRNG key for ``A`` and ``B``.
    layouts: ``{module_path: KernelLayout}`` for kernels of more than two
      axes (see :func:`peft_jax.kernel_layouts`).

  Returns:
    A new params tree, wrapped as the input was.

  Raises:
    TypeError: when ``config`` is not an :class:`AdaLoRAConfig`.
    ValueError: as :func:`peft_jax.lora_transform` (unmatched targets, a
      rank larger than a layer allows, existing adapters, ambiguous layouts).
  """
  if not isinstance(config, AdaLoRAConfig):
    raise TypeError(f"adalora_transform needs an AdaLoRAConfig, got {type(config).__name__}.")
  if config.modules_to_save or config.bias != "none":
    raise ValueError("AdaLoRA with modules_to_save or bias is not supported: its rank "
                     "allocator and resize know only the LoRA factors.")
  transform_key, init_key = jax.random.split(key)
  before = set(targeting.flatten(targeting.unwrap_params(params)[0]))
  out = lora_transform(params, config, key=transform_key, layouts=layouts)
  inner, wrapped = targeting.unwrap_params(out)
  flat = targeting.flatten(inner)
  modules = [p[: -len("/lora_a")] for p in flat if p.endswith("/lora_a") and p not in before]
  specs = []
  for module in modules:
    kernel = next(flat[f"{module}/{n}"] for n in targeting.KERNEL_LEAVES if f"{module}/{n}" in flat)
    lora_a, lora_b = flat[f"{module}/lora_a"], flat[f"{module}/lora_b"]
    batch = lora_a.shape[: _batch_ndim(kernel.shape, lora_a.shape, lora_b.shape)]
    specs.append((tuple(lora_a.shape), tuple(lora_b.shape), batch + (config.init_r,),
                  jnp.dtype(lora_a.dtype).name))
  for module, (lora_a, lora_b, lora_e) in zip(modules, _svd_init(init_key, tuple(specs))):
    flat[f"{module}/lora_a"], flat[f"{module}/lora_b"] = lora_a, lora_b
    flat[f"{module}/lora_e"] = lora_e
  out = targeting.unflatten(flat)
  return {"params": out} if wrapped else out


def _adalora_modules(flat: Mapping[str, Any]) -> list[str]:
  return [p[: -len("/lora_e")] for p in flat if p.endswith("/lora_e")]


def _safe_frobenius_norm(x: jax.Array) -> jax.Array:
  """``‖x‖_F`` over the last two axes, with a zero (not NaN) gradient at 0."""
  squared = jnp.sum(x * x, axis=(-2, -1))
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def orthogonal_regularization(adapters: Mapping[str, Any]) -> jax.Array:
  """The reference's orthogonality penalty on AdaLoRA's singular vectors.

  With ``Q`` the ``(r, fan_in)`` and ``P`` the ``(fan_out, r)`` matrix of each
  adapted matrix (torch layout; every layer of a stacked module counts
  separately) and ``N`` the number of matrices ``P`` and ``Q`` together::

      R = (1 / N) Σ_Q ‖Q Qᵀ - I‖_F  +  (1 / N) Σ_P ‖Pᵀ P - I‖_F

  The norms are not squared (as Hugging Face ``AdaLoraModel.forward`` and
  the original ``loralib.compute_orth_regu``; the paper writes the squared
  form). Masked triplets count too, as in the reference. Add
  ``config.orth_reg_weight * R`` to the loss.

  Args:
    adapters: a tree holding AdaLoRA leaves (only modules with ``lora_e``
      count); wrapped ``{'params': ...}`` or not.

  Returns:
    The scalar ``R`` in float32.

  Raises:
    ValueError: when the tree holds no AdaLoRA module.

  References:
    Zhang et al. 2023, eq. (4); Hugging Face PEFT
    ``peft/tuners/adalora/model.py::AdaLoraModel.forward``.
  """
  flat = targeting.flatten(targeting.unwrap_params(adapters)[0])
  modules = _adalora_modules(flat)
  if not modules:
    raise ValueError("No AdaLoRA module (no 'lora_e' leaf): run adalora_transform first.")
  total = jnp.zeros((), jnp.float32)
  count = 0
  for module in modules:
    lora_e = flat[f"{module}/lora_e"]
    batch = lora_e.shape[:-1]
    rank = lora_e.shape[-1]
    a = flat[f"{module}/lora_a"].astype(jnp.float32).reshape(batch + (-1, rank))
    b = flat[f"{module}/lora_b"].astype(jnp.float32).reshape(batch + (rank, -1))
    eye = jnp.eye(rank, dtype=jnp.float32)
    gram_a = jnp.einsum("...ir,...is->...rs", a, a)  # Q Qᵀ in torch layout
    gram_b = jnp.einsum("...ro,...so->...rs", b, b)  # Pᵀ P
    total = total + jnp.sum(_safe_frobenius_norm(gram_a - eye))
    total = total + jnp.sum(_safe_frobenius_norm(gram_b - eye))
    count += 2 * int(np.prod(batch, dtype=np.int64))
  return total / count


def _find_rank_mask(state: Any) -> Mapping[str, Any] | None:
  if hasattr(state, "rank_mask") and hasattr(state, "sensitivity_ema"):
    return state.rank_mask
  if isinstance(state, (tuple, list)):
    for sub in state:
      found = _find_rank_mask(sub)
      if found is not None:
        return found
  if hasattr(state, "inner_state"):
    return _find_rank_mask(state.inner_state)
  return None


def rank_pattern(state: Any) -> dict[str, np.ndarray]:
  """Which singular values the allocator keeps, per module, on the host.

  Args:
    state: the optimizer state of :func:`peft_jax.optim.adalora`, alone or
      anywhere inside an ``optax.chain`` state; or a mapping
      ``{module_path: mask}`` already.

  Returns:
    ``{module_path: bool array of shape batch + (init_r,)}``: ``True`` for
    kept triplets. Before the first allocation every entry is ``True``;
    from ``total_step - tfinal`` on it is the final pattern (the
    reference's ``config.rank_pattern``).

  Raises:
    ValueError: when no AdaLoRA state is found.
  """
  mask = state if isinstance(state, Mapping) else _find_rank_mask(state)
  if mask is None:
    raise ValueError(
        "No AdaLoRA allocator state found: pass the state of "
        "peft_jax.optim.adalora (or an optax.chain state that holds it).")
  return {module: np.asarray(jax.device_get(m), dtype=bool) for module, m in mask.items()}


def kept_ranks(pattern: Mapping[str, Any]) -> dict[str, int | np.ndarray]:
  """Kept rank per module: an ``int``, or an int array over stacked layers.

  Args:
    pattern: ``{module_path: bool mask}`` from :func:`rank_pattern` (or an
      optimizer state, passed through :func:`rank_pattern`).
  """
  pattern = rank_pattern(pattern)
  ranks = {}
  for module, mask in pattern.items():
    per_matrix = mask.sum(axis=-1)
    ranks[module] = int(per_matrix) if per_matrix.ndim == 0 else per_matrix.astype(np.int64)
  return ranks


def resize_adapters(
    params: Mapping[str, Any],
    pattern: Any,
    config: AdaLoRAConfig,
) -> tuple[dict[str, Any], LoRAConfig]:
  """Slices AdaLoRA adapters to their kept triplets: plain, smaller LoRA.

  For a module with kept indices ``K`` (``pattern[module]``)::

      lora_a' = A[..., K] ⊙ E[K]      lora_b' = B[K, ...]      (no lora_e)

  and the returned :class:`LoRAConfig` gives each module rank ``|K|`` and
  ``alpha = s · |K|`` so that its scale ``alpha / rank`` is AdaLoRA's
  ``s = alpha / (init_r + 1e-5)``. The model then computes what it computed
  with the masked AdaLoRA adapters (``E`` zero outside ``K``). Stacked
  modules (scanned layers) share one array, so they take the largest kept
  rank over their layers; layers that keep fewer are padded with zero
  triplets. Modules that keep nothing lose their adapters.

  Args:
    params: params holding AdaLoRA leaves (wrapped or not); concrete arrays.
    pattern: :func:`rank_pattern`'s output or the optimizer state.
    config: the AdaLoRA config the adapters were trained with.

  Returns:
    ``(params, lora_config)``: the resized params (same wrapping) and a
    :class:`LoRAConfig` to pass to :func:`peft_jax.intercept` or
    :func:`peft_jax.merge`.

  Raises:
    ValueError: when the pattern and the params name different modules, a
      mask's shape does not fit its ``lora_e``, or no triplet is kept.
  """
  pattern = rank_pattern(pattern)
  inner, wrapped = targeting.unwrap_params(params)
  flat = targeting.flatten(inner)
  modules = _adalora_modules(flat)
  if not modules:
    raise ValueError("No AdaLoRA module (no 'lora_e' leaf) in these params.")
  missing, extra = set(modules) - set(pattern), set(pattern) - set(modules)
  if missing or extra:
    raise ValueError(
        f"The rank pattern does not fit these params: modules without a mask "
        f"{sorted(missing)}, masks without a module {sorted(extra)}.")
  ranks, alphas = {}, {}
  for module in modules:
    lora_a = np.asarray(jax.device_get(flat.pop(f"{module}/lora_a")))
    lora_b = np.asarray(jax.device_get(flat.pop(f"{module}/lora_b")))
    lora_e = np.asarray(jax.device_get(flat.pop(f"{module}/lora_e")))
    mask = pattern[module]
    if mask.shape != lora_e.shape:
      raise ValueError(
          f"The mask of {module!r} has shape {mask.shape}; its lora_e has {lora_e.shape}.")
    batch_ndim = lora_e.ndim - 1
    in_ndim = lora_a.ndim - batch_ndim - 1
    out_ndim = lora_b.ndim - batch_ndim - 1
    new_rank = int(mask.sum(axis=-1).max())
    if new_rank == 0:
      continue
    # Kept indices first, in their original order; padding (masked) after.
    order = np.argsort(~mask, axis=-1, kind="stable")[..., :new_rank]
    valid = np.take_along_axis(mask, order, axis=-1)
    e_kept = np.where(valid, np.take_along_axis(lora_e, order, axis=-1), 0)
    a_index = order.reshape(order.shape[:-1] + (1,) * in_ndim + (new_rank,))
    a_kept = np.take_along_axis(lora_a, a_index, axis=-1)
    a_kept = a_kept.astype(np.float32) * e_kept.reshape(a_index.shape).astype(np.float32)
    b_index = order.reshape(order.shape + (1,) * out_ndim)
    b_kept = np.take_along_axis(lora_b, b_index, axis=batch_ndim)
    flat[f"{module}/lora_a"] = jnp.asarray(a_kept.astype(lora_a.dtype))
    flat[f"{module}/lora_b"] = jnp.asarray(b_kept)
    ranks[module] = new_rank
    alphas[module] = config.scale_for(module) * new_rank
  if not ranks:
    raise ValueError("The rank pattern keeps no triplet in any module: nothing to resize to.")
  top = max(ranks.values())
  lora_config = LoRAConfig(
      rank=top,
      alpha=config.scale_for(next(iter(ranks))) * top,
      target_modules=tuple(ranks),
      dropout=config.dropout,
      rank_pattern={re.escape(m): r for m, r in ranks.items()},
      alpha_pattern={re.escape(m): a for m, a in alphas.items()},
      adapter_dtype=config.adapter_dtype,
  )
  out = targeting.unflatten(flat)
  return ({"params": out} if wrapped else out), lora_config
