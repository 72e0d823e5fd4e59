"""A Llama-family decoder-only language model in Flax linen.

The module tree follows Hugging Face's `LlamaForCausalLM` naming, so parameter
paths read like the PyTorch state dict (`model/layers_0/self_attn/q_proj/kernel`
for `model.layers.0.self_attn.q_proj.weight`) and adapter targets such as
`("q_proj", "v_proj")` mean the same thing here as in Hugging Face PEFT. Every
projection is a plain `nn.Dense`, which is what the LoRA interceptor sees.

Two layer layouts are supported:

* unrolled (`scan_layers=False`): one submodule per layer, `model/layers_{i}`;
* scanned (`scan_layers=True`): a single `model/layers` whose leaves carry a
  leading layer axis, which compiles once per layer instead of once per model.

`params_unrolled_to_scanned` and `params_scanned_to_unrolled` convert between
them.

References:
  Touvron et al., "LLaMA: Open and Efficient Foundation Language Models", 2023.
  Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding",
  2021.
  Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models
  from Multi-Head Checkpoints", 2023.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "HF_MODEL_TYPES",
    "REMAT_POLICY_NAMES",
    "LlamaConfig",
    "LlamaRMSNorm",
    "LlamaAttention",
    "LlamaMLP",
    "LlamaDecoderLayer",
    "LlamaModel",
    "LlamaForCausalLM",
    "causal_lm_loss",
    "count_params",
    "init_params",
    "params_unrolled_to_scanned",
    "params_scanned_to_unrolled",
    "rotary_cos_sin",
    "apply_rotary",
]

# Policies from `jax.checkpoint_policies` that need no arguments; the others
# (`save_only_these_names`, ...) are factories and cannot be named by a string.
REMAT_POLICY_NAMES = (
    "everything_saveable",
    "nothing_saveable",
    "dots_saveable",
    "checkpoint_dots",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots_with_no_batch_dims",
)

# Hugging Face's initializer_range default.
_INIT_STDDEV = 0.02

_UNROLLED_LAYER_NAME = re.compile(r"layers_(\d+)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Architecture and execution settings of a Llama-family model.

    Attributes:
      vocab_size: number of token ids.
      hidden_size: width of the residual stream.
      intermediate_size: width of the SwiGLU feed-forward layer.
      num_hidden_layers: number of decoder layers.
      num_attention_heads: number of query heads.
      num_key_value_heads: number of key/value heads (grouped-query attention);
        defaults to `num_attention_heads`. Must divide it.
      head_dim: width of one head; defaults to
        `hidden_size // num_attention_heads`.
      max_position_embeddings: longest sequence the model was trained for
        (informational: rotary embeddings have no table to overflow).
      rms_norm_eps: epsilon inside the RMSNorm square root.
      rope_theta: base of the rotary frequencies.
      tie_word_embeddings: compute logits with the transposed token embedding
        instead of a separate `lm_head`.
      attention_dropout: dropout rate on attention probabilities, active only
        when the model is called with `deterministic=False`.
      qkv_bias: the query, key and value projections have biases (Qwen2).
      o_proj_bias: the output projection has a bias (Llama's
        `attention_bias=True` sets both).
      sliding_window: a query sees at most this many keys, itself included
        (Mistral); `None` is full causal attention.
      dtype: compute dtype of activations (e.g. `jnp.bfloat16`).
      param_dtype: storage dtype of parameters.
      scan_layers: run the decoder layers under `nn.scan` (stacked params).
      remat: recompute each decoder layer's activations in the backward pass.
      remat_policy: name of a `jax.checkpoint_policies` policy saying which
        intermediates remat may keep, one of `REMAT_POLICY_NAMES`; `None`
        saves nothing but the layer inputs.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    qkv_bias: bool = False
    o_proj_bias: bool = False
    sliding_window: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: bool = False
    remat_policy: str | None = None

    def __post_init__(self):
        # Resolve Hugging Face's "None means derive it" defaults once, so the
        # rest of the code reads plain integers.
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(
                self, "head_dim", self.hidden_size // self.num_attention_heads
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a "
                f"multiple of num_key_value_heads={self.num_key_value_heads}."
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim={self.head_dim} must be even for rotary embeddings."
            )
        if self.remat_policy not in (None, *REMAT_POLICY_NAMES):
            raise ValueError(
                f"Unknown remat_policy {self.remat_policy!r}; expected None or one "
                f"of {REMAT_POLICY_NAMES}."
            )

    @classmethod
    def tiny(cls, **overrides) -> LlamaConfig:
        """A 2-layer model with grouped-query attention, for unit tests."""
        settings = dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
        return cls(**(settings | overrides))

    @classmethod
    def bench(cls, **overrides) -> LlamaConfig:
        """A ~32M-parameter model for benchmarks that fit on one accelerator."""
        settings = dict(
            vocab_size=8192,
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        )
        return cls(**(settings | overrides))

    @classmethod
    def smollm2_135m(cls, **overrides) -> LlamaConfig:
        """The architecture of HuggingFaceTB/SmolLM2-135M (134,515,008 params)."""
        settings = dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_theta=100000.0,
            tie_word_embeddings=True,
        )
        return cls(**(settings | overrides))

    @classmethod
    def from_hf_dict(cls, hf_config: Mapping[str, Any], **overrides) -> LlamaConfig:
        """Reads a Hugging Face Llama, Qwen2 or Mistral `config.json` dictionary.

        Keys the file omits take Hugging Face's `LlamaConfig` defaults (note
        `rms_norm_eps=1e-6` there). Execution settings such as `dtype`,
        `scan_layers` or `remat` are not in the file; pass them as overrides.

        Args:
          hf_config: the parsed `config.json`.
          **overrides: fields of this class that replace what the file says.

        Returns:
          The matching `LlamaConfig`.

        Raises:
          ValueError: if a required key is missing or the file describes a
            variant this model does not implement (rope scaling, biases,
            an activation other than SiLU, a model type other than llama).
        """
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [key for key in required if key not in hf_config]
        if missing:
            raise ValueError(f"Hugging Face config lacks required keys {missing}.")
        model_type = hf_config.get("model_type", "llama")
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(
                f"Hugging Face config has model_type={model_type!r}; this model "
                f"supports {HF_MODEL_TYPES}."
            )
        family = _hf_family_settings(hf_config, model_type)
        rope = hf_config.get("rope_parameters") or {}
        unsupported = {
            "hidden_act": (hf_config.get("hidden_act", "silu"), "silu"),
            "rope_scaling": (hf_config.get("rope_scaling"), None),
            "rope_parameters.rope_type": (rope.get("rope_type", "default"), "default"),
            "mlp_bias": (hf_config.get("mlp_bias", False), False),
        }
        for key, (found, supported) in unsupported.items():
            if found != supported:
                raise ValueError(
                    f"Hugging Face config has {key}={found!r}; this model "
                    f"supports only {supported!r}."
                )
        settings = {key: hf_config[key] for key in required}
        settings.update(
            num_key_value_heads=hf_config.get("num_key_value_heads"),
            head_dim=hf_config.get("head_dim"),
            max_position_embeddings=hf_config.get("max_position_embeddings", 2048),
            rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
            # transformers 5 writes rope_parameters, 4 wrote rope_theta.
            rope_theta=float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))),
            tie_word_embeddings=hf_config.get("tie_word_embeddings", False),
            attention_dropout=float(hf_config.get("attention_dropout", 0.0)),
            **family,
        )
        return cls(**(settings | overrides))


# Hugging Face model types whose checkpoints `LlamaConfig.from_hf_dict` reads.
HF_MODEL_TYPES = ("llama", "qwen2", "mistral")


def _hf_family_settings(hf_config: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """Biases and sliding window of a Llama-shaped family's `config.json`."""
    if model_type == "qwen2":
        # Qwen2 always has q/k/v biases and never an o_proj bias; its window
        # applies only with use_sliding_window, to layers past max_window_layers.
        if hf_config.get("use_sliding_window", False):
            raise ValueError(
                "Hugging Face Qwen2 config has use_sliding_window=True; only "
                "full attention is supported for Qwen2."
            )
        return dict(qkv_bias=True, o_proj_bias=False, sliding_window=None)
    if model_type == "mistral":
        window = hf_config.get("sliding_window")
        return dict(sliding_window=None if window is None else int(window))
    bias = bool(hf_config.get("attention_bias", False))
    return dict(qkv_bias=bias, o_proj_bias=bias)


def _dense(
    config: LlamaConfig, features: int, name: str, use_bias: bool = False
) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nn.initializers.normal(_INIT_STDDEV),
        name=name,
    )


class LlamaRMSNorm(nn.Module):
    """Root-mean-square layer norm, `weight * x / sqrt(mean(x**2) + eps)`.

    The statistics are computed in float32 whatever the compute dtype: a mean
    of squares accumulated in bfloat16 loses precision, and in float16 it can
    overflow.
    """

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param(
            "weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        mean_square = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        normed = x32 * jax.lax.rsqrt(mean_square + self.eps)
        return (weight.astype(jnp.float32) * normed).astype(self.dtype)


def rotary_cos_sin(
    positions: jax.Array, head_dim: int, theta: float
) -> tuple[jax.Array, jax.Array]:
    """Cosines and sines of the rotary angles, each (batch, seq, head_dim), float32.

    Uses Hugging Face's layout: the frequencies
    `inv_freq = 1 / theta ** (arange(0, head_dim, 2) / head_dim)` are repeated
    as two halves, matching `rotate_half`.
    """
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


@functools.lru_cache(maxsize=32)
def _default_rotary_tables(
    seq: int, head_dim: int, theta: float
) -> tuple[np.ndarray, np.ndarray]:
    """`rotary_cos_sin` of positions `0 .. seq-1` as (1, seq, head_dim) NumPy constants.

    Traced, the tables are a `cos`/`sin` of an iota, which XLA fuses into every
    consumer: each element of every query and key tensor (and of their
    gradients and transposed copies) recomputed two transcendentals, in about
    seven fusions per layer of a train step. As constants they are only read.
    Same float32 arithmetic as `rotary_cos_sin`.
    """
    inv_freq = np.float32(1.0) / np.float32(theta) ** (
        np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    )
    angles = np.arange(seq, dtype=np.float32)[:, None] * inv_freq
    angles = np.concatenate([angles, angles], axis=-1)[None]
    return np.cos(angles), np.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates `x` (batch, seq, heads, head_dim) by the angles in `cos`/`sin`."""
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated_half = jnp.concatenate([-second, first], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated_half * sin[:, :, None, :]
    return out.astype(x.dtype)


class LlamaAttention(nn.Module):
    """Causal grouped-query self-attention with rotary position embeddings."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        hidden: jax.Array,
        mask: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        deterministic: bool,
    ) -> jax.Array:
        config = self.config
        batch, seq, _ = hidden.shape
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = config.head_dim
        group_size = num_heads // num_kv_heads

        qkv_bias = config.qkv_bias
        query = _dense(config, num_heads * head_dim, "q_proj", qkv_bias)(hidden)
        key = _dense(config, num_kv_heads * head_dim, "k_proj", qkv_bias)(hidden)
        value = _dense(config, num_kv_heads * head_dim, "v_proj", qkv_bias)(hidden)
        query = apply_rotary(query.reshape(batch, seq, num_heads, head_dim), cos, sin)
        key = apply_rotary(key.reshape(batch, seq, num_kv_heads, head_dim), cos, sin)
        value = value.reshape(batch, seq, num_kv_heads, head_dim)

        # Query head h reads key/value head h // group_size (Hugging Face's
        # repeat_kv); grouping the query heads avoids materialising the repeats.
        # Scores are (batch, kv head, query, group, key): the product's own
        # output order, so XLA:CPU copies no transposed scores or probabilities.
        query = query.reshape(batch, seq, num_kv_heads, group_size, head_dim)
        scores = jnp.einsum("bqgrd,bkgd->bgqrk", query, key).astype(jnp.float32)
        scores = scores / math.sqrt(head_dim)
        scores = jnp.where(mask[:, :, :, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = nn.Dropout(config.attention_dropout)(probs, deterministic=deterministic)
        out = jnp.einsum("bgqrk,bkgd->bqgrd", probs.astype(config.dtype), value)
        out = out.reshape(batch, seq, num_heads * head_dim)
        return _dense(config, config.hidden_size, "o_proj", config.o_proj_bias)(out)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward layer, `down(silu(gate(x)) * up(x))`."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        config = self.config
        gate = _dense(config, config.intermediate_size, "gate_proj")(hidden)
        up = _dense(config, config.intermediate_size, "up_proj")(hidden)
        return _dense(config, config.hidden_size, "down_proj")(nn.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention block followed by a pre-norm SwiGLU block.

    Returns `(hidden, None)` so the same class serves as an `nn.scan` body
    (carry, per-layer output) and as an unrolled layer.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        hidden: jax.Array,
        mask: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        deterministic: bool,
    ) -> tuple[jax.Array, None]:
        config = self.config

        def norm(name):
            return LlamaRMSNorm(
                config.rms_norm_eps, config.dtype, config.param_dtype, name=name
            )

        attention = LlamaAttention(config, name="self_attn")
        hidden = hidden + attention(
            norm("input_layernorm")(hidden), mask, cos, sin, deterministic
        )
        hidden = hidden + LlamaMLP(config, name="mlp")(
            norm("post_attention_layernorm")(hidden)
        )
        return hidden, None


def _decoder_layer_class(config: LlamaConfig) -> type[nn.Module]:
    """The decoder layer class, wrapped in `nn.remat` when the config asks."""
    if not config.remat:
        return LlamaDecoderLayer
    policy = (
        None
        if config.remat_policy is None
        else getattr(jax.checkpoint_policies, config.remat_policy)
    )
    # `deterministic` (argument 5, counting self) is a Python bool that
    # selects code, so it must stay static. Inside scan, the loop boundary
    # already keeps XLA from merging the recomputation with the forward pass,
    # so CSE prevention would only cost time.
    return nn.remat(
        LlamaDecoderLayer,
        policy=policy,
        prevent_cse=not config.scan_layers,
        static_argnums=(5,),
    )


class LlamaModel(nn.Module):
    """Token embedding, decoder layers and the final norm: hidden states out."""

    config: LlamaConfig

    def setup(self):
        config = self.config
        self.embed_tokens = nn.Embed(
            config.vocab_size,
            config.hidden_size,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            embedding_init=nn.initializers.normal(_INIT_STDDEV),
        )
        layer_class = _decoder_layer_class(config)
        if config.scan_layers:
            scanned_layers = nn.scan(
                layer_class,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=config.num_hidden_layers,
            )
            self.layers = scanned_layers(config)
        else:
            # Linen names the modules of a list attribute `layers_0`, `layers_1`, ...
            self.layers = [layer_class(config) for _ in range(config.num_hidden_layers)]
        self.norm = LlamaRMSNorm(config.rms_norm_eps, config.dtype, config.param_dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Final-norm hidden states (batch, seq, hidden) in the compute dtype.

        Args: as `LlamaForCausalLM.__call__`.
        """
        config = self.config
        seq = input_ids.shape[-1]
        if positions is not None:
            positions = jnp.broadcast_to(positions, input_ids.shape)
        mask = jnp.tril(jnp.ones((seq, seq), dtype=bool))[None, None]
        if config.sliding_window is not None:
            mask = mask & ~jnp.tril(mask, -config.sliding_window)
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        if positions is None:
            # The default positions 0..seq-1: tables computed once on the host.
            cos, sin = (jnp.asarray(t) for t in _default_rotary_tables(
                seq, config.head_dim, config.rope_theta))
        else:
            cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta)

        hidden = self.embed_tokens(input_ids)
        if config.scan_layers:
            hidden, _ = self.layers(hidden, mask, cos, sin, deterministic)
        else:
            for layer in self.layers:
                hidden, _ = layer(hidden, mask, cos, sin, deterministic)
        return self.norm(hidden)


class LlamaForCausalLM(nn.Module):
    """A Llama decoder with its language-model head.

    Attributes:
      config: the architecture and execution settings.
    """

    config: LlamaConfig

    def setup(self):
        self.model = LlamaModel(self.config)
        if not self.config.tie_word_embeddings:
            self.lm_head = nn.Dense(
                self.config.vocab_size,
                use_bias=False,
                dtype=self.config.dtype,
                param_dtype=self.config.param_dtype,
                kernel_init=nn.initializers.normal(_INIT_STDDEV),
            )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Next-token logits.

        Args:
          input_ids: int (batch, seq) token ids.
          attention_mask: optional (batch, seq) of 1 for real tokens and 0 for
            padding; padded keys are hidden from every query.
          positions: optional rotary positions, (batch, seq) or (seq,);
            defaults to `0 .. seq-1`. Left-padded batches pass
            `cumsum(attention_mask) - 1` so each sequence starts at 0.
          deterministic: disables attention dropout; with `False`, `apply`
            needs a `'dropout'` rng.

        Returns:
          float32 logits of shape (batch, seq, vocab_size).
        """
        hidden = self.model(input_ids, attention_mask, positions, deterministic)
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return logits.astype(jnp.float32)


def causal_lm_loss(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Mean token cross-entropy in float32.

    `labels` are already aligned with `logits` (label t is the token that
    follows input t), as `peft_jax.data.batches` yields them.

    Args:
      logits: (batch, seq, vocab) next-token logits.
      labels: int (batch, seq) target token ids.
      mask: optional (batch, seq) weights, 1 for tokens that count and 0 for
        padding or prompt tokens.

    Returns:
      Scalar loss: the mean over counted tokens (0 when none count).
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels
    )
    if mask is None:
        return jnp.mean(losses)
    mask = mask.astype(jnp.float32)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def count_params(tree: Any) -> int:
    """Total number of array elements in a pytree of arrays or shape structs."""
    leaves = jax.tree.leaves(tree)
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in leaves))


def init_params(config: LlamaConfig, key: jax.Array) -> dict[str, Any]:
    """Randomly initialised parameters of `LlamaForCausalLM(config)`.

    Initialisation runs under `jax.jit` on a one-token dummy input, so it is
    quick even for large models, and `jax.eval_shape(functools.partial(
    init_params, config), key)` gives the shapes without allocating them.

    Args:
      config: the model configuration.
      key: a PRNG key.

    Returns:
      The `'params'` collection, a nested dict.
    """
    model = LlamaForCausalLM(config)
    dummy_ids = jnp.zeros((1, 1), dtype=jnp.int32)
    return jax.jit(lambda k: model.init(k, dummy_ids)["params"])(key)


def _split_model_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
    if "model" not in params:
        raise ValueError(
            "Expected LlamaForCausalLM params with a top-level 'model' entry; "
            f"got keys {sorted(params)}."
        )
    return params["model"]


def params_unrolled_to_scanned(params: Mapping[str, Any]) -> dict[str, Any]:
    """Stacks `model/layers_{i}` into one `model/layers` with a leading layer axis.

    Every leaf under the layers is stacked, adapter leaves included, so the
    result fits a model built with `scan_layers=True`.

    Args:
      params: `LlamaForCausalLM` params in the unrolled layout.

    Returns:
      The same params in the scanned layout.

    Raises:
      ValueError: if `params` has no unrolled layers.
    """
    model_params = _split_model_params(params)
    layer_indices = sorted(
        int(match.group(1))
        for name in model_params
        if (match := _UNROLLED_LAYER_NAME.fullmatch(name))
    )
    if not layer_indices:
        raise ValueError(
            "No 'layers_{i}' entries under 'model'; are they scanned already?"
        )
    if layer_indices != list(range(len(layer_indices))):
        raise ValueError(f"Layer indices {layer_indices} are not 0..n-1.")
    layers = [model_params[f"layers_{i}"] for i in layer_indices]
    scanned_model = {
        name: value
        for name, value in model_params.items()
        if not _UNROLLED_LAYER_NAME.fullmatch(name)
    }
    scanned_model["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return {**params, "model": scanned_model}


def params_scanned_to_unrolled(params: Mapping[str, Any]) -> dict[str, Any]:
    """Splits a stacked `model/layers` into `model/layers_{i}`, one per layer.

    Args:
      params: `LlamaForCausalLM` params in the scanned layout.

    Returns:
      The same params in the unrolled layout.

    Raises:
      ValueError: if `params` has no scanned `layers` entry.
    """
    model_params = _split_model_params(params)
    if "layers" not in model_params:
        raise ValueError("No 'layers' entry under 'model'; are they unrolled already?")
    stacked = model_params["layers"]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    unrolled_model = {
        name: value for name, value in model_params.items() if name != "layers"
    }
    for i in range(num_layers):
        unrolled_model[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return {**params, "model": unrolled_model}
