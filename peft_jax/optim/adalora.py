"""AdaLoRA's rank allocator as an optax transformation.

`adalora(inner, config)` wraps any optax optimizer. Each update it runs the
inner optimizer, then does what Hugging Face PEFT's
`AdaLoraModel.update_and_allocate(t)` does after `optimizer.step()`:

1. Sensitivity of every AdaLoRA entry (`lora_a`, `lora_e`, `lora_b`) from the
   *updated* parameter `p' = p + u` and this step's gradient `g`, smoothed
   twice (EMAs start at 0, no bias correction)::

       I  = |p' ⊙ g|
       Ī  ← β1 Ī + (1 - β1) I
       Ū  ← β2 Ū + (1 - β2) |I - Ī|          (with the updated Ī)
       s  = Ī ⊙ Ū

2. The score of triplet `i` of a matrix (its singular value and vectors)::

       S_i = s(E)_i + mean_in s(A)[..., i] + mean_out s(B)[i, ...]

3. The budget `b(t)` of `budget_schedule` (cubic, from `init_r · M` to
   `target_r · M` for `M` adapted matrices). At a scheduled step the
   `init_r · M - b(t)` lowest-scoring triplets over all modules get their
   singular value set to zero (`S <= kth smallest`, ties included, as
   `torch.kthvalue` there). The zero is applied through the update, so the
   inner optimizer's moments are untouched and a pruned value can regrow
   until the next allocation, as in the reference.

Phases, for the step `t` = number of updates taken before this one (the
reference's `global_step`): `t < T - tfinal` updates the EMAs and prunes when
the schedule says so; `t = T - tfinal` prunes to `target_r · M` with the EMAs
as they stand, freezes that rank pattern and resets the EMAs; `t > T - tfinal`
re-applies the frozen pattern every step.

Every array keeps its shape (pruned entries stay, as zeros), so the update
compiles once. The rank pattern lives in the state: read it with
`peft_jax.lora.adalora.rank_pattern(state)` and resize the adapters after
training with `peft_jax.lora.adalora.resize_adapters`.

References:
  Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient
  Fine-Tuning", ICLR 2023, Algorithm 1 and eqs. (7)-(11).
  Hugging Face PEFT `peft/tuners/adalora/layer.py::RankAllocator`,
  `peft/tuners/adalora/model.py::AdaLoraModel.update_and_allocate`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import base
from optax._src import numerics

from peft_jax.lora.adalora import AdaLoRAConfig
from peft_jax.optim import _paths

__all__ = [
    "AdaLoRAState",
    "adalora",
    "budget_schedule",
    "triplet_scores",
]

_LEAF_NAMES = ("lora_a", "lora_e", "lora_b")


class AdaLoRAState(NamedTuple):
  """State of `adalora`.

  For an AdaLoRA module with stacked-layer shape `B` (empty when not
  stacked), input dims `I`, output dims `O` and `r = init_r`:

  Attributes:
    count: shape=(), dtype=int32. Updates taken so far: the step `t` of the
      next update.
    inner_state: the wrapped optimizer's state.
    sensitivity_ema: `{module_path: {'lora_a': (*B, *I, r), 'lora_e': (*B, r),
      'lora_b': (*B, r, *O)}}`, float32: `Ī`, the EMA of `|p ⊙ g|`.
    uncertainty_ema: same structure, float32: `Ū`, the EMA of `|I - Ī|`.
    rank_mask: `{module_path: (*B, r)}`, bool: the triplets kept by the
      last allocation (all True before the first); from `T - tfinal` on,
      the final rank pattern.
    budget: shape=(), dtype=int32. The scheduled total rank at the last
      update (`init_r · M` before the first).
  """

  count: jax.Array  # shape=(), dtype=jnp.int32
  inner_state: base.OptState
  sensitivity_ema: dict[str, dict[str, jax.Array]]  # float32, like the adapter leaves
  uncertainty_ema: dict[str, dict[str, jax.Array]]  # float32, like the adapter leaves
  rank_mask: dict[str, jax.Array]  # bool (*B, r) per module
  budget: jax.Array  # shape=(), dtype=jnp.int32


@functools.lru_cache(maxsize=32)
def _budget_table(init_budget: int, target_budget: int, tinit: int, tfinal: int,
                  total_step: int) -> np.ndarray:
  """`b(t)` for `t = 0 .. T - tfinal`, with the reference's float64 arithmetic.

  Computed in Python floats, expression for expression as
  `RankAllocator.budget_schedule`, so that `int()` truncates exactly where the
  reference does (a float32 evaluation can land one below an integer).
  """
  final_start = total_step - tfinal
  span = total_step - tfinal - tinit
  table = np.empty(final_start + 1, np.int32)
  for step in range(final_start + 1):
    if step <= tinit:
      table[step] = init_budget
    else:
      mul_coeff = 1 - (step - tinit) / span
      table[step] = int((init_budget - target_budget) * (mul_coeff**3) + target_budget)
  return table


def budget_schedule(step: jax.typing.ArrayLike, config: AdaLoRAConfig, *,
                    num_matrices: int) -> tuple[jax.Array, jax.Array]:
  """The total rank budget at step `t` and whether to prune then.

  With `b0 = init_r · M`, `bT = target_r · M`, `T = total_step`::

      t <= tinit           : b = b0,                                   prune = False
      t >  T - tfinal      : b = bT,                                   prune = True
      otherwise            : b = floor((b0 - bT) (1 - (t - tinit) / (T - tfinal - tinit))³ + bT),
                             prune = (t mod deltaT == 0)

  (`RankAllocator.budget_schedule`; the paper's eq. (12).) Works on traced
  steps under `jax.jit`: the budgets come from a table computed once in
  float64, so they equal the reference's at every step.

  Args:
    step: the step `t` (an int or an int array, any shape).
    config: the AdaLoRA configuration.
    num_matrices: `M`, the number of adapted matrices (a stacked module of
      `L` layers counts `L`).

  Returns:
    `(budget, prune)`: int32 and bool arrays of the shape of `step`.
  """
  init_budget = config.init_r * num_matrices
  target_budget = config.target_r * num_matrices
  final_start = config.final_phase_start
  table = jnp.asarray(_budget_table(init_budget, target_budget, config.tinit, config.tfinal,
                                    config.total_step))
  step = jnp.asarray(step, jnp.int32)
  in_final_phase = step > final_start
  budget = jnp.where(in_final_phase, jnp.int32(target_budget),
                     table[jnp.clip(step, 0, final_start)])
  prune = jnp.where(step <= config.tinit, False,
                    in_final_phase | (step % config.deltaT == 0))
  return budget, prune


def triplet_scores(sensitivity_ema: dict[str, dict[str, jax.Array]],
                   uncertainty_ema: dict[str, dict[str, jax.Array]]) -> dict[str, jax.Array]:
  """Importance `S` of every triplet, `{module_path: (*B, r)}`.

  `S_i = s(E)_i + mean_in s(A)[..., i] + mean_out s(B)[i, ...]` with the
  element score `s = Ī ⊙ Ū` (`RankAllocator._element_score`,
  `mask_to_budget`).
  """
  scores = {}
  for module, ema in sensitivity_ema.items():
    element = {name: ema[name] * uncertainty_ema[module][name] for name in _LEAF_NAMES}
    batch_ndim = element["lora_e"].ndim - 1
    a_axes = tuple(range(batch_ndim, element["lora_a"].ndim - 1))
    b_axes = tuple(range(batch_ndim + 1, element["lora_b"].ndim))
    scores[module] = (element["lora_e"] + jnp.mean(element["lora_a"], axis=a_axes)
                      + jnp.mean(element["lora_b"], axis=b_axes))
  return scores


def _mask_to_budget(scores: dict[str, jax.Array], budget: jax.Array,
                    init_budget: int) -> dict[str, jax.Array]:
  """Keeps triplets scoring above the `(init_budget - budget)`-th smallest score."""
  flat = jnp.concatenate([s.reshape(-1) for s in scores.values()])
  num_pruned = init_budget - budget
  kth_smallest = jnp.sort(flat)[jnp.clip(num_pruned - 1, 0, flat.size - 1)]
  threshold = jnp.where(num_pruned > 0, kth_smallest, -jnp.inf)
  return {module: s > threshold for module, s in scores.items()}


class _Module(NamedTuple):
  """Leaf indices (in `jax.tree.leaves` order) of one AdaLoRA module."""

  path: str
  lora_a: int
  lora_e: int
  lora_b: int


def _find_modules(params: base.Params) -> list[_Module]:
  paths = _paths.flat_paths(params)
  wrapped = isinstance(params, Mapping) and set(params.keys()) == {"params"}
  index = {p: i for i, p in enumerate(paths)}
  modules = []
  for path in paths:
    if not path.endswith("/lora_e"):
      continue
    module = path[: -len("/lora_e")]
    missing = [n for n in ("lora_a", "lora_b") if f"{module}/{n}" not in index]
    if missing:
      raise ValueError(f"AdaLoRA module {module!r} has lora_e but no {missing}.")
    name = module[len("params/"):] if wrapped and module.startswith("params/") else module
    modules.append(_Module(name, index[f"{module}/lora_a"], index[path],
                           index[f"{module}/lora_b"]))
  if not modules:
    raise ValueError(
        "adalora found no AdaLoRA module (a 'lora_e' leaf beside 'lora_a' and 'lora_b') "
        "in the params: create them with peft_jax.lora.adalora.adalora_transform and "
        "pass the adapter tree.")
  return sorted(modules, key=lambda m: m.path)


def _num_matrices(modules: list[_Module], leaves: list[Any]) -> int:
  return sum(int(np.prod(leaves[m.lora_e].shape[:-1], dtype=np.int64)) for m in modules)


def adalora(inner: optax.GradientTransformation,
            config: AdaLoRAConfig) -> optax.GradientTransformationExtraArgs:
  """AdaLoRA: `inner` plus importance-driven pruning of singular values.

  Use it on the adapter tree (from :func:`peft_jax.split`), with the
  gradient of the loss *including* `config.orth_reg_weight *
  orthogonal_regularization(adapters)` (what the reference differentiates).
  It must see the gradients and produce the final updates: wrap the whole
  optimizer (schedule, weight decay) as `inner`, put gradient clipping, if
  any, before it (Hugging Face's Trainer clips `p.grad` before the
  allocator reads it), and nothing after it (pruned singular values would
  no longer land at exactly zero)::

      tx = peft_jax.optim.adalora(optax.adamw(1e-3), config)
      opt_state = tx.init(adapters)
      updates, opt_state = tx.update(grads, opt_state, adapters)
      adapters = optax.apply_updates(adapters, updates)

  Leaves other than AdaLoRA's (a trained head, say) get `inner`'s updates
  unchanged.

  Args:
    inner: the optimizer whose step the allocator follows.
    config: the AdaLoRA configuration (`total_step`, `tinit`, `tfinal`,
      `deltaT`, `beta1`, `beta2`, `init_r`, `target_r`).

  Returns:
    An optax `GradientTransformationExtraArgs`; `update` requires `params`.
    Extra keyword arguments are passed on to `inner`.

  References:
    Zhang et al. 2023 (ICLR), Algorithm 1; Hugging Face PEFT
    `RankAllocator` and `AdaLoraModel.update_and_allocate`.
  """
  if not isinstance(config, AdaLoRAConfig):
    raise TypeError(f"adalora needs an AdaLoRAConfig, got {type(config).__name__}.")
  inner = base.with_extra_args_support(inner)
  beta1, beta2 = config.beta1, config.beta2
  final_start = config.final_phase_start

  def zeros_like_adapters(modules, leaves):
    return {m.path: {n: jnp.zeros(leaves[getattr(m, n)].shape, jnp.float32)
                     for n in _LEAF_NAMES} for m in modules}

  def init_fn(params):
    leaves = jax.tree.leaves(params)
    modules = _find_modules(params)
    rank_mask = {m.path: jnp.ones(leaves[m.lora_e].shape, jnp.bool_) for m in modules}
    init_budget = sum(int(leaves[m.lora_e].size) for m in modules)
    return AdaLoRAState(
        count=jnp.zeros((), jnp.int32),
        inner_state=inner.init(params),
        sensitivity_ema=zeros_like_adapters(modules, leaves),
        uncertainty_ema=zeros_like_adapters(modules, leaves),
        rank_mask=rank_mask,
        budget=jnp.asarray(init_budget, jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(base.NO_PARAMS_MSG)
    inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    modules = _find_modules(params)
    param_leaves = jax.tree.leaves(params)
    grad_leaves = jax.tree.leaves(updates)
    update_leaves, treedef = jax.tree.flatten(inner_updates)
    init_budget = sum(int(param_leaves[m.lora_e].size) for m in modules)
    step = state.count
    in_budget_phase = step < final_start
    at_final_start = step == final_start

    # 1. Sensitivity EMAs from the updated parameters (frozen from T - tfinal on).
    sensitivity, uncertainty = {}, {}
    for m in modules:
      sensitivity[m.path], uncertainty[m.path] = {}, {}
      for name in _LEAF_NAMES:
        i = getattr(m, name)
        updated = (param_leaves[i] + update_leaves[i]).astype(jnp.float32)
        importance = jnp.abs(updated * grad_leaves[i].astype(jnp.float32))
        old_sensitivity = state.sensitivity_ema[m.path][name]
        old_uncertainty = state.uncertainty_ema[m.path][name]
        new_sensitivity = beta1 * old_sensitivity + (1 - beta1) * importance
        new_uncertainty = (beta2 * old_uncertainty
                           + (1 - beta2) * jnp.abs(importance - new_sensitivity))
        sensitivity[m.path][name] = jnp.where(in_budget_phase, new_sensitivity, old_sensitivity)
        uncertainty[m.path][name] = jnp.where(in_budget_phase, new_uncertainty, old_uncertainty)

    # 2-3. Allocation at scheduled steps, and the forced one at T - tfinal.
    budget, prune = budget_schedule(step, config, num_matrices=_num_matrices(modules, param_leaves))
    allocate = (in_budget_phase & prune) | at_final_start
    rank_mask = jax.lax.cond(
        allocate,
        lambda: _mask_to_budget(triplet_scores(sensitivity, uncertainty), budget, init_budget),
        lambda: state.rank_mask)
    apply_mask = allocate | (step > final_start)

    # Pruned singular values become exactly zero: p + (-p) = 0.
    for m in modules:
      i = m.lora_e
      pruned = apply_mask & ~rank_mask[m.path]
      update_leaves[i] = jnp.where(pruned, -param_leaves[i], update_leaves[i]).astype(
          update_leaves[i].dtype)

    # The reference resets the importances once the pattern is final.
    reset = lambda tree: jax.tree.map(lambda x: jnp.where(at_final_start, 0.0, x), tree)
    new_state = AdaLoRAState(
        count=numerics.safe_int32_increment(step),
        inner_state=inner_state,
        sensitivity_ema=reset(sensitivity),
        uncertainty_ema=reset(uncertainty),
        rank_mask=rank_mask,
        budget=budget,
    )
    return jax.tree.unflatten(treedef, update_leaves), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
