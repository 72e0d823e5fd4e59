"""The Gemma 3 text decoder in Flax NNX.

Gemma 3 differs from Llama in ways that all change the numbers:

* the token embedding is multiplied by `sqrt(hidden_size)` and tied to the
  output layer;
* every RMSNorm scales by `1 + weight` (weights start at zero);
* each block has four norms: before and after attention, before and after
  the feed-forward layer (the residual adds the post-normed output);
* queries and keys are RMS-normalised per head (`q_norm`, `k_norm`) before the
  rotary embedding, and scores are scaled by `query_pre_attn_scalar ** -0.5`;
* the feed-forward layer is GeGLU, `down(gelu_tanh(gate(x)) * up(x))`;
* layers alternate between local attention (a causal sliding window, rotary
  base `rope_local_theta`) and global attention (full causal, rotary base
  `rope_theta`), five local to one global by default.

The module tree and names follow Hugging Face's `Gemma3ForCausalLM`
(`model/layers/3/self_attn/q_proj/kernel` for
`model.layers.3.self_attn.q_proj.weight`), and every projection is a plain
`nnx.Linear`, the embedding a plain `nnx.Embed`. The layers are unrolled (an
`nnx.List`): on CPU this compiles in seconds and lets each layer take its own
attention kind without a traced switch.

Example:
  >>> config = Gemma3Config.tiny()
  >>> model = Gemma3ForCausalLM(config, rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((1, 5), jnp.int32)).shape
  (1, 5, 256)

References:
  Gemma Team, "Gemma 3 Technical Report", 2025.
  Shazeer, "GLU Variants Improve Transformer", 2020.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from peft_jax.models.llama import _default_rotary_tables, apply_rotary

__all__ = [
    "FULL_ATTENTION",
    "SLIDING_ATTENTION",
    "Gemma3Config",
    "Gemma3RMSNorm",
    "Gemma3Attention",
    "Gemma3MLP",
    "Gemma3DecoderLayer",
    "Gemma3Model",
    "Gemma3ForCausalLM",
    "gemma3_abstract_params",
    "gemma3_from_params",
    "gemma3_param_shapes",
    "gemma3_params",
]

SLIDING_ATTENTION = "sliding_attention"
FULL_ATTENTION = "full_attention"
_LAYER_TYPES = (SLIDING_ATTENTION, FULL_ATTENTION)

# Hugging Face's initializer_range default for Gemma 3.
_INIT_STDDEV = 0.02


def _default_layer_types(num_layers: int, pattern: int) -> tuple[str, ...]:
    # Hugging Face's and llama.cpp's rule: every `pattern`-th layer is global.
    return tuple(
        SLIDING_ATTENTION if (index + 1) % pattern else FULL_ATTENTION
        for index in range(num_layers)
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma3Config:
    """Architecture and execution settings of a Gemma 3 text decoder.

    Attributes:
      vocab_size: number of token ids.
      hidden_size: width of the residual stream.
      intermediate_size: width of the GeGLU feed-forward layer.
      num_hidden_layers: number of decoder layers.
      num_attention_heads: number of query heads.
      num_key_value_heads: number of key/value heads; must divide
        `num_attention_heads`.
      head_dim: width of one head (256 in every Gemma 3).
      rms_norm_eps: epsilon inside the RMSNorm square root.
      rope_theta: rotary base of the global layers.
      rope_local_theta: rotary base of the sliding-window layers.
      rope_scaling_factor: linear rotary position scaling of the global
        layers (1.0: none; Gemma 3 4B and larger use 8.0).
      sliding_window: a local layer's query sees the keys at most
        `sliding_window - 1` positions back (and itself).
      layer_types: `"sliding_attention"` or `"full_attention"` per layer;
        `None` makes every sixth layer global.
      query_pre_attn_scalar: attention scores are scaled by its inverse
        square root.
      final_logit_softcapping: `c * tanh(logit / c)` on the output logits,
        or `None`. (Gemma 3 has no attention-score softcapping: transformers
        and llama.cpp ignore a config's `attn_logit_softcapping`, and so does
        `from_hf_dict`.)
      max_position_embeddings: longest context of the model (informational).
      dtype: compute dtype of activations.
      param_dtype: storage dtype of parameters.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_local_theta: float = 10_000.0
    rope_scaling_factor: float = 1.0
    sliding_window: int = 512
    layer_types: tuple[str, ...] | None = None
    query_pre_attn_scalar: float = 256.0
    final_logit_softcapping: float | None = None
    max_position_embeddings: int = 32768
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.layer_types is None:
            object.__setattr__(
                self, "layer_types", _default_layer_types(self.num_hidden_layers, 6)
            )
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for "
                f"num_hidden_layers={self.num_hidden_layers}."
            )
        unknown = sorted(set(self.layer_types) - set(_LAYER_TYPES))
        if unknown:
            raise ValueError(f"Unknown layer types {unknown}; expected {_LAYER_TYPES}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a "
                f"multiple of num_key_value_heads={self.num_key_value_heads}."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings.")
        if self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be positive.")

    @classmethod
    def gemma3_270m(cls, **overrides) -> Gemma3Config:
        """The architecture of google/gemma-3-270m (268,098,176 params)."""
        settings = dict(
            vocab_size=262144,
            hidden_size=640,
            intermediate_size=2048,
            num_hidden_layers=18,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            max_position_embeddings=32768,
        )
        return cls(**(settings | overrides))

    @classmethod
    def tiny(cls, **overrides) -> Gemma3Config:
        """A 3-layer model (two local layers, one global) for unit tests."""
        settings = dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            sliding_window=4,
            layer_types=(SLIDING_ATTENTION, SLIDING_ATTENTION, FULL_ATTENTION),
            query_pre_attn_scalar=32.0,
            max_position_embeddings=128,
        )
        return cls(**(settings | overrides))

    @classmethod
    def from_hf_dict(cls, hf_config: Mapping[str, Any], **overrides) -> Gemma3Config:
        """Reads a Hugging Face `Gemma3TextConfig` (`model_type: gemma3_text`) dictionary.

        Both spellings of the rotary settings are read: transformers 5's
        `rope_parameters` (one entry per layer type) and transformers 4's
        `rope_theta`, `rope_local_base_freq` and `rope_scaling`.

        Args:
          hf_config: the parsed `config.json`.
          **overrides: fields of this class that replace what the file says
            (e.g. `dtype`).

        Returns:
          The matching `Gemma3Config`.

        Raises:
          ValueError: if a required key is missing or the file describes a
            variant this model does not implement (another model type or
            activation, bidirectional attention, biases, a rotary scaling
            other than linear).
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
        unsupported = {
            "model_type": (hf_config.get("model_type", "gemma3_text"), "gemma3_text"),
            "hidden_activation": (
                hf_config.get("hidden_activation", "gelu_pytorch_tanh"),
                "gelu_pytorch_tanh",
            ),
            "use_bidirectional_attention": (
                bool(hf_config.get("use_bidirectional_attention") or False),
                False,
            ),
            "attention_bias": (hf_config.get("attention_bias", False), False),
            "tie_word_embeddings": (hf_config.get("tie_word_embeddings", True), True),
        }
        for key, (found, supported) in unsupported.items():
            if found != supported:
                raise ValueError(
                    f"Hugging Face config has {key}={found!r}; this model "
                    f"supports only {supported!r}."
                )
        rope = _hf_rope_settings(hf_config)
        num_layers = int(hf_config["num_hidden_layers"])
        layer_types = hf_config.get("layer_types") or _default_layer_types(
            num_layers, int(hf_config.get("sliding_window_pattern", 6))
        )
        settings = {key: int(hf_config[key]) for key in required}
        settings.update(
            rope,
            num_key_value_heads=int(hf_config.get("num_key_value_heads", 1)),
            head_dim=int(hf_config.get("head_dim", 256)),
            rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
            sliding_window=int(hf_config.get("sliding_window", 4096)),
            layer_types=tuple(layer_types),
            query_pre_attn_scalar=float(hf_config.get("query_pre_attn_scalar", 256)),
            final_logit_softcapping=_optional_float(
                hf_config.get("final_logit_softcapping")
            ),
            max_position_embeddings=int(
                hf_config.get("max_position_embeddings", 131072)
            ),
        )
        return cls(**(settings | overrides))


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def _hf_rope_settings(hf_config: Mapping[str, Any]) -> dict[str, float]:
    """rope_theta, rope_local_theta and rope_scaling_factor from either spelling."""
    parameters = hf_config.get("rope_parameters")
    if parameters is not None and FULL_ATTENTION in parameters:
        full = dict(parameters[FULL_ATTENTION] or {})
        local = dict(parameters.get(SLIDING_ATTENTION) or {})
    else:
        full = dict(hf_config.get("rope_scaling") or {})
        full.setdefault("rope_theta", hf_config.get("rope_theta", 1_000_000.0))
        local = {
            "rope_type": "default",
            "rope_theta": hf_config.get("rope_local_base_freq", 10_000.0),
        }
    settings = {}
    for name, entry in (("full_attention", full), ("sliding_attention", local)):
        rope_type = entry.get("rope_type", entry.get("type", "default"))
        if rope_type not in ("default", "linear") or (
            rope_type == "linear" and name == SLIDING_ATTENTION
        ):
            raise ValueError(
                f"Hugging Face config has rotary scaling {rope_type!r} for "
                f"{name} layers; only 'default' (and 'linear' for global "
                "layers) is supported."
            )
    settings["rope_theta"] = float(full.get("rope_theta", 1_000_000.0))
    settings["rope_local_theta"] = float(local.get("rope_theta", 10_000.0))
    settings["rope_scaling_factor"] = float(full.get("factor", 1.0))
    return settings


def _linear(config: Gemma3Config, features_in: int, features_out: int, rngs):
    return nnx.Linear(
        features_in,
        features_out,
        use_bias=False,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nnx.initializers.normal(_INIT_STDDEV),
        rngs=rngs,
    )


class Gemma3RMSNorm(nnx.Module):
    """`(1 + weight) * x / sqrt(mean(x**2) + eps)`, statistics in float32."""

    def __init__(self, dim: int, *, eps: float, param_dtype: Any = jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean_square = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        normed = x32 * jax.lax.rsqrt(mean_square + self.eps)
        return (normed * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


class Gemma3Attention(nnx.Module):
    """Grouped-query attention with q/k norms; the caller picks the mask and rotary angles."""

    def __init__(self, config: Gemma3Config, *, rngs: nnx.Rngs):
        self.config = config
        hidden, head_dim = config.hidden_size, config.head_dim
        self.q_proj = _linear(config, hidden, config.num_attention_heads * head_dim, rngs)
        self.k_proj = _linear(config, hidden, config.num_key_value_heads * head_dim, rngs)
        self.v_proj = _linear(config, hidden, config.num_key_value_heads * head_dim, rngs)
        self.o_proj = _linear(config, config.num_attention_heads * head_dim, hidden, rngs)
        self.q_norm = Gemma3RMSNorm(
            head_dim, eps=config.rms_norm_eps, param_dtype=config.param_dtype
        )
        self.k_norm = Gemma3RMSNorm(
            head_dim, eps=config.rms_norm_eps, param_dtype=config.param_dtype
        )

    def __call__(
        self, hidden: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array
    ) -> jax.Array:
        config = self.config
        batch, seq, _ = hidden.shape
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = config.head_dim
        group_size = num_heads // num_kv_heads

        query = self.q_proj(hidden).reshape(batch, seq, num_heads, head_dim)
        key = self.k_proj(hidden).reshape(batch, seq, num_kv_heads, head_dim)
        value = self.v_proj(hidden).reshape(batch, seq, num_kv_heads, head_dim)
        query = apply_rotary(self.q_norm(query), cos, sin)
        key = apply_rotary(self.k_norm(key), cos, sin)

        # Query head h reads key/value head h // group_size. Scores are
        # (batch, kv head, query, group, key), the product's own output order:
        # XLA:CPU copies no transposed scores or probabilities.
        query = query.reshape(batch, seq, num_kv_heads, group_size, head_dim)
        scores = jnp.einsum("bqgrd,bkgd->bgqrk", query, key).astype(jnp.float32)
        scores = scores * config.query_pre_attn_scalar**-0.5
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
        out = jnp.einsum("bgqrk,bkgd->bqgrd", probs, value)
        return self.o_proj(out.reshape(batch, seq, num_heads * head_dim))


class Gemma3MLP(nnx.Module):
    """GeGLU feed-forward layer, `down(gelu_tanh(gate(x)) * up(x))`."""

    def __init__(self, config: Gemma3Config, *, rngs: nnx.Rngs):
        hidden, intermediate = config.hidden_size, config.intermediate_size
        self.gate_proj = _linear(config, hidden, intermediate, rngs)
        self.up_proj = _linear(config, hidden, intermediate, rngs)
        self.down_proj = _linear(config, intermediate, hidden, rngs)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        gate = jax.nn.gelu(self.gate_proj(hidden), approximate=True)
        return self.down_proj(gate * self.up_proj(hidden))


class Gemma3DecoderLayer(nnx.Module):
    """Attention and GeGLU blocks, each wrapped in a pre-norm and a post-norm."""

    def __init__(self, config: Gemma3Config, layer_type: str, *, rngs: nnx.Rngs):
        self.layer_type = layer_type

        def norm():
            return Gemma3RMSNorm(
                config.hidden_size, eps=config.rms_norm_eps, param_dtype=config.param_dtype
            )

        self.input_layernorm = norm()
        self.self_attn = Gemma3Attention(config, rngs=rngs)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = Gemma3MLP(config, rngs=rngs)
        self.post_feedforward_layernorm = norm()

    def __call__(
        self, hidden: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array
    ) -> jax.Array:
        attended = self.self_attn(self.input_layernorm(hidden), mask, cos, sin)
        hidden = hidden + self.post_attention_layernorm(attended)
        mixed = self.mlp(self.pre_feedforward_layernorm(hidden))
        return hidden + self.post_feedforward_layernorm(mixed)


def _rotary_cos_sin(
    positions: jax.Array, head_dim: int, theta: float, scaling_factor: float
) -> tuple[jax.Array, jax.Array]:
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * (inv_freq / scaling_factor)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _rotary(
    positions: jax.Array, default: bool, head_dim: int, theta: float, scaling_factor: float
) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables; for the default positions `0 .. seq-1` NumPy constants.

    Traced, cos/sin of an iota were fused into every consumer by XLA: each
    element of every query and key (and of their gradients) recomputed two
    transcendentals in each of the 18 layers (270M LoRA body, forward +
    backward: ~0.5 s of op time per call; see `benchmarks/bench_gemma_body.py`).
    """
    if default and scaling_factor == 1.0:
        cos, sin = _default_rotary_tables(positions.shape[-1], head_dim, theta)
        return jnp.asarray(cos), jnp.asarray(sin)
    return _rotary_cos_sin(positions, head_dim, theta, scaling_factor)


class Gemma3Model(nnx.Module):
    """Scaled token embedding, decoder layers and the final norm."""

    def __init__(self, config: Gemma3Config, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            embedding_init=nnx.initializers.normal(_INIT_STDDEV),
            rngs=rngs,
        )
        self.layers = nnx.List(
            [Gemma3DecoderLayer(config, kind, rngs=rngs) for kind in config.layer_types]
        )
        self.norm = Gemma3RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps, param_dtype=config.param_dtype
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Final-norm hidden states (batch, seq, hidden); arguments as `Gemma3ForCausalLM`."""
        config = self.config
        seq = input_ids.shape[-1]
        default_positions = positions is None
        if positions is None:
            positions = jnp.arange(seq)
        positions = jnp.broadcast_to(positions, input_ids.shape)
        query_index = jnp.arange(seq)[:, None]
        key_index = jnp.arange(seq)[None, :]
        causal = key_index <= query_index
        masks = {
            FULL_ATTENTION: causal,
            SLIDING_ATTENTION: causal & (query_index - key_index < config.sliding_window),
        }
        # Scores are (batch, kv_heads, query, group, key).
        masks = {kind: mask[None, None, :, None] for kind, mask in masks.items()}
        if attention_mask is not None:
            keys = attention_mask.astype(bool)[:, None, None, None, :]
            masks = {kind: mask & keys for kind, mask in masks.items()}
        rotary = {
            FULL_ATTENTION: _rotary(
                positions, default_positions, config.head_dim, config.rope_theta,
                config.rope_scaling_factor,
            ),
            SLIDING_ATTENTION: _rotary(
                positions, default_positions, config.head_dim, config.rope_local_theta, 1.0
            ),
        }

        hidden = self.embed_tokens(input_ids)
        hidden = hidden * jnp.asarray(math.sqrt(config.hidden_size), hidden.dtype)
        for layer in self.layers:
            cos, sin = rotary[layer.layer_type]
            hidden = layer(hidden, masks[layer.layer_type], cos, sin)
        return self.norm(hidden)


class Gemma3ForCausalLM(nnx.Module):
    """A Gemma 3 decoder whose output layer is the transposed token embedding.

    Attributes:
      config: the architecture and execution settings.
      model: the decoder (`embed_tokens`, `layers`, `norm`).
    """

    def __init__(self, config: Gemma3Config, *, rngs: nnx.Rngs):
        self.config = config
        self.model = Gemma3Model(config, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Next-token logits.

        Args:
          input_ids: int (batch, seq) token ids.
          attention_mask: optional (batch, seq) of 1 for real tokens and 0 for
            padding; padded keys are hidden from every query.
          positions: optional rotary positions, (batch, seq) or (seq,);
            defaults to `0 .. seq-1`.

        Returns:
          float32 logits of shape (batch, seq, vocab_size).
        """
        hidden = self.model(input_ids, attention_mask, positions)
        logits = self.model.embed_tokens.attend(hidden).astype(jnp.float32)
        return _softcap(logits, self.config.final_logit_softcapping)


def gemma3_abstract_params(config: Gemma3Config) -> dict[str, Any]:
    """The params tree of `Gemma3ForCausalLM(config)` as shape structs, nothing allocated.

    Keys are module names, and layer indices as ints:
    `{"model": {"layers": {0: {"self_attn": {"q_proj": {"kernel": ...}}}}}}`.
    """
    abstract = nnx.eval_shape(lambda: Gemma3ForCausalLM(config, rngs=nnx.Rngs(0)))
    return nnx.state(abstract, nnx.Param).to_pure_dict()


def gemma3_param_shapes(config: Gemma3Config) -> dict[tuple, tuple[int, ...]]:
    """Path (`("model", "layers", 0, "mlp", "up_proj", "kernel")`) -> shape of every param."""
    return {
        path: tuple(leaf.shape)
        for path, leaf in _flat(gemma3_abstract_params(config)).items()
    }


def gemma3_params(model: Gemma3ForCausalLM) -> dict[str, Any]:
    """The model's params as a nested dict of arrays (the layout `gemma3_from_params` takes)."""
    return nnx.state(model, nnx.Param).to_pure_dict()


def gemma3_from_params(config: Gemma3Config, params: Mapping[str, Any]) -> Gemma3ForCausalLM:
    """Builds `Gemma3ForCausalLM(config)` holding `params`, without random initialisation.

    Args:
      config: the architecture.
      params: a nested dict with every param of the model (see
        `gemma3_abstract_params`), arrays of the right shapes.

    Returns:
      The model.

    Raises:
      ValueError: if a param is missing, unexpected, or has the wrong shape.
    """
    expected = gemma3_param_shapes(config)
    given = _flat(params)
    missing = sorted(set(expected) - set(given), key=str)
    unexpected = sorted(set(given) - set(expected), key=str)
    if missing or unexpected:
        raise ValueError(
            f"Params do not fit Gemma3ForCausalLM: missing {_names(missing)}, "
            f"unexpected {_names(unexpected)}."
        )
    for path, leaf in given.items():
        if tuple(leaf.shape) != expected[path]:
            raise ValueError(
                f"Param {'/'.join(map(str, path))} has shape {tuple(leaf.shape)}; "
                f"the config needs {expected[path]}."
            )
    abstract = nnx.eval_shape(lambda: Gemma3ForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(
        state, jax.tree.map(lambda leaf: jnp.asarray(leaf, config.param_dtype), params)
    )
    return nnx.merge(graphdef, state)


def _flat(tree: Mapping[str, Any]) -> dict[tuple, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(entry.key for entry in path): leaf for path, leaf in flat}


def _names(paths: list[tuple]) -> list[str]:
    names = ["/".join(map(str, path)) for path in paths[:8]]
    return names + ([f"... {len(paths) - 8} more"] if len(paths) > 8 else [])
