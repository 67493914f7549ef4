"""UniMedVL training on TRL: data loaders, training sequences, `UniMedVLTrainer` (a `trl.SFTTrainer` with CE + flow
matching, EMA, committed checkpoints), freezing flags, LoRA / QLoRA presets, the three-stage curriculum and GRPO with
verifiable medical rewards (`unimedvl-train`, `unimedvl-train grpo`; `grpo.py`, `rewards.py`).

Batches hold one sample per row (`[batch, length]`, right-padded) or several samples packed into token-budgeted rows
(`UniMedVLDataCollator(pack_tokens=N)`, whose `sample_ids` keep attention inside each sample).
"""

import modeling_unimedvl  # noqa: F401  (registers the Auto classes)

from .curriculum import build_mixture, load_stage_config, run_curriculum, run_stage
from .data import DataReport, ImageLimits, load_jsonl_records, normalize_record, records_from_dataset, validate_records
from .flow_matching import flow_matching_mse, noise_latents, sample_timesteps
from .freezing import FREEZE_PATTERNS, apply_freezing, parameters_of
from .lora import LORA_PRESETS, add_lora, adapter_model_card, load_adapter, load_quantized_model, lora_config, push_adapter_to_hub
from .sequences import CFGDropout, SequenceBuilder, UniMedVLDataCollator, UniMedVLTrainingDataset, built_dataset, sequence_plan
from .trainer import UniMedVLTrainer, UniMedVLTrainingArguments


__all__ = [
    "CFGDropout",
    "DataReport",
    "FREEZE_PATTERNS",
    "ImageLimits",
    "LORA_PRESETS",
    "SequenceBuilder",
    "UniMedVLDataCollator",
    "UniMedVLTrainer",
    "UniMedVLTrainingArguments",
    "UniMedVLTrainingDataset",
    "adapter_model_card",
    "add_lora",
    "apply_freezing",
    "build_mixture",
    "built_dataset",
    "flow_matching_mse",
    "load_adapter",
    "load_jsonl_records",
    "load_quantized_model",
    "load_stage_config",
    "lora_config",
    "noise_latents",
    "normalize_record",
    "parameters_of",
    "push_adapter_to_hub",
    "records_from_dataset",
    "run_curriculum",
    "run_stage",
    "sample_timesteps",
    "sequence_plan",
    "validate_records",
]
