"""Generates tests/data/lora_plus_reference.json from peft's LoRA+ (not run by pytest).

    /work/refvenv/bin/python tests/data/make_lora_plus_reference.py

Builds a small torch model with LoRA (+DoRA, lora_only biases, a LayerNorm
and a head in modules_to_save), calls peft.optimizers.create_loraplus_optimizer
and records, for each trainable parameter, its group's lr and weight decay,
with the equivalent peft_jax (Flax) path and shape.
"""
import json
import pathlib

import peft
import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from torch import nn


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8, bias=True)
        self.v_proj = nn.Linear(8, 4, bias=True)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj = nn.Linear(8, 16, bias=False)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(32, 8)
        self.self_attn = Attn()
        self.mlp = Mlp()
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 32, bias=False)


torch.manual_seed(0)
config = LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj", "v_proj", "up_proj"],
                    use_dora=True, bias="lora_only", modules_to_save=["norm", "lm_head"])
model = get_peft_model(Tiny(), config)
LR, RATIO, EMB_LR, WD = 1e-3, 16.0, 1e-6, 0.01
opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                loraplus_lr_embedding=EMB_LR, loraplus_weight_decay=WD)
group_names = ["groupA", "embedding", "groupB", "groupB_no_decay"]
by_id = {}
for name, group in zip(group_names, opt.param_groups):
    for p in group["params"]:
        by_id[id(p)] = (name, group["lr"], group["weight_decay"])


def flax_path(name):
    """peft name -> peft_jax adapter-tree path (adapters beside the kernel)."""
    parts = name.replace("base_model.model.", "").split(".")
    table = {
        ("lora_A", "default", "weight"): "lora_a",
        ("lora_B", "default", "weight"): "lora_b",
        ("lora_embedding_A", "default"): "lora_a",
        ("lora_embedding_B", "default"): "lora_b",
        ("lora_magnitude_vector", "default", "weight"): "lora_magnitude",
        ("base_layer", "bias"): "bias",
        ("modules_to_save", "default", "weight"): None,
        ("modules_to_save", "default", "bias"): "bias",
    }
    for suffix, leaf in table.items():
        if tuple(parts[-len(suffix):]) == suffix:
            module = parts[: -len(suffix)]
            if leaf is None:  # a trainable copy of a whole module's weight
                leaf = "scale" if module[-1] == "norm" else "kernel"
            prefix = "" if module[0] in ("lm_head",) else "model/"
            return prefix + "/".join(module + [leaf])
    raise KeyError(name)


def flax_shape(name, shape):
    # torch (out, in) weights and lora_A (r, in) / lora_B (out, r) transpose;
    # embedding A (r, vocab) / B (hidden, r) become (vocab, r) / (r, hidden).
    return list(reversed(shape)) if len(shape) == 2 else list(shape)


records = []
for name, p in model.named_parameters():
    if not p.requires_grad:
        continue
    group, lr, wd = by_id[id(p)]
    records.append({"torch_name": name, "torch_shape": list(p.shape), "group": group,
                    "lr": lr, "weight_decay": wd, "flax_path": flax_path(name),
                    "flax_shape": flax_shape(name, list(p.shape))})
out = {"_meta": {"source": f"peft {peft.__version__}, torch {torch.__version__}",
                 "generator": "tests/data/make_lora_plus_reference.py",
                 "lr": LR, "ratio": RATIO, "embedding_lr": EMB_LR, "weight_decay": WD},
       "params": records}
path = pathlib.Path(__file__).with_name("lora_plus_reference.json")
path.write_text(json.dumps(out, indent=1))
for r in records:
    print(r["group"], r["lr"], r["weight_decay"], r["torch_name"], "->", r["flax_path"], r["flax_shape"])
