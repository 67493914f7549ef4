"""Bad input to training, table-driven: data rows (medical formats, null text, broken bytes), `unimedvl-train`
configuration errors (one line, exit status 2), damaged LoRA adapters, and a SIGKILL while `final/` is written."""

import json
import os
import signal
import subprocess
import sys

import nibabel
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pydicom.data import get_testdata_file
from safetensors.torch import load_file, save_file

from unimedvl_training.data import DataReport, load_jsonl_records, validate_records


TINY_TRANSFORMS = {"understanding": [56, 28, 14, 3136], "generation_vit": [56, 28, 14, 3136], "generation_vae": [64, 32, 16, 4096]}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_input")
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    volume = nibabel.Nifti1Image(rng.normal(size=(48, 40, 6)).astype(np.float32), np.eye(4))
    nibabel.save(volume, folder / "brain.nii.gz")
    (folder / "truncated.nii.gz").write_bytes((folder / "brain.nii.gz").read_bytes()[:200])
    (folder / "ct.dcm").write_bytes(open(get_testdata_file("CT_small.dcm"), "rb").read())
    return folder


def _und(image, answer="A liver lesion."):
    return json.dumps({"input_img": [{"path": image}], "message": [{"from": "human", "value": "<image>\nWhat is shown?"},
                                                                  {"from": "gpt", "value": answer}]})


# (name, JSONL lines as bytes, expected kept rows, {reason: count}, substring of the first example of that reason)
DATA_ROWS = [
    ("dicom_row_is_accepted", [_und("ct.dcm").encode()], 1, {}, None),
    ("nifti_row_is_accepted", [_und("brain.nii.gz").encode()], 1, {}, None),
    ("null_text_is_dropped_not_None", [_und("0.png").encode(), json.dumps({"input_img": [{"path": "1.png"}], "message": [
        {"from": "human", "value": "<image> Q?"}, {"from": "gpt", "value": None}]}).encode()], 1, {"malformed_row": 1},
     "message 1 has no text (null instead of a string)"),
    ("non_utf8_line_is_dropped_alone", [_und("0.png").encode(), _und("1.png", "cafe").encode().replace(b"cafe", b"caf\xe9"), _und("2.png").encode()],
     2, {"malformed_row": 1}, "rows.jsonl:2: not UTF-8 (byte 0xe9 at column"),
    ("truncated_nifti_is_unreadable", [_und("0.png").encode(), _und("truncated.nii.gz").encode()], 1, {"unreadable_image": 1},
     "truncated.nii.gz"),
    ("chat_format_row", [json.dumps({"images": ["0.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A liver lesion."}]}]}).encode()], 1, {}, None),
    ("chat_row_with_unknown_role", [_und("0.png").encode(), json.dumps({"image": "1.png", "messages": [
        {"role": "doctor", "content": "Q?"}]}).encode()], 1, {"malformed_row": 1}, "message 0 has role 'doctor'"),
]


@pytest.mark.parametrize("name, lines, kept, dropped, example", DATA_ROWS, ids=[row[0] for row in DATA_ROWS])
def test_training_rows(files, tmp_path, name, lines, kept, dropped, example):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = DataReport()
    records = load_jsonl_records(str(path), str(files), report=report)
    good, report = validate_records(records, report=report)
    assert (report.kept, dict(report.dropped)) == (kept, dropped), report.summary()
    if example:
        assert example in report.examples[next(iter(dropped))][0]
    if name == "dicom_row_is_accepted":
        assert good[0]["input_images"][0]["path"].endswith("ct.dcm")


def _data_config(files, tmp_path, **overrides) -> str:
    (tmp_path / "und.jsonl").write_text("\n".join(_und(f"{i}.png") for i in range(3)) + "\n")
    config = {"data": {"understanding": [{"jsonl": str(tmp_path / "und.jsonl"), "image_dir": str(files)}]},
              "image_transforms": TINY_TRANSFORMS, "training": {"per_device_train_batch_size": 1, "disable_tqdm": True}}
    config.update(overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


# (name, extra command-line arguments or a config writer, expected message)
CLI_ERRORS = [
    ("max_steps_zero", ["--max-steps", "0"], "--max-steps must be a positive number of optimizer steps, got 0"),
    ("max_steps_negative", ["--max-steps", "-3"], "--max-steps must be a positive number of optimizer steps, got -3"),
    ("config_missing", ["--config", "{tmp}/nope.yaml"], "config {tmp}/nope.yaml does not exist"),
    ("config_not_yaml", lambda f, t: _write(t / "c.yaml", "data: [unclosed"), "is not valid YAML"),
    ("config_is_a_list", lambda f, t: _write(t / "c.yaml", "- 1\n- 2\n"), "must hold a YAML mapping, got list"),
    ("data_not_a_mapping", lambda f, t: _data_config(f, t, data=[1]), "`data` must be a mapping, got list"),
    ("unknown_training_key", lambda f, t: _data_config(f, t, training={"learning_rat": 1e-4}),
     "Stage 1: unknown training argument(s) ['learning_rat']"),
    ("max_steps_text", lambda f, t: _data_config(f, t, training={"max_steps": "ten"}),
     "Stage 1: max_steps must be a positive number of optimizer steps, got 'ten'"),
    ("bad_cfg_dropout", lambda f, t: _data_config(f, t, cfg_dropout={"text": 1.5}),
     "cfg_dropout_text must be finite and in [0, 1), got 1.5"),
    ("unknown_data_group", lambda f, t: _data_config(f, t, mixture={"segmentation": 1.0}),
     "Unknown data group(s) ['segmentation'] in the mixture"),
    ("unknown_trainer_flag", ["--learning_rat", "1e-4"], "unknown training argument(s) ['learning_rat']"),
    ("model_not_a_folder", ["--model", "{tmp}/missing-model"], "--model {tmp}/missing-model is not a folder"),
]


@pytest.mark.parametrize("name, arguments, message", CLI_ERRORS, ids=[row[0] for row in CLI_ERRORS])
def test_train_command_errors_are_one_line(converted_dir, files, tmp_path, capsys, name, arguments, message):
    from unimedvl_training.train import main

    config = arguments(files, tmp_path) if callable(arguments) else _data_config(files, tmp_path)
    extra = [] if callable(arguments) else [a.replace("{tmp}", str(tmp_path)) for a in arguments]
    argv = ["--stage", "1", "--config", config, "--model", str(converted_dir), "--output", str(tmp_path / "run"), "--use-cpu", *extra]
    if "--max-steps" not in extra and name != "max_steps_text":
        argv += ["--max-steps", "1"]
    if "--config" in extra:
        argv = argv[:2] + argv[4:]
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse errors
        status = exit_.code
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert error[-1].startswith(("unimedvl-train: error: ", "usage:")) or "error:" in error[-1]
    assert message.replace("{tmp}", str(tmp_path)) in error[-1], error
    assert "Traceback" not in "\n".join(error)
    assert not (tmp_path / "run" / "stage1" / "final").exists()


def test_adapter_missing_half_its_tensors_is_refused(converted_dir, tmp_path):
    from modeling_unimedvl import UniMedVLForConditionalGeneration
    from unimedvl_training.lora import add_lora, load_adapter, lora_config

    model = UniMedVLForConditionalGeneration.from_pretrained(converted_dir, dtype=torch.float32)
    add_lora(model, lora_config("und", r=2)).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    kept = dict(sorted(tensors.items())[: len(tensors) // 2])
    save_file(kept, tmp_path / "adapter_model.safetensors")
    base = UniMedVLForConditionalGeneration.from_pretrained(converted_dir, dtype=torch.float32)
    with pytest.raises(ValueError, match=rf"lacks {len(tensors) - len(kept)} of the {len(tensors)} adapter tensors its config creates"):
        load_adapter(base, str(tmp_path))


KILL_IN_FINAL = """
import os, signal, sys
from modeling_unimedvl import UniMedVLProcessor
from unimedvl_training.train import main

save = UniMedVLProcessor.save_pretrained

def killed(self, folder, *args, **kwargs):
    if os.path.basename(folder).startswith(".final.staging-"):  # the model is written, final/ is not there yet
        os.kill(os.getpid(), signal.SIGKILL)
    return save(self, folder, *args, **kwargs)

UniMedVLProcessor.save_pretrained = killed
main(sys.argv[1:])
"""


def test_sigkill_while_final_is_written(converted_dir, files, tmp_path):
    from unimedvl_training.train import main

    config = _data_config(files, tmp_path, training={"per_device_train_batch_size": 1, "save_steps": 2, "disable_tqdm": True,
                                                      "logging_steps": 1, "learning_rate": 1e-3, "ema_decay": 0.9})
    argv = ["--stage", "1", "--config", config, "--model", str(converted_dir), "--use-cpu", "--max-steps", "4"]
    assert main(argv + ["--output", str(tmp_path / "reference")]) == 0

    run = tmp_path / "killed"
    process = subprocess.run([sys.executable, "-c", KILL_IN_FINAL, *argv, "--output", str(run)], capture_output=True, text=True,
                             env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600)
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    stage = run / "stage1"
    assert not (stage / "final").exists() and (stage / "checkpoint-4" / "checkpoint_complete.json").is_file()

    assert main(argv + ["--output", str(run)]) == 0
    summary = json.loads((stage / "final" / "training_summary.json").read_text())
    assert max(entry["step"] for entry in summary["log_history"]) == 4  # never past max_steps
    assert not [name for name in os.listdir(stage) if name.startswith(".final")]  # no staging folder left behind
    for name in ("model.safetensors", "ema.safetensors"):
        expected = load_file(tmp_path / "reference" / "stage1" / "final" / name)
        for key, value in load_file(stage / "final" / name).items():
            torch.testing.assert_close(value, expected[key], atol=0, rtol=0, msg=f"{name}: {key}")
