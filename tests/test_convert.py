"""The converter: the original release layout, streaming, and precise errors for broken folders."""

import json
import os
import resource
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modeling_unimedvl.convert import convert_checkpoint, main, rename_original_key
from modeling_unimedvl.safetensors_reader import CheckpointError
from synthetic_release import write_synthetic_release


@pytest.fixture()
def original_copy(reference_dir, tmp_path):
    folder = tmp_path / "original"
    shutil.copytree(reference_dir, folder)
    return folder


def rewrite_ema(folder, edit):
    path = folder / "ema.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_converted_weights_equal_the_original_tensors(reference_dir, converted_dir):
    with open(converted_dir / "config.json") as handle:
        config = json.load(handle)
    assert config["vision_config"]["num_hidden_layers"] == 2  # vit_config.json says 3: one layer fewer, as the release
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_unimedvl.UniMedVLForConditionalGeneration"
    original = load_file(str(reference_dir / "ema.safetensors"))
    converted = load_file(str(converted_dir / "model.safetensors"))
    for key, tensor in original.items():
        assert torch.equal(converted[rename_original_key(key)], tensor), key
    assert len(converted) == len(original) + sum(1 for key in converted if key.startswith("model.vae."))


def test_sharded_bfloat16_output(reference_dir, tmp_path):
    output = tmp_path / "bf16"
    convert_checkpoint(str(reference_dir), str(output), dtype=torch.bfloat16, max_shard_size="5MB")
    index = json.loads((output / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:
        assert (output / shard).stat().st_size <= 5_000_000 + 100_000
        with safe_open(str(output / shard), "pt") as handle:
            assert all(handle.get_slice(key).get_dtype() == "BF16" for key in handle.keys())
    assert not [name for name in os.listdir(output) if name.startswith(".converting")]


def test_missing_file_is_named(original_copy, tmp_path):
    (original_copy / "ae.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing ae.safetensors"):
        convert_checkpoint(str(original_copy), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_truncated_checkpoint_is_detected(original_copy, tmp_path):
    path = original_copy / "ema.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size - 1000)
    with pytest.raises(CheckpointError, match=rf"ema.safetensors is truncated: its header needs {size} bytes but the file has {size - 1000}"):
        convert_checkpoint(str(original_copy), str(tmp_path / "out"))


def test_wrong_shape_is_named(original_copy, tmp_path):
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    rewrite_ema(original_copy, lambda tensors: tensors.__setitem__(key, torch.zeros(100, 64)))
    with pytest.raises(CheckpointError, match=r"model.language_model.layers.0.mlp.up_proj.weight: expected \[128, 64\], found \[100, 64\]"):
        convert_checkpoint(str(original_copy), str(tmp_path / "out"))


def test_unknown_and_missing_keys_are_named(original_copy, tmp_path):
    def edit(tensors):
        tensors["vae_batch_norm.running_mean"] = torch.zeros(16)
        del tensors["llm2vae.bias"]

    rewrite_ema(original_copy, edit)
    with pytest.raises(CheckpointError) as error:
        convert_checkpoint(str(original_copy), str(tmp_path / "out"))
    message = str(error.value)
    assert "1 missing keys: llm2vae.bias" in message
    assert "1 unexpected keys: <unmapped> vae_batch_norm.running_mean" in message


def test_command_line_reports_one_line_errors(original_copy, tmp_path, capsys):
    (original_copy / "llm_config.json").unlink()
    assert main([str(original_copy), str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("unimedvl-convert: error: ") and "missing llm_config.json" in error


def test_full_size_release_layout_validates(tmp_path):
    """The 14B release's exact key names, shapes and dtypes (sparse files) pass every check of the converter."""
    counts = write_synthetic_release(str(tmp_path / "release"))
    assert counts == {"ema_tensors": 1223, "ema_elements": 14_607_260_128, "ae_tensors": 244, "ae_elements": 83_819_683}
    convert_checkpoint(str(tmp_path / "release"), str(tmp_path / "out"), dry_run=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_full_size_release_converts_within_bounded_memory(tmp_path):
    """Converts the sparse 29 GB synthetic release in a child process and checks its peak resident memory."""
    write_synthetic_release(str(tmp_path / "release"))
    command = [sys.executable, "-m", "modeling_unimedvl.convert", str(tmp_path / "release"), str(tmp_path / "out")]
    subprocess.run(command, check=True, timeout=3600)
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"peak RSS of the conversion: {peak_gib:.2f} GiB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) == 1223 + 244
    assert peak_gib < 8.0
