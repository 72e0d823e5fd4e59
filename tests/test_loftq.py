"""LoftQ against the reference library's numbers (ALGORITHMS.md 9.3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax import quant


def mat(m, n, s):
  i = np.arange(m * n, dtype=np.float64).reshape(m, n)
  return (np.sin(0.37 * i + s) * (1 + i % 5) / 3).astype(np.float32)


W_TORCH = mat(64, 64, 0.75)  # (out, in)
PARAMS = {"proj": {"kernel": jnp.asarray(W_TORCH.T)}}


@pytest.mark.parametrize("num_iter, want", [(1, 3.8974), (2, 3.7006), (5, 3.5762)])
def test_loftq_error_matches_reference(num_iter, want):
  # alpha = r makes the scale 1, where LoftQ cancels the error as designed.
  config = pj.LoRAConfig(rank=4, alpha=4.0, target_modules=("proj",), init="loftq",
                         loftq_iter=num_iter)
  out = pj.lora_transform(PARAMS, config, key=jax.random.key(0))["proj"]
  assert quant.is_quantized(out["kernel"])
  q = np.asarray(out["kernel"].dequantize(jnp.float32), np.float64)
  if num_iter == 1:  # the plain NF4 error of W; later iterations quantize W - L R instead
    np.testing.assert_allclose(np.linalg.norm(W_TORCH.T - q), 4.3309, atol=2e-4)
  ba = np.asarray(out["lora_a"], np.float64) @ np.asarray(out["lora_b"], np.float64)
  np.testing.assert_allclose(np.linalg.norm(W_TORCH.T - (q + ba)), want, atol=2e-4)
  # The adapted model starts closer to the float model than the quantized base alone.
  x = jnp.asarray(mat(8, 64, 0.1))
  with pj.intercept(config):
    y = _Proj().apply({"params": {"proj": out}}, x)
  base_err = np.abs(x @ q - x @ W_TORCH.T).mean()
  assert np.abs(np.asarray(y) - x @ W_TORCH.T).mean() < base_err


def test_loftq_refuses_quantized_kernel():
  qparams = quant.quantize(PARAMS, quant.NF4(), target_modules=("proj",))
  with pytest.raises(ValueError, match="needs the float kernel"):
    pj.lora_transform(qparams, pj.LoRAConfig(rank=4, target_modules=("proj",), init="loftq"),
                      key=jax.random.key(0))


import flax.linen as nn  # noqa: E402


class _Proj(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(64, use_bias=False, name="proj")(x)
