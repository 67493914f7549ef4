"""Bad input to the converter (`unimedvl-convert` / `modeling_unimedvl.convert.main`), one row per case: a damaged
release folder or output path → the one-line error naming the file / key / size, exit status 1, nothing written.
Faults: a conversion killed mid-write leaves the output as it was and the re-run ends with the same weights."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fault_injection import kill_after_calls, run_killed
from input_files import edit_json
from modeling_unimedvl.convert import main


LATENT_TABLE = "latent_pos_embed.pos_embed"
VIT_PATCH = "vit_model.vision_model.embeddings.patch_embedding.weight"
VIT_POSITIONS = "vit_model.vision_model.embeddings.position_embedding.weight"
LM_HEAD = "language_model.lm_head.weight"


def edit_tensors(name):
    """An edit of the release's `name` (ema/ae safetensors) through a function on its `{key: tensor}` dict."""

    def decorate(function):
        def edit(folder):
            path = folder / name
            tensors = load_file(str(path))
            function(tensors)
            save_file(tensors, str(path))

        return edit

    return decorate


def edit_header(name, function):
    """An edit of the JSON header of `name`, keeping the data bytes (offsets are relative to the data start)."""

    def edit(folder):
        path = folder / name
        raw = path.read_bytes()
        length = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + length])
        header = function(header)
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[8 + length :])

    return edit


def edit_entry(key, **changes):
    def function(header):
        header[key].update(changes)
        for field, value in changes.items():
            if value is None:
                del header[key][field]
        return header

    return function


def update_json(name, **changes):
    """An edit of the release's JSON file `name` setting its top-level `changes`."""
    return edit_json(name, lambda data: data.update(changes))


def write_text(name, text):
    return lambda folder: (folder / name).write_text(text)


@edit_tensors("ema.safetensors")
def nan_latent_table(tensors):
    tensors[LATENT_TABLE][3, 5] = float("nan")


@edit_tensors("ema.safetensors")
def inf_in_lm_head(tensors):
    tensors[LM_HEAD][7, 1] = float("inf")


@edit_tensors("ae.safetensors")
def nan_in_vae(tensors):
    tensors["decoder.conv_in.weight"][0, 0, 0, 0] = float("nan")


@edit_tensors("ema.safetensors")
def empty_latent_table(tensors):
    tensors[LATENT_TABLE] = torch.zeros(0, tensors[LATENT_TABLE].shape[1])


@edit_tensors("ema.safetensors")
def non_square_latent_table(tensors):
    tensors[LATENT_TABLE] = tensors[LATENT_TABLE][:15]


@edit_tensors("ema.safetensors")
def no_vit_patch_embedding(tensors):
    del tensors[VIT_PATCH]


@edit_tensors("ema.safetensors")
def no_vit_position_table(tensors):
    del tensors[VIT_POSITIONS]


@edit_tensors("ae.safetensors")
def no_vae_upsampler_bias(tensors):
    del tensors["decoder.up.1.upsample.conv.bias"]


@edit_tensors("ae.safetensors")
def no_vae_conv_in(tensors):
    del tensors["decoder.conv_in.weight"]


def truncate(name, cut):
    def edit(folder):
        path = folder / name
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size - cut)

    return edit


def output_is_a_file(folder):
    (folder.parent / "out").write_text("not a folder")


def output_not_empty(folder):
    (folder.parent / "out").mkdir()
    (folder.parent / "out" / "model.safetensors").write_bytes(b"an earlier conversion")


def parent_is_a_file(folder):
    (folder.parent / "blocker").write_text("a file")


# id, edit of the release copy (or of the place where the output goes), output (relative to tmp_path or absolute),
# extra arguments, expected message (regex), exit status
CASES = [
    ("header-json-list", edit_header("ema.safetensors", lambda header: [header]), "out", [],
     r"ema\.safetensors has a corrupt safetensors header: a JSON list, not an object", 1),
    ("header-not-json", lambda folder: (folder / "ema.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not js}"),
     "out", [], r"ema\.safetensors has a corrupt safetensors header \(Expecting property name", 1),
    ("header-length-beyond-file", lambda folder: (folder / "ae.safetensors").write_bytes((10**6).to_bytes(8, "little") + b"{}"),
     "out", [], r"ae\.safetensors is truncated or not a safetensors file: the header claims 1000000 bytes, the file has 10", 1),
    ("data-offsets-missing", edit_header("ema.safetensors", edit_entry(LM_HEAD, data_offsets=None)), "out", [],
     rf"tensor {LM_HEAD} has no data_offsets", 1),
    ("data-offsets-string", edit_header("ema.safetensors", edit_entry(LM_HEAD, data_offsets="0,10")), "out", [],
     rf"tensor {LM_HEAD} has data_offsets '0,10'; expected \[begin, end\]", 1),
    ("data-offsets-reversed", edit_header("ema.safetensors", edit_entry(LM_HEAD, data_offsets=[40, 8])), "out", [],
     rf"tensor {LM_HEAD} has data_offsets \[40, 8\]", 1),
    ("shape-string-size", edit_header("ema.safetensors", edit_entry(LM_HEAD, shape=["640", 64])), "out", [],
     rf"tensor {LM_HEAD} has shape \['640', 64\]; sizes must be non-negative integers", 1),
    ("shape-bytes-mismatch", edit_header("ema.safetensors", edit_entry(LM_HEAD, shape=[640, 63])), "out", [],
     rf"tensor {LM_HEAD} of shape \[640, 63\] and dtype F32 needs 161280 bytes, its data_offsets give 163840", 1),
    ("entry-not-an-object", edit_header("ema.safetensors", lambda header: dict(header, **{LM_HEAD: 5})), "out", [],
     rf"tensor {LM_HEAD} has a int entry instead of", 1),
    ("unsupported-dtype", edit_header("ema.safetensors", edit_entry(LM_HEAD, dtype="F8_E9")), "out", [],
     rf"tensor {LM_HEAD} has unsupported dtype 'F8_E9'", 1),
    ("truncated-ema", truncate("ema.safetensors", 1000), "out", [],
     r"ema\.safetensors is truncated: its header needs \d+ bytes but the file has \d+", 1),
    ("zero-size-position-table", empty_latent_table, "out", [],
     rf"{LATENT_TABLE} has 0 rows; a position table has side² rows", 1),
    ("non-square-position-table", non_square_latent_table, "out", [], rf"{LATENT_TABLE} has 15 rows", 1),
    ("nan-position-table", nan_latent_table, "out", [],
     rf"tensor {LATENT_TABLE} holds 1 NaN/infinite values", 1),
    ("inf-in-lm-head", inf_in_lm_head, "out", [], rf"ema\.safetensors: tensor {LM_HEAD} holds 1 NaN/infinite values", 1),
    ("nan-in-vae", nan_in_vae, "out", [], r"ae\.safetensors: tensor decoder\.conv_in\.weight holds 1 NaN/infinite", 1),
    ("missing-vit-patch-embedding", no_vit_patch_embedding, "out", [],
     r"1 missing keys: model\.vision_tower\.embeddings\.patch_embedding\.weight", 1),
    ("missing-vit-position-table", no_vit_position_table, "out", [], rf"ema\.safetensors has no {VIT_POSITIONS}", 1),
    ("missing-vae-upsampler", no_vae_upsampler_bias, "out", [],
     r"ae\.safetensors has no VAE tensor decoder\.up\.1\.upsample\.conv\.bias", 1),
    ("missing-vae-conv-in", no_vae_conv_in, "out", [], r"ae\.safetensors .*1 missing keys: model\.vae\.decoder\.conv_in\.weight", 1),
    ("llm-config-json-list", write_text("llm_config.json", "[1, 2]"), "out", [],
     r"llm_config\.json must hold a JSON object, not a list", 1),
    ("llm-config-not-json", write_text("llm_config.json", "{"), "out", [], r"llm_config\.json is not valid JSON", 1),
    ("llm-config-string-size", update_json("llm_config.json", hidden_size="64"), "out", [],
     r"llm_config\.json: hidden_size must be an integer >= 1, got '64'", 1),
    ("llm-config-zero-size", update_json("llm_config.json", num_attention_heads=0), "out", [],
     r"llm_config\.json: num_attention_heads must be an integer >= 1, got 0", 1),
    ("vit-config-one-layer", update_json("vit_config.json", num_hidden_layers=1), "out", [],
     r"vit_config\.json: num_hidden_layers must be an integer >= 2, got 1", 1),
    ("vit-config-no-patch-size", edit_json("vit_config.json", lambda config: config.pop("patch_size")), "out", [],
     r"vit_config\.json has no patch_size", 1),
    ("ae-params-string-channels", update_json("ae_params.json", ch="32"), "out", [],
     r"ae_params\.json: ch must be an integer >= 1, got '32'", 1),
    ("tokenizer-corrupt", write_text("tokenizer.json", '{"version": '), "out", [],
     r"tokenizer\.json is not valid JSON \(Expecting value", 1),
    ("tokenizer-empty-object", write_text("tokenizer.json", "{}"), "out", [],
     r"tokenizer\.json is not a tokenizers file: it has no \"model\" section", 1),
    ("missing-llm-config", lambda folder: (folder / "llm_config.json").unlink(), "out", [], r"missing llm_config\.json", 1),
    ("output-is-input", None, "original", [], r"is \(or contains\) the release folder", 1),
    ("output-contains-input", None, ".", ["--overwrite"], r"is \(or contains\) the release folder", 1),
    ("output-is-a-file", output_is_a_file, "out", [], r"The output path .*out is a file; give a folder path", 1),
    ("output-not-empty", output_not_empty, "out", [], r"The output folder .*out is not empty; pass --overwrite", 1),
    ("output-parent-is-a-file", parent_is_a_file, "blocker/out", [], r"Cannot write .*blocker/out: .*blocker is not a writable folder", 1),
    ("output-unwritable", None, "/sys/unimedvl-convert-test", [], r"Cannot write /sys/unimedvl-convert-test: (Operation not permitted|Read-only file system|/sys is not a writable folder)", 1),
    ("bad-shard-size", None, "out", ["--max-shard-size", "2XB"], r"Cannot parse shard size '2XB'", 1),
]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_release_or_output_gives_a_one_line_error(case, reference_dir, tmp_path, capsys):
    _, edit, output, extra, message, status = case
    release = tmp_path / "original"
    shutil.copytree(reference_dir, release)
    if edit is not None:
        edit(release)
    output_path = output if os.path.isabs(output) else str(tmp_path / output)
    before = sorted(os.listdir(tmp_path))
    snapshot = {name: (release / name).read_bytes() for name in os.listdir(release)}
    assert main([str(release), output_path, "--dtype", "float32", *extra]) == status
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unimedvl-convert: error: "), lines
    assert __import__("re").search(message, lines[0]), lines[0]
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no staging folder left
    assert {name: (release / name).read_bytes() for name in os.listdir(release)} == snapshot  # the release untouched


def test_overwrite_replaces_the_whole_folder_no_earlier_shard_survives(reference_dir, converted_dir, tmp_path, capsys):
    """Defect 1: converting release A to one file, then B to several shards, left A's model.safetensors behind."""
    output = tmp_path / "out"
    shutil.copytree(converted_dir, output)  # an earlier conversion to one file
    assert (output / "model.safetensors").is_file()
    assert main([str(reference_dir), str(output), "--dtype", "float32", "--max-shard-size", "5MB"]) == 1
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert main([str(reference_dir), str(output), "--dtype", "float32", "--max-shard-size", "5MB", "--overwrite"]) == 0
    names = set(os.listdir(output))
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no staging / old folder left
    shards = {name for name in names if name.startswith("model-")}
    converted = {}
    for name in shards:
        converted.update(load_file(str(output / name)))
    expected = load_file(str(converted_dir / "model.safetensors"))
    assert converted.keys() == expected.keys() and all(torch.equal(converted[k], expected[k]) for k in expected)


KILLED_CONVERSION = """
from modeling_unimedvl.convert import main
main([{release!r}, {output!r}, "--dtype", "float32", "--max-shard-size", "5MB"{extra}])
"""


def test_conversion_killed_mid_write_loses_nothing_and_reruns_to_the_same_weights(reference_dir, converted_dir, tmp_path):
    """SIGKILL after the second shard of a conversion that replaces an earlier one: the earlier folder stays intact
    (the new one was only in a staging folder), and the re-run removes the stale staging folder and ends with the
    same weights as an uninterrupted conversion."""
    output = tmp_path / "out"
    shutil.copytree(converted_dir, output)
    earlier = {name: (output / name).read_bytes() for name in os.listdir(output)}
    run_killed(
        kill_after_calls("modeling_unimedvl.convert", "save_file", 2),
        KILLED_CONVERSION.format(release=str(reference_dir), output=str(output), extra=', "--overwrite"'),
    )
    assert {name: (output / name).read_bytes() for name in os.listdir(output)} == earlier
    assert [name for name in os.listdir(tmp_path) if name.startswith(".out.staging-")]  # the killed run's staging
    args = [str(reference_dir), str(output), "--dtype", "float32", "--max-shard-size", "5MB", "--overwrite"]
    assert main(args) == 0
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # the stale staging folder was removed
    converted = {}
    for name in os.listdir(output):
        if name.startswith("model-"):
            converted.update(load_file(str(output / name)))
    expected = load_file(str(converted_dir / "model.safetensors"))
    assert converted.keys() == expected.keys() and all(torch.equal(converted[k], expected[k]) for k in expected)
