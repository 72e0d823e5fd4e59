"""Path helpers shared by the optimizers: flatten, match, layer indices.

A parameter's path is its `/`-joined key path (`model/layers_0/mlp/up_proj/
kernel`). Patterns are matched with `re.fullmatch`, as qwix does for its
rules; a pattern that matches no path is an error that names the pattern and
lists the nearest paths, because a silent no-op is the worst outcome for an
optimizer setting.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import jax

Pattern = Union[str, "re.Pattern[str]"]
Patterns = Union[Pattern, Sequence[Pattern], None]

# Unrolled decoder layers: `.../layers_{i}/...`; the index is group 1.
DEFAULT_UNROLLED_LAYER_PATTERN = r"(?:.*/)?layers_(\d+)/.*"
# Scanned (stacked) decoder layers: `.../layers/...`, leading axis = layer.
DEFAULT_STACKED_LAYER_PATTERN = r"(?:.*/)?layers/.*"


def _key_name(key: Any) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def path_to_str(key_path: Sequence[Any]) -> str:
  """`/`-joined string of a `jax.tree_util` key path."""
  return "/".join(_key_name(k) for k in key_path)


def tree_paths(tree: Any) -> Any:
  """A tree like `tree` whose leaves are their own `/`-joined paths."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, _: path_to_str(kp), tree
  )


def flat_paths(tree: Any) -> list[str]:
  """The `/`-joined paths of the leaves of `tree`, in leaf order."""
  return [path_to_str(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(tree)]


def compile_patterns(patterns: Patterns) -> list["re.Pattern[str]"]:
  """One or several patterns (strings or compiled) as a list of regexes."""
  if patterns is None:
    return []
  if isinstance(patterns, (str, re.Pattern)):
    patterns = [patterns]
  return [p if isinstance(p, re.Pattern) else re.compile(p) for p in patterns]


def unmatched_error(pattern: Pattern, paths: Iterable[str], what: str) -> ValueError:
  """A ValueError naming a pattern that matched nothing and the close paths."""
  text = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
  paths = list(paths)
  close = difflib.get_close_matches(text, paths, n=5, cutoff=0.0)
  return ValueError(
      f"{what} pattern {text!r} matches no parameter path (re.fullmatch on "
      f"'/'-joined paths). Closest paths: {close}."
  )


def check_all_match(patterns: Patterns, paths: Sequence[str], what: str) -> None:
  """Raises `unmatched_error` for the first pattern that matches no path."""
  for pattern in compile_patterns(patterns):
    if not any(pattern.fullmatch(p) for p in paths):
      raise unmatched_error(pattern, paths, what)


def matches_any(path: str, patterns: Sequence["re.Pattern[str]"]) -> bool:
  return any(p.fullmatch(path) for p in patterns)


def first_match(
    path: str, table: Sequence[tuple["re.Pattern[str]", Any]]
) -> tuple[bool, Any]:
  """The value of the first `(pattern, value)` whose pattern matches `path`."""
  for pattern, value in table:
    if pattern.fullmatch(path):
      return True, value
  return False, None


def resolve_per_path(
    spec: Union[Any, Mapping[Pattern, Any], Callable[[str], Any]],
    paths: Sequence[str],
    what: str,
    is_scalar: Callable[[Any], bool],
) -> Callable[[str], tuple[bool, Any]]:
  """Turns a per-parameter option into a `path -> (found, value)` lookup.

  `spec` is a single value (`is_scalar(spec)`), a mapping from patterns to
  values (first match wins; every pattern must match some path), or a
  callable of the path.
  """
  if is_scalar(spec):
    return lambda path: (True, spec)
  if callable(spec) and not isinstance(spec, Mapping):
    return lambda path: (True, spec(path))
  table = [(compile_patterns(k)[0], v) for k, v in spec.items()]
  for pattern, _ in table:
    if not any(pattern.fullmatch(p) for p in paths):
      raise unmatched_error(pattern, paths, what)
  return lambda path: first_match(path, table)
