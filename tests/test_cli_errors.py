"""``peft-jax``'s boundary: user errors, non-finite losses, Ctrl-C, crashes, --resume.

Every user error is one line on stderr and exit status 2, before training
starts. A loss that becomes non-finite stops ``finetune`` with status 2 and
the last good adapter saved. Ctrl-C (SIGINT) saves the adapter and a
resumable checkpoint (status 130); ``--resume`` continues with the same
losses an uninterrupted run has. A SIGKILL at a save point or in the middle
of writing the resume file leaves a readable adapter and a resumable run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cli_helpers import error_line, poison_base_at
from peft_jax import checkpoint
from peft_jax.cli import finetune as ft
from peft_jax.cli import resume as resume_lib
from peft_jax.cli.main import _fill_remembered, build_parser, main

TINY = ["finetune", "--model", "tiny", "--steps", "4", "--batch", "2", "--seq-len", "16",
        "--eval-batches", "1", "--rank", "2", "--targets", "q_proj,v_proj", "--lr", "1e-2"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_error = error_line


@pytest.fixture
def no_training(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("training started before the user error was reported")
  monkeypatch.setattr(ft, "train", fail)


@pytest.mark.parametrize("extra, message", [
    (["--lr", "inf"], "--lr must be > 0 and finite, got inf"),
    (["--lr", "nan"], "--lr must be > 0 and finite, got nan"),
    (["--alpha", "inf"], "--alpha must be > 0 and finite, got inf"),
    (["--alpha", "1e300"], "--alpha must be <= 1e+06"),
    (["--weight-decay", "nan"], "--weight-decay must be >= 0 and finite, got nan"),
    (["--loraplus-ratio=-inf"], "--loraplus-ratio must be > 0 and finite"),
    (["--dropout", "nan"], "--dropout must be in [0, 1), got nan"),
    (["--steps", "0"], "--steps must be > 0"),
    (["--batch", "0"], "--batch must be > 0"),
    (["--eval-batches", "0"], "--eval-batches must be > 0"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
    (["--seed", "-3"], "--seed must be >= 0"),
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["--method", "prefix-tuning"], "argument --method: invalid choice: 'prefix-tuning'"),
    (["--data", "/no/such/file.txt"], "No text file"),
    (["--method", "lisa", "--lisa-layers", "9"], "n_layers=9 exceeds the 4 layers"),
    (["--resume"], "holds no resume.npz"),
    (["--nf4-embedding"], "--nf4-embedding needs --method qlora; lora would ignore it"),
])
def test_finetune_user_errors_before_training(capsys, tmp_path, no_training, extra, message):
  err = _error(capsys, [*TINY, "--output", str(tmp_path / "run"), *extra])
  assert message in err
  assert not (tmp_path / "run").exists()


def _write(path, text=""):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return path


@pytest.mark.parametrize("make, message", [
    (lambda tmp: _write(tmp / "file"), "is a file, not a run directory"),
    (lambda tmp: _write(tmp / "file") / "run", "is not a directory"),
    (lambda tmp: _write(tmp / "mine" / "summary.json", "{\"my\": 1}").parent,
     "holds a summary.json that peft-jax did not write"),
    (lambda tmp: _write(tmp / "old" / resume_lib.RESUME_FILE).parent,
     "holds an unfinished run (resume.npz); continue it with --resume"),
])
def test_output_problems_reported_before_loading_anything(capsys, tmp_path, monkeypatch, make,
                                                          message):
  out = make(tmp_path)
  before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  monkeypatch.setattr(ft, "load_model", lambda *a, **k: pytest.fail("model loaded"))
  assert message in _error(capsys, [*TINY, "--output", str(out)])
  assert before == {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}


def test_other_commands_one_line_usage_errors(capsys):
  assert "invalid int value: 'x'" in _error(capsys, ["generate", "--max-tokens", "x"])
  assert "required: --adapter" in _error(capsys, ["merge", "--output", "o"])


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 4-step run: the losses every resumed run must reproduce."""
  out = tmp_path_factory.mktemp("reference")
  assert main([*TINY, "--output", str(out / "run"), "--save-every", "1"]) == 0
  summary = json.loads((out / "run" / "summary.json").read_text())
  assert not resume_lib.resume_path(out / "run").exists()  # finished: nothing to resume
  return summary["train_losses"]


def _resume_and_compare(out, reference_losses, start):
  assert main([*TINY, "--output", str(out), "--resume", "--save-every", "1"]) == 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["resumed_from_step"] == start
  assert summary["train_losses"] == reference_losses
  assert not resume_lib.resume_path(out).exists()


def _adapter_is_readable(out):
  adapters, config = checkpoint.restore(out / "adapter")
  leaves = [np.asarray(x) for x in jax.tree.leaves(adapters)]
  assert leaves and all(np.isfinite(x).all() for x in leaves) and config.rank == 2


def test_sigint_saves_and_resume_continues_identically(reference, tmp_path, monkeypatch, capsys):
  original = ft.Progress.update

  def update(self, step, loss, steady):
    original(self, step, loss, steady)
    if step == 2:
      os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 2's bookkeeping

  monkeypatch.setattr(ft.Progress, "update", update)
  out = tmp_path / "run"
  with pytest.raises(SystemExit) as exit_info:
    main([*TINY, "--output", str(out)])
  assert exit_info.value.code == 130
  assert "interrupted after step 2/4" in capsys.readouterr().err
  assert resume_lib.read_meta(out)["step"] == 2
  _adapter_is_readable(out)
  monkeypatch.setattr(ft.Progress, "update", original)
  _resume_and_compare(out, reference, 2)


def test_resume_refuses_changed_options(tmp_path, capsys, no_training):
  out = tmp_path / "run"
  out.mkdir()
  args = build_parser().parse_args([*TINY, "--output", str(out)])
  _fill_remembered(args)
  model = ft.load_model("tiny")
  settings = ft.run_settings(args, ft.hyperparameters_from_args(args), model,
                             ft.load_tokens(model, None))
  resume_lib.save_state(out, {"w": np.zeros(2, np.float32)}, step=1, losses=[1.0],
                        settings={**settings, "lr": 0.5})
  err = _error(capsys, [*TINY, "--output", str(out), "--resume"])
  assert "differs from the interrupted run in" in err and "lr (0.01 now, 0.5 then)" in err


def test_damaged_resume_file_is_an_error(tmp_path):
  out = tmp_path
  resume_lib.save_state(out, {"w": np.arange(4, dtype=np.float32)}, step=1, losses=[1.0],
                        settings={})
  raw = bytearray(resume_lib.resume_path(out).read_bytes())
  at = raw.find(np.arange(4, dtype=np.float32).tobytes())
  raw[at + 5] ^= 0xFF
  resume_lib.resume_path(out).write_bytes(bytes(raw))
  with pytest.raises(resume_lib.ResumeError, match="damaged"):
    resume_lib.load_state(out, {"w": np.zeros(4, np.float32)})
  with pytest.raises(resume_lib.ResumeError, match="this run needs float32\\[3\\]"):
    resume_lib.load_state(out, {"w": np.zeros(3, np.float32)})


def test_non_finite_loss_stops_with_exit_2_and_keeps_last_good(tmp_path, capsys, monkeypatch):
  poison_base_at(monkeypatch, 3)  # a NaN in the frozen base at step index 2
  out = tmp_path / "run"
  err = _error(capsys, [*TINY, "--output", str(out)])
  assert "the loss became non-finite at step 2 (loss nan" in err
  assert "the last good state (step 2) is saved" in err
  assert resume_lib.read_meta(out)["step"] == 2
  _adapter_is_readable(out)
  assert not (out / "summary.json").exists()


_KILLER = """
import os, signal, sys
from peft_jax.cli import finetune as ft
from peft_jax.cli.main import _fill_remembered, build_parser, main
point, count, calls = sys.argv[1], int(sys.argv[2]), []
def kill_on(n):
  calls.append(1)
  if len(calls) == n:
    os.kill(os.getpid(), signal.SIGKILL)
if point == "after_save":
  save_result = ft.save_result
  def patched(*args, **kwargs):
    result = save_result(*args, **kwargs)
    kill_on(count)
    return result
  ft.save_result = patched
else:  # "resume_write": after the new file is written, before it replaces the old
  replace = os.replace
  def patched(src, dst):
    if str(dst).endswith("resume.npz"):
      kill_on(count)
    return replace(src, dst)
  os.replace = patched
main(sys.argv[3:])
"""


def _killed_run(out, point, count):
  env = {**os.environ, "PYTHONPATH": ROOT}
  proc = subprocess.run([sys.executable, "-c", _KILLER, point, str(count), *TINY, "--output",
                         str(out), "--save-every", "1"], env=env, capture_output=True,
                        timeout=600, check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


def test_sigkill_after_a_save_then_resume(reference, tmp_path):
  out = tmp_path / "run"
  _killed_run(out, "after_save", 2)  # killed right after the step-2 save
  _adapter_is_readable(out)
  assert resume_lib.read_meta(out)["step"] == 2
  _resume_and_compare(out, reference, 2)


@pytest.mark.slow
def test_sigkill_while_writing_resume_file_then_resume(reference, tmp_path):
  out = tmp_path / "run"
  _killed_run(out, "resume_write", 2)  # the step-2 file written, not yet renamed
  _adapter_is_readable(out)  # the step-1 adapter
  assert resume_lib.read_meta(out)["step"] == 1  # the old file, intact
  _resume_and_compare(out, reference, 1)


@pytest.mark.slow
def test_real_sigint_from_outside(tmp_path):
  out = tmp_path / "run"
  env = {**os.environ, "PYTHONPATH": ROOT}
  argv = [a if a != "4" else "400" for a in TINY]  # --steps 400: still running when hit
  proc = subprocess.Popen([sys.executable, "-m", "peft_jax.cli.main", *argv, "--output",
                           str(out), "--save-every", "1"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
  try:
    while not resume_lib.resume_path(out).exists() and proc.poll() is None:
      time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert proc.returncode == 130, err.decode()[-2000:]
  assert b"resumable checkpoint" in err
  assert resume_lib.read_meta(out)["step"] >= 1
  _adapter_is_readable(out)
