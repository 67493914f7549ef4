"""UniMedVL-Tiny, the default model shipped in `modeling_unimedvl/unimedvl_tiny/`: size, loading, tokenizer, behaviour."""

import json
import os
import pathlib

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

import modeling_unimedvl as m
from modeling_unimedvl import default_model


MAX_BYTES = 25 * 1024 * 1024
SHIPPED_SUFFIXES = {".json", ".safetensors", ".jinja", ".txt"}
MODALITY_QUESTION = "What modality is this image?"


@pytest.fixture(scope="module")
def tiny_dir() -> pathlib.Path:
    return pathlib.Path(m.default_model_path())


@pytest.fixture(scope="module")
def model(tiny_dir):
    return m.UniMedVLForConditionalGeneration.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return m.UniMedVLProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def ct_image():
    from pydicom.data import get_testdata_file

    from unimedvl_pipelines.medical_images import read_dicom

    return read_dicom(get_testdata_file("CT_small.dcm"))


def greedy_answers(model, processor, images, question, max_new_tokens=8):
    inputs = processor(images=[[image] for image in images], text=[question] * len(images))
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [answer.strip() for answer in processor.decode_answers(output[:, inputs["input_ids"].shape[1] :])]


def test_shipped_folder_is_small_and_pickle_free(tiny_dir):
    files = [path for path in tiny_dir.iterdir() if path.is_file()]
    assert sum(path.stat().st_size for path in files) <= MAX_BYTES
    assert {path.suffix for path in files} <= SHIPPED_SUFFIXES, sorted(path.name for path in files)
    assert (tiny_dir / "model.safetensors").is_file()
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "unimedvl" and config["dtype"] == "float32"
    assert "auto_map" not in config  # the package registers the classes; no stale copies of its code
    assert "auto_map" not in (tiny_dir / "processor_config.json").read_text()


def test_default_model_path_error_when_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_DIR", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="build_unimedvl_tiny"):
        default_model.default_model_path()


def test_loads_with_auto_classes(tiny_dir, model):
    auto_model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    assert isinstance(auto_model, m.UniMedVLForConditionalGeneration)
    assert isinstance(AutoProcessor.from_pretrained(tiny_dir), m.UniMedVLProcessor)
    state, auto_state = model.state_dict(), auto_model.state_dict()
    assert all(torch.equal(state[key], auto_state[key]) for key in state)
    assert sum(p.numel() for p in model.parameters()) < 10_000_000


def test_tokenizer_is_the_projects(tiny_dir, model, processor):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    config = model.config
    assert len(tokenizer) == len(processor.tokenizer) == config.text_config.vocab_size
    assert len(tokenizer) < 10_000  # trained by the project, not a copied Qwen2 vocabulary
    ids = processor.special_ids
    assert (ids["bos"], ids["eos"], ids["image"], ids["latent"]) == (
        config.bos_token_id, config.eos_token_id, config.image_token_id, config.latent_token_id,
    )
    assert (ids["vision_start"], ids["vision_end"]) == (config.vision_start_token_id, config.vision_end_token_id)
    sentence = "Axial CT of the chest shows a 3.5 cm mass in the left upper lobe; no pleural effusion."
    encoded = tokenizer(sentence, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(encoded) == sentence
    assert len(encoded) < len(sentence) / 2.5  # the BPE learned medical words
    assert tokenizer.pad_token == "<|endoftext|>"


def test_greedy_answer_on_dicom_is_deterministic(model, processor, ct_image):
    first = greedy_answers(model, processor, [ct_image], MODALITY_QUESTION)
    second = greedy_answers(model, processor, [ct_image], MODALITY_QUESTION)
    assert first == second and first[0]


def test_generates_a_64px_image(model, processor):
    inputs = processor(text="CT, axial, head", generation_mode="image")
    generator = torch.Generator().manual_seed(0)
    output = model.generate(
        **inputs, generation_mode="image", height=64, width=64, num_inference_steps=4, cfg_text_scale=3.0,
        cfg_interval=(0.0, 1.0), timestep_shift=1.0, generator=generator,
    )
    assert output.images.shape == (1, 3, 64, 64)
    assert torch.isfinite(output.images).all()
    assert output.images.min() >= -1.5 and output.images.max() <= 1.5
    assert output.images.std() > 0.05  # not a flat image


def test_answers_modality_of_medpix_dev_images(model, processor, data_dir):
    """Real behaviour on held-out images: the modality (CT / MR) of MedPix 2.0 dev images."""
    from PIL import Image

    descriptions = data_dir / "medpix" / "descriptions_dev.jsonl"
    rows = [json.loads(line) for line in descriptions.read_text().splitlines() if line.strip()]
    rows = rows[::8][:24]
    images = [Image.open(data_dir / "medpix" / "images" / f"{row['image']}.png").convert("RGB") for row in rows]
    answers = greedy_answers(model, processor, images, MODALITY_QUESTION, max_new_tokens=4)
    correct = sum(answer.upper() == row["Type"] for answer, row in zip(answers, rows))
    majority = max(sum(row["Type"] == kind for row in rows) for kind in ("CT", "MR"))
    assert correct >= max(majority + 2, int(0.7 * len(rows))), (correct, len(rows), answers)


def test_super_resolution_rows_match_the_inference_context(data_dir, tmp_path):
    """The build's image-to-image rows have no reply before the target, so training sees the inference sequence."""
    from unimedvl_training.build_unimedvl_tiny import build_data, read_jsonl

    config = build_data(str(data_dir), str(tmp_path), num_sr=3, seed=0)
    rows = read_jsonl(config["interleaved"][0]["jsonl"])
    assert len(rows) == 3
    assert all([m["from"] for m in row["message"]] == ["human"] for row in rows)
    for row in rows:
        low, high = row["input_img"][0]["path"], row["output_img"][0]["path"]
        assert os.path.isabs(low) and os.path.isfile(low) and os.path.isfile(high)
    understanding = read_jsonl(config["understanding"][0]["jsonl"])
    assert all(os.path.isfile(row["input_img"][0]["path"]) for row in understanding[::50])
    questions = {row["message"][0]["value"].split("\n", 1)[1] for row in understanding}
    assert {"What modality is this image?", "Which body region is shown?", "In which plane was this image taken?"} <= questions


def test_shipped_copy_has_no_code_and_no_auto_map(tmp_path):
    from unimedvl_training.build_unimedvl_tiny import ship_default_model

    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text(json.dumps({"model_type": "unimedvl", "auto_map": {"AutoConfig": "x.Y"}}))
    (final / "processor_config.json").write_text(json.dumps({"image_processor": {"auto_map": {}, "patch_size": 14}}))
    (final / "modeling_unimedvl.py").write_text("# code")
    (final / "model.safetensors").write_bytes(b"weights")
    (final / "ema.pt").write_bytes(b"pickle")
    shipped = pathlib.Path(ship_default_model(str(final), str(tmp_path / "shipped")))
    assert sorted(path.name for path in shipped.iterdir()) == ["config.json", "model.safetensors", "processor_config.json"]
    assert json.loads((shipped / "config.json").read_text()) == {"model_type": "unimedvl"}
    assert json.loads((shipped / "processor_config.json").read_text()) == {"image_processor": {"patch_size": 14}}


@pytest.mark.slow
def test_the_build_script_runs_end_to_end(data_dir, tmp_path):
    """Every step of the build (tokenizer, VAE, model, data, three stages, final folder) for two steps each."""
    from unimedvl_training.build_unimedvl_tiny import main

    summary = main([
        "--data", str(data_dir), "--output", str(tmp_path), "--vae-steps", "2", "--vae-decoder-steps", "2",
        "--stage-steps", "2", "2", "2", "--batch-size", "2", "--num-sr", "4", "--vocab-size", "600",
    ])
    assert summary["vocab_size"] == 600 and summary["dtypes"] == ["F32"]
    assert [stage["stage"] for stage in summary["stages"]] == ["stage1", "stage2", "stage3"]
    loaded = m.UniMedVLForConditionalGeneration.from_pretrained(summary["final"])
    assert loaded.config.text_config.vocab_size == 600


def test_quickstart_runs_offline_on_the_shipped_model(tmp_path):
    """The README's main job: `python examples/quickstart.py` answers, generates and super-resolves, offline."""
    import subprocess
    import sys

    environment = dict(os.environ, HF_HUB_OFFLINE="1")
    environment.pop("UNIMEDVL_MODEL", None)
    result = subprocess.run(
        [sys.executable, str(pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"), "--output-dir", str(tmp_path)],
        capture_output=True, text=True, env=environment, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"model: {m.default_model_path()}" in result.stdout
    assert "A: 'CT'" in result.stdout  # pydicom's CT_small.dcm, soft-tissue window
    for name in ("text_to_image.png", "image_to_image.png"):
        from PIL import Image

        with Image.open(tmp_path / name) as image:
            assert image.size == (64, 64)
