"""bfloat16: the reference cases, run in bfloat16, stay within stated bounds of the original's float32 record.

The package follows the original's bfloat16 arithmetic step by step (`modeling_unimedvl.sampling_unimedvl`: guidance
combination in the velocity's dtype with float32 norms, Euler product in the velocity's dtype on a float32 state,
guidance interval in float32; q/k norms and RoPE of VAE blocks in float32; the VAE under CUDA autocast and the 8-bit
conversion in its dtype). The original itself was only recorded in float32, so bfloat16 is bounded against that
record. Text decoding is teacher-forced with the recorded greedy choices (and think mode with the recorded planning
text), so that one flipped argmax does not turn a rounding difference into a different sequence.

Bounds, with bfloat16's unit roundoff u = 2^-8 ≈ 0.0039 (8 significant bits):
- logits and the VAE latent: max abs difference ≤ 0.05 · max|recorded| (≈ 13 u): a value passes through the
  two-layer decoder (or the VAE encoder) with tens of bfloat16 roundings, each ≤ u relative, partly cancelling;
  measured ≤ 0.02 of the scale.
- final latents: ≤ 0.05 · max|recorded|: the same per model evaluation, amplified by the guidance extrapolation
  (text scale 4, image scale 2) and accumulated over the Euler steps; measured ≤ 0.011 of the scale.
- 8-bit images: max ≤ 16 levels and mean ≤ 2 levels: the conversion alone moves a pixel by up to 1 level (bfloat16
  spacing is 1 between 128 and 256), the bfloat16 VAE decoder adds about 1 % of the range; measured max 6, mean 0.8.
- the VAE reconstruction (decoding the recorded latent with the bfloat16 decoder, about thirty convolutions and
  GroupNorms in a row): max abs difference ≤ 0.15 and mean ≤ 0.02 on [-1, 1]; measured max 0.09 at a few pixels
  (0.3 % of them above 0.05), mean 0.008, while a float32 decoder fed the same bfloat16-rounded latent stays within
  0.03, so the decoder's own rounding dominates. Pixel inputs are float32 and used as recorded.

The same test runs on CUDA with `--run-gpu` (`cuda` parameter); the 1024² cases are `slow` on the CPU.
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

from modeling_unimedvl import UniMedVLForConditionalGeneration
from modeling_unimedvl.modeling_unimedvl import cfg_context_masks, patchify_latents, unpatchify_latents


RELATIVE_BOUND = 0.05
"""Max abs difference of logits and latents as a fraction of the recorded tensor's max abs value."""
UINT8_MAX_BOUND, UINT8_MEAN_BOUND = 16, 2.0
"""Max and mean abs difference of 8-bit images, in levels."""
RECON_MAX_BOUND, RECON_MEAN_BOUND = 0.15, 0.02
"""Max and mean abs difference of the VAE reconstruction in [-1, 1]."""
LARGE_TOKENS = 1024
"""Cases with more latent tokens than this (1024² images) decode slowly in bfloat16 on a CPU: `slow` there."""


def case_params():
    """(case, device) pairs: every recorded case on the CPU (1024² cases slow) and on CUDA (`gpu`)."""
    if not (REFERENCE_DIR / "golden.json").is_file():
        return []
    cases, _ = load_golden(REFERENCE_DIR)
    params = []
    for name in recorded_cases(REFERENCE_DIR):
        shapes = cases["cases"].get(name, {}).get("image_shapes", (0, 0))
        large = shapes[0] * shapes[1] > LARGE_TOKENS * 256
        params.append(pytest.param(name, "cpu", marks=[pytest.mark.slow] if large else [], id=f"{name}-cpu"))
        params.append(pytest.param(name, "cuda", marks=[pytest.mark.gpu], id=f"{name}-cuda"))
    return params


@pytest.fixture(scope="module")
def golden(reference_dir):
    return load_golden(reference_dir)


@pytest.fixture(scope="module")
def bf16_models(converted_dir):
    models = {}

    def model_on(device: str) -> UniMedVLForConditionalGeneration:
        if device not in models:
            model = UniMedVLForConditionalGeneration.from_pretrained(converted_dir, dtype=torch.bfloat16)
            models[device] = model.to(device).eval()
        return models[device]

    return model_on


class Bounds:
    """Checks one case's recorded tensors against bfloat16 results and remembers which ones it checked."""

    def __init__(self, case_name: str, tensors: dict[str, torch.Tensor]):
        self.case_name, self.tensors = case_name, tensors
        self.checked: dict[str, float] = {}

    def expected(self, suffix: str) -> torch.Tensor:
        return self.tensors[f"{self.case_name}.{suffix}"]

    def has(self, suffix: str) -> bool:
        return f"{self.case_name}.{suffix}" in self.tensors

    def within(self, suffix: str, actual: torch.Tensor, bound: float, mean_bound: float | None = None) -> None:
        name, expected = f"{self.case_name}.{suffix}", self.expected(suffix)
        assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape {tuple(actual.shape)}"
        difference = (actual.detach().float().cpu() - expected.float()).abs()
        self.checked[name] = difference.max().item()
        assert difference.max() <= bound, f"{name}: max abs difference {difference.max():.3g} > {bound:.3g} in bfloat16"
        if mean_bound is not None:
            assert difference.mean() <= mean_bound, f"{name}: mean abs difference {difference.mean():.3g} > {mean_bound}"

    def relative(self, suffix: str, actual: torch.Tensor) -> None:
        self.within(suffix, actual, RELATIVE_BOUND * self.expected(suffix).abs().max().item())

    def uint8_image(self, suffix: str, images: torch.Tensor) -> None:
        name = f"{self.case_name}.{suffix}"
        ours, _ = to_uint8(images.cpu())
        difference = (ours.int() - self.expected(suffix).int()).abs().float()
        self.checked[name] = difference.max().item()
        assert difference.max() <= UINT8_MAX_BOUND and difference.mean() <= UINT8_MEAN_BOUND, (
            f"{name}: max {difference.max():.0f}, mean {difference.mean():.2f} levels in bfloat16"
        )

    def given(self, suffix: str) -> None:
        """A recorded input used as it is (its layout is checked by the float32 parity test)."""
        self.checked[f"{self.case_name}.{suffix}"] = 0.0

    def assert_complete(self) -> None:
        recorded = {key for key in self.tensors if key.split(".", 1)[0] == self.case_name}
        assert set(self.checked) == recorded, f"recorded but not checked: {sorted(recorded - set(self.checked))}"


def forced_step_logits(model, inputs, recorded: torch.Tensor) -> torch.Tensor:
    """The logits `[steps, vocab]` of the original's decoding loop with the recorded greedy choices fed back:
    `<|im_start|>` ends `inputs`, the choices are the argmax of each recorded step but the last."""
    choices = recorded.argmax(dim=-1)[:-1][None].to(model.device)
    input_ids = torch.cat([inputs["input_ids"], choices], 1)
    attention_mask = torch.cat([inputs["attention_mask"], torch.ones_like(choices)], 1)
    images = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **images).logits
    return logits[0, -recorded.shape[0] :]


def check_understanding(bounds, model, processor, reference_dir, case, kind):
    inputs = understanding_inputs(processor, reference_dir, case, kind).to(model.device)
    if bounds.has("vit_pixels"):
        bounds.given("vit_pixels")
    recorded = bounds.expected("step_logits")
    assert recorded.shape[0] == decoding_steps(case, kind)
    bounds.relative("step_logits", forced_step_logits(model, inputs, recorded))


def check_generation(bounds, model, processor, reference_dir, case, kind):
    inputs = generation_inputs(processor, reference_dir, case).to(model.device)
    config = model.config
    for suffix in ("vae_pixels", "init_noise"):
        if bounds.has(suffix):
            bounds.given(suffix)
    text_masks = {}
    if case.get("think", False):
        context = with_generation_prompt(inputs, config.bos_token_id)
        bounds.relative("text_step_logits", forced_step_logits(model, context, bounds.expected("text_step_logits")))
        # The recorded planning text joins the full context only, as the think step would append it.
        text_keep, image_keep = cfg_context_masks(inputs["input_ids"], inputs["attention_mask"], config)
        tokens = processor.tokenizer.encode(case["think_text"], add_special_tokens=False)
        segment = torch.tensor([[config.bos_token_id, *tokens, config.eos_token_id]], device=model.device)
        unselected = torch.zeros_like(segment, dtype=torch.bool)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], segment], 1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(segment)], 1)
        text_masks = dict(
            cfg_text_mask=torch.cat([text_keep, unselected], 1), cfg_img_mask=torch.cat([image_keep, unselected], 1)
        )
    output = model.generate(
        **inputs, generation_mode="image", latents=bounds.expected("init_noise")[None], vae_encode="mean",
        **sampler_settings(case), **text_masks,
    )
    assert output.latents.dtype == torch.float32 and output.images.dtype == torch.bfloat16  # state float32, VAE bf16
    bounds.relative("final_latent", output.latents)
    bounds.uint8_image("image_uint8", output.images)


def check_vae(bounds, model, processor, reference_dir, case, kind):
    bounds.given("input")
    tokens, grid = model.model.encode_images([bounds.expected("input").to(model.device)], sample=False)
    patch = model.config.latent_patch_size
    bounds.relative("latent", unpatchify_latents(tokens, *grid[0].tolist(), patch))
    latent = bounds.expected("latent").to(model.device)
    recon = model.decode_latents(patchify_latents(latent, patch)[None], latent.shape[1] // patch, latent.shape[2] // patch)
    bounds.within("recon", recon[0], RECON_MAX_BOUND, RECON_MEAN_BOUND)


CHECKS = {
    "chat": check_understanding,
    "interleave_understanding": check_understanding,
    "generation": check_generation,
    "vae": check_vae,
}


@pytest.mark.parametrize("case_name, device", case_params())
def test_reference_case_in_bfloat16(case_name, device, bf16_models, tiny_processor, reference_dir, golden):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.fail("--run-gpu needs a CUDA device")
    cases, tensors = golden
    case = cases["cases"].get(case_name)
    kind = case_kind(case_name, case)
    bounds = Bounds(case_name, tensors)
    with torch.no_grad():
        CHECKS[kind](bounds, bf16_models(device), tiny_processor, reference_dir, case, kind)
    bounds.assert_complete()
    print(" ".join(f"{name}={difference:.3g}" for name, difference in sorted(bounds.checked.items())))
