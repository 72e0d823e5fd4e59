"""Hugging Face safetensors checkpoints: loading, saving and their round trip."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

safetensors_numpy = pytest.importorskip("safetensors.numpy")

from peft_jax.models.hf_checkpoint import (  # noqa: E402
    hf_name_for_param_path,
    llama_config_to_hf_dict,
    load_hf_checkpoint,
    params_to_hf_state_dict,
    save_hf_checkpoint,
)
from peft_jax.models.llama import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    init_params,
    params_unrolled_to_scanned,
)

INPUT_IDS = np.array([[5, 200, 31, 7, 99, 0, 128, 64]], dtype=np.int32)


def random_params(config, seed=0):
    """Random params drawn with numpy (no compilation); norms are not all ones."""
    shapes = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def draw(shape):
        scale, offset = (0.1, 1.0) if len(shape.shape) == 1 else (0.05, 0.0)
        return jnp.asarray(
            offset + scale * rng.standard_normal(shape.shape), jnp.float32
        )

    return jax.tree.map(draw, shapes)


@functools.cache
def _jitted_forward(config):
    model = LlamaForCausalLM(config)
    return jax.jit(lambda params, ids: model.apply({"params": params}, ids))


def logits_of(config, params):
    return _jitted_forward(config)(params, INPUT_IDS)


def torch_state_dict(config, params):
    """The state dict PyTorch's LlamaForCausalLM would save, spelled out by hand."""
    model = params["model"]
    state = {
        "model.embed_tokens.weight": model["embed_tokens"]["embedding"],
        "model.norm.weight": model["norm"]["weight"],
    }
    for index in range(config.num_hidden_layers):
        layer = model[f"layers_{index}"]
        prefix = f"model.layers.{index}"
        for block, projections in (
            ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("mlp", ("gate_proj", "up_proj", "down_proj")),
        ):
            for projection in projections:
                # torch.nn.Linear stores (out_features, in_features).
                state[f"{prefix}.{block}.{projection}.weight"] = layer[block][
                    projection
                ]["kernel"].T
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"{prefix}.{norm}.weight"] = layer[norm]["weight"]
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = params["lm_head"]["kernel"].T
    return {
        name: np.ascontiguousarray(np.asarray(array)) for name, array in state.items()
    }


def write_hf_directory(directory, config, state_dict, hf_config=None):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(
        json.dumps(
            hf_config
            or {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "vocab_size": config.vocab_size,
                "hidden_size": config.hidden_size,
                "intermediate_size": config.intermediate_size,
                "num_hidden_layers": config.num_hidden_layers,
                "num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": config.num_key_value_heads,
                "max_position_embeddings": config.max_position_embeddings,
                "rms_norm_eps": config.rms_norm_eps,
                "rope_theta": config.rope_theta,
                "tie_word_embeddings": config.tie_word_embeddings,
                "torch_dtype": "float32",
            }
        )
    )
    safetensors_numpy.save_file(state_dict, str(directory / "model.safetensors"))
    return directory


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny_model(request):
    config = LlamaConfig.tiny(tie_word_embeddings=request.param, rms_norm_eps=1e-5)
    params = random_params(config)
    return config, params, logits_of(config, params)


class TestLoad:
    def test_hand_written_checkpoint_gives_identical_logits(self, tiny_model, tmp_path):
        config, params, expected_logits = tiny_model
        directory = write_hf_directory(
            tmp_path / "ckpt", config, torch_state_dict(config, params)
        )

        loaded_config, loaded_params = load_hf_checkpoint(directory)

        assert loaded_config == config
        jax.tree.map(np.testing.assert_array_equal, loaded_params, params)
        np.testing.assert_array_equal(
            logits_of(loaded_config, loaded_params), expected_logits
        )

    def test_scanned_and_bfloat16(self, tiny_model, tmp_path):
        config, params, _ = tiny_model
        directory = write_hf_directory(
            tmp_path / "ckpt", config, torch_state_dict(config, params)
        )

        loaded_config, loaded_params = load_hf_checkpoint(
            directory, dtype=jnp.bfloat16, scan_layers=True
        )

        assert loaded_config.scan_layers and loaded_config.dtype == jnp.bfloat16
        expected = params_unrolled_to_scanned(
            jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16), params)
        )
        jax.tree.map(np.testing.assert_array_equal, loaded_params, expected)

    def test_ignores_rotary_buffers_and_duplicate_tied_head(self, tmp_path):
        config = LlamaConfig.tiny(tie_word_embeddings=True)
        params = random_params(config)
        state = torch_state_dict(config, params)
        state["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
        state["lm_head.weight"] = state["model.embed_tokens.weight"].copy()
        directory = write_hf_directory(tmp_path / "ckpt", config, state)
        _, loaded_params = load_hf_checkpoint(directory)
        assert "lm_head" not in loaded_params

    def test_missing_directory_and_config(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="No checkpoint directory"):
            load_hf_checkpoint(tmp_path / "absent")
        with pytest.raises(FileNotFoundError, match="No config.json"):
            load_hf_checkpoint(tmp_path)

    def test_pytorch_pickles_only(self, tmp_path):
        config = LlamaConfig.tiny()
        (tmp_path / "config.json").write_text(
            json.dumps(llama_config_to_hf_dict(config))
        )
        (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02")
        with pytest.raises(FileNotFoundError, match="pytorch_model.bin.*safetensors"):
            load_hf_checkpoint(tmp_path)

    def test_shape_mismatch(self, tmp_path):
        config = LlamaConfig.tiny()
        state = torch_state_dict(config, random_params(config))
        state["model.layers.1.mlp.up_proj.weight"] = state[
            "model.layers.1.mlp.up_proj.weight"
        ].T
        directory = write_hf_directory(tmp_path / "ckpt", config, state)
        with pytest.raises(
            ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has shape"
        ):
            load_hf_checkpoint(directory)

    def test_missing_and_unexpected_tensors(self, tmp_path):
        config = LlamaConfig.tiny()
        state = torch_state_dict(config, random_params(config))
        del state["model.layers.0.self_attn.o_proj.weight"]
        directory = write_hf_directory(tmp_path / "missing", config, state)
        with pytest.raises(
            ValueError, match=r"lacks tensors \['model\.layers\.0\.self_attn"
        ):
            load_hf_checkpoint(directory)

        state = torch_state_dict(config, random_params(config))
        state["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
        directory = write_hf_directory(tmp_path / "unexpected", config, state)
        with pytest.raises(ValueError, match=r"q_proj\.bias.*no place"):
            load_hf_checkpoint(directory)

    def test_unsupported_config(self, tmp_path):
        config = LlamaConfig.tiny()
        hf_config = llama_config_to_hf_dict(config) | {"model_type": "falcon"}
        directory = write_hf_directory(
            tmp_path / "ckpt",
            config,
            torch_state_dict(config, random_params(config)),
            hf_config,
        )
        with pytest.raises(ValueError, match="model_type='falcon'"):
            load_hf_checkpoint(directory)


class TestSave:
    def test_writes_pytorch_layout_and_config(self, tiny_model, tmp_path):
        config, params, _ = tiny_model
        directory = save_hf_checkpoint(tmp_path / "out", config, params)

        stored = safetensors_numpy.load_file(str(directory / "model.safetensors"))
        expected = torch_state_dict(config, params)
        assert sorted(stored) == sorted(expected)
        for name, array in expected.items():
            np.testing.assert_array_equal(stored[name], array, err_msg=name)
        hf_config = json.loads((directory / "config.json").read_text())
        assert hf_config["architectures"] == ["LlamaForCausalLM"]
        assert hf_config["torch_dtype"] == "float32"
        assert LlamaConfig.from_hf_dict(hf_config) == config

    def test_round_trip_from_scanned_params_in_shards(self, tiny_model, tmp_path):
        config, params, expected_logits = tiny_model
        scanned = params_unrolled_to_scanned(params)
        directory = save_hf_checkpoint(
            tmp_path / "sharded", config, scanned, max_shard_bytes=64 * 1024
        )

        index = json.loads((directory / "model.safetensors.index.json").read_text())
        shard_files = sorted(set(index["weight_map"].values()))
        assert len(shard_files) > 1
        assert all((directory / name).is_file() for name in shard_files)
        assert not (directory / "model.safetensors").exists()

        loaded_config, loaded_params = load_hf_checkpoint(directory)
        np.testing.assert_array_equal(
            logits_of(loaded_config, loaded_params), expected_logits
        )

    def test_bfloat16_round_trip(self, tmp_path):
        config = LlamaConfig.tiny()
        params = random_params(config)
        directory = save_hf_checkpoint(
            tmp_path / "bf16", config, params, dtype=jnp.bfloat16
        )
        assert (
            json.loads((directory / "config.json").read_text())["torch_dtype"]
            == "bfloat16"
        )
        _, loaded = load_hf_checkpoint(directory, dtype=jnp.float32)
        expected = jax.tree.map(
            lambda leaf: leaf.astype(jnp.bfloat16).astype(jnp.float32), params
        )
        jax.tree.map(np.testing.assert_array_equal, loaded, expected)

    def test_rejects_params_that_do_not_fit(self, tmp_path):
        config = LlamaConfig.tiny()
        params = random_params(config)
        with pytest.raises(ValueError, match="do not fit the config"):
            save_hf_checkpoint(
                tmp_path / "out", LlamaConfig.tiny(num_hidden_layers=3), params
            )
        with pytest.raises(ValueError, match="has shape"):
            save_hf_checkpoint(
                tmp_path / "out", LlamaConfig.tiny(intermediate_size=96), params
            )
        assert not (tmp_path / "out").exists()


def test_param_path_names():
    assert hf_name_for_param_path(
        ("model", "layers_12", "self_attn", "k_proj", "kernel")
    ) == (
        "model.layers.12.self_attn.k_proj.weight",
        True,
    )
    assert hf_name_for_param_path(("model", "embed_tokens", "embedding")) == (
        "model.embed_tokens.weight",
        False,
    )
    assert hf_name_for_param_path(("lm_head", "kernel")) == ("lm_head.weight", True)
    with pytest.raises(ValueError, match="scanned layout"):
        hf_name_for_param_path(("model", "layers", "mlp", "up_proj", "kernel"))


def test_state_dict_is_contiguous_torch_layout():
    config = LlamaConfig.tiny()
    params = random_params(config)
    state = params_to_hf_state_dict(params)
    weight = state["model.layers.0.self_attn.q_proj.weight"]
    assert weight.shape == (
        config.num_attention_heads * config.head_dim,
        config.hidden_size,
    )
    assert weight.flags["C_CONTIGUOUS"]
