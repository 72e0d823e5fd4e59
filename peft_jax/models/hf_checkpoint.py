"""Reads and writes Hugging Face Llama checkpoints: `config.json` + `*.safetensors`.

This is the directory layout `transformers`' `save_pretrained` writes and
most users have on disk: `config.json` and either one `model.safetensors` or
several shards listed in `model.safetensors.index.json`. Tensors are read with
safetensors' numpy API, one at a time, so no PyTorch is needed.

Names map one to one (`model.layers.0.self_attn.q_proj.weight` <->
`model/layers_0/self_attn/q_proj/kernel`); PyTorch `nn.Linear` weights are
(out, in) and Flax kernels (in, out), so matrices are transposed both ways.
Unlike GGUF, Hugging Face checkpoints keep the "rotate half" rotary layout the
reference model uses, so query and key rows are not permuted.

Example:
  >>> config, params = load_hf_checkpoint("SmolLM2-135M/")  # doctest: +SKIP
  >>> save_hf_checkpoint("merged/", config, merged_params)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.models._imports import require as _require
from peft_jax.models.llama import (
    LlamaConfig,
    init_params,
    params_scanned_to_unrolled,
)

__all__ = [
    "hf_name_for_param_path",
    "hf_state_dict_to_params",
    "llama_config_to_hf_dict",
    "load_hf_checkpoint",
    "params_to_hf_state_dict",
    "read_hf_checkpoint",
    "save_hf_checkpoint",
]

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_UNROLLED_LAYER = re.compile(r"layers_(\d+)")
# Buffers some checkpoints carry that are recomputed, not learned.
_IGNORED_TENSOR = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def hf_name_for_param_path(path: tuple[str, ...]) -> tuple[str, bool]:
    """The Hugging Face tensor name of an unrolled `LlamaForCausalLM` param.

    Args:
      path: the param's keys, e.g. `("model", "layers_0", "mlp", "up_proj",
        "kernel")`.

    Returns:
      `(name, transposed)`: the state-dict name (`model.layers.0.mlp.up_proj.
      weight`) and whether the PyTorch tensor is the transpose of the Flax
      leaf (true for Dense kernels).

    Raises:
      ValueError: for a scanned-layout path (`model/layers/...`), which has no
        per-layer name.
    """
    parts = []
    for key in path:
        if key == "layers":
            raise ValueError(
                f"{'/'.join(path)} is in the scanned layout; convert the params "
                "with params_scanned_to_unrolled first."
            )
        if match := _UNROLLED_LAYER.fullmatch(key):
            parts.extend(("layers", match.group(1)))
        else:
            parts.append(key)
    leaf = parts[-1]
    if leaf == "kernel":
        return ".".join([*parts[:-1], "weight"]), True
    if leaf == "embedding":
        return ".".join([*parts[:-1], "weight"]), False
    return ".".join(parts), False


def _flat_params(params: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {tuple(entry.key for entry in path): leaf for path, leaf in flat}


def params_to_hf_state_dict(
    params: Mapping[str, Any], *, dtype: Any = None
) -> dict[str, np.ndarray]:
    """Flax params -> Hugging Face state dict of numpy arrays in PyTorch layout.

    Args:
      params: `LlamaForCausalLM` params, unrolled or scanned. Adapter leaves
        are not expected here: merge them into the base weights first.
      dtype: cast every tensor to this dtype; `None` keeps each leaf's dtype.

    Returns:
      `{name: array}`, matrices as (out, in); no `lm_head.weight` when the
      model ties its embeddings (the params then have no `lm_head`).
    """
    if "layers" in params.get("model", {}):
        params = params_scanned_to_unrolled(params)
    state_dict = {}
    for path, leaf in _flat_params(params).items():
        name, transposed = hf_name_for_param_path(path)
        array = np.asarray(leaf)
        if dtype is not None:
            array = array.astype(dtype)
        state_dict[name] = np.ascontiguousarray(array.T if transposed else array)
    return state_dict


@functools.lru_cache(maxsize=8)
def _expected_hf_tensors(
    config: LlamaConfig,
) -> dict[str, tuple[tuple[str, ...], tuple, bool]]:
    """Hugging Face name -> (Flax path, Flax shape, transposed) for `config`."""
    unrolled_config = dataclasses.replace(config, scan_layers=False, remat=False)
    shapes = jax.eval_shape(
        functools.partial(init_params, unrolled_config), jax.random.key(0)
    )
    expected = {}
    for path, leaf in _flat_params(shapes).items():
        name, transposed = hf_name_for_param_path(path)
        expected[name] = (path, tuple(leaf.shape), transposed)
    return expected


def _set_nested(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def hf_state_dict_to_params(
    state_dict: Mapping[str, Any],
    config: LlamaConfig,
    *,
    dtype: Any = None,
) -> dict[str, Any]:
    """Hugging Face state dict -> `LlamaForCausalLM(config)` params.

    Args:
      state_dict: `{name: array}` in PyTorch layout (numpy arrays, or
        anything `np.asarray` reads).
      config: the model the params are for; its `scan_layers` picks the
        layout of the result.
      dtype: dtype of the returned params; `None` uses `config.param_dtype`.

    Returns:
      The `'params'` collection, as jax arrays.

    Raises:
      ValueError: if a tensor is missing, unexpected, or has the wrong shape.
    """
    dtype = config.param_dtype if dtype is None else dtype
    expected = _expected_hf_tensors(config)
    unexpected = sorted(
        name
        for name in state_dict
        if name not in expected and not _IGNORED_TENSOR.fullmatch(name)
        # Some tied checkpoints store the tied matrix under both names.
        and not (name == "lm_head.weight" and config.tie_word_embeddings)
    )
    if unexpected:
        raise ValueError(
            f"Checkpoint tensors {unexpected[:8]} have no place in the reference "
            "Llama model (unsupported variant, biases, or a different "
            "architecture)."
        )
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise ValueError(
            f"Checkpoint lacks tensors {missing[:8]}"
            + (f" and {len(missing) - 8} more." if len(missing) > 8 else ".")
        )
    unrolled: dict[str, Any] = {}
    for name, (path, flax_shape, transposed) in expected.items():
        array = np.asarray(state_dict[name])
        torch_shape = flax_shape[::-1] if transposed else flax_shape
        if array.shape != torch_shape:
            raise ValueError(
                f"Checkpoint tensor {name} has shape {array.shape}; the config "
                f"needs {torch_shape}."
            )
        _set_nested(
            unrolled, path, jnp.asarray(array.T if transposed else array, dtype)
        )
    if config.scan_layers:
        model = unrolled["model"]
        layers = [
            model.pop(f"layers_{index}") for index in range(config.num_hidden_layers)
        ]
        model["layers"] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)
    return unrolled


def llama_config_to_hf_dict(
    config: LlamaConfig, *, torch_dtype: Any = None
) -> dict[str, Any]:
    """The Hugging Face `config.json` dictionary of a `LlamaConfig`.

    `LlamaConfig.from_hf_dict` reads it back (execution settings such as
    `dtype` or `scan_layers` are not architecture and are not written).

    Args:
      config: the configuration.
      torch_dtype: dtype recorded as `torch_dtype`; `None` uses
        `config.param_dtype`.

    Returns:
      A JSON-serialisable dictionary for `transformers.LlamaConfig`.
    """
    torch_dtype = config.param_dtype if torch_dtype is None else torch_dtype
    family = _hf_family(config)
    return {
        "architectures": [family["architecture"]],
        "model_type": family["model_type"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_dropout": config.attention_dropout,
        "attention_bias": config.o_proj_bias,
        "mlp_bias": False,
        "hidden_act": "silu",
        "torch_dtype": jnp.dtype(torch_dtype).name,
        **family["extra"],
    }


def _hf_family(config: LlamaConfig) -> dict[str, Any]:
    """The Hugging Face family that has the config's biases and window."""
    if config.o_proj_bias and not config.qkv_bias:
        raise ValueError(
            "No Hugging Face Llama-shaped family has an o_proj bias without "
            "q/k/v biases; this config cannot be written."
        )
    if config.qkv_bias and not config.o_proj_bias:
        if config.sliding_window is not None:
            raise ValueError(
                "No Hugging Face family has q/k/v biases and a sliding window on "
                "every layer; this config cannot be written."
            )
        return dict(
            architecture="Qwen2ForCausalLM",
            model_type="qwen2",
            extra=dict(use_sliding_window=False, sliding_window=None),
        )
    if config.sliding_window is not None:
        if config.qkv_bias:
            raise ValueError(
                "Hugging Face Mistral has no biases; a config with biases and a "
                "sliding window cannot be written."
            )
        return dict(
            architecture="MistralForCausalLM",
            model_type="mistral",
            extra=dict(sliding_window=config.sliding_window),
        )
    return dict(architecture="LlamaForCausalLM", model_type="llama", extra={})


def _safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text(encoding="utf-8")).get(
            "weight_map"
        )
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no weight_map.")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        absent = [str(file) for file in files if not file.is_file()]
        if absent:
            raise FileNotFoundError(
                f"{index_path} lists shards that are missing: {absent}."
            )
        return files
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single]
    found = sorted(directory.glob("*.safetensors"))
    if found:
        return found
    others = sorted(path.name for path in directory.glob("*.bin")) + sorted(
        path.name for path in directory.glob("*.pt*")
    )
    hint = (
        f" It holds {others}: convert them to safetensors first (PyTorch pickles "
        "are not read here)."
        if others
        else ""
    )
    raise FileNotFoundError(f"No *.safetensors weights in {directory}.{hint}")


def load_hf_checkpoint(
    directory: str | os.PathLike[str],
    *,
    dtype: Any = jnp.float32,
    scan_layers: bool = False,
    **config_overrides,
) -> tuple[LlamaConfig, dict[str, Any]]:
    """Loads a Hugging Face Llama checkpoint directory.

    Args:
      directory: holds `config.json` and `model.safetensors`, or shards listed
        in `model.safetensors.index.json`.
      dtype: dtype of the returned params; also the config's `dtype`
        (compute) and `param_dtype` unless `config_overrides` set them.
      scan_layers: return the scanned layout and a config with
        `scan_layers=True`.
      **config_overrides: further `LlamaConfig` fields (e.g. `remat=True`).

    Returns:
      `(config, params)` for `LlamaForCausalLM(config)`.

    Raises:
      FileNotFoundError: if the directory, `config.json` or the weights are
        missing.
      ValueError: if the config describes an unsupported variant, or the
        tensors do not match it.
    """
    hf_config, state_dict = read_hf_checkpoint(directory)
    overrides = dict(dtype=dtype, param_dtype=dtype) | config_overrides
    overrides["scan_layers"] = scan_layers
    config = LlamaConfig.from_hf_dict(hf_config, **overrides)
    params = hf_state_dict_to_params(state_dict, config, dtype=dtype)
    return config, params


def read_hf_checkpoint(
    directory: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The parsed `config.json` and the numpy state dict of a checkpoint directory.

    Any architecture: the model-specific loaders map the result.

    Args:
      directory: holds `config.json` and `model.safetensors`, or shards listed
        in `model.safetensors.index.json`.

    Returns:
      `(hf_config, state_dict)`, tensors in PyTorch layout.

    Raises:
      FileNotFoundError: if the directory, `config.json` or the weights are
        missing.
      ValueError: if a tensor appears in two shards.
    """
    safe_open = _require(
        "safetensors", "safetensors", "Reading safetensors checkpoints"
    ).safe_open

    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"No checkpoint directory at {directory}.")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"No {CONFIG_FILE} in {directory}.")
    hf_config = json.loads(config_path.read_text(encoding="utf-8"))
    state_dict = {}
    for file in _safetensors_files(directory):
        with safe_open(str(file), framework="np") as tensors:
            for name in tensors.keys():
                if name in state_dict:
                    raise ValueError(f"Tensor {name} appears in more than one shard.")
                state_dict[name] = tensors.get_tensor(name)
    return hf_config, state_dict


def save_hf_checkpoint(
    directory: str | os.PathLike[str],
    config: LlamaConfig,
    params: Mapping[str, Any],
    *,
    dtype: Any = None,
    max_shard_bytes: int | None = None,
) -> pathlib.Path:
    """Writes params as a Hugging Face checkpoint that `load_hf_checkpoint` and
    `transformers.LlamaForCausalLM.from_pretrained` read.

    Args:
      directory: created if absent; existing files of the same names are
        replaced.
      config: the model's configuration.
      params: its params, unrolled or scanned, without adapter leaves.
      dtype: dtype of the stored tensors; `None` keeps the params' dtypes.
      max_shard_bytes: split the weights into shards of at most this many
        bytes (a tensor larger than that gets a shard of its own) with a
        `model.safetensors.index.json`; `None` writes one `model.safetensors`.

    Returns:
      The directory.

    Raises:
      ValueError: if the params do not fit `config`.
    """
    save_file = _require(
        "safetensors.numpy", "safetensors", "Writing safetensors checkpoints"
    ).save_file

    directory = pathlib.Path(directory)
    state_dict = params_to_hf_state_dict(params, dtype=dtype)
    _check_state_dict_fits(state_dict, config)  # before writing anything
    stored_dtype = dtype if dtype is not None else next(iter(state_dict.values())).dtype
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(
        json.dumps(llama_config_to_hf_dict(config, torch_dtype=stored_dtype), indent=2)
        + "\n",
        encoding="utf-8",
    )
    metadata = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(state_dict, str(directory / SINGLE_FILE), metadata=metadata)
        return directory

    shards: list[dict[str, np.ndarray]] = [{}]
    shard_bytes = 0
    for name, array in state_dict.items():
        if shards[-1] and shard_bytes + array.nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = array
        shard_bytes += array.nbytes
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file_name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file_name))
    index = {
        "metadata": {
            "total_size": int(sum(array.nbytes for array in state_dict.values()))
        },
        "weight_map": weight_map,
    }
    (directory / INDEX_FILE).write_text(
        json.dumps(index, indent=2) + "\n", encoding="utf-8"
    )
    return directory


def _check_state_dict_fits(
    state_dict: Mapping[str, np.ndarray], config: LlamaConfig
) -> None:
    expected = _expected_hf_tensors(config)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"Params do not fit the config: missing {missing[:8]}, unexpected "
            f"{unexpected[:8]} (merge adapters into the base weights first)."
        )
    for name, (_, flax_shape, transposed) in expected.items():
        torch_shape = flax_shape[::-1] if transposed else flax_shape
        if state_dict[name].shape != torch_shape:
            raise ValueError(
                f"Param {name} has shape {state_dict[name].shape} (PyTorch "
                f"layout); the config needs {torch_shape}."
            )
