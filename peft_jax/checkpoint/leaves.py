"""Trees of arrays <-> (plain arrays, JSON manifest), rebuilt only from types we own.

A checkpoint's manifest lists every stored array (shape, dtype, CRC-32) and
every quantized leaf by a *type tag* from the closed table
:data:`LEAF_TYPES` (``{"nf4": NF4Array}``); a file can never name a class or
a function. Each static field of a quantized leaf is checked against the
stored arrays: the expected codes/scales shapes and dtypes are derived by the
same code that builds such an array (``quantize_array`` under
``jax.eval_shape``, no data touched), so a manifest that lies about shapes,
dtypes, block size or quant type is refused before anything runs on it.
"""

from __future__ import annotations

import concurrent.futures
import os
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax import targeting
from peft_jax.checkpoint import untrusted as ut
from peft_jax.quant import tables
from peft_jax.quant.nf4 import NF4, NF4Array, is_quantized, quantize_array

# The only leaf types a checkpoint can rebuild. Never extended from a file.
LEAF_TYPES: dict[str, type] = {"nf4": NF4Array}
# Version-1 checkpoints named the class; this exact string means "nf4".
_LEGACY_CLASS_NAMES = {"peft_jax.quant.nf4.NF4Array": "nf4"}
_NF4_ARRAYS = ("codes", "absmax", "nested_absmax", "offset")
_NF4_STATIC = ("kernel_shape", "in_ndim", "dtype", "block_size", "quant_type", "compute_dtype")
ARRAY_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                "uint64", "float16", "bfloat16", "float32", "float64")
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_MAX_DIM, _MAX_NDIM = 2**40, 16
CHECKSUM_CHUNK = 16 * 2**20  # bytes; chunks are hashed in parallel (zlib frees the GIL)


# -- checksums ----------------------------------------------------------------------
def _bytes(array: Any) -> memoryview:
  array = np.ascontiguousarray(np.asarray(array))
  return memoryview(array.reshape(-1).view(np.uint8))


def _crc_chunks(data: memoryview) -> list[memoryview]:
  return [data[i:i + CHECKSUM_CHUNK] for i in range(0, max(len(data), 1), CHECKSUM_CHUNK)]


def checksums(arrays: Mapping[str, Any]) -> dict[str, list[int]]:
  """CRC-32 of each array's bytes, per 16 MiB chunk: ``{path: [crc, ...]}``."""
  jobs = [(path, chunk) for path, a in arrays.items() for chunk in _crc_chunks(_bytes(a))]
  workers = min(len(jobs), os.cpu_count() or 1) or 1
  if workers == 1:
    crcs = [zlib.crc32(chunk) for _, chunk in jobs]
  else:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      crcs = list(pool.map(lambda job: zlib.crc32(job[1]), jobs))
  out: dict[str, list[int]] = {path: [] for path in arrays}
  for (path, _), crc in zip(jobs, crcs):
    out[path].append(crc)
  return out


# -- encoding -----------------------------------------------------------------------
def _static_json(name: str, value: Any) -> Any:
  if name == "kernel_shape":
    return {"tuple": [int(d) for d in value]}
  if name in ("dtype", "compute_dtype"):
    return None if value is None else {"dtype": jnp.dtype(value).name}
  return value


def encode_tree(tree: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  """``(arrays nested dict, array specs, quantized leaf specs)`` of a params tree."""
  arrays, quantized = {}, {}
  for path, leaf in targeting.flatten(tree).items():
    if is_quantized(leaf):
      tag = next((t for t, cls in LEAF_TYPES.items() if type(leaf) is cls), None)
      if tag is None:
        raise TypeError(f"Leaf {path!r}: cannot store quantized type {type(leaf).__name__}.")
      present = [n for n in _NF4_ARRAYS if getattr(leaf, n) is not None]
      for name in present:
        arrays[f"{path}/{name}"] = getattr(leaf, name)
      quantized[path] = {"type": tag, "arrays": present,
                         "static": {n: _static_json(n, getattr(leaf, n)) for n in _NF4_STATIC}}
    elif isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
      arrays[path] = leaf
    else:
      raise TypeError(f"Leaf {path!r} of type {type(leaf).__name__} is not an array.")
  crcs = checksums(arrays)
  specs = {p: {"shape": list(np.shape(a)), "dtype": jnp.dtype(a.dtype).name, "crc32": crcs[p]}
           for p, a in arrays.items()}
  return targeting.unflatten({p: jnp.asarray(a) for p, a in arrays.items()}), specs, quantized


# -- decoding -----------------------------------------------------------------------
def _dtype(file, field, value, names) -> np.dtype:
  if isinstance(value, Mapping) and set(value) == {"dtype"}:  # version-1 static form
    value = value["dtype"]
  ut.require_str(file, field, value, names)
  return np.dtype(jnp.dtype(value))


def _shape(file, field, value, *, low: int = 0) -> tuple[int, ...]:
  if isinstance(value, Mapping) and set(value) == {"tuple"}:
    value = value["tuple"]
  if not isinstance(value, list) or len(value) > _MAX_NDIM:
    raise ut.malformed(file, field, value, f"expected a list of at most {_MAX_NDIM} integers")
  return tuple(ut.require_int(file, field, d, low=low, high=_MAX_DIM) for d in value)


def array_specs(file, specs: Any) -> dict[str, tuple[tuple[int, ...], np.dtype, list[int]]]:
  """Validated ``{path: (shape, dtype, crc32 chunks)}`` of a manifest's ``arrays``."""
  specs = ut.require_dict(file, "arrays", specs)
  out = {}
  for path, spec in specs.items():
    field = f"arrays[{ut.show(path, 60)}]"
    if not path or "//" in path or path.startswith("/") or path.endswith("/"):
      raise ut.malformed(file, field, path, "not a tree path")
    spec = ut.require_dict(file, field, spec)
    shape = _shape(file, f"{field}.shape", spec.get("shape"))
    dtype = _dtype(file, f"{field}.dtype", spec.get("dtype"), ARRAY_DTYPES)
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    crc = spec.get("crc32")
    want = max(1, -(-nbytes // CHECKSUM_CHUNK))
    if not isinstance(crc, list) or len(crc) != want:
      raise ut.malformed(file, f"{field}.crc32", crc, f"expected {want} CRC-32 values")
    out[path] = (shape, dtype, [ut.require_int(file, f"{field}.crc32", c, high=2**32 - 1)
                                for c in crc])
  return out


def verify(file, flat: Mapping[str, Any], specs: Mapping[str, Any]) -> None:
  """Restored arrays must be exactly the manifest's: same paths, shapes, dtypes, CRC-32."""
  if set(flat) != set(specs):
    extra, missing = sorted(set(flat) - set(specs)), sorted(set(specs) - set(flat))
    raise ut.FileFormatError(f"{file}: the stored arrays differ from the manifest "
                             f"(not listed: {extra[:5]}, missing: {missing[:5]}).")
  for path, a in flat.items():
    shape, dtype, _ = specs[path]
    if tuple(np.shape(a)) != shape or np.dtype(a.dtype) != dtype:
      raise ut.FileFormatError(f"{file}: array {path!r} is {np.dtype(a.dtype).name}"
                               f"{tuple(np.shape(a))}, the manifest says {dtype.name}{shape}.")
  crcs = checksums(flat)
  for path, (_, _, want) in specs.items():
    if crcs[path] != want:
      raise ut.FileFormatError(
          f"{file}: array {path!r} does not match its CRC-32 checksum (stored {want[:4]}, "
          f"read {crcs[path][:4]}): the checkpoint's data files are corrupted.")


def _nf4_leaf(file, path: str, spec: Any, flat: dict[str, Any]) -> NF4Array:
  """An ``NF4Array`` from validated static fields and arrays that fit them exactly."""
  field = f"quantized[{ut.show(path, 60)}]"
  static = ut.require_dict(file, f"{field}.static", spec.get("static"))
  if set(static) != set(_NF4_STATIC):
    raise ut.malformed(file, f"{field}.static", sorted(static), f"expected fields {_NF4_STATIC}")
  kernel_shape = _shape(file, f"{field}.kernel_shape", static["kernel_shape"], low=1)
  if not kernel_shape:
    raise ut.malformed(file, f"{field}.kernel_shape", kernel_shape, "empty")
  in_ndim = ut.require_int(file, f"{field}.in_ndim", static["in_ndim"], low=1,
                           high=len(kernel_shape))
  dtype = _dtype(file, f"{field}.dtype", static["dtype"], _FLOAT_DTYPES)
  compute = static["compute_dtype"]
  compute = None if compute is None else _dtype(file, f"{field}.compute_dtype", compute,
                                                _FLOAT_DTYPES)
  block = ut.require_int(file, f"{field}.block_size", static["block_size"], low=16, high=2**20)
  if block & (block - 1):
    raise ut.malformed(file, f"{field}.block_size", block, "not a power of two")
  quant_type = ut.require_str(file, f"{field}.quant_type", static["quant_type"],
                              tables.QUANT_TYPES)
  names = spec.get("arrays")
  if names not in (["codes", "absmax"], ["codes", "absmax", "nested_absmax", "offset"]):
    raise ut.malformed(file, f"{field}.arrays", names,
                       "expected codes and absmax, plus nested_absmax and offset or neither")
  arrays = {}
  for name in names:
    if f"{path}/{name}" not in flat:
      raise ut.malformed(file, f"{field}.arrays", names, f"array {path}/{name} is not stored")
    arrays[name] = flat.pop(f"{path}/{name}")
  k = int(np.prod(kernel_shape[:in_ndim]))
  codes_ndim = np.ndim(arrays["codes"])
  stack = tuple(np.shape(arrays["codes"])[:codes_ndim - (2 if k % block == 0 else 1)])
  nf4 = NF4(block_size=block, double_quant=len(names) == 4, compute_dtype=compute,
            quant_type=quant_type)
  try:
    want = jax.eval_shape(
        lambda x: quantize_array(x, nf4, stack_ndim=len(stack), in_ndim=in_ndim),
        jax.ShapeDtypeStruct(stack + kernel_shape, dtype))
  except (ValueError, TypeError, OverflowError) as error:
    raise ut.malformed(file, field, static, f"not a valid quantized array: {error}") from None
  for name, a in arrays.items():
    expected = getattr(want, name)
    if tuple(np.shape(a)) != expected.shape or np.dtype(a.dtype) != expected.dtype:
      raise ut.malformed(
          file, f"{field}.{name}", f"{np.dtype(a.dtype).name}{tuple(np.shape(a))}",
          f"kernel {kernel_shape} (in_ndim={in_ndim}, block {block}, {quant_type}) stored "
          f"this way needs {np.dtype(expected.dtype).name}{expected.shape}")
  return NF4Array(codes=arrays["codes"], absmax=arrays["absmax"],
                  nested_absmax=arrays.get("nested_absmax"), offset=arrays.get("offset"),
                  kernel_shape=kernel_shape, in_ndim=in_ndim, dtype=dtype, block_size=block,
                  quant_type=quant_type, compute_dtype=compute)


def decode_tree(file, flat: Mapping[str, Any], quantized: Any) -> dict[str, Any]:
  """Rebuilds a tree: plain arrays as they are, quantized leaves from :data:`LEAF_TYPES`."""
  quantized = ut.require_dict(file, "quantized", quantized)
  flat = dict(flat)
  leaves = {}
  for path, spec in quantized.items():
    field = f"quantized[{ut.show(path, 60)}]"
    spec = ut.require_dict(file, field, spec)
    legacy = spec.get("class")
    tag = spec.get("type", _LEGACY_CLASS_NAMES.get(legacy) if isinstance(legacy, str) else None)
    if not isinstance(tag, str) or tag not in LEAF_TYPES:
      raise ut.malformed(file, f"{field}.type", spec.get("type", spec.get("class")),
                         f"not a leaf type peft_jax rebuilds (known: {sorted(LEAF_TYPES)})")
    leaves[path] = _nf4_leaf(file, path, spec, flat)
  flat.update(leaves)
  try:
    return targeting.unflatten(flat)
  except (ValueError, TypeError, KeyError) as error:
    raise ut.FileFormatError(f"{file}: the tree paths in the manifest clash: {error}") from None
