"""Writes hf_tiny/gemma3_lora/: our LoRA adapters for the tiny Gemma 3, and PEFT's logits with them.

Run from the repository root with the project environment, pointing at a
Python that has torch, transformers and peft (not run by pytest):

    python tests/data/make_gemma3_peft_reference.py --torch-python /work/refvenv/bin/python

1. (JAX) `adapter_values(...)` gives every LoRA leaf of the tiny Gemma 3
   (`hf_tiny/gemma3`, every linear layer, rank 4, alpha 8, one rank and alpha
   overridden by pattern) deterministic non-zero values; `peft_jax.export_peft`
   writes them to `hf_tiny/gemma3_lora/` as PEFT does.
2. (torch) transformers loads `Gemma3ForCausalLM` from `hf_tiny/gemma3`
   (eager attention), peft's `PeftModel.from_pretrained` loads the adapter
   directory, and the float32 logits on `hf_tiny/gemma3/reference.json`'s
   inputs go to `hf_tiny/gemma3_lora/reference.json`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
BASE = HERE / "hf_tiny" / "gemma3"
OUTPUT = HERE / "hf_tiny" / "gemma3_lora"

TORCH_SIDE = r"""
import json, sys, torch, transformers, peft
base, adapter = sys.argv[1], sys.argv[2]
config = transformers.AutoConfig.from_pretrained(base)
config._attn_implementation = "eager"
model = transformers.Gemma3ForCausalLM.from_pretrained(base, config=config, dtype=torch.float32)
model = peft.PeftModel.from_pretrained(model, adapter).eval()
reference = json.loads(open(f"{base}/reference.json").read())
with torch.no_grad():
    logits = model(
        input_ids=torch.tensor(reference["input_ids"]),
        attention_mask=torch.tensor(reference["attention_mask"]),
        position_ids=torch.tensor(reference["positions"]),
    ).logits
print(json.dumps({
    "source": f"transformers {transformers.__version__}, peft {peft.__version__}, "
              f"torch {torch.__version__}: PeftModel.from_pretrained, float32, eager",
    "logits": [[[round(float(v), 6) for v in row] for row in seq] for seq in logits],
}))
"""


def lora_config():
    import peft_jax as pj

    return pj.LoRAConfig(rank=4, alpha=8.0, target_modules="all-linear",
                         rank_pattern={r".*layers_2/mlp/down_proj": 2},
                         alpha_pattern={r".*self_attn/o_proj": 3.0})


def adapter_values(model):
    """Deterministic non-zero values for every adapter leaf of `model` (NNX, transformed)."""
    import jax
    import numpy as np

    import peft_jax as pj

    adapters = pj.nnx.adapters(model)
    flat, treedef = jax.tree_util.tree_flatten_with_path(adapters)
    rng = np.random.default_rng(0)
    leaves = [rng.normal(0.0, 0.3, size=leaf.shape).astype(np.float32) for _, leaf in flat]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def adapted_model():
    """The tiny Gemma 3 from `hf_tiny/gemma3` with the fixture's adapters loaded."""
    import jax

    import peft_jax as pj
    from peft_jax.models.gemma3_checkpoint import load_gemma3_hf

    config = lora_config()
    _, shaped = load_gemma3_hf(BASE)
    pj.nnx.lora_transform(shaped, config, key=jax.random.key(0))
    adapters = adapter_values(shaped)
    _, model = load_gemma3_hf(BASE)
    pj.nnx.load_adapters(model, adapters, config)
    return model, adapters, config


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--torch-python", required=True)
    args = parser.parse_args()
    import peft_jax as pj

    _, adapters, config = adapted_model()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    pj.export_peft(OUTPUT, adapters, config, base_model_name_or_path="hf_tiny/gemma3")
    result = subprocess.run(
        [args.torch_python, "-c", TORCH_SIDE, str(BASE), str(OUTPUT)],
        check=True, capture_output=True, text=True)
    (OUTPUT / "reference.json").write_text(result.stdout.strip().splitlines()[-1] + "\n")
    print(sorted(p.name for p in OUTPUT.iterdir()))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))
    main()
