"""bitsandbytes 8-bit / 4-bit (NF4) loading of UniMedVL with the modules that must stay in full precision.

    from unimedvl_pipelines.quantization import bnb_config
    model = UniMedVLForConditionalGeneration.from_pretrained(path, quantization_config=bnb_config(bits=4))
    pipe = UniMedVLPipeline.from_pretrained(path, quantization_config=bnb_config(bits=4))

Only `nn.Linear` layers are quantized. `QUANTIZATION_SKIP_MODULES` keeps the small, precision-critical ones in the
compute dtype: the language-model head, the flow head and its input (`llm2vae`, `model.vae2llm`), the timestep
embedder, the whole FLUX VAE (`model.vae`, whose attention uses `nn.Linear`), the ViT→LLM connector and the ViT patch
embedding. transformers matches each pattern from the start of a module name up to a module boundary, or as a
suffix (never as a substring), so `"model.vae"` skips `model.vae.decoder…` but not `model.vae2llm`. The position
tables are buffers and are never quantized. `keep_generation_expert=True` also keeps every generation-expert module
(`*_moe_gen`) in full precision, so only the understanding expert and the ViT are quantized.
"""

import torch
from transformers import BitsAndBytesConfig


QUANTIZATION_SKIP_MODULES = (
    "lm_head",
    "llm2vae",
    "model.vae2llm",
    "model.time_embedder",
    "model.vae",
    "model.connector",
    "model.vision_tower.embeddings",
)
"""Module-name patterns (prefix at a module boundary, or suffix) that stay un-quantized."""

GENERATION_EXPERT_PATTERN = r".*_moe_gen"
"""Matches every generation-expert module (`…self_attn.q_proj_moe_gen`, `…mlp_moe_gen`)."""


def quantization_skip_modules(keep_generation_expert: bool = False, extra: tuple[str, ...] = ()) -> list[str]:
    """The skip list for `BitsAndBytesConfig(llm_int8_skip_modules=...)`."""
    modules = list(QUANTIZATION_SKIP_MODULES) + list(extra)
    if keep_generation_expert:
        modules.append(GENERATION_EXPERT_PATTERN)
    return modules


def bnb_config(
    bits: int = 4,
    compute_dtype: torch.dtype = torch.bfloat16,
    quant_type: str = "nf4",
    double_quant: bool = True,
    keep_generation_expert: bool = False,
    extra_skip_modules: tuple[str, ...] = (),
) -> BitsAndBytesConfig:
    """A `BitsAndBytesConfig` for UniMedVL: `bits=4` (NF4 by default, `compute_dtype` for the matmuls) or `bits=8`."""
    skip = quantization_skip_modules(keep_generation_expert, tuple(extra_skip_modules))
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if bits == 4:
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}.")
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=double_quant,
            llm_int8_skip_modules=skip,
        )
    raise ValueError(f"bits must be 4 or 8, got {bits}.")


__all__ = ["GENERATION_EXPERT_PATTERN", "QUANTIZATION_SKIP_MODULES", "bnb_config", "quantization_skip_modules"]
