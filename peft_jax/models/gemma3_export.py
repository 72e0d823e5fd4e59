"""Writes Gemma 3 params as a Hugging Face `Gemma3ForCausalLM` directory.

The inverse of :func:`peft_jax.models.load_gemma3_hf`: `config.json`
(`model_type: gemma3_text`, transformers 5's `rope_parameters`) and one
`model.safetensors` with PyTorch-layout tensors (matrices `(out, in)`, norm
weights `w` as Hugging Face stores them, no `lm_head.weight`: it is tied),
which `transformers.Gemma3ForCausalLM.from_pretrained` (or
`AutoModelForCausalLM`) reads. No PyTorch is needed.

Example:
  >>> gemma = load_gemma3_270m()  # doctest: +SKIP
  >>> save_gemma3_hf("gemma-hf/", gemma.config, gemma3_params(gemma.model))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.models._imports import require as _require
from peft_jax.models.gemma3 import FULL_ATTENTION, SLIDING_ATTENTION, Gemma3Config
from peft_jax.models.gemma3 import gemma3_param_shapes

__all__ = ["gemma3_config_to_hf_dict", "gemma3_params_to_hf_state_dict", "save_gemma3_hf"]

# `Gemma3Config` fields that `config.json` holds under the same name.
_SAME_NAME_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "sliding_window", "final_logit_softcapping",
    "max_position_embeddings")


def gemma3_config_to_hf_dict(config: Gemma3Config, *, torch_dtype: Any = None) -> dict[str, Any]:
  """The Hugging Face `config.json` of a `Gemma3Config` (`Gemma3Config.from_hf_dict` reads it back).

  Args:
    config: the architecture.
    torch_dtype: dtype recorded in the file; `None` uses `config.param_dtype`.
  """
  scalar = config.query_pre_attn_scalar
  full = {"rope_type": "default", "rope_theta": config.rope_theta}
  if config.rope_scaling_factor != 1.0:
    full = {"rope_type": "linear", "factor": config.rope_scaling_factor,
            "rope_theta": config.rope_theta}
  return {
      "architectures": ["Gemma3ForCausalLM"],
      "model_type": "gemma3_text",
      **{key: getattr(config, key) for key in _SAME_NAME_KEYS},
      "rope_parameters": {
          FULL_ATTENTION: full,
          SLIDING_ATTENTION: {"rope_type": "default", "rope_theta": config.rope_local_theta},
      },
      "layer_types": list(config.layer_types),
      # transformers' config class takes an int here (and refuses 256.0).
      "query_pre_attn_scalar": (int(scalar) if float(scalar).is_integer() else scalar),
      "attn_logit_softcapping": None,
      "hidden_activation": "gelu_pytorch_tanh",
      "attention_bias": False,
      "attention_dropout": 0.0,
      "use_bidirectional_attention": False,
      "tie_word_embeddings": True,
      "bos_token_id": 2,
      "eos_token_id": 1,
      "pad_token_id": 0,
      "dtype": jnp.dtype(config.param_dtype if torch_dtype is None else torch_dtype).name,
  }


def _hf_name(path: tuple) -> tuple[str, bool]:
  """`("model", "layers", 3, "mlp", "up_proj", "kernel")` -> (`model.layers.3.mlp.up_proj.weight`, transposed)."""
  *module, leaf = (str(key) for key in path)
  return ".".join([*module, "weight"]), leaf == "kernel"


def gemma3_params_to_hf_state_dict(params: Mapping[str, Any], config: Gemma3Config, *,
                                   dtype: Any = None) -> dict[str, np.ndarray]:
  """`Gemma3ForCausalLM` params -> Hugging Face state dict (numpy, PyTorch layout).

  Raises:
    ValueError: if a param is missing, unexpected (adapter leaves: merge them
      first) or misshapen for `config`.
  """
  expected = gemma3_param_shapes(config)
  flat = {tuple(entry.key for entry in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  missing = sorted(set(expected) - set(flat), key=str)
  unexpected = sorted(set(flat) - set(expected), key=str)
  if missing or unexpected:
    names = lambda paths: ["/".join(map(str, p)) for p in paths[:8]]
    raise ValueError(f"Params do not fit the Gemma 3 config: missing {names(missing)}, "
                     f"unexpected {names(unexpected)} (merge adapters into the base first).")
  state_dict = {}
  for path, leaf in flat.items():
    if tuple(leaf.shape) != expected[path]:
      raise ValueError(f"Param {'/'.join(map(str, path))} has shape {tuple(leaf.shape)}; the "
                       f"config needs {expected[path]}.")
    name, transposed = _hf_name(path)
    array = np.asarray(leaf if dtype is None else jnp.asarray(leaf).astype(dtype))
    state_dict[name] = np.ascontiguousarray(array.T if transposed else array)
  return state_dict


def _replace_atomically(target: pathlib.Path, write) -> None:
  descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial",
                                           dir=target.parent)
  os.close(descriptor)
  try:
    write(temporary)
    os.replace(temporary, target)
  finally:
    pathlib.Path(temporary).unlink(missing_ok=True)


def save_gemma3_hf(directory: str | os.PathLike[str], config: Gemma3Config,
                   params: Mapping[str, Any], *, dtype: Any = None) -> pathlib.Path:
  """Writes `config.json` and `model.safetensors` that `load_gemma3_hf` and transformers read.

  Args:
    directory: created if absent; its `config.json` and `model.safetensors`
      are replaced (each written to a temporary file first).
    config: the architecture.
    params: the model's params (`gemma3_params(model)`), without adapters.
    dtype: dtype of the stored tensors; `None` keeps the params' dtypes.

  Returns:
    The directory.

  Raises:
    ValueError: if the params do not fit `config` (nothing is written).
  """
  save_file = _require("safetensors.numpy", "safetensors",
                       "Writing safetensors checkpoints").save_file
  state_dict = gemma3_params_to_hf_state_dict(params, config, dtype=dtype)
  stored = next(iter(state_dict.values())).dtype
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  text = json.dumps(gemma3_config_to_hf_dict(config, torch_dtype=stored), indent=2) + "\n"
  _replace_atomically(directory / "model.safetensors",
                      lambda path: save_file(state_dict, path, metadata={"format": "pt"}))
  _replace_atomically(directory / "config.json",
                      lambda path: pathlib.Path(path).write_text(text, encoding="utf-8"))
  return directory
