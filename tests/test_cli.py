"""The `unimedvl` command line: every sub-command on the tiny model, plus one-line errors for bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from in_process_cli import run_in_process
from unimedvl_pipelines import UniMedVLPipeline, load_medical_image
from unimedvl_pipelines.cli import REPORT_PROMPT, SUBCOMMANDS, build_parser, main


def run_cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    return subprocess.run(
        [sys.executable, "-m", "unimedvl_pipelines.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.startswith("unimedvl: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_ask_and_report(converted_dir, tiny_model, tiny_processor, reference_image, tmp_path, capsys):
    path = tmp_path / "input.png"
    reference_image.save(path)
    inputs = tiny_processor(images=reference_image, text="What modality is this image?")
    generated = tiny_model.generate(**inputs, max_new_tokens=4, do_sample=False)
    expected = tiny_processor.decode_answers(generated[:, inputs["input_ids"].shape[1] :])[0]
    assert main(["ask", str(path), "What modality is this image?", "--model", str(converted_dir), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == expected
    ct = get_testdata_file("CT_small.dcm", download=False)
    assert main(["report", ct, "--window=-600,1500", "--model", str(converted_dir), "--max-new-tokens", "3"]) == 0
    image = load_medical_image(ct, window="lung")
    inputs = tiny_processor(images=image, text=REPORT_PROMPT)
    generated = tiny_model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert capsys.readouterr().out.splitlines()[-1] == tiny_processor.decode_answers(generated[:, inputs["input_ids"].shape[1] :])[0]


def test_generate_and_edit_write_the_pipeline_images(converted_dir, reference_image, tmp_path):
    pipe = UniMedVLPipeline.from_pretrained(converted_dir)
    pipe.set_progress_bar_config(disable=True)
    out = tmp_path / "gen.png"
    assert main(["generate", "A chest X-ray.", "-o", str(out), "--steps", "3", "--height", "32", "--width", "48",
                 "--seed", "5", "--model", str(converted_dir)]) == 0
    expected = pipe("A chest X-ray.", num_inference_steps=3, height=32, width=48, generator=torch.Generator().manual_seed(5)).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    source = tmp_path / "t2.png"
    reference_image.save(source)
    edited = tmp_path / "edit.png"
    assert main(["edit", str(source), "Generate a FLAIR image.", "-o", str(edited), "--steps", "3",
                 "--model", str(converted_dir)]) == 0
    assert Image.open(edited).size == (96, 64)


def test_eval_scores_vqa_rad_questions(converted_dir, data_dir, tmp_path, capsys):
    output = tmp_path / "eval"
    args = ["eval", "vqa", "--model", str(converted_dir), "--data", str(data_dir / "vqa_rad" / "testset.json"), "--output-dir", str(output),
            "--limit", "2", "--max-new-tokens", "2", "--no-progress"]
    assert main(args) == 0
    assert "## VQA — testset.json" in capsys.readouterr().out
    assert len((output / "predictions.jsonl").read_text().splitlines()) == 2


def test_eval_takes_the_model_like_every_subcommand(data_dir, tmp_path, monkeypatch, capsys):
    """`unimedvl eval` has `--model` (default: $UNIMEDVL_MODEL, else the shipped UniMedVL-Tiny), no positional path."""
    from modeling_unimedvl import default_model

    monkeypatch.delenv("UNIMEDVL_MODEL", raising=False)
    output = tmp_path / "eval"
    args = ["eval", "vqa", "--data", str(data_dir / "vqa_rad" / "testset.json"), "--output-dir", str(output), "--limit", "1",
            "--max-new-tokens", "1", "--no-progress"]
    assert main(args) == 0
    assert json.loads((output / "run_config.json").read_text())["checkpoint"] == default_model.DEFAULT_MODEL_DIR
    for command in ("ask", "report", "generate", "edit", "eval"):
        subparser = build_parser()._subparsers._group_actions[0].choices[command]
        if command == "eval":
            subparser = subparser._subparsers._group_actions[0].choices["vqa"]
        assert "--model" in subparser._option_string_actions, command


def test_convert_delegates(reference_dir, tmp_path):
    result = run_cli("convert", reference_dir, tmp_path / "out", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"validated {reference_dir}" in result.stdout
    code, _, stderr = run_in_process(["convert", tmp_path / "missing", tmp_path / "out"])
    assert code == 1 and "missing" in stderr


def test_bad_input_gives_one_line_errors(converted_dir, reference_image, tmp_path):
    image = tmp_path / "x.png"
    reference_image.save(image)
    (tmp_path / "junk.dcm").write_bytes(b"junk")
    cases = [
        (("ask", tmp_path / "none.png", "q", "--model", converted_dir), 1, "none.png: no such file"),
        (("ask", tmp_path / "junk.dcm", "q", "--model", converted_dir), 1, "junk.dcm: not a readable DICOM file"),
        (("ask", image, "q", "--model", tmp_path / "nomodel"), 1, "nomodel: no such model folder"),
        (("ask", image, "q", "--window", "1,x"), 2, "invalid window '1,x'"),
        (("generate", "p", "-o", tmp_path / "o.png", "--steps", "many"), 2, "argument --steps: invalid int value"),
        (("generate", "p", "-o", tmp_path / "o.png", "--height", "30", "--model", converted_dir), 1, "`height` must be a positive multiple of 16"),
        (("edit", image, "i", "--model", converted_dir), 2, "the following arguments are required: -o/--output"),
        (("frobnicate",), 2, "invalid choice: 'frobnicate'"),
        (("ask", image, "q", "--bogus"), 2, "unrecognized arguments: --bogus"),
        (("eval", "vqa", "--model", converted_dir), 1, "eval vqa: missing --data, --output-dir"),
        (("eval", "bleu"), 2, "invalid choice: 'bleu'"),
    ]
    for args, status, message in cases:
        code, _, stderr = run_in_process(args)
        assert code == status, (args, stderr)
        assert message in error_line(stderr), (args, stderr)


def test_the_model_defaults_to_unimedvl_model_then_the_shipped_tiny(converted_dir, reference_image, tmp_path, monkeypatch, capsys):
    from modeling_unimedvl import default_model

    image = tmp_path / "x.png"
    reference_image.save(image)
    monkeypatch.delenv("UNIMEDVL_MODEL", raising=False)
    assert main(["ask", str(image), "What modality is this image?", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()  # UniMedVL-Tiny answered
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_DIR", str(tmp_path / "absent"))
    code, _, stderr = run_in_process(["ask", image, "q"])
    assert code == 1 and "no model given and The default model UniMedVL-Tiny is missing" in error_line(stderr)
    monkeypatch.setenv("UNIMEDVL_MODEL", str(converted_dir))  # the environment variable wins over the default
    assert main(["ask", str(image), "q", "--max-new-tokens", "2"]) == 0


def test_subcommands_are_extensible():
    def register_hello(subparsers):
        parser = subparsers.add_parser("hello")
        parser.set_defaults(handler=lambda args: 7)

    parser = build_parser(SUBCOMMANDS + (register_hello,))
    args = parser.parse_args(["hello"])
    assert args.handler(args) == 7
    commands = build_parser()._subparsers._group_actions[0].choices
    assert list(commands) == ["ask", "report", "generate", "edit", "eval", "convert"]
