"""Generates tests/data/bnb_reference.json with bitsandbytes itself.

Run by hand (never by the test suite) in a virtualenv with torch and
bitsandbytes, e.g. ``pip install torch==2.13.0 bitsandbytes==0.50.2``::

    python tests/data/make_bnb_reference.py

Inputs are PyTorch-layout ``(out, in)`` weights drawn with NumPy's
``default_rng(seed).standard_normal`` (float32), then edited (zero blocks,
outliers, exact ties) as each case says; the JSON stores the SHA-256 of the
input bytes so a test notices if NumPy's stream ever changes. Outputs are
bitsandbytes' ``quantize_4bit`` fields (packed bytes, absmax, nested fields),
the packed state-dict JSON, and a CRC of the dequantized float32 values from
the pure-PyTorch reference kernel (the native CPU dequantizer is wrong for
last dims that are not multiples of the block size, ALGORITHMS.md section 0).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import zlib

import numpy as np
import torch

import bitsandbytes
import bitsandbytes.functional as F
from bitsandbytes.backends.default import ops as default_ops

OUT = pathlib.Path(__file__).with_name("bnb_reference.json")

NF4_MIDPOINTS = [
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
]

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}


def make_input(case: dict) -> np.ndarray:
  """The float32 input of a case (the test suite has a copy of this function)."""
  shape = tuple(case["torch_shape"])
  x = np.random.default_rng(case["seed"]).standard_normal(shape, dtype=np.float32)
  x = x * np.float32(case.get("scale", 1.0))
  flat = x.reshape(-1)
  for start, stop in case.get("zero_ranges", []):
    flat[start:stop] = 0.0
  for index, value in case.get("set_values", []):
    flat[index] = np.float32(value)
  if case.get("ties"):
    # First block: absmax exactly 1, then every midpoint (scaled value == x).
    values = [1.0] + NF4_MIDPOINTS + [-m for m in NF4_MIDPOINTS]
    flat[:len(values)] = np.asarray(values, np.float32)
  return flat.reshape(shape)


CASES = [
    dict(name="nf4_f32_plain", torch_shape=[32, 128], seed=1, dtype="float32",
         quant_type="nf4", blocksize=64, double_quant=False),
    dict(name="fp4_f32_plain", torch_shape=[32, 128], seed=2, dtype="float32",
         quant_type="fp4", blocksize=64, double_quant=False),
    dict(name="nf4_f32_dq_partial_nested", torch_shape=[48, 256], seed=3,
         dtype="float32", quant_type="nf4", blocksize=32, double_quant=True),
    dict(name="nf4_bf16_dq", torch_shape=[48, 128], seed=4, dtype="bfloat16",
         quant_type="nf4", blocksize=64, double_quant=True, scale=0.02),
    dict(name="nf4_f16_bs32", torch_shape=[40, 64], seed=5, dtype="float16",
         quant_type="nf4", blocksize=32, double_quant=False),
    dict(name="nf4_f32_dq_flat_odd", torch_shape=[7, 63], seed=6, dtype="float32",
         quant_type="nf4", blocksize=64, double_quant=True),
    dict(name="fp4_f32_flat", torch_shape=[5, 100], seed=7, dtype="float32",
         quant_type="fp4", blocksize=64, double_quant=False),
    dict(name="nf4_zero_block_outliers", torch_shape=[16, 256], seed=8,
         dtype="float32", quant_type="nf4", blocksize=128, double_quant=True,
         zero_ranges=[[768, 896]], set_values=[[1287, 50.0], [2000, -1e4]]),
    dict(name="fp4_zero_block_outliers", torch_shape=[16, 256], seed=8,
         dtype="float32", quant_type="fp4", blocksize=128, double_quant=False,
         zero_ranges=[[768, 896]], set_values=[[1287, 50.0], [2000, -1e4],
                                                [5, 1e-3], [6, -1e-3], [7, 0.0]]),
    dict(name="fp4_bf16_bs256_dq", torch_shape=[16, 512], seed=9, dtype="bfloat16",
         quant_type="fp4", blocksize=256, double_quant=True),
    dict(name="nf4_ties", torch_shape=[4, 64], seed=10, dtype="float32",
         quant_type="nf4", blocksize=64, double_quant=False, ties=True),
    dict(name="nf4_f32_dq_bs32", torch_shape=[24, 96], seed=11, dtype="float32",
         quant_type="nf4", blocksize=32, double_quant=True),
    dict(name="nf4_1d_flat_dq", torch_shape=[1000], seed=12, dtype="float32",
         quant_type="nf4", blocksize=64, double_quant=True),
]


def f32_hex(t: torch.Tensor) -> str:
  """Little-endian float32 bytes as hex: exact and compact."""
  return t.float().numpy().astype("<f4").tobytes().hex()


def run_case(case: dict) -> dict:
  x32 = make_input(case)
  x = torch.from_numpy(x32).to(TORCH_DTYPES[case["dtype"]])
  packed, state = F.quantize_4bit(
      x, blocksize=case["blocksize"], compress_statistics=case["double_quant"],
      quant_type=case["quant_type"])
  # Reference (pure PyTorch) dequantization, float32.
  absmax = state.absmax
  if state.nested:
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
  dequant = default_ops._dequantize_4bit_compute(
      packed.reshape(-1), absmax.float(), state.code, state.blocksize,
      tuple(x.shape), torch.float32)
  packed_state = state.as_dict(packed=True)
  qs_key = f"quant_state.bitsandbytes__{case['quant_type']}"
  out = dict(case)
  out.update(
      input_sha256=hashlib.sha256(x32.tobytes()).hexdigest(),
      packed_hex=packed.numpy().reshape(-1).tobytes().hex(),
      packed_shape=list(packed.shape),
      quant_state_json=bytes(packed_state[qs_key].numpy().tolist()).decode(),
      state_dict_keys=sorted(packed_state),
      dequantized_crc32=zlib.crc32(dequant.numpy().astype(np.float32).tobytes()),
  )
  if state.nested:
    out.update(
        absmax_uint8_hex=state.absmax.numpy().tobytes().hex(),
        nested_absmax=state.state2.absmax.numpy().tolist(),
        offset=float(state.offset.item()),
        dequantized_absmax_f32_hex=f32_hex(absmax),
    )
  else:
    out.update(absmax_f32_hex=f32_hex(state.absmax))
  return out


def main():
  torch.set_num_threads(1)
  result = {
      "_meta": {
          "generator": "tests/data/make_bnb_reference.py",
          "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
          "numpy": np.__version__,
          "layout": "torch (out, in); packed bytes flattened; *_hex are raw little-endian bytes",
      },
      "cases": [run_case(c) for c in CASES],
  }
  OUT.write_text(json.dumps(result, indent=1))
  print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
  main()
