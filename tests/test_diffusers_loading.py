"""A saved pipeline folder is a diffusers folder: `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`
loads it without this package (the pipeline and component code travel with it), and the package's own classes load
it without running any of that code."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from unimedvl_pipelines import UniMedVLImg2ImgPipeline, UniMedVLPipeline


PROMPT = "A chest X-ray with cardiomegaly."
INSTRUCTION = "Increase the resolution of this image."
KWARGS = dict(height=32, width=32, num_inference_steps=3)


@pytest.fixture(scope="module")
def saved(converted_dir, tmp_path_factory):
    """The converted reference model saved as a text-to-image and as an image-to-image diffusers folder."""
    root = tmp_path_factory.mktemp("diffusers_layout")
    pipe = UniMedVLPipeline.from_pretrained(converted_dir, dtype=torch.float32)
    pipe.save_pretrained(root / "t2i")
    UniMedVLImg2ImgPipeline.from_pipe(pipe).save_pretrained(root / "i2i")
    return root


def run_without_the_package(script: str, tmp_path) -> str:
    """Runs `script` in a fresh process in which none of this project's packages can be imported."""
    blocker = "import sys\nfor name in ('modeling_unimedvl', 'unimedvl_pipelines', 'unimedvl_training'):\n    sys.modules[name] = None\n"
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", blocker + textwrap.dedent(script)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_folder_names_its_code(saved):
    for layout, class_name in (("t2i", "UniMedVLPipeline"), ("i2i", "UniMedVLImg2ImgPipeline")):
        index = json.loads((saved / layout / "model_index.json").read_text())
        assert index["_class_name"] == ["pipeline_unimedvl", class_name]
        assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
        for name, (module, _) in (("model", index["model"]), ("processor", index["processor"])):
            assert (saved / layout / name / f"{module}.py").is_file()
        assert (saved / layout / "pipeline_unimedvl.py").is_file()
        assert json.loads((saved / layout / "model" / "config.json").read_text())["auto_map"]


def test_diffusion_pipeline_loads_the_folder_without_the_package(saved, reference_image, tmp_path):
    reference_image.save(tmp_path / "input.png")
    t2i = UniMedVLPipeline.from_pretrained(saved / "t2i")
    i2i = UniMedVLImg2ImgPipeline.from_pretrained(saved / "i2i")
    expected_t2i = np.asarray(t2i(PROMPT, generator=torch.Generator().manual_seed(0), **KWARGS).images[0])
    expected_i2i = np.asarray(i2i(INSTRUCTION, image=reference_image, generator=torch.Generator().manual_seed(1), **KWARGS).images[0])
    np.save(tmp_path / "t2i.npy", expected_t2i)
    np.save(tmp_path / "i2i.npy", expected_i2i)
    output = run_without_the_package(
        f"""
        import numpy as np, torch
        from diffusers import DiffusionPipeline
        from PIL import Image
        t2i = DiffusionPipeline.from_pretrained({str(saved / "t2i")!r}, trust_remote_code=True)
        i2i = DiffusionPipeline.from_pretrained({str(saved / "i2i")!r}, trust_remote_code=True)
        print("CLASSES", type(t2i).__name__, type(i2i).__name__, type(t2i.model).__module__.split(".")[0])
        image = t2i({PROMPT!r}, generator=torch.Generator().manual_seed(0), **{KWARGS!r}).images[0]
        assert isinstance(image, Image.Image)
        edited = i2i({INSTRUCTION!r}, image=Image.open({str(tmp_path / "input.png")!r}),
                     generator=torch.Generator().manual_seed(1), **{KWARGS!r}).images[0]
        print("T2I_EQUAL", np.array_equal(np.asarray(image), np.load({str(tmp_path / "t2i.npy")!r})))
        print("I2I_EQUAL", np.array_equal(np.asarray(edited), np.load({str(tmp_path / "i2i.npy")!r})))
        """,
        tmp_path,
    )
    assert "CLASSES UniMedVLPipeline UniMedVLImg2ImgPipeline diffusers_modules" in output
    assert "T2I_EQUAL True" in output and "I2I_EQUAL True" in output


def test_with_the_package_the_same_call_runs_the_folder_code_only_when_trusted(saved):
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(saved / "t2i")
    pipe = DiffusionPipeline.from_pretrained(saved / "t2i", trust_remote_code=True)
    assert type(pipe).__name__ == "UniMedVLPipeline"
    own = UniMedVLPipeline.from_pretrained(saved / "t2i")
    assert type(own) is UniMedVLPipeline and type(own.model).__module__ == "modeling_unimedvl.modeling_unimedvl"


def test_saving_replaces_a_folder_whole(saved, tmp_path):
    target = tmp_path / "pipe"
    target.mkdir()
    (target / "stale.safetensors").write_bytes(b"old")
    pipe = UniMedVLPipeline.from_pretrained(saved / "t2i")
    with pytest.raises(FileExistsError):
        pipe.save_pretrained(target, overwrite=False)
    pipe.save_pretrained(target)
    assert not (target / "stale.safetensors").exists() and (target / "model_index.json").is_file()
