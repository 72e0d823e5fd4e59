"""Loads Gemma 3 weights into `Gemma3ForCausalLM`: from GGUF or a Hugging Face directory.

GGUF (llama.cpp's `convert_hf_to_gguf.py`, class `Gemma3Model`) applies
these conventions, each undone or checked here:

* every `*norm.weight` is stored as `1 + w` (llama.cpp's RMSNorm multiplies
  by the weight), so 1 is subtracted to get Hugging Face's `w`;
* query and key rows are NOT permuted (llama.cpp runs Gemma's rotary
  embedding in the NeoX "rotate half" layout, as Hugging Face does);
* the token embedding is stored unscaled (the `sqrt(hidden_size)` factor is
  applied at run time) and doubles as the output layer (no `output.weight`);
* names: `attn_norm` -> `input_layernorm`, `post_attention_norm` ->
  `post_attention_layernorm`, `ffn_norm` -> `pre_feedforward_layernorm`,
  `post_ffw_norm` -> `post_feedforward_layernorm`, `attn_q_norm`/`attn_k_norm`
  -> `q_norm`/`k_norm`, `output_norm` -> `norm`;
* settings llama.cpp hard-codes rather than stores: every sixth layer is
  global, the local rotary base is 10,000, and queries are scaled by
  `head_dim ** -0.5` (27B: `(hidden_size / heads) ** -0.5`).

Hugging Face checkpoints (`Gemma3ForCausalLM.save_pretrained`) store `w`,
(out, in) matrices and no `lm_head.weight` (tied).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from peft_jax.models.gemma3 import (
    Gemma3Config,
    Gemma3ForCausalLM,
    gemma3_from_params,
    gemma3_param_shapes,
)
from peft_jax.models.gguf import _dequantized, _float32_as_written, gguf_metadata
from peft_jax.models.gguf_reader import open_gguf_fast
from peft_jax.models.hf_checkpoint import read_hf_checkpoint

__all__ = [
    "gemma3_config_from_gguf",
    "gemma3_hf_state_dict_to_params",
    "load_gemma3_gguf",
    "load_gemma3_hf",
]

_MISSING = object()

# GGUF per-layer tensor -> path inside `model/layers/{i}`.
_GGUF_LAYER_TENSORS = {
    "attn_norm": ("input_layernorm", "weight"),
    "attn_q": ("self_attn", "q_proj", "kernel"),
    "attn_k": ("self_attn", "k_proj", "kernel"),
    "attn_v": ("self_attn", "v_proj", "kernel"),
    "attn_output": ("self_attn", "o_proj", "kernel"),
    "attn_q_norm": ("self_attn", "q_norm", "weight"),
    "attn_k_norm": ("self_attn", "k_norm", "weight"),
    "post_attention_norm": ("post_attention_layernorm", "weight"),
    "ffn_norm": ("pre_feedforward_layernorm", "weight"),
    "ffn_gate": ("mlp", "gate_proj", "kernel"),
    "ffn_up": ("mlp", "up_proj", "kernel"),
    "ffn_down": ("mlp", "down_proj", "kernel"),
    "post_ffw_norm": ("post_feedforward_layernorm", "weight"),
}
_GGUF_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_GGUF_GLOBAL_TENSORS = {
    "token_embd.weight": ("model", "embed_tokens", "embedding"),
    "output_norm.weight": ("model", "norm", "weight"),
}
_HF_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
_HF_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": ("model", "embed_tokens", "embedding"),
    "model.norm.weight": ("model", "norm", "weight"),
}


def _as_reader(path_or_reader):
    # Gemma's 262,144-token vocabulary makes gguf.GGUFReader take most of a
    # minute to open the file; GGUFFile takes about a second.
    if isinstance(path_or_reader, (str, os.PathLike)):
        return open_gguf_fast(path_or_reader)
    return path_or_reader


def gemma3_config_from_gguf(path_or_reader, **overrides) -> Gemma3Config:
    """Reads a `Gemma3Config` from the `gemma3.*` metadata of a GGUF file.

    Args:
      path_or_reader: a GGUF path, or a file opened by `open_gguf_fast` or
        `gguf.GGUFReader`.
      **overrides: fields of `Gemma3Config` that replace what the file says.

    Returns:
      The configuration of the model in the file.

    Raises:
      ValueError: if the architecture is not `gemma3`, a required key is
        missing, or the file asks for a rotary scaling other than linear.
    """
    reader = _as_reader(path_or_reader)
    architecture = gguf_metadata(reader, "general.architecture", None)
    if architecture != "gemma3":
        raise ValueError(
            f"GGUF architecture {architecture!r} is not 'gemma3'; load Llama-family "
            "files with peft_jax.models.load_gguf."
        )

    def value(name, default=_MISSING):
        found = gguf_metadata(reader, f"gemma3.{name}", default)
        if found is _MISSING:
            raise ValueError(f"GGUF metadata lacks the required key 'gemma3.{name}'.")
        return found

    scaling = value("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported.")
    hidden_size = int(value("embedding_length"))
    num_heads = int(value("attention.head_count"))
    head_dim = int(value("attention.key_length", 256))
    if int(value("attention.value_length", head_dim)) != head_dim:
        raise ValueError("GGUF key_length and value_length differ; Gemma 3 has one head_dim.")
    num_layers = int(value("block_count"))
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    vocab_size = value("vocab_size", None)
    if vocab_size is None:
        if "token_embd.weight" not in tensors:
            raise ValueError("GGUF file has neither gemma3.vocab_size nor token_embd.")
        vocab_size = int(tensors["token_embd.weight"].shape[-1])
    # llama.cpp: the 27B model (62 layers) scales queries by hidden/heads.
    query_scalar = hidden_size / num_heads if num_layers == 62 else head_dim
    settings = dict(
        vocab_size=int(vocab_size),
        hidden_size=hidden_size,
        intermediate_size=int(value("feed_forward_length")),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=int(value("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=_float32_as_written(value("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=_float32_as_written(value("rope.freq_base", 1_000_000.0)),
        rope_scaling_factor=(
            float(value("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0
        ),
        sliding_window=int(value("attention.sliding_window", 512)),
        query_pre_attn_scalar=float(query_scalar),
        final_logit_softcapping=_optional(value("final_logit_softcapping", None)),
        max_position_embeddings=int(value("context_length", 32768)),
    )
    return Gemma3Config(**(settings | overrides))


def _optional(number) -> float | None:
    return None if number is None else _float32_as_written(number)


def _set_nested(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _check_complete(placed, expected, source: str) -> None:
    missing = sorted("/".join(map(str, path)) for path in set(expected) - set(placed))
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(f"{source} lacks tensors for {missing[:8]}{more}.")


def _to_leaf(array: np.ndarray, path: tuple, expected: dict, name: str, source: str):
    """numpy (PyTorch layout) -> Flax leaf: kernels transposed, shape checked."""
    flax_shape = expected.get(path)
    if flax_shape is None:
        raise ValueError(f"{source} tensor {name!r} does not fit the model's layers.")
    is_kernel = path[-1] == "kernel"
    needed = flax_shape[::-1] if is_kernel else flax_shape
    if array.shape != needed:
        raise ValueError(
            f"{source} tensor {name!r} has shape {array.shape}; the config needs "
            f"{needed} (PyTorch layout) for {'/'.join(map(str, path))}."
        )
    return np.ascontiguousarray(array.T if is_kernel else array)


def load_gemma3_gguf(
    path_or_reader, *, dtype: Any = jnp.float32, **config_overrides
) -> tuple[Gemma3Config, Gemma3ForCausalLM]:
    """Reads a Gemma 3 GGUF file into `Gemma3ForCausalLM`.

    Every tensor is dequantized to float32 (F32, F16, Q8_0, Q5_0, Q4_K, Q6_K,
    ...: whatever the `gguf` package reads), norms get their `+1` removed,
    matrices are transposed to Flax kernels, then cast to `dtype`.

    Args:
      path_or_reader: a GGUF path, or a file opened by `open_gguf_fast` or
        `gguf.GGUFReader`.
      dtype: the params' dtype; also the config's compute `dtype` and
        `param_dtype` unless `config_overrides` set them.
      **config_overrides: further `Gemma3Config` fields.

    Returns:
      `(config, model)`.

    Raises:
      FileNotFoundError: if the file does not exist.
      ValueError: if it is not a Gemma 3 GGUF file, lacks a tensor, has one
        the model does not know, or a shape does not match the metadata.
    """
    reader = _as_reader(path_or_reader)
    config = gemma3_config_from_gguf(
        reader, **(dict(dtype=dtype, param_dtype=dtype) | config_overrides)
    )
    expected = gemma3_param_shapes(config)
    placed = {}
    for tensor in reader.tensors:
        if tensor.name in _GGUF_GLOBAL_TENSORS:
            path = _GGUF_GLOBAL_TENSORS[tensor.name]
        elif (match := _GGUF_LAYER_NAME.fullmatch(tensor.name)) and (
            match.group(2) in _GGUF_LAYER_TENSORS
        ):
            path = ("model", "layers", int(match.group(1)), *_GGUF_LAYER_TENSORS[match.group(2)])
        else:
            raise ValueError(
                f"GGUF tensor {tensor.name!r} has no place in Gemma3ForCausalLM "
                "(unsupported variant, e.g. an untied output.weight or vision tower)."
            )
        stored = tuple(int(size) for size in reversed(tensor.shape))
        flax_shape = expected.get(path)
        needed = None if flax_shape is None else (
            flax_shape[::-1] if path[-1] == "kernel" else flax_shape
        )
        if stored != needed:
            raise ValueError(
                f"GGUF tensor {tensor.name!r} has shape {stored} (numpy order); the "
                f"config read from the metadata needs {needed} for "
                f"{'/'.join(map(str, path))}."
            )
        placed[path] = tensor
    _check_complete(placed, expected, "GGUF file")
    params: dict = {}
    for path, tensor in placed.items():
        array = _dequantized(tensor)
        if path[-1] == "weight":  # every norm: the converter stored 1 + w
            array = array - np.float32(1.0)
        leaf = _to_leaf(array, path, expected, tensor.name, "GGUF")
        _set_nested(params, path, jnp.asarray(leaf, dtype))
    return config, gemma3_from_params(config, params)


def gemma3_hf_state_dict_to_params(
    state_dict: Mapping[str, Any], config: Gemma3Config
) -> dict[str, Any]:
    """Hugging Face `Gemma3ForCausalLM` state dict -> params for `gemma3_from_params`.

    Args:
      state_dict: `{name: array}` in PyTorch layout.
      config: the model the params are for (`param_dtype` is their dtype).

    Returns:
      The nested params dict.

    Raises:
      ValueError: if a tensor is missing, unexpected or misshapen, or an
        `lm_head.weight` differs from the (tied) embedding.
    """
    expected = gemma3_param_shapes(config)
    params: dict = {}
    placed = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight":
            continue  # checked against the embedding below
        if name in _HF_GLOBAL_TENSORS:
            path = _HF_GLOBAL_TENSORS[name]
        elif match := _HF_LAYER_NAME.fullmatch(name):
            path = ("model", "layers", int(match.group(1)), *match.group(2).split("."))
            path = (*path, "kernel" if path[-1].endswith("_proj") else "weight")
        else:
            path = None
        if path is None or path not in expected:
            raise ValueError(
                f"Checkpoint tensor {name!r} has no place in Gemma3ForCausalLM "
                "(a different architecture, biases, or a multimodal checkpoint)."
            )
        leaf = _to_leaf(np.asarray(tensor), path, expected, name, "Checkpoint")
        placed[path] = leaf
        _set_nested(params, path, jnp.asarray(leaf, config.param_dtype))
    _check_complete(placed, expected, "Checkpoint")
    if "lm_head.weight" in state_dict and not np.array_equal(
        np.asarray(state_dict["lm_head.weight"]),
        np.asarray(state_dict["model.embed_tokens.weight"]),
    ):
        raise ValueError(
            "Checkpoint has an lm_head.weight that differs from the embedding; "
            "Gemma 3 ties them."
        )
    return params


def load_gemma3_hf(
    directory: str | os.PathLike[str], *, dtype: Any = jnp.float32, **config_overrides
) -> tuple[Gemma3Config, Gemma3ForCausalLM]:
    """Loads a Hugging Face `Gemma3ForCausalLM` checkpoint directory.

    Args:
      directory: `config.json` (`model_type: gemma3_text`) and safetensors.
      dtype: the params' dtype; also the config's compute `dtype` and
        `param_dtype` unless `config_overrides` set them.
      **config_overrides: further `Gemma3Config` fields.

    Returns:
      `(config, model)`.

    Raises:
      FileNotFoundError: if the directory, config or weights are missing.
      ValueError: if the config or tensors do not describe a supported
        Gemma 3 text model.
    """
    hf_config, state_dict = read_hf_checkpoint(directory)
    config = Gemma3Config.from_hf_dict(
        hf_config, **(dict(dtype=dtype, param_dtype=dtype) | config_overrides)
    )
    params = gemma3_hf_state_dict_to_params(state_dict, config)
    return config, gemma3_from_params(config, params)
