"""Optimizers for parameter-efficient fine-tuning, as optax transformations.

* `galore` / `scale_by_galore`: Adam moments in a low-rank gradient subspace.
* `lora_plus`: LoRA+ learning-rate groups (`lora_b` at `ratio` x `lora_a`).
* `lisa`: layerwise importance sampling of decoder layers; `lisa_split` /
  `lisa_combine` / `lisa_value_and_grad` differentiate the active layers only.
* `adalora`: AdaLoRA's rank allocator (wraps the optimizer; needs params).
"""

from peft_jax.optim.adalora import AdaLoRAState
from peft_jax.optim.adalora import adalora
from peft_jax.optim.adalora import budget_schedule
from peft_jax.optim.adalora import triplet_scores

from peft_jax.optim.galore import GaLoreDimensionNumbers
from peft_jax.optim.galore import ScaleByGaLoreState
from peft_jax.optim.galore import galore
from peft_jax.optim.galore import galore_projected_paths
from peft_jax.optim.galore import scale_by_galore
from peft_jax.optim.lisa import LisaState
from peft_jax.optim.lisa import lisa
from peft_jax.optim.lisa import lisa_active_layers
from peft_jax.optim.lisa_grad import LisaFrozen
from peft_jax.optim.lisa_grad import lisa_combine
from peft_jax.optim.lisa_grad import lisa_split
from peft_jax.optim.lisa_grad import lisa_value_and_grad
from peft_jax.optim.lora_plus import LORA_PLUS_GROUPS
from peft_jax.optim.lora_plus import lora_plus
from peft_jax.optim.lora_plus import lora_plus_groups

__all__ = [
    "AdaLoRAState",
    "adalora",
    "budget_schedule",
    "triplet_scores",
    "GaLoreDimensionNumbers",
    "LORA_PLUS_GROUPS",
    "LisaFrozen",
    "LisaState",
    "ScaleByGaLoreState",
    "galore",
    "galore_projected_paths",
    "lisa",
    "lisa_active_layers",
    "lisa_combine",
    "lisa_split",
    "lisa_value_and_grad",
    "lora_plus",
    "lora_plus_groups",
    "scale_by_galore",
]
