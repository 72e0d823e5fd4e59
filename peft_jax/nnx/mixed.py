"""Mixed-adapter batches on NNX models: several task adapters over one base.

The linen tools make the stack (:func:`peft_jax.multitask.stack_adapters`);
:func:`attach` puts it into the model, and the adapter index of each row is
given as on linen, by running the model inside
:func:`peft_jax.multitask.mixed_adapters`::

    stack = multitask.stack_adapters(library)          # {name: TaskAdapter}, linen-shaped
    pj.nnx.attach(model, stack)                         # in place
    with multitask.mixed_adapters(stack.index(["task1", None, "task2"])):
      logits = model(tokens)                            # row b uses its own adapter

Every adapted layer computes ``scale[k_b] * (x_b A[k_b]) B[k_b]`` for row
``b`` with ``k_b = adapter_index[b]`` (:mod:`peft_jax.lora.ops`, the code the
linen interceptor runs), beside the layer's own adapters and NF4 kernel.
"""

from __future__ import annotations

from flax import nnx

from peft_jax import targeting
from peft_jax import multitask
from peft_jax.nnx import modules as modules_lib
from peft_jax.nnx import state as state_lib
from peft_jax.nnx import transform as transform_lib


def attach(model: nnx.Module, stack: multitask.AdapterStack) -> nnx.Module:
  """Puts stacked adapters beside the model's weights, in place (and returns the model).

  The stacked leaves (``lora_a_stack``, ``lora_b_stack``, ``lora_scale_stack``)
  are ``nnx.Param`` variables at the paths :func:`peft_jax.multitask.attach`
  gives them on the linen twin. Layers created with ``nnx.vmap`` need the
  stack made with ``layouts=pj.nnx.layouts(model)`` (a leading layer axis).

  Raises:
    ValueError: a stack for a module or weight the model lacks, a stack on an
      ``nnx.Conv`` (not supported in mixed batches, as on linen), or a model
      already holding a stack (:func:`detach` it first).
  """
  params = state_lib.params(model)
  if any(targeting.split_path(p)[1] in modules_lib.STACK_LEAVES
         for p in targeting.flatten(params)):
    raise ValueError("This model already holds stacked adapters: call peft_jax.nnx.detach first.")
  mods = state_lib.modules(model)
  for path in targeting.flatten(stack.leaves):
    site = targeting.split_path(path)[0]
    if isinstance(mods.get(site), nnx.Conv):
      raise ValueError(f"Mixed-adapter batches do not support Conv modules ({site!r}): "
                       "merge that adapter per task instead.")
  new = multitask.attach(params, stack)
  return transform_lib.sync(model, new, transform_lib.model_config(model))


def detach(model: nnx.Module) -> nnx.Module:
  """Removes the stacked adapters of :func:`attach` (in place); other adapters stay."""
  flat = {p: v for p, v in targeting.flatten(state_lib.params(model)).items()
          if targeting.split_path(p)[1] not in modules_lib.STACK_LEAVES}
  return transform_lib.sync(model, targeting.unflatten(flat), transform_lib.model_config(model))
