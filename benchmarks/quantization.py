"""4-bit NF4 weights for the benchmark's randomly initialised model, quantized in place on its device.

A checkpoint loaded with `from_pretrained(..., quantization_config=bnb_config(bits=4))` is quantized by transformers'
bitsandbytes integration while its weights load; the benchmark builds its full-size model with random weights
directly on the GPU (no checkpoint to load, no 29 GB to write), so it swaps every `nn.Linear` outside the package's
skip list (`unimedvl_pipelines.quantization.QUANTIZATION_SKIP_MODULES`, the model class's `_keep_in_fp32_modules`,
matched with transformers' own rule) for a bitsandbytes `Linear4bit` with the same weights: NF4, double quantization,
the model's dtype as compute dtype — what `bnb_config(bits=4)` loads.
"""

import torch
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module

from modeling_unimedvl import UniMedVLForConditionalGeneration


SKIP_MODULES = tuple(UniMedVLForConditionalGeneration._keep_in_fp32_modules)
"""Module-name patterns that stay in the model's dtype (the same list as the package's `bnb_config`)."""


def quantize_nf4(model: nn.Module, skip_modules: tuple[str, ...] = SKIP_MODULES) -> int:
    """Replaces the `nn.Linear` layers of `model` outside `skip_modules` by NF4 `Linear4bit` layers (weights quantized
    where they are); returns how many were replaced."""
    import bitsandbytes as bnb

    compute_dtype = next(model.parameters()).dtype
    targets = [
        name for name, module in model.named_modules()
        if type(module) is nn.Linear and should_convert_module(name, list(skip_modules))
    ]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        device = linear.weight.device
        quantized = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype,
            compress_statistics=True, quant_type="nf4", device="meta",
        )
        quantized.weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
        ).to(device)
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        setattr(parent, child, quantized)
        del linear
    if targets and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return len(targets)


__all__ = ["SKIP_MODULES", "quantize_nf4"]
