"""Argument types and checks shared by the `unimedvl` sub-commands (and `unimedvl eval`): one-line usage errors,
validated devices, positive counts, finite numbers, seeds, output image paths, and the `--version` report."""

import argparse
import math
import os
import platform
from importlib import metadata

import torch


KEY_DISTRIBUTIONS = (
    "torch",
    "transformers",
    "diffusers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "huggingface-hub",
    "safetensors",
    "tokenizers",
    "bitsandbytes",
    "pillow",
    "numpy",
    "pydicom",
    "nibabel",
)
"""Distributions whose versions `unimedvl --version` prints (read from their metadata, nothing is imported)."""

DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
MAX_SEED = 2**64 - 1
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""`--dtype` names (besides `auto`) and the torch dtypes they select, the same for every sub-command."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (`unimedvl: error: …`) with exit status 2."""

    def error(self, message):
        self.exit(2, f"unimedvl: error: {message} (see `{self.prog} --help`)\n")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, limits, batch sizes, token budgets)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def finite_float(text: str) -> float:
    """A finite number (no nan / inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def seed_value(text: str) -> int:
    """A random seed in 0 … 2**64-1 (what `torch.Generator.manual_seed` accepts without wrapping)."""
    value = _integer(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**64-1, got {value}")
    return value


def device_name(text: str) -> str:
    """`auto` or a torch device string of a supported type (`cpu`, `cuda`, `cuda:1`, `mps`, `xpu`)."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"invalid device {text!r}: use cpu, cuda, cuda:N, mps or auto") from None
    if device.type not in DEVICE_TYPES:
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}: use cpu, cuda, cuda:N, mps or auto")
    return text


def check_device_available(text: str) -> None:
    """Raises `ValueError` when the device `text` (validated by `device_name`) does not exist on this machine."""
    if text in ("auto", "cpu"):
        return
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: CUDA is not available on this machine (no GPU or a CPU-only torch); use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0 … cuda:{torch.cuda.device_count() - 1}).")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {text}: Apple MPS is not available on this machine; use --device cpu.")
    elif device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ValueError(f"--device {text}: no Intel XPU is available on this machine; use --device cpu.")


def add_model_path_option(parser) -> None:
    """`--model PATH`, the same for every sub-command (`eval` included); resolved by `resolve_model_path`."""
    parser.add_argument(
        "--model", help="converted UniMedVL folder or Hub id (default: $UNIMEDVL_MODEL, else the shipped UniMedVL-Tiny)"
    )


def resolve_model_path(path: str | None) -> str:
    """`--model`, else $UNIMEDVL_MODEL, else the shipped UniMedVL-Tiny (`modeling_unimedvl.resolve_model_path`).

    Raises:
        ValueError: no model given and the default is missing, or a local path (with a separator) that is no folder.
    """
    from modeling_unimedvl import default_model

    try:
        resolved = default_model.resolve_model_path(path)
    except FileNotFoundError as error:
        raise ValueError(f"no model given and {error}") from None
    if os.path.sep in resolved and not os.path.isdir(resolved):
        raise ValueError(f"{resolved}: no such model folder.")
    return resolved


def output_image_path(text: str) -> str:
    """An image path whose suffix names a format PIL writes and whose folder exists (checked before any work)."""
    from PIL import Image

    extension = os.path.splitext(text)[1].lower()
    image_format = Image.registered_extensions().get(extension)
    if image_format is None or image_format not in Image.SAVE:
        raise argparse.ArgumentTypeError(f"{text}: unknown image format {extension or '(no suffix)'!r}; use .png, .jpg or .tif")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{text}: the folder {folder} does not exist")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder; give an image file name")
    return text


class VersionAction(argparse.Action):
    """`--version`: prints `version_report()` verbatim (one library per line) and exits with status 0."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_report())
        parser.exit()


def distribution_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def version_report() -> str:
    """`unimedvl X.Y.Z` followed by one `name version` line per key library, Python and the CUDA build of torch."""
    lines = [f"unimedvl {distribution_version('unimedvl')}"]
    lines += [f"{name} {distribution_version(name)}" for name in KEY_DISTRIBUTIONS]
    lines.append(f"python {platform.python_version()}")
    lines.append(f"torch CUDA build {torch.version.cuda or 'none (CPU-only torch)'}")
    return "\n".join(lines)


__all__ = [
    "OneLineArgumentParser",
    "TORCH_DTYPES",
    "VersionAction",
    "add_model_path_option",
    "check_device_available",
    "device_name",
    "finite_float",
    "non_negative_float",
    "output_image_path",
    "positive_int",
    "resolve_model_path",
    "seed_value",
    "version_report",
]
