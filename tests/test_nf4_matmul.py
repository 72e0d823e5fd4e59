"""nf4_matmul: Pallas (interpreted) vs XLA path vs dense, gradients, lowering, dispatch."""

import jax
import jax.numpy as jnp
import pytest

from peft_jax.quant import NF4, nf4_matmul, quantize_array, select_impl
from peft_jax.quant import kernels

F32 = NF4(compute_dtype=None)


def rel_err(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def make(k, n, spec=F32, seed=0):
  w = quantize_array(jax.random.normal(jax.random.key(seed), (k, n)), spec)
  return w, w.dequantize(jnp.float32)


@pytest.mark.parametrize("m,k,n,quant_type,double_quant", [
    (1, 256, 128, "nf4", True),
    (5, 512, 384, "fp4", False),   # ragged M
    (17, 512, 256, "nf4", False),
    (33, 256, 256, "nf4", True),
])
def test_pallas_interpret_equals_xla_and_dense(m, k, n, quant_type, double_quant):
  spec = NF4(quant_type=quant_type, double_quant=double_quant, compute_dtype=None)
  w, dense = make(k, n, spec)
  x = jax.random.normal(jax.random.key(1), (m, k))
  xla = nf4_matmul(x, w, impl="xla")
  assert rel_err(xla, x @ dense) < 1e-5
  pallas = nf4_matmul(x, w, impl="pallas_interpret")
  assert select_impl(w, m, "pallas_interpret") == "pallas_interpret"
  assert rel_err(pallas, xla) < 1e-5


def test_leading_axes_and_dense_general_kernel():
  w, dense = make(256, 64)
  x = jax.random.normal(jax.random.key(2), (2, 3, 256))
  y = nf4_matmul(x, w)
  assert y.shape == (2, 3, 64) and rel_err(y, x @ dense) < 1e-5
  kernel = jax.random.normal(jax.random.key(3), (4, 64, 2, 16))  # (heads, dim) -> (2, 16)
  wg = quantize_array(kernel, F32, in_ndim=2)
  xg = jax.random.normal(jax.random.key(4), (5, 4, 64))
  yg = nf4_matmul(xg, wg)
  ref = jnp.einsum("bhd,hdef->bef", xg, wg.dequantize())
  assert yg.shape == (5, 2, 16) and rel_err(yg, ref) < 1e-5


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret", "reference"])
def test_gradients_flow_to_x_only(impl):
  w, dense = make(256, 128)
  x = jax.random.normal(jax.random.key(5), (2, 9, 256))
  target = jax.random.normal(jax.random.key(6), (2, 9, 128))

  def loss(x, w):
    return jnp.sum((nf4_matmul(x, w, impl=impl) - target) ** 2)

  grad_x = jax.grad(loss)(x, w)
  grad_dense = jax.grad(lambda x: jnp.sum((x @ dense - target) ** 2))(x)
  assert rel_err(grad_x, grad_dense) < 1e-5
  grad_w = jax.grad(loss, argnums=1, allow_int=True)(x, w)
  assert grad_w.codes.dtype == jax.dtypes.float0
  assert float(jnp.abs(grad_w.nested_absmax).max()) == 0


def test_bf16_compute_and_output_dtype():
  w, dense = make(512, 256, NF4())  # compute_dtype bfloat16 (the QLoRA default)
  x = jax.random.normal(jax.random.key(7), (4, 512))
  y = nf4_matmul(x, w)
  assert y.dtype == jnp.float32 and rel_err(y, x @ dense) < 1e-2
  y16 = nf4_matmul(x.astype(jnp.bfloat16), w, impl="pallas_interpret")
  assert y16.dtype == jnp.bfloat16 and rel_err(y16.astype(jnp.float32), x @ dense) < 2e-2


def test_untileable_shapes_fall_back():
  w, dense = make(256, 36)  # N = 36 tiles on neither backend (TPU takes whole multiples of 8)
  x = jax.random.normal(jax.random.key(8), (3, 256))
  assert select_impl(w, 3, "pallas", platform="gpu") == "xla"
  assert select_impl(w, 3, None, platform="tpu") == "xla"
  assert rel_err(nf4_matmul(x, w, impl="pallas", platform="gpu"), x @ dense) < 1e-5
  flat, flat_dense = make(63, 7)  # K not a multiple of the block: flat layout
  assert not flat.tiled and select_impl(flat, 1, "pallas") == "reference"
  xf = jax.random.normal(jax.random.key(9), (2, 63))
  assert rel_err(nf4_matmul(xf, flat, impl="pallas"), xf @ flat_dense) < 1e-5


def test_dispatch_by_platform():
  w, _ = make(256, 128)
  assert select_impl(w, 16, platform="cpu") == "xla"
  assert select_impl(w, 16, platform="gpu") == "pallas"
  assert select_impl(w, 16, platform="tpu") == "pallas"
  assert select_impl(w, 16, "reference", platform="gpu") == "reference"
  with pytest.raises(ValueError, match="impl"):
    select_impl(w, 16, "cuda")


@pytest.mark.parametrize("platform,lowering", [("gpu", "cuda"), ("tpu", "tpu")])
def test_kernels_lower_for_gpu_and_tpu(platform, lowering):
  w, _ = make(512, 256, NF4())
  x = jax.random.normal(jax.random.key(10), (5, 512)).astype(jnp.bfloat16)

  def step(x, w):
    y, vjp = jax.vjp(lambda x: nf4_matmul(x, w, impl="pallas", platform=platform), x)
    return y, vjp(y)[0]

  assert select_impl(w, 5, "pallas", platform=platform) == "pallas"
  lowered = jax.jit(step).trace(x, w).lower(lowering_platforms=(lowering,))
  text = lowered.as_text()
  marker = "@__gpu$xla.gpu.triton" if platform == "gpu" else "@tpu_custom_call"
  assert text.count(marker) == 2  # forward and transposed kernels


def test_tile_choice():
  assert kernels.choose_tiles(1, 4096, 4096, 64, "gpu") == kernels.TileConfig(16, 128, 128)
  tpu = kernels.choose_tiles(2048, 4096, 4096, 64, "tpu")  # chunk 512 would overflow VMEM
  assert (tpu.block_m, tpu.chunk_rows) == (256, 256)
  assert kernels.choose_tiles(8, 4096, 100, 64, "gpu") is None


def test_errors():
  w, _ = make(256, 128)
  with pytest.raises(ValueError, match="input axes"):
    nf4_matmul(jnp.ones((2, 128)), w)
  with pytest.raises(TypeError, match="float"):
    nf4_matmul(jnp.ones((2, 256), jnp.int32), w)
  with pytest.raises(TypeError, match="NF4Array"):
    nf4_matmul(jnp.ones((2, 256)), jnp.ones((256, 128)))
  stacked = quantize_array(jnp.ones((2, 256, 128)), F32, stack_ndim=1)
  with pytest.raises(ValueError, match="stack"):
    nf4_matmul(jnp.ones((2, 256)), stacked)


def test_xla_path_dequantizes_once_for_many_rows_and_scans_for_few():
  w, dense = make(256, 128)
  target = jax.random.normal(jax.random.key(9), (80, 128))
  for m in (8, 80):  # below and above the rows from which the weight is dequantized once
    x = jax.random.normal(jax.random.key(8), (m, 256))
    loss = lambda x: jnp.sum((nf4_matmul(x, w, impl="xla") - target[:m]) ** 2)
    value, grad = jax.value_and_grad(loss)(x)
    dense_value, dense_grad = jax.value_and_grad(lambda x: jnp.sum((x @ dense - target[:m]) ** 2))(x)
    assert rel_err(value, dense_value) < 1e-5 and rel_err(grad, dense_grad) < 1e-5
    hlo = jax.jit(jax.grad(loss)).lower(x).as_text()
    assert ("while" in hlo) == (m < 64), m  # the K-tile scan only for few rows


@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 14336), (14336, 4096), (576, 576),
                                 (576, 1536), (1536, 576), (576, 192), (2048, 2048),
                                 (3072, 3072), (2048, 8192), (3072, 8192), (8192, 2048)])
def test_tpu_tiles_cover_common_widths_within_vmem(k, n):
  for m in (1, 16, 128, 2048):
    tiles = kernels.choose_tiles(m, k, n, 64, "tpu")
    assert tiles is not None, (m, k, n)
    assert kernels.tpu_vmem_bytes(tiles, k, n, 64) <= kernels.TPU_VMEM_BUDGET_BYTES, (m, k, n, tiles)
    assert (k // 2) % tiles.chunk_rows == 0 and n % tiles.block_n == 0
    assert tiles.block_n % 128 == 0 or tiles.block_n == n
    assert tiles.chunk_rows % 128 == 0 or tiles.chunk_rows == k // 2


def test_full_width_tpu_tiles_lower():
  w, _ = make(576, 576, NF4())  # SmolLM2's width: one full-width block each way
  x = jax.random.normal(jax.random.key(11), (16, 576)).astype(jnp.bfloat16)

  def step(x, w):
    y, vjp = jax.vjp(lambda x: nf4_matmul(x, w, impl="pallas", platform="tpu"), x)
    return y, vjp(y)[0]

  assert select_impl(w, 16, "pallas", platform="tpu") == "pallas"
  text = jax.jit(step).trace(x, w).lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("@tpu_custom_call") == 2
