"""UniMedVLTrainer: loss values recomputed by hand, freezing flags, EMA, atomic checkpoints, resume equality, curriculum."""

import json
import os

import datasets
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from modeling_unimedvl import UniMedVLForConditionalGeneration
from unimedvl_training.curriculum import load_stage_config, training_processor
from unimedvl_training.data import RECORD_FEATURES, normalize_record
from unimedvl_training.flow_matching import sample_timesteps
from unimedvl_training.freezing import apply_freezing, parameters_of
from unimedvl_training.sequences import CFGDropout, SequenceBuilder, UniMedVLDataCollator, UniMedVLTrainingDataset
from unimedvl_training.trainer import UniMedVLTrainer, UniMedVLTrainingArguments


TINY_TRANSFORMS = {"understanding": [56, 28, 14, 56 * 56], "generation_vit": [56, 28, 14, 56 * 56], "generation_vae": [64, 32, 16, 64 * 64]}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(4):
        size = (64, 48) if index % 2 else (48, 64)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


def _rows(image_dir):
    def line(task, inputs, outputs, messages):
        record = {"input_img": [{"path": f"{i}.png"} for i in inputs], "output_img": [{"path": f"{o}.png"} for o in outputs],
                  "message": [{"from": f, "value": v} for f, v in messages]}
        return normalize_record(record, str(image_dir), task=task)

    return [
        line("understanding", [0], [], [("human", "<image>\nWhich organ is shown?"), ("gpt", "The liver.")]),
        line("text_to_image", [], [1], [("human", "An axial CT of the head.")]),
        line("image_to_image", [2], [3], [("human", "Increase the resolution."), ("gpt", "Done.")]),
        line("counterfactual", [1], [0], [("human", "Remove the lesion."), ("gpt", "The lesion is gone.")]),
    ]


@pytest.fixture(scope="module")
def processor(tiny_processor):
    return training_processor(tiny_processor, TINY_TRANSFORMS)


@pytest.fixture(scope="module")
def records(image_dir):
    return datasets.Dataset.from_list(_rows(image_dir), features=RECORD_FEATURES)


def _args(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], remove_unused_columns=False, disable_tqdm=True,
                    per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, save_strategy="no", seed=7)
    return UniMedVLTrainingArguments(**{**defaults, **kwargs})


def _model(converted_dir):
    return UniMedVLForConditionalGeneration.from_pretrained(converted_dir, dtype=torch.float32)


def test_loss_matches_a_hand_computation(converted_dir, processor, records, tmp_path):
    model = _model(converted_dir).eval()
    batch = UniMedVLDataCollator(0)([SequenceBuilder(processor)(row) for row in records])
    trainer = UniMedVLTrainer(model=model, args=_args(tmp_path, timestep_shift=3.0, ce_weight=0.25, mse_weight=1.0), train_dataset=records)
    torch.manual_seed(123)
    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)

    torch.manual_seed(123)  # the trainer draws timesteps and noise, then the forward samples the VAE posterior
    raw = torch.sigmoid(torch.randn(len(batch["vae_pixel_values"])))
    t = torch.where(batch["latent_noised"], 3.0 * raw / (1 + 2.0 * raw), torch.zeros(()))
    tokens = sum((image.shape[-2] // 16) * (image.shape[-1] // 16) for image in batch["vae_pixel_values"])
    noise = torch.randn(tokens, 64)
    clean, grids = model.model.encode_images(batch["vae_pixel_values"], sample=True)
    lengths = (grids[:, 0] * grids[:, 1]).tolist()
    noisy, start = clean.clone(), 0
    for image, count in enumerate(lengths):
        noisy[start : start + count] = (1 - t[image]) * clean[start : start + count] + t[image] * noise[start : start + count]
        start += count
    inputs = {k: v for k, v in batch.items() if k not in ("vae_pixel_values", "latent_noised", "labels")}
    with torch.no_grad():
        out = model(**inputs, latents=noisy, latent_grid_hw=grids, latent_timesteps=t)
    logits, labels = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)
    keep = labels != -100
    ce = -torch.log_softmax(logits[keep], -1).gather(1, labels[keep][:, None]).mean()
    token_noised = torch.repeat_interleave(batch["latent_noised"], torch.tensor(lengths))
    per_token = ((out.velocity - (noise - clean)) ** 2).mean(-1)
    mse = per_token[token_noised].sum() / token_noised.sum()

    assert batch["latent_noised"].tolist() == [True, False, True, False, True, False]  # t2i, i2i (in, out), cf (in, out, copy)
    assert int(keep.sum()) > 0 and int(token_noised.sum()) == sum(n for n, f in zip(lengths, batch["latent_noised"]) if f)
    torch.testing.assert_close(outputs.ce_loss, ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs.mse_loss, mse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, 0.25 * ce + mse, atol=1e-5, rtol=1e-5)


def test_timesteps_follow_the_shifted_logit_normal():
    generator = torch.Generator().manual_seed(0)
    t = sample_timesteps(200_000, shift=4.0, generator=generator)
    raw = torch.sigmoid(torch.randn(200_000, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(t, (4.0 * raw / (1 + 3.0 * raw)).clamp(min=1e-6))
    assert 0 < float(t.min()) and float(t.max()) < 1
    assert abs(float(sample_timesteps(200_000, 1.0, torch.Generator().manual_seed(1)).median()) - 0.5) < 0.01


def test_freezing_by_parameter_name(converted_dir, processor, records, tmp_path):
    model = _model(converted_dir)
    und, gen = set(parameters_of(model, "und")), set(parameters_of(model, "gen"))
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in und and "lm_head.weight" in und
    assert "model.language_model.layers.1.mlp.down_proj.weight" in und and "model.language_model.norm.weight" in und
    assert "model.language_model.layers.0.self_attn.q_proj_moe_gen.weight" in gen
    assert "model.language_model.layers.1.mlp_moe_gen.down_proj.weight" in gen and "model.language_model.norm_moe_gen.weight" in gen
    assert {"llm2vae.weight", "model.vae2llm.weight", "model.time_embedder.linear_1.weight"} <= gen
    assert not und & gen and not any("vision_tower" in n or "connector" in n for n in und | gen)
    assert all(n.startswith("model.vision_tower.") for n in parameters_of(model, "vit"))
    connector = set(parameters_of(model, "connector"))
    assert {"model.connector.fc1.weight", "model.connector.fc2.bias"} <= connector
    assert {n.split(".")[1] for n in connector} <= {"connector", "vit_pos_embed"} and not connector & (und | gen)
    with pytest.raises(ValueError, match="Unknown part 'llm'"):
        parameters_of(model, "llm")

    counts = apply_freezing(model, freeze_vit=True, freeze_vae=True, freeze_und=True, freeze_gen=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == gen | {n for n, _ in model.named_parameters() if n.startswith("model.connector.")}
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dataset = UniMedVLTrainingDataset(records, SequenceBuilder(processor))
    UniMedVLTrainer(model=model, args=_args(tmp_path, max_steps=1, per_device_train_batch_size=4),
                    train_dataset=dataset, data_collator=UniMedVLDataCollator(0)).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert "model.language_model.layers.0.self_attn.q_proj_moe_gen.weight" in changed
    only_gen = _model(converted_dir)
    apply_freezing(only_gen, freeze_vit=True, freeze_vae=True, freeze_und=True, freeze_connector=True)
    assert {n for n, p in only_gen.named_parameters() if p.requires_grad} == gen | {
        n for n, p in only_gen.named_parameters() if n.startswith("model.latent_pos_embed.") and p.requires_grad}
    frozen_model = _model(converted_dir)
    frozen_model.model.connector.requires_grad_(False)
    with pytest.raises(ValueError, match="Every parameter is frozen"):
        apply_freezing(frozen_model, True, True, True, True)


class _KillAt:
    """Raises after optimizer step `step` (after any checkpoint of that step), like a killed run."""

    def __init__(self, step):
        self.step = step

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda args, state, control, **kwargs: self._check(name, state)
        raise AttributeError(name)

    def _check(self, event, state):
        if event == "on_step_end" and state.global_step == self.step:
            raise KeyboardInterrupt(f"killed at step {self.step}")


def _train(converted_dir, processor, records, output_dir, callbacks=(), resume=None):
    model = _model(converted_dir)
    apply_freezing(model, freeze_vit=True, freeze_vae=True)
    dataset = UniMedVLTrainingDataset(records, SequenceBuilder(processor, CFGDropout(0.3, 0.3, 0.3)), seed=7)
    args = _args(output_dir, max_steps=4, save_strategy="steps", save_steps=2, ema_decay=0.9, timestep_shift=2.0)
    trainer = UniMedVLTrainer(model=model, args=args, train_dataset=dataset, data_collator=UniMedVLDataCollator(0), callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_resume_after_kill_gives_the_same_weights(converted_dir, processor, records, tmp_path):
    reference = _train(converted_dir, processor, records, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt, match="killed at step 3"):
        _train(converted_dir, processor, records, tmp_path / "killed", callbacks=[_KillAt(3)])
    killed = tmp_path / "killed"
    assert sorted(p.name for p in killed.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    assert {"model.safetensors", "optimizer.pt", "rng_state.pth", "ema.safetensors", "ema_state.json", "checkpoint_complete.json"} <= set(os.listdir(killed / "checkpoint-2"))
    # a checkpoint being written when the process died has no commit file and is never resumed from
    (killed / "checkpoint-4").mkdir()
    (killed / "checkpoint-4" / "model.safetensors").write_bytes(b"partial")
    resumed = _train(converted_dir, processor, records, killed, resume=True)
    assert (killed / "checkpoint-4" / "checkpoint_complete.json").is_file()  # removed, then written again by the resumed run
    assert resumed.state.global_step == 4
    expected = reference.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=0, rtol=0, msg=name)
    for a, b in zip(resumed.ema.shadow_params, reference.ema.shadow_params):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    logs = [entry for entry in reference.state.log_history if "ce" in entry]
    assert len(logs) == 4 and all(entry["mse"] > 0 and entry["tokens_per_second"] > 0 for entry in logs)


def test_stage_configs_and_overrides(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text(yaml.safe_dump({"training": {"max_steps": 5, "learning_rate": 3e-4}, "stages": {2: {"training": {"max_steps": 9}}}}))
    configs = {stage: load_stage_config(stage, str(user)) for stage in (1, 2, 3)}
    assert configs[1]["mixture"] == {"understanding": 0.75, "text_to_image": 0.25}
    assert configs[2]["mixture"] == {"understanding": 0.40, "text_to_image": 0.45, "interleaved": 0.10}
    assert configs[3]["mixture"] == {"understanding": 0.37, "text_to_image": 0.35, "interleaved": 0.25}
    assert [configs[s]["training"]["max_steps"] for s in (1, 2, 3)] == [5, 9, 5]
    assert load_stage_config(3)["training"]["max_steps"] == 70000 and load_stage_config(2)["training"]["max_steps"] == 120000
    assert configs[1]["training"]["learning_rate"] == 3e-4 and configs[1]["training"]["ce_weight"] == 0.25
    assert configs[1]["cfg_dropout"] == {"text": 0.1, "vit": 0.3, "vae": 0.3}
    with pytest.raises(ValueError, match="stage must be one of"):
        load_stage_config(4)


def test_cli_runs_all_stages_in_order(converted_dir, image_dir, tmp_path):
    from unimedvl_training.train import main

    jsonl = tmp_path / "data.jsonl"
    with open(jsonl, "w") as handle:
        for row in _rows(image_dir):
            handle.write(json.dumps({"input_img": [{"path": e["path"]} for e in row["input_images"]],
                                     "output_img": [{"path": e["path"]} for e in row["output_images"]],
                                     "message": row["messages"]}) + "\n")
        handle.write(json.dumps({"input_img": [{"path": "gone.png"}], "message": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}) + "\n")
    config = tmp_path / "config.yaml"
    source = [{"jsonl": str(jsonl), "image_dir": str(image_dir)}]
    config.write_text(yaml.safe_dump({
        "data": {"understanding": source, "text_to_image": source, "interleaved": source},
        "image_transforms": TINY_TRANSFORMS,
        "training": {"per_device_train_batch_size": 2, "logging_steps": 1, "save_steps": 1, "disable_tqdm": True},
    }))
    output = tmp_path / "run"
    assert main(["--stage", "all", "--config", str(config), "--model", str(converted_dir), "--output", str(output), "--max-steps", "1", "--use-cpu"]) == 0
    previous = str(converted_dir)
    for stage in (1, 2, 3):
        final = output / f"stage{stage}" / "final"
        assert {"model.safetensors", "ema.safetensors", "config.json", "processor_config.json", "training_summary.json"} <= set(os.listdir(final))
        summary = json.loads((final / "training_summary.json").read_text())
        assert summary["base_model"] == os.path.abspath(previous)
        assert summary["data"]["understanding"]["dropped"] == {"missing_image": 1}
        previous = str(final)
    reloaded = UniMedVLForConditionalGeneration.from_pretrained(output / "stage3" / "final", dtype=torch.float32)
    assert reloaded.config.latent_token_id == 605
    assert any((output / "stage1" / "runs").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_tiny_curriculum_on_real_data(data_dir, reference_dir, tmp_path):
    from unimedvl_training.run_tiny_curriculum import main

    main(["--data", str(data_dir), "--reference", str(reference_dir), "--output", str(tmp_path), "--steps", "20",
          "--lora-steps", "10", "--num-sr", "16", "--batch-size", "4"])
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert [c["stage"] for c in curves] == ["stage1", "stage2", "stage3", "lora_both+heads"]
    assert curves[0]["data"]["understanding"]["kept"] == 3064 and curves[1]["data"]["interleaved"]["kept"] == 16
    assert all(c["tokens_per_second_median"] > 0 for c in curves)
    assert curves[0]["ce"]["points"][-1][1] < curves[0]["ce"]["points"][0][1]  # logged at steps 10 and 20


def test_packed_rows_give_the_loss_and_logits_of_one_sample_per_row(converted_dir, processor, records, tmp_path):
    model = _model(converted_dir).eval()
    samples = [SequenceBuilder(processor)(row) for row in records]
    lengths = [len(sample["input_ids"]) for sample in samples]
    padded = UniMedVLDataCollator(0)(samples)
    packed = UniMedVLDataCollator(0, pack_tokens=sum(lengths))(samples)
    two_rows = UniMedVLDataCollator(0, pack_tokens=lengths[0] + lengths[1])(samples)
    assert packed["input_ids"].shape == (1, sum(lengths)) and two_rows["input_ids"].shape[0] == 3
    assert packed["sample_ids"][0].tolist() == [i for i, n in enumerate(lengths) for _ in range(n)]
    trainer = UniMedVLTrainer(model=model, args=_args(tmp_path), train_dataset=records)
    results = []
    for batch in (padded, packed, two_rows):
        torch.manual_seed(5)
        loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
        real = batch["attention_mask"].bool()
        results.append((loss, outputs.ce_loss, outputs.mse_loss, outputs.logits[real], outputs.velocity))
    for other in results[1:]:
        for expected, got in zip(results[0], other):
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    torch.manual_seed(5)
    unmasked = {key: value for key, value in packed.items() if key != "sample_ids"}
    _, outputs = trainer.compute_loss(model, unmasked, return_outputs=True)
    assert not torch.allclose(outputs.logits[packed["attention_mask"].bool()], results[0][3], atol=1e-3)  # sample_ids matter


def test_packing_rejects_a_bad_budget():
    with pytest.raises(ValueError, match="pack_tokens must be a positive number of tokens, got 0"):
        UniMedVLDataCollator(0, pack_tokens=0)


def test_the_forward_encodes_and_noises_training_images(converted_dir, processor, records):
    from modeling_unimedvl.modeling_unimedvl import noise_latents

    model = _model(converted_dir).eval()
    batch = UniMedVLDataCollator(0)([SequenceBuilder(processor)(row) for row in records])
    inputs = {k: v for k, v in batch.items() if k not in ("vae_pixel_values", "latent_noised", "labels")}
    clean, grids = model.model.encode_images(batch["vae_pixel_values"])
    t = torch.where(batch["latent_noised"], torch.tensor(0.7), torch.zeros(()))
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        inside = model(**inputs, vae_pixel_values=batch["vae_pixel_values"], latent_timesteps=t, latent_noise=noise)
        outside = model(**inputs, latents=noise_latents(clean, noise, t, grids.prod(-1)), latent_grid_hw=grids, latent_timesteps=t)
        torch.testing.assert_close(inside.clean_latents, clean)
        torch.testing.assert_close(inside.velocity, outside.velocity)
        with pytest.raises(ValueError, match="`latent_noise` needs the per-image `latent_timesteps`"):
            model(**inputs, vae_pixel_values=batch["vae_pixel_values"], latent_noise=noise)
        with pytest.raises(ValueError, match=r"`latent_noise` has shape \(3, 64\), the latents"):
            model(**inputs, vae_pixel_values=batch["vae_pixel_values"], latent_timesteps=t, latent_noise=noise[:3])
