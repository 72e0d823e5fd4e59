"""Checks the CLI's Gemma 3 files with transformers + peft (offline; not run by pytest).

Run from the repository root with the project environment:

    python tests/data/check_cli_gemma_hf.py --torch-python /work/refvenv/bin/python [--method dora]

1. (JAX) `peft-jax finetune --model gemma3-tiny` (a few steps, every linear
   layer), then `peft-jax export-hf` and `peft-jax merge --format hf`, and the
   random base model itself written as a Hugging Face directory; our logits
   of the adapted model on a fixed batch.
2. (torch) transformers' `Gemma3ForCausalLM` loads the base directory, peft's
   `PeftModel.from_pretrained` the exported adapter; transformers also loads
   the merged directory. Both sets of logits are compared with ours.

Prints the largest absolute differences; exits 1 when one exceeds 1e-4.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

TORCH_SIDE = r"""
import json, sys, torch, transformers, peft
base, adapter, merged = sys.argv[1:4]
ids = torch.tensor(json.loads(sys.argv[4]))
def load(path):
    config = transformers.AutoConfig.from_pretrained(path)
    config._attn_implementation = "eager"
    return transformers.Gemma3ForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
with torch.no_grad():
    adapted = peft.PeftModel.from_pretrained(load(base), adapter).eval()(input_ids=ids).logits
    folded = load(merged).eval()(input_ids=ids).logits
print(json.dumps({"peft": adapted.tolist(), "merged": folded.tolist()}))
"""
IDS = [[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 84, 111]]


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--torch-python", required=True)
  parser.add_argument("--method", default="lora")
  args = parser.parse_args()
  import jax.numpy as jnp
  import numpy as np

  import peft_jax as pj
  from peft_jax import checkpoint
  from peft_jax.cli import finetune as ft
  from peft_jax.cli import gemma as gemma_lib
  from peft_jax.cli.main import main as cli

  tmp = pathlib.Path(tempfile.mkdtemp())
  run = tmp / "run"
  cli(["finetune", "--model", "gemma3-tiny", "--method", args.method, "--steps", "4",
       "--batch", "2", "--seq-len", "16", "--eval-batches", "1", "--rank", "4", "--lr", "3e-2",
       "--output", str(run)])
  cli(["export-hf", "--adapter", str(run), "--output", str(tmp / "peft")])
  cli(["merge", "--adapter", str(run), "--output", str(tmp / "merged"), "--format", "hf"])
  model = ft.load_model("gemma3-tiny", seed=0)
  gemma_lib.save_hf(tmp / "base", model.config, model.params)
  adapters, config = checkpoint.restore(run / "adapter")
  with pj.intercept(config):
    ours = np.asarray(model.module.apply({"params": pj.combine(model.params, adapters)},
                                         jnp.asarray(IDS, jnp.int32)))
  base = np.asarray(model.module.apply({"params": model.params}, jnp.asarray(IDS, jnp.int32)))
  ours_merged = ours
  if isinstance(config, pj.QLoRAConfig):  # merged onto the NF4 base it was trained on
    nf4 = pj.quantize(model.params, config.quant_spec(), target_modules=config.quantize_modules)
    with pj.intercept(config):
      ours_merged = np.asarray(model.module.apply({"params": pj.combine(nf4, adapters)},
                                                  jnp.asarray(IDS, jnp.int32)))
  out = subprocess.run([args.torch_python, "-c", TORCH_SIDE, str(tmp / "base"), str(tmp / "peft"),
                        str(tmp / "merged"), json.dumps(IDS)], capture_output=True, text=True,
                       check=False)
  if out.returncode:
    print(out.stderr[-3000:])
    return 1
  theirs = json.loads(out.stdout.strip().splitlines()[-1])
  worst = 0.0
  print(f"adapter effect (ours, max |adapted - base|): {np.abs(ours - base).max():.4g}")
  for name in ("peft", "merged"):
    want = ours_merged if name == "merged" else ours
    diff = float(np.abs(np.asarray(theirs[name]) - want).max())
    worst = max(worst, diff)
    print(f"{args.method}: transformers {name} vs ours, max |diff| = {diff:.3g}")
  return int(worst > 1e-4)


if __name__ == "__main__":
  sys.exit(main())
