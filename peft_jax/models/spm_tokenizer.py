"""SentencePiece-style BPE (Gemma's tokenizer) rebuilt from a GGUF vocabulary.

A GGUF file of a SentencePiece model (`tokenizer.ggml.model == "llama"`)
stores the pieces (`tokenizer.ggml.tokens`, spaces written as `"▁"`), their
scores and token types (1 normal, 3 control, 4 user defined, 6 byte), but no
merge rules. This module builds a `tokenizers.Tokenizer` that encodes as the
reference does (transformers' `GemmaTokenizer` built from the same file):

* spaces become `"▁"`, no prefix space is added;
* merges are every split of a piece into two pieces of the vocabulary, the
  merge that makes an earlier piece first (Gemma's piece order is its merge
  order; its scores are `-position` up to a handful of ties), longer left
  parts first between splits of one piece;
* text that no piece covers falls back to the byte pieces `<0xNN>`;
* control tokens (`<bos>`, `<start_of_turn>`, ...) and user-defined ones
  (`"\\n\\n"`, ...) are matched whole in the text before BPE runs;
* llama.cpp writes user-defined whitespace runs with real spaces (`"   "`);
  they are spelled with `"▁"` again so the merges reach them.

Example:
  >>> backend = sentencepiece_bpe_backend(["<unk>", "▁", "a", "b", "ab"], [3, 1, 1, 1, 1])
  >>> backend.encode("ab a").tokens
  ['ab', '▁', 'a']
"""

from __future__ import annotations

from collections.abc import Sequence

from peft_jax.models._imports import require as _require

__all__ = ["SPACE_PIECE", "sentencepiece_bpe_backend", "sentencepiece_merges"]

SPACE_PIECE = "\u2581"
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


def _respelled(token: str) -> str:
    if " " in token and not token.strip():
        return SPACE_PIECE * len(token)
    return token


def sentencepiece_merges(tokens: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merge rules implied by a piece list whose order is the merge order.

    Args:
      tokens: the pieces, best (earliest merged) first.

    Returns:
      `(left, right)` pairs, highest priority first: for each piece in order,
      its splits into two pieces of the vocabulary, longer left part first.
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = []
    # A repeated piece ranks by its last position, as the vocabulary maps it.
    for piece, rank in vocab.items():
        splits = [
            (len(piece) - cut, piece[:cut], piece[cut:])
            for cut in range(1, len(piece))
            if piece[:cut] in vocab and piece[cut:] in vocab
        ]
        for _, left, right in sorted(splits):
            merges.append((rank, -len(left), -len(right), left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def sentencepiece_bpe_backend(
    tokens: Sequence[str],
    token_types: Sequence[int] | None,
    *,
    unk_token: str = "<unk>",
):
    """A `tokenizers.Tokenizer` for a SentencePiece BPE vocabulary in merge order.

    Args:
      tokens: the pieces as the GGUF file stores them (id = position).
      token_types: llama.cpp token types per piece, or `None`.
      unk_token: the piece for text without a piece or a byte fallback.

    Returns:
      The tokenizer (BPE with byte fallback, `" "` -> `"▁"` normalizer,
      decoder back to text).

    Raises:
      ValueError: if `unk_token` is not in the vocabulary.
    """
    tokenizers = _require("tokenizers", "tokenizers", "Building a BPE tokenizer")

    spelled = [_respelled(token) for token in tokens]
    vocab = {token: index for index, token in enumerate(spelled)}
    if unk_token not in vocab:
        raise ValueError(f"The unknown-token piece {unk_token!r} is not in the vocabulary.")
    backend = tokenizers.Tokenizer(
        tokenizers.models.BPE(
            vocab=vocab,
            merges=sentencepiece_merges(spelled),
            unk_token=unk_token,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    backend.normalizer = tokenizers.normalizers.Replace(" ", SPACE_PIECE)
    decoders = tokenizers.decoders
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE_PIECE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    if token_types is not None:
        special = [
            tokenizers.AddedToken(token, special=True, normalized=False)
            for token, kind in zip(tokens, token_types)
            if kind == _TOKEN_TYPE_CONTROL
        ]
        # A respelled whitespace run is reached by merges, not matched whole.
        user_defined = [
            tokenizers.AddedToken(token, special=False, normalized=False)
            for token, kind in zip(tokens, token_types)
            if kind == _TOKEN_TYPE_USER_DEFINED and token in vocab
        ]
        backend.add_special_tokens(special)
        backend.add_tokens(user_defined)
    return backend
