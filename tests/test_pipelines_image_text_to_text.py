"""`transformers.pipeline("image-text-to-text")` on a converted folder: chat, plain prompts, batching, sampling, streaming."""

import threading

import pytest
import torch
from transformers import ImageTextToTextPipeline, TextIteratorStreamer, pipeline

import unimedvl_pipelines  # noqa: F401  (registers the Auto classes)


QUESTION = "What modality is this image?"


@pytest.fixture(scope="module")
def vqa(converted_dir):
    return pipeline("image-text-to-text", model=str(converted_dir))


def model_answers(model, processor, images, prompts, **kwargs):
    inputs = processor(images=images, text=prompts)
    generated = model.generate(**inputs, **kwargs)
    return processor.decode_answers(generated[:, inputs["input_ids"].shape[1] :])


def chat(image, text=QUESTION):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def test_pipeline_loads_the_converted_folder(vqa):
    assert isinstance(vqa, ImageTextToTextPipeline)
    assert type(vqa.model).__name__ == "UniMedVLForConditionalGeneration" and vqa.model.dtype == torch.float32


def test_chat_input_builds_the_model_inputs(vqa, reference_image, tiny_processor):
    templated = tiny_processor.apply_chat_template(chat(reference_image), add_generation_prompt=True, tokenize=True, return_dict=True)
    direct = tiny_processor(images=reference_image, text=QUESTION)
    assert torch.equal(templated["input_ids"], direct["input_ids"])
    assert torch.equal(templated["pixel_values"], direct["pixel_values"])


def test_streaming_yields_the_greedy_answer(vqa, tiny_model, tiny_processor, reference_image):
    expected = model_answers(tiny_model, tiny_processor, reference_image, QUESTION, max_new_tokens=6, do_sample=False)[0]
    streamer = TextIteratorStreamer(tiny_processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    worker = threading.Thread(
        target=vqa, kwargs=dict(text=chat(reference_image), max_new_tokens=6, generate_kwargs={"streamer": streamer, "do_sample": False})
    )
    worker.start()
    streamed = "".join(streamer)
    worker.join()
    assert streamed == expected and len(streamed) > 0


def test_chat_answer_equals_model_generate(vqa, tiny_model, tiny_processor, reference_image):
    expected = model_answers(tiny_model, tiny_processor, reference_image, QUESTION, max_new_tokens=6, do_sample=False)
    out = vqa(text=chat(reference_image), max_new_tokens=6, generate_kwargs={"do_sample": False})
    assert out[0]["generated_text"][-1] == {"role": "assistant", "content": expected[0]}
    plain = vqa(images=reference_image, text=QUESTION, max_new_tokens=6, return_full_text=False)
    assert plain[0]["generated_text"] == expected[0]


def test_batched_chats_and_sampling(vqa, tiny_model, tiny_processor, reference_image):
    rotated = reference_image.rotate(90, expand=True)
    questions = [QUESTION, "Is there a fracture of the left femur?"]
    expected = [
        model_answers(tiny_model, tiny_processor, image, question, max_new_tokens=5, do_sample=False)[0]
        for image, question in zip([reference_image, rotated], questions)
    ]
    chats = [chat(reference_image, questions[0]), chat(rotated, questions[1])]
    for batch_size in (1, 2):
        out = vqa(text=chats, max_new_tokens=5, batch_size=batch_size)
        assert [records[0]["generated_text"][-1]["content"] for records in out] == expected, batch_size  # one list per chat
    torch.manual_seed(0)
    sampled = vqa(text=chat(reference_image), max_new_tokens=5, generate_kwargs={"do_sample": True, "temperature": 0.7, "top_k": 5})
    torch.manual_seed(0)
    again = model_answers(tiny_model, tiny_processor, reference_image, QUESTION, max_new_tokens=5, do_sample=True, temperature=0.7, top_k=5)
    assert sampled[0]["generated_text"][-1]["content"] == again[0]


def test_bad_inputs(vqa, reference_image):
    with pytest.raises(ValueError, match="You must at least provide either text or images"):
        vqa()
    with pytest.raises(ValueError, match="Images must be placed inside the chat"):
        vqa(images=reference_image, text=chat(reference_image))
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        vqa(images=reference_image, text="<image> and <image>?")
