"""Training data: JSONL / datasets loading, bad-row reports, sequence plans, token sequences and their block masks."""

import json
import random

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from modeling_unimedvl.modeling_unimedvl import build_attention_mask, sequence_structure
from unimedvl_training.data import (
    RECORD_FEATURES,
    DataReport,
    ImageLimits,
    load_jsonl_records,
    normalize_record,
    records_from_dataset,
    validate_records,
)
from unimedvl_training.curriculum import training_processor
from unimedvl_training.sequences import CFGDropout, SequenceBuilder, UniMedVLDataCollator, UniMedVLTrainingDataset, sequence_plan


TINY_TRANSFORMS = {"understanding": [56, 28, 14, 56 * 56], "generation_vit": [56, 28, 14, 56 * 56], "generation_vae": [64, 32, 16, 64 * 64]}


@pytest.fixture(scope="module")
def processor(tiny_processor):
    return training_processor(tiny_processor, TINY_TRANSFORMS)


@pytest.fixture
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (64, 48)), ("b.png", (48, 64)), ("c.png", (64, 64))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    Image.new("L", (4096, 8)).save(tmp_path / "huge.png")
    return tmp_path


def _line(input_img, output_img, messages, **extra):
    return {"main_task_type": "x", "sub_task_type": "y", "input_img": [{"path": p} for p in input_img],
            "output_img": [{"path": p} for p in output_img],
            "message": [{"from": f, "value": v} for f, v in messages], **extra}


def test_jsonl_bad_rows_are_counted_and_dropped(image_dir):
    lines = [
        _line(["a.png"], [], [("human", "<image>\nWhat organ?"), ("gpt", "Lung")]),          # good (understanding)
        _line([], ["b.png"], [("human", "A chest CT.")]),                                     # good (text-to-image)
        _line(["a.png"], ["c.png"], [("human", "Make it FLAIR."), ("gpt", "Done.")]),        # good (image-to-image)
        _line(["missing.png"], [], [("human", "<image> Q?"), ("gpt", "A")]),                 # missing image
        _line(["broken.png"], [], [("human", "<image> Q?"), ("gpt", "A")]),                  # unreadable
        _line(["huge.png"], [], [("human", "<image> Q?"), ("gpt", "A")]),                    # above limits
        _line(["a.png"], [], [("human", "<image> Q?"), ("gpt", "  ")]),                      # empty answer
        _line([], ["b.png"], [("human", " <image> ")]),                                      # empty prompt
        _line(["a.png"], [], [("human", "<image><image> Q?"), ("gpt", "A")]),                # placeholder mismatch
    ]
    path = image_dir / "train.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n{not json\n" + json.dumps({"input_img": []}) + "\n")
    report = DataReport()
    records = load_jsonl_records(str(path), report=report)
    assert len(records) == len(lines)
    assert [r["task"] for r in records][:3] == ["understanding", "text_to_image", "image_to_image"]
    kept, report = validate_records(records, ImageLimits(), report=report)
    assert len(kept) == 3
    assert report.total == 11 and report.kept == 3
    assert dict(report.dropped) == {
        "malformed_row": 2, "missing_image": 1, "unreadable_image": 1, "image_too_large": 1,
        "empty_text": 2, "placeholder_mismatch": 1,
    }
    assert "train.jsonl:4" in report.examples["missing_image"][0] and "missing.png does not exist" in report.examples["missing_image"][0]
    assert "4096x8" in report.examples["image_too_large"][0]
    assert report.summary().startswith("3/11 rows kept, 8 dropped")


def test_no_usable_row_raises(image_dir):
    records = datasets.Dataset.from_list(
        [normalize_record(_line(["missing.png"], [], [("human", "Q"), ("gpt", "A")]), str(image_dir))], features=RECORD_FEATURES
    )
    with pytest.raises(ValueError, match=r"(?s)No usable training rows.*missing_image: 1"):
        validate_records(records)


def test_records_from_dataset_with_image_feature(image_dir):
    image = Image.open(image_dir / "c.png").copy()  # in memory: stored as bytes
    dataset = datasets.Dataset.from_dict(
        {"input_img": [[image]], "output_img": [[]], "message": [[{"from": "human", "value": "<image> Q?"}, {"from": "gpt", "value": "A"}]]},
        features=datasets.Features({
            "input_img": datasets.List(datasets.Image()), "output_img": datasets.List(datasets.Image()),
            "message": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
        }),
    )
    records = records_from_dataset(dataset, name="private")
    kept, report = validate_records(records)
    assert report.kept == 1 and kept[0]["task"] == "understanding" and kept[0]["source"] == "private:0"
    assert kept[0]["input_images"][0]["bytes"] is not None


def _row(task, inputs, outputs, messages, image_dir):
    return normalize_record(_line(inputs, outputs, messages), str(image_dir), task=task)


def test_sequence_plans_follow_the_original_formats(image_dir):
    und = _row("understanding", ["a.png", "b.png"], [], [("human", "Compare <image> and <image> please"), ("gpt", "Same")], image_dir)
    assert [(i.kind, i.text, i.image, i.loss) for i in sequence_plan(und)] == [
        ("text", "Compare", None, False), ("vit", None, 0, False), ("text", "and", None, False),
        ("vit", None, 1, False), ("text", "please", None, False), ("text", "Same", None, True),
    ]
    t2i = _row("text_to_image", [], ["c.png"], [("human", "A CT.")], image_dir)
    assert [(i.kind, i.loss, i.noised, i.enable_cfg) for i in sequence_plan(t2i)] == [
        ("text", False, False, True), ("text", True, False, False), ("vae", True, True, False),
    ]
    assert sequence_plan(t2i)[1].text == "This is the resulting image."
    cf = _row("counterfactual", ["a.png"], ["c.png"], [("human", "Remove the lesion"), ("gpt", "The lesion was removed.")], image_dir)
    assert [(i.kind, i.image, i.loss, i.noised, i.enable_cfg) for i in sequence_plan(cf)] == [
        ("vae", 0, False, False, True), ("vit", 0, False, False, True), ("text", None, False, False, True),
        ("vae", 1, True, True, False), ("vae", 1, False, False, False), ("vit", 1, False, False, False),  # clean copy
        ("text", None, True, False, False),
    ]


def test_tokens_labels_positions_and_masks(processor, tiny_model, image_dir):
    ids = processor.special_ids
    row = _row("counterfactual", ["a.png"], ["c.png"], [("human", "Remove it"), ("gpt", "Removed.")], image_dir)
    sample = SequenceBuilder(processor)(row)
    input_ids = torch.tensor([sample["input_ids"]])
    labels, positions = sample["labels"], sample["position_ids"]
    assert len(input_ids[0]) == SequenceBuilder(processor).num_tokens(row)
    assert sample["latent_noised"] == [False, True, False]
    # VAE 64x48 -> 4x3 latent tokens; ViT of the 64x48 image resized to 56x42 -> 4x3 patches
    assert [t.shape[-2:] for t in sample["vae_pixel_values"]] == [(48, 64), (64, 64), (64, 64)]
    assert sample["image_grid_hw"].tolist() == [[3, 4], [4, 4]]
    # labels: only the explanation tokens and its <|im_end|>; the prompt and images are ignored
    answer = processor.tokenizer("Removed.", add_special_tokens=False)["input_ids"]
    assert [t for t in labels if t != -100] == answer + [ids["eos"]]
    # positions: the noised target shares the position of the clean copy that follows it (not advanced)
    structure = sequence_structure(input_ids, tiny_model.config, None, _noise_mask(input_ids, sample, ids))
    assert structure.position_ids[0].tolist() == positions
    blocks = structure.block_ids[0]
    noised = structure.noise_mask[0]
    noise_block = int(blocks[noised][0])
    clean_copy = noise_block + 1
    assert positions[int((blocks == noise_block).nonzero()[0])] == positions[int((blocks == clean_copy).nonzero()[0])]
    mask = build_attention_mask(structure.block_ids, structure.noise_mask, None, 0, input_ids.shape[1], torch.float32)[0, 0] == 0
    later = torch.arange(input_ids.shape[1]) > int(noised.nonzero().max())
    assert not mask[later][:, noised].any()                      # the noised target is invisible to later tokens
    assert mask[later][:, blocks == clean_copy].all()             # its clean copy is visible
    assert mask[noised][:, noised].all()                          # the noise block is bidirectional inside
    assert mask[noised][:, blocks == 0].all()                     # and sees the conditioning image


def _noise_mask(input_ids, sample, ids):
    """Per-token noise flags from the per-image `latent_noised` list, as the model derives them from latent_timesteps."""
    flags = iter(sample["latent_noised"])
    mask, inside = torch.zeros_like(input_ids, dtype=torch.bool), None
    for index, token in enumerate(input_ids[0].tolist()):
        if token == ids["latent"]:
            if inside is None:
                inside = next(flags)
            mask[0, index] = inside
        else:
            inside = None
    return mask


def test_cfg_dropout_keeps_the_original_positions(processor, image_dir):
    row = _row("image_to_image", ["a.png"], ["c.png"], [("human", "Upscale"), ("gpt", "Done")], image_dir)
    full = SequenceBuilder(processor)(row)
    dropped = SequenceBuilder(processor, CFGDropout(text=0.0, vit=1.0, vae=1.0))(row)
    no_text = SequenceBuilder(processor, CFGDropout(text=1.0, vit=0.0, vae=0.0))(row)
    ids = processor.special_ids
    assert ids["image"] not in dropped["input_ids"] and dropped["latent_noised"] == [True]
    # dropping the VAE and ViT blocks of the input image still advances the position by one per image (original)
    assert dropped["position_ids"][0] == 2 and full["position_ids"][0] == 0
    assert full["position_ids"][-1] == dropped["position_ids"][-1]
    prompt_len = len(processor.tokenizer("Upscale", add_special_tokens=False)["input_ids"]) + 2
    assert len(full["input_ids"]) - len(no_text["input_ids"]) == prompt_len
    assert full["position_ids"][-1] - no_text["position_ids"][-1] == prompt_len


def test_dataset_is_deterministic_per_epoch_and_collates(processor, image_dir):
    rows = [_row("text_to_image", [], ["c.png"], [("human", f"Prompt {i}")], image_dir) for i in range(6)]
    records = datasets.Dataset.from_list(rows, features=RECORD_FEATURES)
    dataset = UniMedVLTrainingDataset(records, SequenceBuilder(processor, CFGDropout(text=0.5)), seed=3)
    first = [dataset[i]["input_ids"] for i in range(6)]
    assert first == [dataset[i]["input_ids"] for i in range(6)]
    full_lengths = [len(SequenceBuilder(processor)(row)["input_ids"]) for row in rows]
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        dropped = [len(dataset[i]["input_ids"]) < full_lengths[i] for i in range(6)]
        assert dropped == [random.Random(f"3-{epoch}-{i}").random() < 0.5 for i in range(6)]
    batch = UniMedVLDataCollator(pad_token_id=0)([dataset[0], dataset[1]])
    lengths = [len(dataset[0]["input_ids"]), len(dataset[1]["input_ids"])]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert batch["latent_noised"].tolist() == [True, True] and len(batch["vae_pixel_values"]) == 2
    assert "pixel_values" not in batch


def _chat_rows(image_dir):
    image = Image.open(image_dir / "c.png").convert("RGB")
    return [
        {"images": [image], "messages": [  # TRL layout: {"type": "image"} parts, images in a column
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which organ?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Lung"}]}]},
        {"images": [], "messages": [  # images inside the content parts (a path), a system turn
            {"role": "system", "content": [{"type": "text", "text": "You are a radiologist."}]},
            {"role": "user", "content": [{"type": "image", "image": str(image_dir / "a.png")}, {"type": "text", "text": "Plane?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Axial"}]}]},
        {"images": [], "messages": [  # an image in the assistant turn is a generation target
            {"role": "user", "content": [{"type": "text", "text": "An axial CT of the chest."}]},
            {"role": "assistant", "content": [{"type": "image", "image": str(image_dir / "b.png")}]}]},
    ]


def test_chat_format_rows_become_records(image_dir):
    records = records_from_dataset(datasets.Dataset.from_list(_chat_rows(image_dir)), name="chat")
    kept, report = validate_records(records)
    assert report.kept == 3 and [row["task"] for row in kept] == ["understanding", "understanding", "text_to_image"]
    assert kept[0]["messages"] == [{"from": "human", "value": "<image> Which organ?"}, {"from": "gpt", "value": "Lung"}]
    assert kept[0]["input_images"][0]["bytes"] is not None
    assert kept[1]["messages"][0] == {"from": "human", "value": "You are a radiologist."}
    assert kept[1]["input_images"][0]["path"] == str(image_dir / "a.png")
    assert kept[2]["output_images"][0]["path"] == str(image_dir / "b.png") and kept[2]["input_images"] == []


def test_single_image_column_and_bad_chat_rows(image_dir):
    dataset = datasets.Dataset.from_dict(
        {"image": [str(image_dir / "a.png"), str(image_dir / "b.png"), str(image_dir / "c.png")],
         "messages": [[{"role": "user", "content": "<image> Q?"}, {"role": "assistant", "content": "A"}],
                      [{"role": "user", "content": "<image><image> Q?"}, {"role": "assistant", "content": "A"}],
                      [{"role": "user", "content": "<image> Q?"}, {"role": "assistant", "content": None}]]},
    ).cast_column("image", datasets.Image())
    report = DataReport()
    records = records_from_dataset(dataset, name="single", report=report)
    assert len(records) == 1 and records[0]["input_images"][0]["path"].endswith("a.png")
    assert records[0]["messages"][0] == {"from": "human", "value": "<image> Q?"}
    assert report.dropped["malformed_row"] == 2
    assert "single:1: message 0 has more image parts than the row has images" in report.examples["malformed_row"][0]
    assert "single:2: message 1 has no text (null instead of a string)" in report.examples["malformed_row"][1]


def test_streaming_dataset_trains(processor, converted_dir, image_dir, tmp_path):
    from modeling_unimedvl import UniMedVLForConditionalGeneration
    from unimedvl_training.sequences import UniMedVLIterableTrainingDataset
    from unimedvl_training.trainer import UniMedVLTrainer, UniMedVLTrainingArguments

    rows = _chat_rows(image_dir) * 2
    stream = datasets.Dataset.from_list(rows).to_iterable_dataset()
    records = records_from_dataset(stream, name="stream")
    assert isinstance(records, datasets.IterableDataset)
    assert [row["task"] for row in records] == ["understanding", "understanding", "text_to_image"] * 2
    model = UniMedVLForConditionalGeneration.from_pretrained(converted_dir, dtype=torch.float32)
    args = UniMedVLTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2, per_device_train_batch_size=2,
                                     logging_steps=1, save_strategy="no", disable_tqdm=True, learning_rate=1e-3)
    trainer = UniMedVLTrainer(model=model, args=args, train_dataset=stream, processing_class=processor)
    assert isinstance(trainer.train_dataset, UniMedVLIterableTrainingDataset)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "ce" in entry]
    assert len(logs) == 2 and logs[0]["ce"] > 0 and any(entry["mse"] > 0 for entry in logs)
