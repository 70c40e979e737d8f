"""Parameter-efficient fine-tuning: LoRA / TD-LoRA adapters (`adapters`), the frozen-base
train state (`trainable`) and the PEFT safetensors format (`formats`)."""
from dydit_jax.peft.adapters import (ADALN_TARGETS, DEFAULT_TARGETS, LoraSpec, PeftModel,
                                     combine, has_adapters, init_adapters, kernel_delta,
                                     merge_params, mixing_weights, split_adapters,
                                     target_paths, time_embedding)
from dydit_jax.peft.formats import export_peft, import_peft

__all__ = ["ADALN_TARGETS", "DEFAULT_TARGETS", "LoraSpec", "PeftModel", "combine",
           "export_peft", "has_adapters", "import_peft", "init_adapters", "kernel_delta",
           "merge_params", "mixing_weights", "split_adapters", "target_paths", "time_embedding"]
