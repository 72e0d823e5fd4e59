"""Tokenizers of pretrained models, from GGUF metadata or a `tokenizer.json`.

Both are built on the `tokenizers` package (Hugging Face's Rust tokenizers)
and wrapped in `PretrainedTokenizer`, which has the same `encode`/`decode`/
`vocab_size` surface as `peft_jax.data.ByteTokenizer`, so either feeds
`peft_jax.data.batches`.

A GGUF file of a GPT-2-style byte-level BPE model (`tokenizer.ggml.model ==
"gpt2"`) stores its vocabulary (`tokenizer.ggml.tokens`, the byte-level
strings such as `"Ġthe"`), merge rules (`tokenizer.ggml.merges`, `"Ġ t"`),
token types (`tokenizer.ggml.token_type`: 1 normal, 3 control, 4 user
defined, ...), special token ids and the chat template. llama.cpp names the
pre-tokenizer regex in `tokenizer.ggml.pre`; `GGUF_PRE_TOKENIZERS` lists the
ones rebuilt here.

Example:
  >>> tokenizer = tokenizer_from_gguf("SmolLM2.gguf")  # doctest: +SKIP
  >>> tokenizer.decode(tokenizer.encode("To be, or not to be"))  # doctest: +SKIP
  'To be, or not to be'
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from peft_jax.models._imports import require as _require
from peft_jax.models.spm_tokenizer import sentencepiece_bpe_backend

__all__ = [
    "GGUF_PRE_TOKENIZERS",
    "SENTENCEPIECE_GGUF_ARCHITECTURES",
    "PretrainedTokenizer",
    "load_hf_tokenizer",
    "tokenizer_from_gguf",
]

# llama.cpp's token types (llama_token_type / gguf.TokenType).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# llama 3's split regex (LLAMA_VOCAB_PRE_TYPE_LLAMA3).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` value -> how to rebuild that pre-tokenizer: whether
# digits are split one by one first, and the split regex (None: GPT-2's,
# built into the ByteLevel pre-tokenizer).
GGUF_PRE_TOKENIZERS = {
    "default": dict(individual_digits=False, split_regex=None),
    "gpt-2": dict(individual_digits=False, split_regex=None),
    # SmolLM, SmolLM2: Hugging Face's Sequence[Digits(individual_digits=True),
    # ByteLevel(add_prefix_space=False)].
    "smollm": dict(individual_digits=True, split_regex=None),
    "llama-bpe": dict(individual_digits=False, split_regex=_LLAMA3_SPLIT),
}

# Architectures whose SentencePiece vocabulary is in merge order with no
# prefix space (Gemma's), which `sentencepiece_bpe_backend` rebuilds.
SENTENCEPIECE_GGUF_ARCHITECTURES = ("gemma", "gemma2", "gemma3")


class PretrainedTokenizer:
    """A `tokenizers.Tokenizer` with its model's special-token ids and chat template.

    Attributes:
      backend: the wrapped `tokenizers.Tokenizer`.
      bos_token_id: beginning-of-sequence id, or `None`.
      eos_token_id: end-of-sequence id, or `None`.
      pad_token_id: padding id, or `None`.
      add_bos_token: whether `encode` prepends `bos_token_id` by default.
      chat_template: the model's Jinja chat template, or `None`.
    """

    def __init__(
        self,
        backend,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
    ):
        """Wraps `backend`.

        Args:
          backend: a `tokenizers.Tokenizer`.
          bos_token_id: beginning-of-sequence id, or `None`.
          eos_token_id: end-of-sequence id, or `None`.
          pad_token_id: padding id, or `None`.
          add_bos_token: whether `encode` prepends `bos_token_id` by default.
          chat_template: the model's Jinja chat template, or `None`.

        Raises:
          ValueError: if `add_bos_token` is set without a `bos_token_id`, or a
            special id is outside the vocabulary.
        """
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        if add_bos_token and bos_token_id is None:
            raise ValueError("add_bos_token=True needs a bos_token_id.")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            token_id = getattr(self, name)
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise ValueError(
                    f"{name}={token_id} is outside the vocabulary of {self.vocab_size}."
                )

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> np.ndarray:
        """Token ids of `text` as an int32 array.

        Control tokens written in the text (e.g. `<|im_start|>`) become their
        single ids.

        Args:
          text: the text.
          add_bos: prepend `bos_token_id`; `None` follows `add_bos_token`.

        Returns:
          1-D int32 array of token ids.
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if self.add_bos_token if add_bos is None else add_bos:
            if self.bos_token_id is None:
                raise ValueError("This tokenizer has no bos_token_id to add.")
            ids = [self.bos_token_id, *ids]
        return np.asarray(ids, dtype=np.int32)

    def decode(self, token_ids, *, skip_special_tokens: bool = False) -> str:
        """Text of `token_ids` (any 1-D integer sequence or array).

        Args:
          token_ids: the ids.
          skip_special_tokens: drop control tokens such as `<|im_end|>`.

        Returns:
          The text; byte sequences that are not valid UTF-8 become U+FFFD.
        """
        ids = [int(token_id) for token_id in np.asarray(token_ids).reshape(-1)]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry (e.g. `"<|im_end|>"`), or `None`."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of an id, or `None` when out of range."""
        return self.backend.id_to_token(int(token_id))

    def save(self, directory: str | os.PathLike[str]) -> pathlib.Path:
        """Writes `tokenizer.json` and `tokenizer_config.json` into `directory`.

        `load_hf_tokenizer(directory)` reads them back, and so does Hugging
        Face `transformers.AutoTokenizer`.

        Args:
          directory: created if absent.

        Returns:
          The directory.
        """
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        tokenizer_config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "clean_up_tokenization_spaces": False,
        }
        for name in ("bos", "eos", "pad"):
            token_id = getattr(self, f"{name}_token_id")
            if token_id is not None:
                tokenizer_config[f"{name}_token"] = self.id_to_token(token_id)
        if self.chat_template is not None:
            tokenizer_config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(
            json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )
        return directory

    def __repr__(self) -> str:
        return (
            f"PretrainedTokenizer(vocab_size={self.vocab_size}, "
            f"bos_token_id={self.bos_token_id}, eos_token_id={self.eos_token_id})"
        )


def _byte_level_backend(
    tokens: Sequence[str],
    merges: Sequence[str],
    token_types: Sequence[int] | None,
    pre_tokenizer_name: str,
):
    tokenizers = _require("tokenizers", "tokenizers", "Building a BPE tokenizer")
    pre_tokenizers = tokenizers.pre_tokenizers

    if pre_tokenizer_name not in GGUF_PRE_TOKENIZERS:
        raise ValueError(
            f"GGUF pre-tokenizer {pre_tokenizer_name!r} is not supported; "
            f"known: {sorted(GGUF_PRE_TOKENIZERS)}."
        )
    pre_settings = GGUF_PRE_TOKENIZERS[pre_tokenizer_name]
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens.")
    merge_pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(
                f"GGUF merge {merge!r} is not two tokens separated by a space."
            )
        merge_pairs.append((parts[0], parts[1]))

    backend = tokenizers.Tokenizer(
        tokenizers.models.BPE(
            vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False
        )
    )
    steps = []
    if pre_settings["individual_digits"]:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if pre_settings["split_regex"] is not None:
        steps.append(
            pre_tokenizers.Split(
                tokenizers.Regex(pre_settings["split_regex"]),
                behavior="isolated",
                invert=False,
            )
        )
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    else:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    backend.pre_tokenizer = (
        steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    )
    backend.decoder = tokenizers.decoders.ByteLevel()

    if token_types is not None:
        # Control tokens are special (skipped by decode(skip_special_tokens)),
        # user-defined ones are plain added tokens; both are matched whole in
        # text before BPE runs, as llama.cpp does.
        special = [
            tokenizers.AddedToken(tokens[token_id], special=True, normalized=False)
            for token_id, token_type in enumerate(token_types)
            if token_type == _TOKEN_TYPE_CONTROL
        ]
        user_defined = [
            tokenizers.AddedToken(tokens[token_id], special=False, normalized=False)
            for token_id, token_type in enumerate(token_types)
            if token_type == _TOKEN_TYPE_USER_DEFINED
        ]
        backend.add_special_tokens(special)
        backend.add_tokens(user_defined)
    return backend


def tokenizer_from_gguf(path_or_reader) -> PretrainedTokenizer:
    """Builds the tokenizer stored in a GGUF file's metadata.

    Args:
      path_or_reader: a GGUF path or an open `gguf.GGUFReader` (pass the
        reader already opened for the weights to parse the file once).

    Returns:
      The tokenizer, with the file's special-token ids and chat template.

    Raises:
      FileNotFoundError: if the file does not exist.
      ValueError: if the file is not a GGUF file, has no tokenizer, or its
        tokenizer is neither byte-level BPE (`tokenizer.ggml.model == "gpt2"`)
        with a supported pre-tokenizer nor the SentencePiece BPE of an
        architecture in `SENTENCEPIECE_GGUF_ARCHITECTURES`.
    """
    from peft_jax.models.gguf import gguf_metadata, open_gguf

    reader = (
        open_gguf(path_or_reader)
        if isinstance(path_or_reader, (str, os.PathLike))
        else path_or_reader
    )
    model = gguf_metadata(reader, "tokenizer.ggml.model", None)
    if model is None:
        raise ValueError("GGUF file has no tokenizer (no tokenizer.ggml.model).")
    architecture = gguf_metadata(reader, "general.architecture", None)
    tokens = gguf_metadata(reader, "tokenizer.ggml.tokens")
    token_types = gguf_metadata(reader, "tokenizer.ggml.token_type", None)
    if model == "gpt2":
        backend = _byte_level_backend(
            tokens,
            gguf_metadata(reader, "tokenizer.ggml.merges", []),
            token_types,
            gguf_metadata(reader, "tokenizer.ggml.pre", "default"),
        )
    elif model == "llama" and architecture in SENTENCEPIECE_GGUF_ARCHITECTURES:
        if gguf_metadata(reader, "tokenizer.ggml.add_space_prefix", False):
            raise ValueError(
                "GGUF SentencePiece tokenizer asks for a prefix space, which the "
                f"{architecture!r} tokenizer rebuilt here does not add."
            )
        unk_id = gguf_metadata(reader, "tokenizer.ggml.unknown_token_id", None)
        backend = sentencepiece_bpe_backend(
            tokens,
            token_types,
            unk_token=tokens[unk_id] if unk_id is not None else "<unk>",
        )
    else:
        raise ValueError(
            f"GGUF tokenizer model {model!r} is not supported for architecture "
            f"{architecture!r}; byte-level BPE ('gpt2') and the SentencePiece BPE "
            f"('llama') of {SENTENCEPIECE_GGUF_ARCHITECTURES} are."
        )
    return PretrainedTokenizer(
        backend,
        bos_token_id=gguf_metadata(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=gguf_metadata(reader, "tokenizer.ggml.eos_token_id", None),
        pad_token_id=gguf_metadata(reader, "tokenizer.ggml.padding_token_id", None),
        add_bos_token=bool(
            gguf_metadata(reader, "tokenizer.ggml.add_bos_token", False)
        ),
        chat_template=gguf_metadata(reader, "tokenizer.chat_template", None),
    )


def _special_token_text(value) -> str | None:
    # tokenizer_config.json writes a special token as a string or as an
    # AddedToken dictionary {"content": ..., ...}.
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_hf_tokenizer(path: str | os.PathLike[str]) -> PretrainedTokenizer:
    """Loads a Hugging Face fast tokenizer.

    Args:
      path: a `tokenizer.json` file, or a directory holding one and
        optionally `tokenizer_config.json` (read for the bos/eos/pad tokens,
        `add_bos_token` and `chat_template`).

    Returns:
      The tokenizer.

    Raises:
      FileNotFoundError: if there is no `tokenizer.json` at `path`.
      ValueError: if a special token named in `tokenizer_config.json` is not
        in the vocabulary.
    """
    Tokenizer = _require("tokenizers", "tokenizers", "Loading tokenizer.json").Tokenizer

    path = pathlib.Path(path)
    tokenizer_file = path / "tokenizer.json" if path.is_dir() else path
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"No tokenizer.json at {tokenizer_file}.")
    backend = Tokenizer.from_file(str(tokenizer_file))
    config_file = tokenizer_file.parent / "tokenizer_config.json"
    tokenizer_config = (
        json.loads(config_file.read_text(encoding="utf-8"))
        if config_file.is_file()
        else {}
    )
    special_ids = {}
    for name in ("bos", "eos", "pad"):
        token = _special_token_text(tokenizer_config.get(f"{name}_token"))
        if token is None:
            special_ids[name] = None
            continue
        token_id = backend.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"{config_file}: {name}_token {token!r} is not in the vocabulary."
            )
        special_ids[name] = token_id
    chat_template = tokenizer_config.get("chat_template")
    if isinstance(chat_template, list):
        # Several named templates: [{"name": "default", "template": ...}, ...].
        named = {entry.get("name"): entry.get("template") for entry in chat_template}
        chat_template = named.get("default")
    return PretrainedTokenizer(
        backend,
        bos_token_id=special_ids["bos"],
        eos_token_id=special_ids["eos"],
        pad_token_id=special_ids["pad"],
        add_bos_token=bool(tokenizer_config.get("add_bos_token", False)),
        chat_template=chat_template,
    )
