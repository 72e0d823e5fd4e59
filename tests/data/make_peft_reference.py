"""Generates tests/data/peft_merge_reference.json from Hugging Face peft 0.21.2 (not run by pytest).

Run with the project venv, pointing at a Python with torch, transformers and
peft==0.21.2 (e.g. /work/refvenv):

    python tests/data/make_peft_reference.py --torch-python /work/refvenv/bin/python

Two sections:

* ``hf_format``: for each scenario of :func:`build_scenario` (the tiny
  reference Llama, adapters with random non-zero leaves), the JAX side
  exports the adapters with ``peft_jax.checkpoint.export_peft`` and writes
  the base as a Hugging Face checkpoint; the torch side loads both with
  ``LlamaForCausalLM.from_pretrained`` + ``PeftModel.from_pretrained`` and
  records the logits. It also saves an adapter of the same config with
  peft's own ``save_pretrained`` and records its config and key shapes.
* ``add_weighted_adapter``: two or three adapters on a torch module with a
  Linear ``lin`` (6 -> 5) and an Embedding ``emb`` (10 x 4), weights drawn
  from ``numpy.random.default_rng(0)``; the merged ``lora_A``/``lora_B`` of
  every deterministic combination type.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import subprocess
import tempfile

import numpy as np

OUT = pathlib.Path(__file__).with_name("peft_merge_reference.json")
INPUT_IDS = [[1, 17, 42, 99, 3, 250, 7, 64], [5, 5, 200, 31, 0, 128, 77, 12]]

SCENARIOS = {
    # rsLoRA with per-module ranks and alphas, LoRA on the embedding too.
    "lora_rslora_patterns": dict(
        rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj", "embed_tokens"),
        use_rslora=True, rank_pattern={"layers_1/self_attn/q_proj": 2},
        alpha_pattern={"down_proj": 3.0}),
    # DoRA on attention projections and the embedding.
    "dora": dict(rank=4, alpha=16.0, target_modules=("q_proj", "v_proj", "embed_tokens"),
                 use_dora=True),
}


@functools.cache
def _tiny_llama():
  import jax
  from peft_jax.models import LlamaConfig, LlamaForCausalLM, init_params

  llama_config = LlamaConfig.tiny()
  return LlamaForCausalLM(llama_config), init_params(llama_config, jax.random.key(0))


def build_scenario(name: str):
  """``(model, base_params, adapters, config)`` of one scenario, deterministic."""
  import jax
  import peft_jax as pj

  model, params = _tiny_llama()
  config = pj.LoRAConfig(**SCENARIOS[name])
  adapted = pj.lora_transform(params, config, key=jax.random.key(1))
  adapters, base = pj.split(adapted)

  @jax.jit
  def randomise(adapters):
    leaves, treedef = jax.tree.flatten_with_path(adapters)
    randomised = []
    for i, (path, leaf) in enumerate(leaves):
      noise = jax.random.normal(jax.random.fold_in(jax.random.key(2), i), leaf.shape, leaf.dtype)
      if path[-1].key == "lora_magnitude":
        randomised.append(leaf * (1.0 + 0.1 * noise))
      else:
        randomised.append(0.2 * noise)
    return jax.tree.unflatten(treedef, randomised)

  return model, base, randomise(adapters), config


def _hf_state_dict(params) -> dict[str, np.ndarray]:
  from peft_jax import targeting
  out = {}
  for path, value in targeting.flatten(params).items():
    value = np.asarray(value)
    module, leaf = path.rsplit("/", 1)
    name = module.replace("/layers_", "/layers.").replace("/", ".")
    if leaf == "kernel":
      out[f"{name}.weight"] = np.ascontiguousarray(value.T)
    else:  # embedding, RMSNorm weight
      out[f"{name}.weight"] = value
  return out


def _write_base(directory: pathlib.Path, model) -> None:
  c = model.config
  hf_config = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
      "num_attention_heads": c.num_attention_heads,
      "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
      "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
      "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_word_embeddings,
      "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
      "torch_dtype": "float32"}
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(hf_config, indent=2))


def _jax_side(work: pathlib.Path) -> dict:
  import jax.numpy as jnp
  import peft_jax as pj
  from safetensors.numpy import save_file
  from peft_jax.checkpoint import export_peft

  results = {}
  ids = jnp.asarray(INPUT_IDS, jnp.int32)
  for name in SCENARIOS:
    model, base, adapters, config = build_scenario(name)
    if not (work / "base").exists():
      _write_base(work / "base", model)
      save_file(_hf_state_dict(base), str(work / "base" / "model.safetensors"),
                metadata={"format": "pt"})
    export_peft(work / "adapters" / name, adapters, config)
    params = pj.combine(base, adapters)
    logits = pj.apply(model, {"params": params}, ids, config=config)
    base_logits = model.apply({"params": base}, ids)
    results[name] = {"jax_logits": np.asarray(logits).tolist(),
                     "jax_base_logits": np.asarray(base_logits).tolist()}
  return results


def _merge_inputs() -> dict:
  rng = np.random.default_rng(0)
  adapters = {}
  for name, rank, alpha in (("a", 2, 4.0), ("b", 2, 2.0), ("c", 3, 6.0)):
    adapters[name] = {
        "rank": rank, "alpha": alpha,
        "lin": {"lora_A": rng.normal(size=(rank, 6)).round(4).tolist(),
                "lora_B": rng.normal(size=(5, rank)).round(4).tolist()},
        "emb": {"lora_embedding_A": rng.normal(size=(rank, 10)).round(4).tolist(),
                "lora_embedding_B": rng.normal(size=(4, rank)).round(4).tolist()}}
  return {"adapters": adapters, "weights": [1.0, -0.7], "density": 0.5}


TORCH_SCRIPT = r'''
import json, pathlib, sys, warnings
import numpy as np, torch
warnings.filterwarnings("ignore")
import peft, transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import LlamaForCausalLM

work = pathlib.Path(sys.argv[1])
spec = json.loads((work / "spec.json").read_text())
out = {"versions": {"torch": torch.__version__, "peft": peft.__version__,
                    "transformers": transformers.__version__}, "hf_format": {}}
ids = torch.tensor(spec["input_ids"])

def keys_and_shapes(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: list(f.get_tensor(k).shape) for k in f.keys()}

for name in spec["scenarios"]:
    base = LlamaForCausalLM.from_pretrained(work / "base", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    adapter_dir = work / "adapters" / name
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        logits = model(ids).logits
    ours = json.loads((adapter_dir / "adapter_config.json").read_text())
    fields = {k: v for k, v in ours.items() if k not in ("peft_type", "peft_version", "auto_mapping",
                                                         "base_model_name_or_path", "revision")}
    fresh = LlamaForCausalLM.from_pretrained(work / "base", torch_dtype=torch.float32)
    real = get_peft_model(fresh, LoraConfig(**fields))
    real_dir = work / "peft_saved" / name
    real.save_pretrained(real_dir, save_embedding_layers=False)
    meta, shapes = keys_and_shapes(real_dir / "adapter_model.safetensors")
    our_meta, our_shapes = keys_and_shapes(adapter_dir / "adapter_model.safetensors")
    out["hf_format"][name] = {
        "torch_logits": logits.tolist(), "torch_base_logits": base_logits.tolist(),
        "peft_saved_config": json.loads((real_dir / "adapter_config.json").read_text()),
        "peft_saved_metadata": meta, "peft_saved_shapes": shapes,
        "exported_shapes": our_shapes}

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 5, bias=False)
        self.emb = torch.nn.Embedding(10, 4)
    def forward(self, x):
        return self.lin(self.emb(x).repeat(1, 1, 2)[..., :6])

merge = spec["merge"]
torch.manual_seed(0)
net = Tiny()
names = list(merge["adapters"])
model = None
for name in names:
    a = merge["adapters"][name]
    cfg = LoraConfig(r=a["rank"], lora_alpha=a["alpha"], target_modules=["lin", "emb"],
                     init_lora_weights=False)
    model = get_peft_model(net, cfg, adapter_name=name) if model is None else model
    if name != names[0]:
        model.add_adapter(name, cfg)
    with torch.no_grad():
        model.base_model.model.lin.lora_A[name].weight.copy_(torch.tensor(a["lin"]["lora_A"]))
        model.base_model.model.lin.lora_B[name].weight.copy_(torch.tensor(a["lin"]["lora_B"]))
        model.base_model.model.emb.lora_embedding_A[name].copy_(torch.tensor(a["emb"]["lora_embedding_A"]))
        model.base_model.model.emb.lora_embedding_B[name].copy_(torch.tensor(a["emb"]["lora_embedding_B"]))
cases = [("linear", ["a", "b"], None), ("cat", ["a", "c"], None), ("svd", ["a", "c"], None),
         ("ties", ["a", "b"], merge["density"]), ("ties_svd", ["a", "b"], merge["density"]),
         ("magnitude_prune", ["a", "b"], merge["density"]),
         ("magnitude_prune_svd", ["a", "c"], merge["density"]),
         ("dare_linear", ["a", "b"], 1.0)]
merged = {}
for combination, adapters, density in cases:
    new = f"{combination}_{'_'.join(adapters)}"
    kwargs = {} if density is None else {"density": density}
    model.add_weighted_adapter(adapters, merge["weights"], new, combination_type=combination, **kwargs)
    m = model.base_model.model
    cfg = model.peft_config[new]
    merged[new] = {"combination_type": combination, "adapters": adapters, "density": density,
                   "r": cfg.r, "lora_alpha": cfg.lora_alpha,
                   "lin": {"lora_A": m.lin.lora_A[new].weight.tolist(),
                           "lora_B": m.lin.lora_B[new].weight.tolist(),
                           "delta": m.lin.get_delta_weight(new).tolist()},
                   "emb": {"lora_embedding_A": m.emb.lora_embedding_A[new].tolist(),
                           "lora_embedding_B": m.emb.lora_embedding_B[new].tolist(),
                           "delta": m.emb.get_delta_weight(new).tolist()}}
out["add_weighted_adapter"] = merged
(work / "torch_out.json").write_text(json.dumps(out))
'''


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--torch-python", default="/work/refvenv/bin/python")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    work = pathlib.Path(tmp)
    jax_results = _jax_side(work)
    merge = _merge_inputs()
    (work / "spec.json").write_text(json.dumps(
        {"input_ids": INPUT_IDS, "scenarios": list(SCENARIOS), "merge": merge}))
    subprocess.run([args.torch_python, "-c", TORCH_SCRIPT, str(work)], check=True,
                   env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    torch_out = json.loads((work / "torch_out.json").read_text())
  hf_format = {}
  for name, ours in jax_results.items():
    theirs = torch_out["hf_format"][name]
    diff = float(np.max(np.abs(np.asarray(ours["jax_logits"]) - np.asarray(theirs["torch_logits"]))))
    base_diff = float(np.max(np.abs(np.asarray(ours["jax_base_logits"])
                                    - np.asarray(theirs["torch_base_logits"]))))
    print(f"{name}: max |logits_jax - logits_peft| = {diff:.3e} (base model {base_diff:.3e})")
    hf_format[name] = {
        "lora_config": {k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in SCENARIOS[name].items()},
        "torch_logits": np.asarray(theirs["torch_logits"], np.float32).round(6).tolist(),
        "max_abs_diff_at_generation": diff, "base_max_abs_diff_at_generation": base_diff,
        **{k: theirs[k] for k in ("peft_saved_config", "peft_saved_metadata",
                                  "peft_saved_shapes", "exported_shapes")}}
  reference = {
      "_meta": {"generator": "tests/data/make_peft_reference.py", "input_ids": INPUT_IDS,
                "versions": torch_out["versions"], "platform": platform.platform(),
                "note": "hf_format logits: PeftModel.from_pretrained of our export; "
                        "add_weighted_adapter: peft's merged adapters."},
      "hf_format": hf_format,
      "merge_inputs": merge,
      "add_weighted_adapter": torch_out["add_weighted_adapter"],
  }
  OUT.write_text(json.dumps(reference, separators=(",", ":")))
  print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
  main()
