"""Parity with the original implementation: every tensor recorded in `golden.safetensors` of the reference folder.

The folder comes from UNIMEDVL_REFERENCE_DIR (default ../shared/reference/tiny_official); every case, size, id and
setting is read from its `golden.json`, so the same test runs unchanged on another folder of the original layout.
One test per recorded case (the prefix of the tensor names) runs the case through the package's public API and
compares each of the case's tensors; it fails if the case holds a tensor it did not compare, and the last test
checks that every prefix in the file is such a case.
"""

import pytest
import torch
from conftest import REFERENCE_DIR
from PIL import Image
from reference_cases import (
    case_kind,
    decoding_steps,
    generation_inputs,
    load_golden,
    recorded_cases,
    sampler_settings,
    to_uint8,
    understanding_inputs,
    with_generation_prompt,
)

from modeling_unimedvl.modeling_unimedvl import patchify_latents, unpatchify_latents
from modeling_unimedvl.sampling_unimedvl import initial_noise


TOLERANCE = 1e-4
"""Max abs difference allowed in float32: an equivalent operation order changes results by less than 1e-5."""


@pytest.fixture(scope="module")
def golden(reference_dir):
    return load_golden(reference_dir)


class Comparison:
    """Compares one case's recorded tensors with the package's and remembers which ones it compared."""

    def __init__(self, case_name: str, tensors: dict[str, torch.Tensor]):
        self.case_name = case_name
        self.tensors = tensors
        self.compared: set[str] = set()
        self.differences: dict[str, float] = {}

    def expected(self, suffix: str) -> torch.Tensor:
        return self.tensors[f"{self.case_name}.{suffix}"]

    def has(self, suffix: str) -> bool:
        return f"{self.case_name}.{suffix}" in self.tensors

    def close(self, suffix: str, actual: torch.Tensor) -> None:
        name, expected = f"{self.case_name}.{suffix}", self.expected(suffix)
        assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        error = (actual.float() - expected.float()).abs().max().item()
        self.differences[name] = error
        assert error <= TOLERANCE, f"{name}: max abs difference {error:.3g} > {TOLERANCE}"
        self.compared.add(name)

    def uint8_image(self, suffix: str, images: torch.Tensor) -> None:
        """The truncated 8-bit image equals the recording, except where a pixel sits within 1e-3 of an integer step."""
        name, expected = f"{self.case_name}.{suffix}", self.expected(suffix)
        ours, pixels = to_uint8(images)
        assert ours.shape == expected.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(expected.shape)}"
        differs = ours != expected
        near_step = (pixels - pixels.round()).abs() <= 1e-3
        assert not (differs & ~near_step).any(), f"{name}: {int((differs & ~near_step).sum())} pixels differ"
        self.differences[name] = float((ours.int() - expected.int()).abs().max())
        assert self.differences[name] <= 1
        self.compared.add(name)

    def shape(self, suffix: str, actual_shape: tuple[int, ...]) -> None:
        """A recorded input (used as given) that the package must lay out the same way."""
        name = f"{self.case_name}.{suffix}"
        assert tuple(self.expected(suffix).shape) == tuple(actual_shape), f"{name}: {tuple(actual_shape)}"
        self.compared.add(name)

    def assert_complete(self) -> None:
        recorded = {key for key in self.tensors if key.split(".", 1)[0] == self.case_name}
        assert self.compared == recorded, f"recorded but not compared: {sorted(recorded - self.compared)}"


def vit_pixels(inputs, processor, height: int, width: int) -> torch.Tensor:
    """The ViT patches of the first image back in `[3, H, W]` layout."""
    patch = processor.image_processor.patch_size
    assert inputs["image_grid_hw"][0].tolist() == [height // patch, width // patch]
    pixels = inputs["pixel_values"][: (height // patch) * (width // patch)]
    pixels = pixels.reshape(height // patch, width // patch, patch, patch, 3)
    return pixels.permute(4, 0, 2, 1, 3).reshape(3, height, width)


def greedy_step_logits(model, inputs, steps: int):
    """The original's decoding loop: feed `<|im_start|>` (the generation prompt), then each greedy choice; `steps`
    lm_head outputs `[steps, vocab]` and the chosen tokens."""
    output = model.generate(
        **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    return torch.stack(output.logits, dim=1)[0], output.sequences[0, inputs["input_ids"].shape[1] :].tolist()


def run_understanding(check: Comparison, model, processor, reference_dir, case: dict, kind: str) -> None:
    """`Bagel.chat` (VQA transform) or `interleave_inference(understanding_output=True)` (VAE-side resize, then the
    ViT transform): image, prompt, greedy decoding."""
    inputs = understanding_inputs(processor, reference_dir, case, kind)
    if check.has("vit_pixels"):
        check.close("vit_pixels", vit_pixels(inputs, processor, *check.expected("vit_pixels").shape[1:]))
    logits, tokens = greedy_step_logits(model, inputs, decoding_steps(case, kind))
    if "greedy_tokens" in case:
        assert tokens == case["greedy_tokens"]
    check.close("step_logits", logits)
    if kind == "interleave_understanding":
        answer = model.generate_text_segment(
            **inputs, tokenizer=processor.tokenizer, max_think_token_n=case["max_think_token_n"], do_sample=case["do_sample"]
        )
        assert answer == [case["answer"]]


def run_generation(check: Comparison, model, processor, reference_dir, case: dict, kind: str) -> None:
    """`interleave_inference` with an image output: text (+ image in `order`), the think step, then the image."""
    inputs = generation_inputs(processor, reference_dir, case)
    if check.has("vae_pixels"):
        check.close("vae_pixels", inputs["vae_pixel_values"][0])
    settings = sampler_settings(case)
    downsample = model.config.latent_downsample
    tokens = (settings["height"] // downsample) * (settings["width"] // downsample)
    check.shape("init_noise", initial_noise((1, tokens, model.config.patch_latent_dim), None).shape[1:])
    if case.get("think", False):
        context = with_generation_prompt(inputs, processor.special_ids["bos"])
        check.close("text_step_logits", greedy_step_logits(model, context, case["max_think_token_n"])[0])
        settings.update(
            think=True, tokenizer=processor.tokenizer, max_think_token_n=case["max_think_token_n"],
            text_do_sample=case["do_sample"],
        )
    output = model.generate(
        **inputs, generation_mode="image", latents=check.expected("init_noise")[None], vae_encode="mean", **settings
    )
    if case.get("think", False):
        assert output.text == [case["think_text"]]
    check.close("final_latent", output.latents)
    check.uint8_image("image_uint8", output.images)


def run_vae(check: Comparison, model, processor, reference_dir, case: None, kind: str) -> None:
    """VAE encode (posterior mean, scaled and shifted) and decode of `input.png` after the generation VAE transform."""
    inputs = processor(images=Image.open(reference_dir / "input.png"), text="", generation_mode="image")
    check.close("input", inputs["vae_pixel_values"][0])
    tokens, grid = model.model.encode_images([check.expected("input")], sample=False)
    patch = model.config.latent_patch_size
    check.close("latent", unpatchify_latents(tokens, *grid[0].tolist(), patch))
    latent = check.expected("latent")
    recon = model.decode_latents(patchify_latents(latent, patch)[None], latent.shape[1] // patch, latent.shape[2] // patch)
    check.close("recon", recon[0])


RUNNERS = {
    "chat": run_understanding,
    "interleave_understanding": run_understanding,
    "generation": run_generation,
    "vae": run_vae,
}


def test_special_token_ids(tiny_model, tiny_processor, golden):
    cases, _ = golden
    ids = cases["new_token_ids"]
    config = tiny_model.config
    assert (config.bos_token_id, config.eos_token_id) == (ids["bos_token_id"], ids["eos_token_id"])
    assert (config.vision_start_token_id, config.vision_end_token_id) == (ids["start_of_image"], ids["end_of_image"])
    assert tiny_processor.special_ids["bos"] == ids["bos_token_id"]


@pytest.mark.parametrize("case_name", recorded_cases(REFERENCE_DIR))
def test_recorded_case(case_name, tiny_model, tiny_processor, reference_dir, golden):
    cases, tensors = golden
    case = cases["cases"].get(case_name)
    kind = case_kind(case_name, case)
    assert kind in RUNNERS, f"golden.json describes no case that explains the recording {case_name!r}"
    check = Comparison(case_name, tensors)
    with torch.no_grad():
        RUNNERS[kind](check, tiny_model, tiny_processor, reference_dir, case, kind)
    check.assert_complete()
    print(" ".join(f"{name}={difference:.2g}" for name, difference in sorted(check.differences.items())))


def test_every_recorded_tensor_is_checked(golden, reference_dir):
    """Every tensor belongs to a case that `test_recorded_case` runs (each run compares all of its case's tensors)."""
    cases, tensors = golden
    prefixes = {key.split(".", 1)[0] for key in tensors}
    assert prefixes == set(recorded_cases(reference_dir)) and prefixes, "no recordings, or not the parametrized ones"
    unexplained = [name for name in prefixes if case_kind(name, cases["cases"].get(name)) not in RUNNERS]
    assert not unexplained, f"recordings without a runnable case: {sorted(unexplained)}"
