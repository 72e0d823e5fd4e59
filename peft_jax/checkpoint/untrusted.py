"""Reading fields of files we did not necessarily write: one readable error per problem.

Every check here raises :class:`FileFormatError` (a ``ValueError``) naming
the file, the field and the offending value, instead of the ``KeyError``,
``TypeError``, ``re.error`` or deep traceback the raw value would cause.
Nothing here imports or calls anything a file names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

from peft_jax.lora.config import CONFIG_FORMAT_VERSION, LoRAConfig, config_from_dict

# Longest module name or pattern key accepted from a file; real ones are < 200.
MAX_NAME_CHARS = 1000
_REGEX_SPECIAL = re.compile(r"[.^$*+?{}\[\]|()\\]")


class FileFormatError(ValueError):
  """A file holds a malformed or hostile field (names the file, field and value)."""


def show(value: Any, limit: int = 80) -> str:
  """``repr(value)``, shortened: hostile values can be megabytes long."""
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def malformed(file: Any, field: str, value: Any, reason: str) -> FileFormatError:
  return FileFormatError(f"{os.fspath(file)}: field {field!r} = {show(value)}: {reason}")


def read_json(path: str | os.PathLike, what: str = "JSON") -> Any:
  """The parsed JSON of ``path``; a clear error for unreadable or malformed files."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, UnicodeDecodeError, RecursionError, ValueError) as error:
    raise FileFormatError(f"{os.fspath(path)}: not readable {what}: {error}") from None


def require_dict(file: Any, field: str, value: Any) -> dict[str, Any]:
  if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
    raise malformed(file, field, value, "expected a JSON object")
  return dict(value)


def require_int(file: Any, field: str, value: Any, *, low: int = 0,
                high: int = 2**53) -> int:
  if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
    raise malformed(file, field, value, f"expected an integer in [{low}, {high}]")
  return value


def require_number(file: Any, field: str, value: Any, *, positive: bool = False) -> float:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not ok or not math.isfinite(value) or (positive and not value > 0):
    raise malformed(file, field, value,
                    f"expected a finite{' positive' if positive else ''} number")
  return float(value)


def require_str(file: Any, field: str, value: Any, choices=None) -> str:
  if not isinstance(value, str) or len(value) > MAX_NAME_CHARS:
    raise malformed(file, field, value, "expected a string")
  if choices is not None and value not in choices:
    raise malformed(file, field, value, f"expected one of {sorted(choices)}")
  return value


def require_bool(file: Any, field: str, value: Any) -> bool:
  if not isinstance(value, bool):
    raise malformed(file, field, value, "expected true or false")
  return value


def literal_name(key: Any) -> str | None:
  """The module name a pattern key spells literally, or ``None`` for a real regex.

  Accepts plain names (``q_proj``, ``model/layers_0/q_proj``,
  ``model.layers.0.q_proj``: the dot counts as a literal) and names escaped
  with ``re.escape`` (what peft_jax writes). Anything with another regex
  operator is not a literal.
  """
  if not isinstance(key, str) or not key or len(key) > MAX_NAME_CHARS:
    return None
  out, i = [], 0
  while i < len(key):
    c = key[i]
    if c == "\\":
      if i + 1 == len(key) or key[i + 1].isalnum():  # \d, \w, \1 ... are operators
        return None
      out.append(key[i + 1])
      i += 2
      continue
    if c != "." and _REGEX_SPECIAL.match(c):
      return None
    out.append(c)
    i += 1
  return "".join(out)


def is_plain(key: Any) -> bool:
  """A pattern key with no regex operator at all (not even ``.``): a regex and a name agree."""
  return isinstance(key, str) and literal_name(key) is not None and not _REGEX_SPECIAL.search(key)


def literal_patterns(file: Any, field: str, pattern: Any) -> dict[str, Any]:
  """``{escaped module name: value}`` from a file's ``rank_pattern``/``alpha_pattern``.

  A key from a file is matched as the exact module name (or ``/``-suffix) it
  spells, never as a regular expression, so no file can stall a load with a
  pathological pattern.
  """
  pattern = require_dict(file, field, pattern)
  out = {}
  for key, value in pattern.items():
    name = literal_name(key)
    if name is None:
      raise malformed(file, f"{field}[{show(key, 60)}]", key,
                      "pattern keys read from files must be module names (regular "
                      "expressions are only taken from Python code)")
    out[key if is_plain(key) else re.escape(name)] = value
  return out


def check_name(name: Any, what: str = "adapter name") -> str:
  """Validates a name used as one folder name (adapter, task, checkpoint).

  Raises:
    ValueError: not a string, empty, ``.``/``..``, or holding a path separator
      (``/``, ``\\``), NUL or another control character.
  """
  if not isinstance(name, str):
    raise ValueError(f"The {what} must be a string, got {type(name).__name__} {show(name)}.")
  bad = [c for c in name if c in "/\\" or ord(c) < 32 or c == "\x7f"]
  if not name or name in (".", "..") or bad or len(name) > 255 or name.startswith("."):
    raise ValueError(f"The {what} {show(name)} must be a plain folder name: non-empty, "
                     "no '/', '\\', NUL or control characters, not starting with '.'.")
  return name


def config_from_file(d: object, file: object) -> LoRAConfig:
  """:func:`config_from_dict` for a dict read from ``file``: one readable error per problem.

  Fields must have the JSON type of their default (a bool stays a bool, a
  name list holds strings), and ``rank_pattern``/``alpha_pattern`` keys are
  exact module names (or ``/``-suffixes), never regular expressions: a file
  cannot stall a load with a pathological pattern.

  Raises:
    ValueError: naming ``file``, the field and the value.
  """
  d = require_dict(file, "config", d)
  for name in ("rank_pattern", "alpha_pattern"):
    if name in d:
      d[name] = literal_patterns(file, name, d[name])
  version = d.get("format_version", CONFIG_FORMAT_VERSION)
  require_int(file, "format_version", version, low=1)
  require_str(file, "config_class", d.get("config_class", "LoRAConfig"))
  defaults = {f.name: f.default for f in dataclasses.fields(LoRAConfig)}
  for name, value in d.items():
    default = defaults.get(name, dataclasses.MISSING)
    if isinstance(default, bool):
      require_bool(file, name, value)
    elif isinstance(default, (int, float)) and not isinstance(value, bool):
      require_number(file, name, value)
    elif isinstance(default, (int, float)):
      raise malformed(file, name, value, "expected a number")
    if isinstance(value, list) and not all(isinstance(v, (str, int)) for v in value):
      raise malformed(file, name, value, "expected a list of names or indices")
    if isinstance(value, str) and len(value) > MAX_NAME_CHARS:
      raise malformed(file, name, value, "too long")
  try:
    return config_from_dict(d)
  except (TypeError, ValueError, KeyError, OverflowError, re.error) as error:
    raise FileFormatError(f"{file}: invalid config: {error}") from None
