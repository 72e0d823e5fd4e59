"""Writes never lose data: overwrite only our checkpoints, crash-safe swaps, one writer."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax as pj
from peft_jax import checkpoint
from peft_jax.checkpoint import files
from peft_jax.cli.main import main
from hostile_helpers import snapshot

CONFIG = pj.LoRAConfig(rank=2, target_modules=("m",))
OLD = {"m": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}}


def _value(path):
  return float(checkpoint.restore(path)[0]["m"]["lora_a"][0, 0])


# -- overwrite replaces only what is recognisably ours ----------------------------------
def _not_ours(tmp_path, kind, name):
  target = tmp_path / name
  if kind == "file":
    target.write_text("precious")
  elif kind == "folder":
    target.mkdir()
    (target / "work.txt").write_text("precious")
  elif kind == "fake_checkpoint":  # has a manifest/ folder, but no manifest we wrote
    (target / "manifest").mkdir(parents=True)
    (target / "manifest" / "notes").write_text("precious")
  elif kind == "symlink":
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "f").write_text("precious")
    target.symlink_to(tmp_path / "elsewhere")
  return target


@pytest.mark.parametrize("kind", ["file", "folder", "fake_checkpoint", "symlink"])
@pytest.mark.parametrize("writer", ["save", "save_params", "save_step"])
def test_overwrite_refuses_what_is_not_a_checkpoint(tmp_path, kind, writer):
  target = _not_ours(tmp_path, kind, "5" if writer == "save_step" else "target")
  before = snapshot(tmp_path)
  with pytest.raises(FileExistsError, match="refusing"):
    if writer == "save":
      checkpoint.save(target, OLD, CONFIG, overwrite=True)
    elif writer == "save_params":
      checkpoint.save_params(target, OLD, overwrite=True)
    else:
      checkpoint.save(tmp_path, OLD, CONFIG, step=5, overwrite=True)
  assert snapshot(tmp_path) == before


def test_step_must_be_a_non_negative_integer(tmp_path):
  for step in ("../x", -1, 1.5, True):
    with pytest.raises(ValueError, match="step"):
      checkpoint.save(tmp_path, OLD, CONFIG, step=step)
  assert os.listdir(tmp_path) == []


def test_overwrite_replaces_our_checkpoint_and_leaves_no_temporaries(tmp_path):
  path = checkpoint.save(tmp_path / "c", OLD, CONFIG)
  (tmp_path / "empty").mkdir()
  checkpoint.save(tmp_path / "empty", OLD, CONFIG, overwrite=True)  # an empty folder is fine
  new = {"m": {"lora_a": jnp.full((4, 2), 7.0), "lora_b": jnp.ones((2, 3))}}
  checkpoint.save(path, new, CONFIG, overwrite=True)
  assert _value(path) == 7.0 and _value(tmp_path / "empty") == 1.0
  assert sorted(os.listdir(tmp_path)) == ["c", "empty"]
  with pytest.raises(FileExistsError, match="overwrite=True"):
    checkpoint.save(path, new, CONFIG)


def test_cli_merge_overwrite_refuses_a_working_folder(tmp_path, capsys):
  adapter = checkpoint.save(tmp_path / "adapter", OLD, CONFIG)
  work = tmp_path / "work"
  work.mkdir()
  (work / "train.py").write_text("precious")
  before = snapshot(tmp_path)
  for fmt in ("orbax", "hf"):
    with pytest.raises(SystemExit) as exit_info:
      main(["merge", "--adapter", adapter, "--output", str(work), "--overwrite", "--format", fmt])
    assert exit_info.value.code == 2
    assert "refusing to replace" in capsys.readouterr().err
    with pytest.raises(SystemExit):
      main(["merge", "--adapter", adapter, "--output", str(work), "--format", fmt])
    assert "pass --overwrite" in capsys.readouterr().err
  assert snapshot(tmp_path) == before


# -- crashes: SIGKILL at several points of a save ------------------------------------
_CRASHER = textwrap.dedent("""
    import asyncio, os, shutil, sys, time
    import jax.numpy as jnp
    import peft_jax as pj
    from peft_jax import checkpoint
    from peft_jax.checkpoint import files
    root, marker, point = sys.argv[1], sys.argv[2], sys.argv[3]
    def hold(*_):
      open(marker, "w").close()
      time.sleep(120)
    if point == "writing":  # the new checkpoint's arrays are on disk, not yet finalized
      from orbax.checkpoint._src.path import atomicity
      async def finalize(self):
        hold()
      atomicity.AtomicRenameTemporaryPath.finalize = finalize
    elif point == "swap":  # the new checkpoint is whole beside the old one
      files.replace_dir = lambda new, path: hold()
    elif point == "cleanup":  # swapped; the old one is not deleted yet
      exchange = files._exchange
      files._exchange = lambda a, b: (exchange(a, b), hold())
    config = pj.LoRAConfig(rank=2, target_modules=("m",))
    new = {"m": {"lora_a": jnp.full((4, 2), 2.0), "lora_b": jnp.ones((2, 3))}}
    if point == "manager":
      from orbax.checkpoint._src.path import atomicity
      async def finalize(self):
        hold()
      atomicity.AtomicRenameTemporaryPath.finalize = finalize
      manager = checkpoint.AdapterCheckpointManager(root, config)
      manager.save(2, new)
      manager.wait_until_finished()
    else:
      checkpoint.save(os.path.join(root, "c"), new, config, overwrite=True)
""")


@pytest.mark.parametrize("point", ["writing", "swap", "cleanup", "manager"])
def test_a_killed_save_leaves_one_whole_checkpoint(tmp_path, point):
  root = tmp_path / "run"
  target = root / "c" if point != "manager" else root
  if point == "manager":
    with checkpoint.AdapterCheckpointManager(root, CONFIG) as manager:
      manager.save(1, OLD)
  else:
    checkpoint.save(target, OLD, CONFIG)
  marker = tmp_path / "marker"
  process = subprocess.Popen([sys.executable, "-c", _CRASHER, str(root), str(marker), point],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.monotonic() + 240
  while not marker.exists():
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    assert time.monotonic() < deadline, "the save did not reach its pause"
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  # Exactly the old checkpoint, or (killed after the swap) exactly the new one.
  assert _value(target) == (2.0 if point == "cleanup" else 1.0)
  if point == "manager":  # the dead writer's lock is stale: a new manager takes over
    assert os.path.exists(root / files.LOCK_NAME)
    with checkpoint.AdapterCheckpointManager(root, CONFIG) as manager:
      assert manager.all_steps() == [1]
      manager.save(3, OLD)
    assert checkpoint.finished_steps(root) == [1, 3]
  else:  # the next save works and clears the leftovers
    checkpoint.save(target, OLD, CONFIG, overwrite=True)
    assert _value(target) == 1.0 and os.listdir(root) == ["c"]


# -- one writer per directory -------------------------------------------------------
def test_a_second_manager_on_one_directory_is_refused(tmp_path):
  with checkpoint.AdapterCheckpointManager(tmp_path, CONFIG, async_save=False) as first:
    with pytest.raises(RuntimeError, match=f"pid {os.getpid()} on {socket.gethostname()}"):
      checkpoint.AdapterCheckpointManager(tmp_path, CONFIG)
    first.save(1, OLD)
  with checkpoint.AdapterCheckpointManager(tmp_path, CONFIG) as second:  # released on close
    assert second.all_steps() == [1]


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
  lock = tmp_path / files.LOCK_NAME
  lock.write_text(json.dumps({"pid": 1, "host": "another-host", "token": "x"}))
  with pytest.raises(RuntimeError, match="another-host"):
    checkpoint.AdapterCheckpointManager(tmp_path, CONFIG)
  assert json.loads(lock.read_text())["host"] == "another-host"


@pytest.mark.parametrize("kwargs,match", [
    ({"max_to_keep": 0}, "max_to_keep"), ({"max_to_keep": -1}, "max_to_keep"),
    ({"max_to_keep": 1.5}, "max_to_keep"), ({"save_interval_steps": 0}, "save_interval"),
    ({"save_interval_steps": True}, "save_interval"), ({"async_save": "no"}, "async_save")])
def test_manager_arguments_are_checked_up_front(tmp_path, kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    checkpoint.AdapterCheckpointManager(tmp_path / "run", CONFIG, **kwargs)
  assert not (tmp_path / "run").exists()
  with pytest.raises(TypeError, match="LoRAConfig"):
    checkpoint.AdapterCheckpointManager(tmp_path / "run", {"rank": 2})


def test_manager_refuses_a_single_checkpoint_folder(tmp_path):
  path = checkpoint.save(tmp_path / "c", OLD, CONFIG)
  before = snapshot(tmp_path)
  with pytest.raises(FileExistsError, match="single checkpoint"):
    checkpoint.AdapterCheckpointManager(path, CONFIG)
  assert snapshot(tmp_path) == before
  np.testing.assert_array_equal(checkpoint.restore(path)[0]["m"]["lora_a"], OLD["m"]["lora_a"])
