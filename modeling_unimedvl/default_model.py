"""The default model shipped inside this package: UniMedVL-Tiny (`modeling_unimedvl/unimedvl_tiny/`).

UniMedVL-Tiny is the UniMedVL architecture at a few million parameters, trained from scratch by
`python -m unimedvl_training.build_unimedvl_tiny` (see `model_cards/UniMedVL-Tiny.md`). It makes the quickstart, demo
and examples run offline; it is not a useful medical model.
"""

import os


DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "unimedvl_tiny")
"""Folder of the shipped UniMedVL-Tiny (config, `model.safetensors`, tokenizer, processor, code files)."""
DEFAULT_MODEL_NAME = "UniMedVL-Tiny"
DEFAULT_MODEL_NATURE = (
    "a tiny demonstration model ({parameters} parameters) trained from scratch on about 2,000 CT and MR images "
    "(MedPix 2.0 and VQA-RAD training splits) to name the modality, body region and plane of a CT / MR image, answer "
    "simple questions, give a one-line caption as its report and draw {size} × {size} px images. Its answers are often "
    "wrong (see its model card); it is not a medical device."
)
"""What UniMedVL-Tiny is, in words for the people who meet it (quickstart, demo); `{parameters}`, `{size}` filled in."""
TINY_TEXT_TO_IMAGE = {
    "num_inference_steps": 25,
    "cfg_text_scale": 5.0,
    "cfg_img_scale": 1.0,
    "cfg_interval": (0.0, 1.0),
    "timestep_shift": 1.0,
}
"""UniMedVL-Tiny's text-to-image sampler settings (quickstart, demo and its evaluation use them). Text guidance chosen
on v7 (the shipped model, 2026-12-07) with 150 MedPix *train* prompts drawn at random (the evaluation's `--split train
--limit 150`; classifier modality / region): 3.0: 88.7 / 71.3 %, 4.0: 91.3 / 75.3 %, 5.0: 92.7 / 76.7 %, 6.0:
93.3 / 75.3 %, 7.0: 93.3 / 75.3 %. Earlier, on v3 (400 train prompts), 3.0 had been best (78.5 / 70.5 %; 5.0:
75.7 / 69.0 %); guidance only on the noisier 60 % of the steps (`cfg_interval` (0.4, 1)) and timestep shift 3 did not
help there. An earlier sweep that favoured 7.0 had read the first 120 train rows, which are all CT prompts."""
TINY_IMAGE_TO_IMAGE = {
    "num_inference_steps": 4,
    "cfg_text_scale": 1.0,
    "cfg_img_scale": 1.0,
    "cfg_interval": (0.0, 1.0),
    "timestep_shift": 3.0,
    "vae_encode": "mean",
}
"""UniMedVL-Tiny's image-to-image (2× super-resolution) sampler settings, chosen on v3 with 200 MedPix *train* images
drawn at random (PSNR / SSIM: 26.61 dB / 0.866 with 4 steps at shift 3; 26.47 / 0.862 at shift 1; 26.61 / 0.865 with 3
steps at shift 2; 26.57 / 0.865 with 5 steps at shift 3; 26.11 / 0.838 with 2 steps; bicubic 25.50 / 0.852): few steps
stay near the mean of what the model expects, which is what PSNR and SSIM reward. Guidance lowers both (on an
intermediate build: SSIM 0.857 without, 0.796 with text and image guidance 1.5)."""

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


def describe_model(path, model) -> tuple[str, str]:
    """`(name, nature)` of a loaded model for people: UniMedVL-Tiny for the shipped folder, else the folder's name and
    its size (entry points show them beside every answer)."""
    parameters = sum(parameter.numel() for parameter in model.parameters())
    count = f"{parameters / 1e9:.1f} B" if parameters >= 1e9 else f"{parameters / 1e6:.1f} M"
    if os.path.abspath(str(path)) == os.path.abspath(DEFAULT_MODEL_DIR):
        size = model.config.max_latent_size * model.config.latent_downsample
        return DEFAULT_MODEL_NAME, DEFAULT_MODEL_NATURE.format(parameters=count, size=size)
    name = os.path.basename(os.path.normpath(str(path))) or str(path)
    return name, f"a UniMedVL model with {count} parameters (from {name}). A research model, not a medical device."


__all__ = [
    "DEFAULT_MODEL_DIR",
    "DEFAULT_MODEL_NAME",
    "TINY_IMAGE_TO_IMAGE",
    "TINY_TEXT_TO_IMAGE",
    "default_model_path",
    "describe_model",
    "resolve_model_path",
]
