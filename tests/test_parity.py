"""Parity with the original implementation: every tensor recorded in `golden.safetensors` of the reference folder.

The folder comes from UNIMEDVL_REFERENCE_DIR (default ../shared/reference/tiny_official); every size, id and setting
is read from it, so the same test runs unchanged on another folder of the original layout.
"""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file


TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def golden(reference_dir):
    with open(reference_dir / "golden.json") as handle:
        cases = json.load(handle)
    return cases, load_file(str(reference_dir / "golden.safetensors"))


@pytest.fixture(scope="module")
def input_image(reference_dir, golden):
    cases, _ = golden
    return Image.open(reference_dir / cases["cases"]["i2i"]["input"])


def to_uint8_float(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] → [B, H, W, 3] pixel values in [0, 255] before the original's uint8 truncation."""
    return ((images * 0.5 + 0.5).clamp(0, 1) * 255).permute(0, 2, 3, 1)


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual.float() - expected.float()).abs().max().item()
    assert error <= TOLERANCE, f"{name}: max abs difference {error:.3g} > {TOLERANCE}"


def assert_uint8_matches(name: str, images: torch.Tensor, expected: torch.Tensor) -> None:
    """The truncated uint8 image equals the recording, except where a pixel sits within 1e-3 of an integer step."""
    pixels = to_uint8_float(images)[0]
    ours = pixels.to(torch.uint8)
    assert ours.shape == expected.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(expected.shape)}"
    differs = ours != expected
    near_step = (pixels - pixels.round()).abs() <= 1e-3
    assert not (differs & ~near_step).any(), f"{name}: {int((differs & ~near_step).sum())} pixels differ"
    assert (ours.int() - expected.int()).abs().max() <= 1


def test_special_token_ids(tiny_model, tiny_processor, golden):
    cases, _ = golden
    ids = cases["new_token_ids"]
    config = tiny_model.config
    assert (config.bos_token_id, config.eos_token_id) == (ids["bos_token_id"], ids["eos_token_id"])
    assert (config.vision_start_token_id, config.vision_end_token_id) == (ids["start_of_image"], ids["end_of_image"])
    assert tiny_processor.special_ids["bos"] == ids["bos_token_id"]


def test_vqa_understanding_parity(tiny_model, tiny_processor, input_image, golden):
    cases, tensors = golden
    case = cases["cases"]["vqa"]
    inputs = tiny_processor(images=input_image, text=case["prompt"])
    expected_pixels = tensors["vqa.vit_pixels"]
    height, width = expected_pixels.shape[1:]
    patch = tiny_processor.image_processor.patch_size
    assert inputs["image_grid_hw"].tolist() == [[height // patch, width // patch]]
    pixels = inputs["pixel_values"].reshape(height // patch, width // patch, patch, patch, 3)
    assert_close("vqa.vit_pixels", pixels.permute(4, 0, 2, 1, 3).reshape(3, height, width), expected_pixels)

    steps = case["max_length"]
    output = tiny_model.generate(
        **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    assert output.sequences[0, inputs["input_ids"].shape[1] :].tolist() == case["greedy_tokens"]
    assert_close("vqa.step_logits", torch.stack(output.logits, dim=1)[0], tensors["vqa.step_logits"])


def test_vae_parity(tiny_model, golden):
    _, tensors = golden
    vae = tiny_model.model.vae
    with torch.no_grad():
        mean = vae.encode(tensors["vae.input"][None]).latent_dist.mean
        latent = (mean - vae.config.shift_factor) * vae.config.scaling_factor
        recon = vae.decode(tensors["vae.latent"][None] / vae.config.scaling_factor + vae.config.shift_factor).sample
    assert_close("vae.latent", latent[0], tensors["vae.latent"])
    assert_close("vae.recon", recon[0], tensors["vae.recon"])


@pytest.mark.parametrize("case_name", ["t2i", "i2i"])
def test_image_generation_parity(tiny_model, tiny_processor, input_image, golden, case_name):
    cases, tensors = golden
    case = cases["cases"][case_name]
    if case_name == "i2i":
        inputs = tiny_processor(images=input_image, text=case["instruction"], generation_mode="image")
        assert_close("i2i.vae_pixels", inputs["vae_pixel_values"][0], tensors["i2i.vae_pixels"])
    else:
        inputs = tiny_processor(text=case["prompt"], generation_mode="image")
    height, width = case["image_shapes"]
    output = tiny_model.generate(
        **inputs,
        generation_mode="image",
        height=height,
        width=width,
        num_inference_steps=case["num_timesteps"],
        timestep_shift=case["timestep_shift"],
        cfg_text_scale=case["cfg_text_scale"],
        cfg_img_scale=case["cfg_img_scale"],
        cfg_interval=tuple(case["cfg_interval"]),
        cfg_renorm_type=case["cfg_renorm_type"],
        cfg_renorm_min=case["cfg_renorm_min"],
        latents=tensors[f"{case_name}.init_noise"][None],
        vae_encode="mean",
    )
    assert_close(f"{case_name}.final_latent", output.latents, tensors[f"{case_name}.final_latent"])
    assert_uint8_matches(f"{case_name}.image_uint8", output.images, tensors[f"{case_name}.image_uint8"])


def test_every_recorded_tensor_is_checked(golden):
    """A new recording in golden.safetensors must get a comparison here."""
    _, tensors = golden
    checked = {
        "vqa.vit_pixels", "vqa.step_logits", "vae.input", "vae.latent", "vae.recon",
        "t2i.init_noise", "t2i.final_latent", "t2i.image_uint8",
        "i2i.vae_pixels", "i2i.init_noise", "i2i.final_latent", "i2i.image_uint8",
    }
    assert set(tensors) <= checked, f"unchecked recordings: {sorted(set(tensors) - checked)}"
