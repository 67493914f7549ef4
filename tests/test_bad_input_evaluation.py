"""Bad input to the evaluation harness (`unimedvl eval …` and `unimedvl_pipelines.evaluation`), one row per case:
arguments and files → exit status and the single `unimedvl: error: …` line naming the file / line / option.
Faults: a run killed while writing `predictions.jsonl` or `metrics.json` loses no stored prediction, and the re-run
ends with the same metrics as an uninterrupted run."""

import json
import re
import shutil

import pytest

from fault_injection import kill_at_open, kill_mid_write, run_killed
from in_process_cli import run_in_process
from input_files import prediction_rows, write_file
from unimedvl_pipelines.evaluation import evaluate_vqa


class Files:
    """Builds the files a row needs under `tmp_path`."""

    def __init__(self, tmp_path, converted_dir, data_dir):
        self.tmp, self.model, self.vqa = tmp_path, converted_dir, data_dir / "vqa_rad" / "testset.json"

    def file(self, name, data):
        return write_file(self.tmp / name, data)

    def vqa_args(self, output, *extra):
        return ["eval", "vqa", "--model", self.model, "--data", self.vqa, "--output-dir", output, "--limit", "2",
                "--max-new-tokens", "2", "--no-progress", *extra]


# id, arguments (a function of Files), exit status, expected message (regex)
CASES = [
    ("prediction-row-without-id", lambda f: ["eval", "vqa", "--predictions", f.file("p.jsonl", '{"id": "1", "prediction": "no"}\n{"prediction": "yes"}\n')],
     1, r"p\.jsonl:2: the prediction row has no \"id\""),
    ("prediction-row-a-list", lambda f: ["eval", "report", "--predictions", f.file("p.jsonl", '[1, 2]\n')],
     1, r"p\.jsonl:1: the prediction row is a JSON list, not an object"),
    ("prediction-row-null-id", lambda f: ["eval", "i2i", "--predictions", f.file("p.jsonl", '{"id": null}\n')],
     1, r"p\.jsonl:1: the prediction row has no \"id\""),
    ("predictions-not-utf8", lambda f: ["eval", "vqa", "--predictions", f.file("p.jsonl", b'{"id": "\xff"}\n')],
     1, r"p\.jsonl is not a UTF-8 predictions file"),
    ("i2i-target-is-eps-content", lambda f: ["eval", "i2i", "--predictions", f.file("p.jsonl", json.dumps(
        {"id": "1", "generated": str(f.file("g.png", "%!PS-Adobe-3.0 EPSF-3.0\n")), "target": str(f.file("t.png", "%!PS-Adobe-3.0\n"))}))],
     1, r"t\.png: not a readable image file: its content is none of PNG"),
    ("predictions-empty", lambda f: ["eval", "vqa", "--predictions", f.file("p.jsonl", "")], 1, r"p\.jsonl holds no predictions"),
    ("predictions-for-generation", lambda f: ["eval", "generation", "--predictions", f.file("p.jsonl", "")],
     1, r"eval generation re-scores by rerunning with the same --output-dir"),
    ("run-config-corrupt", lambda f: f.vqa_args(f.file("out/run_config.json", "{").parent),
     1, r"out/run_config\.json is not valid JSON .*pass --overwrite"),
    ("run-config-a-list", lambda f: f.vqa_args(f.file("out/run_config.json", "[]").parent),
     1, r"out/run_config\.json must hold a JSON object"),
    ("output-dir-is-a-file", lambda f: f.vqa_args(f.file("out.txt", "x")), 1, r"--output-dir .*out\.txt is a file; give a folder"),
    ("data-missing", lambda f: ["eval", "vqa", "--model", f.model, "--data", f.tmp / "none.json", "--output-dir", f.tmp / "o"],
     1, r"Evaluation data file .*none\.json does not exist"),
    ("data-not-a-list", lambda f: ["eval", "vqa", "--model", f.model, "--data", f.file("d.json", '{"rows": 1}'), "--output-dir", f.tmp / "o"],
     1, r"d\.json must hold a JSON list of rows"),
    ("data-not-json", lambda f: ["eval", "vqa", "--model", f.model, "--data", f.file("d.json", "[{"), "--output-dir", f.tmp / "o"],
     1, r"d\.json is not valid JSON"),
    ("data-and-output-missing", lambda f: ["eval", "report", "--model", f.model], 1, r"eval report: missing --data, --output-dir"),
    ("limit-negative", lambda f: f.vqa_args(f.tmp / "o", "--limit", "-1"), 2, r"argument --limit: must be a positive integer, got -1"),
    ("limit-zero", lambda f: f.vqa_args(f.tmp / "o", "--limit", "0"), 2, r"argument --limit: must be a positive integer, got 0"),
    ("batch-size-zero", lambda f: f.vqa_args(f.tmp / "o", "--batch-size", "0"), 2, r"argument --batch-size: must be a positive integer, got 0"),
    ("steps-zero", lambda f: ["eval", "i2i", "--num-inference-steps", "0"], 2, r"argument --num-inference-steps: must be a positive integer"),
    ("samples-negative", lambda f: ["eval", "generation", "--samples-per-prompt", "-2"], 2, r"argument --samples-per-prompt: must be a positive"),
    ("cfg-interval-nan", lambda f: ["eval", "generation", "--cfg-interval", "nan", "1"], 2, r"argument --cfg-interval: must be a finite number"),
    ("seed-negative", lambda f: f.vqa_args(f.tmp / "o", "--seed", "-5"), 2, r"argument --seed: must be between 0 and 2\*\*64-1"),
    ("device-missing", lambda f: f.vqa_args(f.tmp / "o", "--device", "cuda:99"),
     1, r"--device cuda:99: (CUDA is not available on this machine|this machine has \d+ CUDA device)"),
]


@pytest.fixture()
def files(tmp_path, converted_dir, data_dir):
    return Files(tmp_path, converted_dir, data_dir)


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_evaluation_input_is_one_error_line_and_a_status(case, files):
    _, build, status, message = case
    code, _, stderr = run_in_process(build(files))
    errors = [line for line in stderr.splitlines() if line.startswith("unimedvl: error: ")]
    assert code == status and len(errors) == 1, stderr
    assert re.search(message, errors[0]), errors[0]


def test_resuming_with_other_settings_is_refused_and_unreadable_images_are_counted(files, data_dir):
    rows = json.loads(files.vqa.read_text())[:2]
    rows[1] = dict(rows[1], image_name="eps.png")
    images = files.tmp / "images"
    shutil.copytree(data_dir / "vqa_rad" / "images", images, ignore=lambda folder, names: [n for n in names if n != rows[0]["image_name"]])
    (images / "eps.png").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n")  # EPS content, PNG name
    data = files.file("d.json", json.dumps(rows))
    output = files.tmp / "run"
    code, stdout, stderr = run_in_process(["eval", "vqa", "--model", files.model, "--data", data, "--output-dir", output,
                                           "--max-new-tokens", "2", "--no-progress"])
    assert code == 0, stderr
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["metrics"]["overall"]["n"] == 1 and metrics["input"]["skipped_by_reason"] == {"unreadable_image": 1}
    assert re.search(r"eps\.png: not a readable image file", metrics["input"]["examples"][0])
    code, _, stderr = run_in_process(["eval", "vqa", "--model", files.model, "--data", data, "--output-dir", output,
                                      "--max-new-tokens", "3", "--no-progress"])
    assert code == 1 and "holds predictions made with different settings (max_new_tokens)" in stderr


# ------------------------------------------------------------------------------------------------------- faults


RUN = """
from unimedvl_pipelines.evaluation import evaluate_vqa
evaluate_vqa({model!r}, {data!r}, {output!r}, batch_size=1, max_new_tokens=2, limit=3, progress=False, device="cpu")
"""


def run_vqa(model, data, output):
    return evaluate_vqa(str(model), str(data), str(output), batch_size=1, max_new_tokens=2, limit=3, progress=False, device="cpu")


def predictions_by_id(path):
    """The rows of a predictions file by id (a later row of an id replaces an earlier one, as the package reads it)."""
    return {row["id"]: row for row in prediction_rows(path)}


@pytest.fixture(scope="module")
def uninterrupted(converted_dir, data_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_vqa(converted_dir, data_dir / "vqa_rad" / "testset.json", output)
    return output, result


def test_killed_while_resuming_after_a_crash_loses_no_prediction(uninterrupted, converted_dir, data_dir, tmp_path):
    """Defect 7: resuming rewrote predictions.jsonl in place, so a kill at that moment lost every prediction. A kill
    right after the file is opened for writing now leaves every complete line in place."""
    reference, result = uninterrupted
    output = tmp_path / "run"
    output.mkdir()
    shutil.copy(reference / "run_config.json", output)
    lines = (reference / "predictions.jsonl").read_text().splitlines()
    stored = "\n".join(lines[:2]) + "\n" + lines[2][:25]  # two complete predictions and a line cut by a crash
    (output / "predictions.jsonl").write_text(stored)
    data = data_dir / "vqa_rad" / "testset.json"
    run_killed(kill_at_open("predictions.jsonl"), RUN.format(model=str(converted_dir), data=str(data), output=str(output)))
    assert (output / "predictions.jsonl").read_text().startswith(stored)  # nothing lost, nothing rewritten
    rerun = run_vqa(converted_dir, data, output)
    assert (rerun["timing"]["generated"], rerun["timing"]["resumed"]) == (1, 2)
    assert rerun["metrics"] == result["metrics"]
    assert predictions_by_id(output / "predictions.jsonl") == predictions_by_id(reference / "predictions.jsonl")


def test_killed_while_writing_metrics_keeps_the_previous_file_whole(uninterrupted, converted_dir, data_dir, tmp_path):
    reference, result = uninterrupted
    output = tmp_path / "run"
    shutil.copytree(reference, output)
    before = (output / "metrics.json").read_text()
    data = data_dir / "vqa_rad" / "testset.json"
    run_killed(kill_mid_write("metrics.json"), RUN.format(model=str(converted_dir), data=str(data), output=str(output)))
    assert (output / "metrics.json").read_text() == before  # the complete earlier file, not half a new one
    rerun = run_vqa(converted_dir, data, output)
    assert rerun["metrics"] == result["metrics"] and json.loads((output / "metrics.json").read_text())["metrics"] == result["metrics"]
