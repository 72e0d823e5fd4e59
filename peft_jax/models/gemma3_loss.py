"""Next-token loss of a Gemma 3 model, its tied head fused into the cross-entropy.

Gemma's vocabulary is large (262,144 ids for 640 hidden units in the 270M):
the plain loss of a 4 x 128 batch holds a 512 MiB float32 logits array, and
its log-softmax, one-hot and gradient are as large again.
:func:`gemma3_lm_loss` instead runs the decoder to its final norm and hands
the hidden states and the tied embedding to
:func:`peft_jax.models.fused_ce.linear_cross_entropy` (final logit
softcapping included), which walks blocks of tokens against chunks of the
vocabulary: the same loss and gradients, one chunk of logits alive at a time.

Example::

  loss_fn = lambda m: gemma3_lm_loss(m, inputs, labels)
  loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, pj.nnx.Adapter))(model)
"""

from __future__ import annotations

import jax
from flax import nnx

from peft_jax.models.fused_ce import DEFAULT_CHUNK_TOKENS, DEFAULT_CHUNK_VOCAB, linear_cross_entropy
from peft_jax.models.gemma3 import Gemma3ForCausalLM
from peft_jax.models.llama import causal_lm_loss

__all__ = ["GEMMA3_CHUNK_TOKENS", "gemma3_lm_loss"]

# Token blocks of 512 against vocabulary chunks of 8,192 ids: 16 MiB of logits
# per chunk, and every head product has the whole 4 x 128 batch as its rows
# (fused_ce's defaults; 32-token blocks over the whole vocabulary took ~1.7x the
# CPU time for the same flops, benchmarks/results/head.md).
GEMMA3_CHUNK_TOKENS = DEFAULT_CHUNK_TOKENS


def _plain_embedding(model: Gemma3ForCausalLM):
  """The tied embedding matrix when the fused loss can take it, else None.

  A subclass of ``nnx.Embed`` (an adapted or quantized embedding: its
  ``attend`` may differ) or a non-array value keeps the plain path.
  """
  embed = model.model.embed_tokens
  if type(embed) is not nnx.Embed:  # pylint: disable=unidiomatic-typecheck
    return None
  weight = embed.embedding.get_value()
  if not isinstance(weight, jax.Array) or weight.ndim != 2:
    return None
  return weight


def gemma3_lm_loss(model: Gemma3ForCausalLM, input_ids: jax.Array, labels: jax.Array,
                   mask: jax.Array | None = None, *, attention_mask: jax.Array | None = None,
                   chunk_tokens: int = GEMMA3_CHUNK_TOKENS,
                   chunk_vocab: int = DEFAULT_CHUNK_VOCAB) -> jax.Array:
  """Mean next-token cross-entropy of ``model`` on ``input_ids``, in float32.

  Equals ``causal_lm_loss(model(input_ids, attention_mask), labels, mask)``
  (values and gradients), computed without the batch's full logits when the
  embedding is a plain ``nnx.Embed``; otherwise it is exactly that.

  Args:
    model: a ``Gemma3ForCausalLM`` (its projections may carry adapters or
      NF4 kernels).
    input_ids: int ``(batch, seq)`` token ids.
    labels: int ``(batch, seq)`` targets aligned with the inputs (label t
      follows input t).
    mask: optional ``(batch, seq)`` weights of the tokens that count.
    attention_mask: optional ``(batch, seq)``, 0 for padded keys.
    chunk_tokens: tokens per block of the fused head.
    chunk_vocab: vocabulary ids per chunk of the fused head.

  Returns:
    The scalar loss.
  """
  weight = _plain_embedding(model)
  if weight is None:
    return causal_lm_loss(model(input_ids, attention_mask), labels, mask)
  hidden = model.model(input_ids, attention_mask)
  return linear_cross_entropy(hidden, weight, labels, mask, vocab_axis=0,
                              dtype=model.config.dtype, chunk_tokens=chunk_tokens,
                              softcap=model.config.final_logit_softcapping,
                              chunk_vocab=chunk_vocab)
