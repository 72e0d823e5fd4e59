"""``peft_jax.intercept`` on Flax NNX layers: adapters a layer would ignore raise.

Linen interceptors never see NNX modules, so inside :func:`intercept` a
plain ``nnx.Linear`` (``LinearGeneral``, ``Einsum``, ``Conv``, ``Embed``)
holding adapter leaves attached by hand would run without them (output
change 0), and one holding an ``NF4Array`` kernel set by hand would fail
deep inside its product. While the guard is active those built-ins'
``__call__`` refuse such a layer with a message saying what to do. Layers adapted by :func:`peft_jax.nnx.lora_transform` (their
classes carry :data:`PEFT_MARKER`) run their adapters themselves.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

from flax import nnx

from peft_jax import targeting

PEFT_MARKER = "_peft_base"
_BUILTINS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Embed)
_lock = threading.Lock()
_depth = [0]
_originals: dict[type, object] = {}


def idle_adapters(module) -> list[str]:
  """Adapter leaves ``module`` holds but its class would not run."""
  if any(PEFT_MARKER in vars(c) for c in type(module).__mro__):
    return []
  held = [n for n in targeting.ADAPTER_LEAVES if isinstance(getattr(module, n, None), nnx.Variable)]
  if isinstance(getattr(module, targeting.SAVED, None), nnx.Dict):
    held.append(targeting.SAVED)  # trainable copies (peft_jax.lora.saved)
  return held


def _guarded(cls, original):
  @functools.wraps(original)
  def __call__(self, *args, **kwargs):
    idle = idle_adapters(self)
    if idle:
      kernel = getattr(self, "embedding" if isinstance(self, nnx.Embed) else "kernel", None)
      shape = getattr(kernel, "shape", None)
      raise ValueError(
          f"An {cls.__module__.split('.')[1]}.{cls.__name__} with kernel shape {shape} holds "
          f"adapter leaves {idle} that its __call__ ignores (they would train nothing). "
          "Attach adapters with peft_jax.nnx.lora_transform / load_adapters; "
          "peft_jax.nnx.check(model) names the paths.")
    if not any(PEFT_MARKER in vars(c) for c in type(self).__mro__):
      value = getattr(self, "kernel", None)
      value = value.get_value() if isinstance(value, nnx.Variable) else None
      if hasattr(value, "dequantize"):
        raise TypeError(
            f"An nnx.{cls.__name__} holds a quantized kernel ({type(value).__name__}) its "
            "__call__ cannot run: quantize NNX models with peft_jax.nnx.quantize or "
            "peft_jax.nnx.apply_qlora.")
    return original(self, *args, **kwargs)
  return __call__


@contextlib.contextmanager
def guard() -> Iterator[None]:
  """Makes the NNX built-ins refuse adapters they would ignore (re-entrant)."""
  with _lock:
    if _depth[0] == 0:
      for cls in _BUILTINS:
        _originals[cls] = vars(cls)["__call__"]
        cls.__call__ = _guarded(cls, _originals[cls])
    _depth[0] += 1
  try:
    yield
  finally:
    with _lock:
      _depth[0] -= 1
      if _depth[0] == 0:
        for cls, original in _originals.items():
          cls.__call__ = original
        _originals.clear()
