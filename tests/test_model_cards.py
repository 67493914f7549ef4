"""Model cards render offline with the required sections; publishing to a local folder target copies the right files."""

import sys

import pytest
import torch
from huggingface_hub import ModelCard

from conftest import REPO_ROOT


sys.path.insert(0, str(REPO_ROOT / "model_cards"))
import build_model_cards  # noqa: E402
import publish  # noqa: E402


REQUIRED_SECTIONS = ("Direct Use", "Out-of-Scope Use", "Training Data", "Bias, Risks, and Limitations", "Citation")


def test_release_card_has_metadata_and_sections(tmp_path):
    build_model_cards.main(["--output-dir", str(tmp_path)])
    card = ModelCard.load(tmp_path / "UniMedVL-14B.md")
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "any-to-any"
    assert "medical" in card.data.tags and card.data.base_model == "ByteDance-Seed/BAGEL-7B-MoT"
    results = {r.dataset_name: r.metric_value for r in card.data.eval_results}
    assert results["VQA-RAD"] == 61.9 and results["SLAKE"] == 75.4
    for section in REQUIRED_SECTIONS:
        assert f"## {section}" in card.text or f"### {section}" in card.text, section
    assert "not a medical device" in card.text and "reported by the UniMedVL authors" in card.text


def test_committed_cards_are_built_from_the_committed_records(tmp_path):
    """The cards in the repository are exactly what the builder makes of the committed records (build summary,
    evaluation, results): no hand edits, and a fresh checkout can rebuild them."""
    for name in build_model_cards.TINY_RECORDS.values():
        assert (build_model_cards.RECORDS_DIR / name).is_file(), name
    build_model_cards.main(["--output-dir", str(tmp_path)])
    for name in ("UniMedVL-14B.md", "UniMedVL-Tiny.md"):
        assert (tmp_path / name).read_text() == (build_model_cards.CARDS_DIR / name).read_text(), name


def test_record_stores_the_given_files_and_others_come_from_the_records(tmp_path, monkeypatch):
    records_dir = tmp_path / "records"
    monkeypatch.setattr(build_model_cards, "RECORDS_DIR", records_dir)
    given = tmp_path / "results.json"
    given.write_text('{"m": {"value": 1, "baseline": 0, "dataset": "d"}}')
    records = build_model_cards.read_tiny_records({"results": str(given), "build": None, "evaluation": None}, record=True)
    assert records == {"results": {"m": {"value": 1, "baseline": 0, "dataset": "d"}}, "build": None, "evaluation": None}
    assert sorted(p.name for p in records_dir.iterdir()) == ["UniMedVL-Tiny.results.json"]
    again = build_model_cards.read_tiny_records({"results": None, "build": None, "evaluation": None})
    assert again == records


def test_tiny_card_lists_measured_results_against_baselines(tmp_path):
    results = {"closed yes/no accuracy": {"value": 0.71, "baseline": 0.55, "dataset": "VQA-RAD test"}}
    card = build_model_cards.tiny_card(results)
    card.save(tmp_path / "tiny.md")
    reloaded = ModelCard.load(tmp_path / "tiny.md")
    assert reloaded.data.eval_results[0].metric_value == 0.71
    assert "| closed yes/no accuracy | VQA-RAD test | 0.71 | 0.55 |" in reloaded.text


def tiny_build_summary(**changes) -> dict:
    """A `build_summary.json` of `unimedvl_training.build_unimedvl_tiny` (the fields the card reads)."""
    summary = {
        "command": "python -m unimedvl_training.build_unimedvl_tiny --threads 2", "seed": 0, "torch_threads": 2,
        "timings_s": {"tokenizer_s": 0.5, "vae_s": 780.0, "vision_s": 1100.0, "data_s": 60.0, "stage1_s": 900.0, "stage2_s": 700.0, "stage3_s": 720.0, "generation_finetune_s": 600.0},
        "vae": {"block_out_channels": [16, 32], "downsampling": 2, "latent_channels": 16, "parameters": 123456, "steps": 800,
                "batch_size": 16, "train_crop": 64, "kl_weight": 1e-05, "scaling_factor": 0.5, "shift_factor": -0.25,
                "train_psnr": 33.1, "train_psnr_2x_bicubic": 26.2},
        "vision": {"steps": 3000, "batch_size": 32},
        "text_config": {"hidden_size": 160, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 640},
        "vision_config": {"hidden_size": 128, "num_hidden_layers": 4, "patch_size": 14},
        "image_size": 64, "latent_patch_size": 4, "understanding_side": 112, "parameters": 5_000_000, "megabytes": 20.3,
        "learning_rate": 1e-3, "batch_size": 16, "stage_steps": [1200, 1000, 1000], "num_views": 3,
        "stages": [{"stage": "stage3", "ce": {"first10_mean": 1.2, "last10_mean": 0.9}, "mse": {"first10_mean": 0.4, "last10_mean": 0.3}},
                   {"stage": "generation fine-tune", "ce": {"first10_mean": 0.0, "last10_mean": 0.0}, "mse": {"first10_mean": 0.2, "last10_mean": 0.1}}],
        "stage_mixtures": [{"understanding": 0.75, "text_to_image": 0.25}, {"understanding": 0.4, "text_to_image": 0.45, "interleaved": 0.1},
                           {"understanding": 0.2, "text_to_image": 0.2, "interleaved": 0.6}],
        "generation_finetune": {"steps": 1600, "learning_rate": 3e-4, "mixture": {"understanding": 0, "text_to_image": 1 / 3, "interleaved": 2 / 3},
                                "freeze": {"vit": True, "vae": True, "und": True, "gen": False, "connector": True}},
        "freeze": {"vit": False, "vae": True, "und": False, "gen": False}, "stage0_in_parallel": True,
    }
    summary.update(changes)
    return summary


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, ("2 levels = 2× downsampling", "4×4 latent patches per generation token", "1e-05 KL, 800 steps of 16 whole images",
              "(64 latent tokens)", "frozen: VAE; trained: ViT, understanding expert, generation expert",
              "VAE 780.0 s, vision encoder 1100.0 s (both at the same time, one process each)", "(total 68 min)",
              "generation fine-tune 600.0 s", "then 1600 steps on generation rows only, text-to-image / image-to-image 33 / 67 %",
              "33 / 67 % (frozen: ViT, VAE, understanding expert, ViT connector; trained: generation expert; text-to-image rows from the label prompts and captions), cosine LR from 0.0003",
              "(a few per conversation; each image's questions in ? random groupings)", "stage3 CE 1.2 → 0.9, MSE 0.4 → 0.3; generation fine-tune MSE 0.2 → 0.1.",
              "mixtures understanding / text-to-image / image-to-image 75 / 25 / 0, 42 / 47 / 11, 20 / 20 / 60 %")),
        ({"latent_patch_size": 2, "vae": dict(tiny_build_summary()["vae"], downsampling=4, block_out_channels=[16, 32, 64], train_crop=32)},
         ("3 levels = 4× downsampling", "2×2 latent patches", "800 steps of 16 random 32-px crops", "(64 latent tokens)")),
        ({"freeze": {"vit": True, "vae": True, "und": False, "gen": False}, "stage0_in_parallel": False},
         ("frozen: ViT, VAE; trained: understanding expert, generation expert", "vision encoder 1100.0 s, data", "(total 81 min)")),
        ({"generation_finetune": dict(tiny_build_summary()["generation_finetune"], freeze={"vit": True, "vae": True, "und": False, "gen": False})},
         ("33 / 67 % (frozen: ViT, VAE; trained: understanding expert, generation expert; text-to-image",)),
        ({"vqa_rounds": 4, "generation_finetune": dict(tiny_build_summary()["generation_finetune"], text_to_image=[{"jsonl": "/o/data/t2i_label_prompts.jsonl"}])},
         ("each image's questions in 4 random groupings", "generation expert; text-to-image rows from the label prompts only), cosine LR")),
    ],
)
def test_tiny_recipe_describes_the_build_that_ran(changes, expected):
    recipe = build_model_cards.tiny_recipe(tiny_build_summary(**changes))
    for text in expected:
        assert text in recipe, text


def test_publish_to_a_local_folder_target(converted_dir, tmp_path):
    build_model_cards.main(["--output-dir", str(tmp_path / "cards")])
    target = tmp_path / "hub-repo"
    assert publish.main([str(converted_dir), str(target), "--card", str(tmp_path / "cards" / "UniMedVL-14B.md")]) == 0
    published = {path.name for path in target.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_unimedvl.py", "processor_config.json", "README.md"} <= published
    assert ModelCard.load(target / "README.md").data.model_name == "UniMedVL"


def test_publish_refuses_pickles_and_non_models(converted_dir, tmp_path, capsys):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(converted_dir, folder)
    torch.save({"x": 1}, folder / "optimizer.pt")
    build_model_cards.main(["--output-dir", str(tmp_path / "cards")])
    card = str(tmp_path / "cards" / "UniMedVL-14B.md")
    assert publish.main([str(folder), str(tmp_path / "out"), "--card", card]) == 1
    assert "Refusing to publish pickled files ['optimizer.pt']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is not a converted UniMedVL folder"):
        publish.publish(str(tmp_path), str(tmp_path / "out2"), card)
