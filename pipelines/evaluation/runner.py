"""Loading a checkpoint folder and running batched, seeded inference for the evaluation tasks: the set-up every
task's run shares (`start_run`, `model_for_run`), its batches (`progress_batches`, `readable_images`) and the
inference itself (`answer_records` / `generate_answers` for text, `generate_images` for images)."""

import os
import zlib

import torch
from PIL import Image
from tqdm.auto import tqdm

import modeling_unimedvl

from ..cli_arguments import TORCH_DTYPES, check_device_available
from ..medical_images import ImageLoadError, load_medical_image
from ..pipeline_unimedvl import postprocess_images
from .predictions import PredictionStore, open_run
from .records import InputReport


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
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(TORCH_DTYPES)}; got {dtype!r}.")
    return device, TORCH_DTYPES[dtype]


def load_checkpoint(path: str, device: str = "auto", dtype: str = "auto"):
    """`(model, processor)` from a converted UniMedVL folder (safetensors), in eval mode on `device`."""
    device, torch_dtype = resolve_device_dtype(device, dtype)
    model = modeling_unimedvl.UniMedVLForConditionalGeneration.from_pretrained(path, dtype=torch_dtype)
    processor = modeling_unimedvl.UniMedVLProcessor.from_pretrained(path)
    return model.to(device).eval(), processor


def run_device_dtype(model, device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a run: those of the given `model`, else those `load_checkpoint` will use."""
    return (model.device, model.dtype) if model is not None else resolve_device_dtype(device, dtype)


def start_run(
    task: str,
    checkpoint: str,
    data: str,
    output_dir: str,
    fields: dict,
    model=None,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
) -> tuple[dict, PredictionStore]:
    """`(settings, store)` of a new or resumed run of `task` on the evaluation set `data`.

    The settings are `task`, the absolute `checkpoint` and `data` paths, the task's `fields` and the dtype the model
    runs in (that of `model`, else the one `load_checkpoint` will use); `open_run` saves them as `run_config.json` and
    refuses an `output_dir` holding predictions made with other settings unless `overwrite` deletes them.
    """
    _, torch_dtype = run_device_dtype(model, device, dtype)
    settings = {
        "task": task,
        "checkpoint": os.path.abspath(checkpoint),
        "data": os.path.abspath(data),
        **fields,
        "dtype": str(torch_dtype),
    }
    return settings, open_run(output_dir, settings, overwrite)


def model_for_run(model, processor, pending: list, checkpoint: str, device: str = "auto", dtype: str = "auto"):
    """`(model, processor)`: the given ones, else loaded from `checkpoint` when `pending` work needs a model."""
    if pending and model is None:
        return load_checkpoint(checkpoint, device, dtype)
    return model, processor


def kept_predictions(store: PredictionStore, records: list[dict], data_report: InputReport) -> list[dict]:
    """The stored predictions of `records`, in their order (a record skipped for an unreadable image has none); their
    number is recorded as `data_report.rows_kept`."""
    kept = [store.items[record["id"]] for record in records if record["id"] in store]
    data_report.rows_kept = len(kept)
    return kept


def in_batches(items: list, batch_size: int) -> list[list]:
    """`items` cut into consecutive batches of at most `batch_size`."""
    return [items[index : index + batch_size] for index in range(0, len(items), batch_size)]


def progress_batches(items: list, batch_size: int, desc: str, progress: bool = True):
    """`in_batches(items, batch_size)` behind a tqdm progress bar named `desc` (none when not `progress`)."""
    return tqdm(in_batches(items, batch_size), desc=desc, unit="batch", disable=not progress)


def item_seed(seed: int, item_id: str, sample: int = 0) -> int:
    """A seed that depends only on the run seed, the item id and the sample index (not on batching or resume)."""
    return (seed * 1_000_003 + zlib.crc32(str(item_id).encode("utf-8")) * 101 + sample) % (2**63 - 1)


def open_rgb(path: str) -> Image.Image:
    """The image file `path` as an RGB PIL image (`load_medical_image`: PNG/JPEG/TIFF as the original reads them,
    DICOM and NIfTI windowed); raises `ImageLoadError` naming the file when it cannot be read."""
    return load_medical_image(path)


def readable_images(batch: list[dict], key: str, data_report: InputReport) -> list[tuple[dict, list[Image.Image]]]:
    """`(record, images)` for each record of `batch` whose image file(s) `record[key]` (one path or a list of paths)
    open with `open_rgb`, `images` being a list either way; a record with an unreadable image is left out and counted
    in `data_report` as `unreadable_image`, naming the file(s) and the error."""
    readable = []
    for record in batch:
        paths = record[key]
        try:
            images = [open_rgb(path) for path in ([paths] if isinstance(paths, str) else paths)]
        except (ImageLoadError, OSError) as error:
            data_report.skip("unreadable_image", f"{paths} ({error})")
            continue
        readable.append((record, images))
    return readable


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


def answer_records(
    model,
    processor,
    store: PredictionStore,
    records: list[dict],
    data_report: InputReport,
    image_key: str,
    prompt_of,
    max_new_tokens: int,
    batch_size: int,
    desc: str,
    progress: bool = True,
) -> None:
    """Greedy answers for `records`, `batch_size` at a time: each record whose image(s) `record[image_key]` open
    (`readable_images`) is asked `prompt_of(record)` and appended to `store` with the answer as its `prediction`."""
    for batch in progress_batches(records, batch_size, desc, progress):
        readable = readable_images(batch, image_key, data_report)
        if not readable:
            continue
        prompts = [prompt_of(record) for record, _ in readable]
        answers = generate_answers(model, processor, [images for _, images in readable], prompts, max_new_tokens)
        store.add([dict(record, prediction=answer) for (record, _), answer in zip(readable, answers)])


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
    `cfg_*`, `timestep_shift`, `vae_encode`; `cfg_interval` may be a list, as saved in `run_config.json`); all
    conditioning images of one call must have the same size.
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
    if "cfg_interval" in settings:
        settings["cfg_interval"] = tuple(settings["cfg_interval"])
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
    "start_run",
    "model_for_run",
    "kept_predictions",
    "in_batches",
    "progress_batches",
    "item_seed",
    "open_rgb",
    "readable_images",
    "generate_answers",
    "answer_records",
    "initial_noise",
    "generate_images",
]
