"""FSDP2 sharded training on two CPU processes (gloo), through the same Trainer / accelerate FSDP2 path as
`accelerate launch --config_file training/accelerate_configs/fsdp2.yaml` on GPUs (`unimedvl_training.cpu_fsdp`).

Opt-in (`--run-slow`): stage 1 of the curriculum on the tiny model for 24 steps, one sample per process and step;
the single-process reference takes the same two samples per step (gradient accumulation 2). Checked: per-step losses
equal within 1e-5 (relative), a run killed (SIGKILL) after its mid-run sharded checkpoint resumes to weights and EMA
identical to the uninterrupted sharded run, and the final folder loads with `from_pretrained`.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file


STEPS = 24
SAVE_STEPS = 8
FSDP_CONFIG = {
    "version": 2,
    "transformer_layer_cls_to_wrap": ["UniMedVLDecoderLayer", "SiglipEncoderLayer"],
    "cpu_ram_efficient_loading": True,
    "state_dict_type": "SHARDED_STATE_DICT",
    "reshard_after_forward": True,
}


def _write_data(folder):
    rng = np.random.default_rng(0)
    understanding, t2i = [], []
    for index in range(12):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    for index in range(24):  # the mixture holds more than STEPS * 2 rows: every compared step lies in the first epoch
        answer = ["The liver.", "The left lung.", "An axial CT of the head."][index % 3]
        understanding.append({"input_img": [{"path": f"{index % 12}.png"}], "output_img": [],
                              "message": [{"from": "human", "value": f"<image>\nWhat is shown ({index})?"}, {"from": "gpt", "value": answer}]})
        t2i.append({"input_img": [], "output_img": [{"path": f"{index % 12}.png"}], "message": [{"from": "human", "value": f"An axial CT, case {index}."}]})
    for name, rows in (("und.jsonl", understanding), ("t2i.jsonl", t2i)):
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


def _config(folder, sharded: bool) -> str:
    training = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 1 if sharded else 2, "learning_rate": 1e-3,
                "warmup_steps": 0, "logging_steps": 1, "save_steps": SAVE_STEPS, "save_total_limit": 5, "disable_tqdm": True,
                "vae_sample": False, "ema_decay": 0.9, "max_grad_norm": 1.0, "dataloader_num_workers": 0}
    if sharded:
        training.update(fsdp="full_shard", fsdp_config=FSDP_CONFIG)
    config = {
        "data": {"understanding": [{"jsonl": str(folder / "und.jsonl")}], "text_to_image": [{"jsonl": str(folder / "t2i.jsonl")}]},
        "image_transforms": {"understanding": [56, 28, 14, 3136], "generation_vit": [56, 28, 14, 3136], "generation_vae": [64, 32, 16, 4096]},
        "training": training,
    }
    path = folder / f"config_{'fsdp' if sharded else 'single'}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _torchrun(config, model, output, port, log):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "unimedvl_training.cpu_fsdp", "--stage", "1", "--config", config, "--model", str(model),
               "--output", str(output), "--use-cpu", "--max-steps", str(STEPS)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _losses(final):
    history = json.loads((final / "training_summary.json").read_text())["log_history"]
    assert all(entry["epoch"] <= 1.0 for entry in history if "loss" in entry)
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


@pytest.mark.slow
def test_fsdp2_matches_single_process_and_resumes_exactly(converted_dir, tmp_path):
    from modeling_unimedvl import UniMedVLForConditionalGeneration
    from unimedvl_training.train import main

    _write_data(tmp_path)
    started = time.perf_counter()
    assert main(["--stage", "1", "--config", _config(tmp_path, False), "--model", str(converted_dir),
                 "--output", str(tmp_path / "single"), "--use-cpu", "--max-steps", str(STEPS)]) == 0
    single_seconds = time.perf_counter() - started

    sharded_config = _config(tmp_path, True)
    started = time.perf_counter()
    with open(tmp_path / "sharded.log", "w") as log:
        assert _torchrun(sharded_config, converted_dir, tmp_path / "sharded", 29631, log).wait(timeout=900) == 0
    sharded_seconds = time.perf_counter() - started
    # only rank 0 reads the weights; rank 1 builds the architecture uninitialised and gets its shards from rank 0
    log = (tmp_path / "sharded.log").read_text()
    assert re.search(r"Process 1: no weights read; \d+ parameter tensors left uninitialised", log), log[-3000:]
    assert "Process 0: no weights read" not in log

    # killed with SIGKILL once the mid-run sharded checkpoint is committed, then the same command again
    killed = tmp_path / "killed" / "stage1"
    with open(tmp_path / "killed.log", "w") as log:
        process = _torchrun(sharded_config, converted_dir, tmp_path / "killed", 29641, log)
        while not (killed / f"checkpoint-{SAVE_STEPS}" / "checkpoint_complete.json").is_file():
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.2)
        workers = psutil.Process(process.pid).children(recursive=True)
        for worker in [*workers, psutil.Process(process.pid)]:
            worker.send_signal(signal.SIGKILL)
        process.wait()
        psutil.wait_procs(workers, timeout=30)
    assert not (killed / "final").exists()
    with open(tmp_path / "resumed.log", "w") as log:
        assert _torchrun(sharded_config, converted_dir, tmp_path / "killed", 29651, log).wait(timeout=900) == 0

    single, sharded = _losses(tmp_path / "single" / "stage1" / "final"), _losses(tmp_path / "sharded" / "stage1" / "final")
    assert sorted(single) == sorted(sharded) == list(range(1, STEPS + 1))
    differences = [abs(single[s] - sharded[s]) / abs(single[s]) for s in single]
    assert max(differences) < 1e-5, differences

    final = tmp_path / "sharded" / "stage1" / "final"
    resumed_final = killed / "final"
    expected = load_file(final / "model.safetensors")
    for name, value in load_file(resumed_final / "model.safetensors").items():
        torch.testing.assert_close(value, expected[name], atol=0, rtol=0, msg=name)
    expected_ema = load_file(final / "ema.safetensors")
    for name, value in load_file(resumed_final / "ema.safetensors").items():
        torch.testing.assert_close(value, expected_ema[name], atol=0, rtol=0, msg=name)
    model = UniMedVLForConditionalGeneration.from_pretrained(final, dtype=torch.float32)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=0, rtol=0, msg=name)
    single_weights = load_file(tmp_path / "single" / "stage1" / "final" / "model.safetensors")
    worst = max(float((single_weights[k] - v).abs().max()) for k, v in expected.items())
    print(json.dumps({"max_relative_loss_difference": max(differences), "max_weight_difference_vs_single": worst,
                      "single_process_s": round(single_seconds, 1), "fsdp2_two_processes_s": round(sharded_seconds, 1)}))
