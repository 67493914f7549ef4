"""Shared fixtures: offline Hugging Face libraries, the converted reference checkpoint, tiny random models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_DIR = pathlib.Path(
    os.environ.get("UNIMEDVL_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference" / "tiny_official")
)
DATA_DIR = pathlib.Path(os.environ.get("UNIMEDVL_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")
    parser.addoption("--run-gpu", action="store_true", help="run tests marked gpu (needs CUDA)")
    parser.addoption("--run-browser", action="store_true", help="run tests marked browser (needs chromium + playwright)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(pytest.mark.skip(reason="slow: opt in with --run-slow"))
        if "gpu" in item.keywords and not config.getoption("--run-gpu"):
            item.add_marker(pytest.mark.skip(reason="gpu: opt in with --run-gpu on a CUDA machine"))
        if "browser" in item.keywords and not config.getoption("--run-browser"):
            item.add_marker(pytest.mark.skip(reason="browser: opt in with --run-browser (apt chromium, pip playwright)"))


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
    if not (REFERENCE_DIR / "ema.safetensors").is_file():
        pytest.fail(f"Reference checkpoint not found at {REFERENCE_DIR}; set UNIMEDVL_REFERENCE_DIR.")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    if not DATA_DIR.is_dir():
        pytest.fail(f"Shared data not found at {DATA_DIR}; set UNIMEDVL_DATA_DIR.")
    return DATA_DIR


@pytest.fixture(scope="session")
def converted_dir(reference_dir, tmp_path_factory) -> pathlib.Path:
    """The reference checkpoint converted to this package's layout in float32."""
    from modeling_unimedvl.convert import convert_checkpoint

    output = tmp_path_factory.mktemp("converted") / "tiny"
    convert_checkpoint(str(reference_dir), str(output), dtype=torch.float32)
    return output


@pytest.fixture(scope="session")
def tiny_model(converted_dir):
    from modeling_unimedvl import UniMedVLForConditionalGeneration

    return UniMedVLForConditionalGeneration.from_pretrained(converted_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_processor(converted_dir):
    from modeling_unimedvl import UniMedVLProcessor

    return UniMedVLProcessor.from_pretrained(converted_dir)


@pytest.fixture(scope="session")
def reference_image(reference_dir):
    from PIL import Image

    return Image.open(reference_dir / "input.png").convert("RGB")
