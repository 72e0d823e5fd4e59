"""Hugging Face PEFT adapter format: export for PyTorch serving, import back.

A PEFT LoRA directory holds ``adapter_config.json`` and
``adapter_model.safetensors``; the keys name PyTorch modules::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   (r, in)
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   (out, r)
    base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector  (out,)  # DoRA
    base_model.model.model.embed_tokens.lora_embedding_A             (r, vocab)
    base_model.model.model.embed_tokens.lora_embedding_B             (dim, r)

Saved modules and trained biases (``modules_to_save``, ``bias``; our
``<module>/saved/<leaf>`` copies) are stored under the module's own keys::

    base_model.model.lm_head.weight                                  (out, in)
    base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias (out,)   # LoRA module
    base_model.model.model.layers.0.self_attn.k_proj.bias            (out,)   # other module

With ``ensure_weight_tying`` (a tied model) the one shared copy
``<embedding>/saved/tied_embedding`` is written under both
``base_model.model.model.embed_tokens.weight`` and
``base_model.model.lm_head.weight``, and LoRA on the tied embedding also as
the head's ``lm_head.lora_A.weight`` / ``lora_B.weight`` (the embedding's B
and A transposed), as PEFT writes them; import checks the twins bit for bit.

Our leaves are the transposes: ``lora_a (in, r) = lora_A.T`` and
``lora_b (r, out) = lora_B.T`` (for embeddings ``lora_a (vocab, r)`` and
``lora_b (r, dim)``), so ``lora_a @ lora_b`` is the Flax-layout delta kernel.
Files written here match what ``peft==0.21.2`` ``save_pretrained`` writes (key
names, shapes, dtypes, the ``{"format": "pt"}`` metadata and every config
field), and load with ``PeftModel.from_pretrained``.

Module names are translated by a :class:`PathMap`. The default,
:func:`hf_path_map`, fits models whose Flax module names follow Hugging Face
(the reference Llama): ``model/layers_3/mlp/up_proj`` <->
``model.layers.3.mlp.up_proj``, and scanned ``model/layers/...`` adapters with
a leading layer axis export one module per layer.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from peft_jax import targeting
from peft_jax.checkpoint import orbax as orbax_lib
from peft_jax.checkpoint import untrusted as ut
from peft_jax.lora import saved as saved_lib
from peft_jax.lora.tree import adapter_modules
from peft_jax.lora.config import LoRAConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_VERSION = "0.21.2"
KEY_PREFIX = "base_model.model."

# Every field peft 0.21.2 writes for a LoraConfig, at its default value.
_PEFT_CONFIG_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None,
    "auto_mapping": None, "base_model_name_or_path": None, "bias": "none",
    "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
    "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None,
    "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
    "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0, "lora_ga_config": None,
    "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "peft_version": PEFT_VERSION,
    "qalora_group_size": 16, "r": 8, "rank_pattern": {}, "revision": None,
    "target_modules": None, "target_parameters": None, "task_type": None,
    "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
    "use_qalora": False, "use_rslora": False, "velora_config": None,
}
# Config fields whose non-default values change the weights' meaning; importing
# such an adapter would silently compute something else, so it is refused.
_UNSUPPORTED_ON_IMPORT = (
    "alora_invocation_tokens", "arrow_config", "layer_replication",
    "target_parameters", "trainable_token_indices", "use_bdlora", "use_qalora",
    "lora_bias", "velora_config", "monteclora_config", "kasa_config")
_REWRITING_INITS = ("pissa", "olora", "loftq")
_LAYER_CONTAINERS = ("layers", "layer", "h", "blocks", "block")
_KEY_SUFFIXES = {
    ".lora_A.weight": ("linear", "lora_a"),
    ".lora_B.weight": ("linear", "lora_b"),
    ".lora_embedding_A": ("embedding", "lora_a"),
    ".lora_embedding_B": ("embedding", "lora_b"),
    ".lora_magnitude_vector": (None, "lora_magnitude"),
}


@dataclasses.dataclass(frozen=True)
class PathMap:
  """Translates our module paths to Hugging Face module names and back.

  Attributes:
    to_hf: per-layer module path (``model/layers_0/self_attn/q_proj``) ->
      Hugging Face module name (``model.layers.0.self_attn.q_proj``).
    from_hf: the inverse.
    scanned_prefix: our path of a stack of scanned layers
      (``model/layers``); adapters under it carry a leading layer axis and
      layer ``i`` is exported as ``{scanned_prefix}_{i}``. ``None``: no scan.
    embedding_names: last path components of embedding modules, whose
      adapters use PEFT's ``lora_embedding_A``/``lora_embedding_B`` keys.
  """

  to_hf: Callable[[str], str]
  from_hf: Callable[[str], str]
  scanned_prefix: str | None = None
  embedding_names: tuple[str, ...] = ("embed_tokens", "wte", "word_embeddings", "embed_in")

  @classmethod
  def from_pairs(cls, pairs: Mapping[str, str], **kwargs) -> "PathMap":
    """An explicit ``{our_module_path: hf_module_name}`` table (per layer)."""
    forward = dict(pairs)
    backward = {hf: ours for ours, hf in forward.items()}
    if len(backward) != len(forward):
      raise ValueError("The path map sends two of our modules to one Hugging Face name.")

    def lookup(table, name, what):
      if name not in table:
        raise KeyError(f"{what} {name!r} is not in the path map ({len(table)} entries).")
      return table[name]

    return cls(to_hf=lambda p: lookup(forward, p, "Module path"),
               from_hf=lambda n: lookup(backward, n, "Hugging Face module"), **kwargs)


def _component_to_hf(component: str) -> str:
  name, sep, index = component.rpartition("_")
  if sep and index.isdigit() and name in _LAYER_CONTAINERS:
    return f"{name}.{index}"
  return component


def hf_path_map(scanned_prefix: str | None = "model/layers") -> PathMap:
  """The path map of models named like Hugging Face's (the reference Llama).

  Flax names list submodules ``layers_3``; PyTorch names them ``layers.3``.
  Every other component is kept, ``/`` becoming ``.``.
  """

  def to_hf(path: str) -> str:
    return ".".join(_component_to_hf(c) for c in path.split("/"))

  def from_hf(name: str) -> str:
    parts = name.split(".")
    out = []
    for part in parts:
      if part.isdigit() and out and out[-1] in _LAYER_CONTAINERS:
        out[-1] = f"{out[-1]}_{part}"
      else:
        out.append(part)
    return "/".join(out)

  return PathMap(to_hf=to_hf, from_hf=from_hf, scanned_prefix=scanned_prefix)


# -- export -----------------------------------------------------------------------
_EXPORTED = ("lora_a", "lora_b", "lora_magnitude", "lora_e")  # lora_e: refused with its own reason


def _group_by_module(adapters: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  unnamed = sorted(p for p in targeting.flatten(targeting.unwrap_params(adapters)[0])
                   if targeting.split_path(p)[1].startswith("lora_")
                   and targeting.split_path(p)[1] not in _EXPORTED)
  if unnamed:
    raise ValueError(
        f"These adapter leaves have no Hugging Face PEFT name: {unnamed}. Stacked adapters "
        "of mixed batches: export each task's adapters alone (multitask.TaskAdapter).")
  modules = adapter_modules(adapters)
  if not modules:
    raise ValueError("No adapter leaves (lora_a, lora_b, lora_magnitude) to export.")
  return dict(modules)


def _unstack(module: str, leaves: Mapping[str, Any], path_map: PathMap, first: str = "lora_a"
             ) -> list[tuple[str, dict[str, np.ndarray]]]:
  """Per-layer ``(path, leaves)`` of one module (one entry unless scanned)."""
  arrays = {n: np.asarray(v) for n, v in leaves.items()}
  prefix = path_map.scanned_prefix
  if prefix is None or not (module == prefix or module.startswith(prefix + "/")):
    return [(module, arrays)]
  rest = module[len(prefix):]
  num_layers = arrays[first].shape[0]
  return [(f"{prefix}_{i}{rest}", {n: v[i] for n, v in arrays.items()}) for i in range(num_layers)]


def _alpha_value(alpha: float) -> int | float:
  return int(alpha) if float(alpha).is_integer() else float(alpha)


def _target_modules(config: LoRAConfig, our_paths: Sequence[str], hf_names: Sequence[str],
                    tied: Sequence[str] = ()):
  plain_names = (not isinstance(config.target_modules, str)
                 and all("/" not in n for n in config.target_modules)
                 and config.exclude_modules is None and config.layers_to_transform is None)
  if plain_names:
    # Suffix matching is the same rule in both libraries; ensure_weight_tying adds the
    # tied embedding's full name, as PEFT does (which also drops a tied head named there).
    names = {p.rsplit("/", 1)[-1] for p in our_paths}
    if tied and not any(t.rsplit(".", 1)[-1] in config.target_modules for t in tied):
      names -= {t.rsplit(".", 1)[-1] for t in tied}  # the user named lm_head, not the table
    return sorted(names | set(tied))
  return "|".join(re.escape(n) for n in sorted(hf_names))


def _export_copies(adapters: Mapping[str, Any], config: LoRAConfig, path_map: PathMap,
                   adapted: set[str], tensors: dict[str, np.ndarray]) -> list[str] | None:
  """Writes the saved copies under PEFT's keys; returns ``modules_to_save`` for the config.

  A saved module's params go to ``<name>.weight`` / ``<name>.bias`` (PEFT's
  ``ModulesToSaveWrapper`` state); a trained bias to ``<name>.bias``, or
  ``<name>.base_layer.bias`` when the module holds LoRA adapters.
  """
  flat = targeting.flatten(targeting.unwrap_params(adapters)[0])
  problems = saved_lib.config_misfits(flat, config)
  if problems:
    raise ValueError("The saved copies do not match the config: " + "; ".join(problems))
  names = set()
  tied_names = []
  for path, value in sorted(flat.items()):
    if path in saved_lib.tied_copies(flat):
      tied_names.append(_export_tied(path, value, config, path_map, tensors, names))
      continue
    if path in saved_lib.head_copies(flat):  # a tied model's untied head: PEFT's lm_head copy
      head = next(n for n in config.modules_to_save if saved_lib.is_head_name(n))
      hf_name = path_map.to_hf(head)
      tensors[KEY_PREFIX + hf_name + ".weight"] = np.ascontiguousarray(value)
      names.add(hf_name.rsplit(".", 1)[-1])
      continue
    if not saved_lib.is_saved_path(path):
      continue
    module, leaf = targeting.split_path(saved_lib.base_path(path))
    whole = any(targeting.name_matches(n, module) for n in config.modules_to_save or ())
    for layer_path, array in _unstack(module, {leaf: value}, path_map, leaf):
      hf_name = path_map.to_hf(layer_path)
      array = array[leaf]
      if leaf == "kernel" and array.ndim == 2:
        suffix, array = ".weight", array.T
      elif leaf == "embedding" and array.ndim == 2:
        suffix = ".weight"
      elif leaf == "bias" and array.ndim == 1:
        suffix = ".base_layer.bias" if not whole and layer_path in adapted else ".bias"
      else:
        raise ValueError(f"The saved copy {path!r} of shape {array.shape} has no PEFT name: "
                         "only 2-D kernels/embeddings and 1-D biases export.")
      tensors[KEY_PREFIX + hf_name + suffix] = np.ascontiguousarray(array)
      if whole:
        names.add(hf_name.rsplit(".", 1)[-1])
  # PEFT's ensure_weight_tying appends the embedding's full name to modules_to_save.
  return sorted(names) + [n for n in tied_names if n not in names] or None


def _export_tied(path: str, value: Any, config: LoRAConfig, path_map: PathMap,
                 tensors: dict[str, np.ndarray], names: set[str]) -> str:
  """The shared copy of ``ensure_weight_tying`` under PEFT's two keys (the embedding's and
  the tied head's ``.weight``, the same table); returns the embedding's full name."""
  module = targeting.split_path(targeting.split_path(path)[0])[0]
  hf_name = path_map.to_hf(module)
  head = next((n for n in config.modules_to_save or () if saved_lib.is_head_name(n)), "lm_head")
  array = np.ascontiguousarray(value)
  tensors[KEY_PREFIX + hf_name + ".weight"] = array
  tensors[KEY_PREFIX + path_map.to_hf(head) + ".weight"] = array
  if any(targeting.name_matches(n, module) for n in config.modules_to_save or ()):
    names.add(hf_name.rsplit(".", 1)[-1])
  return hf_name


def export_peft(directory: str | os.PathLike, adapters: Mapping[str, Any], config: LoRAConfig,
                *, path_map: PathMap | None = None, base_model_name_or_path: str | None = None,
                task_type: str | None = "CAUSAL_LM") -> dict[str, Any]:
  """Writes adapters as a Hugging Face PEFT LoRA directory.

  Args:
    directory: output folder (created).
    adapters: adapter tree (``lora_a``, ``lora_b``, DoRA ``lora_magnitude``);
      scanned adapters are written one module per layer.
    config: the adapters' config; ranks and alphas that differ from
      ``config.rank``/``config.alpha`` go to ``rank_pattern``/``alpha_pattern``
      under their exact module names.
    path_map: our paths <-> Hugging Face names (default :func:`hf_path_map`).
    base_model_name_or_path: recorded in the config (the Hub id of the base).
    task_type: PEFT task type; ``"CAUSAL_LM"`` loads as
      ``PeftModelForCausalLM``.

  Returns:
    The ``adapter_config.json`` contents that were written.

  Raises:
    ValueError: AdaLoRA leaves, adapters of more than two axes per layer
      (``Conv``, ``Einsum``), or an init that rewrote the base kernel
      (PiSSA, OLoRA, LoftQ), which PEFT cannot load onto the original base.
  """
  if config.init in _REWRITING_INITS:
    raise ValueError(
        f"init={config.init!r} rewrote the base kernels, so these adapters only make sense "
        "on the rewritten base. Merge them (peft_jax.merge) and export the merged model, "
        "or convert them to a plain LoRA delta first.")
  path_map = path_map or hf_path_map()
  tensors: dict[str, np.ndarray] = {}
  rank_pattern, alpha_pattern = {}, {}
  our_paths, hf_names, tied = [], [], []
  for module, leaves in sorted(_group_by_module(adapters).items()):
    if "lora_e" in leaves:
      raise ValueError(
          f"{module!r} holds AdaLoRA leaves; only LoRA/DoRA export to the LoRA format.")
    if "lora_a" not in leaves or "lora_b" not in leaves:
      raise ValueError(f"{module!r} lacks lora_a or lora_b (has {sorted(leaves)}).")
    alpha = config.alpha_for(module)
    # A named weight's site (m/w_lora) is the PEFT module named by the weight (m.w).
    for path, arrays in _unstack(targeting.site_target(module), leaves, path_map):
      lora_a, lora_b = arrays["lora_a"], arrays["lora_b"]
      if lora_a.ndim != 2 or lora_b.ndim != 2:
        raise ValueError(
            f"Adapters at {path!r} have shapes {lora_a.shape} / {lora_b.shape}: only 2-D "
            "(Dense, Embed) adapters map onto PEFT's LoRA layers. Scanned layers need "
            "path_map.scanned_prefix.")
      hf_name = path_map.to_hf(path)
      key = KEY_PREFIX + hf_name
      is_embedding = path.rsplit("/", 1)[-1] in path_map.embedding_names
      a_key, b_key = ((".lora_embedding_A", ".lora_embedding_B") if is_embedding
                      else (".lora_A.weight", ".lora_B.weight"))
      tensors[key + a_key] = np.ascontiguousarray(lora_a.T)
      tensors[key + b_key] = np.ascontiguousarray(lora_b.T)
      if "lora_magnitude" in arrays:
        tensors[key + ".lora_magnitude_vector"] = np.ascontiguousarray(arrays["lora_magnitude"])
      rank = lora_a.shape[-1]
      if is_embedding and config.ensure_weight_tying:
        # PEFT's tied lm_head LoRA: A = lora_embedding_B^T, B = lora_embedding_A^T.
        head_name = path_map.to_hf(saved_lib.TIED_HEAD)
        head = KEY_PREFIX + head_name
        tensors[head + ".lora_A.weight"] = np.ascontiguousarray(lora_b)
        tensors[head + ".lora_B.weight"] = np.ascontiguousarray(lora_a)
        tied.append(hf_name)
        # PEFT looks the head's rank and alpha up under its own name.
        saved_lib.tied_head_scale(config, path, rank)
        head_alpha = config.alpha_for(saved_lib.TIED_HEAD)
        if rank != config.rank:
          rank_pattern[head_name] = int(rank)
        if head_alpha != config.alpha:
          alpha_pattern[head_name] = _alpha_value(head_alpha)
      if rank != config.rank:
        rank_pattern[hf_name] = int(rank)
      if alpha != config.alpha:
        alpha_pattern[hf_name] = _alpha_value(alpha)
      our_paths.append(path)
      hf_names.append(hf_name)
  saved_names = _export_copies(adapters, config, path_map, set(our_paths), tensors)
  hf_config = dict(_PEFT_CONFIG_DEFAULTS)
  hf_config.update(
      modules_to_save=saved_names, bias=config.bias,
      r=config.rank, lora_alpha=_alpha_value(config.alpha), lora_dropout=float(config.dropout),
      use_rslora=config.use_rslora, use_dora=config.use_dora,
      init_lora_weights=True if config.init == "default" else config.init,
      rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
      target_modules=_target_modules(config, our_paths, hf_names, tied),
      ensure_weight_tying=config.ensure_weight_tying,
      base_model_name_or_path=base_model_name_or_path, task_type=task_type)
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  # Each file is written whole under a temporary name, then renamed over the old one.
  weights = os.path.join(directory, WEIGHTS_NAME)
  save_file(tensors, weights + ".tmp", metadata={"format": "pt"})
  config_file = os.path.join(directory, CONFIG_NAME)
  with open(config_file + ".tmp", "w", encoding="utf-8") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(weights + ".tmp", weights)
  os.replace(config_file + ".tmp", config_file)
  return hf_config


# -- import -----------------------------------------------------------------------
def _hf_pattern_value(pattern: Mapping[str, Any], hf_name: str, default: Any) -> Any:
  """PEFT's ``get_pattern_key`` rule for the module names PEFT writes as keys.

  A key read from a file is the exact module name or a ``.``-suffix of it
  (``q_proj``, ``model.layers.0.self_attn.q_proj``); it is never compiled as
  a regular expression (see :func:`untrusted.literal_patterns`).
  """
  for key, value in pattern.items():
    name = ut.literal_name(key)
    if hf_name == name or hf_name.endswith("." + name):
      return value
  return default


def _read_config(config_path: str) -> dict[str, Any]:
  """``adapter_config.json``, its fields type-checked (errors name file, field, value)."""
  hf_config = ut.require_dict(config_path, "(top level)", ut.read_json(config_path, "JSON"))
  ut.require_str(config_path, "peft_type", hf_config.get("peft_type", "LORA"))
  ut.require_int(config_path, "r", hf_config.get("r", 8), low=1, high=2**20)
  ut.require_number(config_path, "lora_alpha", hf_config.get("lora_alpha", 8), positive=True)
  dropout = ut.require_number(config_path, "lora_dropout", hf_config.get("lora_dropout", 0.0))
  if not 0.0 <= dropout < 1.0:
    raise ut.malformed(config_path, "lora_dropout", dropout, "expected a rate in [0, 1)")
  for name in ("use_rslora", "use_dora", "ensure_weight_tying"):
    ut.require_bool(config_path, name, hf_config.get(name, False))
  alpha_pattern = ut.literal_patterns(config_path, "alpha_pattern",
                                      hf_config.get("alpha_pattern") or {})
  for key, value in alpha_pattern.items():
    ut.require_number(config_path, f"alpha_pattern[{ut.show(key, 60)}]", value, positive=True)
  hf_config["alpha_pattern"] = alpha_pattern
  targets = hf_config.get("target_modules")
  if targets is not None and not isinstance(targets, str) and not (
      isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
    raise ut.malformed(config_path, "target_modules", targets,
                       "expected a list of module names or a string")
  return hf_config


def _read_weights(weights_path: str) -> dict[str, np.ndarray]:
  try:
    tensors = load_file(weights_path)
  except Exception as error:  # pylint: disable=broad-except  # SafetensorError, OSError...
    raise ut.FileFormatError(f"{weights_path}: not a readable safetensors file: "
                             f"{type(error).__name__}: {ut.show(str(error), 200)}") from None
  for key, value in tensors.items():
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
      raise ut.malformed(weights_path, key, value.dtype.name, "LoRA weights must be floats")
    if not key.endswith(".base_layer.weight"):
      want = 1 if key.endswith((".lora_magnitude_vector", ".bias")) else 2
      if value.ndim != want:
        raise ut.malformed(weights_path, key, value.shape, f"expected a {want}-D tensor")
  return tensors


def _parse_key(key: str) -> tuple[str, str | None, str] | None:
  if not key.startswith(KEY_PREFIX):
    raise ValueError(f"Key {key!r} does not start with {KEY_PREFIX!r}: not a PEFT LoRA file.")
  for suffix, (kind, leaf) in _KEY_SUFFIXES.items():
    if key.endswith(suffix):
      return key[len(KEY_PREFIX): -len(suffix)], kind, leaf
  return None


def _is_saved_module(hf_name: str, saved_names: Sequence[str]) -> bool:
  """PEFT's rule for ``modules_to_save``: the module name ends with an entry."""
  return any(hf_name.endswith(n) for n in saved_names)  # plain string tests, no regex


def _parse_copy(key: str, value: np.ndarray, bias: str, saved_names: Sequence[str],
                path_map: PathMap) -> tuple[str, np.ndarray] | None:
  """A saved module's or trained bias's tensor -> ``(our copy path, array)``, else None."""
  body = key[len(KEY_PREFIX):]
  if body.endswith(".base_layer.bias") and bias != "none":
    return saved_lib.copy_path(path_map.from_hf(body[: -len(".base_layer.bias")]) + "/bias"), value
  hf_name, _, leaf = body.rpartition(".")
  if leaf not in ("weight", "bias") or not hf_name:
    return None
  path = path_map.from_hf(hf_name)
  if _is_saved_module(hf_name, saved_names):
    if leaf == "bias":
      return saved_lib.copy_path(path + "/bias"), value
    if path.rsplit("/", 1)[-1] in path_map.embedding_names:
      return saved_lib.copy_path(path + "/embedding"), value
    return saved_lib.copy_path(path + "/kernel"), value.T
  if leaf == "bias" and bias != "none":
    return saved_lib.copy_path(path + "/bias"), value
  return None


def _check_copies(copies: Mapping[str, Mapping[str, np.ndarray]], key_of: Mapping[str, str],
                  base_params: Mapping[str, Any], weights_path: str) -> None:
  """Each saved tensor must have a base param of its shape (errors name the file and key)."""
  base_flat = targeting.flatten(targeting.unwrap_params(base_params)[0])
  for module, leaves in sorted(copies.items()):
    for leaf, value in sorted(leaves.items()):
      path = f"{module}/{leaf}"
      original = base_flat.get(saved_lib.base_path(path))
      if original is None or tuple(original.shape) != tuple(value.shape):
        found = "no such param" if original is None else f"shape {tuple(original.shape)}"
        raise ut.malformed(weights_path, key_of[path], tuple(value.shape),
                           f"the base param {saved_lib.base_path(path)!r} has {found}")


def _untie_head(copies: dict[str, dict[str, np.ndarray]], key_of: dict[str, str],
                base_params: Mapping[str, Any]) -> None:
  """A saved head (``lm_head/saved/kernel``) of a base with tied embeddings becomes
  the embedding's untied head copy ``<embedding>/saved/untied_head``, in place."""
  base_flat = targeting.flatten(targeting.unwrap_params(base_params)[0])
  for module in [m for m in copies if set(copies[m]) == {"kernel"}]:
    owner = targeting.split_path(module)[0]
    embedding = saved_lib.tied_embedding(base_flat, owner)
    if f"{owner}/kernel" in base_flat or embedding is None:
      continue
    key_of[f"{embedding}/{saved_lib.SAVED}/{saved_lib.HEAD}"] = key_of.pop(f"{module}/kernel")
    copies.setdefault(f"{embedding}/{saved_lib.SAVED}", {})[saved_lib.HEAD] = (
        copies.pop(module)["kernel"].T)


def _is_tied_head_key(key: str, saved_names: Sequence[str]) -> bool:
  """An ``ensure_weight_tying`` file's head key (``...lm_head.weight``): an output head's
  weight that ``modules_to_save`` does not name (PEFT takes the tied head out of it)."""
  hf_name, _, leaf = key[len(KEY_PREFIX):].rpartition(".")
  return (key.startswith(KEY_PREFIX) and leaf == "weight"
          and saved_lib.is_head_name(hf_name.rsplit(".", 1)[-1])
          and not _is_saved_module(hf_name, saved_names))


def _tie_copies(copies: dict[str, dict[str, np.ndarray]], key_of: dict[str, str],
                tied_heads: Mapping[str, np.ndarray], saved_names: Sequence[str],
                path_map: PathMap, weights_path: str) -> tuple[str, ...]:
  """Makes the saved embedding of an ``ensure_weight_tying`` file the shared copy
  ``<embedding>/saved/tied_embedding`` (each head key must hold the same bits); returns
  our ``modules_to_save``: the file's names without the embedding's full name PEFT
  appended, plus the head."""
  tables = [m for m, leaves in copies.items() if "embedding" in leaves]
  if len(tables) != 1:
    raise ut.FileFormatError(
        f"{weights_path}: ensure_weight_tying and the tied head's {sorted(tied_heads)} need "
        f"exactly one saved embedding to share, found {len(tables)} ({sorted(tables)}).")
  module = tables[0]
  table = copies[module]["embedding"]
  embed_key = key_of.pop(f"{module}/embedding")
  for key, value in sorted(tied_heads.items()):
    if (value.dtype != table.dtype or value.shape != table.shape
        or value.tobytes() != table.tobytes()):
      raise ut.FileFormatError(
          f"{weights_path}: ensure_weight_tying, but {key!r} {value.dtype}{list(value.shape)} "
          f"and {embed_key!r} {table.dtype}{list(table.shape)} differ: the tied head and the "
          "embedding must be one table.")
  copies[module][saved_lib.TIED] = copies[module].pop("embedding")
  key_of[f"{module}/{saved_lib.TIED}"] = embed_key
  full = path_map.to_hf(targeting.split_path(module)[0])
  names = set(_saved_modules(copies, [n for n in saved_names if n != full], path_map) or ())
  heads = {path_map.from_hf(k[len(KEY_PREFIX): -len(".weight")]).rsplit("/", 1)[-1]
           for k in tied_heads}
  return tuple(sorted(names | heads))


def _tie_lora(per_layer: dict[str, dict[str, np.ndarray]], hf_name_of: dict[str, str],
              path_map: PathMap, base_params: Mapping[str, Any] | None, weights_path: str) -> bool:
  """PEFT's tied LoRA (``ensure_weight_tying`` with the embedding a target): the head's
  ``lora_A``/``lora_B`` are the embedding's B and A transposed, bit for bit; they are
  dropped (our tied head adds the embedding's term). Returns whether the option stays on:
  off, with a warning, for a file whose option tied no LoRA (PEFT's untied model)."""
  embeds = [p for p in per_layer if p.rsplit("/", 1)[-1] in path_map.embedding_names]
  heads = [p for p in per_layer if saved_lib.is_head_name(p)]
  if not embeds:
    return True
  base_flat = targeting.flatten(targeting.unwrap_params(base_params)[0]) if base_params else None
  if not heads or (base_flat is not None and not saved_lib.is_tied(base_flat)):
    warnings.warn(f"{weights_path}: ensure_weight_tying, but no tied head LoRA beside the "
                  f"embedding's {embeds} (a model with its own head): imported without the "
                  "option, which tied nothing.", stacklevel=3)
    return False
  if len(embeds) != 1 or len(heads) != 1:
    raise ut.FileFormatError(f"{weights_path}: ensure_weight_tying with LoRA on embeddings "
                             f"{embeds} and heads {heads}: expected one of each.")
  head, embed = per_layer[heads[0]], per_layer[embeds[0]]
  if set(head) != {"lora_a", "lora_b"} or set(embed) != {"lora_a", "lora_b"}:
    raise ValueError(f"{weights_path}: ensure_weight_tying ties plain LoRA only; "
                     f"{hf_name_of[heads[0]]!r} / {hf_name_of[embeds[0]]!r} hold "
                     f"{sorted(head)} / {sorted(embed)}.")
  for leaf, other, key, other_key in (("lora_a", "lora_b", ".lora_A.weight", ".lora_embedding_B"),
                                      ("lora_b", "lora_a", ".lora_B.weight", ".lora_embedding_A")):
    mine, theirs = head[leaf], np.ascontiguousarray(embed[other].T)
    if (mine.dtype != theirs.dtype or mine.shape != theirs.shape
        or np.ascontiguousarray(mine).tobytes() != theirs.tobytes()):
      raise ut.FileFormatError(
          f"{weights_path}: ensure_weight_tying, but {KEY_PREFIX + hf_name_of[heads[0]] + key!r} "
          f"is not {KEY_PREFIX + hf_name_of[embeds[0]] + other_key!r} transposed: the tied "
          "head's LoRA must be the embedding's.")
  del per_layer[heads[0]], hf_name_of[heads[0]]
  return True


def _refuse_untied_head_lora(per_layer: Mapping[str, Any], hf_name_of: Mapping[str, str],
                             base_params: Mapping[str, Any] | None, weights_path: str) -> None:
  """PEFT's LoRA on the ``lm_head`` of a tied model without ``ensure_weight_tying`` (an
  untied head LoRA): the tied base has no head weight for it; an error naming the fix."""
  heads = [p for p in per_layer if saved_lib.is_head_name(p)]
  if not heads or base_params is None:
    return
  base_flat = targeting.flatten(targeting.unwrap_params(base_params)[0])
  table = saved_lib.tied_embedding(base_flat, saved_lib.TIED_HEAD)
  if table is not None and f"{heads[0]}/kernel" not in base_flat:
    raise ValueError(
        f"{weights_path}: LoRA on {hf_name_of[heads[0]]!r}, the output head of a base with tied "
        f"embeddings (its weight is {table!r}), without ensure_weight_tying: PEFT's untied head "
        "LoRA, whose merge also changes the input embedding (peft#2777). peft_jax does not "
        "load it; train with ensure_weight_tying=True (LoRA on the embedding, shared by the "
        "head) instead.")


def _tied_head_patterns(hf_config: Mapping[str, Any], per_layer: Mapping[str, Any],
                        path_map: PathMap, default_rank: int, default_alpha: float,
                        config_path: str) -> tuple[dict[str, int], dict[str, Any]]:
  """The tied head's own rank and alpha (PEFT looks them up under ``lm_head``) as our
  ``rank_pattern``/``alpha_pattern`` entries; a head rank other than the embedding's is an
  error (PEFT would scale the shared A and B by alpha over a rank they do not have)."""
  embeds = [p for p in per_layer if p.rsplit("/", 1)[-1] in path_map.embedding_names]
  if len(embeds) != 1:
    return {}, {}
  head = path_map.to_hf(saved_lib.TIED_HEAD)
  rank = int(per_layer[embeds[0]]["lora_a"].shape[-1])
  ranks = ut.literal_patterns(config_path, "rank_pattern", hf_config.get("rank_pattern") or {})
  head_rank = ut.require_int(config_path, f"rank_pattern[{head!r}]",
                             _hf_pattern_value(ranks, head, default_rank), low=1, high=2**20)
  if head_rank != rank:
    raise ut.malformed(config_path, "rank_pattern", ranks,
                       f"ensure_weight_tying: the tied head {head!r} gets rank {head_rank} but "
                       f"shares the rank-{rank} LoRA of {embeds[0]!r}")
  head_alpha = float(_hf_pattern_value(hf_config.get("alpha_pattern") or {}, head, default_alpha))
  return ({saved_lib.TIED_HEAD: rank} if rank != default_rank else {},
          {saved_lib.TIED_HEAD: _alpha_value(head_alpha)} if head_alpha != default_alpha else {})


def _saved_modules(copies: Mapping[str, Any], saved_names: Sequence[str],
                   path_map: PathMap) -> tuple[str, ...] | None:
  """Our ``modules_to_save``: the last names of the modules copied whole."""
  names = set()
  for module in copies:
    owner = targeting.split_path(module)[0]
    if _is_saved_module(path_map.to_hf(owner), saved_names):
      names.add(owner.rsplit("/", 1)[-1])
  return tuple(sorted(names)) or None


def _stack_layers(per_layer: Mapping[str, dict[str, np.ndarray]], prefix: str,
                  num_layers: int | None) -> dict[str, dict[str, np.ndarray]]:
  """``{prefix}_{i}/rest`` modules -> one ``{prefix}/rest`` with a leading layer axis."""
  pattern = re.compile(rf"{re.escape(prefix)}_(\d+)(/.*)")
  groups: dict[str, dict[int, dict[str, np.ndarray]]] = collections.defaultdict(dict)
  out = {}
  for path, leaves in per_layer.items():
    match = pattern.fullmatch(path)
    if match is None:
      out[path] = leaves
    else:
      groups[prefix + match.group(2)][int(match.group(1))] = leaves
  if num_layers is None:  # the model has at least as many layers as the file names
    num_layers = 1 + max((i for layers in groups.values() for i in layers), default=-1)
  for path, layers in groups.items():
    indices = sorted(layers)
    if len(indices) != num_layers or indices != list(range(num_layers)):
      raise ValueError(
          f"Cannot stack {path!r}: the file adapts layers {indices}, but a scanned model "
          f"of {num_layers} layers needs the module adapted in every layer. Import unrolled "
          "instead.")
    names = set(layers[0])
    shapes = {i: {n: v.shape for n, v in leaves.items()} for i, leaves in layers.items()}
    if any(set(l) != names for l in layers.values()) or len({str(s) for s in shapes.values()}) != 1:
      raise ValueError(f"Cannot stack {path!r}: layers differ in leaves or shapes ({shapes}).")
    out[path] = {n: np.stack([layers[i][n] for i in indices]) for n in names}
  return out


def _weight_targets(modules: Mapping[str, Any], weight_names: Sequence[str],
                    base_params: Mapping[str, Any] | None) -> set[str]:
  """The file's modules that are named weights (adapter sites ``<weight>_lora``)."""
  base = targeting.flatten(targeting.unwrap_params(base_params)[0]) if base_params else {}
  found = set()
  for path in modules:
    name = path.rsplit("/", 1)[-1]
    if name not in targeting.KERNEL_LEAVES and (name in weight_names or path in base):
      found.add(path)
  return found


def import_peft(directory: str | os.PathLike, *, path_map: PathMap | None = None,
                scanned: bool = False, num_layers: int | None = None, dtype: Any = None,
                base_params: Mapping[str, Any] | None = None,
                layouts: Mapping[str, Any] | None = None,
                weight_names: Sequence[str] = ()
                ) -> tuple[dict[str, Any], LoRAConfig]:
  """Reads a Hugging Face PEFT LoRA/DoRA directory into our adapter leaves.

  Args:
    directory: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
    path_map: Hugging Face names <-> our paths (default :func:`hf_path_map`).
    scanned: stack per-layer adapters under ``path_map.scanned_prefix`` with a
      leading layer axis, for a model built with scanned layers.
    num_layers: with ``scanned``, the model's layer count (default: the
      highest layer index in the file, plus one).
    dtype: cast the leaves (default: as stored).
    base_params: when given, every imported adapter is checked against it
      (the module exists, its kernel shape fits, scanned vs unrolled layers)
      and all misfits are listed in one error.
    layouts: kernel layouts for interleaved ``nn.Einsum`` kernels.
    weight_names: names of weights adapted on their own (``LoRAConfig.weight_names``
      beyond ``kernel``/``embedding``): a module ``m.w`` of the file whose last
      name is one of them is the weight ``m/w``, its leaves going to ``m/w_lora``.
      Weights that are leaves of ``base_params`` are found without it.

  Returns:
    ``(adapters, config)``: a nested dict to :func:`peft_jax.combine` with
    the base params, and a config giving each module the rank, alpha and
    scaling PEFT would use.

  Raises:
    FileNotFoundError: the files are missing (``.bin`` pickles are not read).
    ValueError: a non-LoRA PEFT type, features that change the computation
      and that this library does not implement (``lora_bias``, ...), saved
      tensors the config does not announce or whose shape does not fit
      ``base_params`` (naming the file and key), keys that are not LoRA weights, unstackable layers, a
      malformed file (naming the file, field and value), or adapters that do
      not fit ``base_params``.
  """
  directory = os.fspath(directory)
  path_map = path_map or hf_path_map()
  config_path = os.path.join(directory, CONFIG_NAME)
  weights_path = os.path.join(directory, WEIGHTS_NAME)
  for path in (config_path, weights_path):
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"{path} not found (only the safetensors format is read; convert .bin files "
          "with peft first).")
  hf_config = _read_config(config_path)
  if hf_config.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"peft_type {hf_config.get('peft_type')!r} is not LORA.")
  unsupported = {k: hf_config[k] for k in _UNSUPPORTED_ON_IMPORT
                 if hf_config.get(k) not in (None, False, [], {}, _PEFT_CONFIG_DEFAULTS.get(k))}
  bias = hf_config.get("bias", "none")
  if bias not in ("none", "lora_only", "all"):
    raise ut.malformed(config_path, "bias", bias, "expected 'none', 'lora_only' or 'all'")
  saved_names = hf_config.get("modules_to_save") or []
  if not (isinstance(saved_names, list) and all(isinstance(n, str) and n for n in saved_names)):
    raise ut.malformed(config_path, "modules_to_save", saved_names, "expected a list of names")
  if unsupported:
    raise ValueError(f"This adapter uses PEFT features peft_jax does not implement: {unsupported}.")
  init = hf_config.get("init_lora_weights", True)
  if isinstance(init, str) and init.startswith(("pissa", "olora", "corda", "loftq")):
    raise ValueError(
        f"init_lora_weights={init!r}: these adapters belong to a base whose weights the init "
        "rewrote, not to the original base. Convert them to plain LoRA in peft first "
        "(save_pretrained(..., path_initial_model_for_weight_conversion=...)).")

  per_layer: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  unknown, skipped = [], []
  hf_name_of: dict[str, str] = {}
  copies: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  key_of: dict[str, str] = {}
  tying = hf_config.get("ensure_weight_tying", False)
  tied_heads: dict[str, np.ndarray] = {}  # ensure_weight_tying: the head's key of the shared table
  for key, value in _read_weights(weights_path).items():
    if tying and _is_tied_head_key(key, saved_names):
      tied_heads[key] = value
      continue
    parsed = _parse_key(key)
    copy = None if parsed else _parse_copy(key, value, bias, saved_names, path_map)
    if copy is not None:
      copy_path, array = copy
      module, leaf = targeting.split_path(copy_path)
      copies[module][leaf] = array
      key_of[copy_path] = key
      continue
    if parsed is None:
      (skipped if key.endswith(".base_layer.weight") else unknown).append(key)
      continue
    hf_name, kind, leaf = parsed
    path = path_map.from_hf(hf_name)
    hf_name_of[path] = hf_name
    per_layer[path][leaf] = value.T if kind is not None else value
  if unknown:
    raise ValueError(f"Keys that are not LoRA weights: {sorted(unknown)[:10]}"
                     f"{' ...' if len(unknown) > 10 else ''}")
  if skipped:
    warnings.warn(f"Ignoring {len(skipped)} saved base-layer weights ({skipped[0]}, ...): "
                  "they belong to the base model, not the adapter.", stacklevel=2)

  if tying:
    tying = _tie_lora(per_layer, hf_name_of, path_map, base_params, weights_path)
  _refuse_untied_head_lora(per_layer, hf_name_of, base_params, weights_path)
  default_rank, default_alpha = int(hf_config.get("r", 8)), float(hf_config.get("lora_alpha", 8))
  head_ranks, head_alphas = (_tied_head_patterns(hf_config, per_layer, path_map, default_rank,
                                                 default_alpha, config_path)
                             if tying else ({}, {}))
  ranks, alphas = {}, {}
  for path, leaves in per_layer.items():
    if "lora_a" not in leaves or "lora_b" not in leaves:
      raise ValueError(f"{hf_name_of[path]!r}: lora_A and lora_B must both be present.")
    ranks[path] = int(leaves["lora_a"].shape[-1])
    alphas[path] = float(_hf_pattern_value(hf_config.get("alpha_pattern"), hf_name_of[path],
                                           default_alpha))
  if bias != "none" and not any(p.endswith("/bias") for p in key_of):
    warnings.warn(f"{config_path}: bias={bias!r} but the file holds no bias tensor (PEFT "
                  "saves none for a model without biases): imported as bias='none'.",
                  stacklevel=2)
    bias = "none"
  for name in saved_names:
    if not any(_is_saved_module(path_map.to_hf(targeting.split_path(m)[0]), (name,))
               for m in copies):
      raise ut.malformed(config_path, "modules_to_save", saved_names,
                         f"{weights_path} holds no tensor of a module named {name!r}")
  saved_modules = _saved_modules(copies, saved_names, path_map)
  if tied_heads:
    saved_modules = _tie_copies(copies, key_of, tied_heads, saved_names, path_map, weights_path)
  if base_params is not None and not scanned:
    _untie_head(copies, key_of, base_params)
    _check_copies(copies, key_of, base_params, weights_path)
  modules = dict(per_layer)
  if scanned:
    if path_map.scanned_prefix is None:
      raise ValueError("scanned=True needs a path map with scanned_prefix.")
    modules = _stack_layers(modules, path_map.scanned_prefix, num_layers)
    copies = _stack_layers(copies, path_map.scanned_prefix, num_layers)
    layer = re.compile(rf"{re.escape(path_map.scanned_prefix)}_\d+(/.*)")
    for table in (ranks, alphas):
      for path in list(table):
        match = layer.fullmatch(path)
        value = table.pop(path)
        stacked = path_map.scanned_prefix + match.group(1) if match else path
        if table.setdefault(stacked, value) != value:
          raise ValueError(f"Cannot stack {stacked!r}: layers have different ranks or alphas.")

  weights = _weight_targets(modules, weight_names, base_params)
  site_weights = tuple(sorted({p.rsplit("/", 1)[-1] for p in weights}))
  flat = {}
  for path, leaves in list(modules.items()) + list(copies.items()):
    site = targeting.site_path(path, path.rsplit("/", 1)[-1]) if path in weights else path
    for name, value in leaves.items():
      array = jnp.asarray(np.ascontiguousarray(value))
      flat[f"{site}/{name}"] = array if dtype is None else array.astype(dtype)
  hf_targets = hf_config.get("target_modules")
  named_head = False
  if tying and isinstance(hf_targets, list):  # the tied embedding's full name PEFT appends
    appended = {hf_name_of[p] for p in per_layer if p.rsplit("/", 1)[-1] in path_map.embedding_names}
    hf_targets = [t for t in hf_targets if t not in appended]
    # PEFT dropped a tied head named in target_modules (lm_head): the user named the head.
    named_head = bool(appended) and not any(a.rsplit(".", 1)[-1] in hf_targets for a in appended)
  names_only = (isinstance(hf_targets, list) and all("." not in t for t in hf_targets)
                and hf_config.get("layers_to_transform") is None
                and hf_config.get("exclude_modules") is None)
  targets = (tuple(sorted({p.rsplit("/", 1)[-1] for p in modules})) if names_only
             else tuple(sorted(modules)))
  if named_head and names_only:
    targets = tuple(sorted({saved_lib.TIED_HEAD if t in path_map.embedding_names else t
                            for t in targets}))
  config = LoRAConfig(
      rank=default_rank, alpha=_alpha_value(default_alpha),
      weight_names=targeting.KERNEL_LEAVES + site_weights,
      target_modules=targets, dropout=float(hf_config.get("lora_dropout", 0.0)),
      use_rslora=bool(hf_config.get("use_rslora", False)),
      use_dora=bool(hf_config.get("use_dora", False)),
      rank_pattern={**{re.escape(p): r for p, r in sorted(ranks.items()) if r != default_rank},
                    **head_ranks},
      alpha_pattern={**{re.escape(p): _alpha_value(a) for p, a in sorted(alphas.items())
                        if a != default_alpha}, **head_alphas},
      modules_to_save=saved_modules, bias=bias, ensure_weight_tying=tying)
  problems = saved_lib.config_misfits(flat, config)
  if problems:
    raise ut.FileFormatError(f"{weights_path}: the saved tensors do not match "
                             f"{config_path}: " + "; ".join(problems))
  adapters = targeting.unflatten(flat)
  if base_params is not None:
    try:
      orbax_lib.check_adapters_fit(adapters, base_params, config, layouts=layouts)
    except ValueError as error:
      hint = (" (the file's layers are unrolled; pass scanned=True for a scanned base)"
              if not scanned and path_map.scanned_prefix else "")
      raise ValueError(f"{directory}: {error}{hint}") from None
  return adapters, config
