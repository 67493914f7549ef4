"""UniMedVL-Tiny, the default model shipped in `modeling_unimedvl/unimedvl_tiny/`: size, loading (with and without
the package), code files, tokenizer, behaviour, the build's data and resumable loops, the quickstart."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

import modeling_unimedvl as m
from modeling_unimedvl import default_model
from unimedvl_training import build_unimedvl_tiny as build


MAX_BYTES = 50 * 2**20
SHIPPED_SUFFIXES = {".json", ".safetensors", ".jinja", ".py"}
MODALITY_QUESTION = "What modality is this image?"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


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

    from unimedvl_pipelines.medical_images import load_medical_image

    return load_medical_image(get_testdata_file("CT_small.dcm"), window="soft_tissue")


def greedy_answers(model, processor, images, question, max_new_tokens=8):
    inputs = processor(images=[[image] for image in images], text=[question] * len(images))
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [answer.strip() for answer in processor.decode_answers(output[:, inputs["input_ids"].shape[1] :])]


def test_shipped_folder_is_small_hub_ready_and_pickle_free(tiny_dir):
    files = [path for path in tiny_dir.iterdir() if path.is_file()]
    assert sum(path.stat().st_size for path in files) <= MAX_BYTES
    assert {path.suffix for path in files} <= SHIPPED_SUFFIXES, sorted(path.name for path in files)
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "unimedvl" and config["dtype"] == "float32"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_unimedvl.UniMedVLConfig",
        "AutoModelForImageTextToText": "modeling_unimedvl.UniMedVLForConditionalGeneration",
    }
    processor_config = json.loads((tiny_dir / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_unimedvl.UniMedVLProcessor"}


def test_code_files_are_the_package_sources(tiny_dir):
    """The copies that travel with the folder equal the package's current modules (refresh them with
    `python -m unimedvl_training.build_unimedvl_tiny --refresh-code`)."""
    wanted = build.current_code()
    assert set(build.code_files(str(tiny_dir))) == set(wanted)
    stale = [name for name, content in wanted.items() if (tiny_dir / name).read_bytes() != content]
    assert not stale, f"{stale} differ from the package: run python -m unimedvl_training.build_unimedvl_tiny --refresh-code"
    assert {"modeling_unimedvl.py", "configuration_unimedvl.py", "processing_unimedvl.py", "image_processing_unimedvl.py"} <= set(wanted)


def test_refresh_code_files_rewrites_stale_and_removes_unused_copies(tiny_dir, tmp_path):
    for path in tiny_dir.iterdir():
        if path.suffix in (".json", ".py"):
            shutil.copy2(path, tmp_path / path.name)
    (tmp_path / "modeling_unimedvl.py").write_text("# an old copy\n")
    (tmp_path / "old_helper.py").write_text("# no longer imported\n")
    assert build.refresh_code_files(str(tmp_path)) == ["modeling_unimedvl.py", "old_helper.py"]
    assert set(build.code_files(str(tmp_path))) == set(build.current_code())
    assert (tmp_path / "modeling_unimedvl.py").read_bytes() == build.current_code()["modeling_unimedvl.py"]
    assert build.refresh_code_files(str(tmp_path)) == []


REMOTE_CODE_SCRIPT = r"""
import importlib.abc, json, sys

class NoPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("modeling_unimedvl", "unimedvl_pipelines", "unimedvl_training"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the package is not installed here)")
        return None

sys.meta_path.insert(0, NoPackage())
try:
    import modeling_unimedvl
    raise SystemExit("the package is importable")
except ModuleNotFoundError:
    pass
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

folder = sys.argv[1]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
image = Image.open(sys.argv[2]).convert("RGB")
inputs = processor(images=image, text="What modality is this image?")
ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)
print(json.dumps({
    "model": type(model).__name__, "model_module": type(model).__module__,
    "processor": type(processor).__name__, "processor_module": type(processor).__module__,
    "answer": processor.decode_answers(ids[:, inputs["input_ids"].shape[1]:])[0].strip(),
    "loaded": sorted(name for name in sys.modules if name.split(".")[0] in ("modeling_unimedvl", "unimedvl_pipelines", "unimedvl_training")),
}))
"""


def test_loads_with_trust_remote_code_where_the_package_is_not_installed(tiny_dir, model, processor, ct_image, tmp_path):
    folder = tmp_path / "UniMedVL-Tiny"
    shutil.copytree(tiny_dir, folder)
    ct_image.save(tmp_path / "ct.png")
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, str(folder), str(tmp_path / "ct.png")],
        capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["model"] == "UniMedVLForConditionalGeneration" and loaded["processor"] == "UniMedVLProcessor"
    assert loaded["model_module"].startswith("transformers_modules.") and loaded["processor_module"].startswith("transformers_modules.")
    assert loaded["loaded"] == []
    from PIL import Image

    assert loaded["answer"] == greedy_answers(model, processor, [Image.open(tmp_path / "ct.png").convert("RGB")], MODALITY_QUESTION)[0]


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
    assert sum(p.numel() for p in model.parameters()) * 4 <= MAX_BYTES


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
    assert first == second == ["CT"]


def test_generates_a_64px_image(model, processor):
    inputs = processor(text="CT, axial, head", generation_mode="image")
    output = model.generate(**inputs, generation_mode="image", generator=torch.Generator().manual_seed(0), **dict(default_model.TINY_TEXT_TO_IMAGE, num_inference_steps=4))
    assert output.images.shape == (1, 3, 64, 64)
    assert torch.isfinite(output.images).all()
    # decoder range, unclamped: guided sampling overshoots ±1 at a few pixels (v3: max 2.08, 0.07 % beyond ±1.5)
    assert output.images.abs().max() <= 3.0 and (output.images.abs() > 1.5).float().mean() < 0.01
    assert (output.images.abs() <= 1.0).float().mean() > 0.9
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


@pytest.mark.parametrize("split", ["train", "dev"])
def test_super_resolution_evaluation_reads_the_requested_split(model, processor, data_dir, tmp_path, split):
    """The evaluation's 2× super-resolution scores the model, the bicubic input and the VAE's own reconstruction on
    a random sample of the requested MedPix split (train: for choosing sampler settings without touching dev)."""
    from unimedvl_training.evaluate_unimedvl_tiny import sampled_rows, super_resolution

    sampling = dict(default_model.TINY_IMAGE_TO_IMAGE, num_inference_steps=2)
    result = super_resolution(model, processor, str(data_dir), str(tmp_path), 0, sampling, batch_size=2, count=2, split=split)
    assert result["n"] == 2 and result["sampling"]["num_inference_steps"] == 2
    pairs = tmp_path / ("sr_pairs" if split == "dev" else f"sr_pairs_{split}")
    assert sorted(path.name for path in pairs.glob("*_model.png")) == [f"{row['image']}_model.png" for row in sampled_rows(str(data_dir), split, 2, 0)]
    assert 10 < result["bicubic_psnr"] < 40 and 0 < result["ssim"] <= 1 and 0 <= result["model_beats_bicubic_fraction"] <= 1


def test_vision_probe_reads_modality_from_the_shipped_encoder(model, processor, data_dir):
    """The probe of the understanding encoder: logistic regressions on pooled features of a random sample of MedPix
    train images, scored on dev images; CT / MR is linearly readable well above the majority class."""
    from unimedvl_training.evaluate_unimedvl_tiny import vision_probe

    result = vision_probe(model, processor, str(data_dir), 0, limit=160)
    assert set(result) == {"modality", "region", "plane"}
    assert result["modality"]["n"] == 160 and result["modality"]["train_n"] == 160
    assert all(0 < block["n"] <= 160 and 0 <= block["accuracy"] <= 1 for block in result.values())
    assert result["modality"]["accuracy"] >= result["modality"]["majority_baseline"] + 0.15, result["modality"]
    assert result == vision_probe(model, processor, str(data_dir), 0, limit=160)


@pytest.mark.parametrize(("limit", "message"), [(1, "1 MedPix train and 1 dev images with a modality label"), (0, "0 MedPix train")])
def test_vision_probe_refuses_a_sample_too_small_to_fit(model, processor, data_dir, limit, message):
    """A smoke run's tiny `--limit` gets a plain error naming the label kind and what to do, not an L-BFGS overflow."""
    from unimedvl_training.evaluate_unimedvl_tiny import vision_probe

    with pytest.raises(ValueError, match="raise --limit or leave it out") as caught:
        vision_probe(model, processor, str(data_dir), 0, limit=limit)
    assert message in str(caught.value)


def test_card_results_show_the_vision_probe_as_a_reference():
    """The vision probe goes into the card as reference rows, without targets."""
    from unimedvl_training.evaluate_unimedvl_tiny import card_results

    probe = {"accuracy": 0.8734, "majority_baseline": 0.5, "n": 197, "train_n": 1650}
    results = card_results({"vision_probe": {"modality": probe, "plane": dict(probe, accuracy=0.796, n=181)}})
    assert results == {
        "Vision-encoder linear probe, modality (%) (reference)": {"value": 87.3, "baseline": 50.0, "dataset": "MedPix 2.0 dev images (197)"},
        "Vision-encoder linear probe, plane (%) (reference)": {"value": 79.6, "baseline": 50.0, "dataset": "MedPix 2.0 dev images (181)"},
    }


@pytest.mark.parametrize("split", ["train", "dev"])
def test_card_results_name_the_split_the_generation_tasks_ran_on(split):
    """`--split train` results say "train" (they read "dev prompts" before); records without a split are dev; the
    label classifier's rows on real dev images take the dev baseline of their own record (older records: the t2i one)."""
    from unimedvl_training.evaluate_unimedvl_tiny import card_results

    t2i = {"split": split, "n": 150, "modality_acc": 0.9, "region_acc": 0.7, "modality_majority_baseline": 0.5, "region_majority_baseline": 0.3}
    sr = {"split": split, "n": 150, "psnr": 26.5, "ssim": 0.86, "bicubic_psnr": 25.6, "bicubic_ssim": 0.85, "vae_reconstruction_psnr": 30.0}
    results = card_results({"text_to_image": t2i, "super_resolution": sr})
    assert results["Generated-image region accuracy by classifier (%)"]["dataset"] == f"MedPix 2.0 {split} prompts (150)"
    assert results["2x super-resolution SSIM"]["dataset"] == f"MedPix 2.0 {split}, ≤ 64 px (150)"
    unnamed = card_results({"text_to_image": {k: v for k, v in t2i.items() if k != "split"}})
    assert unnamed["Generated-image modality accuracy by classifier (%)"]["dataset"] == "MedPix 2.0 dev prompts (150)"
    real = {"n": 197, "modality_acc": 0.92, "region_acc": 0.58}
    old_record = card_results({"text_to_image": t2i, "classifier_on_real_dev": real})  # written before its own baseline
    assert old_record["Label classifier on real dev images, region (%) (reference)"]["baseline"] == 30.0
    real |= {"modality_majority_baseline": 0.426, "region_majority_baseline": 0.335}
    for evaluation in ({"text_to_image": t2i, "classifier_on_real_dev": real}, {"classifier_on_real_dev": real}):
        row = card_results(evaluation)["Label classifier on real dev images, region (%) (reference)"]
        assert row == {"value": 58.0, "baseline": 33.5, "dataset": "MedPix 2.0 dev images (197)"}  # dev's, not the prompts'


def test_evaluation_samples_both_modalities_when_limited(data_dir):
    """A limited evaluation draws its rows at random (seeded, in file order): the files are sorted by case and their
    first 160 train rows are all CT, which made an earlier guidance sweep measure CT prompts only."""
    from unimedvl_training.evaluate_unimedvl_tiny import sampled_rows

    rows = build.medpix_rows(str(data_dir), "train")
    assert {row["Type"] for row in rows[:160]} == {"CT"}
    sample = sampled_rows(str(data_dir), "train", 160, 0)
    assert len(sample) == 160 and sample == sampled_rows(str(data_dir), "train", 160, 0)
    assert sample == [row for row in rows if row in sample] and sample != sampled_rows(str(data_dir), "train", 160, 1)
    assert 0.3 < sum(row["Type"] == "MR" for row in sample) / 160 < 0.7
    assert sampled_rows(str(data_dir), "dev", None, 0) == build.medpix_rows(str(data_dir), "dev")
    assert sampled_rows(str(data_dir), "dev", 10_000, 0) == build.medpix_rows(str(data_dir), "dev")


def test_build_data_rows(data_dir, tmp_path):
    """The curriculum rows: no held-out image, conversations with the MedPix questions, reports, SR rows shaped as
    the inference context (no reply before the target)."""
    config = build.build_data(str(data_dir), str(tmp_path), seed=0, num_views=2, num_sr=3)
    sr = build.read_jsonl(config["interleaved"][0]["jsonl"])
    assert len(sr) == 3 and all([message["from"] for message in row["message"]] == ["human"] for row in sr)
    assert all(os.path.isabs(row["input_img"][0]["path"]) and os.path.isfile(row["output_img"][0]["path"]) for row in sr)
    understanding = build.read_jsonl(config["understanding"][0]["jsonl"])
    questions = {message["value"].removeprefix("<image>\n") for row in understanding for message in row["message"] if message["from"] == "human"}
    assert {build.MODALITY_QUESTION, build.REGION_QUESTION, build.PLANE_QUESTION, build.REPORT_PROMPT} <= questions
    held_out = build.held_out_synpics(str(data_dir))
    images = {os.path.basename(row["input_img"][0]["path"]).split("_v")[0] for row in understanding}
    assert not any(name.split("_", 1)[-1] in held_out for name in images)
    medpix_views = [row for row in understanding if "medpix_views" in row["input_img"][0]["path"] and len(row["message"]) > 2]
    assert len(medpix_views) == 2 * len(build.medpix_rows(str(data_dir), "train"))
    assert all(row["message"][0]["value"].startswith("<image>\n") for row in understanding)


def test_label_prompt_data_has_one_label_prompt_row_per_medpix_train_image(data_dir, tmp_path):
    """The fine-tune's text-to-image rows: every MedPix train image once, from its label prompt, never a caption."""
    (source,) = build.label_prompt_data(str(data_dir), str(tmp_path))
    rows = build.read_jsonl(source["jsonl"])
    train = build.medpix_rows(str(data_dir), "train")
    assert [(row["output_img"][0]["path"], row["message"][0]["value"]) for row in rows] == [(f"{r['image']}.png", build.label_prompt(r)) for r in train]
    assert all(os.path.isfile(os.path.join(source["image_dir"], row["output_img"][0]["path"])) for row in rows)
    assert {row["sub_task_type"] for row in rows} == {"t2i"} and rows[0]["message"][0]["value"].count(", ") == 2


@pytest.mark.parametrize(
    ("row", "kinds"),
    [
        ({"Type": "MR", "Location Category": "Head", "Description": {"Plane": "Sagittal"}}, {"modality", "region", "plane"}),
        ({"Type": "CT", "Location Category": "Unknown", "Description": {"Plane": "Oblique"}}, {"modality"}),
        ({"Type": "CT", "Description": None}, {"modality"}),
    ],
)
def test_medpix_choice_questions_ask_about_known_labels_in_vqa_rad_forms(row, kinds):
    """The extra label questions: one yes/no (true half of the time) and one either-or question whose answer is the
    true one of its two options, in the option's own words; only label kinds the row has are asked about."""
    import itertools
    import random

    truth = {"modality": row["Type"], "region": build.norm_region(row), "plane": build.norm_plane(row)}
    yes_no_forms, either_or_forms = {}, {}
    for kind, words in build.LABEL_WORDS.items():
        yes_no, either_or = build.LABEL_QUESTIONS[kind]
        yes_no_forms |= {yes_no.format(word): (kind, value) for value, word in words.items()}
        either_or_forms |= {either_or.format(words[a], words[b]): (kind, a, b) for a, b in itertools.permutations(words, 2)}
    rng, answers, asked = random.Random(0), [], set()
    for _ in range(200):
        (yes_no, yes_no_answer), (either_or, either_or_answer) = build.medpix_choice_questions(row, rng)
        kind, value = yes_no_forms[yes_no]
        assert yes_no_answer == ("yes" if value == truth[kind] else "no"), yes_no
        choice_kind, first, second = either_or_forms[either_or]
        assert truth[choice_kind] in (first, second), either_or
        assert either_or_answer == build.LABEL_WORDS[choice_kind][truth[choice_kind]].split(" ", 1)[1], either_or
        answers.append(yes_no_answer)
        asked |= {kind, choice_kind}
    assert asked == kinds and 70 < answers.count("yes") < 130
    assert ("Is this a CT or an MRI image?", "MRI" if row["Type"] == "MR" else "CT") in {
        build.medpix_choice_questions(row, random.Random(i))[1] for i in range(100)
    }


def test_curriculum_config_overrides_only_the_stage_3_mixture():
    """Stages 1 and 2 train on the shipped (paper) mixtures; stage 3 on the Tiny's image-to-image-heavy one."""
    from unimedvl_training.curriculum import load_stage_config

    config = build.curriculum_config({}, (3, 2, 1), 4, 1e-3, 0)
    shipped = {stage: load_stage_config(stage)["mixture"] for stage in (1, 2)}
    assert {stage: load_stage_config(stage, config)["mixture"] for stage in (1, 2)} == shipped
    stage3 = load_stage_config(3, build._stage_only(config, 3))
    assert stage3["mixture"] == build.STAGE_MIXTURES[3] and stage3["mixture"] != load_stage_config(3)["mixture"]
    assert [load_stage_config(stage, config)["training"]["max_steps"] for stage in (1, 2, 3)] == [3, 2, 1]


def test_generation_finetune_trains_the_generation_expert_on_generation_rows_only():
    data = {"understanding": [{"jsonl": "u.jsonl"}], "text_to_image": [{"jsonl": "t2i.jsonl"}], "interleaved": [{"jsonl": "sr.jsonl"}]}
    config = build.curriculum_config(data, (3, 2, 1), 4, 1e-3, 0)
    finetune = build.generation_finetune_config(config, 7, 3e-4, [{"jsonl": "labels.jsonl"}])
    assert finetune["mixture"] == {"understanding": 0, "text_to_image": 1 / 3, "interleaved": 2 / 3}
    assert finetune["data"] == dict(data, text_to_image=[{"jsonl": "labels.jsonl"}]) and config["data"] == data
    assert finetune["freeze"] == {"vit": True, "vae": True, "und": True, "gen": False, "connector": True}
    training = finetune["training"]
    assert (training["max_steps"], training["learning_rate"], training["lr_scheduler_type"]) == (7, 3e-4, "cosine")
    assert training["per_device_train_batch_size"] == 4 and finetune["stage"] == 3
    assert config["freeze"]["und"] is False and config["stages"][3]["training"]["max_steps"] == 1  # the input is kept


def test_held_out_vqa_rad_image_is_excluded(data_dir):
    held_out = build.held_out_synpics(str(data_dir))
    with open(data_dir / "vqa_rad" / "trainset.json") as handle:
        every = json.load(handle)
    kept = build.vqa_rad_train(str(data_dir))
    removed = [row for row in every if os.path.splitext(row["image_name"])[0] in held_out]
    assert removed and len(kept) == len(every) - len(removed)


def test_loop_checkpoints_resume_bit_for_bit(tmp_path):
    """A hand-written loop killed after step 3 and resumed ends with the weights of an uninterrupted 7-step run."""
    import random

    def run(directory, steps):
        torch.manual_seed(0)
        module = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, build.cosine_with_warmup(7, 2))
        generator, rng = torch.Generator().manual_seed(0), random.Random(0)
        checkpoints = build.LoopCheckpoints(str(directory), {"module": module}, optimizer, schedule, generator, rng)

        def step_fn(step):
            inputs = torch.randn(5, 4, generator=generator) * rng.uniform(0.5, 1.5)
            loss = module(inputs).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            return {"loss": loss}

        history = build.run_loop(checkpoints, steps, step_fn, save_every=3, log_every=1)
        return module.state_dict(), history

    whole, whole_history = run(tmp_path / "whole", 7)
    run(tmp_path / "killed", 3)
    assert sorted(os.listdir(tmp_path / "killed")) == ["checkpoint-3"]
    resumed, resumed_history = run(tmp_path / "killed", 7)
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)
    assert resumed_history == whole_history


def test_stage0_steps_run_in_parallel_processes_and_failures_name_the_step():
    """The independent stage-0 steps (VAE, vision) run in spawned processes with a fixed thread count each; a step
    that fails is reported with its name."""
    import math

    results = build.pretrain_in_parallel({"first": (math.sqrt, (16.0,)), "second": (math.pow, (2.0, 10.0))}, threads=1)
    assert {name: value for name, (value, _) in results.items()} == {"first": 4.0, "second": 1024.0}
    assert all(seconds >= 0 for _, seconds in results.values())
    with pytest.raises(RuntimeError, match="Stage-0 step 'bad' failed: math domain error"):
        build.pretrain_in_parallel({"good": (math.sqrt, (1.0,)), "bad": (math.sqrt, (-1.0,))}, threads=1)


def test_reduced_grey_keeps_small_images_and_shrinks_large_ones(tmp_path):
    from PIL import Image

    Image.new("RGB", (600, 300), (10, 200, 30)).save(tmp_path / "large.png")
    Image.new("L", (100, 50), 7).save(tmp_path / "small.png")
    large, small = build._reduced_grey(str(tmp_path / "large.png"), 224), build._reduced_grey(str(tmp_path / "small.png"), 224)
    assert (large.mode, large.size) == ("L", (224, 112))
    assert (small.mode, small.size, small.getpixel((0, 0))) == ("L", (100, 50), 7)


def test_step_timings_add_up_the_runs_of_a_resumed_build(tmp_path, monkeypatch):
    """A resumed build adds each run's time of a step to its earlier runs' (read back from the file), for steps run
    in this process and for those timed elsewhere (`record`)."""
    clock = iter([0.0, 10.0, 10.0, 14.0, 20.0, 25.0])
    monkeypatch.setattr(build.time, "perf_counter", lambda: next(clock))
    path = str(tmp_path / "timings.json")
    first = build.StepTimings(path)
    assert first.run("stage1_s", lambda value: value * 2, 21) == 42
    first.run("data_s", lambda: None)
    second = build.StepTimings(path)
    second.run("stage1_s", lambda: None)
    second.record("vae_s", 3.5)
    assert second.seconds == {"stage1_s": 15.0, "data_s": 4.0, "vae_s": 3.5}
    assert json.loads((tmp_path / "timings.json").read_text()) == second.seconds


@pytest.mark.slow
def test_the_build_script_runs_end_to_end(data_dir, tmp_path):
    """Every step of the build (tokenizer, VAE, model, vision, data, three stages, generation fine-tune, final
    folder) for two steps each."""
    summary = build.main([
        "--data", str(data_dir), "--output", str(tmp_path), "--vae-steps", "2", "--vision-steps", "2",
        "--stage-steps", "2", "2", "2", "--generation-finetune-steps", "2", "--batch-size", "2", "--num-sr", "4", "--vocab-size", "600", "--num-views", "1",
        "--threads", "2",  # the VAE and vision steps run in two processes
    ])
    assert summary["vocab_size"] == 600 and summary["dtypes"] == ["F32"]
    assert [stage["stage"] for stage in summary["stages"]] == ["stage1", "stage2", "stage3", "generation fine-tune"]
    label_prompts = str(tmp_path / "data" / "t2i_label_prompts.jsonl")
    assert summary["generation_finetune"] == {"steps": 2, "learning_rate": build.GENERATION_FINETUNE["learning_rate"],
                                              "mixture": build.GENERATION_FINETUNE["mixture"],
                                              "freeze": {"vit": True, "vae": True, "und": True, "gen": False, "connector": True},
                                              "text_to_image": [{"jsonl": label_prompts, "image_dir": str(data_dir.resolve() / "medpix" / "images")}]}
    loaded = m.UniMedVLForConditionalGeneration.from_pretrained(summary["final"])
    assert loaded.config.text_config.vocab_size == 600
    assert set(build.code_files(summary["final"])) == set(build.current_code())


def test_quickstart_runs_offline_on_the_shipped_model(tmp_path):
    """The README's main job: `python examples/quickstart.py` answers, generates and super-resolves, offline."""
    from PIL import Image

    environment = dict(os.environ, HF_HUB_OFFLINE="1")
    environment.pop("UNIMEDVL_MODEL", None)
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "quickstart.py"), "--output-dir", str(tmp_path)],
        capture_output=True, text=True, env=environment, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"model: {m.default_model_path()}" in result.stdout and "UniMedVL-Tiny: a tiny demonstration model" in result.stdout
    assert "Q: What modality is this image?\nA: 'CT'" in result.stdout  # pydicom's CT_small.dcm, soft-tissue window
    for name in ("text_to_image.png", "super_resolution_input.png", "super_resolution_output.png", "super_resolution_reference.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size == (64, 64)
    with Image.open(tmp_path / "quickstart.png") as image:
        assert image.width == 5 * 192
