"""End-to-end VQA harness on 20 real VQA-RAD questions with the tiny converted reference checkpoint.

The tiny model's answers are garbage; these tests check the harness: counts, files, resume, re-scoring, summaries
and bad-input reporting.
"""

import argparse
import json

import pytest

from input_files import prediction_rows
from unimedvl_pipelines.evaluation import evaluate_vqa, register_eval_command, rescore_vqa
from unimedvl_pipelines.evaluation.cli import main as eval_main

SMALL_VIT = (112, 56, 14, 112 * 112)  # keeps the ViT input small so the CPU test stays fast


@pytest.fixture(scope="module")
def small_processor(converted_dir):
    from modeling_unimedvl import UniMedVLProcessor

    processor = UniMedVLProcessor.from_pretrained(converted_dir)
    processor.image_processor.understanding_transform = SMALL_VIT
    return processor


@pytest.fixture(scope="module")
def vqa_rad(data_dir):
    return data_dir / "vqa_rad" / "testset.json"


def test_vqa_run_resume_and_rescore(tiny_model, small_processor, converted_dir, vqa_rad, tmp_path):
    output = tmp_path / "run"
    kwargs = dict(batch_size=8, max_new_tokens=4, limit=20, progress=False, model=tiny_model, processor=small_processor)
    first = evaluate_vqa(str(converted_dir), str(vqa_rad), str(output), **kwargs)
    overall = first["metrics"]["overall"]
    assert (overall["n"], overall["n_closed"], overall["n_open"]) == (20, 19, 1)
    assert first["timing"]["generated"] == 20 and first["timing"]["resumed"] == 0
    rows = prediction_rows(output / "predictions.jsonl")
    assert len(rows) == 20 and len({row["id"] for row in rows}) == 20
    assert {"id", "image", "question", "answer", "answer_type", "question_type", "organ", "prediction"} <= set(rows[0])
    assert sum(block["n"] for block in first["metrics"]["by_organ"].values()) == 20
    assert sum(block["n"] for block in first["metrics"]["by_question_type"].values()) == 20
    for name in ("closed_acc", "closed_acc_llavamed", "open_recall", "open_exact", "open_f1", "overall_acc"):
        assert 0.0 <= overall[name] <= 1.0

    summary = (output / "summary.md").read_text()
    assert "| closed_acc_llavamed |" in summary and "LLaVA-Med v1.0.0 substring rule" in summary
    assert "### By organ" in summary and "| CHEST |" in summary and "20 questions (19 closed, 1 open)" in summary
    saved = json.loads((output / "metrics.json").read_text())
    assert saved["metrics"] == first["metrics"] and saved["input"]["rows_read"] == 451

    # resume: nothing is regenerated; then a killed run (last line cut in half) regenerates exactly one item
    second = evaluate_vqa(str(converted_dir), str(vqa_rad), str(output), **kwargs)
    assert (second["timing"]["generated"], second["timing"]["resumed"]) == (0, 20)
    text = (output / "predictions.jsonl").read_text().splitlines()
    (output / "predictions.jsonl").write_text("\n".join(text[:-1]) + "\n" + text[-1][:30] + "\n")
    third = evaluate_vqa(str(converted_dir), str(vqa_rad), str(output), **kwargs)
    assert (third["timing"]["generated"], third["timing"]["resumed"]) == (1, 19)
    assert len(prediction_rows(output / "predictions.jsonl")) == 20
    assert (output / "predictions.jsonl").read_text().splitlines()[19] == text[-1][:30]  # appended after, never rewritten
    assert (
        prediction_rows(output / "predictions.jsonl")[-1]["prediction"] == rows[-1]["prediction"]
    )  # greedy, same batch-free answer

    rescored = rescore_vqa(str(output / "predictions.jsonl"), str(tmp_path / "rescored"))
    assert rescored["metrics"] == third["metrics"]
    assert rescored["settings"]["max_new_tokens"] == 4

    with pytest.raises(ValueError, match="different settings \\(max_new_tokens\\)"):
        evaluate_vqa(str(converted_dir), str(vqa_rad), str(output), **dict(kwargs, max_new_tokens=5))
    fresh = evaluate_vqa(str(converted_dir), str(vqa_rad), str(output), overwrite=True, **dict(kwargs, limit=3))
    assert fresh["timing"]["generated"] == 3 and len(prediction_rows(output / "predictions.jsonl")) == 3


def test_bad_vqa_rows_are_counted(tiny_model, small_processor, converted_dir, data_dir, tmp_path):
    images = data_dir / "vqa_rad" / "images"
    good = {
        "qid": 1,
        "image_name": "synpic42202.jpg",
        "question": "Is this a chest x-ray?",
        "answer": "yes",
        "answer_type": "CLOSED ",
        "question_type": "MODALITY",
        "image_organ": "CHEST",
    }
    lines = [
        json.dumps(good),
        json.dumps(dict(good, qid=2, image_name="missing.jpg")),
        "{not json",
        json.dumps(dict(good, qid=3, answer_type="MAYBE")),
        json.dumps({k: v for k, v in good.items() if k != "question"} | {"qid": 4}),
        json.dumps(dict(good, qid=1)),
        json.dumps(["a", "list"]),
        json.dumps(dict(good, qid=5, answer="left", answer_type="OPEN")),
    ]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    result = evaluate_vqa(
        str(converted_dir),
        str(data),
        str(tmp_path / "out"),
        image_dir=str(images),
        max_new_tokens=2,
        progress=False,
        model=tiny_model,
        processor=small_processor,
    )
    assert result["input"]["rows_read"] == 8 and result["input"]["rows_kept"] == 2
    assert result["input"]["skipped_by_reason"] == {
        "bad_answer_type": 1,
        "duplicate_id": 1,
        "malformed_json": 1,
        "missing_field:question": 1,
        "missing_image:image": 1,
        "row_not_an_object": 1,
    }
    assert f"{data}:2: missing_image:image" in result["input"]["examples"]
    assert result["metrics"]["overall"]["n_closed"] == 1 and result["metrics"]["overall"]["n_open"] == 1
    assert "skipped `missing_image:image`: 1" in (tmp_path / "out" / "summary.md").read_text()
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        evaluate_vqa(
            str(converted_dir),
            str(tmp_path / "nope.json"),
            str(tmp_path / "x"),
            model=tiny_model,
            processor=small_processor,
        )


def test_cli_standalone_and_registration(converted_dir, vqa_rad, tmp_path, capsys):
    output = tmp_path / "cli"
    code = eval_main(
        [
            "vqa",
            "--model",
            str(converted_dir),
            "--data",
            str(vqa_rad),
            "--output-dir",
            str(output),
            "--limit",
            "2",
            "--max-new-tokens",
            "2",
            "--batch-size",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0
    assert "## VQA — testset.json" in capsys.readouterr().out
    assert len(prediction_rows(output / "predictions.jsonl")) == 2
    assert eval_main(["vqa", "--predictions", str(output / "predictions.jsonl")]) == 0
    assert "2 questions" in capsys.readouterr().out
    assert (
        eval_main(
            [
                "vqa",
                "--model",
                str(tmp_path),
                "--data",
                str(vqa_rad),
                "--output-dir",
                str(output),
                "--limit",
                "2",
                "--max-new-tokens",
                "2",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "different settings (checkpoint)" in capsys.readouterr().err

    parser = argparse.ArgumentParser(prog="unimedvl")
    register_eval_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "i2i", "--model", "ckpt", "--data", "d.jsonl", "--output-dir", "o", "--crop-border", "4"])
    assert (args.eval_task, args.crop_border, args.cfg_img_scale, args.vae_encode) == ("i2i", 4, 2.0, "mean")
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "generation", "--model", "ckpt", "--dtype", "int8"])
