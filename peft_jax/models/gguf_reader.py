"""A fast GGUF header reader for files with large vocabularies.

`gguf.GGUFReader` builds a numpy view per metadata element; on Gemma 3's
262,144-token vocabulary (three arrays of that length) that takes most of a
minute. `GGUFFile` parses the same header with `struct` and `np.frombuffer`
in well under a second, and offers the part of `GGUFReader`'s interface the
loaders use: `fields[key].contents()` and `tensors` with `name`, `shape`
(GGUF order), `tensor_type` and `data` (a read-only memory map, quantized
types as bytes, exactly as `GGUFReader` lays them out for
`gguf.quants.dequantize`).

Every count, length and offset is checked against the file size before it
is used, so a corrupt or hostile header is a `ValueError`, never a huge
allocation or a read past the end.
"""

from __future__ import annotations

import os
import pathlib
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from peft_jax.models._imports import require as _require

__all__ = ["GGUFFile", "GGUFTensor", "open_gguf_fast"]

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_MAX_DIMS = 4
_DEFAULT_ALIGNMENT = 32
# GGUF value type -> numpy dtype (little-endian); 8 is string, 9 is array.
_SCALAR_TYPES = {
    0: np.dtype("<u1"),
    1: np.dtype("<i1"),
    2: np.dtype("<u2"),
    3: np.dtype("<i2"),
    4: np.dtype("<u4"),
    5: np.dtype("<i4"),
    6: np.dtype("<f4"),
    7: np.dtype("?"),
    10: np.dtype("<u8"),
    11: np.dtype("<i8"),
    12: np.dtype("<f8"),
}
_STRING, _ARRAY = 8, 9
# Plain (unquantized) tensor types and their numpy dtypes, as GGUFReader maps them.
_PLAIN_TENSOR_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
}


class _Field:
    """One metadata value; `contents()` as `gguf.ReaderField.contents()` returns it."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def contents(self) -> Any:
        return self.value


@dataclass(frozen=True)
class GGUFTensor:
    """A tensor's header entry and its bytes.

    Attributes:
      name: the GGUF tensor name, e.g. `blk.0.attn_q.weight`.
      shape: dimensions in GGUF order (fastest-varying first).
      tensor_type: a `gguf.GGMLQuantizationType`.
      data: read-only memory-mapped data in numpy order, bytes per row for
        quantized types.
    """

    name: str
    shape: tuple[int, ...]
    tensor_type: Any
    data: np.ndarray


class _Cursor:
    def __init__(self, buffer: memoryview, path: pathlib.Path):
        self.buffer, self.offset, self.path = buffer, 0, path

    def take(self, size: int) -> memoryview:
        if size < 0 or self.offset + size > len(self.buffer):
            raise ValueError(
                f"GGUF file {self.path} is truncated or corrupt: a header entry "
                f"at byte {self.offset} needs {size} bytes past the end of the file."
            )
        view = self.buffer[self.offset : self.offset + size]
        self.offset += size
        return view

    def unpack(self, fmt: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.unpack("<Q"))
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise ValueError(
                f"GGUF file {self.path} has a string that is not UTF-8 before byte "
                f"{self.offset}."
            ) from None

    def count(self, item_bytes: int) -> int:
        count = self.unpack("<Q")
        if count * item_bytes > len(self.buffer) - self.offset:
            raise ValueError(
                f"GGUF file {self.path} claims {count} items at byte {self.offset}, "
                "more than the file holds."
            )
        return count

    def value(self, value_type: int) -> Any:
        if value_type in _SCALAR_TYPES:
            dtype = _SCALAR_TYPES[value_type]
            return np.frombuffer(self.take(dtype.itemsize), dtype)[0].item()
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type = self.unpack("<I")
            if item_type == _STRING:
                return [self.string() for _ in range(self.count(8))]
            if item_type in _SCALAR_TYPES:
                dtype = _SCALAR_TYPES[item_type]
                count = self.count(dtype.itemsize)
                return np.frombuffer(self.take(count * dtype.itemsize), dtype).tolist()
            raise ValueError(
                f"GGUF file {self.path} has an array of value type {item_type} "
                "(nested arrays are not read)."
            )
        raise ValueError(f"GGUF file {self.path} has unknown value type {value_type}.")


class GGUFFile:
    """The metadata and tensor table of a GGUF file, tensors memory-mapped.

    Attributes:
      path: the file.
      fields: `{key: field}`; `field.contents()` is the value (lists for
        arrays).
      tensors: the tensors in file order.
    """

    def __init__(self, path: str | os.PathLike[str]):
        gguf = _require("gguf", "gguf", "Reading GGUF files")
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"No GGUF file at {self.path}.")
        mapped = np.memmap(self.path, dtype=np.uint8, mode="r")
        cursor = _Cursor(memoryview(mapped), self.path)
        magic = bytes(cursor.take(4))
        if magic != _MAGIC:
            raise ValueError(
                f"{self.path} is not a GGUF file: it starts with {magic!r}, not {_MAGIC!r}."
            )
        version = cursor.unpack("<I")
        if version not in _SUPPORTED_VERSIONS:
            raise ValueError(
                f"{self.path} is GGUF version {version}; this reader reads "
                f"{_SUPPORTED_VERSIONS} (little-endian)."
            )
        tensor_count = cursor.unpack("<Q")
        field_count = cursor.unpack("<Q")
        self.fields: dict[str, _Field] = {}
        for _ in range(field_count):
            key = cursor.string()
            if key in self.fields:
                raise ValueError(f"GGUF file {self.path} repeats metadata key {key!r}.")
            self.fields[key] = _Field(cursor.value(cursor.unpack("<I")))
        infos = []
        for _ in range(tensor_count):
            name = cursor.string()
            n_dims = cursor.unpack("<I")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise ValueError(f"GGUF tensor {name!r} has {n_dims} dimensions.")
            dims = struct.unpack(f"<{n_dims}Q", cursor.take(8 * n_dims))
            infos.append((name, dims, cursor.unpack("<I"), cursor.unpack("<Q")))
        alignment = int(self.fields.get("general.alignment", _Field(_DEFAULT_ALIGNMENT)).value)
        if alignment < 1:
            raise ValueError(f"GGUF file {self.path} has alignment {alignment}.")
        data_start = -(-cursor.offset // alignment) * alignment
        self.tensors: list[GGUFTensor] = []
        names = set()
        for name, dims, raw_type, offset in infos:
            if name in names:
                raise ValueError(f"GGUF file {self.path} repeats tensor {name!r}.")
            names.add(name)
            try:
                tensor_type = gguf.GGMLQuantizationType(raw_type)
            except ValueError:
                tensor_type = None
            if tensor_type not in gguf.GGML_QUANT_SIZES:
                raise ValueError(f"GGUF tensor {name!r} has unknown type {raw_type}.")
            numpy_shape = tuple(reversed(dims))
            plain = _PLAIN_TENSOR_DTYPES.get(tensor_type.name)
            if plain is not None:
                dtype, data_shape = np.dtype(plain), numpy_shape
            else:
                dtype = np.dtype(np.uint8)
                data_shape = gguf.quants.quant_shape_to_byte_shape(numpy_shape, tensor_type)
            n_bytes = int(np.prod(data_shape, dtype=np.int64)) * dtype.itemsize
            start = data_start + offset
            if start + n_bytes > len(mapped) or offset % alignment:
                raise ValueError(
                    f"GGUF tensor {name!r} ({tensor_type.name}, {numpy_shape}) lies "
                    f"outside the file or off the {alignment}-byte alignment."
                )
            data = mapped[start : start + n_bytes].view(dtype).reshape(data_shape)
            self.tensors.append(GGUFTensor(name, dims, tensor_type, data))


def open_gguf_fast(path: str | os.PathLike[str]) -> GGUFFile:
    """Opens a GGUF file with `GGUFFile` (see the module docstring).

    Raises:
      FileNotFoundError: if `path` is not a file.
      ValueError: if it is not a readable little-endian GGUF v2/v3 file.
    """
    return GGUFFile(path)
