"""Checks of user-given numbers, dtypes and arrays at the library's boundaries.

Every check raises :class:`InvalidValue` naming the field and the value, so
that a bad setting fails where it is given instead of as a NaN, a silent
truncation or a deep traceback later. Traced values (inside ``jax.jit``) are
passed through unchecked: only concrete inputs can be checked.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class InvalidValue(ValueError, TypeError):
  """A bad number, dtype or array given by the user; the message names it.

  A ``ValueError`` (and, for callers that caught the type errors some checks
  used to raise, a ``TypeError``).
  """


def _is_traced(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def _real(value: Any) -> float | None:
  """``float(value)`` for a real scalar (not a bool), else ``None``."""
  if isinstance(value, (bool, np.bool_)):
    return None
  try:
    if isinstance(value, numbers.Real):
      return float(value)
    if isinstance(value, (np.ndarray, jax.Array)) and value.shape == () and (
        np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating)):
      return float(value)
  except OverflowError:  # an int beyond float range: not a finite number
    return math.inf
  return None


def _bounds_text(low, high, low_open, high_open) -> str:
  if low is not None and high is not None:
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
  if low is not None:
    return f"{'>' if low_open else '>='} {low:g}"
  if high is not None:
    return f"{'<' if high_open else '<='} {high:g}"
  return ""


def number(value: Any, name: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> Any:
  """Checks that ``value`` is a finite real number within the bounds.

  Args:
    value: the value (Python or NumPy scalar, 0-d array; a tracer passes).
    name: the field, as the user wrote it (``"alpha"``, ``"--lr"``).
    low, high: bounds (``None``: unbounded).
    low_open, high_open: exclude the bound itself.

  Returns:
    ``value`` unchanged.

  Raises:
    InvalidValue: not a real number, NaN, infinite or out of bounds.
  """
  if _is_traced(value):
    return value
  f = _real(value)
  bad = f is None or not math.isfinite(f)
  if not bad and low is not None:
    bad = f <= low if low_open else f < low
  if not bad and high is not None:
    bad = f >= high if high_open else f > high
  if bad:
    bounds = _bounds_text(low, high, low_open, high_open)
    raise InvalidValue(f"{name} must be a finite number{' ' + bounds if bounds else ''}, "
                       f"got {value!r}.")
  return value


def integer(value: Any, name: str, *, low: int | None = 1, high: int | None = None) -> int:
  """Checks that ``value`` is an integer (not a bool or float) within ``[low, high]``.

  0-d integer arrays count as integers; a tracer passes unchecked.

  Returns:
    ``int(value)`` (a tracer unchanged).

  Raises:
    InvalidValue: otherwise, naming ``name`` and the value.
  """
  if _is_traced(value):
    return value
  if isinstance(value, (np.ndarray, jax.Array)) and value.shape == () and np.issubdtype(
      value.dtype, np.integer):  # e.g. from optax.inject_hyperparams
    value = value.item()
  ok = isinstance(value, (numbers.Integral, np.integer)) and not isinstance(
      value, (bool, np.bool_))
  if ok:
    ok = (low is None or value >= low) and (high is None or value <= high)
  if not ok:
    bounds = _bounds_text(low, high, False, False)
    raise InvalidValue(f"{name} must be an integer{' ' + bounds if bounds else ''}, "
                       f"got {value!r}.")
  return int(value)


def boolean(value: Any, name: str) -> bool:
  """Checks that ``value`` is a bool (a string such as ``"false"`` is not)."""
  if not isinstance(value, (bool, np.bool_)):
    raise InvalidValue(f"{name} must be True or False, got {value!r}.")
  return bool(value)


def float_dtype(value: Any, name: str, *, allow_none: bool = True) -> np.dtype | None:
  """The NumPy dtype of ``value``, which must name a floating-point dtype.

  Raises:
    InvalidValue: not a dtype, or not a float dtype (e.g. ``int8``).
  """
  if value is None and allow_none:
    return None
  try:
    dtype = np.dtype(jnp.dtype(value))
  except (TypeError, ValueError):
    raise InvalidValue(f"{name} must be a float dtype, got {value!r}.") from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise InvalidValue(f"{name} must be a float dtype (float32, bfloat16, ...), got "
                       f"{dtype.name}.")
  return dtype


def finite_array(x: Any, name: str) -> None:
  """Checks that a concrete array holds no NaN or infinity (tracers pass).

  Raises:
    InvalidValue: naming ``name``, the count and the first bad value's index.
  """
  if _is_traced(x) or not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
    return
  if bool(jnp.all(jnp.isfinite(x))):  # one scalar to the host in the common case
    return
  bad = np.argwhere(~np.asarray(jnp.isfinite(x)))
  first = tuple(int(i) for i in bad[0])
  value = np.asarray(x)[first] if first else np.asarray(x)
  raise InvalidValue(f"{name} holds {len(bad)} non-finite value(s) (first: {value} at index "
                     f"{first}); quantizing or training on it would give NaN.")


def learning_rate(value: Any, name: str = "learning_rate") -> Any:
  """A finite learning rate >= 0, or a schedule (a callable, passed through)."""
  if callable(value):
    return value
  return number(value, name, low=0.0)
