"""Cross-entropy of a linear head, fused and chunked over tokens.

``linear_cross_entropy(hidden, weight, labels)`` equals
``causal_lm_loss(hidden @ W, labels)`` (``W`` the head: an ``(H, V)`` kernel
or a tied ``(V, H)`` embedding), but never holds the ``(tokens, vocab)``
float32 logits of the whole batch. Under differentiation the forward pass
walks the tokens in chunks and, since the loss is a sum over tokens, computes
each chunk's gradient ``softmax(z) - onehot(y)`` on the spot and contracts it
with the head at once (``dh = g W^T``, and ``dW += h^T g`` only when the head
itself is trained). The backward pass just scales the saved ``dh`` (and
``dW``) by the loss's cotangent: no logits are kept for it and none are
recomputed. Peak memory holds one chunk of logits instead of several
``(tokens, vocab)`` buffers (logits, log-softmax, its gradient, the one-hot
scatter), and the flops are those of the plain head. A final logit
softcapping ``c * tanh(z / c)`` (Gemma's) is applied to each chunk, its
derivative ``1 - tanh(z / c)**2`` folded into that chunk's gradient.

The idea is that of fused linear cross-entropy kernels (Liger-Kernel's
``LigerFusedLinearCrossEntropy``; Wijmans et al., "Cut Your Losses in
Large-Vocabulary Language Models", 2024), written here in plain JAX so it
runs on every backend.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["DEFAULT_CHUNK_TOKENS", "linear_cross_entropy"]

# Tokens per chunk: the chunk's float32 logits are chunk x vocab x 4 bytes
# (25 MiB at 128 x 49152); large enough that each head product is a
# full-speed matmul.
DEFAULT_CHUNK_TOKENS = 128


def _logits(h, weight, vocab_axis, dtype, softcap):
  """``h @ W`` in ``dtype`` (as the model computes it), then float32 (and softcapped)."""
  contract = 1 - vocab_axis
  z = jax.lax.dot_general(h.astype(dtype), weight.astype(dtype),
                          (((1,), (contract,)), ((), ())))
  z = z.astype(jnp.float32)
  return z if softcap is None else jnp.tanh(z / softcap) * softcap


def _chunked(x, chunk):
  """``(T, ...) -> (T / chunk, chunk, ...)`` after zero-padding ``T``."""
  pad = (-x.shape[0]) % chunk
  if pad:
    x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
  return x.reshape((-1, chunk) + x.shape[1:])


def _chunk_loss(h, y, w, weight, vocab_axis, dtype, softcap):
  z = _logits(h, weight, vocab_axis, dtype, softcap)
  lse = jax.nn.logsumexp(z, axis=-1)
  zy = jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0]
  return z, lse, jnp.sum(w * (lse - zy))


def _sum_loss(hidden, weight, labels, weights, vocab_axis, dtype, chunk, softcap):
  """``sum_t w_t CE_t`` without gradients (the primal, e.g. for evaluation)."""

  def body(total, xs):
    h, y, w = xs
    return total + _chunk_loss(h, y, w, weight, vocab_axis, dtype, softcap)[2], None

  xs = (_chunked(hidden, chunk), _chunked(labels, chunk), _chunked(weights, chunk))
  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
  return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused(hidden, weight, labels, weights, vocab_axis, dtype, chunk, softcap):
  return _sum_loss(hidden, weight, labels, weights, vocab_axis, dtype, chunk, softcap)


def _fused_fwd(hidden, weight, labels, weights, vocab_axis, dtype, chunk, softcap):
  want_dweight = weight.perturbed
  hidden, weight, labels, weights = hidden.value, weight.value, labels.value, weights.value
  vocab = weight.shape[vocab_axis]

  def body(carry, xs):
    total, dweight = carry
    h, y, w = xs
    z, lse, loss = _chunk_loss(h, y, w, weight, vocab_axis, dtype, softcap)
    g = jnp.exp(z - lse[:, None]) - jax.nn.one_hot(y, vocab, dtype=jnp.float32)
    if softcap is not None:  # d(c tanh(u / c)) / du = 1 - tanh(u / c)**2
      g = g * (1.0 - jnp.square(z / softcap))
    g = (g * w[:, None]).astype(dtype)
    dh = jax.lax.dot_general(g, weight.astype(dtype), (((1,), (vocab_axis,)), ((), ())),
                             preferred_element_type=jnp.float32)
    if want_dweight:
      # dW[v, i] (tied) or dW[i, v] (kernel) = sum_t h[t, i] g[t, v]
      dims = (((0,), (0,)), ((), ()))
      dw = (jax.lax.dot_general(g, h.astype(dtype), dims, preferred_element_type=jnp.float32)
            if vocab_axis == 0 else
            jax.lax.dot_general(h.astype(dtype), g, dims, preferred_element_type=jnp.float32))
      dweight = dweight + dw
    return (total + loss, dweight), dh

  xs = (_chunked(hidden, chunk), _chunked(labels, chunk), _chunked(weights, chunk))
  dweight0 = jnp.zeros(weight.shape if want_dweight else (), jnp.float32)
  (total, dweight), dh = jax.lax.scan(body, (jnp.zeros((), jnp.float32), dweight0), xs)
  dh = dh.reshape((-1, hidden.shape[-1]))[: hidden.shape[0]].astype(hidden.dtype)
  return total, (dh, dweight.astype(weight.dtype) if want_dweight else None)


def _fused_bwd(vocab_axis, dtype, chunk, softcap, residuals, ct):
  del vocab_axis, dtype, chunk, softcap
  dh, dweight = residuals
  scale = lambda x: None if x is None else (ct * x).astype(x.dtype)
  # The labels are integers and the mask is data: no cotangent for either.
  return scale(dh), scale(dweight), None, None


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def linear_cross_entropy(hidden: jax.Array, weight: jax.Array, labels: jax.Array,
                         mask: jax.Array | None = None, *, vocab_axis: int = 1,
                         dtype: Any = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                         softcap: float | None = None) -> jax.Array:
  """Mean token cross-entropy of the logits ``hidden @ W``, in float32.

  Args:
    hidden: ``(..., H)`` final hidden states.
    weight: the head: ``(H, V)`` (a Dense kernel, ``vocab_axis=1``) or
      ``(V, H)`` (a tied embedding, ``vocab_axis=0``).
    labels: int ``(...)`` target ids aligned with ``hidden``.
    mask: optional ``(...)`` weights, 1 for tokens that count.
    vocab_axis: which axis of ``weight`` is the vocabulary.
    dtype: dtype of the head product (the model's compute dtype); default
      ``hidden.dtype``. The logits are cast to float32 after it, as
      ``LlamaForCausalLM`` does.
    chunk_tokens: tokens per chunk.
    softcap: ``c`` of a final logit softcapping ``c * tanh(logits / c)``
      (Gemma's ``final_logit_softcapping``), applied to the float32 logits;
      ``None``: none.

  Returns:
    Scalar: the mean over counted tokens (0 when none count), as
    :func:`peft_jax.models.causal_lm_loss` of the full logits. Gradients
    flow to ``hidden`` and ``weight``, not to ``mask``.
  """
  if vocab_axis not in (0, 1) or weight.ndim != 2:
    raise ValueError(f"weight must be 2-D with vocab_axis 0 or 1; got shape {weight.shape}, "
                     f"vocab_axis={vocab_axis}.")
  hidden_size = weight.shape[1 - vocab_axis]
  if hidden.shape[-1] != hidden_size or labels.shape != hidden.shape[:-1]:
    raise ValueError(f"hidden {hidden.shape}, labels {labels.shape} and head {weight.shape} "
                     "do not fit.")
  dtype = jnp.dtype(dtype or hidden.dtype)
  flat_h = hidden.reshape(-1, hidden_size)
  flat_y = labels.reshape(-1).astype(jnp.int32)
  if mask is None:
    weights = jnp.ones(flat_y.shape, jnp.float32)
  else:
    weights = mask.reshape(-1).astype(jnp.float32)
  chunk = max(1, min(int(chunk_tokens), flat_y.shape[0]))
  softcap = None if softcap is None else float(softcap)
  total = _fused(flat_h, weight, flat_y, weights, vocab_axis, dtype, chunk, softcap)
  if mask is None:
    return total / flat_y.shape[0]
  return total / jnp.maximum(jnp.sum(weights), 1.0)
