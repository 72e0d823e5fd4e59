"""Loads Llama weights from a GGUF file (llama.cpp's format) into `LlamaForCausalLM`.

A GGUF file holds hyperparameters as metadata (`llama.block_count`,
`llama.embedding_length`, ...), the tokenizer (see `peft_jax.models.tokenizer`)
and the tensors, often quantized (Q4_1, Q8_0, ...). The `gguf` package, which
llama.cpp publishes, parses the file and dequantizes every tensor type to
float32; this module maps the result onto the Hugging Face-named params of
`peft_jax.models.llama`.

Two conventions of llama.cpp's `convert_hf_to_gguf.py` are undone here:

* a GGUF tensor's shape lists the fastest-varying axis first, so a Hugging
  Face weight of shape (out, in) is stored as `[in, out]`; once read with
  numpy it is (out, in) again, and is transposed into a Flax kernel (in, out);
* the rows of the query and key projections are permuted per head from
  Hugging Face's "rotate half" rotary layout to the interleaved layout of
  llama.cpp's kernels. `unpermute_rotary_rows` restores the original order
  exactly (it only moves rows, so quantized values are unchanged).

Example:
  >>> config, params = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
  >>> model = LlamaForCausalLM(config)  # doctest: +SKIP
  >>> logits = model.apply({"params": params}, input_ids)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.models._imports import require as _require
from peft_jax.models.llama import LlamaConfig, init_params

__all__ = [
    "GGUF_SUPPORTED_ARCHITECTURES",
    "gguf_metadata",
    "llama_config_from_gguf",
    "load_gguf",
    "open_gguf",
    "permute_rotary_rows",
    "unpermute_rotary_rows",
]

GGUF_SUPPORTED_ARCHITECTURES = ("llama",)

_GGUF_MAGIC = b"GGUF"

# GGUF per-layer tensor name -> (Flax path inside `layers_{i}`, kind), where
# kind says how the numpy (out, in) array becomes the Flax leaf.
_LAYER_TENSORS = {
    "attn_norm": (("input_layernorm", "weight"), "vector"),
    "ffn_norm": (("post_attention_layernorm", "weight"), "vector"),
    "attn_q": (("self_attn", "q_proj", "kernel"), "query"),
    "attn_k": (("self_attn", "k_proj", "kernel"), "key"),
    "attn_v": (("self_attn", "v_proj", "kernel"), "matrix"),
    "attn_output": (("self_attn", "o_proj", "kernel"), "matrix"),
    "ffn_gate": (("mlp", "gate_proj", "kernel"), "matrix"),
    "ffn_up": (("mlp", "up_proj", "kernel"), "matrix"),
    "ffn_down": (("mlp", "down_proj", "kernel"), "matrix"),
}
_LAYER_TENSOR_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_GLOBAL_TENSORS = {
    "token_embd.weight": (("model", "embed_tokens", "embedding"), "embedding"),
    "output_norm.weight": (("model", "norm", "weight"), "vector"),
    "output.weight": (("lm_head", "kernel"), "matrix"),
}

_MISSING = object()


def open_gguf(path: str | os.PathLike[str]):
    """Opens a GGUF file for reading (memory-mapped; tensors are read lazily).

    Args:
      path: the `.gguf` file.

    Returns:
      A `gguf.GGUFReader`.

    Raises:
      FileNotFoundError: if `path` is not a file.
      ValueError: if the file is not a GGUF file or is a GGUF version the
        installed `gguf` package cannot read.
    """
    GGUFReader = _require("gguf", "gguf", "Reading GGUF files").GGUFReader

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No GGUF file at {path}.")
    with path.open("rb") as file:
        magic = file.read(4)
    if magic != _GGUF_MAGIC:
        raise ValueError(
            f"{path} is not a GGUF file: it starts with {magic!r}, not {_GGUF_MAGIC!r}."
        )
    try:
        return GGUFReader(path)
    except ValueError as error:
        raise ValueError(f"Cannot read GGUF file {path}: {error}") from None


def _as_reader(path_or_reader):
    if isinstance(path_or_reader, (str, os.PathLike)):
        return open_gguf(path_or_reader)
    return path_or_reader


def gguf_metadata(path_or_reader, key: str, default: Any = _MISSING) -> Any:
    """One metadata value of a GGUF file, as a Python scalar, string or list.

    Args:
      path_or_reader: a GGUF path or an open `gguf.GGUFReader`.
      key: the metadata key, e.g. `"llama.block_count"`.
      default: returned when the key is absent; without it a missing key
        raises.

    Returns:
      The value.

    Raises:
      KeyError: if the key is absent and no default is given.
    """
    reader = _as_reader(path_or_reader)
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise KeyError(f"GGUF metadata has no key {key!r}.")
        return default
    return field.contents()


def llama_config_from_gguf(path_or_reader, **overrides) -> LlamaConfig:
    """Reads a `LlamaConfig` from the `llama.*` metadata of a GGUF file.

    Args:
      path_or_reader: a GGUF path or an open `gguf.GGUFReader`.
      **overrides: fields of `LlamaConfig` that replace what the file says
        (execution settings such as `dtype`, `scan_layers`, `remat`).

    Returns:
      The configuration of the model in the file.

    Raises:
      ValueError: if the architecture is not one of
        `GGUF_SUPPORTED_ARCHITECTURES`, a required key is missing, or the file
        describes a variant the reference model does not implement (rope
        scaling, partial rotary dimensions, mixture of experts).
    """
    reader = _as_reader(path_or_reader)
    architecture = gguf_metadata(reader, "general.architecture", None)
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {architecture!r} is not supported; this loader "
            f"reads {GGUF_SUPPORTED_ARCHITECTURES}."
        )

    def value(name, default=_MISSING):
        key = f"{architecture}.{name}"
        found = gguf_metadata(reader, key, default)
        if found is _MISSING:
            raise ValueError(f"GGUF metadata lacks the required key {key!r}.")
        return found

    if value("expert_count", 0):
        raise ValueError("Mixture-of-experts GGUF models are not supported.")
    rope_scaling = value("rope.scaling.type", "none")
    if rope_scaling != "none":
        raise ValueError(f"GGUF rope scaling {rope_scaling!r} is not supported.")

    hidden_size = int(value("embedding_length"))
    num_heads = int(value("attention.head_count"))
    head_dim = int(value("attention.key_length", hidden_size // num_heads))
    rotary_dim = int(value("rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise ValueError(
            f"GGUF rope.dimension_count={rotary_dim} differs from head_dim="
            f"{head_dim}; partial rotary embeddings are not supported."
        )
    tensor_names = {tensor.name: tensor for tensor in reader.tensors}
    vocab_size = value("vocab_size", None)
    if vocab_size is None:
        if "token_embd.weight" not in tensor_names:
            raise ValueError("GGUF file has neither llama.vocab_size nor token_embd.")
        vocab_size = tensor_names["token_embd.weight"].shape[-1]
    settings = dict(
        vocab_size=int(vocab_size),
        hidden_size=hidden_size,
        intermediate_size=int(value("feed_forward_length")),
        num_hidden_layers=int(value("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(value("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        max_position_embeddings=int(value("context_length", 2048)),
        rms_norm_eps=_float32_as_written(
            value("attention.layer_norm_rms_epsilon", 1e-5)
        ),
        rope_theta=_float32_as_written(value("rope.freq_base", 10000.0)),
        # llama.cpp reuses the token embedding when a file has no output matrix.
        tie_word_embeddings="output.weight" not in tensor_names,
    )
    return LlamaConfig(**(settings | overrides))


def _float32_as_written(number: float) -> float:
    """The shortest decimal of a float32 metadata value: 1e-05, not 9.99999974e-06."""
    return float(str(np.float32(number)))


def permute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Hugging Face -> llama.cpp row order of a query or key projection.

    This is `LlamaModel.permute` of llama.cpp's `convert_hf_to_gguf.py`: within
    each head, row `j` of the first half and row `j` of the second half (the
    pair that "rotate half" rotates together) become adjacent rows `2j` and
    `2j + 1`.

    Args:
      weight: a torch-layout projection, (num_heads * head_dim, in_features).
      num_heads: heads of the projection (key/value heads for `k_proj`).

    Returns:
      The rows in llama.cpp's order, same shape.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp -> Hugging Face row order; the exact inverse of `permute_rotary_rows`.

    Args:
      weight: a query or key projection as stored in GGUF and read with
        numpy, (num_heads * head_dim, in_features).
      num_heads: heads of the projection (key/value heads for `attn_k`).

    Returns:
      The rows in Hugging Face's "rotate half" order, same shape.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _dequantized(tensor) -> np.ndarray:
    """A GGUF tensor as float32 numpy, in numpy axis order (out, in)."""
    quants = _require("gguf.quants", "gguf", "Dequantizing GGUF tensors")

    array = quants.dequantize(tensor.data, tensor.tensor_type)
    # numpy order is the GGUF shape reversed; F32/F16 data may come flat.
    shape = tuple(int(size) for size in reversed(tensor.shape))
    return np.asarray(array, dtype=np.float32).reshape(shape)


def _to_flax_leaf(array: np.ndarray, kind: str, config: LlamaConfig) -> np.ndarray:
    if kind in ("vector", "embedding"):
        return array
    if kind == "query":
        array = unpermute_rotary_rows(array, config.num_attention_heads)
    elif kind == "key":
        array = unpermute_rotary_rows(array, config.num_key_value_heads)
    # Flax kernels are (in, out); numpy reads GGUF matrices as (out, in).
    return np.ascontiguousarray(array.T)


@functools.lru_cache(maxsize=8)
def _expected_unrolled_shapes(config: LlamaConfig) -> dict[tuple[str, ...], tuple]:
    unrolled_config = dataclasses.replace(config, scan_layers=False, remat=False)
    unrolled = jax.eval_shape(
        functools.partial(init_params, unrolled_config), jax.random.key(0)
    )
    flat = jax.tree_util.tree_flatten_with_path(unrolled)[0]
    return {
        tuple(entry.key for entry in path): tuple(leaf.shape) for path, leaf in flat
    }


def _set_nested(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def load_gguf(
    path_or_reader,
    *,
    dtype: Any = jnp.float32,
    scan_layers: bool = False,
    **config_overrides,
) -> tuple[LlamaConfig, dict[str, Any]]:
    """Reads a Llama GGUF file into `LlamaForCausalLM` params.

    Every tensor is dequantized to float32, moved to the reference model's
    layout (rotary rows restored, matrices transposed to Flax kernels) and
    then cast to `dtype`.

    Args:
      path_or_reader: a GGUF path or an open `gguf.GGUFReader`.
      dtype: dtype of the returned params; also the config's `dtype`
        (compute) and `param_dtype` unless `config_overrides` set them.
      scan_layers: return the scanned layout (`model/layers` with a leading
        layer axis) and a config with `scan_layers=True`.
      **config_overrides: further `LlamaConfig` fields (e.g. `remat=True`).

    Returns:
      `(config, params)`, where `params` is the `'params'` collection of
      `LlamaForCausalLM(config)`.

    Raises:
      FileNotFoundError: if the file does not exist.
      ValueError: if it is not a GGUF file, holds an unsupported architecture
        or variant, lacks a tensor the model needs, has one the model does
        not know, or a tensor's shape does not match the hyperparameters.
    """
    reader = _as_reader(path_or_reader)
    overrides = dict(dtype=dtype, param_dtype=dtype) | config_overrides
    overrides["scan_layers"] = scan_layers
    config = llama_config_from_gguf(reader, **overrides)
    placed = _place_tensors(reader, config)

    def leaf_of(path):
        tensor, kind = placed[path]
        leaf = _to_flax_leaf(_dequantized(tensor), kind, config)
        return leaf.astype(np.dtype(dtype), copy=False)

    # Each tensor becomes a jax array as soon as it is dequantized, so the
    # dequantized model never exists twice (numpy and jax) at once.
    params: dict[str, Any] = {}
    layer_paths = sorted(
        path[2:] for path in placed if path[:2] == ("model", "layers_0")
    )
    for path in placed:
        if not (path[0] == "model" and path[1].startswith("layers_")):
            _set_nested(params, path, jnp.asarray(leaf_of(path)))
    if scan_layers:
        for layer_path in layer_paths:
            first = leaf_of(("model", "layers_0", *layer_path))
            stacked = np.empty((config.num_hidden_layers, *first.shape), first.dtype)
            stacked[0] = first
            for index in range(1, config.num_hidden_layers):
                stacked[index] = leaf_of(("model", f"layers_{index}", *layer_path))
            _set_nested(params, ("model", "layers", *layer_path), jnp.asarray(stacked))
            del first, stacked
    else:
        for index in range(config.num_hidden_layers):
            for layer_path in layer_paths:
                path = ("model", f"layers_{index}", *layer_path)
                _set_nested(params, path, jnp.asarray(leaf_of(path)))
    return config, params


def _place_tensors(
    reader, config: LlamaConfig
) -> dict[tuple[str, ...], tuple[Any, str]]:
    """Flax path -> (GGUF tensor, kind) for every param, checked before any is read.

    Raises:
      ValueError: if a tensor has no place in the model, its shape does not
        match the config, or a param has no tensor.
    """
    expected_shapes = _expected_unrolled_shapes(config)
    placed = {}
    for tensor in reader.tensors:
        if tensor.name in _GLOBAL_TENSORS:
            path, kind = _GLOBAL_TENSORS[tensor.name]
        elif (match := _LAYER_TENSOR_NAME.fullmatch(tensor.name)) and (
            match.group(2) in _LAYER_TENSORS
        ):
            layer_path, kind = _LAYER_TENSORS[match.group(2)]
            path = ("model", f"layers_{match.group(1)}", *layer_path)
        else:
            raise ValueError(
                f"GGUF tensor {tensor.name!r} has no place in the reference Llama "
                "model (unsupported variant or a different architecture)."
            )
        if path not in expected_shapes:
            raise ValueError(
                f"GGUF tensor {tensor.name!r} does not fit a model with "
                f"{config.num_hidden_layers} layers."
            )
        stored_shape = tuple(int(size) for size in reversed(tensor.shape))
        expected = expected_shapes[path]
        expected_stored = (
            expected if kind in ("vector", "embedding") else expected[::-1]
        )
        if stored_shape != expected_stored:
            raise ValueError(
                f"GGUF tensor {tensor.name!r} has shape {stored_shape} (numpy "
                f"order); the config read from the file's metadata needs "
                f"{expected_stored} for {'/'.join(path)}."
            )
        placed[path] = (tensor, kind)
    missing = sorted("/".join(path) for path in set(expected_shapes) - set(placed))
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(f"GGUF file lacks tensors for {missing[:8]}{more}.")
    return placed
