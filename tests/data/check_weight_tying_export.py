"""Offline check that peft 0.21.2 loads what `export_peft` writes with `ensure_weight_tying`.

Two steps, two interpreters (torch is not a test dependency)::

    PYTHONPATH=. python tests/data/check_weight_tying_export.py write /tmp/tying
    HF_HUB_OFFLINE=1 /work/refvenv/bin/python tests/data/check_weight_tying_export.py check /tmp/tying

On the tiny tied Llama of hf_tiny/llama_tied, adapters made by us (not read
from a PEFT file) with random values: `saved` (modules_to_save=("lm_head",),
one shared copy), `lora` (LoRA on q_proj and the tied embed_tokens) and `head`
(target_modules naming lm_head, which maps to the embedding, with the head's own
alpha_pattern entry). The check loads each directory with
`PeftModel.from_pretrained` and compares its logits with ours. Last run (peft
0.21.2, transformers 5.24, eager attention): largest difference 2.1e-6 (saved),
5.7e-6 (lora), 2.3e-5 (head); 3.7 / 14 / 55 from the base.
"""

import json
import pathlib
import sys

import numpy as np

BASE = pathlib.Path(__file__).with_name("hf_tiny") / "llama_tied"
INPUTS = json.loads((BASE / "reference.json").read_text())
NAMES = ("input_ids", "attention_mask", "positions")


def write(directory: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import peft_jax as pj  # pylint: disable=import-outside-toplevel
  from peft_jax.checkpoint import export_peft  # pylint: disable=import-outside-toplevel
  from peft_jax.models.hf_checkpoint import load_hf_checkpoint  # pylint: disable=import-outside-toplevel
  from peft_jax.models.llama import LlamaForCausalLM  # pylint: disable=import-outside-toplevel
  config, params = load_hf_checkpoint(BASE)
  model = LlamaForCausalLM(config)
  args = [jnp.asarray(INPUTS[k]) for k in NAMES]
  cases = {
      "saved": pj.LoRAConfig(rank=4, alpha=8, target_modules=("q_proj",),
                             modules_to_save=("lm_head",), ensure_weight_tying=True),
      "lora": pj.LoRAConfig(rank=4, alpha=8, target_modules=("q_proj", "embed_tokens"),
                            ensure_weight_tying=True),
      "head": pj.LoRAConfig(rank=4, alpha=8, target_modules=("q_proj", "lm_head"),
                            ensure_weight_tying=True, alpha_pattern={"lm_head": 32})}
  for name, lora in cases.items():
    adapters, base = pj.split(pj.lora_transform(params, lora, key=jax.random.PRNGKey(3)), lora)
    adapters = jax.tree.map(
        lambda x: x + 0.2 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), adapters)
    export_peft(f"{directory}/{name}", adapters, lora)
    np.save(f"{directory}/{name}/ours.npy",
            np.asarray(pj.apply(model, pj.combine(base, adapters), *args, config=lora)))


def check(directory: str) -> None:
  import peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  real = np.asarray(INPUTS["attention_mask"], bool)
  for name in ("saved", "lora", "head"):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        BASE, dtype=torch.float32, attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(model, f"{directory}/{name}").eval()
    with torch.no_grad():
      logits = model(**{k: torch.tensor(INPUTS[k]) for k in NAMES[:2]},
                     position_ids=torch.tensor(INPUTS["positions"])).logits.numpy()
    ours = np.load(f"{directory}/{name}/ours.npy")
    base = np.asarray(INPUTS["logits"])
    print(f"{name}: largest difference {np.abs(logits - ours)[real].max():.2g} "
          f"({np.abs(logits - base)[real].max():.2g} from the base)")


if __name__ == "__main__":
  {"write": write, "check": check}[sys.argv[1]](sys.argv[2])
