"""``kernel_layouts``: read every adaptable weight's layout off a model by tracing it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax

from peft_jax import targeting
from peft_jax.lora import ops
from peft_jax.lora.interceptor import SUPPORTED, module_path, substituted
from peft_jax.lora.layout import KernelLayout, module_layout


def kernel_layouts(model: nn.Module, *args, method=None, **kwargs) -> dict[str, KernelLayout]:
  """Reads every adaptable weight's layout off a model, without running it.

  Traces the model abstractly (``jax.eval_shape``: no FLOPs, no memory):
  ``Dense``/``DenseGeneral``/``Einsum``/``Conv``/``Embed`` give their
  layout from their attributes; any other module's params give theirs from
  the products they enter (contracted axes = input axes, see
  :mod:`peft_jax.lora.ops`). Stacked weights (``nn.scan``/``nn.vmap``) get
  their batch axes from the difference between the stored and the
  per-layer rank.

  Args:
    model: the Flax linen model.
    *args: sample inputs (shapes matter, values do not).
    method: the model method to trace (default ``__call__``).
    **kwargs: keyword inputs of the model.

  Returns:
    ``{target_path: KernelLayout}`` for :func:`peft_jax.lora_transform` and
    :func:`peft_jax.merge`: the module path for a ``kernel``/``embedding``,
    the weight's own path (``mlp/gating_einsum``) for other params.
  """
  seen: dict[str, KernelLayout] = {}

  def record_builtin(next_fun, call_args, call_kwargs, context):
    if context.method_name == "__call__" and isinstance(context.module, SUPPORTED):
      layout = module_layout(context.module, call_args, call_kwargs)
      if layout is not None:
        seen.setdefault(module_path(context.module), layout)
    return next_fun(*call_args, **call_kwargs)

  def init(*a, **k):
    with nn.intercept_methods(record_builtin):
      return model.init(jax.random.key(0), *a, method=method, **k)

  variables = jax.eval_shape(init, *args, **kwargs)
  active: set[int] = set()

  def record_products(next_fun, call_args, call_kwargs, context):
    module = context.module
    scope = module.scope
    if (scope is None or isinstance(module, SUPPORTED) or context.method_name == "setup"
        or id(scope) in active):
      return next_fun(*call_args, **call_kwargs)
    params = module.variables.get("params", {})
    weights = {n: ops.WeightSpec(v) for n, v in params.items()
               if not isinstance(v, Mapping) and len(getattr(v, "shape", ())) >= 2}
    if not weights:
      return next_fun(*call_args, **call_kwargs)
    module._try_setup()  # pylint: disable=protected-access

    def call(views):
      with substituted(scope, views):
        return next_fun(*call_args, **call_kwargs)

    active.add(id(scope))
    try:
      out, report = ops.run(call, weights)
    finally:
      active.discard(id(scope))
    base = module_path(module)
    for name, layouts in report.products.items():
      target = base if name in targeting.KERNEL_LEAVES else f"{base}/{name}".lstrip("/")
      seen.setdefault(target, layouts[0])
    return out

  def apply(variables, *a, **k):
    with nn.intercept_methods(record_products):
      return model.apply(variables, *a, method=method, **k)

  jax.eval_shape(apply, {"params": variables["params"]}, *args, **kwargs)
  flat = targeting.flatten(variables.get("params", {}))
  layouts = {}
  for path, layout in seen.items():
    leaf = flat.get(path)
    if leaf is None:
      leaf = next((flat[f"{path}/{n}"] for n in targeting.KERNEL_LEAVES
                   if f"{path}/{n}" in flat), None)
    if leaf is None:
      continue
    batch = len(leaf.shape) - layout.kernel_ndim
    layouts[path] = dataclasses.replace(layout, batch_ndim=batch)
  return layouts
