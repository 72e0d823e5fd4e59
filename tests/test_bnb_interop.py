"""Bit-exactness against bitsandbytes, from vectors in tests/data/bnb_reference.json.

The vectors were written by tests/data/make_bnb_reference.py with
bitsandbytes 0.50.2 and torch 2.13.0 (CPU).
"""

import hashlib
import json
import pathlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax.quant import bnb, nf4, tables

DATA = pathlib.Path(__file__).parent / "data" / "bnb_reference.json"
REFERENCE = json.loads(DATA.read_text())
CASES = {case["name"]: case for case in REFERENCE["cases"]}

NF4_MIDPOINTS = [
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
]


def make_input(case: dict) -> np.ndarray:
  """Copy of the generator's input recipe (checked by SHA-256)."""
  shape = tuple(case["torch_shape"])
  x = np.random.default_rng(case["seed"]).standard_normal(shape, dtype=np.float32)
  x = x * np.float32(case.get("scale", 1.0))
  flat = x.reshape(-1)
  for start, stop in case.get("zero_ranges", []):
    flat[start:stop] = 0.0
  for index, value in case.get("set_values", []):
    flat[index] = np.float32(value)
  if case.get("ties"):
    values = [1.0] + NF4_MIDPOINTS + [-m for m in NF4_MIDPOINTS]
    flat[:len(values)] = np.asarray(values, np.float32)
  return flat.reshape(shape)


def flax_kernel(case: dict) -> jax.Array:
  """The case's weight in Flax layout (in, out), in the case's dtype."""
  x = make_input(case)
  assert hashlib.sha256(x.tobytes()).hexdigest() == case["input_sha256"], (
      "NumPy's random stream changed; regenerate the vectors.")
  x = jnp.asarray(x).astype(case["dtype"])
  return x.T if x.ndim == 2 else x


def spec_of(case: dict) -> nf4.NF4:
  return nf4.NF4(block_size=case["blocksize"], double_quant=case["double_quant"],
                 quant_type=case["quant_type"], compute_dtype=None)


def f32_from_hex(text: str) -> np.ndarray:
  return np.frombuffer(bytes.fromhex(text), "<f4")


@pytest.fixture(scope="module")
def quantized():
  return {name: nf4.quantize_array(flax_kernel(c), spec_of(c)) for name, c in CASES.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_packed_codes_and_absmax_are_bit_exact(name, quantized):
  case = CASES[name]
  state = bnb.to_bnb(quantized[name])
  assert state["weight"].shape == tuple(case["packed_shape"])
  assert state["weight"].reshape(-1).tobytes().hex() == case["packed_hex"]
  if not case["double_quant"]:
    np.testing.assert_array_equal(state["weight.absmax"], f32_from_hex(case["absmax_f32_hex"]))


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_dict_form(name, quantized):
  case = CASES[name]
  state = bnb.to_bnb(quantized[name])
  assert sorted(k[len("weight."):] for k in state if k != "weight") == case["state_dict_keys"]
  info = json.loads(bytes(state[f"weight.quant_state.bitsandbytes__{case['quant_type']}"]))
  expected = json.loads(case["quant_state_json"])
  if case["double_quant"]:  # the offset's last bit is checked separately
    np.testing.assert_allclose(info.pop("nested_offset"), expected.pop("nested_offset"),
                               rtol=2e-7)
  assert info == expected


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c["double_quant"]))
def test_double_quant_fields(name, quantized):
  """Nested codes and scales are exact given bitsandbytes' offset.

  The offset itself is torch's ``absmax.mean()``, whose last bit depends on
  torch's summation order; ours is the correctly rounded float32 sum / n.
  """
  case = CASES[name]
  w = quantized[name]
  offset_ref = np.float32(case["offset"])
  assert abs(float(w.offset) - offset_ref) <= np.spacing(offset_ref)
  absmax_ref = f32_from_hex(case["dequantized_absmax_f32_hex"])
  # Exact when we use bitsandbytes' offset.
  plain = nf4.quantize_array(flax_kernel(case), spec_of(case) and nf4.NF4(
      block_size=case["blocksize"], double_quant=False, quant_type=case["quant_type"]))
  flat = nf4._absmax_to_torch_order(plain.absmax, plain.tiled)
  codes, nested, offset = nf4._double_quantize(flat, jnp.float32(offset_ref))
  assert np.asarray(codes).tobytes().hex() == case["absmax_uint8_hex"]
  np.testing.assert_array_equal(nested, np.float32(case["nested_absmax"]))
  assert offset == offset_ref
  # With our own offset the recovered absmax is within one dynamic-map step.
  ours = np.asarray(nf4._absmax_to_torch_order(w.scales(), w.tiled))
  nested_ref = np.repeat(np.float32(case["nested_absmax"]), 256)[:ours.size]
  step = np.max(np.diff(tables.DYNAMIC_MAP_256)) * nested_ref
  assert np.all(np.abs(ours - absmax_ref) <= step + 1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_dequantized_values_are_bit_exact(name):
  """Through from_bnb (bitsandbytes' own fields), dequantize equals bitsandbytes'."""
  case = CASES[name]
  state = reference_state_dict(case)
  w = bnb.from_bnb(state)
  out = np.asarray(w.dequantize(jnp.float32))
  out = out.T if out.ndim == 2 else out
  assert zlib.crc32(np.ascontiguousarray(out).tobytes()) == case["dequantized_crc32"]
  assert w.dtype == np.dtype(jnp.dtype(case["dtype"]))


def reference_state_dict(case: dict) -> dict:
  """bitsandbytes' state dict rebuilt from the stored fields."""
  qt = case["quant_type"]
  state = {
      "weight": np.frombuffer(bytes.fromhex(case["packed_hex"]), np.uint8).reshape(-1, 1),
      "weight.quant_map": tables.code_table(qt),
      f"weight.quant_state.bitsandbytes__{qt}": np.frombuffer(
          case["quant_state_json"].encode(), np.uint8),
  }
  if case["double_quant"]:
    state["weight.absmax"] = np.frombuffer(bytes.fromhex(case["absmax_uint8_hex"]), np.uint8)
    state["weight.nested_absmax"] = np.float32(case["nested_absmax"])
    state["weight.nested_quant_map"] = tables.DYNAMIC_MAP_256
  else:
    state["weight.absmax"] = f32_from_hex(case["absmax_f32_hex"])
  return state


@pytest.mark.parametrize("name", sorted(CASES))
def test_from_bnb_to_bnb_round_trip_is_identity(name):
  case = CASES[name]
  state = reference_state_dict(case)
  back = bnb.to_bnb(bnb.from_bnb(state))
  assert sorted(back) == sorted(state)
  for key in state:
    np.testing.assert_array_equal(np.asarray(back[key]).reshape(-1),
                                  np.asarray(state[key]).reshape(-1), err_msg=key)


def test_tiled_layout_is_a_transpose_of_bnb_bytes():
  case = CASES["nf4_f32_plain"]  # torch (32, 128): K=128 is a multiple of 64
  w = bnb.from_bnb(reference_state_dict(case))
  assert w.tiled and w.codes.shape == (64, 32) and w.absmax.shape == (2, 32)
  packed = np.frombuffer(bytes.fromhex(case["packed_hex"]), np.uint8)
  np.testing.assert_array_equal(np.asarray(w.codes).T.reshape(-1), packed)


def test_flat_layout_keeps_bnb_buffers():
  case = CASES["nf4_f32_dq_flat_odd"]  # torch (7, 63): 441 elements, odd
  w = bnb.from_bnb(reference_state_dict(case))
  assert not w.tiled and w.codes.shape == (221,) and w.shape == (63, 7)
  assert case["packed_hex"].endswith("7")  # the odd-length pad is code 7 (0.0)


def test_from_bnb_rejects_foreign_code_table():
  state = reference_state_dict(CASES["nf4_f32_plain"])
  state["weight.quant_map"] = tables.code_table("fp4")
  with pytest.raises(ValueError, match="quant_map"):
    bnb.from_bnb(state)


def test_to_bnb_rejects_stacked_arrays():
  w = nf4.quantize_array(jnp.ones((2, 64, 8)), nf4.NF4(), stack_ndim=1)
  with pytest.raises(ValueError, match="Slice it first"):
    bnb.to_bnb(w)
  assert bnb.to_bnb(jax.tree.map(lambda leaf: leaf[1], w))["weight"].shape == (256, 1)


def test_from_bnb_dense_general_kernel_shape():
  case = CASES["nf4_f32_plain"]  # torch (32, 128) -> Flax (128, 32) -> (128, 4, 8)
  w = bnb.from_bnb(reference_state_dict(case), kernel_shape=(128, 4, 8))
  assert w.shape == (128, 4, 8) and w.in_shape == (128,)
  dense = bnb.from_bnb(reference_state_dict(case)).dequantize()
  np.testing.assert_array_equal(w.dequantize().reshape(128, 32), dense)
