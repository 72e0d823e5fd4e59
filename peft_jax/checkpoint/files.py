"""Replacing checkpoints without losing one, and one writer per run directory.

* :func:`replace_dir` swaps a finished new folder into place: the new
  checkpoint is written completely to a hidden sibling first, then exchanged
  with the old one in one atomic ``renameat2(RENAME_EXCHANGE)`` (Linux; two
  renames elsewhere), and only then is the old one deleted. A crash at any
  moment leaves the old or the new checkpoint whole at ``path``.
* :func:`check_replaceable` refuses to replace anything that is not
  recognisably ours: a file, or a folder that is not a peft_jax checkpoint
  (an empty folder is fine).
* :class:`WriterLock` is a lock file naming its owner's pid and host; a lock
  whose pid is dead on this host is stale and taken over.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable

_TMP_TAG = ".peft_jax-tmp-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
LOCK_NAME = ".peft_jax.lock"


def temp_sibling(path: str) -> str:
  """A fresh hidden sibling of ``path`` for writing its replacement."""
  parent, name = os.path.split(path)
  return os.path.join(parent, f".{name}{_TMP_TAG}{uuid.uuid4().hex[:12]}")


def _libc_renameat2() -> Callable | None:
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    func = libc.renameat2
  except (OSError, AttributeError):
    return None
  func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  return func


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps two paths; False when the platform cannot."""
  func = _libc_renameat2()
  if func is None:
    return False
  if func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: file system cannot exchange
    return False
  raise OSError(err, os.strerror(err), b)


def replace_dir(new: str, path: str) -> None:
  """Moves the finished folder ``new`` to ``path``, replacing what is there.

  The old contents stay readable at ``path`` until the new ones are there.
  """
  if not os.path.lexists(path):
    os.rename(new, path)
    return
  if _exchange(new, path):
    shutil.rmtree(new)  # now the old checkpoint
    return
  old = temp_sibling(path)
  os.rename(path, old)
  os.rename(new, path)
  shutil.rmtree(old)


def remove_stale_temps(path: str) -> None:
  """Deletes hidden replacement folders of ``path`` left by a killed save."""
  parent, name = os.path.split(path)
  if not os.path.isdir(parent):
    return
  for entry in os.listdir(parent):
    if entry.startswith(f".{name}{_TMP_TAG}"):
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def check_replaceable(path: str, is_ours: Callable[[str], bool], what: str) -> None:
  """Raises unless ``path`` is absent, an empty folder or recognisably ours."""
  if not os.path.lexists(path):
    return
  if os.path.islink(path) or not os.path.isdir(path):
    raise FileExistsError(f"{path} exists and is not a folder; refusing to replace it "
                          f"with {what}.")
  if os.listdir(path) and not is_ours(path):
    raise FileExistsError(f"{path} is a folder but not a {what}; refusing to delete it. "
                          "Choose another path or remove it yourself.")


# -- writer lock -------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WriterLock:
  """``directory/.peft_jax.lock``: one writer per directory.

  Raises:
    RuntimeError: another live writer (named by pid and host) holds it.
  """

  def __init__(self, directory: str):
    self.path = os.path.join(directory, LOCK_NAME)
    self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex}
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if not self._stale(holder):
          raise RuntimeError(
              f"{directory} is being written by another checkpoint manager (pid "
              f"{holder.get('pid')} on {holder.get('host')}, lock file {self.path}). Two "
              "writers would lose steps; close the other one, or delete the lock file if "
              "that process is gone.") from None
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(self.owner, f)
      return
    raise RuntimeError(f"Could not take the writer lock {self.path}.")

  def _holder(self) -> dict:
    try:
      with open(self.path, encoding="utf-8") as f:
        holder = json.load(f)
      return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
      return {}

  def _stale(self, holder: dict) -> bool:
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
      return False  # another host's lock (or unreadable): never taken over silently
    return not _pid_alive(pid)

  def release(self) -> None:
    if self._holder().get("token") == self.owner["token"]:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
