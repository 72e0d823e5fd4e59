"""LoRA+: a larger learning rate for `lora_b` than for `lora_a`.

The parameter grouping follows Hugging Face PEFT's
`peft/optimizers/loraplus.py::create_loraplus_optimizer`, translated to
`/`-joined Flax paths (adapters beside the kernel they adapt).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Union

import jax
import optax
from optax._src import base

from peft_jax import validation
from peft_jax.optim import _paths

__all__ = [
    "LORA_PLUS_GROUPS",
    "lora_plus",
    "lora_plus_groups",
]

# The reference's four groups, in its order.
LORA_PLUS_GROUPS = ("groupA", "embedding", "groupB", "groupB_no_decay")

# Adapters of an embedding module: `model/embed_tokens/lora_a`, `wte/lora_b`.
DEFAULT_EMBEDDING_PATTERN = r"(?:.*/)?[^/]*(?:embed|wte|wpe)[^/]*/lora_[ab]"
# Leaves the reference spares from weight decay: biases and norm parameters
# (`.../input_layernorm/weight`, `model/norm/weight`, `ln_f/scale`).
DEFAULT_NO_DECAY_PATTERN = r"(?:.*/)?[^/]*(?:norm|ln)[^/]*/[^/]+|.*bias[^/]*"
DEFAULT_LORA_B_PATTERN = r"(?:.*/)?lora_b"

Optimizer = Union[base.GradientTransformation, Callable[..., base.GradientTransformation]]


def lora_plus_groups(
    params: Any,
    *,
    embedding_pattern: _paths.Patterns = DEFAULT_EMBEDDING_PATTERN,
    lora_b_pattern: _paths.Patterns = DEFAULT_LORA_B_PATTERN,
    no_decay_pattern: _paths.Patterns = DEFAULT_NO_DECAY_PATTERN,
    stacked_pattern: _paths.Patterns = _paths.DEFAULT_STACKED_LAYER_PATTERN,
) -> Any:
  """The LoRA+ group of every trainable leaf, as a tree of group names.

  In the reference's order of precedence:

  1. "embedding": adapters of an embedding module (`embedding_pattern`).
  2. "groupB": `lora_b` leaves and every leaf that is 1-D per layer (DoRA
     `lora_magnitude`, biases, norm scales), or "groupB_no_decay" for biases
     and norms (`no_decay_pattern`).
  3. "groupA": everything else (`lora_a`, other matrices).

  A leaf under a stacked (scanned) layer, `stacked_pattern`, has a leading
  layer axis that does not count towards "1-D".

  Args:
    params: the trainable tree (arrays or shape structs).
    embedding_pattern, lora_b_pattern, no_decay_pattern, stacked_pattern:
      `re.fullmatch` patterns on `/`-joined paths.

  Returns:
    A tree like `params` with one of `LORA_PLUS_GROUPS` at each leaf.
  """
  embedding = _paths.compile_patterns(embedding_pattern)
  lora_b = _paths.compile_patterns(lora_b_pattern)
  no_decay = _paths.compile_patterns(no_decay_pattern)
  stacked = _paths.compile_patterns(stacked_pattern)

  def group(key_path, leaf):
    path = _paths.path_to_str(key_path)
    if _paths.matches_any(path, embedding):
      return "embedding"
    ndim = len(leaf.shape) - (1 if _paths.matches_any(path, stacked) else 0)
    if _paths.matches_any(path, lora_b) or ndim == 1:
      return "groupB_no_decay" if _paths.matches_any(path, no_decay) else "groupB"
    return "groupA"

  return jax.tree_util.tree_map_with_path(group, params)


def _accepts(factory: Callable[..., Any], name: str) -> bool:
  try:
    parameters = inspect.signature(factory).parameters
  except (TypeError, ValueError):
    return True
  return name in parameters or any(
      p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
  )


def _times(learning_rate: base.ScalarOrSchedule, factor: float) -> base.ScalarOrSchedule:
  if callable(learning_rate):
    return lambda count: factor * learning_rate(count)
  return factor * learning_rate


def lora_plus(
    optimizer: Optimizer,
    learning_rate: base.ScalarOrSchedule,
    ratio: float = 16.0,
    embedding_lr: base.ScalarOrSchedule = 1e-6,
    weight_decay: float = 0.0,
    *,
    embedding_pattern: _paths.Patterns = DEFAULT_EMBEDDING_PATTERN,
    lora_b_pattern: _paths.Patterns = DEFAULT_LORA_B_PATTERN,
    no_decay_pattern: _paths.Patterns = DEFAULT_NO_DECAY_PATTERN,
    stacked_pattern: _paths.Patterns = _paths.DEFAULT_STACKED_LAYER_PATTERN,
    **optimizer_kwargs: Any,
) -> base.GradientTransformation:
  r"""LoRA+ : `optimizer` with the reference's per-group learning rates.

  .. math::

    \eta_A = \eta, \qquad \eta_B = \lambda\,\eta, \qquad
    \eta_{\mathrm{emb}} = \texttt{embedding\_lr}

  where :math:`\lambda` is `ratio` (the paper recommends :math:`2^4`). Groups
  as in `lora_plus_groups`; `weight_decay` applies to all groups except
  "groupB_no_decay" (biases and norms), as in PEFT.

  Args:
    optimizer: an optax alias taking `learning_rate` (and `weight_decay` when
      it is nonzero), e.g. `optax.adamw`, called once per group; or a
      gradient transformation without a learning rate (e.g.
      `optax.scale_by_adam()`), which is chained with decoupled weight decay
      and the group's learning rate.
    learning_rate: :math:`\eta_A`, a float or an optax schedule (the other
      groups follow it: `ratio * schedule`).
    ratio: :math:`\lambda = \eta_B / \eta_A`.
    embedding_lr: learning rate of embedding adapters (PEFT's
      `loraplus_lr_embedding`, default 1e-6); a float or a schedule. A float
      stays constant when `learning_rate` is a schedule.
    weight_decay: PEFT's `loraplus_weight_decay`.
    embedding_pattern, lora_b_pattern, no_decay_pattern, stacked_pattern:
      see `lora_plus_groups`.
    **optimizer_kwargs: further arguments of the `optimizer` factory.

  Returns:
    An `optax.GradientTransformationExtraArgs` (an `optax.partition`).

  Raises:
    TypeError: `weight_decay` is nonzero and the factory takes none.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import peft_jax as pj
    >>> adapters = {"q_proj": {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.zeros((2, 8))}}
    >>> tx = pj.optim.lora_plus(optax.adamw, learning_rate=1e-4, ratio=16)
    >>> state = tx.init(adapters)

  References:
    Hayou, Ghosh & Yu, `LoRA+: Efficient Low Rank Adaptation of Large Models
    <https://arxiv.org/abs/2402.12354>`_, ICML 2024.
  """
  validation.learning_rate(learning_rate)
  validation.learning_rate(embedding_lr, "embedding_lr")
  validation.number(ratio, "LoRA+ ratio", low=0.0, low_open=True)
  validation.number(weight_decay, "weight_decay", low=0.0)
  is_transform = isinstance(optimizer, base.GradientTransformation)
  if optimizer_kwargs and is_transform:
    raise TypeError("optimizer_kwargs need an optimizer factory, not a transformation.")
  if not is_transform and weight_decay != 0 and not _accepts(optimizer, "weight_decay"):
    raise TypeError(
        f"weight_decay={weight_decay} but {getattr(optimizer, '__name__', optimizer)} "
        "takes no weight_decay argument."
    )

  def make(lr: base.ScalarOrSchedule, wd: float) -> base.GradientTransformation:
    if is_transform:
      parts = [optimizer]
      if wd:
        parts.append(optax.add_decayed_weights(wd))
      parts.append(optax.scale_by_learning_rate(lr))
      return optax.chain(*parts)
    kwargs = dict(optimizer_kwargs)
    if _accepts(optimizer, "weight_decay") and (wd or weight_decay):
      kwargs["weight_decay"] = wd
    return optimizer(learning_rate=lr, **kwargs)

  transforms = {
      "groupA": make(learning_rate, weight_decay),
      "embedding": make(embedding_lr, weight_decay),
      "groupB": make(_times(learning_rate, ratio), weight_decay),
      "groupB_no_decay": make(_times(learning_rate, ratio), 0.0),
  }

  def labels(params):
    return lora_plus_groups(
        params,
        embedding_pattern=embedding_pattern,
        lora_b_pattern=lora_b_pattern,
        no_decay_pattern=no_decay_pattern,
        stacked_pattern=stacked_pattern,
    )

  return optax.partition(transforms, labels)
