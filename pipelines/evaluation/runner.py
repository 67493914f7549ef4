"""Loading a checkpoint folder and running batched, seeded inference for the evaluation tasks."""

import zlib

import torch
from PIL import Image

import modeling_unimedvl

from ..cli_arguments import check_device_available
from ..medical_images import load_medical_image
from ..pipeline_unimedvl import postprocess_images

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """`auto` = CUDA with bfloat16 when available, else CPU with float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        check_device_available(str(device))
    except RuntimeError:
        raise ValueError(f"invalid device {device!r}: use auto, cpu, cuda or cuda:N.") from None
    device = torch.device(device)
    if dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}.")
    return device, _DTYPES[dtype]


def load_checkpoint(path: str, device: str = "auto", dtype: str = "auto"):
    """`(model, processor)` from a converted UniMedVL folder (safetensors), in eval mode on `device`."""
    device, torch_dtype = resolve_device_dtype(device, dtype)
    model = modeling_unimedvl.UniMedVLForConditionalGeneration.from_pretrained(path, dtype=torch_dtype)
    processor = modeling_unimedvl.UniMedVLProcessor.from_pretrained(path)
    return model.to(device).eval(), processor


def run_device_dtype(model, device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a run: those of the given `model`, else those `load_checkpoint` will use."""
    return (model.device, model.dtype) if model is not None else resolve_device_dtype(device, dtype)


def model_for_run(model, processor, pending: list, checkpoint: str, device: str = "auto", dtype: str = "auto"):
    """`(model, processor)`: the given ones, else loaded from `checkpoint` when `pending` work needs a model."""
    if pending and model is None:
        return load_checkpoint(checkpoint, device, dtype)
    return model, processor


def in_batches(items: list, batch_size: int) -> list[list]:
    """`items` cut into consecutive batches of at most `batch_size`."""
    return [items[index : index + batch_size] for index in range(0, len(items), batch_size)]


def item_seed(seed: int, item_id: str, sample: int = 0) -> int:
    """A seed that depends only on the run seed, the item id and the sample index (not on batching or resume)."""
    return (seed * 1_000_003 + zlib.crc32(str(item_id).encode("utf-8")) * 101 + sample) % (2**63 - 1)


def open_rgb(path: str) -> Image.Image:
    """The image file `path` as an RGB PIL image (`load_medical_image`: PNG/JPEG/TIFF as the original reads them,
    DICOM and NIfTI windowed); raises `ImageLoadError` naming the file when it cannot be read."""
    return load_medical_image(path)


@torch.no_grad()
def generate_answers(
    model, processor, images: list[list[Image.Image]], prompts: list[str], max_new_tokens: int
) -> list[str]:
    """Greedy answers for a batch: one list of images and one prompt per item (left-padded by the processor)."""
    inputs = processor(images=images, text=prompts).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [answer.strip() for answer in processor.decode_answers(output[:, inputs["input_ids"].shape[1] :])]


def initial_noise(model, seeds: list[int], height: int, width: int) -> torch.Tensor:
    """Per-item initial flow noise `[batch, h*w, 64]`, each row drawn on the CPU from its own seed."""
    config = model.config
    tokens = (height // config.latent_downsample) * (width // config.latent_downsample)
    rows = [
        torch.randn((1, tokens, config.patch_latent_dim), generator=torch.Generator().manual_seed(seed))
        for seed in seeds
    ]
    return torch.cat(rows)


@torch.no_grad()
def generate_images(
    model, processor, prompts: list[str], seeds: list[int], sampling: dict, conditions: list[Image.Image] | None = None
) -> list[Image.Image]:
    """Images for a batch of prompts (text-to-image) or of prompt + input image (image-to-image).

    `sampling` holds the `generate_image` settings (`height`/`width` for text-to-image, `num_inference_steps`,
    `cfg_*`, `timestep_shift`, `vae_encode`); all conditioning images of one call must have the same size.
    """
    images = [[image] for image in conditions] if conditions is not None else None
    inputs = processor(images=images, text=prompts, generation_mode="image").to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    if conditions is not None:
        inputs["vae_pixel_values"] = [pixels.to(model.device, model.dtype) for pixels in inputs["vae_pixel_values"]]
        height, width = inputs["vae_pixel_values"][0].shape[-2:]
    else:
        height, width = sampling["height"], sampling["width"]
    settings = {key: value for key, value in sampling.items() if key not in ("height", "width")}
    latents = initial_noise(model, seeds, height, width)
    generator = torch.Generator().manual_seed(seeds[0])
    output = model.generate(
        **inputs, generation_mode="image", height=height, width=width, latents=latents, generator=generator, **settings
    )
    return postprocess_images(output.images, "pil")


__all__ = [
    "resolve_device_dtype",
    "load_checkpoint",
    "run_device_dtype",
    "model_for_run",
    "in_batches",
    "item_seed",
    "open_rgb",
    "generate_answers",
    "initial_noise",
    "generate_images",
]
