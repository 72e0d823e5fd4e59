"""Writes PEFT adapters that use `modules_to_save` and `bias`, with their logits.

Run offline with the reference environment, never in the test suite:

    HF_HUB_OFFLINE=1 /work/refvenv/bin/python tests/data/make_peft_options_reference.py

For each case below, peft 0.21.2 wraps a tiny model of `hf_tiny/` (Qwen2:
q/k/v biases, untied head; Gemma 3: tied embeddings) with `get_peft_model`;
every trainable tensor (LoRA A and B, the modules_to_save copies, the
trained biases) is given seeded random values, as if trained;
`save_pretrained` writes the adapter directory `hf_tiny/<case>/`, and the
PEFT model's float32 logits on the base's `reference.json` inputs go to
`hf_tiny/<case>/reference.json` with the list of trainable parameter names.
"""

import copy
import json
import pathlib
import sys

import peft
import torch
import transformers

HF_TINY = pathlib.Path(__file__).with_name("hf_tiny")

CASES = {
    # Whole modules trained and saved, and the biases of the LoRA modules.
    "qwen2_saved": ("qwen2", dict(target_modules=["q_proj", "v_proj"],
                                  modules_to_save=["lm_head", "embed_tokens"], bias="lora_only")),
    # Every bias of the model trained (k_proj/v_proj are not LoRA targets).
    "qwen2_bias_all": ("qwen2", dict(target_modules=["q_proj", "o_proj"], bias="all")),
    # A tied embedding saved: PEFT's copy acts on the input; the head keeps the original.
    "gemma3_saved": ("gemma3", dict(target_modules=["q_proj", "v_proj"],
                                    modules_to_save=["embed_tokens"])),
}
# Added later (own seeds, so the cases above keep theirs); `python ... gemma3_head` writes one.
LATER = {
    # The tied head saved: PEFT deep-copies lm_head (an untied trained head; the input
    # embedding keeps the original table) and warns.
    "gemma3_head": ("gemma3", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    # ensure_weight_tying: ONE trained copy of the table, read by the input lookup and the
    # tied head; saved under both keys (lm_head.weight, model.embed_tokens.weight).
    "gemma3_tied": ("gemma3", dict(target_modules=["q_proj"], modules_to_save=["lm_head"],
                                   ensure_weight_tying=True)),
    "gemma3_tied_embed": ("gemma3", dict(target_modules=["q_proj"],
                                         modules_to_save=["embed_tokens"],
                                         ensure_weight_tying=True)),
    # ensure_weight_tying with LoRA on the tied embedding: the head gets LoRA whose A and B
    # are the embedding's B and A transposed (the same storage).
    "gemma3_tied_lora": ("gemma3", dict(target_modules=["q_proj", "embed_tokens"],
                                        ensure_weight_tying=True)),
    # The same two on a Llama with tied embeddings (SmolLM2's family, our linen model).
    "llama_tied_saved": ("llama_tied", dict(target_modules=["q_proj"],
                                            modules_to_save=["embed_tokens", "lm_head"],
                                            ensure_weight_tying=True)),
    "llama_tied_lora": ("llama_tied", dict(target_modules=["q_proj", "embed_tokens"],
                                           ensure_weight_tying=True)),
}

# Later still (seeds after LATER's): `lm_head` named in target_modules of a tied model with
# ensure_weight_tying (PEFT targets the embedding instead and ties the head to it), and an
# alpha_pattern giving the tied head its own alpha (PEFT scales the head's term by it).
LATEST = {
    "gemma3_tied_head": ("gemma3", dict(target_modules=["q_proj", "lm_head"],
                                        ensure_weight_tying=True, alpha_pattern={"lm_head": 32})),
    "llama_tied_head": ("llama_tied", dict(target_modules=["q_proj", "lm_head"],
                                           ensure_weight_tying=True,
                                           alpha_pattern={"lm_head": 32})),
}


def main(only=()):
  cases = list(enumerate(sorted(CASES.items()))) + list(
      enumerate(sorted(LATER.items()), start=len(CASES))) + list(
          enumerate(sorted(LATEST.items()), start=len(CASES) + len(LATER)))
  for seed, (case, (family, options)) in cases:
    if only and case not in only:
      continue
    base = HF_TINY / family
    reference = json.loads((base / "reference.json").read_text())
    config = transformers.AutoConfig.from_pretrained(base)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_pretrained(base, config=config,
                                                              dtype=torch.float32)
    # A copy: ensure_weight_tying rewrites the modules_to_save list it is given in place.
    lora = peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **copy.deepcopy(options))
    model = peft.get_peft_model(model, lora)
    torch.manual_seed(100 + seed)
    trainable = []
    with torch.no_grad():
      for name, param in model.named_parameters():
        if param.requires_grad:
          trainable.append(name)
          param.add_(torch.randn_like(param) * 0.2)
    model.eval()
    with torch.no_grad():
      logits = model(
          input_ids=torch.tensor(reference["input_ids"]),
          attention_mask=torch.tensor(reference["attention_mask"]),
          position_ids=torch.tensor(reference["positions"])).logits
    directory = HF_TINY / case
    # No copies of the base embedding (PEFT's default for an embedding target; the same as
    # "auto" for the other cases): the adapter file holds the adapter alone.
    model.save_pretrained(directory, save_embedding_layers=False)
    (directory / "README.md").unlink()  # peft's generic model card
    out = {
        "source": (f"peft {peft.__version__}, transformers {transformers.__version__}, "
                   f"torch {torch.__version__}: {options}, float32"),
        "trainable": sorted(trainable),
        "logits": [[[round(float(v), 6) for v in row] for row in seq] for seq in logits],
    }
    (directory / "reference.json").write_text(json.dumps(out) + "\n")
    print(case, {p.name: p.stat().st_size for p in directory.iterdir()})


if __name__ == "__main__":
  main(tuple(sys.argv[1:]))
