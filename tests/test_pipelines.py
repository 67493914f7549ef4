"""diffusers pipelines: parity with the model-level generate, outputs, batching, callbacks, save/load, offload, errors."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from unimedvl_pipelines import UniMedVLImg2ImgPipeline, UniMedVLPipeline
from unimedvl_pipelines.pipeline_unimedvl import EDIT_ANSWER_SEPARATOR


PROMPT = "A chest X-ray with cardiomegaly."
INSTRUCTION = "Generate a FLAIR image from the given T2 MRI slice."
T2I = dict(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.4, 1.0), cfg_renorm_type="global", cfg_renorm_min=0.0)
I2I = dict(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel", cfg_renorm_min=0.0)


@pytest.fixture(scope="module")
def pipe(converted_dir):
    pipe = UniMedVLPipeline.from_pretrained(converted_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def model_images(model, processor, prompts, images=None, seed=0, **kwargs):
    inputs = processor(images=images, text=prompts, generation_mode="image")
    return model.generate(**inputs, generation_mode="image", generator=seeded(seed), **kwargs)


def to_uint8(images):
    return ((images * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_converted_folder_loads_with_the_vae_shared(pipe, converted_dir):
    assert set(pipe.components) == {"model", "processor", "scheduler"}
    assert pipe.vae is pipe.model.model.vae and pipe.vae_scale_factor == 16
    assert pipe.model.dtype == torch.float32 and not pipe.model.training
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0


def test_scheduler_reproduces_the_original_schedule(pipe):
    steps, shift = 7, 3.0
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(sigmas=np.linspace(1, 0, steps)[:-1].tolist())
    t = torch.linspace(1, 0, steps, dtype=torch.float64)
    shifted = shift * t / (1 + (shift - 1) * t)
    assert torch.allclose(scheduler.sigmas.double(), shifted, atol=1e-6)
    x, v = torch.randn(1, 4, 64), torch.randn(1, 4, 64)
    stepped = scheduler.step(v, scheduler.timesteps[0], x, return_dict=False)[0]
    assert torch.allclose(stepped, x - v * float(shifted[0] - shifted[1]), atol=1e-6)


def test_text_to_image_equals_model_generate(pipe):
    reference = model_images(pipe.model, pipe.processor, PROMPT, height=64, width=96, num_inference_steps=6, **T2I)
    kwargs = dict(height=64, width=96, num_inference_steps=6)
    pil = pipe(PROMPT, generator=seeded(), **kwargs).images
    assert len(pil) == 1 and pil[0].size == (96, 64)
    assert np.array_equal(np.asarray(pil[0]), to_uint8(reference.images)[0])
    array = pipe(PROMPT, generator=seeded(), output_type="np", **kwargs).images
    assert array.shape == (1, 64, 96, 3) and array.dtype == np.float32
    assert np.array_equal(np.round(array * 255).astype(np.uint8), to_uint8(reference.images))
    tensor = pipe(PROMPT, generator=seeded(), output_type="pt", **kwargs).images
    assert torch.equal(tensor, (reference.images * 0.5 + 0.5).clamp(0, 1))
    latents = pipe(PROMPT, generator=seeded(), output_type="latent", **kwargs).images
    assert torch.equal(latents, reference.latents) and latents.shape == (1, 24, 64)
    images, = pipe(PROMPT, generator=seeded(), output_type="pt", return_dict=False, **kwargs)
    assert torch.equal(images, tensor)


def test_image_to_image_equals_model_generate(pipe, reference_image):
    edit = UniMedVLImg2ImgPipeline.from_pipe(pipe)
    edit.set_progress_bar_config(disable=True)
    assert edit.model is pipe.model
    reference = model_images(
        pipe.model, pipe.processor, INSTRUCTION, reference_image, height=64, width=96, num_inference_steps=6, **I2I
    )
    result = edit(INSTRUCTION, image=reference_image, height=64, width=96, num_inference_steps=6, generator=seeded(), output_type="pt")
    assert torch.equal(result.images, (reference.images * 0.5 + 0.5).clamp(0, 1))
    # The same call through the text-to-image class with explicit editing settings.
    same = pipe(
        INSTRUCTION, image=reference_image, height=64, width=96, num_inference_steps=6, generator=seeded(), output_type="pt",
        guidance_scale=4.0, image_guidance_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel",
    )
    assert torch.equal(same.images, result.images)
    default_size = edit(INSTRUCTION, image=reference_image, num_inference_steps=2, generator=seeded(), output_type="pt")
    vae_size = pipe.processor(images=reference_image, text=INSTRUCTION, generation_mode="image")["vae_pixel_values"][0].shape
    assert default_size.images.shape[-2:] == vae_size[-2:]


def test_batched_prompts_and_images_per_prompt(pipe):
    prompts = [PROMPT, "An axial brain MRI with a large tumour in the left frontal lobe."]
    reference = model_images(
        pipe.model, pipe.processor, [prompts[0], prompts[0], prompts[1], prompts[1]], height=32, width=48,
        num_inference_steps=3, **T2I,
    )
    result = pipe(prompts, num_images_per_prompt=2, height=32, width=48, num_inference_steps=3, generator=seeded(), output_type="pt")
    assert result.images.shape == (4, 3, 32, 48)
    assert torch.equal(result.images, (reference.images * 0.5 + 0.5).clamp(0, 1))
    assert not torch.equal(result.images[0], result.images[1])  # different noise per image
    generators = [seeded(1), seeded(2)]
    per_image = pipe(prompts, height=32, width=48, num_inference_steps=3, generator=generators, output_type="latent").images
    single = pipe(prompts[1], height=32, width=48, num_inference_steps=3, generator=seeded(2), output_type="latent").images
    assert torch.allclose(per_image[1], single[0], atol=1e-5)


def test_latents_input_and_step_callback(pipe):
    noise = torch.randn(1, 6, 64, generator=seeded(3))
    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        assert pipeline is pipe and set(callback_kwargs) == {"latents"}
        seen.append((step, float(timestep), pipeline.current_timestep is timestep, callback_kwargs["latents"].shape))
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if step == 3 else {}

    result = pipe(PROMPT, height=32, width=48, num_inference_steps=5, latents=noise, output_type="latent", callback_on_step_end=callback)
    sigmas = 3 * np.linspace(1, 0, 5)[:-1] / (1 + 2 * np.linspace(1, 0, 5)[:-1])
    assert [s for s, _, _, _ in seen] == [0, 1, 2, 3] and pipe.num_timesteps == 4
    assert np.allclose([t for _, t, _, _ in seen], sigmas * 1000, atol=1e-3)
    assert all(current and shape == (1, 6, 64) for _, _, current, shape in seen)
    assert torch.equal(result.images, torch.zeros(1, 6, 64))
    free = pipe(PROMPT, height=32, width=48, num_inference_steps=5, latents=noise, output_type="latent").images
    reference = model_images(pipe.model, pipe.processor, PROMPT, height=32, width=48, num_inference_steps=5, latents=noise, **T2I)
    assert torch.equal(free, reference.latents)


def test_timestep_shift_override_leaves_the_scheduler_alone(pipe):
    shifted = pipe(PROMPT, height=32, width=32, num_inference_steps=3, timestep_shift=1.0, generator=seeded(), output_type="latent")
    reference = model_images(pipe.model, pipe.processor, PROMPT, height=32, width=32, num_inference_steps=3, timestep_shift=1.0, **T2I)
    assert torch.equal(shifted.images, reference.latents) and pipe.scheduler.config.shift == 3.0


def test_understanding_first_editing_flow(pipe, reference_image):
    """The answer step sees the image as the original's interleave understanding does (VAE-side resize first), its
    answer is the original's text segment, and it is appended to the instruction only when it is not empty."""
    edit = UniMedVLImg2ImgPipeline.from_pipe(pipe)
    edit.set_progress_bar_config(disable=True)
    inputs = pipe.processor(images=reference_image, text=INSTRUCTION, mode="interleave_understanding")
    answer = pipe.model.generate_text_segment(**inputs, tokenizer=pipe.processor.tokenizer, max_think_token_n=4)[0]
    assert answer
    kwargs = dict(image=reference_image, height=32, width=48, num_inference_steps=3, output_type="pt")
    result = edit(INSTRUCTION, understanding_first=True, max_think_token_n=4, generator=seeded(), **kwargs)
    assert result.text == [answer]
    combined = INSTRUCTION + EDIT_ANSWER_SEPARATOR + answer
    reference = model_images(pipe.model, pipe.processor, combined, reference_image, height=32, width=48, num_inference_steps=3, **I2I)
    assert torch.equal(result.images, (reference.images * 0.5 + 0.5).clamp(0, 1))
    images, text = edit(
        INSTRUCTION, understanding_first=True, max_think_token_n=4, generator=seeded(), return_dict=False, **kwargs
    )
    assert text == [answer] and torch.equal(images, result.images)
    # One decoding step keeps no token: an empty answer leaves the instruction as it is.
    empty = edit(INSTRUCTION, understanding_first=True, max_think_token_n=1, generator=seeded(), **kwargs)
    plain = edit(INSTRUCTION, generator=seeded(), **kwargs)
    assert empty.text == [""] and torch.equal(empty.images, plain.images)


def test_save_load_round_trips(pipe, converted_dir, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_unimedvl", "UniMedVLPipeline"]
    assert index["model"] == ["modeling_unimedvl", "UniMedVLForConditionalGeneration"]
    assert index["processor"] == ["processing_unimedvl", "UniMedVLProcessor"]
    assert "vae" not in index and not (tmp_path / "pipe" / "vae").exists()  # the VAE is saved once, inside the model
    assert not list((tmp_path / "pipe").rglob("*.bin")) and not list((tmp_path / "pipe").rglob("*.pt"))
    reloaded = UniMedVLPipeline.from_pretrained(tmp_path / "pipe")
    reloaded.set_progress_bar_config(disable=True)
    state, reloaded_state = pipe.model.state_dict(), reloaded.model.state_dict()
    assert state.keys() == reloaded_state.keys() and all(torch.equal(state[k], reloaded_state[k]) for k in state)
    kwargs = dict(height=32, width=32, num_inference_steps=3, output_type="latent")
    assert torch.equal(reloaded(PROMPT, generator=seeded(), **kwargs).images, pipe(PROMPT, generator=seeded(), **kwargs).images)
    flat = tmp_path / "flat"
    shutil.copytree(converted_dir, flat)
    FlowMatchEulerDiscreteScheduler(shift=2.0).save_pretrained(flat / "scheduler")
    assert UniMedVLPipeline.from_pretrained(flat, model=pipe.model).scheduler.config.shift == 2.0


def test_model_cpu_offload_runs(converted_dir):
    offloaded = UniMedVLPipeline.from_pretrained(converted_dir)
    offloaded.set_progress_bar_config(disable=True)
    expected = offloaded(PROMPT, height=32, width=32, num_inference_steps=3, generator=seeded(), output_type="latent").images
    offloaded.enable_model_cpu_offload(device="cpu")
    assert hasattr(offloaded.model, "_hf_hook")
    result = offloaded(PROMPT, height=32, width=32, num_inference_steps=3, generator=seeded(), output_type="latent").images
    assert torch.equal(result, expected)


def test_bad_inputs(pipe, reference_image, tmp_path):
    edit = UniMedVLImg2ImgPipeline.from_pipe(pipe)
    cases = [
        (dict(prompt=PROMPT, height=30, width=32), "`height` must be a positive multiple of 16, got 30"),
        (dict(prompt=PROMPT, output_type="jpeg"), "`output_type` must be one of"),
        (dict(prompt=""), "`prompt` must be a non-empty string"),
        (dict(prompt=PROMPT, num_inference_steps=1), "at least 2"),
        (dict(prompt=PROMPT, num_images_per_prompt=0), "at least 1"),
        (dict(prompt=PROMPT, cfg_interval=(0.5, 0.2)), "cfg_interval"),
        (dict(prompt=[PROMPT, PROMPT], image=[reference_image] * 3), "images for 3 prompts but 2 prompts"),
        (dict(prompt=PROMPT, callback_on_step_end_tensor_inputs=["noise"]), r"may only hold \['latents'\]"),
        (dict(prompt=PROMPT, cfg_renorm_type="none", height=32, width=32, num_inference_steps=2), "`cfg_renorm_type` must be one of"),
        (dict(prompt=PROMPT, understanding_first=True, think=True), "not both"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe(**kwargs)
    with pytest.raises(ValueError, match="needs `image`"):
        edit(PROMPT)
    with pytest.raises(ValueError, match=r"nothing\.dcm: no such file"):
        edit(PROMPT, image=tmp_path / "nothing.dcm")
    with pytest.raises(OSError, match="neither a model_index.json"):
        UniMedVLPipeline.from_pretrained(tmp_path)
