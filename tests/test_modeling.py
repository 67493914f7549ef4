"""Model behaviour: save/load, Auto classes, remote code, caches, batching, and clear errors for bad input."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoProcessor,
)

import modeling_unimedvl as m


QUESTION = "What modality is this image?"


def understanding_logits(model, processor, image, prompt=QUESTION):
    inputs = processor(images=image, text=prompt)
    with torch.no_grad():
        return model(**inputs).logits


def test_save_load_round_trip_sharded(tiny_model, tiny_processor, reference_image, tmp_path):
    tiny_model.save_pretrained(tmp_path, max_shard_size="5MB")
    tiny_processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not list(tmp_path.glob("*.bin"))
    reloaded = m.UniMedVLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    original_state, reloaded_state = tiny_model.state_dict(), reloaded.state_dict()
    assert original_state.keys() == reloaded_state.keys()
    for key, value in original_state.items():
        assert torch.equal(value, reloaded_state[key]), key
    processor = m.UniMedVLProcessor.from_pretrained(tmp_path)
    expected = understanding_logits(tiny_model, tiny_processor, reference_image)
    assert torch.equal(understanding_logits(reloaded, processor, reference_image), expected)
    with open(tmp_path / "config.json") as handle:
        saved = json.load(handle)
    assert "lm_head.weight" in json.load(open(tmp_path / "model.safetensors.index.json"))["weight_map"]
    assert saved["model_type"] == "unimedvl" and saved["text_config"]["vocab_size"] == tiny_model.config.text_config.vocab_size


def test_auto_classes_resolve(converted_dir):
    assert type(AutoConfig.from_pretrained(converted_dir)) is m.UniMedVLConfig
    assert type(AutoModel.from_pretrained(converted_dir)) is m.UniMedVLModel
    assert type(AutoModelForImageTextToText.from_pretrained(converted_dir)) is m.UniMedVLForConditionalGeneration
    assert type(AutoModelForMultimodalLM.from_pretrained(converted_dir)) is m.UniMedVLForConditionalGeneration
    processor = AutoProcessor.from_pretrained(converted_dir)
    assert type(processor) is m.UniMedVLProcessor
    assert type(processor.image_processor) is m.UniMedVLImageProcessor


def test_remote_code_loads_without_the_package(converted_dir, tiny_model, tiny_processor, reference_image, tmp_path):
    """A fresh process in which `modeling_unimedvl` cannot be imported loads the folder through its own code."""
    expected = understanding_logits(tiny_model, tiny_processor, reference_image)
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling_unimedvl"] = None  # the package is "not installed"
        import torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor
        path = {str(converted_dir)!r}
        model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        image = Image.open({str(tmp_path / "image.png")!r})
        with torch.no_grad():
            logits = model(**processor(images=image, text={QUESTION!r})).logits
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        print("MAXDIFF", (logits - expected).abs().max().item())
        """
    )
    reference_image.save(tmp_path / "image.png")
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    difference = float(result.stdout.split("MAXDIFF")[-1])
    assert difference == 0.0


def test_static_cache_matches_dynamic_cache(tiny_model, tiny_processor, reference_image):
    inputs = tiny_processor(images=reference_image, text=QUESTION)
    kwargs = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    dynamic = tiny_model.generate(**inputs, **kwargs)
    static = tiny_model.generate(**inputs, cache_implementation="static", **kwargs)
    assert torch.equal(dynamic.sequences, static.sequences)
    assert torch.allclose(torch.stack(dynamic.logits), torch.stack(static.logits), atol=1e-5)


def test_padded_batch_equals_single_runs(tiny_model, tiny_processor, reference_image):
    images = [reference_image, reference_image.rotate(90, expand=True)]
    prompts = [QUESTION, "Is there a fracture of the left femur in this radiograph of the patient?"]
    kwargs = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    batch_inputs = tiny_processor(images=[[image] for image in images], text=prompts)
    assert (batch_inputs["attention_mask"] == 0).any(), "the two prompts must need padding"
    batch = tiny_model.generate(**batch_inputs, **kwargs)
    for row, (image, prompt) in enumerate(zip(images, prompts)):
        single = tiny_model.generate(**tiny_processor(images=image, text=prompt), **kwargs)
        assert batch.sequences[row, -5:].tolist() == single.sequences[0, -5:].tolist()
        difference = (torch.stack(batch.logits, 1)[row] - torch.stack(single.logits, 1)[0]).abs().max()
        assert difference < 1e-5


def test_image_generation_batch_equals_single_runs(tiny_model, tiny_processor):
    prompts = ["A chest X-ray.", "An axial brain MRI with a large tumour in the left frontal lobe."]
    noise = torch.randn(2, 24, tiny_model.config.patch_latent_dim, generator=torch.Generator().manual_seed(0))
    kwargs = dict(generation_mode="image", height=64, width=96, num_inference_steps=4, cfg_text_scale=4.0, cfg_img_scale=1.0)
    batch = tiny_model.generate(**tiny_processor(text=prompts, generation_mode="image"), latents=noise, **kwargs)
    for row, prompt in enumerate(prompts):
        single = tiny_model.generate(**tiny_processor(text=prompt, generation_mode="image"), latents=noise[row : row + 1], **kwargs)
        assert (single.latents[0] - batch.latents[row]).abs().max() < 1e-5
        assert (single.images[0] - batch.images[row]).abs().max() < 1e-4


def test_seeded_generation_is_reproducible_and_seed_dependent(tiny_model, tiny_processor, reference_image):
    inputs = tiny_processor(images=reference_image, text="Turn this into a FLAIR image.", generation_mode="image")
    kwargs = dict(generation_mode="image", num_inference_steps=3, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")
    first = tiny_model.generate(**inputs, generator=torch.Generator().manual_seed(7), **kwargs)
    second = tiny_model.generate(**inputs, generator=torch.Generator().manual_seed(7), **kwargs)
    other = tiny_model.generate(**inputs, generator=torch.Generator().manual_seed(8), **kwargs)
    assert first.images.shape == (1, 3, 64, 96)
    assert torch.equal(first.latents, second.latents)
    assert not torch.allclose(first.latents, other.latents)


def test_think_mode_prepends_the_system_prompt(tiny_processor):
    plain = tiny_processor(text=QUESTION)["input_ids"][0].tolist()
    think = tiny_processor(text=QUESTION, think=True)["input_ids"][0].tolist()
    bos, eos = tiny_processor.special_ids["bos"], tiny_processor.special_ids["eos"]
    assert think[-len(plain) :] == plain
    assert think[0] == bos and think.count(bos) == plain.count(bos) + 1 and think.count(eos) == plain.count(eos) + 1


def test_multiple_images_and_turns(tiny_model, tiny_processor, reference_image):
    prompt = "<image>Compare the first image<image>with the second one."
    inputs = tiny_processor(images=[reference_image, reference_image.rotate(180)], text=prompt)
    ids = inputs["input_ids"][0].tolist()
    config = tiny_model.config
    assert ids.count(config.vision_start_token_id) == 2 and ids.count(config.bos_token_id) == 3
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A CT scan."}]},
        {"role": "user", "content": [{"type": "text", "text": "Which organ?"}]},
    ]
    rendered = tiny_processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == "<image><|im_start|>What modality is this image?<|im_end|><|im_start|>A CT scan.<|im_end|><|im_start|>Which organ?<|im_end|><|im_start|>"
    chat_inputs = tiny_processor(images=reference_image, text=rendered)
    output = tiny_model.generate(**chat_inputs, max_new_tokens=3, do_sample=False)
    assert output.shape[1] == chat_inputs["input_ids"].shape[1] + 3


def test_sampling_options_are_honoured(tiny_model, tiny_processor, reference_image):
    inputs = tiny_processor(images=reference_image, text=QUESTION)
    torch.manual_seed(0)
    first = tiny_model.generate(**inputs, do_sample=True, temperature=5.0, top_p=0.9, max_new_tokens=8)
    torch.manual_seed(0)
    second = tiny_model.generate(**inputs, do_sample=True, temperature=5.0, top_p=0.9, max_new_tokens=8)
    assert torch.equal(first, second)
    assert first.shape[1] - inputs["input_ids"].shape[1] <= 8


# ------------------------------------------------------------------------------------------------------ bad input


def test_empty_prompt_is_rejected(tiny_processor):
    with pytest.raises(ValueError, match="Empty prompt"):
        tiny_processor(text="   ")


def test_unsupported_generation_mode_is_rejected(tiny_model, tiny_processor):
    with pytest.raises(ValueError, match="Unsupported generation_mode 'video'"):
        tiny_processor(text=QUESTION, generation_mode="video")
    with pytest.raises(ValueError, match="Unsupported generation_mode 'audio'"):
        tiny_model.generate(**tiny_processor(text=QUESTION), generation_mode="audio")


def test_image_above_the_size_limit_is_rejected(tiny_processor):
    from PIL import Image

    processor = m.UniMedVLProcessor(m.UniMedVLImageProcessor(max_image_pixels=10_000), tiny_processor.tokenizer)
    with pytest.raises(ValueError, match=r"Image of 200x100 = 20000 pixels exceeds the limit of 10000"):
        processor(images=Image.new("RGB", (200, 100)), text=QUESTION)


def test_generation_size_limits_are_enforced(tiny_model, tiny_processor):
    inputs = tiny_processor(text="A chest X-ray.", generation_mode="image")
    with pytest.raises(ValueError, match="multiples of 16 up to 1024 pixels, got 100x96"):
        tiny_model.generate(**inputs, generation_mode="image", height=100, width=96, num_inference_steps=2)
    with pytest.raises(ValueError, match="`cfg_renorm_type` must be one of"):
        tiny_model.generate(**inputs, generation_mode="image", height=64, width=64, cfg_renorm_type="bogus")
    with pytest.raises(ValueError, match="`height` was given without `width`"):
        tiny_model.generate(**inputs, generation_mode="image", height=64, num_inference_steps=2)


def test_image_and_placeholder_counts_must_agree(tiny_model, tiny_processor, reference_image):
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        tiny_processor(images=reference_image, text="<image> and <image>")
    inputs = tiny_processor(images=reference_image, text=QUESTION)
    with pytest.raises(ValueError, match="no `pixel_values`"):
        tiny_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
