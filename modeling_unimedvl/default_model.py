"""The default model shipped inside this package: UniMedVL-Tiny (`modeling_unimedvl/unimedvl_tiny/`).

UniMedVL-Tiny is the UniMedVL architecture at a few million parameters, trained from scratch by
`python -m unimedvl_training.build_unimedvl_tiny` (see `model_cards/UniMedVL-Tiny.md`). It makes the quickstart, demo
and examples run offline; it is not a useful medical model.
"""

import os


DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "unimedvl_tiny")
"""Folder of the shipped UniMedVL-Tiny (config, `model.safetensors`, tokenizer, processor, code files)."""

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json")


def default_model_path() -> str:
    """Path (str) of the shipped UniMedVL-Tiny folder, loadable with `from_pretrained`.

    Raises:
        FileNotFoundError: if the folder or its weights are missing (e.g. a source checkout without the model files);
            rebuild it with `python -m unimedvl_training.build_unimedvl_tiny` or reinstall the package.
    """
    missing = [name for name in _REQUIRED_FILES if not os.path.isfile(os.path.join(DEFAULT_MODEL_DIR, name))]
    if missing:
        raise FileNotFoundError(
            f"The default model UniMedVL-Tiny is missing from {DEFAULT_MODEL_DIR} (no {', '.join(missing)}). Reinstall "
            "unimedvl, or rebuild it with `python -m unimedvl_training.build_unimedvl_tiny --data ../shared/data "
            "--output outputs/unimedvl_tiny` and copy `outputs/unimedvl_tiny/final` there; or pass the path of a "
            "converted UniMedVL checkpoint explicitly."
        )
    return DEFAULT_MODEL_DIR


def resolve_model_path(path: str | None = None) -> str:
    """The model every entry point uses: `path` if given, else the environment variable UNIMEDVL_MODEL, else the
    shipped UniMedVL-Tiny (`default_model_path()`, which raises FileNotFoundError when it is missing)."""
    return path or os.environ.get("UNIMEDVL_MODEL") or default_model_path()


__all__ = ["DEFAULT_MODEL_DIR", "default_model_path", "resolve_model_path"]
