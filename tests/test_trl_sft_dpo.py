"""TRL front ends on the tiny model: `trl.SFTTrainer` on a chat-format image dataset (assistant-only loss, LoRA) and
`trl.DPOTrainer` on image preference pairs (PEFT reference and an explicit reference model), out of the box."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from modeling_unimedvl import UniMedVLForConditionalGeneration
from unimedvl_training.lora import lora_config


ANSWERS = ["yes", "no", "the left lung", "axial"]


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)) for _ in ANSWERS]


def _user(question):
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}


def _assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _model(converted_dir):
    return UniMedVLForConditionalGeneration.from_pretrained(converted_dir, dtype=torch.float32)


def _common(tmp_path):
    return dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False, max_steps=2,
                per_device_train_batch_size=2, report_to=[], logging_steps=1, max_length=None, disable_tqdm=True,
                save_strategy="no", learning_rate=1e-2)


def test_sft_trainer_trains_answers_only_with_lora(converted_dir, tiny_processor, tmp_path):
    dataset = datasets.Dataset.from_list(
        [{"images": [image], "messages": [_user("What is shown?"), _assistant(answer)]} for image, answer in zip(_images(), ANSWERS)]
    )
    model = _model(converted_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = SFTTrainer(
        model=model,
        processing_class=tiny_processor,
        train_dataset=dataset,
        args=SFTConfig(assistant_only_loss=True, **_common(tmp_path)),
        peft_config=lora_config("und", r=4),
    )
    batch = trainer.data_collator([dict(row) for row in dataset.select(range(2))])
    eos = tiny_processor.special_ids["eos"]
    for row, answer in zip(batch["labels"], ANSWERS[:2]):
        expected = tiny_processor.tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
        assert row[row != -100].tolist() == expected  # the answer and its <|im_end|>: no prompt, no placeholder
    assert int((batch["input_ids"] == tiny_processor.special_ids["image"]).sum()) == int(batch["image_grid_hw"].prod(-1).sum())

    # the fused-head loss TRL trains on equals the cross-entropy of the model's own logits on the answer tokens
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        logits = trainer.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"][:, 1:]
    reference = torch.nn.functional.cross_entropy(logits[:, :-1][labels != -100], labels[labels != -100])
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)

    trainer.model.train()
    trainer.train()
    lora = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in name and "language_model.layers" in name and "moe_gen" not in name for name in lora)
    assert any("lora_B" in name and p.abs().sum() > 0 for name, p in trainer.model.named_parameters())
    merged = trainer.model.merge_and_unload()
    changed = {name for name, p in merged.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("language_model.layers" in name and "moe_gen" not in name for name in changed)
    assert [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _preferences():
    rows = []
    for image, answer in zip(_images(), ANSWERS):
        rows.append({"images": [image], "prompt": [_user("Describe the finding.")],
                     "chosen": [_assistant(answer)], "rejected": [_assistant("normal study")]})
    return datasets.Dataset.from_list(rows)


@pytest.mark.parametrize("reference", ["peft", "ref_model", "rebuilt_by_trl"])
def test_dpo_trainer_on_image_preference_pairs(converted_dir, tiny_processor, tmp_path, reference):
    """A PEFT reference, a given reference model, or none: TRL then rebuilds it from the folder's `config.json`
    (its `auto_map` names `AutoModelForImageTextToText`)."""
    model = _model(converted_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    kwargs = {
        "peft": {"peft_config": lora_config("und", r=4)},
        "ref_model": {"ref_model": _model(converted_dir)},
        "rebuilt_by_trl": {},
    }[reference]
    trainer = DPOTrainer(model=model, processing_class=tiny_processor, train_dataset=_preferences(),
                         args=DPOConfig(beta=0.1, **_common(tmp_path)), **kwargs)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "rewards/margins" in entry]
    assert len(logs) == 2 and logs[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)  # policy == reference at step 1
    assert logs[1]["rewards/margins"] > 0 and logs[1]["loss"] < np.log(2)
    if reference == "peft":
        base = {name.replace(".base_layer", ""): p for name, p in trainer.model.get_base_model().named_parameters() if "lora_" not in name}
        assert base.keys() == before.keys() and all(torch.equal(p, before[name]) for name, p in base.items())
    else:
        assert any(not torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())
        assert all(torch.equal(p, before[name]) for name, p in trainer.ref_model.named_parameters())
