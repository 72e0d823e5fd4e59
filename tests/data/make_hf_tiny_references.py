"""Writes tiny random Hugging Face checkpoints and their logits under tests/data/hf_tiny/.

Run offline with the reference environment, never in the test suite:

    HF_HUB_OFFLINE=1 /work/refvenv/bin/python tests/data/make_hf_tiny_references.py [family ...]

For each family (Gemma 3, Qwen2, Mistral, a Llama with tied embeddings as
SmolLM2's) a tiny model is built by
transformers with seeded random weights (norm weights and biases randomised
too, so a wrong convention shows), saved with `save_pretrained`
(`config.json` + `model.safetensors`, float32) into `hf_tiny/<family>/`, and
its float32 logits on fixed inputs (a batch of two 12-token rows, the second
left-padded by 3 with an attention mask) are stored in
`hf_tiny/<family>/reference.json`.
"""

import json
import pathlib
import sys

import torch
import transformers

OUTPUT = pathlib.Path(__file__).with_name("hf_tiny")
SEQ = 12
PAD = 3


def gemma3():
    config = transformers.Gemma3TextConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=24,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000.0},
        },
        final_logit_softcapping=5.0,
        attn_logit_softcapping=3.0,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    config._attn_implementation = "eager"
    return transformers.Gemma3ForCausalLM(config)


# The shape of the Llama-family models (Qwen2, Mistral, tied Llama).
LLAMA_SHAPE = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def qwen2():
    config = transformers.Qwen2Config(
        **LLAMA_SHAPE,
        rope_theta=1000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    return transformers.Qwen2ForCausalLM(config)


def mistral():
    config = transformers.MistralConfig(
        **LLAMA_SHAPE,
        head_dim=8,
        sliding_window=4,
        rope_theta=500.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    return transformers.MistralForCausalLM(config)


def llama_tied():
    config = transformers.LlamaConfig(
        **LLAMA_SHAPE,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config)


FAMILIES = (("gemma3", gemma3), ("qwen2", qwen2), ("mistral", mistral),
            ("llama_tied", llama_tied))


def main(only=()):
    for family, build in FAMILIES:
        if only and family not in only:
            continue
        torch.manual_seed(0)
        model = build().float().eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(torch.randn_like(param) * (0.3 if param.ndim > 1 else 0.5))
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(3, 128, (2, SEQ), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, :PAD] = 0
        ids[1, :PAD] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=positions
            ).logits
        directory = OUTPUT / family
        model.save_pretrained(directory, safe_serialization=True)
        (directory / "generation_config.json").unlink(missing_ok=True)  # not read
        reference = {
            "source": (
                f"transformers {transformers.__version__}, torch {torch.__version__}: "
                f"{type(model).__name__}, float32"
            ),
            "input_ids": ids.tolist(),
            "attention_mask": mask.tolist(),
            "positions": positions.tolist(),
            "logits": [
                [[round(float(v), 6) for v in row] for row in sequence]
                for sequence in logits
            ],
        }
        (directory / "reference.json").write_text(json.dumps(reference) + "\n")
        print(family, {p.name: p.stat().st_size for p in directory.iterdir()})


if __name__ == "__main__":
    main(tuple(sys.argv[1:]))
