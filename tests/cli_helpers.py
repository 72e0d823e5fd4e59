"""Shared pieces of the ``peft-jax`` command-line tests."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from peft_jax import training
from peft_jax.cli.main import main


def error_line(capsys, argv) -> str:
  """Runs ``main(argv)``, which must exit 2 with one line on stderr and no traceback."""
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert "Traceback" not in err and len(err.splitlines()) == 1, err
  return err


def poison_base_at(monkeypatch, call: int) -> None:
  """Makes the ``call``-th train step (1-based) see a NaN frozen base."""
  make_train_step = training.make_train_step

  def poisoned(*args, **kwargs):
    step, calls = make_train_step(*args, **kwargs), []

    def run(state, base, *rest):
      calls.append(1)
      if len(calls) == call:
        base = jax.tree.map(lambda x: x * np.float32(np.nan), base)
      return step(state, base, *rest)
    return run

  monkeypatch.setattr(training, "make_train_step", poisoned)
