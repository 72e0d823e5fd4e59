"""peft_jax's optax transformations under ``nnx.Optimizer``.

GaLore, LoRA+, LISA and AdaLoRA select leaves by their ``/``-joined paths in
the linen layout (``layers_3/self_attn/q_proj/lora_a``). ``nnx.Optimizer``
hands its transformation ``nnx.State`` trees, whose paths read
``layers/3/...`` (and which LISA would mistake for stacked layers).
:func:`linen_paths` wraps a transformation so that it sees the linen-shaped
tree of the same leaves.
"""

from __future__ import annotations

import optax
from flax import nnx

from peft_jax.nnx.state import from_linen, to_linen


def linen_paths(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``tx`` seeing the linen-shaped tree of an ``nnx.State`` (see module docstring).

  Example::

    tx = peft_jax.nnx.linen_paths(peft_jax.optim.lora_plus(...))
    optimizer = nnx.Optimizer(model, tx, wrt=peft_jax.nnx.Adapter)
  """

  def init(params):
    return tx.init(to_linen(params)[0])

  def update(updates, state, params=None, **extra):
    linen_updates, paths = to_linen(updates)
    linen_params = None if params is None else to_linen(params)[0]
    if extra and isinstance(tx, optax.GradientTransformationExtraArgs):
      new, state = tx.update(linen_updates, state, linen_params, **extra)
    else:
      new, state = tx.update(linen_updates, state, linen_params)
    return from_linen(new, paths), state

  return optax.GradientTransformationExtraArgs(init, update)
