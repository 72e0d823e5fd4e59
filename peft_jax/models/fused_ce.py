"""Cross-entropy of a linear head, fused and chunked over tokens and vocabulary.

``linear_cross_entropy(hidden, weight, labels)`` equals
``causal_lm_loss(hidden @ W, labels)`` (``W`` the head: an ``(H, V)`` kernel
or a tied ``(V, H)`` embedding), but never holds the ``(tokens, vocab)``
float32 logits of the whole batch. The tokens go in blocks (512 by default),
and each block streams the head in vocabulary chunks (8,192 ids), keeping a
running maximum and sum of exponentials per token (the online softmax of
flash attention). Under differentiation, since the loss is a sum over tokens,
the forward pass also produces each block's ``dh`` on the spot: with a frozen
head (LoRA) it accumulates ``softmax(z) W`` chunk by chunk, rescaled to the
running maximum, and subtracts the label rows ``W[y]`` at the end (no one-hot,
one pass, the flops of the plain head). When the head itself is trained
(``dW`` needed) a first pass finds each token's log-sum-exp and a second
recomputes each chunk's logits for ``g = softmax(z) - onehot(y)`` (the
one-hot an iota compare), giving ``dh += g W`` and that chunk's rows of
``dW = g^T h``: one more head product than the plain loss. Where blocks of
at least 128 tokens over the whole vocabulary fit in two chunks' logits
(SmolLM2's 49,152 ids; not Gemma's 262,144) such shorter blocks instead take
one pass over their full logits, the flops of the plain head. The backward
pass just scales the saved ``dh`` (and ``dW``) by the loss's cotangent.
Peak memory holds one chunk of logits instead of several ``(tokens, vocab)``
buffers (logits, log-softmax, its gradient, the one-hot scatter). A final logit softcapping
``c * tanh(z / c)`` (Gemma's) is applied to each chunk, its derivative
``1 - tanh(z / c)**2`` taken from the same ``tanh`` and folded into the
gradient.

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

__all__ = ["DEFAULT_CHUNK_TOKENS", "DEFAULT_CHUNK_VOCAB", "linear_cross_entropy"]

# Tokens per block and vocabulary ids per chunk: one chunk's float32 logits
# are 512 x 8192 x 4 bytes = 16 MiB whatever the vocabulary, and every head
# product has all 512 tokens of a 4 x 128 batch as its rows (long, thin
# products over 32 or 128 tokens ran slower on XLA:CPU:
# benchmarks/results/head.md).
DEFAULT_CHUNK_TOKENS = 512
DEFAULT_CHUNK_VOCAB = 8192
# With dW wanted: blocks at least this long go over the whole vocabulary in one pass.
_ONE_PASS_MIN_TOKENS = 128


def _logits(h, w, vocab_axis, dtype, softcap):
  """``h @ w`` in ``dtype`` (as the model computes it), then float32, softcapped.

  Returns the logits and the softcap's derivative ``1 - tanh(z / c)**2``
  (``None`` without a cap), taken from the same ``tanh``.
  """
  z = jax.lax.dot_general(h.astype(dtype), w.astype(dtype),
                          (((1,), (1 - vocab_axis,)), ((), ())))
  z = z.astype(jnp.float32)
  if softcap is None:
    return z, None
  t = jnp.tanh(z / softcap)
  return t * softcap, 1.0 - jnp.square(t)


def _times_head(g, w, vocab_axis, dtype):
  """``g @ w^T`` (tied ``w``) or ``g @ w`` (kernel): ``(tokens, chunk) -> (tokens, H)``, float32."""
  return jax.lax.dot_general(g.astype(dtype), w.astype(dtype), (((1,), (vocab_axis,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _over_vocab(step, carry, weight, vocab_axis, chunk_vocab):
  """Folds ``step(carry, w_chunk, offset) -> (carry, out)`` over the head's vocabulary chunks.

  The chunks are slices of ``weight`` (never a padded copy); a last, shorter
  chunk takes the remainder. Returns the carry and the outputs concatenated
  along the vocabulary (``None`` when ``step`` outputs ``None``).
  """
  vocab = weight.shape[vocab_axis]
  full, tail = divmod(vocab, chunk_vocab)

  def body(carry, i):
    start = i * chunk_vocab
    w = jax.lax.dynamic_slice_in_dim(weight, start, chunk_vocab, axis=vocab_axis)
    return step(carry, w, start)

  outs = []
  if full == 1:  # no loop (less to compile)
    carry, out = step(carry, jax.lax.slice_in_dim(weight, 0, chunk_vocab, axis=vocab_axis), 0)
    if out is not None:
      outs.append(out)
  elif full:
    carry, out = jax.lax.scan(body, carry, jnp.arange(full, dtype=jnp.int32))
    if out is not None:  # (full, chunk, H) or (full, H, chunk) -> along the vocabulary
      out = jnp.moveaxis(out, 0, vocab_axis)
      outs.append(out.reshape(out.shape[:vocab_axis] + (-1,) + out.shape[vocab_axis + 2:]))
  if tail:
    w = jax.lax.slice_in_dim(weight, full * chunk_vocab, vocab, axis=vocab_axis)
    carry, out = step(carry, w, full * chunk_vocab)
    if out is not None:
      outs.append(out)
  if not outs:
    return carry, None
  return carry, outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=vocab_axis)


def _at_label(x, y, start):
  """``x[t, y_t - start]`` where ``y_t`` falls in this chunk, else 0."""
  local = y - start
  hit = (local >= 0) & (local < x.shape[1])
  picked = jnp.take_along_axis(x, jnp.clip(local, 0, x.shape[1] - 1)[:, None], axis=1)[:, 0]
  return jnp.where(hit, picked, 0.0)


def _online_softmax(h, y, weight, vocab_axis, dtype, softcap, chunk_vocab, with_dh):
  """One token block against the whole vocabulary, chunk by chunk (a streaming softmax).

  Returns ``lse``, the label's logit, its softcap derivative and, with
  ``with_dh``, ``sum_v softmax(z)_v dz_v/du_v w_v`` (the block's ``dh`` less
  its label term), kept rescaled to the running maximum as in flash attention.
  """
  tokens = h.shape[0]

  def step(carry, w, start):
    m, l, zy, dy, acc = carry
    z, dz = _logits(h, w, vocab_axis, dtype, softcap)
    m_new = jnp.maximum(m, jnp.max(z, axis=1))
    rescale = jnp.exp(m - m_new)
    p = jnp.exp(z - m_new[:, None])
    l = l * rescale + jnp.sum(p, axis=1)
    zy = zy + _at_label(z, y, start)
    if dz is not None:
      dy = dy + _at_label(dz, y, start)
      p = p * dz
    if with_dh:
      acc = acc * rescale[:, None] + _times_head(p, w, vocab_axis, dtype)
    return (m_new, l, zy, dy, acc), None

  zeros = jnp.zeros((tokens,), jnp.float32)
  acc0 = jnp.zeros((tokens, h.shape[1]) if with_dh else (), jnp.float32)
  carry = (jnp.full((tokens,), -jnp.inf, jnp.float32), zeros, zeros, zeros, acc0)
  (m, l, zy, dy, acc), _ = _over_vocab(step, carry, weight, vocab_axis, chunk_vocab)
  dh = acc / l[:, None] if with_dh else None
  return m + jnp.log(l), zy, (dy if softcap is not None else None), dh


def _chunked(x, chunk):
  """``(T, ...) -> (T / chunk, chunk, ...)`` after zero-padding ``T``."""
  pad = (-x.shape[0]) % chunk
  if pad:
    x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
  return x.reshape((-1, chunk) + x.shape[1:])


def _sum_loss(hidden, weight, labels, weights, vocab_axis, dtype, chunk, chunk_vocab, softcap):
  """``sum_t w_t CE_t`` without gradients (the primal, e.g. for evaluation)."""

  def body(total, xs):
    h, y, w = xs
    lse, zy, _, _ = _online_softmax(h, y, weight, vocab_axis, dtype, softcap, chunk_vocab, False)
    return total + jnp.sum(w * (lse - zy)), None

  xs = (_chunked(hidden, chunk), _chunked(labels, chunk), _chunked(weights, chunk))
  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
  return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _fused(hidden, weight, labels, weights, vocab_axis, dtype, chunk, chunk_vocab, softcap):
  return _sum_loss(hidden, weight, labels, weights, vocab_axis, dtype, chunk, chunk_vocab, softcap)


def _label_rows(weight, y, vocab_axis, dtype):
  """The head's rows ``w_y`` of the labels, ``(tokens, H)``, rounded to ``dtype``."""
  rows = jnp.take(weight, y, axis=vocab_axis)
  rows = rows if vocab_axis == 0 else rows.T
  return rows.astype(dtype).astype(jnp.float32)


def _block_dh(h, y, w, weight, vocab_axis, dtype, chunk_vocab, softcap):
  """One token block's loss and ``dh`` in one streaming pass (the head itself frozen)."""
  lse, zy, dy, acc = _online_softmax(h, y, weight, vocab_axis, dtype, softcap, chunk_vocab, True)
  label = _label_rows(weight, y, vocab_axis, dtype)
  if dy is not None:
    label = label * dy[:, None]
  return jnp.sum(w * (lse - zy)), (acc - label) * w[:, None], None


def _chunk_grads(h, y, w, wc, start, z, dz, lse, vocab_axis, dtype):
  """One chunk's ``g = w_t (softmax(z) - onehot(y)) dz``: its part of ``dh``, its rows of ``dW``."""
  ids = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1) + start
  g = jnp.exp(z - lse[:, None]) - (ids == y[:, None]).astype(jnp.float32)
  if dz is not None:
    g = g * dz
  g = (g * w[:, None]).astype(dtype)
  # dW[v, i] (tied) or dW[i, v] (kernel) = sum_t h[t, i] g[t, v]
  dims = (((0,), (0,)), ((), ()))
  hd = h.astype(dtype)
  dw = (jax.lax.dot_general(g, hd, dims, preferred_element_type=jnp.float32) if vocab_axis == 0
        else jax.lax.dot_general(hd, g, dims, preferred_element_type=jnp.float32))
  return _times_head(g, wc, vocab_axis, dtype), dw


def _block_dh_dweight(h, y, w, weight, vocab_axis, dtype, chunk_vocab, softcap):
  """One token block's loss, ``dh`` and ``dW``: the ``lse`` first, then each chunk's gradient."""
  lse, zy, _, _ = _online_softmax(h, y, weight, vocab_axis, dtype, softcap, chunk_vocab, False)

  def step(dh, wc, start):
    z, dz = _logits(h, wc, vocab_axis, dtype, softcap)
    dh_chunk, dw = _chunk_grads(h, y, w, wc, start, z, dz, lse, vocab_axis, dtype)
    return dh + dh_chunk, dw

  dh, dweight = _over_vocab(step, jnp.zeros(h.shape, jnp.float32), weight, vocab_axis, chunk_vocab)
  return jnp.sum(w * (lse - zy)), dh, dweight


def _block_dh_dweight_one_pass(h, y, w, weight, vocab_axis, dtype, chunk_vocab, softcap):
  """A short token block's loss, ``dh`` and ``dW`` from its logits over the whole vocabulary."""
  del chunk_vocab
  z, dz = _logits(h, weight, vocab_axis, dtype, softcap)
  lse = jax.nn.logsumexp(z, axis=1)
  dh, dweight = _chunk_grads(h, y, w, weight, 0, z, dz, lse, vocab_axis, dtype)
  return jnp.sum(w * (lse - _at_label(z, y, 0))), dh, dweight


def _fused_fwd(hidden, weight, labels, weights, vocab_axis, dtype, chunk, chunk_vocab, softcap):
  want_dweight = weight.perturbed
  hidden, weight, labels, weights = hidden.value, weight.value, labels.value, weights.value
  block = _block_dh
  if want_dweight:
    # Two passes cost one more head product. Where blocks of >= 128 tokens
    # against the whole vocabulary fit in two chunks' logits (SmolLM2's
    # 49,152 ids, not Gemma's 262,144) one pass over them is faster.
    tokens = hidden.shape[0]
    short = min(2 * chunk * chunk_vocab // weight.shape[vocab_axis], chunk)
    if short >= min(_ONE_PASS_MIN_TOKENS, tokens):
      blocks = -(-tokens // short)  # as few blocks as fit, of equal length (little padding)
      block, chunk = _block_dh_dweight_one_pass, -(-tokens // blocks)
    else:
      block = _block_dh_dweight

  def body(carry, xs):
    total, dweight = carry
    loss, dh, dw = block(*xs, weight, vocab_axis, dtype, chunk_vocab, softcap)
    return (total + loss, dweight if dw is None else dweight + dw), dh

  xs = (_chunked(hidden, chunk), _chunked(labels, chunk), _chunked(weights, chunk))
  dweight0 = jnp.zeros(weight.shape if want_dweight else (), jnp.float32)
  (total, dweight), dh = jax.lax.scan(body, (jnp.zeros((), jnp.float32), dweight0), xs)
  dh = dh.reshape((-1, hidden.shape[-1]))[: hidden.shape[0]].astype(hidden.dtype)
  return total, (dh, dweight.astype(weight.dtype) if want_dweight else None)


def _fused_bwd(vocab_axis, dtype, chunk, chunk_vocab, softcap, residuals, ct):
  del vocab_axis, dtype, chunk, chunk_vocab, softcap
  dh, dweight = residuals
  scale = lambda x: None if x is None else (ct * x).astype(x.dtype)
  # The labels are integers and the mask is data: no cotangent for either.
  return scale(dh), scale(dweight), None, None


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def linear_cross_entropy(hidden: jax.Array, weight: jax.Array, labels: jax.Array,
                         mask: jax.Array | None = None, *, vocab_axis: int = 1,
                         dtype: Any = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                         softcap: float | None = None,
                         chunk_vocab: int = DEFAULT_CHUNK_VOCAB) -> jax.Array:
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
    chunk_tokens: tokens per block (each block streams the whole head).
    softcap: ``c`` of a final logit softcapping ``c * tanh(logits / c)``
      (Gemma's ``final_logit_softcapping``), applied to the float32 logits;
      ``None``: none.
    chunk_vocab: vocabulary ids per chunk; one chunk's float32 logits are
      ``chunk_tokens x chunk_vocab x 4`` bytes.

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
  for name, value in (("chunk_tokens", chunk_tokens), ("chunk_vocab", chunk_vocab)):
    if int(value) < 1:
      raise ValueError(f"{name} must be a positive number of rows; got {value!r}.")
  chunk = max(1, min(int(chunk_tokens), flat_y.shape[0]))
  chunk_vocab = max(1, min(int(chunk_vocab), weight.shape[vocab_axis]))
  softcap = None if softcap is None else float(softcap)
  total = _fused(flat_h, weight, flat_y, weights, vocab_axis, dtype, chunk, chunk_vocab,
                 softcap)
  if mask is None:
    return total / flat_y.shape[0]
  return total / jnp.maximum(jnp.sum(weights), 1.0)
