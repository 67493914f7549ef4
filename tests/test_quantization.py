"""bitsandbytes loading on CPU: NF4 / 8-bit linears, the skip list, and generation with a quantized tiny model."""

import pytest
import torch
from torch import nn
from transformers import BitsAndBytesConfig

from modeling_unimedvl import UniMedVLForConditionalGeneration
from unimedvl_pipelines import UniMedVLPipeline, bnb_config
from unimedvl_pipelines.quantization import QUANTIZATION_SKIP_MODULES


KEPT = ("lm_head", "llm2vae", "model.vae2llm", "model.time_embedder.linear_1", "model.connector.fc1",
        "model.vision_tower.embeddings.patch_embedding", "model.vae.decoder.mid_block.attentions.0.to_q")


def linear_types(model):
    return {name: type(module).__name__ for name, module in model.named_modules() if isinstance(module, nn.Linear)}


@pytest.fixture(scope="module")
def nf4_pipe(converted_dir):
    pipe = UniMedVLPipeline.from_pretrained(
        converted_dir, quantization_config=bnb_config(bits=4, compute_dtype=torch.float32), device_map="cpu"
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_config_and_skip_patterns():
    config = bnb_config(bits=4)
    assert isinstance(config, BitsAndBytesConfig) and config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16 and config.bnb_4bit_use_double_quant
    assert config.llm_int8_skip_modules == list(QUANTIZATION_SKIP_MODULES)
    assert bnb_config(bits=4, keep_generation_expert=True).llm_int8_skip_modules[-1] == r".*_moe_gen"
    assert bnb_config(bits=8).load_in_8bit
    with pytest.raises(ValueError, match="bits must be 4 or 8, got 3"):
        bnb_config(bits=3)
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4'"):
        bnb_config(quant_type="int4")


def test_nf4_loading_keeps_the_skip_list_unquantized(nf4_pipe):
    import bitsandbytes as bnb

    model = nf4_pipe.model
    assert model.is_loaded_in_4bit
    types = linear_types(model)
    for name in KEPT:
        assert types[name] == "Linear", name
    quantized = [name for name, kind in types.items() if kind == "Linear4bit"]
    assert "model.language_model.layers.0.self_attn.q_proj" in quantized
    assert "model.language_model.layers.1.mlp_moe_gen.down_proj" in quantized
    assert "model.vision_tower.encoder.layers.0.mlp.fc1" in quantized
    assert all(not name.startswith(("model.vae.", "model.time_embedder", "model.connector")) for name in quantized)
    assert isinstance(model.get_submodule("model.language_model.layers.0.self_attn.k_proj_moe_gen"), bnb.nn.Linear4bit)
    assert model.get_submodule("model.language_model.layers.0.self_attn.q_proj").weight.quant_state.quant_type == "nf4"


def test_nf4_generates_text_and_an_image(nf4_pipe, tiny_model, tiny_processor, reference_image):
    inputs = tiny_processor(images=reference_image, text="What modality is this image?")
    quantized = nf4_pipe.model(**inputs).logits[0, -1]
    full = tiny_model(**inputs).logits[0, -1]
    assert torch.isfinite(quantized).all() and quantized.shape == full.shape
    assert torch.nn.functional.cosine_similarity(quantized, full, dim=0) > 0.9
    # A greedy text step (text-only prompt: bitsandbytes' CPU inference kernel fails on the tiny 32-wide ViT).
    text_inputs = tiny_processor(text="Describe a normal chest X-ray.")
    generated = nf4_pipe.model.generate(**text_inputs, max_new_tokens=1, do_sample=False)
    assert generated.shape == (1, text_inputs["input_ids"].shape[1] + 1)
    noise = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(0))
    kwargs = dict(height=32, width=32, num_inference_steps=2, latents=noise, output_type="pt")
    image = nf4_pipe("A chest X-ray.", **kwargs).images
    reference = UniMedVLPipeline(tiny_model, tiny_processor, nf4_pipe.scheduler)("A chest X-ray.", **kwargs).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    assert (image - reference).abs().mean() < 0.1


def test_8bit_and_generation_expert_options(converted_dir):
    model = UniMedVLForConditionalGeneration.from_pretrained(
        converted_dir, quantization_config=bnb_config(bits=8), device_map="cpu"
    )
    types = linear_types(model)
    assert types["model.language_model.layers.0.mlp.gate_proj"] == "Linear8bitLt"
    assert all(types[name] == "Linear" for name in KEPT)
    partial = UniMedVLForConditionalGeneration.from_pretrained(
        converted_dir, quantization_config=bnb_config(bits=4, compute_dtype=torch.float32, keep_generation_expert=True),
        device_map="cpu",
    )
    types = linear_types(partial)
    assert types["model.language_model.layers.0.self_attn.q_proj"] == "Linear4bit"
    assert types["model.language_model.layers.0.self_attn.q_proj_moe_gen"] == "Linear"
    assert types["model.language_model.layers.1.mlp_moe_gen.up_proj"] == "Linear"


def test_dtype_and_device_map_auto(converted_dir):
    pipe = UniMedVLPipeline.from_pretrained(converted_dir, dtype=torch.bfloat16, device_map="auto")
    assert pipe.model.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert {p.device.type for p in pipe.model.parameters()} == {"cpu"}
    pipe.set_progress_bar_config(disable=True)
    image = pipe("A chest X-ray.", height=32, width=32, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("config", [BitsAndBytesConfig(load_in_4bit=True), BitsAndBytesConfig(load_in_8bit=True)], ids=["4bit", "8bit"])
def test_a_plain_bitsandbytes_config_keeps_the_declared_modules(converted_dir, tiny_model, tiny_processor, reference_image, config):
    """The model class declares what must stay unquantized (`_keep_in_fp32_modules`), so no skip list is needed."""
    model = UniMedVLForConditionalGeneration.from_pretrained(converted_dir, quantization_config=config, device_map="cpu")
    types = linear_types(model)
    assert all(types[name] == "Linear" for name in KEPT)
    assert types["model.language_model.layers.0.mlp.gate_proj"] in ("Linear4bit", "Linear8bitLt")
    inputs = tiny_processor(images=reference_image, text="What modality is this image?")
    quantized, full = model(**inputs).logits[0, -1], tiny_model(**inputs).logits[0, -1]
    assert torch.isfinite(quantized).all()
    assert torch.nn.functional.cosine_similarity(quantized, full, dim=0) > 0.9
    noise = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(0))
    # bitsandbytes' CPU 4-bit inference kernel cannot run the tiny 32-wide ViT: image-to-image only in 8 bit.
    images = [reference_image] if config.load_in_8bit else None
    edit_inputs = tiny_processor(images=images, text="Increase the resolution.", generation_mode="image")
    image = model.generate(**edit_inputs, generation_mode="image", height=32, width=32, num_inference_steps=2, latents=noise)
    assert image.images.shape == (1, 3, 32, 32) and torch.isfinite(image.images).all()


def test_float16_loading_keeps_precision_critical_modules_in_float32(converted_dir, tiny_processor, reference_image):
    model = UniMedVLForConditionalGeneration.from_pretrained(converted_dir, dtype=torch.float16)
    dtypes = {name: parameter.dtype for name, parameter in model.named_parameters()}
    for name in ("lm_head.weight", "llm2vae.weight", "model.vae2llm.weight", "model.time_embedder.linear_1.weight",
                 "model.connector.fc1.weight", "model.vision_tower.embeddings.patch_embedding.weight",
                 "model.vae.decoder.conv_out.weight"):
        assert dtypes[name] == torch.float32, name
    assert dtypes["model.language_model.layers.0.mlp.up_proj.weight"] == torch.float16
    inputs = tiny_processor(images=reference_image, text="What modality is this image?")
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)
    edit_inputs = tiny_processor(images=reference_image, text="Increase the resolution.", generation_mode="image")
    image = model.generate(**edit_inputs, generation_mode="image", height=32, width=32, num_inference_steps=2)
    assert torch.isfinite(image.images).all()
