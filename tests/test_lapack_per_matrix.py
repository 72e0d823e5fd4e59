"""Batched SVDs outside GaLore (LoftQ, combining adapters) hand LAPACK one matrix per call on CPU.

jaxlib 0.10's batched CPU LAPACK kernels block on XLA's intra-op pool; two at
once in one jitted program can hang forever (README, "GaLore's projector
refresh"). `peft_jax._lapack.map_matrices` loops over the batch on CPU.
"""

import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax import _lapack
from peft_jax.lora.layout import KernelLayout
from peft_jax.lora.loftq import loftq_for_kernel
from peft_jax.merging import combine_adapters

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _batched_lapack_calls(fn, *args):
  """LAPACK custom calls of the compiled `fn` whose operands or results have a batch axis."""
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  calls = [line for line in hlo.splitlines() if 'custom_call_target="lapack_' in line]
  assert calls, "expected LAPACK calls"
  return [line for line in calls
          if any(s.count(",") > 1
                 for s in re.findall(r"f32\[([0-9,]*)\]", line.split("custom_call_target")[0]))]


def _stacked_trees(rng, layers, n_in, n_out, rank, modules="ab"):
  return [{m: {"lora_a": jnp.asarray(rng.normal(size=(layers, n_in, rank)), jnp.float32),
               "lora_b": jnp.asarray(rng.normal(size=(layers, rank, n_out)), jnp.float32)}
           for m in modules} for _ in range(2)]


def test_loftq_and_svd_combination_of_stacked_kernels_loop_over_matrices():
  layout = KernelLayout((0,), (1,), batch_ndim=1)
  kernels = [jnp.ones((3, 16, 8)), jnp.ones((3, 16, 8)) * 2]
  assert not _batched_lapack_calls(
      lambda *ks: [loftq_for_kernel(k, layout, 2, 2)[1:] for k in ks], *kernels)
  config = pj.LoRAConfig(rank=2, alpha=2.0, target_modules=("a", "b"))
  trees = _stacked_trees(np.random.default_rng(0), 3, 6, 4, 2)
  assert not _batched_lapack_calls(
      lambda t: combine_adapters(t, [1.0, 0.7], "svd", configs=config)[0], trees)


def test_map_matrices_matches_vmap_over_several_batch_axes():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 5, 4)), jnp.float32)
  got = jax.jit(lambda x: _lapack.map_matrices(lambda m: jnp.linalg.svd(m)[1], x,
                                               batch_ndim=2))(x)
  np.testing.assert_allclose(got, jnp.linalg.svd(x)[1], rtol=1e-5)
  np.testing.assert_allclose(_lapack.map_matrices(jnp.linalg.norm, x[0, 0], batch_ndim=0),
                             jnp.linalg.norm(x[0, 0]))


_CHILD = """
import jax, jax.numpy as jnp, numpy as np
import peft_jax as pj
from peft_jax.merging import combine_adapters
rng = np.random.default_rng(0)
config = pj.LoRAConfig(rank=4, alpha=4.0, target_modules=tuple("abcd"))
trees = [{m: {"lora_a": jnp.asarray(rng.normal(size=(30, 576, 4)), jnp.float32),
              "lora_b": jnp.asarray(rng.normal(size=(30, 4, 136)), jnp.float32)} for m in "abcd"}
         for _ in range(2)]
f = jax.jit(lambda t: combine_adapters(t, [1.0, 0.7], "svd", configs=config)[0])
for _ in range(2):
  jax.block_until_ready(f(trees))
print("done")
"""


@pytest.mark.slow
def test_jitted_svd_combination_of_four_stacked_modules_does_not_hang(tmp_path):
  """Four independent batched SVDs of 30 `576 x 136` matrices in one program hang jaxlib 0.10."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  try:
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, check=False)
  except subprocess.TimeoutExpired:
    pytest.fail("jitted SVD combination of four stacked modules hung (batched CPU LAPACK deadlock)")
  assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-2000:]
