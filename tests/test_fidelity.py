"""Behaviours of the original that the recorded cases do not pin down: the guidance interval in float32, guidance
contexts of any interleaving, think mode, the editing flow's answer step, full-softmax sampling and the converted
generation config, random draws per row, rows of different sizes, image loading, `inference_ver=1` and the checks of
every sampler argument."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_unimedvl.modeling_unimedvl import cfg_context_masks
from modeling_unimedvl.sampling_unimedvl import generators_on, guided_steps
from unimedvl_pipelines import UniMedVLImg2ImgPipeline, UniMedVLPipeline
from unimedvl_pipelines.pipeline_unimedvl import default_scheduler, postprocess_images


QUESTION = "What modality is this image?"
PROMPT = "A chest X-ray with cardiomegaly."
INSTRUCTION = "Generate a FLAIR image from the given T2 MRI slice."
EDIT = dict(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe(tiny_model, tiny_processor):
    pipe = UniMedVLPipeline(tiny_model, tiny_processor, default_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------ 1. guidance interval


@pytest.mark.parametrize("steps", [12, 23, 34, 45, 67])
def test_guidance_interval_bound_is_compared_in_float32(steps):
    """At these step counts (shift 3) one sigma equals float32(0.4): the original does not guide that step."""
    scheduler = default_scheduler(3.0)
    scheduler.set_timesteps(sigmas=torch.linspace(1, 0, steps)[:-1].tolist())
    t = torch.linspace(1, 0, steps)
    assert torch.equal(scheduler.sigmas, 3.0 * t / (1 + 2.0 * t))  # the original's float32 schedule, bit for bit
    sigmas = scheduler.sigmas[:-1]
    on_bound = (sigmas == torch.tensor(0.4)).nonzero().flatten().tolist()
    assert len(on_bound) == 1 and float(sigmas[on_bound[0]]) > 0.4  # a comparison in doubles would guide it
    guided = guided_steps(sigmas, (0.4, 1.0))
    assert guided[on_bound[0]] is False and guided[on_bound[0] - 1] is True
    assert guided == [bool(s > 0.4) and s != torch.tensor(0.4) for s in sigmas]


# ------------------------------------------------------------------------------------------------ 4. guidance contexts


def context_masks(processor, config, prompt, images=None, think=False):
    inputs = processor(images=images, text=prompt, generation_mode="image", think=think)
    ids = inputs["input_ids"][0]
    text, image = cfg_context_masks(inputs["input_ids"], inputs["attention_mask"], config)
    positions = torch.arange(ids.shape[0])
    text_starts = positions[ids == config.bos_token_id].tolist()
    in_image = (ids == config.vision_start_token_id).cumsum(0) - (ids == config.vision_end_token_id).cumsum(0)
    in_image = (in_image > 0) | (ids == config.vision_end_token_id)
    return positions, text[0], image[0], text_starts, in_image


def test_guidance_contexts_follow_the_interleaving(tiny_model, tiny_processor, reference_image):
    config = tiny_model.config
    # Image, then text: text guidance sees the image blocks only; image guidance the text only.
    positions, text, image, starts, in_image = context_masks(tiny_processor, config, INSTRUCTION, [reference_image])
    assert torch.equal(text, positions < starts[0]) and torch.equal(text, in_image) and torch.equal(image, ~in_image)
    # Text, then image: the context is copied after the image, so text guidance sees everything.
    positions, text, image, starts, in_image = context_masks(tiny_processor, config, INSTRUCTION + "<image>", [reference_image])
    assert text.all() and torch.equal(image, ~in_image) and starts[0] == 0 and in_image[-1]
    # Text, image, text: the copy before the last text segment.
    positions, text, image, starts, in_image = context_masks(tiny_processor, config, "First.<image>Then this.", [reference_image])
    assert len(starts) == 2 and torch.equal(text, positions < starts[1]) and torch.equal(image, ~in_image)
    assert in_image[starts[0] : starts[1]].any()
    # Text to image: an empty text-guidance context, an image-guidance context equal to the full one.
    _, text, image, _, _ = context_masks(tiny_processor, config, PROMPT)
    assert not text.any() and image.all()
    # Think: the system prompt comes before the user text and stays in both guidance contexts.
    positions, text, image, starts, _ = context_masks(tiny_processor, config, PROMPT, think=True)
    assert len(starts) == 2 and torch.equal(text, positions < starts[1]) and image.all()


def test_an_image_alone_generates_with_no_text_guidance_effect(tiny_model, tiny_processor, reference_image):
    """Without text the text-guidance context is the full one (the original copies it after the image)."""
    inputs = tiny_processor(images=reference_image, text="", generation_mode="image")
    kwargs = dict(generation_mode="image", num_inference_steps=3, vae_encode="mean", latents=torch.randn(1, 24, 64, generator=seeded(0)))
    guided = tiny_model.generate(**inputs, cfg_text_scale=4.0, cfg_img_scale=1.0, **kwargs)
    unguided = tiny_model.generate(**inputs, cfg_text_scale=1.0, cfg_img_scale=1.0, **kwargs)
    assert (guided.latents - unguided.latents).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------------ 2. think mode


def test_think_mode_plans_then_generates(tiny_model, tiny_processor, pipe):
    config, tokenizer = tiny_model.config, tiny_processor.tokenizer
    inputs = tiny_processor(text=PROMPT, generation_mode="image", think=True)
    noise = torch.randn(1, 24, 64, generator=seeded(1))
    kwargs = dict(generation_mode="image", height=64, width=96, num_inference_steps=4, cfg_img_scale=1.0, latents=noise)
    output = tiny_model.generate(**inputs, think=True, tokenizer=tokenizer, max_think_token_n=5, **kwargs)
    bos = torch.tensor([[config.bos_token_id]])
    expected_text = tiny_model.generate_text_segment(
        torch.cat([inputs["input_ids"], bos], 1), torch.cat([inputs["attention_mask"], torch.ones_like(bos)], 1),
        tokenizer, max_think_token_n=5,
    )
    assert output.text == expected_text and len(output.text[0]) > 0
    # The planning text, re-tokenized from its string, joins the full context only: the guidance contexts stay.
    segment = [config.bos_token_id, *tokenizer.encode(output.text[0], add_special_tokens=False), config.eos_token_id]
    planned = torch.cat([inputs["input_ids"], torch.tensor([segment])], 1)
    text_keep, image_keep = cfg_context_masks(inputs["input_ids"], None, config)
    unselected = torch.zeros(1, len(segment), dtype=torch.bool)
    explicit = tiny_model.generate(
        input_ids=planned, cfg_text_mask=torch.cat([text_keep, unselected], 1),
        cfg_img_mask=torch.cat([image_keep, unselected], 1), **kwargs,
    )
    assert torch.equal(output.latents, explicit.latents)
    result = pipe(PROMPT, think=True, max_think_token_n=5, height=64, width=96, num_inference_steps=4, latents=noise, output_type="pt")
    assert result.text == output.text
    assert torch.equal(result.images, (output.images * 0.5 + 0.5).clamp(0, 1))
    with pytest.raises(ValueError, match="needs `tokenizer`"):
        tiny_model.generate(**inputs, think=True, **kwargs)


def test_think_prompt_for_understanding(tiny_processor):
    from modeling_unimedvl.processing_unimedvl import VLM_THINK_SYSTEM_PROMPT

    think = tiny_processor(text=QUESTION, think=True)["input_ids"][0].tolist()
    system = tiny_processor.tokenizer.encode(VLM_THINK_SYSTEM_PROMPT, add_special_tokens=False)
    assert think[1 : 1 + len(system)] == system


# ------------------------------------------------------------------------------------------------ 3. editing answer step


def test_interleave_understanding_resizes_on_the_vae_side_first(tiny_processor):
    image = Image.new("RGB", (256, 256), (90, 30, 200))
    chat = tiny_processor(images=image, text=QUESTION)
    interleave = tiny_processor(images=image, text=QUESTION, mode="interleave_understanding")
    assert chat["image_grid_hw"].tolist() == [[27, 27]] and interleave["image_grid_hw"].tolist() == [[28, 28]]
    assert "vae_pixel_values" not in interleave


# ------------------------------------------------------------------------------------------------ 5. sampling


def test_converted_generation_config_and_full_softmax_sampling(converted_dir, tiny_model, tiny_processor, reference_image):
    saved = json.loads((converted_dir / "generation_config.json").read_text())
    assert saved["do_sample"] is False and saved["max_new_tokens"] == 512 and saved["temperature"] == 1.0
    assert "top_k" not in saved and saved["eos_token_id"] == tiny_model.config.eos_token_id
    inputs = tiny_processor(images=reference_image, text=QUESTION)
    kwargs = dict(do_sample=True, temperature=4.0, max_new_tokens=8, min_new_tokens=8, return_dict_in_generate=True)
    torch.manual_seed(3)
    sampled = tiny_model.generate(**inputs, output_logits=True, **kwargs)
    torch.manual_seed(3)
    replay = [torch.multinomial(torch.softmax(logits[0] / 4.0, dim=-1), 1).item() for logits in sampled.logits]
    assert sampled.sequences[0, -8:].tolist() == replay  # the original: multinomial(softmax(logits / T))
    torch.manual_seed(3)
    top_k = tiny_model.generate(**inputs, top_k=50, **kwargs)  # asked for: honoured, and it changes the draws
    assert top_k.sequences[0, -8:].tolist() != replay


# ------------------------------------------------------------------------------------------------ 6. randomness


def test_posterior_sample_then_noise_come_from_the_generator(tiny_model, tiny_processor, reference_image):
    inputs = tiny_processor(images=reference_image, text=INSTRUCTION, generation_mode="image")
    kwargs = dict(generation_mode="image", num_inference_steps=3, **EDIT)
    generator = seeded(9)
    tokens, grid = tiny_model.model.encode_images(inputs["vae_pixel_values"], sample=True, generator=generator)
    noise = torch.randn(1, int(grid.prod()), 64, generator=generator)
    vae = tiny_model.vae
    mean, logvar = vae.encode(inputs["vae_pixel_values"][0][None]).latent_dist.parameters.chunk(2, dim=1)
    posterior = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=seeded(9))
    posterior = (posterior - vae.config.shift_factor) * vae.config.scaling_factor
    assert torch.allclose(tokens, _patchify(tiny_model, posterior[0]), atol=1e-6)  # drawn first, on the VAE's device
    without_pixels = {key: value for key, value in inputs.items() if key != "vae_pixel_values"}
    expected = tiny_model.generate(**without_pixels, image_latents=(tokens, grid), latents=noise, **kwargs)
    actual = tiny_model.generate(**inputs, generator=seeded(9), vae_encode="sample", **kwargs)
    assert torch.equal(actual.latents, expected.latents)


def _patchify(model, latent):
    from modeling_unimedvl.modeling_unimedvl import patchify_latents

    return patchify_latents(latent, model.config.latent_patch_size)


def test_each_row_draws_from_its_own_generator(tiny_model, tiny_processor, reference_image):
    images = [reference_image, reference_image.rotate(180)]
    prompts = [INSTRUCTION, "Translate this T1 slice into a T2 slice of the same patient, please."]
    kwargs = dict(generation_mode="image", num_inference_steps=2, vae_encode="sample", **EDIT)
    batch_inputs = tiny_processor(images=[[image] for image in images], text=prompts, generation_mode="image")
    batch = tiny_model.generate(**batch_inputs, generator=[seeded(1), seeded(2)], **kwargs)
    for row, (image, prompt) in enumerate(zip(images, prompts)):
        single = tiny_model.generate(
            **tiny_processor(images=image, text=prompt, generation_mode="image"), generator=seeded(row + 1), **kwargs
        )
        assert (single.latents[0] - batch.latents[row]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="Got 3 generators for 2 rows"):
        tiny_model.generate(**batch_inputs, generator=[seeded(1)] * 3, **kwargs)


def test_generators_on_their_own_device_are_used_as_given():
    cpu = seeded(4)
    assert generators_on(cpu, 2, "cpu") == [cpu, cpu] and generators_on(None, 1, "cpu") == [None]
    with pytest.raises(ValueError, match="Got 1 generators for 2 rows"):
        generators_on([cpu], 2, "cpu")


@pytest.mark.gpu
def test_a_cpu_generator_draws_on_the_gpu_through_a_seeded_twin():
    """A CPU generator for a CUDA draw (the VAE posterior of a model on the GPU) becomes a CUDA generator seeded with
    its seed, as `torch.manual_seed(seed)` seeds the original's CUDA RNG; one twin per generator keeps one stream."""
    cpu = seeded(4)
    first, second = generators_on([cpu, cpu], 2, "cuda")
    assert first is second and first.device.type == "cuda" and first.initial_seed() == 4
    torch.cuda.manual_seed(4)
    assert torch.equal(torch.randn(8, device="cuda", generator=first), torch.randn(8, device="cuda"))


# ------------------------------------------------------------------------------------------------ 7. sizes per row


def test_rows_of_different_sizes_keep_their_sizes(tiny_model, tiny_processor, pipe, reference_image):
    images = [reference_image, reference_image.resize((48, 48))]
    kwargs = dict(num_inference_steps=2, vae_encode="sample", **EDIT)
    inputs = tiny_processor(images=[[image] for image in images], text=[INSTRUCTION] * 2, generation_mode="image")
    batch = tiny_model.generate(**inputs, generation_mode="image", generator=[seeded(1), seeded(2)], **kwargs)
    assert [tuple(image.shape) for image in batch.images] == [(3, 64, 96), (3, 48, 48)]
    assert [tuple(latents.shape) for latents in batch.latents] == [(24, 64), (9, 64)]
    for row, image in enumerate(images):
        single = tiny_model.generate(
            **tiny_processor(images=image, text=INSTRUCTION, generation_mode="image"), generation_mode="image",
            generator=seeded(row + 1), **kwargs,
        )
        assert (single.latents[0] - batch.latents[row]).abs().max() < 1e-5
    edit = UniMedVLImg2ImgPipeline.from_pipe(pipe)
    tensors = edit([INSTRUCTION] * 2, image=images, num_inference_steps=2, generator=[seeded(1), seeded(2)], output_type="pt").images
    assert [tuple(image.shape) for image in tensors] == [(3, 64, 96), (3, 48, 48)]
    assert torch.equal(tensors[1], (batch.images[1] * 0.5 + 0.5).clamp(0, 1))
    pil = postprocess_images(batch.images, "pil")
    assert [image.size for image in pil] == [(96, 64), (48, 48)]
    assert np.array_equal(np.asarray(pil[1]), (tensors[1] * 255).to(torch.uint8).permute(1, 2, 0).numpy())


# ------------------------------------------------------------------------------------------------ 8. image loading


def test_plain_images_convert_as_the_original(tiny_processor):
    load = tiny_processor.image_processor.load
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    alpha = np.zeros_like(grey)
    alpha[:, 4:] = 255
    la = Image.fromarray(np.stack([grey, alpha], axis=-1), "LA")
    assert np.array_equal(np.asarray(load(la)), np.repeat(grey[..., None], 3, axis=-1))  # alpha dropped
    rgba = Image.fromarray(np.stack([grey, grey, grey, alpha], axis=-1), "RGBA")
    composited = np.asarray(load(rgba))
    assert (composited[:, :4] == 255).all() and np.array_equal(composited[:, 4:, 0], grey[:, 4:])  # pasted on white
    sixteen = Image.fromarray(np.array([[0, 100, 300, 65535]], dtype=np.uint16))
    assert np.asarray(load(sixteen))[0, :, 0].tolist() == [0, 100, 255, 255]  # clipped, not min–max scaled
    floats = Image.fromarray(np.array([[-5.0, 0.7, 254.6, 300.0]], dtype=np.float32))
    assert np.asarray(load(floats))[0, :, 0].tolist() == [0, 0, 254, 255]
    with pytest.raises(ValueError, match="NaN or infinite"):
        load(np.array([[0.5, np.nan]], dtype=np.float32))


def test_pipeline_gives_plain_images_to_the_processor(tiny_model, tiny_processor, pipe):
    sixteen = Image.fromarray((np.arange(64 * 96, dtype=np.uint16).reshape(64, 96) * 7) % 400)
    kwargs = dict(num_inference_steps=2, output_type="latent", generator=seeded(2))
    result = UniMedVLImg2ImgPipeline.from_pipe(pipe)(INSTRUCTION, image=sixteen, **kwargs).images
    inputs = tiny_processor(images=sixteen, text=INSTRUCTION, generation_mode="image")
    expected = tiny_model.generate(**inputs, generation_mode="image", num_inference_steps=2, generator=seeded(2), **EDIT)
    assert torch.equal(result, expected.latents)


# ------------------------------------------------------------------------------------------------ 9. inference_ver=1


def test_vqa_with_reconstruction(tiny_model, tiny_processor, pipe, reference_image):
    """`InterleaveInferencer(image, text, inference_ver=1)`: the answer from a VAE + ViT context, then a reconstruction
    from [image, question, answer] with the answer left out of text guidance."""
    answered = pipe.vqa_with_reconstruction(reference_image, QUESTION, max_think_token_n=5, generator=seeded(4))
    inputs = tiny_processor(images=reference_image, text=QUESTION, mode="generation")
    generator = seeded(4)
    tokens, grid = tiny_model.model.encode_images(inputs["vae_pixel_values"], sample=True, generator=generator)
    vit = {"pixel_values": inputs["pixel_values"], "image_grid_hw": inputs["image_grid_hw"]}
    answer = tiny_model.generate_text_segment(
        inputs["input_ids"], inputs["attention_mask"], tiny_processor.tokenizer, 5, latents=tokens, latent_grid_hw=grid, **vit
    )[0]
    assert answered.images is None and answered.text == [answer] and answer.strip()

    result = pipe.vqa_with_reconstruction(
        reference_image, QUESTION, reconstruct_image=True, max_think_token_n=5, num_inference_steps=2,
        generator=seeded(4), output_type="pt",
    )
    context = f"<image><|im_start|>{QUESTION}<|im_end|><|im_start|>{answer}<|im_end|>"
    context_inputs = tiny_processor(images=reference_image, text=context, generation_mode="image")
    assert context_inputs["input_ids"].shape[1] == inputs["input_ids"].shape[1] - 1 + len(tiny_processor.tokenizer.encode(answer)) + 2
    expected = tiny_model.generate(
        input_ids=context_inputs["input_ids"], image_latents=(tokens, grid), generator=generator, generation_mode="image",
        num_inference_steps=2, cfg_text_scale=3.0, cfg_img_scale=1.5, cfg_interval=(0.4, 1.0), **vit,
    )
    assert result.text == [answer] and len(result.images) == 1
    assert torch.equal(result.images[0], (expected.images[0] * 0.5 + 0.5).clamp(0, 1))
    two = pipe.vqa_with_reconstruction(
        [reference_image, reference_image.resize((48, 48))], QUESTION, reconstruct_image=True, max_think_token_n=5,
        num_inference_steps=2, generator=seeded(4),
    )
    assert [image.size for image in two.images] == [(96, 64), (48, 48)]


# ------------------------------------------------------------------------------------------------ sampler arguments


BAD_SAMPLER_ARGUMENTS = [
    (dict(cfg_text_scale=float("inf")), "`{cfg_text_scale}` must be a finite number, got inf"),
    (dict(cfg_text_scale=True), "`{cfg_text_scale}` must be a finite number, got True"),
    (dict(cfg_img_scale=float("nan")), "`{cfg_img_scale}` must be a finite number, got nan"),
    (dict(timestep_shift=0.0), "`timestep_shift` must be above 0.0, got 0.0"),
    (dict(timestep_shift=-1.0), "`timestep_shift` must be above 0.0, got -1.0"),
    (dict(timestep_shift=float("nan")), "`timestep_shift` must be a finite number, got nan"),
    (dict(num_inference_steps=1), "`num_inference_steps` must be an integer of at least 2"),
    (dict(num_inference_steps=2.5), "`num_inference_steps` must be an integer of at least 2"),
    (dict(cfg_interval=(0.0, float("nan"))), "`cfg_interval` must be \\(low, high\\) with 0 <= low <= high <= 1"),
    (dict(cfg_interval=(-0.1, 1.0)), "`cfg_interval` must be \\(low, high\\)"),
    (dict(cfg_interval=(0.5,)), "`cfg_interval` must be \\(low, high\\)"),
    (dict(cfg_renorm_min=1.5), "`cfg_renorm_min` must be in \\[0.0, 1.0\\], got 1.5"),
    (dict(cfg_renorm_min=float("nan")), "`cfg_renorm_min` must be a finite number"),
    (dict(cfg_renorm_type="bogus"), "`cfg_renorm_type` must be one of"),
    (dict(height=64), "`height` was given without `width`"),
    (dict(width=64), "`width` was given without `height`"),
]


@pytest.mark.parametrize("arguments, message", BAD_SAMPLER_ARGUMENTS)
def test_bad_sampler_arguments_are_named(tiny_model, tiny_processor, pipe, arguments, message):
    inputs = tiny_processor(text=PROMPT, generation_mode="image")
    with pytest.raises(ValueError, match=message.format(cfg_text_scale="cfg_text_scale", cfg_img_scale="cfg_img_scale")):
        tiny_model.generate(**inputs, generation_mode="image", **{"num_inference_steps": 2, **arguments})
    renamed = {"cfg_text_scale": "guidance_scale", "cfg_img_scale": "image_guidance_scale"}
    pipe_arguments = {renamed.get(key, key): value for key, value in arguments.items()}
    with pytest.raises(ValueError, match=message.format(**renamed)):
        pipe(PROMPT, **{"num_inference_steps": 2, **pipe_arguments})
