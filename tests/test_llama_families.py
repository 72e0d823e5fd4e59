"""Qwen2 (q/k/v biases) and Mistral (sliding window) checkpoints in the reference Llama.

The tiny random checkpoints and their logits were written by transformers
(tests/data/make_hf_tiny_references.py).
"""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax.models.hf_checkpoint import (
    llama_config_to_hf_dict,
    load_hf_checkpoint,
    read_hf_checkpoint,
    save_hf_checkpoint,
)
from peft_jax.models.llama import LlamaConfig, LlamaForCausalLM

HF_TINY = pathlib.Path(__file__).parent / "data" / "hf_tiny"


def _logits(config, params, reference):
    return np.asarray(
        LlamaForCausalLM(config).apply(
            {"params": params},
            jnp.asarray(reference["input_ids"]),
            jnp.asarray(reference["attention_mask"]),
            jnp.asarray(reference["positions"]),
        )
    )


def _assert_matches(logits, reference):
    real = np.asarray(reference["attention_mask"], bool)
    expected = np.asarray(reference["logits"], np.float32)
    np.testing.assert_allclose(logits[real], expected[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_logits_match_transformers(family, scan_layers):
    config, params = load_hf_checkpoint(HF_TINY / family, scan_layers=scan_layers)
    reference = json.loads((HF_TINY / family / "reference.json").read_text())
    _assert_matches(_logits(config, params, reference), reference)


def test_config_mapping():
    qwen2, _ = load_hf_checkpoint(HF_TINY / "qwen2")
    assert (qwen2.qkv_bias, qwen2.o_proj_bias, qwen2.sliding_window) == (True, False, None)
    assert qwen2.rope_theta == 1000.0  # from transformers 5's rope_parameters
    mistral, params = load_hf_checkpoint(HF_TINY / "mistral")
    assert (mistral.qkv_bias, mistral.sliding_window, mistral.head_dim) == (False, 4, 8)
    assert "bias" not in params["model"]["layers_0"]["self_attn"]["q_proj"]


def test_the_window_and_the_biases_change_the_numbers():
    # Without them the reference logits are missed: the test above can fail.
    for family, override in (("mistral", dict(sliding_window=None)),):
        config, params = load_hf_checkpoint(HF_TINY / family, **override)
        reference = json.loads((HF_TINY / family / "reference.json").read_text())
        with pytest.raises(AssertionError):
            _assert_matches(_logits(config, params, reference), reference)
    config, params = load_hf_checkpoint(HF_TINY / "qwen2")
    reference = json.loads((HF_TINY / "qwen2" / "reference.json").read_text())
    for projection in ("q_proj", "k_proj", "v_proj"):
        bias = params["model"]["layers_0"]["self_attn"][projection]["bias"]
        params["model"]["layers_0"]["self_attn"][projection]["bias"] = jnp.zeros_like(bias)
    with pytest.raises(AssertionError):
        _assert_matches(_logits(config, params, reference), reference)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_save_writes_the_same_family_back(tmp_path, family):
    config, params = load_hf_checkpoint(HF_TINY / family)
    save_hf_checkpoint(tmp_path, config, params)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == family
    reloaded_config, reloaded = load_hf_checkpoint(tmp_path)
    assert reloaded_config == config
    _, original = read_hf_checkpoint(HF_TINY / family)
    _, saved = read_hf_checkpoint(tmp_path)
    assert sorted(original) == sorted(saved)
    for name in original:
        np.testing.assert_array_equal(original[name], saved[name])


def test_unsupported_family_settings_are_errors():
    base = json.loads((HF_TINY / "qwen2" / "config.json").read_text())
    with pytest.raises(ValueError, match="use_sliding_window=True"):
        LlamaConfig.from_hf_dict(base | {"use_sliding_window": True})
    with pytest.raises(ValueError, match="model_type='gemma'"):
        LlamaConfig.from_hf_dict(base | {"model_type": "gemma"})
    with pytest.raises(ValueError, match="rope_type"):
        LlamaConfig.from_hf_dict(
            base | {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}
        )
    with pytest.raises(ValueError, match="o_proj bias without"):
        llama_config_to_hf_dict(LlamaConfig.tiny(o_proj_bias=True))
    with pytest.raises(ValueError, match="biases and a sliding window"):
        llama_config_to_hf_dict(LlamaConfig.tiny(qkv_bias=True, sliding_window=4))
