"""bitsandbytes 8-bit / 4-bit (NF4) loading of UniMedVL with the modules that must stay in full precision.

    from unimedvl_pipelines.quantization import bnb_config
    model = UniMedVLForConditionalGeneration.from_pretrained(path, quantization_config=bnb_config(bits=4))
    pipe = UniMedVLPipeline.from_pretrained(path, quantization_config=bnb_config(bits=4))

Only `nn.Linear` layers are quantized. The model class declares the small, precision-critical modules that stay in
the compute dtype (`UniMedVLForConditionalGeneration._keep_in_fp32_modules`, which transformers also applies to a
plain `BitsAndBytesConfig`): the language-model head, the flow head and its input (`llm2vae`, `model.vae2llm`), the
timestep embedder, the whole FLUX VAE (`model.vae`, whose attention uses `nn.Linear`), the ViT→LLM connector and the
ViT patch embedding. transformers matches each pattern from the start of a module name up to a module boundary, or as
a suffix (never as a substring), so `"model.vae"` skips `model.vae.decoder…` but not `model.vae2llm`. The position
tables are buffers and are never quantized. `keep_generation_expert=True` also keeps every generation-expert module
(`*_moe_gen`) in full precision, so only the understanding expert and the ViT are quantized.
"""

import torch
from modeling_unimedvl import UniMedVLForConditionalGeneration
from transformers import BitsAndBytesConfig


QUANTIZATION_SKIP_MODULES = tuple(UniMedVLForConditionalGeneration._keep_in_fp32_modules)
"""Module-name patterns (prefix at a module boundary, or suffix) that stay un-quantized: the model class's own list."""

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


CPU_4BIT_OUTPUT_MULTIPLE = 32
"""bitsandbytes' CPU NF4 kernel packs the output features in blocks of 32."""


def cpu_4bit_problems(model) -> list[str]:
    """The 4-bit layers of `model` that bitsandbytes' CPU inference kernel cannot run, as `name (in→out)` strings.

    On CPUs with AVX512-BF16, bitsandbytes repacks each `Linear4bit` for its CPU kernel on the first forward pass; that
    needs the input size to be a multiple of the quantization block size and the output size a multiple of 32
    (otherwise: "shape '[96, 1]' is invalid"). Empty when nothing is 4-bit, nothing is on the CPU, or the CPU has no
    such kernel. bitsandbytes is imported only here, i.e. only when 4-bit loading was requested.
    """
    import bitsandbytes as bnb

    problems = []
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit) or module.weight.device.type != "cpu":
            continue
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        state = getattr(module.weight, "quant_state", None)
        blocksize = getattr(state, "blocksize", None) or getattr(module.weight, "blocksize", 64)
        if module.in_features % blocksize or module.out_features % CPU_4BIT_OUTPUT_MULTIPLE:
            problems.append(f"{name} ({module.in_features}→{module.out_features})")
    return problems


__all__ = [
    "GENERATION_EXPERT_PATTERN",
    "QUANTIZATION_SKIP_MODULES",
    "bnb_config",
    "cpu_4bit_problems",
    "quantization_skip_modules",
]
