"""Selecting modules of a Flax parameter tree by path.

A *module path* is the ``/``-joined key path of the dict that holds a module's
parameters, without a leading ``params`` collection name, e.g.
``model/layers_3/self_attn/q_proj``. A module is *adaptable* when it holds a
``kernel`` (``Dense``, ``DenseGeneral``, ``Einsum``, ``Conv``) or an
``embedding`` (``Embed``).

Other weights (``w``, ``weight``, Gemma's ``gating_einsum``) are adaptable
when named in ``weight_names``; each is a target of its own, its *target
path* being the weight's path (``mlp/gating_einsum``). Its adapter leaves
live in a dict beside it, the *adapter site* ``mlp/gating_einsum_lora``
(``{'lora_a': ..., 'lora_b': ...}``); for ``kernel``/``embedding`` the site
is the module itself (``q_proj/lora_a``), as always.

Three ways to name targets, as in Hugging Face PEFT and qwix:

* a sequence of names: a module matches a name when its path equals it or ends
  with ``/name`` (so ``"q_proj"`` and ``"self_attn/q_proj"`` both work);
* a single string: a regular expression matched with :func:`re.fullmatch`
  against the whole module path;
* ``"all-linear"``: every module holding a ``kernel`` (and every other
  weight named in ``weight_names``), except the output head.

Every name of a sequence must match at least one module, and a regex must match
something: a typo never silently trains nothing.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flax import traverse_util

ALL_LINEAR = "all-linear"
KERNEL_LEAVES = ("kernel", "embedding")
ADAPTER_LEAVES = ("lora_a", "lora_b", "lora_magnitude", "lora_e")
SITE_SUFFIX = "_lora"
SAVED = "saved"  # trainable copies of a module's params (peft_jax.lora.saved)
OUTPUT_HEAD_NAMES = ("lm_head", "output", "head", "classifier", "score")

_LAYER_INDEX = re.compile(r"(?:^|/)(?:layers|layer|h|blocks|block)_(\d+)(?:/|$)")

TargetSpec = str | Sequence[str] | None


def unwrap_params(tree: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool]:
  """Returns the params dict and whether it was wrapped as ``{'params': ...}``."""
  if isinstance(tree, Mapping) and set(tree.keys()) == {"params"}:
    return tree["params"], True
  return tree, False


def flatten(params: Mapping[str, Any]) -> dict[str, Any]:
  """Flattens a nested params dict to ``{'a/b/leaf': value}``."""
  return traverse_util.flatten_dict(dict(params), sep="/") if params else {}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of :func:`flatten`."""
  return traverse_util.unflatten_dict(dict(flat), sep="/") if flat else {}


def split_path(path: str) -> tuple[str, str]:
  """``'a/b/kernel'`` -> ``('a/b', 'kernel')``."""
  module, _, leaf = path.rpartition("/")
  return module, leaf


def adaptable_modules(params: Mapping[str, Any],
                      weight_names: Sequence[str] = KERNEL_LEAVES) -> dict[str, str]:
  """Maps each target path to its weight's leaf name.

  A module holding a ``kernel`` or ``embedding`` is the target path of that
  leaf; another weight named in ``weight_names`` (of two or more axes) is its
  own target path (see the module docstring).
  """
  params, _ = unwrap_params(params)
  found = {}
  for path, leaf_value in flatten(params).items():
    module, leaf = split_path(path)
    if split_path(module)[1] == SAVED:
      continue  # a trainable copy is not a target of its own
    if leaf in KERNEL_LEAVES and module:
      found.setdefault(module, leaf)
    elif (leaf in weight_names and leaf not in KERNEL_LEAVES
          and len(getattr(leaf_value, "shape", ())) >= 2):
      found[path] = leaf
  return found


def weight_path(target: str, leaf: str) -> str:
  """The path of the weight a target adapts (``q_proj`` -> ``q_proj/kernel``)."""
  return f"{target}/{leaf}" if leaf in KERNEL_LEAVES else target


def site_path(target: str, leaf: str) -> str:
  """Where the adapter leaves of a target live (``mlp/w`` -> ``mlp/w_lora``)."""
  return target if leaf in KERNEL_LEAVES else target + SITE_SUFFIX


def site_weight(flat: Mapping[str, Any], site: str) -> str | None:
  """The path of the weight adapted at ``site`` in a flat params dict, else None."""
  for name in KERNEL_LEAVES:
    if f"{site}/{name}" in flat:
      return f"{site}/{name}"
  if site.endswith(SITE_SUFFIX) and site[: -len(SITE_SUFFIX)] in flat:
    return site[: -len(SITE_SUFFIX)]
  return None


def site_target(site: str) -> str:
  """The target path of an adapter site (drops the ``_lora`` suffix of a weight's site)."""
  return site[: -len(SITE_SUFFIX)] if site.endswith(SITE_SUFFIX) else site


def name_matches(name: str, module_path: str) -> bool:
  """Exact or ``/``-suffix match of a module name against a module path."""
  name = name.strip("/")
  return module_path == name or module_path.endswith("/" + name)


def _module_of(target: str, leaf: str) -> str:
  return target if leaf in KERNEL_LEAVES else split_path(target)[0]


def layer_index(module_path: str) -> int | None:
  """The decoder-layer index in an unrolled path (``layers_3`` -> 3), else None."""
  found = _LAYER_INDEX.findall(module_path)
  return int(found[-1]) if found else None


def _is_output_head(module_path: str) -> bool:
  return module_path.rsplit("/", 1)[-1] in OUTPUT_HEAD_NAMES


def _pattern_hits(key: str, path: str) -> bool:
  """A ``rank_pattern`` key against a target path or an adapter site."""
  return any(re.fullmatch(rf"(?:.*/)?(?:{key})", p) for p in {path, site_target(path)})


def _close_paths(pattern: str, paths: Iterable[str], n: int = 5) -> list[str]:
  paths = sorted(set(paths))
  short = {p.rsplit("/", 1)[-1] for p in paths}
  close = difflib.get_close_matches(pattern, paths, n=n, cutoff=0.3)
  close += [
      p for p in difflib.get_close_matches(pattern, sorted(short), n=n, cutoff=0.5)
      if p not in close
  ]
  return close[:n] or paths[:n]


def unmatched_error(what: str, pattern: str, paths: Iterable[str]) -> ValueError:
  """A ValueError naming a pattern that matched nothing and the closest paths."""
  paths = list(paths)
  close = _close_paths(pattern, paths)
  return ValueError(
      f"{what} {pattern!r} matched no module. Closest module paths: {close}. "
      f"({len(paths)} adaptable modules in the tree.)"
  )


def matches(spec: TargetSpec, module_path: str) -> bool:
  """Whether ``module_path`` is selected by a target specification."""
  if spec is None:
    return False
  if isinstance(spec, str):
    if spec == ALL_LINEAR:
      return not _is_output_head(module_path)
    return re.fullmatch(spec, module_path) is not None
  return any(name_matches(name, module_path) for name in spec)


def select_modules(
    params: Mapping[str, Any],
    target_modules: TargetSpec,
    *,
    exclude_modules: TargetSpec = None,
    layers_to_transform: Sequence[int] | None = None,
    what: str = "target_modules",
    weight_names: Sequence[str] = KERNEL_LEAVES,
) -> dict[str, str]:
  """Selects the adaptable modules named by a target specification.

  Args:
    params: a Flax params tree (or ``{'params': tree}``).
    target_modules: names, a regex, or ``"all-linear"`` (see module docstring).
    exclude_modules: the same forms; matching modules are dropped.
    layers_to_transform: keep only modules of these unrolled layer indices.
    what: the argument name used in error messages.
    weight_names: leaf names adaptable besides ``kernel``/``embedding``.

  Returns:
    ``{target_path: leaf_name}`` in tree order (see :func:`adaptable_modules`).

  Raises:
    ValueError: when a name or regex matches no module, or nothing at all is
      selected after exclusions.
  """
  modules = adaptable_modules(params, weight_names)
  if target_modules is None:
    raise ValueError(f"{what} must be given (names, a regex, or 'all-linear').")
  if isinstance(target_modules, str):
    if target_modules == ALL_LINEAR:
      chosen = [m for m, leaf in modules.items()
                if leaf != "embedding" and not _is_output_head(_module_of(m, leaf))]
    else:
      try:
        re.compile(target_modules)
      except re.error as e:
        raise ValueError(f"{what} {target_modules!r} is not a valid regex: {e}") from e
      chosen = [m for m in modules if re.fullmatch(target_modules, m)]
      if not chosen:
        raise unmatched_error(f"{what} regex", target_modules, modules)
  else:
    names = list(target_modules)
    if not names:
      raise ValueError(f"{what} is empty: name at least one module.")
    for name in names:
      if not any(name_matches(name, m) for m in modules):
        raise unmatched_error(f"{what} entry", name, modules)
    chosen = [m for m in modules if any(name_matches(n, m) for n in names)]

  if exclude_modules is not None:
    if not isinstance(exclude_modules, str):
      for name in exclude_modules:
        if not any(name_matches(name, m) for m in modules):
          raise unmatched_error("exclude_modules entry", name, modules)
    chosen = [m for m in chosen if not matches(exclude_modules, m)]

  if layers_to_transform is not None:
    wanted = set(layers_to_transform)
    indexed = {m: layer_index(m) for m in chosen}
    if not any(i is not None for i in indexed.values()):
      raise ValueError(
          "layers_to_transform needs unrolled layers named like 'layers_3'; none of "
          f"the selected modules has a layer index (e.g. {chosen[:3]}). With scanned "
          "(stacked) layers every layer shares one adapter shape: adapt all layers.")
    chosen = [m for m, i in indexed.items() if i in wanted]

  if not chosen:
    raise ValueError(
        f"{what}={target_modules!r} selected no module after exclude_modules="
        f"{exclude_modules!r} and layers_to_transform={layers_to_transform!r}.")
  return {m: modules[m] for m in chosen}


def resolve_pattern(
    pattern: Mapping[str, Any] | None, module_path: str, default: Any
) -> Any:
  """Value of the first key that matches ``module_path``, else ``default``.

  Keys follow Hugging Face's ``rank_pattern`` / ``alpha_pattern``: a key is a
  regex matched with ``re.fullmatch`` against the path or any ``/``-suffix of it
  (``"q_proj"``, ``"layers_0/.*/q_proj"``, ``"model/layers_1/mlp/up_proj"``).
  """
  if not pattern:
    return default
  for key, value in pattern.items():
    if _pattern_hits(key, module_path):
      return value
  return default


def check_patterns_match(
    pattern: Mapping[str, Any] | None, module_paths: Iterable[str], what: str
) -> None:
  """Raises when a ``rank_pattern``/``alpha_pattern`` key matches no module."""
  module_paths = list(module_paths)
  for key in pattern or {}:
    if not any(_pattern_hits(key, m) for m in module_paths):
      raise unmatched_error(f"{what} key", key, module_paths)
