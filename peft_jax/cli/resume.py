"""Resumable ``peft-jax finetune`` state: one file, written atomically.

``<output>/resume.npz`` holds every leaf of the train state (trainable tree
and optimizer state) as raw bytes with its dtype, shape and CRC32, the step,
the data position, the losses so far and the run's settings. It is written to
a temporary file and renamed over the old one, so a crash at any point leaves
the previous file or the new one, never a mix. It is read with
``allow_pickle=False`` and rebuilt into the structure of a freshly
initialised state: the file supplies numbers only, never structure or code.
"""

from __future__ import annotations

import json
import os
import pathlib
import zipfile
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RESUME_FILE = "resume.npz"
_FORMAT = "peft-jax-resume"
_VERSION = 1


class ResumeError(Exception):
  """The resume file is missing, damaged or from a different run."""


def resume_path(out: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(out) / RESUME_FILE


def _is_key(leaf: Any) -> bool:
  return jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _leaf_bytes(leaf: Any) -> np.ndarray:
  array = np.asarray(jax.random.key_data(leaf) if _is_key(leaf) else leaf)
  return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def save_state(out: str | pathlib.Path, state: Any, *, step: int, losses: list[float],
               settings: dict[str, Any]) -> pathlib.Path:
  """Writes ``state`` (any pytree of arrays) and the run's position atomically.

  Args:
    out: the run directory.
    state: the train state after ``step`` steps.
    step: steps applied (also the number of training batches consumed).
    losses: the training losses of those steps.
    settings: what must match on resume (JSON-ready).

  Returns:
    The file written.
  """
  path = resume_path(out)
  leaves = jax.tree.leaves(jax.device_get(state))
  arrays, described = {}, []
  for i, leaf in enumerate(leaves):
    raw = _leaf_bytes(leaf)
    arrays[f"leaf_{i:06d}"] = raw
    dtype = np.asarray(jax.random.key_data(leaf) if _is_key(leaf) else leaf).dtype
    described.append({"dtype": dtype.name, "shape": list(np.shape(leaf)),
                      "key": bool(_is_key(leaf)), "crc32": zlib.crc32(raw.tobytes())})
  meta = {"format": _FORMAT, "version": _VERSION, "step": int(step),
          "losses": [float(x) for x in losses], "settings": settings, "leaves": described}
  arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8)
  tmp = path.with_name(f".{RESUME_FILE}.tmp-{os.getpid()}")
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return path


def read_meta(out: str | pathlib.Path) -> dict[str, Any]:
  """The step, losses and settings stored in ``<out>/resume.npz``.

  Raises:
    ResumeError: no such file, or it is not a peft-jax resume file.
  """
  path = resume_path(out)
  if not path.is_file():
    raise ResumeError(f"--resume: {path} does not exist (no interrupted run to continue).")
  try:
    with np.load(path, allow_pickle=False) as data:
      meta = json.loads(data["meta"].tobytes().decode("utf-8"))
  except (OSError, ValueError, KeyError, UnicodeDecodeError, zipfile.BadZipFile) as error:
    raise ResumeError(f"{path} is not a readable peft-jax resume file: {error}") from None
  if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
    raise ResumeError(f"{path} is not a peft-jax resume file.")
  if meta.get("version") != _VERSION:
    raise ResumeError(f"{path} has resume format version {meta.get('version')!r}; this "
                      f"peft-jax reads version {_VERSION}.")
  return meta


def load_state(out: str | pathlib.Path, template: Any) -> tuple[Any, dict[str, Any]]:
  """Rebuilds the saved state in the structure of ``template``.

  Args:
    out: the run directory.
    template: a freshly initialised state of the same run (structure,
      shapes and dtypes are checked against it).

  Returns:
    ``(state, meta)``.

  Raises:
    ResumeError: the file is missing or damaged, or does not fit ``template``.
  """
  meta = read_meta(out)
  path = resume_path(out)
  leaves, treedef = jax.tree.flatten(template)
  described = meta.get("leaves")
  if not isinstance(described, list) or len(described) != len(leaves):
    raise ResumeError(f"{path} holds {len(described or [])} arrays; this run's state has "
                      f"{len(leaves)}. It is from a different method or model.")
  try:
    restored = _read_leaves(path, leaves, described)
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
    raise ResumeError(f"{path} is damaged: {error}") from None
  return jax.tree.unflatten(treedef, restored), meta


def _read_leaves(path: pathlib.Path, leaves: list, described: list) -> list:
  restored = []
  with np.load(path, allow_pickle=False) as data:
    for i, (leaf, info) in enumerate(zip(leaves, described)):
      want = np.asarray(jax.random.key_data(leaf) if _is_key(leaf) else leaf)
      if info.get("dtype") != want.dtype.name or info.get("shape") != list(np.shape(leaf)):
        raise ResumeError(f"{path}: array {i} is {info.get('dtype')}{info.get('shape')}, this "
                          f"run needs {want.dtype.name}{list(np.shape(leaf))}.")
      raw = data[f"leaf_{i:06d}"]
      if raw.dtype != np.uint8 or zlib.crc32(raw.tobytes()) != info.get("crc32"):
        raise ResumeError(f"{path}: array {i} fails its checksum (the file is damaged).")
      value = raw.view(want.dtype).reshape(want.shape)
      if _is_key(leaf):
        value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(leaf))
      restored.append(jnp.asarray(value) if not _is_key(leaf) else value)
  return restored


def remove(out: str | pathlib.Path) -> None:
  """Deletes ``<out>/resume.npz`` (after a run finished); nothing else."""
  path = resume_path(out)
  if path.is_file():
    path.unlink()
