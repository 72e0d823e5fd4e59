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
