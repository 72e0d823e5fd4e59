"""Adapters as artifacts: Orbax checkpoints and the Hugging Face PEFT format."""

from peft_jax.checkpoint.hf import PathMap, export_peft, hf_path_map, import_peft
from peft_jax.checkpoint.orbax import (
    AdapterCheckpointManager,
    adapter_mismatches,
    check_adapters_fit,
    finished_steps,
    is_peft_jax_checkpoint,
    load_lora_state_dict,
    restore,
    restore_params,
    save,
    save_lora_state_dict,
    save_params,
)

__all__ = [
    "AdapterCheckpointManager", "PathMap", "adapter_mismatches", "check_adapters_fit",
    "export_peft", "finished_steps", "hf_path_map", "import_peft", "is_peft_jax_checkpoint",
    "load_lora_state_dict",
    "restore", "restore_params", "save", "save_lora_state_dict", "save_params",
]
