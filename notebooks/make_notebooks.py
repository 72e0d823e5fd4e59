"""Builds the example notebooks from the Python sources below and executes them.

Dev-only tooling (needs ``nbformat``, ``nbclient`` and ``ipykernel``, which the
library itself does not). Each notebook is written here in "percent" form:
``# %% [markdown]`` starts a markdown cell (its lines are ``# ``-prefixed), and
``# %%`` starts a code cell. Running this script turns every source into an
``.ipynb`` next to it, executes it top to bottom in a fresh kernel (working
directory: ``notebooks/``) and stores the outputs (printed tables and PNG
plots), so the committed notebooks are reproducible::

    python notebooks/make_notebooks.py                 # build and execute all
    python notebooks/make_notebooks.py 02_qlora        # only the ones named
    python notebooks/make_notebooks.py --no-execute    # sources only, no outputs

The sources are the strings in :data:`SOURCES`; edit them here, not the
``.ipynb`` files, and rerun the script. The test suite
(``tests/test_notebooks.py``) runs the committed notebooks' code cells without
Jupyter.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
KERNEL_NAME = "python3"

# Shared by every notebook: imports, the text split into plays, and a small
# Llama "pretrained" on Hamlet (our stand-in for a downloaded base model).
_SETUP = '''
# %%
import pathlib, tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import peft_jax as pj
from peft_jax import data, training
from peft_jax.models import LlamaConfig, LlamaForCausalLM, count_params, init_params

plt.rcParams.update({"figure.dpi": 72, "figure.figsize": (7, 3.4), "axes.grid": True,
                     "grid.alpha": 0.3})

text = data.load_text()  # Hamlet, Macbeth and The Tempest, public domain
tokenizer = data.ByteTokenizer()  # one token per byte: vocabulary of 256
macbeth_at = text.index("MACBETH\\n\\nby William Shakespeare")
tempest_at = text.index("THE TEMPEST\\n\\nby William Shakespeare")
plays = {
    "hamlet": tokenizer.encode(text[:macbeth_at]),
    "macbeth": tokenizer.encode(text[macbeth_at:tempest_at]),
    "tempest": tokenizer.encode(text[tempest_at:]),
}
print({name: f"{len(tokens):,} tokens" for name, tokens in plays.items()})
print(f"JAX {jax.__version__} on {jax.devices()[0].platform}")
'''

# A small Llama pretrained briefly on Hamlet, plus the helpers every notebook
# uses: fixed held-out batches per play and a training loop.
_BASE = '''
# %%
BATCH, SEQ = %BATCH%, 64
model_config = LlamaConfig.tiny(%MODEL%)
model = LlamaForCausalLM(model_config)
params = init_params(model_config, jax.random.key(0))
print(f"{count_params(params):,} parameters")

def eval_batches(tokens, n=4):
    return list(data.batches(tokens, BATCH, SEQ, seed=1234, split="eval", num_batches=n))

held_out = {name: eval_batches(tokens) for name, tokens in plays.items()}

def held_out_loss(eval_fn, params, play):
    return float(np.mean([eval_fn(params, x, y) for x, y in held_out[play]]))

def train(step_fn, state, base, tokens, steps, seed):
    losses = []
    for i, (x, y) in enumerate(data.batches(tokens, BATCH, SEQ, seed=seed, num_batches=steps)):
        state, loss = step_fn(state, base, x, y, jax.random.key(i))
        losses.append(loss)
    return state, np.array(losses)

pretrain_opt = optax.adamw(3e-3)
state, pretrain_losses = train(training.make_train_step(model, None, pretrain_opt),
                               training.init_train_state(params, pretrain_opt), {},
                               plays["hamlet"], steps=%STEPS%, seed=0)
base_params = state.trainable
full_eval = training.make_eval_loss(model, None)
print(f"pretraining on Hamlet: loss {pretrain_losses[0]:.2f} -> {pretrain_losses[-1]:.2f}")
for play in ("hamlet", "tempest"):
    print(f"held-out loss on {play}: {held_out_loss(full_eval, base_params, play):.3f}")

'''


def _base(model_overrides: str = "", steps: int = 150, batch: int = 16) -> str:
  return (_BASE.replace("%MODEL%", model_overrides).replace("%STEPS%", str(steps))
          .replace("%BATCH%", str(batch)))


def _source(*parts: str) -> str:
  return "\n".join(p.strip("\n") + "\n" for p in parts)


SOURCES: dict[str, str] = {}

SOURCES["01_quickstart_lora"] = _source('''
# %% [markdown]
# # Quick start: LoRA, DoRA and full fine-tuning
#
# LoRA (Hu et al. 2021) freezes a pretrained weight `W` and learns a low-rank
# update beside it: `y = x W + s · (x A) B` with `A` of shape `(in, r)`, `B` of
# shape `(r, out)`, `r` small and `s = alpha / r`. DoRA (Liu et al. 2024) also
# learns one magnitude per output feature. In `peft_jax` an adapter is nothing
# more than extra leaves of the Flax params tree (`lora_a`, `lora_b`,
# `lora_magnitude`) and a Flax method interceptor that runs them: the model code
# is not touched.
#
# This notebook
#
# 1. "pretrains" a small Llama on *Hamlet* (our stand-in for a downloaded base
#    model, so that the run needs no network and takes seconds on a CPU);
# 2. fine-tunes it on *The Tempest* with LoRA, DoRA and full fine-tuning, the
#    same steps, batches and held-out text for each, and compares the losses;
# 3. merges the LoRA adapter into the kernels and saves it as an Orbax
#    checkpoint.
#
# Everything is small on purpose (a 2-layer model, a few dozen steps): it runs in
# well under a minute on two CPU cores. The same code runs on a GPU or TPU.
''', _SETUP, '''
# %% [markdown]
# ## A base model
#
# `LlamaConfig.tiny()` is a 2-layer Llama (hidden size 64, grouped-query
# attention) whose parameter names follow Hugging Face's
# (`model/layers_0/self_attn/q_proj/kernel`). We train it briefly on Hamlet with
# plain AdamW; `training.make_train_step` with `config=None` differentiates the
# whole tree.

''', _base(), '''
# %% [markdown]
# The base model has learnt Hamlet's spelling and layout (speaker names like
# `Ham.`); The Tempest writes speakers in capitals (`PROSPERO.`) and has its own
# vocabulary, so its held-out loss is higher. That gap is what fine-tuning
# closes.
#
# ## Adding adapters
#
# `lora_transform` adds `lora_a` / `lora_b` beside every targeted kernel
# (`"all-linear"`: every projection but the output head). `split` separates the
# trainable adapters from the frozen base; `combine` puts them back.

# %%
lora_config = pj.LoRAConfig(rank=8, alpha=16.0, target_modules="all-linear")
adapted = pj.lora_transform(base_params, lora_config, key=jax.random.key(1))
adapters, frozen = pj.split(adapted)
q_proj = adapted["model"]["layers_0"]["self_attn"]["q_proj"]
print({name: leaf.shape for name, leaf in q_proj.items()})
print(f"{len(pj.adapter_paths(adapted))} adapted modules, {count_params(adapters):,} trainable "
      f"of {count_params(adapted):,} parameters")

# %% [markdown]
# ## Fine-tuning on The Tempest
#
# The same loop for the three methods: only the trainable tree and the config
# change. `make_train_step` jits `step(state, base, inputs, labels, key)`,
# differentiating `state.trainable` only, with the frozen base passed as an
# argument (not baked into the program as a constant).

# %%
STEPS = 60

def finetune(method):
    base = jax.tree.map(jnp.copy, base_params)  # the train step donates its state
    if method == "full":
        config, trainable, frozen = None, base, {}
        lr = 1e-3
    else:
        config = pj.LoRAConfig(rank=8, alpha=16.0, target_modules="all-linear",
                               use_dora=method == "dora")
        trainable, frozen = pj.split(pj.lora_transform(base, config, key=jax.random.key(1)))
        lr = 5e-3
    optimizer = optax.adamw(lr)
    n_trainable = count_params(trainable)
    state, losses = train(training.make_train_step(model, config, optimizer),
                          training.init_train_state(trainable, optimizer), frozen,
                          plays["tempest"], steps=STEPS, seed=1)
    eval_fn = training.make_eval_loss(model, config)
    params = pj.combine(frozen, state.trainable) if frozen else state.trainable
    result = dict(losses=losses, trainable=n_trainable,
                  tempest=held_out_loss(eval_fn, params, "tempest"),
                  hamlet=held_out_loss(eval_fn, params, "hamlet"),
                  config=config, frozen=frozen, adapters=state.trainable)
    print(f"{method:>5}: {n_trainable:>7,} trainable params, train loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f}, held-out Tempest {result['tempest']:.3f}, "
          f"Hamlet {result['hamlet']:.3f}")
    return result

results = {method: finetune(method) for method in ("lora", "dora", "full")}
base_tempest = held_out_loss(full_eval, base_params, "tempest")
print(f" base: held-out Tempest {base_tempest:.3f}")

# %%
def smooth(x, k=5):
    return np.convolve(x, np.ones(k) / k, mode="valid")

fig, (ax1, ax2) = plt.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
for method, r in results.items():
    ax1.plot(np.arange(len(smooth(r["losses"]))) + 4, smooth(r["losses"]), label=method)
ax1.axhline(base_tempest, color="gray", ls="--", label="base (held out)")
ax1.set(title="Training loss on The Tempest", xlabel="step", ylabel="loss (nats/byte)")
ax1.legend()
names = list(results)
bars = ax2.bar(names, [results[m]["trainable"] / 1000 for m in names], color=["C0", "C1", "C2"])
ax2.bar_label(bars, [f"{results[m]['trainable'] / 1000:.1f}k" for m in names])
ax2.set(title="Trainable parameters", ylabel="thousands", ylim=(0, 125))
fig.tight_layout()
plt.show()

# %% [markdown]
# Training an eighth of the parameters, LoRA and DoRA close most of the gap
# between the base and full fine-tuning; DoRA's magnitude vectors add a thousand
# parameters and track LoRA closely over so few steps. Full fine-tuning still fits
# best here: on a 2-layer model a rank-8 update is a real restriction, and the
# adapted share is large. (On a real LLM the share is far smaller: a rank-8 LoRA
# on every projection of a 7B Llama trains about 0.3% of its weights.)
#
# ## Merging and saving
#
# For serving, `merge` folds `s · A B` into each kernel: the result is a plain
# params tree for the unmodified model, with no interceptor and no extra FLOPs.
# Saving writes only the adapter leaves and their config.

# %%
lora = results["lora"]
adapted = pj.combine(lora["frozen"], lora["adapters"])
x, _ = held_out["tempest"][0]
with pj.intercept(lora["config"]):
    logits_adapted = model.apply({"params": adapted}, x)
merged = pj.merge(adapted, lora["config"])
logits_merged = model.apply({"params": merged}, x)  # no interceptor needed
print(f"max |adapted - merged| logit difference: "
      f"{float(jnp.max(jnp.abs(logits_adapted - logits_merged))):.1e}")

with tempfile.TemporaryDirectory() as tmp:
    path = pj.checkpoint.save(f"{tmp}/tempest_lora", lora["adapters"], lora["config"])
    restored, restored_config = pj.checkpoint.restore(path, base_params=lora["frozen"])
    size = sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())
print(f"checkpoint: {size / 1024:.0f} KiB on disk; the base params are "
      f"{sum(a.nbytes for a in jax.tree.leaves(base_params)) / 1024:.0f} KiB")
print("restored config:", restored_config == lora["config"],
      "| adapters equal:", all(jax.tree.leaves(jax.tree.map(
          lambda a, b: bool(jnp.array_equal(a, b)), restored, lora["adapters"]))))

# %% [markdown]
# ## Summary

# %%
summary = {m: {"trainable": r["trainable"], "held_out_tempest": round(r["tempest"], 3),
               "first_loss": round(float(r["losses"][0]), 3),
               "last_loss": round(float(r["losses"][-1]), 3)} for m, r in results.items()}
summary["base"] = {"held_out_tempest": round(base_tempest, 3)}
for method, row in summary.items():
    print(f"{method:>5}", row)
''')


SOURCES["02_qlora"] = _source('''
# %% [markdown]
# # QLoRA: LoRA on a 4-bit base
#
# QLoRA (Dettmers et al. 2023) stores the frozen base weights in 4 bits and
# trains LoRA adapters in full precision on top. The 4-bit format is *NormalFloat*
# (NF4): each block of 64 weights is divided by its absolute maximum and every
# value is rounded to one of 16 levels placed at quantiles of a normal
# distribution, which is how trained weights are spread. *Double quantization*
# stores the per-block scales in 8 bits too: about 4.13 bits per weight instead
# of 32.
#
# In `peft_jax` a quantized kernel is an `NF4Array` leaf (packed `uint8` codes
# plus scales, bit-compatible with bitsandbytes) in the ordinary params tree.
# Inside `pj.intercept` the model's `Dense` layers compute `x @ W` with
# `pj.nf4_matmul`, which dequantizes tile by tile and never materialises the
# full-precision weight.
#
# This notebook quantizes a small "pretrained" Llama, measures what 4 bits cost in
# memory and in loss, and fine-tunes it on *The Tempest* with QLoRA next to LoRA
# on the full-precision base.
''', _SETUP, _base(), '''
# %% [markdown]
# ## Quantizing the base
#
# `pj.quantize` replaces every Dense-like kernel except the output head (and
# never the embeddings) with an `NF4Array`.

# %%
nf4 = pj.NF4(block_size=64, double_quant=True)  # the QLoRA defaults
qbase = pj.quantize(base_params, nf4)
print(qbase["model"]["layers_0"]["mlp"]["up_proj"]["kernel"])

def tree_bytes(tree):
    leaves = jax.tree.leaves(tree, is_leaf=pj.quant.is_quantized)
    return sum(leaf.nbytes for leaf in leaves)

def kernel_bytes(tree):
    leaves = jax.tree.leaves(tree, is_leaf=pj.quant.is_quantized)
    return sum(leaf.nbytes for leaf in leaves if pj.quant.is_quantized(leaf))

quantized = pj.quant.quantized_paths(qbase)
float_kernel_bytes = sum(
    leaf.nbytes for path, leaf in jax.tree_util.tree_leaves_with_path(base_params)
    if "/".join(k.key for k in path) in quantized)
print(f"{len(quantized)} kernels quantized: {float_kernel_bytes / 1024:.0f} KiB in float32 -> "
      f"{kernel_bytes(qbase) / 1024:.0f} KiB in NF4 "
      f"({8 * kernel_bytes(qbase) / (float_kernel_bytes / 4):.2f} bits per weight)")
print(f"whole base: {tree_bytes(base_params) / 1024:.0f} KiB -> {tree_bytes(qbase) / 1024:.0f} KiB "
      "(embeddings, norms and head stay float32)")

# %% [markdown]
# What do 4 bits cost? The histogram shows one kernel's weights, each divided by
# its block's absmax, against the 16 NF4 levels; the held-out loss of the
# quantized model tells what the rounding does to the model.

# %%
up = base_params["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
q_up = qbase["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
blocks = np.asarray(up).T.reshape(-1, 64)  # bitsandbytes blocks run along the torch rows
normalised = (blocks / np.abs(blocks).max(axis=1, keepdims=True)).ravel()
error = float(jnp.linalg.norm(q_up.dequantize() - up) / jnp.linalg.norm(up))

x = jax.random.normal(jax.random.key(2), (8, up.shape[0]))
y_nf4 = pj.nf4_matmul(x, q_up)  # bfloat16 tiles, float32 accumulation
y_ref = x @ q_up.dequantize(jnp.float32)
print(f"relative error of the NF4 kernel: {error:.3f}")
print(f"nf4_matmul vs x @ dequantize(W): max relative difference "
      f"{float(jnp.max(jnp.abs(y_nf4 - y_ref)) / jnp.max(jnp.abs(y_ref))):.4f} (bfloat16 compute)")

fig, ax = plt.subplots()
ax.hist(normalised, bins=120, color="C0", alpha=0.7, density=True, label="weight / block absmax")
for level in pj.quant.tables.code_table("nf4"):
    ax.axvline(level, color="C3", lw=0.8)
ax.plot([], [], color="C3", lw=0.8, label="the 16 NF4 levels")
ax.set(title="up_proj weights of layer 0 and the NF4 code", xlabel="normalised weight")
ax.legend(loc="upper left")
plt.show()

with pj.intercept(None):  # runs NF4 kernels through nf4_matmul, no adapters
    loss_nf4 = {play: held_out_loss(full_eval, qbase, play) for play in ("hamlet", "tempest")}
loss_float = {play: held_out_loss(full_eval, base_params, play) for play in ("hamlet", "tempest")}
for play in loss_float:
    print(f"held-out {play}: float32 base {loss_float[play]:.4f}, NF4 base {loss_nf4[play]:.4f}")

# %% [markdown]
# ## Fine-tuning: QLoRA next to LoRA
#
# `pj.apply_qlora(params, QLoRAConfig(...))` is `lora_transform(quantize(params))`:
# rank-8 adapters on every projection, over the 4-bit base. `split` puts the
# `NF4Array` kernels in the frozen tree, so the train step is the same as for
# LoRA; gradients flow to the activations through `nf4_matmul`'s custom VJP and
# never to the codes.

# %%
STEPS = 60

def finetune(method):
    if method == "qlora":
        config = pj.QLoRAConfig(rank=8, alpha=16.0, target_modules="all-linear")
        adapted = pj.apply_qlora(base_params, config, key=jax.random.key(1))
    else:
        config = pj.LoRAConfig(rank=8, alpha=16.0, target_modules="all-linear")
        adapted = pj.lora_transform(base_params, config, key=jax.random.key(1))
    adapters, frozen = pj.split(adapted)
    optimizer = optax.adamw(5e-3)
    state, losses = train(training.make_train_step(model, config, optimizer),
                          training.init_train_state(adapters, optimizer), frozen,
                          plays["tempest"], steps=STEPS, seed=1)
    eval_fn = training.make_eval_loss(model, config)
    held = held_out_loss(eval_fn, pj.combine(frozen, state.trainable), "tempest")
    result = dict(losses=losses, tempest=held, frozen_bytes=tree_bytes(frozen),
                  adapter_bytes=tree_bytes(state.trainable))
    print(f"{method:>5}: train loss {losses[0]:.3f} -> {losses[-1]:.3f}, held-out Tempest "
          f"{held:.3f}; frozen base {result['frozen_bytes'] / 1024:.0f} KiB, adapters "
          f"{result['adapter_bytes'] / 1024:.0f} KiB")
    return result

results = {method: finetune(method) for method in ("lora", "qlora")}

# %% [markdown]
# ## Memory at scale
#
# Our model is tiny and its embeddings (never quantized) are a large share of it.
# The same accounting on the shapes of real models, without allocating them
# (`jax.eval_shape` runs `init_params` and `quantize` on abstract arrays), shows
# where QLoRA's savings come from: the frozen base of a 7B Llama goes from 13 GB in
# bfloat16 to under 4 GB.

# %%
def base_bytes(config):
    shapes = jax.eval_shape(lambda: pj.quantize(init_params(config, jax.random.key(0)), nf4))
    leaves = jax.tree.leaves(shapes, is_leaf=pj.quant.is_quantized)
    n = sum(int(np.prod(leaf.shape)) for leaf in leaves)
    nf4_bytes = sum(leaf.nbytes if pj.quant.is_quantized(leaf) else 2 * leaf.size for leaf in leaves)
    return {"float32": 4 * n, "bfloat16": 2 * n, "NF4 + bf16 rest": nf4_bytes}, n

llama_7b = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32)
models = {"this notebook": model_config, "SmolLM2-135M": LlamaConfig.smollm2_135m(),
          "Llama-2-7B": llama_7b}
memory = {}
for name, config in models.items():
    memory[name], n = base_bytes(config)
    print(f"{name:>14} ({n / 1e6:,.1f}M params): " + ", ".join(
        f"{k} {v / 2**20:,.1f} MiB" for k, v in memory[name].items()))

fig, (ax1, ax2) = plt.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
for method, r in results.items():
    ax1.plot(r["losses"], label=f"{method} (held out {r['tempest']:.3f})", alpha=0.8)
ax1.set(title="Fine-tuning on The Tempest", xlabel="step", ylabel="training loss")
ax1.legend()
kinds = list(memory["Llama-2-7B"])
width = 0.8 / len(kinds)
for i, kind in enumerate(kinds):
    ax2.bar(np.arange(2) + i * width, [memory[m][kind] / 2**30 for m in ("SmolLM2-135M", "Llama-2-7B")],
            width, label=kind)
ax2.set_xticks(np.arange(2) + width, ["SmolLM2-135M", "Llama-2-7B"])
ax2.set(title="Frozen base weights", ylabel="GiB", yscale="log")
ax2.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# QLoRA's loss curve lies on LoRA's: the 4-bit rounding costs little, and the
# adapters (kept in float32) learn to compensate for part of it. Its frozen base
# takes a fraction of the memory. On CPU the 4-bit matmul is slower than a dense
# one (it decodes every tile); on GPU and TPU `nf4_matmul` runs as a Pallas kernel.
#
# ## Summary

# %%
summary = {
    "bits_per_weight": round(8 * kernel_bytes(qbase) / (float_kernel_bytes / 4), 3),
    "kernel_relative_error": round(error, 4),
    "held_out_tempest": {"float_base": round(loss_float["tempest"], 3),
                         "nf4_base": round(loss_nf4["tempest"], 3),
                         **{m: round(r["tempest"], 3) for m, r in results.items()}},
    "frozen_base_KiB": {m: round(r["frozen_bytes"] / 1024) for m, r in results.items()},
    "llama_7b_base_GiB": {k: round(v / 2**30, 2) for k, v in memory["Llama-2-7B"].items()},
}
for key, value in summary.items():
    print(f"{key}: {value}")
''')


SOURCES["03_galore_lisa"] = _source('''
# %% [markdown]
# # GaLore and LISA: full-parameter training with less optimizer memory
#
# LoRA saves memory by training few parameters. GaLore and LISA keep training
# *all* of them and save on the optimizer instead: Adam keeps two moments per
# trained parameter, which in float32 is twice the model.
#
# * **GaLore** (Zhao et al. 2024) projects each weight matrix's gradient onto
#   its top-`r` singular directions (refreshed every `update_proj_gap` steps),
#   runs Adam there, and projects the update back. The moments of an `(in, out)`
#   kernel shrink to `(r, out)`.
# * **LISA** (Pan et al. 2024) trains a few randomly drawn decoder layers at a
#   time (plus the embeddings and the head), switching every `interval_steps`
#   steps. The optimizer state covers the active layers only.
#
# Both are plain optax transformations in `peft_jax.optim`, so they drop into
# any training loop: here `training.make_train_step(model, None, optimizer)`,
# the same step as full fine-tuning with AdamW. We fine-tune a 4-layer Llama
# "pretrained" on *Hamlet* on *The Tempest* with each and compare loss and
# optimizer-state bytes.
''', _SETUP, _base("num_hidden_layers=4", steps=120, batch=8), '''
# %% [markdown]
# ## Three optimizers, one train step
#
# GaLore projects the attention and MLP kernels (the reference's choice);
# embeddings, norms and the head get ordinary AdamW inside it. Its `scale`
# (0.25) multiplies the projected updates, so it takes a larger learning rate
# than AdamW. LISA wraps AdamW and trains one of the four layers at a time, drawing
# a new one every 8 steps.

# %%
from peft_jax import optim

STEPS, NUM_LAYERS = 40, model_config.num_hidden_layers

def make_optimizer(method):
    if method == "adamw":
        return optax.adamw(1e-3)
    if method == "galore":
        return optim.galore(4e-3, rank=16, update_proj_gap=20, scale=0.25)
    if method == "lisa":
        return optim.lisa(optax.adamw(1e-3), n_layers=1, interval_steps=8, key=2)
    raise ValueError(method)

def state_bytes(tree):  # arrays or jax.ShapeDtypeStructs; PRNG keys count 0
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)
               if hasattr(leaf, "dtype") and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key))

print("GaLore projects:")
for path, plan in optim.galore_projected_paths(base_params, rank=16).items():
    if "layers_0" in path:
        print(f"  {path}: matrix {plan['matrix']}, projected on the {plan['side']} side to rank {plan['rank']}")

results = {}
for method in ("adamw", "galore", "lisa"):
    optimizer = make_optimizer(method)
    state = training.init_train_state(jax.tree.map(jnp.copy, base_params), optimizer)
    step_fn = training.make_train_step(model, None, optimizer)
    opt_bytes = state_bytes(state.opt_state)
    losses, active = [], []
    for i, (x, y) in enumerate(data.batches(plays["tempest"], BATCH, SEQ, seed=1, num_batches=STEPS)):
        if method == "lisa":
            active.append(np.asarray(optim.lisa_active_layers(state.opt_state)))
        state, loss = step_fn(state, {}, x, y, jax.random.key(i))
        opt_bytes = max(opt_bytes, state_bytes(state.opt_state))  # GaLore's projectors appear at step 0
        losses.append(loss)
    losses = np.array(losses)
    held = held_out_loss(full_eval, state.trainable, "tempest")
    results[method] = dict(losses=losses, tempest=held, opt_bytes=opt_bytes, active=active)
    print(f"{method:>6}: optimizer state {opt_bytes / 1024:6.0f} KiB, train loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f}, held-out Tempest {held:.3f}")
print(f"params: {state_bytes(base_params) / 1024:.0f} KiB; base held-out Tempest "
      f"{held_out_loss(full_eval, base_params, 'tempest'):.3f}")

# %%
def smooth(x, k=5):
    return np.convolve(x, np.ones(k) / k, mode="valid")

fig, (ax1, ax2) = plt.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
for method, r in results.items():
    ax1.plot(np.arange(len(smooth(r["losses"]))) + 4, smooth(r["losses"]),
             label=f"{method} (held out {r['tempest']:.3f})")
ax1.set(title="Fine-tuning on The Tempest", xlabel="step", ylabel="training loss (smoothed)")
ax1.legend()
ax2.bar(list(results), [r["opt_bytes"] / 1024 for r in results.values()], color=["C0", "C1", "C2"])
ax2.set(title="Optimizer state", ylabel="KiB")
fig.tight_layout()
plt.show()

# %% [markdown]
# GaLore halves the optimizer state here and LISA saves more, at some cost in
# loss over so few steps (only one layer in four moves at a time). The savings
# are diluted in this tiny model: its embeddings and head (256 x 64 each) are a
# fifth of the parameters, and both methods give them ordinary Adam moments.
# LISA's active layer over the run:

# %%
active = np.zeros((NUM_LAYERS, STEPS))
for step, layers in enumerate(results["lisa"]["active"]):
    active[layers, step] = 1
fig, ax = plt.subplots(figsize=(7, 1.8))
ax.imshow(active, aspect="auto", cmap="Greens", interpolation="nearest", origin="lower")
ax.set(title="LISA: trained decoder layer per step (1 of 4, redrawn every 8 steps)",
       xlabel="step", ylabel="layer", yticks=range(NUM_LAYERS))
ax.grid(False)
fig.tight_layout()
plt.show()
lisa_schedule = [int(layers[0]) for layers in results["lisa"]["active"][::8]]
print("active layer per interval:", lisa_schedule)

# %% [markdown]
# ## At scale
#
# The optimizer state is where the memory goes once models grow. `jax.eval_shape`
# gives the state of each optimizer on the parameter shapes of real models
# without allocating anything (GaLore at its default rank 128, LISA with 2 active
# layers, as in the paper).

# %%
def opt_state_bytes(config, method):
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    optimizer = {"adamw": optax.adamw(1e-3),
                 "galore": optim.galore(1e-3, rank=128),
                 "lisa": optim.lisa(optax.adamw(1e-3), n_layers=2)}[method]
    return state_bytes(jax.eval_shape(optimizer.init, shapes))

at_scale = {}
for name, config in {"SmolLM2-135M": LlamaConfig.smollm2_135m(),
                     "Llama-2-7B": LlamaConfig(vocab_size=32000, hidden_size=4096,
                                               intermediate_size=11008, num_hidden_layers=32,
                                               num_attention_heads=32)}.items():
    at_scale[name] = {m: opt_state_bytes(config, m) / 2**30 for m in ("adamw", "galore", "lisa")}
    print(f"{name:>13}: " + ", ".join(f"{m} {v:.2f} GiB" for m, v in at_scale[name].items()))

# %% [markdown]
# For a 7B Llama, AdamW's float32 moments take about 50 GiB; GaLore at rank 128
# and LISA with 2 of 32 layers bring them down by an order of magnitude. About
# half of what remains is the moments of the embeddings and the head, which both
# keep in full.
#
# ## Summary

# %%
summary = {m: {"optimizer_state_KiB": round(r["opt_bytes"] / 1024),
               "first_loss": round(float(r["losses"][0]), 3),
               "last_loss": round(float(r["losses"][-1]), 3),
               "held_out_tempest": round(r["tempest"], 3)} for m, r in results.items()}
summary["lisa_schedule"] = lisa_schedule
summary["llama_7b_optimizer_GiB"] = {m: round(v, 1) for m, v in at_scale["Llama-2-7B"].items()}
for key, value in summary.items():
    print(f"{key}: {value}")
''')


SOURCES["04_merging_adapters"] = _source('''
# %% [markdown]
# # Merging and combining adapters
#
# Two adapters trained on different data can be combined without training
# again. Each LoRA adapter is a *task vector*: the update `ΔW = s · A B` it adds
# to every kernel (Ilharco et al. 2023). This notebook trains one adapter on
# *Macbeth* and one on *The Tempest*, over the same base (a small Llama
# "pretrained" on *Hamlet*), and compares ways of combining them, evaluated on
# held-out text of both plays:
#
# * **task arithmetic** (`pj.task_arithmetic`): `W' = W + Σ wᵢ ΔWᵢ`, exact, the
#   result is plain params;
# * **cat** (`pj.combine_adapters(method="cat")`): one adapter of rank `Σ rᵢ`
#   whose `A` and `B` are the inputs' side by side, exactly `Σ wᵢ ΔWᵢ` but still
#   an adapter (it can be saved, swapped and merged like any other);
# * **TIES** (Yadav et al. 2023): keep each task vector's largest entries
#   (`density`), elect a sign per entry, and average the entries that agree;
#   `ties_svd` does it on the full `ΔWᵢ` and factors the result back to a
#   low-rank adapter, `ties` does it on the `A` and `B` stacks as Hugging Face
#   PEFT's `add_weighted_adapter` does.
''', _SETUP, _base(), '''
# %% [markdown]
# ## Two adapters, two plays
#
# The same config, optimizer and compiled train step for both; only the text
# differs.

# %%
STEPS = 60
config = pj.LoRAConfig(rank=8, alpha=16.0, target_modules="all-linear")
optimizer = optax.adamw(5e-3)
step_fn = training.make_train_step(model, config, optimizer)
lora_eval = training.make_eval_loss(model, config)

adapters = {}
for i, play in enumerate(("macbeth", "tempest")):
    trainable, frozen = pj.split(pj.lora_transform(base_params, config, key=jax.random.key(10 + i)))
    state, losses = train(step_fn, training.init_train_state(trainable, optimizer), frozen,
                          plays[play], steps=STEPS, seed=20 + i)
    adapters[play] = state.trainable
    print(f"{play} adapter: train loss {losses[0]:.3f} -> {losses[-1]:.3f}")

def evaluate(params, eval_fn=full_eval):
    return {play: held_out_loss(eval_fn, params, play) for play in ("macbeth", "tempest")}

table = {"base": evaluate(base_params)}
for play, a in adapters.items():
    table[f"{play} adapter"] = evaluate(pj.combine(frozen, a), lora_eval)

# %% [markdown]
# ## Combining them

# %%
pair = [adapters["macbeth"], adapters["tempest"]]

# Task arithmetic: plain merged params for the unmodified model.
for w in (0.5, 1.0):
    merged = pj.task_arithmetic(base_params, pair, weights=[w, w], configs=config)
    table[f"task arithmetic {w:g}+{w:g}"] = evaluate(merged)

# cat: an exact rank-16 adapter.
cat_adapters, cat_config = pj.combine_adapters(pair, [0.5, 0.5], "cat", configs=config)
cat_eval = training.make_eval_loss(model, cat_config)
table["cat 0.5+0.5"] = evaluate(pj.combine(frozen, cat_adapters), cat_eval)

# TIES: prune to the top 50% entries, elect signs, average where they agree.
for method, rank in (("ties_svd", 16), ("ties", 8)):
    ties_adapters, ties_config = pj.combine_adapters(pair, [1.0, 1.0], method, configs=config,
                                                     density=0.5, svd_rank=rank)
    table[f"{method} (rank {rank})"] = evaluate(pj.combine(frozen, ties_adapters),
                                                training.make_eval_loss(model, ties_config))

x, _ = held_out["tempest"][0]
merged_half = pj.task_arithmetic(base_params, pair, weights=[0.5, 0.5], configs=config)
with pj.intercept(cat_config):
    cat_logits = model.apply({"params": pj.combine(frozen, cat_adapters)}, x)
cat_vs_ta = float(jnp.max(jnp.abs(cat_logits - model.apply({"params": merged_half}, x))))
print(f"cat adapter vs task-arithmetic params, max logit difference: {cat_vs_ta:.2e}")
print(f"adapter ranks: single {config.rank}, cat {cat_config.rank}")

print(f"{'':>26} {'Macbeth':>8} {'Tempest':>8} {'mean':>8}")
for name, row in table.items():
    print(f"{name:>26} {row['macbeth']:8.3f} {row['tempest']:8.3f} "
          f"{(row['macbeth'] + row['tempest']) / 2:8.3f}")

# %%
names = list(table)
y = np.arange(len(names))
fig, ax = plt.subplots(figsize=(7, 4))
ax.barh(y - 0.2, [table[n]["macbeth"] for n in names], 0.4, label="held-out Macbeth")
ax.barh(y + 0.2, [table[n]["tempest"] for n in names], 0.4, label="held-out Tempest")
ax.set_yticks(y, names)
ax.invert_yaxis()
low = min(min(r.values()) for r in table.values())
ax.set(xlim=(low - 0.1, None), xlabel="loss (nats/byte, lower is better)",
       title="One model for two plays")
ax.legend(loc="lower right")
fig.tight_layout()
plt.show()

# %% [markdown]
# Each adapter is best on its own play, and each also helps on the other: much of
# what both learnt is shared (the capitalised speaker names and stage layout that
# Hamlet lacks). That is why *adding* the two task vectors (`1+1`) overshoots, it
# counts the shared part twice, while *averaging* them (`0.5+0.5`, and `cat`,
# which is exactly the same model kept as a rank-16 adapter) gives one model
# close to each specialist on its own play. TIES trims each vector to its largest
# half and averages only the entries whose signs agree, which lands between the
# two. The `ties` variant on the `A`/`B` stacks is not TIES on the task vectors
# (the product of the merged factors has cross terms `Aᵢ Bⱼ`), which shows in
# its loss: prefer `task_arithmetic`, `cat` or the `*_svd` methods when the
# combined update should be what the inputs add.
#
# ## Summary

# %%
summary = {name: {k: round(v, 3) for k, v in row.items()} for name, row in table.items()}
summary["cat_vs_task_arithmetic_max_logit_diff"] = cat_vs_ta
for key, value in summary.items():
    print(f"{key}: {value}")
''')


SOURCES["05_adalora"] = _source('''
# %% [markdown]
# # AdaLoRA: letting training decide where the rank goes
#
# LoRA gives every adapted matrix the same rank. AdaLoRA (Zhang et al. 2023)
# starts every matrix at `init_r` and prunes during training down to an average of
# `target_r`, keeping rank where it matters. Each update is written like an SVD,
# `ΔW = Q Λ P` (`lora_a`, `lora_e`, `lora_b` here); the importance of each
# singular triplet is a smoothed `|weight × gradient|`, and on a cubic schedule the
# least important singular values over *all* matrices are set to zero. An
# orthogonality penalty keeps `P` and `Q` close to orthogonal.
#
# In `peft_jax` the adapters come from `pj.adalora_transform` and the allocator
# is an optax transformation, `peft_jax.optim.adalora(inner, config)`, wrapped
# around the optimizer: pruning is a masked update, so arrays keep their shape
# and nothing recompiles. After training, `pj.resize_adapters` slices each
# module to the rank it kept: plain LoRA adapters, smaller, with the same
# outputs.
#
# We fine-tune a small Llama "pretrained" on *Hamlet* on *The Tempest* and watch
# the ranks move.
''', _SETUP, _base(), '''
# %% [markdown]
# ## Schedule
#
# 14 adapted matrices (7 projections in each of 2 layers) start at rank 8: a
# budget of 112 singular values. After a warm-up of `tinit` steps the budget falls
# on a cubic curve to `target_r · 14 = 56`, with an allocation every `deltaT`
# steps; the last `tfinal` steps train with the final pattern frozen.

# %%
from peft_jax.optim.adalora import adalora

STEPS = 60
config = pj.AdaLoRAConfig(init_r=8, target_r=4, total_step=STEPS, tinit=10, tfinal=15,
                          deltaT=5, alpha=16.0, target_modules="all-linear")
adapters, frozen = pj.split(pj.adalora_transform(base_params, config, key=jax.random.key(1)))
q_proj = adapters["model"]["layers_0"]["self_attn"]["q_proj"]
print({name: leaf.shape for name, leaf in q_proj.items()})

def loss_with_orthogonality(model, config, params, inputs, labels, key):
    return (training.lm_loss(model, config, params, inputs, labels, key)
            + config.orth_reg_weight * pj.orthogonal_regularization(params))

optimizer = adalora(optax.adamw(1e-2), config)
step_fn = training.make_train_step(model, config, optimizer, loss_fn=loss_with_orthogonality)
state = training.init_train_state(adapters, optimizer)

losses, ranks = [], []
for i, (x, y) in enumerate(data.batches(plays["tempest"], BATCH, SEQ, seed=1, num_batches=STEPS)):
    state, loss = step_fn(state, frozen, x, y, jax.random.key(i))
    losses.append(float(loss))
    ranks.append(pj.lora.kept_ranks(state.opt_state))  # {module: kept rank} after this step
losses = np.array(losses)
eval_fn = training.make_eval_loss(model, config)
held = held_out_loss(eval_fn, pj.combine(frozen, state.trainable), "tempest")
base_tempest = held_out_loss(full_eval, base_params, "tempest")
print(f"training objective {losses[0]:.3f} -> {losses[-1]:.3f} (loss + orthogonality penalty); "
      f"held-out Tempest loss {held:.3f} (base {base_tempest:.3f})")

# %%
modules = sorted(ranks[0])
short = [m.replace("model/", "").replace("self_attn/", "").replace("mlp/", "") for m in modules]
grid = np.array([[r[m] for r in ranks] for m in modules])  # (modules, steps)
total = grid.sum(axis=0)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.6), gridspec_kw={"width_ratios": [3, 2]})
image = ax1.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=config.init_r,
                   interpolation="nearest")
ax1.set_yticks(range(len(short)), short, fontsize=7)
ax1.set(title="Kept rank per module", xlabel="step")
ax1.grid(False)
fig.colorbar(image, ax=ax1, fraction=0.04)
ax2.plot(total, label="total kept rank")
ax2.axhline(config.target_r * len(modules), color="gray", ls="--", label="target")
ax2.twinx().plot(losses, color="C1", alpha=0.5)
ax2.set(title="Budget (blue) and objective (orange)", xlabel="step")
ax2.legend(loc="center right", fontsize=8)
fig.tight_layout()
plt.show()

final = {name: int(grid[i, -1]) for i, name in enumerate(short)}
print("final rank per module:", final)

# %% [markdown]
# The allocator does not spread the budget evenly: some projections keep most of
# their rank while others are cut to little or nothing. The sum follows the cubic
# schedule down to the target and stays there for the final phase.
#
# ## From AdaLoRA to plain LoRA
#
# `resize_adapters` keeps each module's surviving triplets, folds `Λ` into `A`,
# and returns the adapters with a `LoRAConfig` whose `rank_pattern` records each
# module's rank. The model computes the same outputs with fewer parameters.

# %%
lora_adapters, lora_config = pj.resize_adapters(state.trainable, state.opt_state, config)
x, _ = held_out["tempest"][0]
with pj.intercept(config):
    before = model.apply({"params": pj.combine(frozen, state.trainable)}, x)
with pj.intercept(lora_config):
    after = model.apply({"params": pj.combine(frozen, lora_adapters)}, x)
resize_diff = float(jnp.max(jnp.abs(before - after)))
print(f"max logit difference after resizing: {resize_diff:.2e}")
print(f"adapter parameters: {count_params(state.trainable):,} (AdaLoRA, init_r={config.init_r}) -> "
      f"{count_params(lora_adapters):,} (resized LoRA)")
print("rank_pattern:", dict(lora_config.rank_pattern))

# %% [markdown]
# ## Summary

# %%
summary = {"first_objective": round(float(losses[0]), 3), "last_objective": round(float(losses[-1]), 3),
           "held_out_tempest": round(held, 3), "base_held_out_tempest": round(base_tempest, 3),
           "budget_start": int(total[0]),
           "budget_end": int(total[-1]), "final_ranks": final,
           "params_adalora": count_params(state.trainable),
           "params_resized": count_params(lora_adapters), "resize_max_logit_diff": resize_diff}
for key, value in summary.items():
    print(f"{key}: {value}")
''')


# -- building -------------------------------------------------------------------------


_CELL_MARK = re.compile(r"^# %%( \[markdown\])?\s*$")


def parse_cells(source: str) -> list[tuple[str, str]]:
  """``[(kind, text)]`` of a percent-format source (kind ``"code"``/``"markdown"``)."""
  cells: list[tuple[str, list[str]]] = []
  for line in source.splitlines():
    mark = _CELL_MARK.match(line)
    if mark:
      cells.append(("markdown" if mark.group(1) else "code", []))
      continue
    if not cells:
      if line.strip():
        raise ValueError(f"Text before the first cell marker: {line!r}")
      continue
    kind, lines = cells[-1]
    if kind == "markdown":
      if line and not (line.startswith("# ") or line == "#"):
        raise ValueError(f"Markdown line without '# ': {line!r}")
      line = line[2:]
    lines.append(line)
  out = []
  for kind, lines in cells:
    text = "\n".join(lines).strip("\n")
    if text:
      out.append((kind, text))
  return out


def build(name: str):
  import nbformat  # pylint: disable=import-outside-toplevel
  from nbformat import v4  # pylint: disable=import-outside-toplevel
  cells = [v4.new_markdown_cell(text) if kind == "markdown" else v4.new_code_cell(text)
           for kind, text in parse_cells(SOURCES[name])]
  nb = v4.new_notebook(cells=cells)
  nb.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": "Python 3",
                               "language": "python"}
  nb.metadata["language_info"] = {"name": "python"}
  # Stable cell ids, so that regenerating an unchanged notebook changes no line.
  for i, cell in enumerate(nb.cells):
    cell["id"] = f"{name[:2]}-{i:02d}"
  nbformat.validate(nb)
  return nb


def execute(nb, timeout: int = 600):
  from nbclient import NotebookClient  # pylint: disable=import-outside-toplevel
  client = NotebookClient(nb, timeout=timeout, kernel_name=KERNEL_NAME, record_timing=False,
                          resources={"metadata": {"path": str(HERE)}})
  client.execute()
  for cell in nb.cells:  # drop volatile metadata
    cell.get("metadata", {}).pop("execution", None)
  return nb


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("names", nargs="*", help=f"notebooks to build (default: all of {list(SOURCES)})")
  parser.add_argument("--no-execute", action="store_true", help="write the cells without outputs")
  args = parser.parse_args(argv)
  import nbformat  # pylint: disable=import-outside-toplevel
  names = args.names or list(SOURCES)
  unknown = sorted(set(names) - set(SOURCES))
  if unknown:
    parser.error(f"unknown notebooks {unknown}; expected names from {list(SOURCES)}")
  for name in names:
    nb = build(name)
    start = time.perf_counter()
    if not args.no_execute:
      execute(nb)
    path = HERE / f"{name}.ipynb"
    nbformat.write(nb, path)
    print(f"{path.name}: {len(nb.cells)} cells, {path.stat().st_size / 1024:.0f} KiB"
          + ("" if args.no_execute else f", executed in {time.perf_counter() - start:.1f}s"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
