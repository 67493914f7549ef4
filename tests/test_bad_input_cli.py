"""Bad input to the `unimedvl` command line, one row per case: arguments → exit status and the single
`unimedvl: error: …` line naming the option / file / key / size. Faults: an image write killed mid-way leaves no
partial file and the re-run writes the same image. Also: `--version`, and importing the package prints nothing."""

import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from modeling_unimedvl.logging_filters import OPTIONAL_KERNEL_NOTICES

from fault_injection import kill_mid_write, run_killed
from in_process_cli import run_in_process
from input_files import write_file
from test_bad_input_api import (
    drop_decoder,
    edit_weights,
    nan_float_tiff,
    png_with_header,
    set_image_processor,
    set_text_config,
    truncated_nifti,
)
from test_bad_input_convert import edit_header


def only_bin(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 never unpickled")


DAMAGED_MODELS = {
    "corrupt-header": lambda f: (f / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json......}"),
    "mis-shaped": edit_weights(lambda t: t.__setitem__("lm_head.weight", t["lm_head.weight"][:-1].clone())),
    "config-type": set_text_config("num_hidden_layers", "two"),
    "patch-size-zero": set_image_processor("patch_size", 0),
    "tokenizer-empty": lambda f: (f / "tokenizer.json").write_text("{}"),
    "only-bin": only_bin,
    "nan-lm-head": edit_weights(lambda t: t["lm_head.weight"].__setitem__((1, 1), float("nan"))),
    "no-decoder": edit_weights(drop_decoder),
}


class Inputs:
    """Builds the files a row needs under `tmp_path` (lazily, by attribute)."""

    def __init__(self, tmp_path, converted_dir, reference_dir, reference_image):
        self.tmp, self.converted, self.reference, self.reference_image = tmp_path, converted_dir, reference_dir, reference_image

    @property
    def image(self):
        path = self.tmp / "input.png"
        if not path.exists():
            self.reference_image.save(path)
        return path

    def model(self, damage):
        folder = self.tmp / damage
        if not folder.exists():
            shutil.copytree(self.converted, folder)
            DAMAGED_MODELS[damage](folder)
        return folder

    def file(self, name, data):
        return write_file(self.tmp / name, data)

    def folder(self, name):
        (self.tmp / name).mkdir()
        return self.tmp / name

    def release(self, edit):
        folder = self.tmp / "release"
        shutil.copytree(self.reference, folder)
        edit(folder)
        return folder


# id, arguments (a function of Inputs), exit status, expected message (regex)
CASES = [
    ("device-unknown", lambda i: ["ask", i.image, "q", "--device", "foo"], 2, r"argument --device: invalid device 'foo'"),
    ("device-type-unsupported", lambda i: ["ask", i.image, "q", "--device", "meta"], 2, r"unsupported device 'meta'"),
    ("device-not-on-this-machine", lambda i: ["ask", i.image, "q", "--model", i.converted, "--device", "cuda:99"], 1,
     r"--device cuda:99: (CUDA is not available on this machine|this machine has \d+ CUDA device)"),
    ("guidance-inf", lambda i: ["generate", "p", "-o", i.tmp / "o.png", "--guidance-scale", "inf"], 2,
     r"argument --guidance-scale: must be a finite number, got inf"),
    ("image-guidance-nan", lambda i: ["edit", i.image, "e", "-o", i.tmp / "o.png", "--image-guidance-scale", "nan"], 2,
     r"argument --image-guidance-scale: must be a finite number, got nan"),
    ("seed-negative", lambda i: ["ask", i.image, "q", "--seed", "-1"], 2, r"argument --seed: must be between 0 and 2\*\*64-1, got -1"),
    ("seed-too-large", lambda i: ["ask", i.image, "q", "--seed", str(2**64)], 2, r"argument --seed: must be between 0 and 2\*\*64-1"),
    ("max-new-tokens-zero", lambda i: ["ask", i.image, "q", "--max-new-tokens", "0"], 2,
     r"argument --max-new-tokens: must be a positive integer, got 0"),
    ("temperature-negative", lambda i: ["ask", i.image, "q", "--temperature", "-0.5"], 2, r"argument --temperature: must be >= 0"),
    ("output-unknown-format", lambda i: ["generate", "p", "-o", i.tmp / "out.xyz"], 2, r"out\.xyz: unknown image format '\.xyz'"),
    ("output-folder-missing", lambda i: ["generate", "p", "-o", i.tmp / "nowhere" / "o.png"], 2, r"nowhere does not exist"),
    ("output-is-a-folder", lambda i: ["generate", "p", "-o", i.folder("dir.png")], 2, r"dir\.png is a folder"),
    ("eval-limit-negative", lambda i: ["eval", "vqa", "--limit", "-1"], 2, r"argument --limit: must be a positive integer, got -1"),
    ("eval-batch-size-zero", lambda i: ["eval", "vqa", "--batch-size", "0"], 2, r"argument --batch-size: must be a positive integer, got 0"),
    ("eval-device-unknown", lambda i: ["eval", "vqa", "--device", "foo"], 2, r"argument --device: invalid device 'foo'"),
    ("eval-cfg-inf", lambda i: ["eval", "generation", "--cfg-text-scale", "inf"], 2, r"argument --cfg-text-scale: must be a finite number"),
    ("eval-positional-model-refused", lambda i: ["eval", "vqa", i.converted], 2, r"unrecognized arguments: .*converted"),
    ("eval-model-missing", lambda i: ["eval", "vqa", "--model", i.tmp / "absent", "--data", "d.json", "--output-dir", i.tmp / "o"], 1,
     r"absent: no such model folder"),
    ("eval-prediction-without-id", lambda i: ["eval", "vqa", "--predictions", i.file("p.jsonl", '{"prediction": "yes"}\n')], 1,
     r"p\.jsonl:1: the prediction row has no \"id\""),
    ("model-corrupt-safetensors", lambda i: ["ask", i.image, "q", "--model", i.model("corrupt-header")], 1,
     r"corrupt-header/model\.safetensors has a corrupt safetensors header"),
    ("model-mis-shaped-tensor", lambda i: ["ask", i.image, "q", "--model", i.model("mis-shaped")], 1,
     r"lm_head\.weight: \[639, 64\] instead of \[640, 64\]"),
    ("model-config-type-error", lambda i: ["ask", i.image, "q", "--model", i.model("config-type")], 1,
     r"config-type/config\.json is not a valid UniMedVLConfig: .*'num_hidden_layers' expected int, got str"),
    ("processor-patch-size-zero", lambda i: ["ask", i.image, "q", "--model", i.model("patch-size-zero")], 1,
     r"processor_config\.json patch_size must be a positive integer, got 0"),
    ("tokenizer-empty-object", lambda i: ["ask", i.image, "q", "--model", i.model("tokenizer-empty")], 1,
     r"tokenizer-empty/tokenizer\.json is not a tokenizers file"),
    ("model-only-bin", lambda i: ["ask", i.image, "q", "--model", i.model("only-bin")], 1,
     r"holds only pickled weights \(pytorch_model\.bin\)"),
    ("model-nan-lm-head", lambda i: ["ask", i.image, "q", "--model", i.model("nan-lm-head")], 1,
     r"weight lm_head\.weight in model\.safetensors holds 1 NaN/infinite values"),
    ("model-missing-decoder", lambda i: ["ask", i.image, "q", "--model", i.model("no-decoder")], 1,
     r"model\.safetensors lacks 56 of the 291 weights"),
    ("model-path-is-a-file", lambda i: ["ask", i.image, "q", "--model", i.image], 1, r"input\.png: no such model folder"),
    ("image-decompression-bomb", lambda i: ["ask", i.file("bomb.png", png_with_header(20_000, 20_000)), "q"], 1,
     r"bomb\.png: refused before decoding"),
    ("image-truncated-nii-gz", lambda i: ["report", truncated_nifti(i.tmp)], 1, r"cut\.nii\.gz: the NIfTI data is truncated or corrupt"),
    ("image-eps-named-png", lambda i: ["ask", i.file("x.png", "%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n"), "q"], 1,
     r"x\.png: not a readable image file: its content is none of PNG"),
    ("image-nan", lambda i: ["ask", nan_float_tiff(i.tmp), "q"], 1, r"nan\.tif: the image holds 1 NaN or infinite values"),
    ("window-width-zero", lambda i: ["ask", get_testdata_file("CT_small.dcm", download=False), "q", "--window=40,0"], 1,
     r"CT_small\.dcm: the window width must be at least 1, got 0"),
    ("window-unknown", lambda i: ["ask", get_testdata_file("CT_small.dcm", download=False), "q", "--window", "lungs"], 1,
     r"CT_small\.dcm: unknown window 'lungs'"),
    ("convert-header-json-list", lambda i: ["convert", i.release(edit_header("ema.safetensors", lambda h: [h])), i.tmp / "out"], 1,
     r"release/ema\.safetensors has a corrupt safetensors header: a JSON list, not an object"),
    ("convert-output-is-input", lambda i: ["convert", i.release(lambda f: None), i.tmp / "release"], 1,
     r"is \(or contains\) the release folder"),
]


@pytest.fixture()
def inputs(tmp_path, converted_dir, reference_dir, reference_image):
    return Inputs(tmp_path, converted_dir, reference_dir, reference_image)


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_error_line_and_a_status(case, inputs):
    _, build, status, message = case
    code, _, stderr = run_in_process(build(inputs))
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("unimedvl: error: ")]
    assert code == status and len(errors) == 1, stderr
    assert re.search(message, errors[0]), errors[0]
    assert "Traceback" not in stderr


def test_load_in_4bit_on_this_cpu(inputs):
    """bitsandbytes' CPU NF4 kernel (CPUs with AVX512-BF16) cannot run the tiny model's 32-wide layers: a one-line
    error naming a layer instead of "shape '[96, 1]' is invalid"; on other CPUs the command runs."""
    from bitsandbytes.functional import has_avx512bf16

    code, stdout, stderr = run_in_process(["ask", inputs.image, "q", "--model", inputs.converted, "--load-in-4bit", "--max-new-tokens", "1"])
    if has_avx512bf16():
        assert code == 1, stderr
        assert re.search(r"unimedvl: error: --load-in-4bit cannot run this model on the CPU: .*model\.vision_tower\.encoder\.layers\.0\.\S+ \(32→\d+\) is not", stderr)
    else:
        assert code == 0 and stdout.strip(), stderr


def test_version_lists_the_package_and_key_libraries():
    from importlib import metadata

    code, stdout, _ = run_in_process(["--version"])
    lines = stdout.splitlines()
    assert code == 0 and lines[0] == f"unimedvl {metadata.version('unimedvl')}"
    for name in ("transformers", "diffusers", "trl", "peft", "accelerate", "datasets", "huggingface-hub", "torch", "bitsandbytes"):
        assert f"{name} {metadata.version(name)}" in lines, name


def test_importing_the_packages_prints_nothing():
    env = {key: value for key, value in os.environ.items() if key not in ("TRANSFORMERS_VERBOSITY",)}
    result = subprocess.run(
        [sys.executable, "-c", "import modeling_unimedvl, unimedvl_pipelines, unimedvl_pipelines.cli, unimedvl_training"],
        capture_output=True, text=True, env=dict(env, HF_HUB_OFFLINE="1"), timeout=300,
    )
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stderr



@pytest.mark.parametrize("logger_name, prefix", OPTIONAL_KERNEL_NOTICES)
def test_only_the_optional_kernel_notices_are_dropped(logger_name, prefix):
    """Each dependency's notice is dropped from its logger, and only that notice (whatever the machine's CPU)."""
    logger = logging.getLogger(logger_name)

    def passes(message: str) -> bool:
        return all(item.filter(logging.LogRecord(logger_name, logging.WARNING, __file__, 1, message, None, None)) for item in logger.filters)

    assert not passes(prefix + ": No module named 'kernels'")
    assert passes("Another warning of " + logger_name)
    assert passes(prefix[:-3])

KILLED_GENERATE = """
from unimedvl_pipelines.cli import main
main(["generate", "A chest X-ray.", "-o", {output!r}, "--steps", "3", "--height", "32", "--width", "48", "--seed", "5",
      "--model", {model!r}])
"""


def test_generated_image_killed_mid_write_is_never_partial_and_the_rerun_is_identical(converted_dir, tmp_path):
    output = tmp_path / "gen.png"
    earlier = Image.new("RGB", (8, 8), (1, 2, 3))
    earlier.save(output)
    run_killed(kill_mid_write("gen.png"), KILLED_GENERATE.format(output=str(output), model=str(converted_dir)))
    assert np.array_equal(np.asarray(Image.open(output)), np.asarray(earlier))  # the earlier image, whole
    code, stdout, stderr = run_in_process(
        ["generate", "A chest X-ray.", "-o", output, "--steps", "3", "--height", "32", "--width", "48", "--seed", "5",
         "--model", converted_dir]
    )
    assert code == 0, stderr
    from unimedvl_pipelines import UniMedVLPipeline

    pipe = UniMedVLPipeline.from_pretrained(converted_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("A chest X-ray.", num_inference_steps=3, height=32, width=48, generator=torch.Generator().manual_seed(5)).images[0]
    assert np.array_equal(np.asarray(Image.open(output)), np.asarray(expected))
    leftovers = [name for name in os.listdir(tmp_path) if name != "gen.png"]
    assert all(name.startswith(".gen.png.tmp-") for name in leftovers)  # only the killed run's temporary file
