"""Tests for the reference Llama model in peft_jax.models.llama."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from peft_jax.models import (
    LlamaConfig,
    LlamaForCausalLM,
    causal_lm_loss,
    count_params,
    init_params,
    params_scanned_to_unrolled,
    params_unrolled_to_scanned,
)

BATCH, SEQ = 2, 12


def input_ids(config, seed=0, batch=BATCH, seq=SEQ):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, config.vocab_size)


def abstract_params(config):
    """Parameter shapes and dtypes, without computing any values."""
    return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))


def random_params(config, seed=0):
    """Unrolled params with O(1) logits, so numeric comparisons mean something.

    Hugging Face's 0.02-stddev init gives near-zero logits that any forward
    pass would match; here kernels are scaled by 1/sqrt(fan_in), norm weights
    are perturbed around 1 and embeddings are unit normal.
    """
    shapes = abstract_params(dataclasses.replace(config, scan_layers=False))
    rng = np.random.default_rng(seed)
    flat = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        if path[-1] == "weight":
            value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        elif path[-1] == "kernel":
            value = rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0])
        else:
            value = rng.standard_normal(leaf.shape)
        flat[path] = jnp.asarray(value, dtype=leaf.dtype)
    return traverse_util.unflatten_dict(flat)


def numpy_forward(params, config, ids, attention_mask=None):
    """Float64 NumPy Llama forward pass written from Hugging Face's formulas."""
    p = jax.tree.map(lambda x: np.asarray(x, dtype=np.float64), params)
    ids = np.asarray(ids)
    batch, seq = ids.shape
    num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.head_dim

    def rms_norm(x, weight):
        variance = np.mean(x**2, axis=-1, keepdims=True)
        return weight * (x / np.sqrt(variance + config.rms_norm_eps))

    def rotate_half(x):
        half = head_dim // 2
        return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)

    def heads(x, n):  # (batch, seq, n * head_dim) -> (batch, n, seq, head_dim)
        return x.reshape(batch, seq, n, head_dim).transpose(0, 2, 1, 3)

    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, head_dim, 2) / head_dim))
    freqs = np.outer(np.arange(seq), inv_freq)
    angles = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(angles), np.sin(angles)

    allowed = np.tril(np.ones((seq, seq), dtype=bool))[None, None]
    if attention_mask is not None:
        allowed = allowed & np.asarray(attention_mask, bool)[:, None, None, :]

    embedding = p["model"]["embed_tokens"]["embedding"]
    x = embedding[ids]
    for i in range(config.num_hidden_layers):
        layer = p["model"][f"layers_{i}"]
        attn = layer["self_attn"]
        h = rms_norm(x, layer["input_layernorm"]["weight"])
        q = heads(h @ attn["q_proj"]["kernel"], num_heads)
        k = heads(h @ attn["k_proj"]["kernel"], num_kv_heads)
        v = heads(h @ attn["v_proj"]["kernel"], num_kv_heads)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # repeat_kv: kv head j serves query heads j*n_rep .. (j+1)*n_rep - 1.
        n_rep = num_heads // num_kv_heads
        k = np.repeat(k, n_rep, axis=1)
        v = np.repeat(v, n_rep, axis=1)
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim)
        scores = np.where(allowed, scores, -np.inf)
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs = probs / probs.sum(axis=-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, -1)
        x = x + context @ attn["o_proj"]["kernel"]

        mlp = layer["mlp"]
        h = rms_norm(x, layer["post_attention_layernorm"]["weight"])
        gate = h @ mlp["gate_proj"]["kernel"]
        silu = gate / (1.0 + np.exp(-gate))
        x = x + (silu * (h @ mlp["up_proj"]["kernel"])) @ mlp["down_proj"]["kernel"]
    x = rms_norm(x, p["model"]["norm"]["weight"])
    if config.tie_word_embeddings:
        return x @ embedding.T
    return x @ p["lm_head"]["kernel"]


@functools.partial(jax.jit, static_argnames=("config", "deterministic"))
def apply(
    config,
    params,
    ids,
    attention_mask=None,
    positions=None,
    deterministic=True,
    rngs=None,
):
    """Jitted `LlamaForCausalLM(config).apply`; one compile per config and shape."""
    return LlamaForCausalLM(config).apply(
        {"params": params}, ids, attention_mask, positions, deterministic, rngs=rngs
    )


TINY_LAYER_PATHS = {
    "input_layernorm/weight": (64,),
    "self_attn/q_proj/kernel": (64, 64),
    "self_attn/k_proj/kernel": (64, 32),
    "self_attn/v_proj/kernel": (64, 32),
    "self_attn/o_proj/kernel": (64, 64),
    "post_attention_layernorm/weight": (64,),
    "mlp/gate_proj/kernel": (64, 128),
    "mlp/up_proj/kernel": (64, 128),
    "mlp/down_proj/kernel": (128, 64),
}


def param_shapes(params):
    flat = traverse_util.flatten_dict(params, sep="/")
    return {path: leaf.shape for path, leaf in flat.items()}


def test_unrolled_param_paths_follow_hugging_face_naming():
    params = abstract_params(LlamaConfig.tiny())
    expected = {
        "model/embed_tokens/embedding": (256, 64),
        "model/norm/weight": (64,),
        "lm_head/kernel": (64, 256),
    }
    for i in range(2):
        for path, shape in TINY_LAYER_PATHS.items():
            expected[f"model/layers_{i}/{path}"] = shape
    assert param_shapes(params) == expected
    assert count_params(params) == 106_816
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_scanned_params_stack_layers_on_a_leading_axis():
    params = abstract_params(LlamaConfig.tiny(scan_layers=True))
    expected = {
        "model/embed_tokens/embedding": (256, 64),
        "model/norm/weight": (64,),
        "lm_head/kernel": (64, 256),
    }
    for path, shape in TINY_LAYER_PATHS.items():
        expected[f"model/layers/{path}"] = (2, *shape)
    assert param_shapes(params) == expected


def test_tied_embeddings_have_no_lm_head():
    config = LlamaConfig.tiny(tie_word_embeddings=True)
    params = abstract_params(config)
    assert "lm_head" not in params
    assert count_params(params) == 106_816 - 64 * 256


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # grouped-query attention, 2 query heads per kv head
        dict(num_key_value_heads=4),  # multi-head attention
        dict(num_key_value_heads=1),  # multi-query attention
        dict(tie_word_embeddings=True, rope_theta=100000.0, head_dim=8),
    ],
    ids=["gqa", "mha", "mqa", "tied-theta-headdim"],
)
def test_forward_matches_float64_numpy_oracle(overrides):
    config = LlamaConfig.tiny(**overrides)
    params = random_params(config)
    ids = input_ids(config)
    logits = apply(config, params, ids)
    assert logits.shape == (BATCH, SEQ, config.vocab_size)
    assert logits.dtype == jnp.float32
    expected = numpy_forward(params, config, ids)
    assert np.abs(expected).max() > 1.0  # the comparison is not between near-zeros
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_padding_mask_matches_oracle_and_hides_padded_keys():
    config = LlamaConfig.tiny()
    params = random_params(config)
    ids = input_ids(config)
    attention_mask = np.ones((BATCH, SEQ), np.int32)
    attention_mask[1, 8:] = 0  # right padding on the second sequence
    logits = apply(config, params, ids, attention_mask=jnp.asarray(attention_mask))
    np.testing.assert_allclose(
        logits, numpy_forward(params, config, ids, attention_mask), atol=1e-4, rtol=1e-4
    )
    unpadded = apply(config, params, ids[1:, :8])
    np.testing.assert_allclose(logits[1, :8], unpadded[0], atol=1e-5, rtol=1e-5)


def test_left_padding_with_shifted_positions_matches_unpadded():
    config = LlamaConfig.tiny()
    params = random_params(config)
    ids = input_ids(config, batch=1)
    pad = 3
    padding = jnp.zeros((1, pad), ids.dtype)
    padded_ids = jnp.concatenate([padding, ids[:, : SEQ - pad]], axis=1)
    attention_mask = jnp.arange(SEQ)[None] >= pad
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
    logits = apply(
        config, params, padded_ids, attention_mask=attention_mask, positions=positions
    )
    expected = apply(config, params, ids[:, : SEQ - pad])
    np.testing.assert_allclose(logits[:, pad:], expected, atol=1e-5, rtol=1e-5)
    assert np.isfinite(np.asarray(logits)).all()


def test_default_positions_read_rotary_tables_instead_of_computing_them():
    # XLA fuses a traced cos/sin into every consumer (recomputed per element of
    # every query and key); the default positions use host-computed tables.
    config = LlamaConfig.tiny()
    params = random_params(config)
    ids = input_ids(config, batch=1)
    grad = jax.jit(jax.grad(
        lambda p, pos: jnp.sum(LlamaForCausalLM(config).apply({"params": p}, ids, None, pos)),
        argnums=0), static_argnums=1)

    def hlo(positions):
        return grad.lower(params, positions).compile().as_text()

    assert "cosine(" not in hlo(None) and "sine(" not in hlo(None)
    explicit = jax.jit(jax.grad(
        lambda p, pos: jnp.sum(LlamaForCausalLM(config).apply({"params": p}, ids, None, pos))))
    assert "cosine(" in explicit.lower(params, jnp.arange(SEQ)).compile().as_text()


def _transposed_shapes(jaxpr):
    """Output shapes of every `transpose` in a jaxpr, sub-jaxprs included."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "transpose":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes += _transposed_shapes(inner)
    return shapes


def test_attention_scores_and_probabilities_are_never_transposed():
    # Scores are laid out (batch, kv head, query, group, key), the order the
    # query-key product yields, so neither the forward nor the backward pass
    # transposes an array of scores (a copy per layer on XLA:CPU).
    config = LlamaConfig.tiny()
    params = random_params(config)
    ids = input_ids(config, batch=1)
    seq, heads = ids.shape[1], config.num_attention_heads
    assert config.num_key_value_heads < heads  # grouped queries

    def loss(p):
        return jnp.sum(LlamaForCausalLM(config).apply({"params": p}, ids))

    transposed = _transposed_shapes(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    assert transposed  # the walk sees the model's other transposes
    scores = [s for s in transposed if len(s) == 5 and np.prod(s) == heads * seq * seq]
    assert not scores, scores


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    config = LlamaConfig.tiny()
    params = random_params(config)
    ids = input_ids(config)
    changed = 7
    edited = ids.at[:, changed].set((ids[:, changed] + 1) % config.vocab_size)
    logits, edited_logits = apply(config, params, ids), apply(config, params, edited)
    np.testing.assert_array_equal(logits[:, :changed], edited_logits[:, :changed])
    assert np.abs(logits[:, changed:] - edited_logits[:, changed:]).max() > 1e-3


def test_unrolled_and_scanned_layouts_give_the_same_logits():
    unrolled_config = LlamaConfig.tiny()
    scanned_config = LlamaConfig.tiny(scan_layers=True)
    params = random_params(unrolled_config)
    scanned = params_unrolled_to_scanned(params)
    assert param_shapes(scanned) == param_shapes(abstract_params(scanned_config))
    ids = input_ids(unrolled_config)
    np.testing.assert_allclose(
        apply(unrolled_config, params, ids),
        apply(scanned_config, scanned, ids),
        atol=1e-5,
        rtol=1e-5,
    )
    chex.assert_trees_all_equal(params_scanned_to_unrolled(scanned), params)


def test_layout_conversion_rejects_the_wrong_layout():
    params = random_params(LlamaConfig.tiny())
    with pytest.raises(ValueError, match="unrolled already"):
        params_scanned_to_unrolled(params)
    with pytest.raises(ValueError, match="scanned already"):
        params_unrolled_to_scanned(params_unrolled_to_scanned(params))
    with pytest.raises(ValueError, match="'model'"):
        params_unrolled_to_scanned(params["model"])


@pytest.mark.parametrize(
    "scan_layers, remat_policy",
    [(False, None), (True, "dots_with_no_batch_dims_saveable")],
    ids=["unrolled", "scanned"],
)
def test_remat_gives_the_same_logits_and_gradients(scan_layers, remat_policy):
    base_config = LlamaConfig.tiny(scan_layers=scan_layers)
    remat_config = dataclasses.replace(base_config, remat=True, remat_policy=remat_policy)
    params = random_params(base_config)
    if scan_layers:
        params = params_unrolled_to_scanned(params)
    ids = input_ids(base_config)

    def loss_and_grads(config):
        def loss(params):
            return causal_lm_loss(apply(config, params, ids[:, :-1]), ids[:, 1:])

        return jax.jit(jax.value_and_grad(loss))(params)

    jaxpr = str(jax.make_jaxpr(lambda params: apply(remat_config, params, ids))(params))
    assert "remat" in jaxpr
    # Scan already blocks CSE across its loop boundary; unrolled layers need it.
    assert f"prevent_cse={not scan_layers}" in jaxpr
    expected_loss, expected_grads = loss_and_grads(base_config)
    loss, grads = loss_and_grads(remat_config)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    chex.assert_trees_all_close(grads, expected_grads, atol=1e-6, rtol=1e-5)


def test_bfloat16_compute_is_close_to_float32():
    config = LlamaConfig.tiny()
    params = random_params(config)
    ids = input_ids(config)
    reference = apply(config, params, ids)
    bf16_config = dataclasses.replace(config, dtype=jnp.bfloat16)
    logits = apply(bf16_config, params, ids)
    assert logits.dtype == jnp.float32
    error = np.abs(np.asarray(logits) - np.asarray(reference)).max()
    assert error < 0.05 * np.abs(reference).max()
    assert np.mean(np.argmax(logits, -1) == np.argmax(reference, -1)) > 0.9


def test_bfloat16_params_are_stored_in_bfloat16():
    config = LlamaConfig.tiny(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    params = init_params(config, jax.random.key(0))
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    logits = apply(config, params, input_ids(config))
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_attention_dropout_applies_only_when_not_deterministic():
    config = LlamaConfig.tiny(attention_dropout=0.5)
    params = random_params(config)
    ids = input_ids(config)
    rngs = {"dropout": jax.random.key(1)}
    reference = apply(config, params, ids, rngs=rngs)
    np.testing.assert_allclose(
        reference, numpy_forward(params, config, ids), atol=1e-4, rtol=1e-4
    )
    dropped = apply(config, params, ids, deterministic=False, rngs=rngs)
    assert np.abs(dropped - reference).max() > 1e-3


def test_causal_lm_loss_matches_numpy_and_respects_mask():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
    labels = rng.integers(0, 7, (2, 5))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    token_losses = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(
        causal_lm_loss(logits, labels), token_losses.mean(), rtol=1e-5
    )
    mask = np.zeros((2, 5))
    mask[0, :3] = 1
    np.testing.assert_allclose(
        causal_lm_loss(logits, labels, mask), token_losses[0, :3].mean(), rtol=1e-5
    )
    assert causal_lm_loss(logits, labels, np.zeros((2, 5))) == 0.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(remat=True, remat_policy="save_everything"), "remat_policy"),
        (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
        (dict(head_dim=7), "even"),
    ],
)
def test_invalid_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.tiny(**overrides)


SMOLLM2_135M_CONFIG_JSON = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "hidden_act": "silu",
    "hidden_size": 576,
    "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536,
    "is_llama_config": True,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_interleaved": False,
    "rope_scaling": None,
    "rope_theta": 100000,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_cache": True,
    "vocab_size": 49152,
}


def test_from_hf_dict_reads_the_smollm2_config():
    config = LlamaConfig.from_hf_dict(SMOLLM2_135M_CONFIG_JSON)
    assert config == LlamaConfig.smollm2_135m()
    assert config.head_dim == 64
    scanned = LlamaConfig.from_hf_dict(SMOLLM2_135M_CONFIG_JSON, scan_layers=True)
    assert scanned.scan_layers


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(model_type="phi3"), "model_type"),
        (dict(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_from_hf_dict_rejects_unsupported_configs(change, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf_dict(SMOLLM2_135M_CONFIG_JSON | change)


def test_from_hf_dict_reports_missing_keys():
    hf_config = dict(SMOLLM2_135M_CONFIG_JSON)
    del hf_config["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        LlamaConfig.from_hf_dict(hf_config)


def test_preset_sizes():
    smollm2 = abstract_params(LlamaConfig.smollm2_135m(scan_layers=True))
    assert count_params(smollm2) == 134_515_008
    bench = abstract_params(LlamaConfig.bench(scan_layers=True))
    assert 30e6 <= count_params(bench) <= 60e6
