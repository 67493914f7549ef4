"""Report, text-to-image and image-to-image evaluation runs end to end with the tiny converted checkpoint."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from unimedvl_pipelines.evaluation import evaluate_generation, evaluate_i2i, evaluate_report, rescore_i2i
from unimedvl_pipelines.evaluation.image_metrics import load_feature_extractor, load_inception_extractor


class PooledConvFeatures(torch.nn.Module):
    """A tiny seeded feature extractor: [N, 3, S, S] in [0, 1] -> [N, 8]."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 4, 4)
        with torch.no_grad():
            self.conv.weight.copy_(
                torch.randn(self.conv.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.1
            )

    def forward(self, images):
        return self.conv(images).mean(dim=(2, 3))


def make_extractor():
    return PooledConvFeatures()


@pytest.fixture(scope="module")
def small_processor(converted_dir):
    from modeling_unimedvl import UniMedVLProcessor

    processor = UniMedVLProcessor.from_pretrained(converted_dir)
    processor.image_processor.understanding_transform = (112, 56, 14, 112 * 112)
    processor.image_processor.generation_vae_transform = (64, 32, 16, 64 * 64)
    processor.image_processor.generation_vit_transform = (56, 28, 14, 56 * 56)
    return processor


def test_report_run_on_medpix_captions_and_findings(
    tiny_model, small_processor, converted_dir, data_dir, tmp_path, monkeypatch
):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no_nltk_data")])
    medpix = data_dir / "medpix"
    common = dict(max_new_tokens=4, batch_size=2, progress=False, model=tiny_model, processor=small_processor)
    captions = evaluate_report(
        str(converted_dir), str(medpix / "descriptions_dev.jsonl"), str(tmp_path / "captions"), limit=3, **common
    )
    metrics = captions["metrics"]
    assert metrics["n"] == 3 and metrics["meteor"] is None and "no local WordNet" in metrics["meteor_unavailable"]
    assert all(0.0 <= metrics[key] <= 1.0 for key in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l"))
    rows = [json.loads(line) for line in (tmp_path / "captions" / "predictions.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == ["MPX1009_synpic46283", "MPX1009_synpic46295", "MPX1075_synpic20513"]
    assert rows[0]["report"].startswith("The prostate is enlarged")
    summary = (tmp_path / "captions" / "summary.md").read_text()
    assert "| meteor | unavailable | 3 |" in summary and "| cider_d |" in summary

    findings = evaluate_report(
        str(converted_dir), str(medpix / "data_dev.jsonl"), str(tmp_path / "findings"), limit=2, max_images=2, **common
    )
    first = json.loads((tmp_path / "findings" / "predictions.jsonl").read_text().splitlines()[0])
    assert first["id"] == "MPX2483" and len(first["images"]) == 2 and first["report"].startswith("Axial T2 MRI")
    assert findings["metrics"]["n"] == 2


def test_generation_run_fid_per_modality_diversity_and_resume(
    tiny_model, small_processor, converted_dir, data_dir, tmp_path
):
    output = tmp_path / "t2i"
    kwargs = dict(
        feature_extractor="test_evaluation_tasks:make_extractor",
        samples_per_prompt=2,
        height=32,
        width=32,
        num_inference_steps=2,
        batch_size=4,
        limit=3,
        feature_image_size=32,
        kid_subsets=4,
        ms_ssim_scales=2,
        progress=False,
        model=tiny_model,
        processor=small_processor,
    )
    data = str(data_dir / "medpix" / "descriptions_dev.jsonl")
    result = evaluate_generation(str(converted_dir), data, str(output), **kwargs)
    metrics = result["metrics"]
    assert (metrics["n_prompts"], metrics["n_generated"]) == (3, 6)
    assert set(metrics["fid_kid"]) == {"all", "CT - noncontrast", "CT w/contrast (IV)"}
    assert (metrics["fid_kid"]["all"]["n_real"], metrics["fid_kid"]["all"]["n_fake"]) == (3, 6)
    assert metrics["fid_kid"]["all"]["fid"] >= 0 and metrics["fid_kid"]["all"]["kid_subset_size"] == 3
    assert metrics["fid_kid"]["CT w/contrast (IV)"]["fid"] is None  # one real image: not computable, not zero
    assert metrics["diversity"]["n_groups"] == 3 and 0 < metrics["diversity"]["ms_ssim_diversity"] <= 1
    images = sorted(path.name for path in (output / "images").iterdir())
    assert len(images) == 6 and Image.open(output / "images" / images[0]).size == (32, 32)
    summary = (output / "summary.md").read_text()
    assert "| CT - noncontrast | 2 | 4 |" in summary and "not comparable with published FID" in summary

    removed = output / "images" / "MPX1009_synpic46295_1.png"
    before = np.asarray(Image.open(removed))
    removed.unlink()
    again = evaluate_generation(str(converted_dir), data, str(output), **kwargs)
    assert (again["timing"]["generated"], again["timing"]["resumed"]) == (1, 5)
    after = np.asarray(Image.open(removed))  # regenerated alone: the per-item seed does not depend on the batch
    assert np.abs(before.astype(int) - after.astype(int)).max() <= 1


def test_feature_extractor_and_inception_errors(tmp_path):
    assert isinstance(load_feature_extractor("test_evaluation_tasks:make_extractor"), PooledConvFeatures)
    with pytest.raises(ValueError, match="must look like 'package.module:factory'"):
        load_feature_extractor("no_colon")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_feature_extractor("test_evaluation_tasks:missing")
    import importlib.util

    if importlib.util.find_spec("torch_fidelity") is None:
        with pytest.raises(ImportError, match="needs the torch-fidelity package"):
            load_inception_extractor(str(tmp_path / "weights.pth"))
    else:
        with pytest.raises(FileNotFoundError, match="weights.pth not found"):
            load_inception_extractor(str(tmp_path / "weights.pth"))


def test_i2i_run_and_rescore(tiny_model, small_processor, converted_dir, data_dir, tmp_path):
    rows = [
        {
            "id": "sr-1",
            "image": "MPX1009_synpic46283",
            "target": "MPX1009_synpic46283",
            "instruction": "Enhance the resolution.",
            "task": "sr",
        },
        {
            "id": "t2-1",
            "image": "MPX1009_synpic46295",
            "target": "MPX1009_synpic46295",
            "instruction": "Generate a FLAIR image.",
            "task": "t2_flair",
        },
        {"id": "bad", "image": "MPX_missing", "target": "MPX1009_synpic46295", "instruction": "x"},
        {"id": "no-target", "image": "MPX1009_synpic46295", "instruction": "x"},
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    result = evaluate_i2i(
        str(converted_dir),
        str(data),
        str(tmp_path / "i2i"),
        image_dir=str(data_dir / "medpix" / "images"),
        num_inference_steps=2,
        batch_size=4,
        progress=False,
        model=tiny_model,
        processor=small_processor,
    )
    metrics = result["metrics"]
    assert set(metrics["by_task"]) == {"sr", "t2_flair"} and metrics["overall"]["n"] == 2
    assert metrics["resized_predictions"] == 2  # outputs are the 64 px VAE size, targets 256 px
    assert result["input"]["skipped_by_reason"] == {"missing_field:target": 1, "missing_image:image": 1}
    assert 0 < metrics["overall"]["psnr"] < 60 and -1 <= metrics["overall"]["ssim"] <= 1
    rescored = rescore_i2i(str(tmp_path / "i2i" / "predictions.jsonl"), str(tmp_path / "re"), crop_border=4)
    assert rescored["metrics"]["overall"]["n"] == 2 and "4 px cropped" in (tmp_path / "re" / "summary.md").read_text()
