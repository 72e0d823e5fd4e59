"""Reference Flax models whose parameter names follow Hugging Face."""

from peft_jax.models.gemma3 import Gemma3Config, Gemma3ForCausalLM, gemma3_from_params, gemma3_params
from peft_jax.models.gemma3_checkpoint import gemma3_config_from_gguf, load_gemma3_gguf, load_gemma3_hf
from peft_jax.models.gemma3_export import save_gemma3_hf
from peft_jax.models.gemma3_loss import gemma3_lm_loss
from peft_jax.models.gguf import llama_config_from_gguf, load_gguf
from peft_jax.models.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
from peft_jax.models.pretrained import PretrainedLlama, load_smollm2, smollm2_gguf_path
from peft_jax.models.pretrained_gemma3 import PretrainedGemma3, gemma3_270m_gguf_path, load_gemma3_270m
from peft_jax.models.tokenizer import PretrainedTokenizer, load_hf_tokenizer, tokenizer_from_gguf
from peft_jax.models.llama import (
    REMAT_POLICY_NAMES,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    causal_lm_loss,
    count_params,
    init_params,
    params_scanned_to_unrolled,
    params_unrolled_to_scanned,
)

__all__ = [
    "Gemma3Config",
    "Gemma3ForCausalLM",
    "PretrainedGemma3",
    "gemma3_270m_gguf_path",
    "gemma3_config_from_gguf",
    "gemma3_from_params",
    "gemma3_lm_loss",
    "gemma3_params",
    "load_gemma3_270m",
    "load_gemma3_gguf",
    "load_gemma3_hf",
    "save_gemma3_hf",
    "PretrainedLlama",
    "PretrainedTokenizer",
    "llama_config_from_gguf",
    "load_gguf",
    "load_hf_checkpoint",
    "load_hf_tokenizer",
    "load_smollm2",
    "save_hf_checkpoint",
    "smollm2_gguf_path",
    "tokenizer_from_gguf",
    "REMAT_POLICY_NAMES",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaModel",
    "causal_lm_loss",
    "count_params",
    "init_params",
    "params_scanned_to_unrolled",
    "params_unrolled_to_scanned",
]
