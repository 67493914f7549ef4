"""GPU only (`pytest --run-gpu`): the fast bf16 decoding path agrees with the plain bf16 path.

Fast path: a static KV cache with `torch.compile` of the decoding step (transformers compiles the forward when a
static cache is used on CUDA) and the synchronisation-free text decoding step; plain path: a dynamic cache, eager.
Image generation in bf16 keeps its flow state in fp32 and stays within bf16 tolerance of the fp32 run.
"""

import pytest
import torch


pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_model(converted_dir):
    if not torch.cuda.is_available():
        pytest.fail("--run-gpu was given but CUDA is not available")
    from modeling_unimedvl import UniMedVLForConditionalGeneration

    return UniMedVLForConditionalGeneration.from_pretrained(converted_dir, dtype=torch.bfloat16).to("cuda").eval()


def test_static_compiled_decoding_equals_dynamic_decoding(cuda_model, tiny_processor, reference_image):
    inputs = tiny_processor(images=reference_image, text="What modality is this image?").to("cuda")
    options = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    plain = cuda_model.generate(**inputs, **options)
    fast = cuda_model.generate(**inputs, cache_implementation="static", **options)
    assert torch.equal(plain, fast)


def test_bf16_image_latents_within_tolerance_of_fp32(cuda_model, converted_dir, tiny_processor):
    from modeling_unimedvl import UniMedVLForConditionalGeneration

    reference = UniMedVLForConditionalGeneration.from_pretrained(converted_dir, dtype=torch.float32).to("cuda").eval()
    inputs = tiny_processor(text="Axial CT of the head.", generation_mode="image").to("cuda")
    options = dict(generation_mode="image", height=64, width=64, num_inference_steps=10, decode=False)
    bf16 = cuda_model.generate(**inputs, generator=torch.Generator().manual_seed(0), **options).latents
    fp32 = reference.generate(**inputs, generator=torch.Generator().manual_seed(0), **options).latents
    assert bf16.dtype == torch.float32  # the flow state stays fp32
    assert (bf16 - fp32).abs().max().item() < 5e-2
