"""NF4/FP4 quantization against a NumPy implementation of the spec (ALGORITHMS.md §1)."""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_jax.quant import (FP4, NF4, NF4Array, dequantize, dequantize_array, is_quantized,
                            quantize, quantize_array, quantized_paths, tables)
from peft_jax.quant import nf4 as nf4_lib

SHARED_TABLES = pathlib.Path("/work/shared/reference/bnb_code_tables.json")


# -- NumPy implementation of bitsandbytes' reference kernel (§1.2-1.4) ----------
def np_blockwise(flat: np.ndarray, bs: int):
  n = flat.size
  full = n - n % bs
  absmax = [np.abs(flat[i:i + bs]).max() for i in range(0, n, bs)]
  absmax = np.asarray(absmax, np.float32)
  scaled = np.empty(n, np.float32)
  for b, start in enumerate(range(0, n, bs)):
    block = flat[start:start + bs]
    am = max(absmax[b], np.float32(1e-38))
    if start < full:
      scaled[start:start + bs] = block * (np.float32(1) / am)
    else:
      scaled[start:] = block / am
  return np.clip(scaled, -1, 1), absmax


def np_quantize_4bit(torch_weight: np.ndarray, bs: int, quant_type: str):
  """Packed bytes and float32 absmax of bitsandbytes' quantize_4bit."""
  flat = np.asarray(torch_weight, np.float32).reshape(-1)
  scaled, absmax = np_blockwise(flat, bs)
  if scaled.size % 2:
    scaled = np.append(scaled, np.float32(0))
  mid, order = tables.sorted_code_and_midpoints(quant_type)
  q = np.searchsorted(mid, scaled, side="left")
  if order is not None:
    q = order[q]
  q = q.astype(np.uint8)
  return (q[0::2] << 4) | q[1::2], absmax


def np_dequantize_4bit(packed, absmax, bs, quant_type, n):
  idx = np.stack([packed >> 4, packed & 15], -1).reshape(-1)[:n]
  code = tables.code_table(quant_type)[idx]
  return code * np.repeat(absmax, bs)[:n]


def inp(n: int) -> np.ndarray:
  k = np.arange(n)
  return (np.sin(0.37 * k) * (1 + k % 7)).astype(np.float32)


def bnb_fields(w: NF4Array):
  """(packed bytes, float32 absmax) in bitsandbytes order, via to_bnb."""
  from peft_jax.quant import to_bnb
  state = to_bnb(w)
  return state["weight"].reshape(-1), np.asarray(nf4_lib._absmax_to_torch_order(
      w.scales(), w.tiled))


def quantize_torch_layout(torch_weight, spec):
  """Quantize a PyTorch-layout (out, in) or 1-D weight through the Flax API."""
  x = jnp.asarray(torch_weight)
  return quantize_array(x.T if x.ndim == 2 else x, spec)


# -- code tables -----------------------------------------------------------------
def test_nf4_table_and_thresholds():
  assert tables.NF4_CODE.dtype == np.float32 and np.all(np.diff(tables.NF4_CODE) > 0)
  assert tables.NF4_CODE[0] == -1 and tables.NF4_CODE[7] == 0 and tables.NF4_CODE[15] == 1
  mid, order = tables.sorted_code_and_midpoints("nf4")
  assert order is None
  expected = [-0.8480964004993439, -0.6106329262256622, -0.4599952697753906,
              -0.33967943489551544, -0.23460740596055984, -0.13791173323988914,
              -0.045525018125772476, 0.03979014977812767, 0.1202552504837513,
              0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
              0.5016634166240692, 0.6427869200706482, 0.8614784181118011]
  np.testing.assert_array_equal(mid, np.float32(expected))


def test_fp4_table_in_bit_pattern_order():
  values = np.float32([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3])
  np.testing.assert_array_equal(tables.FP4_CODE, values / np.float32(12))
  # CUDA's formula: lut[v & 7] * (1 - 2 * sign bit).
  v = np.arange(16)
  np.testing.assert_array_equal(tables.FP4_CODE[v & 7] * (1 - 2 * ((v >> 3) & 1)),
                                tables.FP4_CODE)
  mid, order = tables.sorted_code_and_midpoints("fp4")
  assert np.all(np.diff(tables.FP4_CODE[order]) >= 0)
  np.testing.assert_allclose(mid[8:], [0.00260417, 0.0859375, 0.20833333, 0.29166667,
                                       0.4166667, 0.583333, 0.8333333], rtol=2e-6)


def test_dynamic_map_quoted_entries():
  dm = tables.DYNAMIC_MAP_256
  assert dm.shape == (256,) and dm[-1] == 1.0 and dm.min() == np.float32(-0.99296875)
  np.testing.assert_array_equal(dm[:3], np.float32([-0.992968738079071, -0.9789062738418579,
                                                    -0.96484375]))
  np.testing.assert_allclose(dm[124:132], np.float32(
      [-7.75e-06, -3.25e-06, -5.5e-07, 0, 5.5e-07, 3.25e-06, 7.75e-06, 2.125e-05]), rtol=2e-7)


@pytest.mark.skipif(not SHARED_TABLES.exists(), reason="shared reference tables absent")
def test_tables_equal_reference_json():
  ref = json.loads(SHARED_TABLES.read_text())
  np.testing.assert_array_equal(tables.NF4_CODE, np.float32(ref["nf4_code"]))
  np.testing.assert_array_equal(tables.FP4_CODE, np.float32(ref["fp4_code_by_index"]))
  np.testing.assert_array_equal(tables.DYNAMIC_MAP_256, np.float32(ref["dynamic_map_256"]))


def test_decode_4bit_equals_table_lookup():
  idx = jnp.arange(16)
  for qt in tables.QUANT_TYPES:
    np.testing.assert_array_equal(nf4_lib.decode_4bit(idx, tables.code_table(qt)),
                                  tables.code_table(qt))


# -- ALGORITHMS.md §1.9 bit-exact vectors -----------------------------------------
V1 = ("00000000001111111111111112222222222333333344444445555556666667777778888899999"
      "aaaaaabbbbbbcccccccdddddddddeeeeeeeeeeeeeefffffffff")
V2 = ("78adeee88642106557adf9abb952643224789bdeed7652100667acef9aa8521543347c8acddc97532111"
      "679ceff898631054457be9bccb95643212478bdeee87642106567bdf9aba85264323488acdeec7642110"
      "667adef9a98521543358c8acffe96410")
PLAIN = NF4(double_quant=False, compute_dtype=None)


def test_vector_v1_linspace():
  w = quantize_torch_layout(np.linspace(-1, 1, 128, dtype=np.float32), PLAIN)
  packed, absmax = bnb_fields(w)
  assert packed.tobytes().hex() == V1
  np.testing.assert_array_equal(absmax, [1, 1])


def test_vector_v2_sine():
  w = quantize_torch_layout(inp(200), PLAIN)  # 200 = 3 full blocks + 8 (partial)
  packed, absmax = bnb_fields(w)
  assert packed.tobytes().hex() == V2
  np.testing.assert_array_equal(absmax, np.float32([6.982684135437012, 6.802158832550049,
                                                    6.998204708099365, 3.922297716140747]))


def test_vector_v3_odd_length_pads_code_7():
  w = quantize_torch_layout(inp(67), PLAIN)
  packed, absmax = bnb_fields(w)
  assert packed.shape == (34,) and packed[-1] == 0x07
  np.testing.assert_allclose(absmax, [6.982684, 2.6497395], rtol=1e-6)


def test_vector_v4_fp4_prefix():
  w = quantize_torch_layout(inp(128), FP4(double_quant=False))
  packed, _ = bnb_fields(w)
  assert packed.tobytes().hex().startswith("0675222119cdabeee172367446edefddd")


def test_vector_v5_double_quant():
  w = quantize_torch_layout(inp(19200), NF4())
  assert float(w.offset) == pytest.approx(6.94875955581665, rel=2e-7)
  np.testing.assert_array_equal(w.nested_absmax,
                                np.float32([0.18835830688476562, 0.1691279411315918]))
  np.testing.assert_array_equal(
      np.asarray(w.absmax).reshape(-1)[:16], [196, 15, 202, 42, 202, 63, 196, 191, 200, 29, 203, 53,
                                  200, 149, 190, 196])
  plain = quantize_torch_layout(inp(19200), PLAIN)
  assert float(jnp.max(jnp.abs(w.scales() - plain.scales()))) < 1.33e-3
  x = jnp.asarray(inp(19200))
  assert float(jnp.mean(jnp.abs(x - w.dequantize()))) == pytest.approx(0.2224769, abs=2e-6)
  assert float(jnp.mean(jnp.abs(x - plain.dequantize()))) == pytest.approx(0.2224673, abs=2e-6)


def test_bf16_input_packs_like_float32():
  x = jnp.asarray(inp(128)).astype(jnp.bfloat16)
  w16 = quantize_torch_layout(x, PLAIN)
  w32 = quantize_torch_layout(x.astype(jnp.float32), PLAIN)
  np.testing.assert_array_equal(w16.codes, w32.codes)
  assert w16.absmax.dtype == jnp.float32 and w16.dtype == jnp.bfloat16
  assert w16.dequantize().dtype == jnp.bfloat16


# -- round trip against the NumPy spec -------------------------------------------------
def check_against_numpy(torch_weight: np.ndarray, bs: int, quant_type: str):
  torch_weight = np.asarray(torch_weight, np.float32)
  spec = NF4(block_size=bs, quant_type=quant_type, double_quant=False, compute_dtype=None)
  w = quantize_torch_layout(torch_weight, spec)
  packed, absmax = bnb_fields(w)
  ref_packed, ref_absmax = np_quantize_4bit(torch_weight, bs, quant_type)
  np.testing.assert_array_equal(packed, ref_packed)
  np.testing.assert_array_equal(absmax, ref_absmax)
  ref_values = np_dequantize_4bit(ref_packed, ref_absmax, bs, quant_type, torch_weight.size)
  out = np.asarray(w.dequantize())
  out = out.T if out.ndim == 2 else out
  np.testing.assert_array_equal(out.reshape(-1), ref_values)
  return w


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("torch_shape,bs", [((24, 128), 64), ((7, 63), 64), ((5, 100), 32),
                                            ((3, 64), 16), ((1000,), 128)])
def test_round_trip_matches_numpy_spec(torch_shape, bs, quant_type):
  x = np.random.default_rng(0).standard_normal(torch_shape).astype(np.float32)
  check_against_numpy(x, bs, quant_type)


def test_all_zero_blocks_and_outliers():
  x = np.random.default_rng(1).standard_normal((8, 128)).astype(np.float32)
  x[2, :64] = 0.0            # an all-zero block
  x[5, 3] = 1e4              # an outlier flattens its block to code 7
  x[6, 70] = -3e-30          # a tiny value next to normal ones
  for qt in ("nf4", "fp4"):
    w = check_against_numpy(x, 64, qt)
    dense = np.asarray(w.dequantize()).T
    assert np.all(dense[2, :64] == 0)
    assert dense[5, 3] == np.float32(1e4)
  packed, _ = bnb_fields(quantize_torch_layout(x, PLAIN))
  assert packed[2 * 64:2 * 64 + 32].tobytes() == b"\x77" * 32  # zero block -> code 7


def test_ties_go_to_the_lower_code():
  mid, _ = tables.sorted_code_and_midpoints("nf4")
  x = np.zeros(64, np.float32)
  x[0] = 1.0
  x[1:16] = mid
  w = quantize_torch_layout(x, PLAIN)
  codes = np.asarray(nf4_lib.unpack_codes(w)).reshape(-1)
  np.testing.assert_array_equal(codes[1:16], np.arange(15))


def test_round_trip_error_matches_bitsandbytes():
  x = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
  for qt, bound in (("nf4", 0.0728 + 7 * 7.4e-5), ("fp4", 0.0966 + 7 * 3e-4)):
    w = quantize_array(jnp.asarray(x), NF4(quant_type=qt, double_quant=False))
    err = float(jnp.mean(jnp.abs(w.dequantize() - x)))
    assert 0.06 < err < bound


@settings(max_examples=6, deadline=None)
@given(
    k_blocks=st.integers(1, 4), n=st.integers(1, 12), log_bs=st.integers(4, 7),
    ragged=st.integers(0, 15), quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(), seed=st.integers(0, 2**16))
def test_property_quantize_matches_spec(k_blocks, n, log_bs, ragged, quant_type,
                                        double_quant, seed):
  bs = 2 ** log_bs
  k = k_blocks * bs - ragged  # ragged > 0: the flat (bitsandbytes) layout
  x = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32) * 3
  spec = NF4(block_size=bs, quant_type=quant_type, double_quant=double_quant,
             compute_dtype=None)
  w = quantize_array(jnp.asarray(x), spec)
  assert w.shape == (k, n) and w.tiled == (ragged == 0)
  ref_packed, ref_absmax = np_quantize_4bit(x.T, bs, quant_type)
  packed, absmax = bnb_fields(w)
  np.testing.assert_array_equal(packed, ref_packed)
  out = np.asarray(w.dequantize())
  if double_quant:
    # absmax to within one nested step; values within a code gap of it.
    assert np.max(np.abs(absmax - ref_absmax)) <= 0.02 * ref_absmax.max() + 1e-6
    per_element = np.repeat(ref_absmax, bs)[:x.size].reshape(n, k).T
    assert np.all(np.abs(out - x) <= per_element * 0.35 + 0.02 * ref_absmax.max() + 1e-6)
  else:
    np.testing.assert_array_equal(absmax, ref_absmax)
    ref = np_dequantize_4bit(ref_packed, ref_absmax, bs, quant_type, x.size)
    np.testing.assert_array_equal(out.T.reshape(-1), ref)


# -- the array type --------------------------------------------------------------------
def test_array_properties_and_bits_per_param():
  x = jax.random.normal(jax.random.key(0), (1024, 512))
  dq = quantize_array(x, NF4())
  plain = quantize_array(x, NF4(double_quant=False))
  assert dq.shape == (1024, 512) and dq.ndim == 2 and dq.size == 1024 * 512
  assert dq.dtype == jnp.float32 and dq.codes.dtype == jnp.uint8
  assert dq.codes.shape == (512, 512) and dq.absmax.shape == (16, 512)
  assert dq.bits_per_param <= 4.13 and plain.bits_per_param == 4.5
  assert dq.nbytes / (x.size * 4) <= 0.13
  assert "shape=(1024, 512)" in repr(dq) and "bits/param=4.127" in repr(dq)
  assert is_quantized(dq) and not is_quantized(x)


def test_flax_style_kernel_layout_is_transposed_torch_layout():
  x = np.random.default_rng(0).standard_normal((128, 16)).astype(np.float32)  # (in, out)
  w = quantize_array(jnp.asarray(x), PLAIN)
  packed, _ = np_quantize_4bit(x.T, 64, "nf4")  # torch (out, in)
  np.testing.assert_array_equal(np.asarray(w.codes).T.reshape(-1), packed)


@pytest.mark.parametrize("k", [128, 96])  # tiled and flat layouts
def test_stacked_layers_slice_into_valid_arrays(k):
  x = jax.random.normal(jax.random.key(1), (3, k, 8))
  w = quantize_array(x, NF4(), stack_ndim=1)
  assert w.shape == (3, k, 8) and w.stack_shape == (3,)
  np.testing.assert_array_equal(w.dequantize(), jnp.stack(
      [quantize_array(x[i], NF4()).dequantize() for i in range(3)]))
  layer = jax.tree.map(lambda leaf: leaf[1], w)
  assert layer.shape == (k, 8) and layer.offset.shape == ()
  np.testing.assert_array_equal(layer.dequantize(), quantize_array(x[1], NF4()).dequantize())

  # lax.scan slices leaves like nn.scan: static metadata stays valid per layer.
  def body(carry, layer_w):
    return carry, layer_w.dequantize()
  _, per_layer = jax.lax.scan(body, None, w)
  np.testing.assert_array_equal(per_layer, w.dequantize())


def test_nn_scan_sees_per_layer_arrays():
  x = jax.random.normal(jax.random.key(2), (4, 64, 16))
  w = quantize_array(x, NF4(compute_dtype=None), stack_ndim=1)

  class Layer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
      kernel = self.get_variable("params", "kernel")
      assert kernel.shape == (64, 16) and kernel.codes.shape == (32, 16)
      return h, kernel.dequantize()

  scanned = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": False},
                    length=4)
  _, out = scanned().apply({"params": {"kernel": w}}, jnp.zeros(()), None)
  np.testing.assert_array_equal(out, w.dequantize())


def test_quantize_and_dequantize_under_jit():
  x = jax.random.normal(jax.random.key(3), (64, 32))
  w = jax.jit(lambda a: quantize_array(a, NF4()))(x)
  np.testing.assert_array_equal(jax.jit(dequantize_array)(w), w.dequantize())
  np.testing.assert_array_equal(w.codes, quantize_array(x, NF4()).codes)


def test_dense_general_kernel():
  x = jax.random.normal(jax.random.key(4), (4, 16, 8))  # (heads, head_dim, features)
  w = quantize_array(x, PLAIN, in_ndim=2)
  assert w.matrix_shape == (64, 8) and w.in_shape == (4, 16) and w.tiled
  np.testing.assert_array_equal(w.dequantize().reshape(64, 8),
                                quantize_array(x.reshape(64, 8), PLAIN).dequantize())


# -- errors ------------------------------------------------------------------------------
def test_errors():
  with pytest.raises(TypeError, match="float"):
    quantize_array(jnp.ones((64, 4), jnp.int32))
  for bs in (48, 8, 0):
    with pytest.raises(ValueError, match="power of two"):
      NF4(block_size=bs)
  with pytest.raises(ValueError, match="quant_type"):
    NF4(quant_type="int4")
  w = quantize_array(jnp.ones((64, 4)))
  with pytest.raises(ValueError, match="already quantized"):
    quantize_array(w)
  with pytest.raises(ValueError, match="in_ndim"):
    quantize_array(jnp.ones((64, 4)), in_ndim=3)


# -- params trees ------------------------------------------------------------------------
def model_params():
  key = jax.random.key(5)
  dense = lambda i, o: {"kernel": jax.random.normal(jax.random.fold_in(key, i * o), (i, o)),
                        "bias": jnp.zeros(o)}
  return {
      "embed": {"embedding": jnp.ones((50, 64))},
      "layers_0": {"q_proj": dense(64, 64), "v_proj": dense(64, 64), "mlp": dense(64, 128)},
      "norm": {"scale": jnp.ones(64)},
      "lm_head": dense(64, 50),
  }


def test_quantize_tree_default_targets():
  params = model_params()
  qparams = quantize(params)
  assert sorted(quantized_paths(qparams)) == [
      "layers_0/mlp/kernel", "layers_0/q_proj/kernel", "layers_0/v_proj/kernel"]
  assert not is_quantized(qparams["lm_head"]["kernel"])
  assert qparams["embed"]["embedding"] is params["embed"]["embedding"]
  restored = dequantize(qparams)
  assert jax.tree.structure(restored) == jax.tree.structure(params)
  np.testing.assert_array_equal(restored["layers_0"]["q_proj"]["kernel"],
                                qparams["layers_0"]["q_proj"]["kernel"].dequantize())
  err = jnp.abs(restored["layers_0"]["mlp"]["kernel"] - params["layers_0"]["mlp"]["kernel"])
  assert 0 < float(err.mean()) < 0.1


def test_quantize_tree_targets_and_wrapping():
  params = {"params": model_params()}
  q = quantize(params, NF4(block_size=32), target_modules=["q_proj"])
  assert quantized_paths(q) == ["params/layers_0/q_proj/kernel"]
  assert q["params"]["layers_0"]["q_proj"]["kernel"].block_size == 32
  q = quantize(params, target_modules=r".*/(q|v)_proj")
  assert len(quantized_paths(q)) == 2


def test_quantize_tree_stacked_layers():
  params = {"layers": {"q_proj": {"kernel": jnp.ones((3, 64, 32))}}}
  w = quantize(params)["layers"]["q_proj"]["kernel"]
  assert w.stack_shape == (3,) and w.kernel_shape == (64, 32)


def test_quantize_tree_errors():
  params = model_params()
  with pytest.raises(ValueError, match=r"'q_prj'.*q_proj"):
    quantize(params, target_modules=["q_prj"])
  with pytest.raises(ValueError, match="embedding"):
    quantize(params, target_modules=["embed"])
  with pytest.raises(ValueError, match="already quantized"):
    quantize(quantize(params))
  int_params = {"dense": {"kernel": jnp.ones((64, 8), jnp.int8)}}
  with pytest.raises(TypeError, match="dense/kernel.*float"):
    quantize(int_params)
