"""Helpers shared by the hostile-file tests: snapshots of folders, JSON edits."""

import hashlib
import json
import os
import pathlib


def snapshot(root) -> dict[str, str]:
  """``{relative path: sha256}`` of every file (and ``dir`` for folders) under ``root``."""
  root = pathlib.Path(root)
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames:
      out[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
    for name in filenames:
      path = os.path.join(dirpath, name)
      out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return out


def edit_json(path, edit) -> None:
  """Rewrites the JSON file ``path`` as ``edit(content)`` returns it (or edits in place)."""
  path = pathlib.Path(path)
  content = json.loads(path.read_text())
  result = edit(content)
  path.write_text(json.dumps(content if result is None else result))
