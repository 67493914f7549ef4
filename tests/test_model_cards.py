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


def test_tiny_card_lists_measured_results_against_baselines(tmp_path):
    results = {"closed yes/no accuracy": {"value": 0.71, "baseline": 0.55, "dataset": "VQA-RAD test"}}
    card = build_model_cards.tiny_card(results)
    card.save(tmp_path / "tiny.md")
    reloaded = ModelCard.load(tmp_path / "tiny.md")
    assert reloaded.data.eval_results[0].metric_value == 0.71
    assert "| closed yes/no accuracy | VQA-RAD test | 0.71 | 0.55 |" in reloaded.text


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
