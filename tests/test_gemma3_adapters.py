"""Adapters on the NNX Gemma 3 through peft_jax.nnx: train, QLoRA, merge, PEFT files.

The model knows nothing of adapters; these tests show its plain NNX
built-ins are what `peft_jax.nnx` adapts.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peft_jax as pj
from peft_jax.models.gemma3 import Gemma3Config, Gemma3ForCausalLM
from peft_jax.models.gemma3_checkpoint import load_gemma3_hf
from peft_jax.models.llama import causal_lm_loss

DATA = pathlib.Path(__file__).parent / "data"


def _model():
    return Gemma3ForCausalLM(Gemma3Config.tiny(), rngs=nnx.Rngs(0))


def _batch():
    ids = jax.random.randint(jax.random.key(1), (2, 9), 3, 256)
    return ids[:, :-1], ids[:, 1:]


def _train(model, steps):
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=pj.nnx.Adapter)
    inputs, labels = _batch()

    @nnx.jit
    def step(model, optimizer):
        loss_fn = lambda m: causal_lm_loss(m(inputs), labels)
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, pj.nnx.Adapter))(model)
        optimizer.update(model, grads)
        return loss

    return [float(step(model, optimizer)) for _ in range(steps)]


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_trains_the_adapters_only(use_dora):
    model = _model()
    base = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    config = pj.LoRAConfig(rank=4, alpha=8.0, target_modules="all-linear", use_dora=use_dora)
    pj.nnx.lora_transform(model, config, key=jax.random.key(0))
    adapters = pj.nnx.adapters(model)
    # Every projection of every layer; the tied embedding is not "linear".
    assert sorted(adapters["model"]["layers_2"]["self_attn"]) == [
        "k_proj", "o_proj", "q_proj", "v_proj"]
    losses = _train(model, 6)
    assert losses[-1] < losses[0] - 0.1, losses
    after = nnx.state(model, nnx.All(nnx.Param, nnx.Not(pj.nnx.Adapter)))
    jax.tree.map(np.testing.assert_array_equal, base, after)


def test_merge_gives_plain_linears_with_the_same_outputs():
    model = _model()
    config = pj.LoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))
    pj.nnx.lora_transform(model, config, key=jax.random.key(0))
    _train(model, 2)
    inputs, _ = _batch()
    adapted = model(inputs)
    pj.nnx.merge(model)
    assert type(model.model.layers[0].self_attn.q_proj) is nnx.Linear
    np.testing.assert_allclose(np.asarray(model(inputs)), np.asarray(adapted), atol=1e-5)


@pytest.mark.slow  # the NF4 path compiles for over a minute on a loaded 2-core machine
def test_qlora_runs_on_nf4_kernels():
    model = _model()
    pj.nnx.apply_qlora(
        model, pj.QLoRAConfig(rank=4, alpha=8.0, target_modules="all-linear"),
        key=jax.random.key(0))
    kernel = model.model.layers[0].mlp.up_proj.kernel.get_value()
    assert type(kernel).__name__ == "NF4Array"
    losses = _train(model, 4)
    assert losses[-1] < losses[0], losses


# --- Hugging Face PEFT files: what transformers + peft compute with our adapters -----

LORA_DIR = DATA / "hf_tiny" / "gemma3_lora"


def _generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_gemma3_peft_reference", DATA / "make_gemma3_peft_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_matches_peft(model):
    inputs = json.loads((DATA / "hf_tiny" / "gemma3" / "reference.json").read_text())
    expected = np.asarray(json.loads((LORA_DIR / "reference.json").read_text())["logits"])
    logits = model(jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["attention_mask"]),
                   jnp.asarray(inputs["positions"]))
    real = np.asarray(inputs["attention_mask"], bool)
    np.testing.assert_allclose(np.asarray(logits)[real], expected[real], atol=2e-4, rtol=1e-4)


def test_exported_adapters_give_peft_the_same_logits(tmp_path):
    from safetensors.numpy import load_file

    model, adapters, config = _generator().adapted_model()
    _assert_matches_peft(model)
    written = pj.export_peft(tmp_path, adapters, config)
    stored = json.loads((LORA_DIR / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules"):
        assert written[key] == stored[key], key
    ours = load_file(str(tmp_path / "adapter_model.safetensors"))
    theirs = load_file(str(LORA_DIR / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    assert "base_model.model.model.layers.2.mlp.down_proj.lora_A.weight" in ours
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])


def test_imported_peft_adapters_load_onto_the_nnx_model():
    adapters, config = pj.import_peft(LORA_DIR)
    _, model = load_gemma3_hf(DATA / "hf_tiny" / "gemma3")
    pj.nnx.load_adapters(model, adapters, config)
    _assert_matches_peft(model)
