"""Trainable copies of whole modules and of biases (PEFT's ``modules_to_save`` and ``bias``).

A module named in ``LoRAConfig.modules_to_save`` (``lm_head``,
``embed_tokens``) gets a trainable copy of each of its params in a dict
``saved`` inside it: ``lm_head/saved/kernel`` beside ``lm_head/kernel``, as
PEFT's ``ModulesToSaveWrapper`` keeps ``original_module`` and a trained copy.
``bias="all"`` copies every ``bias`` leaf, ``bias="lora_only"`` the biases of
adapted modules, into ``<module>/saved/bias`` (PEFT trains the base bias in
place; a copy keeps the base intact and computes the same).

The copies are adapter leaves: :func:`peft_jax.split` puts them with the
adapters, Orbax checkpoints and :func:`peft_jax.export_peft` save them, and
inside :func:`peft_jax.intercept` a module holding ``saved`` runs with the
copies in place of its params (``Embed.__call__`` only: a tied head,
``Embed.attend``, keeps the original embedding, as PEFT without
``ensure_weight_tying``). :func:`peft_jax.merge` replaces the base params by
the copies.

The output head of a tied model (``modules_to_save=["lm_head"]`` without an
``lm_head`` of its own) is copied untied, as PEFT deep-copies ``lm_head``:
``<embedding module>/saved/untied_head`` (a copy of the ``(vocab, hidden)``
table) is what ``Embed.attend`` uses, while the input lookup keeps the base
table.

With ``ensure_weight_tying=True`` (PEFT's option) a tied model gets ONE copy
of the table instead, ``<embedding module>/saved/tied_embedding``, read by
both the input lookup (``Embed.__call__``) and the head (``Embed.attend``),
when ``modules_to_save`` names the embedding, the tied head, or both; its
gradient is the sum of both uses', and :func:`peft_jax.merge` writes it into
the one table.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from peft_jax import targeting

SAVED = targeting.SAVED
HEAD = "untied_head"  # a tied model's head copy, in the embedding's `saved` dict
TIED = "tied_embedding"  # ensure_weight_tying: one copy for the lookup and the tied head
TIED_HEAD = "lm_head"  # the tied head's name in target_modules / rank_pattern / alpha_pattern


def is_saved_path(path: str) -> bool:
  """Whether a flat leaf path is a trainable copy (``.../saved/<leaf>``)."""
  return targeting.split_path(targeting.split_path(path)[0])[1] == SAVED


def base_path(path: str) -> str:
  """The base leaf a copy stands for: ``lm_head/saved/kernel`` -> ``lm_head/kernel``."""
  module, leaf = targeting.split_path(path)
  owner = targeting.split_path(module)[0]
  leaf = "embedding" if leaf in (HEAD, TIED) else leaf  # copies of a tied embedding
  return f"{owner}/{leaf}" if owner else leaf


def copy_path(path: str) -> str:
  """Inverse of :func:`base_path`."""
  module, leaf = targeting.split_path(path)
  return f"{module}/{SAVED}/{leaf}" if module else f"{SAVED}/{leaf}"


def _module_leaves(flat: Mapping[str, Any]) -> dict[str, list[str]]:
  """``{module: [leaf paths]}`` of the plain (non-adapter, non-copy) array leaves."""
  modules: dict[str, list[str]] = {}
  for path, value in flat.items():
    module, leaf = targeting.split_path(path)
    if (not hasattr(value, "shape") or leaf in targeting.ADAPTER_LEAVES or is_saved_path(path)
        or module.endswith(targeting.SITE_SUFFIX)):
      continue
    modules.setdefault(module, []).append(path)
  return modules


def is_head_name(name: str) -> bool:
  """Whether a ``modules_to_save`` entry names an output head (``lm_head``, ...)."""
  return name.rsplit("/", 1)[-1] in targeting.OUTPUT_HEAD_NAMES


def tied_embedding(flat: Mapping[str, Any], name: str) -> str | None:
  """The embedding module that is the head, when ``name`` names the absent head of a tied model."""
  if not is_head_name(name) or not is_tied(flat):
    return None
  tables = [m for m in _module_leaves(flat) if f"{m}/embedding" in flat]
  return tables[0] if len(tables) == 1 else None


def head_copies(flat: Mapping[str, Any]) -> list[str]:
  """The untied head copies (``.../saved/untied_head``) in ``flat``."""
  return [p for p in flat if is_saved_path(p) and targeting.split_path(p)[1] == HEAD]


def tied_copies(flat: Mapping[str, Any]) -> list[str]:
  """The shared copies of ``ensure_weight_tying`` (``.../saved/tied_embedding``) in ``flat``."""
  return [p for p in flat if is_saved_path(p) and targeting.split_path(p)[1] == TIED]


def _names_tied_table(flat: Mapping[str, Any], names: tuple[str, ...]) -> str | None:
  """The embedding module of a tied model that ``names`` (``modules_to_save``) name, itself
  or as its tied head; None when the model is untied or no name touches it."""
  table = tied_embedding(flat, "lm_head")
  if table is None:
    return None
  hit = any(is_head_name(n) or targeting.name_matches(n, table) for n in names)
  return table if hit else None


def _tie_target(flat: Mapping[str, Any], config, adapted: set[str]) -> str | None:
  """The embedding ``ensure_weight_tying`` shares between lookup and head, else None
  (after a warning when the option can do nothing, as PEFT warns).

  A LoRA-adapted tied embedding is tied too (the head, ``Embed.attend``, adds
  the embedding's LoRA term: PEFT's ``target_modules_to_tie``); that needs no copy.

  Raises:
    ValueError: LoRA on an embedding of a model with its own head (nothing to
      tie), or DoRA/AdaLoRA on the tied embedding (PEFT ties plain LoRA A and B).
  """
  if not config.ensure_weight_tying:
    return None
  names = config.modules_to_save or ()
  table = tied_embedding(flat, "lm_head")
  if table is not None and table in adapted:
    if _names_tied_table(flat, names):
      raise ValueError(f"Module {table!r} is both a LoRA target and, tied, in modules_to_save: "
                       "a saved module is trained whole, so leave it out of target_modules.")
    extra = sorted(n for n in ("lora_magnitude", "lora_e") if f"{table}/{n}" in flat)
    if extra:
      raise ValueError(f"ensure_weight_tying=True ties plain LoRA A and B of the tied embedding "
                       f"{table!r} to its head; {extra} (DoRA, AdaLoRA) cannot be tied.")
    return None  # LoRA tied: Embed.attend adds the embedding's LoRA term
  embedded = sorted(m for m in adapted if f"{m}/embedding" in flat)
  if embedded and not is_tied(flat):
    raise ValueError(
        f"ensure_weight_tying=True with LoRA on the embedding {embedded} of a model with an "
        "output head of its own: there is nothing to tie (PEFT only warns); drop the option.")
  table = _names_tied_table(flat, names)
  if table is not None:
    return table
  if tied_embedding(flat, "lm_head") is None:
    warnings.warn("ensure_weight_tying=True, but these params have no tied embeddings (an "
                  "output head of its own, or no single embedding table): nothing to tie; "
                  "every saved module trains its own copy (PEFT warns so too).", stacklevel=4)
  else:
    warnings.warn("ensure_weight_tying=True, but modules_to_save names neither the tied "
                  "embedding nor the output head: nothing to tie (PEFT warns so too).",
                  stacklevel=4)
  return None


def tied_head_targets(flat: Mapping[str, Any], config, modules):
  """``config.target_modules`` with a tied model's head (``lm_head``, which has no params:
  it is the embedding's ``attend``) mapped onto its embedding, as PEFT's
  ``ensure_weight_tying`` does (LoRA on the embedding, the head adding its term).

  ``modules``: the adaptable module paths. A list entry naming the head that
  matches no module, or a regex matching ``lm_head``, counts as naming it.

  Raises:
    ValueError: the head named on a tied model without ``ensure_weight_tying``
      (PEFT puts an untied LoRA on the head there, whose merge writes into the
      one shared table and changes the input lookup too: peft#2777).
  """
  spec = config.target_modules
  table = tied_embedding(flat, TIED_HEAD)
  if table is None or spec == targeting.ALL_LINEAR:
    return spec
  if isinstance(spec, str):
    named = [TIED_HEAD] if re.fullmatch(spec, TIED_HEAD) and TIED_HEAD not in modules else []
  else:
    named = [n for n in spec if is_head_name(n)
             and not any(targeting.name_matches(n, m) for m in modules)]
  if not named:
    return spec
  if not config.ensure_weight_tying:
    raise ValueError(
        f"target_modules names the output head {named} of a model with tied embeddings: the "
        f"head has no weight of its own, it is the embedding {table!r} (Embed.attend). Set "
        "ensure_weight_tying=True (as PEFT: LoRA on the embedding, which the tied head shares) "
        f"or target {table.rsplit('/', 1)[-1]!r}. (PEFT without the option puts an untied "
        "LoRA on lm_head, whose merge also changes the input embedding: peft#2777.)")
  if isinstance(spec, str):
    return f"(?:{spec})|{re.escape(table)}"
  return tuple(dict.fromkeys(table if n in named else n for n in spec))


def tied_head_scale(config, table: str, rank: int) -> float:
  """The scale of the tied head's LoRA term (``ensure_weight_tying``, LoRA on ``table``).

  As PEFT, the head's ``rank_pattern``/``alpha_pattern`` entries are looked up
  under its own name ``lm_head``: a head alpha different from the embedding's
  is honoured (each use scales the shared A and B by its own alpha).

  Raises:
    ValueError: the head's rank differs from the embedding's ``rank``: it
      shares the embedding's A and B (PEFT would scale them by alpha over a
      rank they do not have).
  """
  head_rank = config.rank_for(TIED_HEAD)
  if head_rank != rank:
    name = table.rsplit("/", 1)[-1]
    raise ValueError(
        f"ensure_weight_tying: the tied head {TIED_HEAD!r} gets rank {head_rank} from the "
        f"config but shares the rank-{rank} LoRA A and B of the embedding {table!r}; give "
        f"both the same rank (rank_pattern={{{name!r}: {rank}, {TIED_HEAD!r}: {rank}}}, or "
        "drop both entries).")
  return config.scale_for(TIED_HEAD, rank)


def tied_lora_table(flat: Mapping[str, Any], config) -> str | None:
  """The tied embedding whose LoRA the head shares (``ensure_weight_tying``), else None."""
  if not config.ensure_weight_tying:
    return None
  table = tied_embedding(flat, TIED_HEAD)
  return table if table is not None and f"{table}/lora_a" in flat else None


def _saved_modules(flat: Mapping[str, Any], names: tuple[str, ...]) -> list[str]:
  modules = _module_leaves(flat)
  chosen = []
  for name in names:
    hits = [m for m in modules if m and targeting.name_matches(name, m)]
    if not hits and tied_embedding(flat, name) is not None:
      continue  # the head of a tied model: add_copies copies it untied
    if not hits:
      close = difflib.get_close_matches(name, sorted(modules), n=5, cutoff=0.3)
      raise ValueError(
          f"modules_to_save entry {name!r} matched no module holding params (closest: {close}). "
          "A tied output head (tie_word_embeddings) has no params of its own: it is the "
          "embedding's attend; save the embedding or untie the head.")
    chosen += [m for m in hits if m not in chosen]
  return chosen


def _adapted_modules(flat: Mapping[str, Any]) -> set[str]:
  """Modules holding adapters (``q_proj/lora_a``, or a weight's site ``mlp/w_lora/lora_a``)."""
  found = set()
  for path in flat:
    site, leaf = targeting.split_path(path)
    if leaf == "lora_a":
      found.add(targeting.split_path(site)[0] if site.endswith(targeting.SITE_SUFFIX) else site)
  return found


def _bias_paths(flat: Mapping[str, Any], bias: str) -> list[str]:
  paths = [p for p in flat if targeting.split_path(p)[1] == "bias" and not is_saved_path(p)]
  if bias == "lora_only":
    adapted = _adapted_modules(flat)
    paths = [p for p in paths if targeting.split_path(p)[0] in adapted]
  if not paths:
    which = "adapted module" if bias == "lora_only" else "module"
    raise ValueError(
        f"bias={bias!r}: no {which} of these params has a 'bias' leaf, so no bias would "
        "train. Use bias='none' for a model without biases.")
  return paths


def add_copies(flat: dict[str, Any], config) -> list[str]:
  """Adds the trainable copies ``config`` asks for to ``flat`` (after the adapters).

  Returns:
    The modules whose params were copied whole.

  Raises:
    ValueError: a ``modules_to_save`` name that matches no module, a module
      both adapted and saved, or a ``bias`` option with no bias to train.
  """
  adapted = _adapted_modules(flat)
  tie = _tie_target(flat, config, adapted)
  saved = _saved_modules(flat, config.modules_to_save or ())
  modules = _module_leaves(flat)
  copies = []
  for module in saved:
    if module in adapted:
      raise ValueError(f"Module {module!r} is both a LoRA target and in modules_to_save: "
                       "a saved module is trained whole, so leave it out of target_modules.")
    if module != tie:  # the tied table gets its one shared copy below
      copies += modules[module]
  if config.bias != "none":
    copies += [p for p in _bias_paths(flat, config.bias) if p not in copies]
  heads = {tied_embedding(flat, n) for n in config.modules_to_save or ()} - {None, tie}
  if tie is not None:
    _copy_leaf(flat, f"{tie}/embedding", f"{tie}/{SAVED}/{TIED}")
  for module in heads:
    path = f"{module}/{SAVED}/{HEAD}"
    _copy_leaf(flat, f"{module}/embedding", path)
    warnings.warn(
        f"modules_to_save names the output head of a model with tied embeddings: the head "
        f"becomes an untied trainable copy of {module!r} ({path}), used by Embed.attend; the "
        "input lookup keeps the original table, as PEFT's deep copy of lm_head without "
        "ensure_weight_tying. peft_jax.merge refuses it (one table cannot hold both).",
        stacklevel=3)
  for path in copies:
    _copy_leaf(flat, path, copy_path(path))
  embeddings = [m for m in saved if f"{m}/embedding" in flat and m != tie]
  if embeddings and is_tied(flat):
    warnings.warn(
        f"modules_to_save copies the embedding {embeddings} of a model without an output head "
        "of its own (tied embeddings): the trained copy acts on the input lookup only; the tied "
        "head (Embed.attend) keeps the original weights, as PEFT does without "
        "ensure_weight_tying. peft_jax.merge refuses it (it would change the head too).",
        stacklevel=3)
  return saved


def _copy_leaf(flat: dict[str, Any], path: str, to: str) -> None:
  if to in flat:
    raise ValueError(f"{to!r} exists already: merge or split the copies off first.")
  value = flat[path]
  # A quantized base weight trains as a dense copy in its compute dtype.
  value = value.dequantize() if hasattr(value, "dequantize") else value
  flat[to] = jnp.array(value, copy=True)


def misfits(flat: Mapping[str, Any], base_flat: Mapping[str, Any] | None = None) -> list[str]:
  """One line per copy without a base leaf of its shape (``base_flat`` default: ``flat``)."""
  base_flat = flat if base_flat is None else base_flat
  problems = []
  for path, value in sorted(flat.items()):
    if not is_saved_path(path):
      continue
    original = base_flat.get(base_path(path))
    if original is None:
      head = tied_embedding(base_flat, targeting.split_path(base_path(path))[0])
      hint = (f" (the base's head is its tied embedding {head!r}: import_peft(..., "
              "base_params=base) makes this the untied head copy)") if head else ""
      problems.append(f"{path}: a saved copy, but the base has no {base_path(path)!r}{hint}")
    elif tuple(getattr(original, "shape", ())) != tuple(getattr(value, "shape", ())):
      problems.append(f"{path}: shape {tuple(value.shape)} but the base "
                      f"{base_path(path)!r} is {tuple(original.shape)}")
    elif targeting.split_path(path)[1] == TIED and not is_tied(base_flat):
      problems.append(f"{path}: a copy shared with the tied head (ensure_weight_tying), but "
                      "the base has an output head of its own")
  return problems


def is_tied(flat: Mapping[str, Any]) -> bool:
  """Whether the params have no output head of their own (the embedding is the head)."""
  return not any(targeting.split_path(m)[1] in targeting.OUTPUT_HEAD_NAMES
                 for m in _module_leaves(flat))


def merge_copies(flat: dict[str, Any]) -> None:
  """Replaces each base leaf by its copy and drops the ``saved`` dicts, in place.

  Raises:
    ValueError: the copy of an embedding that is also the output head (tied):
      the unmerged model ran the head on the original, so merging would
      change the outputs.
  """
  tied = [p for p in flat if is_saved_path(p) and p.endswith("/embedding")]
  if head_copies(flat):
    raise ValueError(
        f"Cannot merge the untied head copy {head_copies(flat)[0]!r} into a model with tied "
        "embeddings: its head and input lookup would need two tables. Serve it unmerged.")
  if tied and is_tied(flat):
    raise ValueError(
        f"Cannot merge the saved copy {tied[0]!r} of a tied embedding: the adapted model runs "
        "the input lookup on the copy but the tied head (Embed.attend) on the original, which "
        "one embedding cannot hold. Serve it unmerged, or untie the head first.")
  for path in [p for p in flat if is_saved_path(p)]:
    value = flat.pop(path)
    original = flat.get(base_path(path))
    flat[base_path(path)] = value if original is None else value.astype(original.dtype)


def config_misfits(flat: Mapping[str, Any], config) -> list[str]:
  """Where the copies in ``flat`` and ``config``'s ``modules_to_save``/``bias`` disagree."""
  owner = lambda p: targeting.split_path(targeting.split_path(p)[0])[0]
  tied = tied_copies(flat)
  copies = sorted({owner(p) for p in flat if is_saved_path(p) and not p.endswith(f"/{HEAD}")
                   and p not in tied})
  biases = [p for p in flat if is_saved_path(p) and p.endswith("/bias")]
  names = config.modules_to_save or ()
  heads = [n for n in names if is_head_name(n)]
  problems = [f"modules_to_save entry {n!r}: no saved copy of such a module"
              for n in names if not any(targeting.name_matches(n, m) for m in copies)
              and not (n in heads and (head_copies(flat) or tied))
              and not any(targeting.name_matches(n, owner(p)) for p in tied)]
  if head_copies(flat) and not heads:
    problems.append(f"{head_copies(flat)[0]}: an untied head copy, but modules_to_save names "
                    "no output head")
  for path in tied:
    if not config.ensure_weight_tying:
      problems.append(f"{path}: a copy shared with the tied head, but ensure_weight_tying "
                      "is False")
    if not heads and not any(targeting.name_matches(n, owner(path)) for n in names):
      problems.append(f"{path}: a tied copy, but modules_to_save names neither the embedding "
                      "nor the head")
    if f"{owner(path)}/{SAVED}/{HEAD}" in flat or f"{owner(path)}/{SAVED}/embedding" in flat:
      problems.append(f"{path}: a tied copy beside another copy of the same table")
  if config.bias != "none" and not biases:
    problems.append(f"bias={config.bias!r}: no saved bias copy")
  for module in copies:
    whole = any(targeting.name_matches(n, module) for n in names)
    only_bias = all(p.endswith("/bias") for p in flat
                    if is_saved_path(p) and p.startswith(f"{module}/{SAVED}/"))
    if not whole and not (only_bias and config.bias != "none"):
      problems.append(f"{module}/{SAVED}: copies that neither modules_to_save nor bias ask for")
  return problems
