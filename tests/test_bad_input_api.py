"""Bad input to the Python API, one row per case: damaged model folders loaded with `from_pretrained` (model,
processor, pipeline) and damaged / hostile image inputs of `load_medical_image` → an error naming the file / key /
size (never random weights, a fallback tokenizer, a traceback from a dependency or a silently wrong image)."""

import json
import logging
import re
import shutil
import struct
import zlib

import nibabel
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from safetensors.torch import load_file, save_file

from modeling_unimedvl import UniMedVLForConditionalGeneration, UniMedVLModel, UniMedVLProcessor
from modeling_unimedvl.safetensors_reader import CheckpointError
from unimedvl_pipelines import UniMedVLPipeline
from unimedvl_pipelines.medical_images import ImageLoadError, check_image_file, load_medical_image

from input_files import edit_json, write_file


# ------------------------------------------------------------------------------------------------ model folders


def edit_weights(function):
    def edit(folder):
        tensors = load_file(str(folder / "model.safetensors"))
        function(tensors)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

    return edit


def drop_decoder(tensors):
    for key in [key for key in tensors if key.startswith("model.language_model.layers.")]:
        del tensors[key]


def shard_with_missing_file(folder):
    tensors = load_file(str(folder / "model.safetensors"))
    keys = sorted(tensors)
    save_file({key: tensors[key] for key in keys[:100]}, str(folder / "model-00001-of-00002.safetensors"))
    weight_map = {key: "model-00001-of-00002.safetensors" for key in keys[:100]}
    weight_map.update({key: "model-00002-of-00002.safetensors" for key in keys[100:]})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "model.safetensors").unlink()


def only_pickled_weights(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle that must never be loaded")


def truncate_weights(folder):
    path = folder / "model.safetensors"
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def set_text_config(key, value):
    return edit_json("config.json", lambda config: config["text_config"].__setitem__(key, value))


def set_image_processor(key, value):
    return edit_json("processor_config.json", lambda config: config["image_processor"].__setitem__(key, value))


MODEL_CASES = [
    ("all-decoder-weights-missing", edit_weights(drop_decoder),
     r"model\.safetensors lacks 56 of the 291 weights of UniMedVLForConditionalGeneration \(model\.language_model\.layers\.0\."),
    ("lm-head-nan", edit_weights(lambda t: t["lm_head.weight"].__setitem__((3, 4), float("nan"))),
     r"weight lm_head\.weight in model\.safetensors holds 1 NaN/infinite values"),
    ("vae-inf", edit_weights(lambda t: t["model.vae.decoder.conv_out.bias"].__setitem__(0, float("inf"))),
     r"weight model\.vae\.decoder\.conv_out\.bias in model\.safetensors holds 1 NaN/infinite values"),
    ("position-table-nan", edit_weights(lambda t: t["model.latent_pos_embed.pos_embed"].__setitem__((0, 0), float("nan"))),
     r"weight model\.latent_pos_embed\.pos_embed in model\.safetensors holds 1 NaN"),
    ("mis-shaped-tensor", edit_weights(lambda t: t.__setitem__("lm_head.weight", t["lm_head.weight"][:-1].clone())),
     r"1 weights in model\.safetensors have the wrong shape for its config\.json \(lm_head\.weight: \[639, 64\] instead of \[640, 64\]\)"),
    ("corrupt-safetensors-header", lambda f: (f / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json......}"),
     r"model\.safetensors has a corrupt safetensors header"),
    ("truncated-safetensors", truncate_weights, r"model\.safetensors is truncated: its header needs \d+ bytes but the file has \d+"),
    ("only-pickled-weights", only_pickled_weights, r"holds only pickled weights \(pytorch_model\.bin\), which UniMedVL never loads"),
    ("no-weights", lambda f: (f / "model.safetensors").unlink(), r"has no model\.safetensors \(nor model\.safetensors\.index\.json\)"),
    ("index-names-a-missing-shard", shard_with_missing_file,
     r"is missing the weight shards model-00002-of-00002\.safetensors named in model\.safetensors\.index\.json"),
    ("config-string-size", set_text_config("hidden_size", "64"),
     r"config\.json is not a valid UniMedVLConfig: .*'hidden_size' expected int, got str"),
    ("config-not-json", lambda f: (f / "config.json").write_text("{'hidden_size': 64"), r"config\.json is not valid JSON"),
    ("config-json-list", lambda f: (f / "config.json").write_text("[]"), r"config\.json must hold a JSON object, not a list"),
    ("config-missing", lambda f: (f / "config.json").unlink(), r"has no config\.json; it is not a model folder"),
]

PROCESSOR_CASES = [
    ("tokenizer-missing", lambda f: (f / "tokenizer.json").unlink(), r"has no tokenizer\.json \(nor vocab\.json \+ merges\.txt\)"),
    ("tokenizer-empty-object", lambda f: (f / "tokenizer.json").write_text("{}"),
     r"tokenizer\.json is not a tokenizers file: it has no \"model\" section"),
    ("tokenizer-corrupt", lambda f: (f / "tokenizer.json").write_text('{"version": "1.0", "mod'), r"tokenizer\.json is not valid JSON"),
    ("tokenizer-json-list", lambda f: (f / "tokenizer.json").write_text("[]"), r"tokenizer\.json must hold a JSON object, not a list"),
    ("patch-size-zero", set_image_processor("patch_size", 0), r"processor_config\.json patch_size must be a positive integer, got 0"),
    ("max-pixels-negative", set_image_processor("max_image_pixels", -1),
     r"processor_config\.json max_image_pixels must be a positive integer, got -1"),
    ("transform-short", set_image_processor("understanding_transform", [980, 378]),
     r"processor_config\.json understanding_transform must be 4 integers"),
    ("transform-stride-zero", set_image_processor("generation_vae_transform", [1024, 32, 0, 1806336]),
     r"processor_config\.json generation_vae_transform\[2\] must be a positive integer, got 0"),
]


@pytest.fixture()
def damaged(converted_dir, tmp_path):
    """`make(edit, name)`: a copy of the converted tiny folder at `tmp_path/name`, changed by `edit(folder)`."""

    def make(edit, name="model"):
        folder = tmp_path / name
        shutil.copytree(converted_dir, folder)
        edit(folder)
        return folder

    return make


@pytest.mark.parametrize("case", MODEL_CASES, ids=[case[0] for case in MODEL_CASES])
def test_damaged_model_folder_is_refused_naming_file_and_key(case, damaged):
    _, edit, message = case
    folder = damaged(edit)
    with pytest.raises(CheckpointError) as error:
        UniMedVLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    assert re.search(message, str(error.value)) and "\n" not in str(error.value), str(error.value)
    assert str(folder) in str(error.value)


@pytest.mark.parametrize("case", PROCESSOR_CASES, ids=[case[0] for case in PROCESSOR_CASES])
def test_damaged_processor_files_are_refused_naming_the_file(case, damaged):
    _, edit, message = case
    folder = damaged(edit)
    with pytest.raises(CheckpointError) as error:
        UniMedVLProcessor.from_pretrained(folder)
    assert re.search(message, str(error.value)) and "\n" not in str(error.value), str(error.value)


def test_every_entry_point_runs_the_checks(damaged):
    """The base model, the Auto classes, the diffusers pipeline and the understanding pipeline all refuse."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    folder = damaged(edit_weights(lambda t: t["lm_head.weight"].__setitem__((0, 0), float("nan"))))
    for load in (lambda: AutoModelForImageTextToText.from_pretrained(folder), lambda: UniMedVLPipeline.from_pretrained(folder)):
        with pytest.raises(CheckpointError, match=r"weight lm_head\.weight in model\.safetensors holds 1 NaN"):
            load()
    # transformers.pipeline gathers the errors of the classes it tried into one ValueError, ours included
    with pytest.raises(ValueError, match=r"CheckpointError: .*weight lm_head\.weight in model\.safetensors holds 1 NaN"):
        pipeline("image-text-to-text", model=str(folder))
    folder = damaged(lambda f: (f / "tokenizer.json").unlink(), "no-tokenizer")
    with pytest.raises(CheckpointError, match="has no tokenizer.json"):
        AutoProcessor.from_pretrained(folder)


def test_base_model_loads_from_the_full_checkpoint_and_a_report_is_available(converted_dir, damaged):
    """The prefix check follows transformers (the base model from a ...ForConditionalGeneration folder loads), and
    `output_loading_info=True` still returns the report."""
    model, info = UniMedVLModel.from_pretrained(converted_dir, output_loading_info=True)
    assert not info["missing_keys"] and type(model) is UniMedVLModel
    with pytest.raises(CheckpointError, match=r"lacks 56 of the 288 weights of UniMedVLModel"):
        UniMedVLModel.from_pretrained(damaged(edit_weights(drop_decoder)))


# --------------------------------------------------------------------------------------------------- images


def png_with_header(width, height):
    """A valid PNG header (and a tiny IDAT) claiming `width` x `height`: a few hundred bytes, a huge image."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def write(name, data):
    return lambda tmp_path: write_file(tmp_path / name, data)


def truncated_nifti(tmp_path):
    data = np.arange(16 * 16 * 8, dtype=np.int16).reshape(16, 16, 8)
    nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), tmp_path / "full.nii.gz")
    raw = (tmp_path / "full.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    return tmp_path / "cut.nii.gz"


def truncated_png(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "full.png")
    raw = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
    return tmp_path / "cut.png"


def nan_float_tiff(tmp_path):
    values = np.ones((8, 8), dtype=np.float32)
    values[2, 3] = np.nan
    Image.fromarray(values).save(tmp_path / "nan.tif")
    return tmp_path / "nan.tif"


def dicom_with_many_frames(tmp_path):
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    dataset.NumberOfFrames = 100_000  # 128 x 128 x 100000 = 1.6 G pixels to decode at once
    dataset.save_as(tmp_path / "frames.dcm")
    return tmp_path / "frames.dcm"


def nan_array(tmp_path):
    values = np.zeros((6, 6), dtype=np.float32)
    values[1, 1] = np.nan
    return values


def inf_tensor(tmp_path):
    values = torch.zeros(3, 6, 6)
    values[0, 2, 2] = float("inf")
    return values


# id, input builder, keyword arguments, expected message (regex)
IMAGE_CASES = [
    ("decompression-bomb-png", write("bomb.png", png_with_header(20_000, 20_000)), {},
     r"bomb\.png: refused before decoding: Image size \(400000000 pixels\) exceeds limit"),
    ("above-the-pixel-limit", write("big.png", png_with_header(8_000, 8_000)), {},
     r"big\.png: the PNG image is 8000x8000 = 64,000,000 pixels, above the limit of 50,000,000"),
    ("above-a-caller-limit", write("small.png", png_with_header(300, 200)), {"max_pixels": 10_000},
     r"small\.png: the PNG image is 300x200 = 60,000 pixels, above the limit of 10,000"),
    ("dicom-frames-above-the-voxel-limit", dicom_with_many_frames, {},
     r"frames\.dcm: decoding the DICOM file needs 1,638,400,000 pixels at once \(100000 frames of 128x128\)"),
    ("eps-content-named-png", write("figure.png", "%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"), {},
     r"figure\.png: not a readable image file: its content is none of PNG, JPEG, TIFF"),
    ("truncated-nii-gz", truncated_nifti, {}, r"cut\.nii\.gz: the NIfTI data is truncated or corrupt"),
    ("truncated-png", truncated_png, {}, r"cut\.png: the PNG data cannot be decoded"),
    ("nan-in-float-tiff", nan_float_tiff, {}, r"nan\.tif: the image holds 1 NaN or infinite values"),
    ("nan-in-float-tiff-windowed", nan_float_tiff, {"window": "lung"}, r"nan\.tif: the image holds 1 NaN or infinite values"),
    ("nan-array", nan_array, {}, r"^array: the image holds 1 NaN or infinite values"),
    ("inf-tensor", inf_tensor, {"window": (40, 400)}, r"^array: the image holds 1 NaN or infinite values"),
    ("window-width-zero", write("ok.png", png_with_header(4, 4)), {"window": (40, 0)},
     r"ok\.png: the window width must be at least 1, got 0"),
    ("window-nan", lambda tmp_path: np.zeros((4, 4), np.int16), {"window": (float("nan"), 400)},
     r"^array: the window center and width must be finite numbers"),
    ("unknown-window-names-the-file", lambda tmp_path: get_testdata_file("CT_small.dcm", download=False), {"window": "lungs"},
     r"CT_small\.dcm: unknown window 'lungs'"),
    ("window-on-a-colour-file", lambda tmp_path: (Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png"), tmp_path / "rgb.png")[1],
     {"window": "lung"}, r"rgb\.png: a window applies to grey-scale images, not to a RGB image"),
    ("empty-file", write("empty.png", b""), {}, r"empty\.png: not a readable image file"),
    ("folder-not-file", lambda tmp_path: tmp_path, {}, r": no such file"),
    ("complex-array", lambda tmp_path: np.zeros((4, 4), np.complex64), {}, r"^array: unsupported pixel type complex64"),
]


@pytest.mark.parametrize("case", IMAGE_CASES, ids=[case[0] for case in IMAGE_CASES])
def test_bad_image_input_is_one_clear_error(case, tmp_path):
    _, build, kwargs, message = case
    source = build(tmp_path)
    with pytest.raises(ImageLoadError) as error:
        load_medical_image(source, **kwargs)
    assert re.search(message, str(error.value)) and "\n" not in str(error.value), str(error.value)


def test_header_check_needs_no_decoding(tmp_path):
    """`check_image_file` (used by the demo before decoding an upload) reads sizes from headers only."""
    (tmp_path / "bomb.png").write_bytes(png_with_header(13_000, 13_000))  # 169 Mpx in a few hundred bytes
    with pytest.raises(ImageLoadError, match="169,000,000 pixels, above the limit of 40,000,000"):
        check_image_file(tmp_path / "bomb.png", max_pixels=40_000_000)
    info = check_image_file(get_testdata_file("CT_small.dcm", download=False))
    assert (info.format, info.width, info.height, info.frames) == ("DICOM", 128, 128, 1)
    data = np.zeros((20, 30, 5), dtype=np.int16)
    nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), tmp_path / "v.nii.gz")
    info = check_image_file(tmp_path / "v.nii.gz")
    assert (info.format, info.width, info.height, info.frames) == ("NIfTI", 30, 20, 5)


def test_dicom_with_window_width_zero_loads_with_min_max_and_says_so(tmp_path, caplog):
    dataset = pydicom.dcmread(get_testdata_file("MR_small.dcm", download=False))
    dataset.WindowCenter, dataset.WindowWidth = 600, 0
    dataset.save_as(tmp_path / "zero.dcm")
    with caplog.at_level(logging.WARNING):
        image = load_medical_image(tmp_path / "zero.dcm")
    assert "zero.dcm: the file's window (center 600, width 0) is unusable" in caplog.text
    assert np.array_equal(np.asarray(image), np.asarray(load_medical_image(tmp_path / "zero.dcm", window="minmax")))


def test_two_channel_arrays_are_grey_plus_alpha_not_a_stack_and_hu_arrays_are_not_clipped():
    grey_alpha = np.stack([np.arange(20, dtype=np.uint8).reshape(4, 5), np.full((4, 5), 7, np.uint8)], axis=-1)
    image = load_medical_image(grey_alpha)  # [H, W, 2]: alpha dropped as convert("RGB") drops it
    assert image.size == (5, 4) and np.array_equal(np.asarray(image)[..., 0], grey_alpha[..., 0])
    hounsfield = np.array([[-1000, -500], [0, 1000]], dtype=np.int16)
    grey = np.asarray(load_medical_image(hounsfield))[..., 0]
    assert grey.tolist() == [[0, 64], [128, 255]]  # min–max, not clipped to [0, 0], [0, 255]


BAD_CALLBACK_RETURNS = [
    ("nan", lambda latents: latents * float("nan"), "returned non-finite \\(NaN or inf\\) latents at step 0"),
    ("inf", lambda latents: latents + float("inf"), "returned non-finite \\(NaN or inf\\) latents at step 0"),
    ("wrong-shape", lambda latents: latents[:, :3], r"must return latents of shape \(1, 16, 64\) \(or None\) at step 0, got \(1, 3, 64\)"),
    ("not-a-tensor", lambda latents: latents.tolist(), r"must return latents of shape \(1, 16, 64\) \(or None\) at step 0, got list"),
]


@pytest.mark.parametrize("case, change, message", BAD_CALLBACK_RETURNS, ids=[row[0] for row in BAD_CALLBACK_RETURNS])
def test_step_callback_returning_bad_latents_is_refused(tiny_model, tiny_processor, case, change, message):
    inputs = tiny_processor(text="Axial CT of the head.", generation_mode="image")
    with pytest.raises(ValueError, match=message):
        tiny_model.generate(**inputs, generation_mode="image", height=64, width=64, num_inference_steps=3,
                            callback_on_step_end=lambda step, timestep, latents: change(latents))


def test_step_callback_returning_none_keeps_the_latents(tiny_model, tiny_processor):
    inputs = tiny_processor(text="Axial CT of the head.", generation_mode="image")
    options = dict(generation_mode="image", height=64, width=64, num_inference_steps=3, decode=False)
    plain = tiny_model.generate(**inputs, generator=torch.Generator().manual_seed(0), **options).latents
    seen = []
    kept = tiny_model.generate(**inputs, generator=torch.Generator().manual_seed(0),
                               callback_on_step_end=lambda step, timestep, latents: seen.append(step), **options).latents
    assert torch.equal(kept, plain) and seen == [0, 1]


IMAGE_OPTIONS = dict(height=32, width=32, num_inference_steps=2)


@pytest.mark.parametrize(
    "mode, options, expected",
    [
        ("text", dict(max_new_tokens=4), None),
        ("text", dict(max_new_tokens=40), r"reaches RoPE position \d+, past the model's max_position_embeddings \(\d+\)"),
        ("image", dict(IMAGE_OPTIONS, decode=False), r"past the model's max_position_embeddings"),
        ("pipeline", dict(IMAGE_OPTIONS, output_type="latent"), r"past the model's max_position_embeddings"),
    ],
    ids=["text-within", "text-past", "image-past", "pipeline-past"],
)
def test_requests_past_the_position_limit_are_warned_about(tiny_model, tiny_processor, monkeypatch, caplog, mode, options,
                                                          expected):
    """A context (or context + new tokens) longer than `max_position_embeddings` gets a warning saying what to do,
    whichever entry point generates (`generate`, `generate_image` through the diffusers pipeline)."""
    from unimedvl_pipelines.pipeline_unimedvl import UniMedVLPipeline, default_scheduler

    prompt = "What is shown in a chest X-ray? " * 4 if mode == "text" else "An axial CT of the head. " * 12
    inputs = tiny_processor(text=prompt) if mode == "text" else tiny_processor(text=prompt, generation_mode="image")
    positions = int(inputs["attention_mask"].sum())  # text only: one RoPE position per token
    limit = positions + 10 if mode == "text" else positions - 20
    monkeypatch.setattr(tiny_model.config.text_config, "max_position_embeddings", limit)
    with caplog.at_level("WARNING", logger="modeling_unimedvl.modeling_unimedvl"):
        if mode == "pipeline":
            pipe = UniMedVLPipeline(tiny_model, tiny_processor, default_scheduler())
            pipe.set_progress_bar_config(disable=True)
            pipe(prompt, **options)
        else:
            tiny_model.generate(**inputs, generation_mode=mode, **options)
    warnings = [record.getMessage() for record in caplog.records if "max_position_embeddings" in record.getMessage()]
    if expected is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and re.search(expected, warnings[0]) and "shorten the prompt" in warnings[0], warnings
