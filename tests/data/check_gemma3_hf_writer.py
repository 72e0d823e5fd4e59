"""Offline check that transformers reads what `save_gemma3_hf` writes and computes our logits.

Two steps, two interpreters (torch is not a test dependency)::

    PYTHONPATH=. python tests/data/check_gemma3_hf_writer.py write /tmp/gemma_hf
    /work/refvenv/bin/python tests/data/check_gemma3_hf_writer.py check /tmp/gemma_hf

The tiny random model has final softcapping, linear rotary scaling on the
global layer, a window shorter than the sequence and non-zero norm weights.
Last run (transformers 5.24, eager attention): largest logit difference 6.1e-7.
"""

import sys

import numpy as np


def write(directory: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from peft_jax.models import Gemma3Config, Gemma3ForCausalLM, gemma3_params, save_gemma3_hf  # pylint: disable=import-outside-toplevel
  config = Gemma3Config.tiny(final_logit_softcapping=5.0, rope_scaling_factor=2.0)
  model = Gemma3ForCausalLM(config, rngs=nnx.Rngs(0))
  keys = iter(jax.random.split(jax.random.key(3), 64))
  state = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(
      lambda v: v + 0.1 * jax.random.normal(next(keys), v.shape) if v.ndim == 1 else v, state))
  save_gemma3_hf(directory, config, gemma3_params(model))
  ids = np.asarray(jax.random.randint(jax.random.key(1), (2, 12), 0, config.vocab_size))
  np.save(f"{directory}/ids.npy", ids)
  np.save(f"{directory}/ours.npy", np.asarray(model(jnp.asarray(ids))))


def check(directory: str) -> None:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32, attn_implementation="eager")
  ids = torch.from_numpy(np.load(f"{directory}/ids.npy").astype(np.int64))
  with torch.no_grad():
    logits = model(input_ids=ids).logits.numpy()
  diff = float(np.abs(logits - np.load(f"{directory}/ours.npy")).max())
  print(f"{type(model).__name__}: largest logit difference {diff:.2g}")
  assert diff < 1e-4, diff


if __name__ == "__main__":
  {"write": write, "check": check}[sys.argv[1]](sys.argv[2])
