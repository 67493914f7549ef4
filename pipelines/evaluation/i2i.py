"""Image-to-image evaluation (super-resolution, T2 -> FLAIR, stain translation): generation, then PSNR / SSIM."""

import math
import os
import time
from collections import defaultdict

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from modeling_unimedvl.atomic_files import save_image

from ..medical_images import ImageLoadError, open_image_file
from .image_metrics import psnr_ssim
from .predictions import PredictionStore, file_stem, open_run
from .records import load_i2i_records
from .runner import generate_images, in_batches, item_seed, model_for_run, open_rgb, run_device_dtype
from .summary import format_value, input_and_timing_lines, markdown_table, write_summary

I2I_CONVENTION = (
    "PSNR / SSIM per image on 8-bit values (data_range 255), averaged over images (mean of per-image PSNR); SSIM = "
    "torchmetrics Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, reflect padding; {crop} px cropped from every "
    "border; single-channel targets scored in grayscale (prediction converted with PIL 'L'), colour targets on RGB; "
    "a prediction whose size differs from its target is resized to the target size (bicubic)."
)


def _as_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float64)
    return torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())


def score_i2i_pairs(items: list[dict], crop_border: int = 0) -> dict:
    """PSNR / SSIM means overall and per `task` from rows with `generated` and `target` image paths.

    Returns `{"overall": {"psnr", "ssim", "n"}, "by_task": {...}, "resized_predictions": int,
    "infinite_psnr": int}`; identical pairs have infinite PSNR (counted, and they make the mean infinite).
    """
    per_task, resized, infinite = defaultdict(list), 0, 0
    for item in items:
        with open_image_file(item["target"]) as target_file:
            mode = "L" if target_file.mode in ("L", "I", "I;16", "F", "1") else "RGB"
            target = target_file.convert(mode)
        with open_image_file(item["generated"]) as generated_file:
            prediction = generated_file.convert(mode)
        if prediction.size != target.size:
            prediction = prediction.resize(target.size, Image.Resampling.BICUBIC)
            resized += 1
        psnr, ssim = psnr_ssim(_as_tensor(prediction), _as_tensor(target), data_range=255.0, crop_border=crop_border)
        infinite += math.isinf(psnr)
        per_task[item.get("task", "all")].append((psnr, ssim))

    def summarise(pairs):
        return {
            "psnr": sum(p for p, _ in pairs) / len(pairs),
            "ssim": sum(s for _, s in pairs) / len(pairs),
            "n": len(pairs),
        }

    everything = [pair for pairs in per_task.values() for pair in pairs]
    if not everything:
        raise ValueError("No image pairs to score.")
    return {
        "overall": summarise(everything),
        "by_task": {task: summarise(pairs) for task, pairs in sorted(per_task.items())},
        "resized_predictions": resized,
        "infinite_psnr": infinite,
        "convention": I2I_CONVENTION.format(crop=crop_border),
    }


def _i2i_markdown(result: dict) -> str:
    metrics = result["metrics"]
    rows = [
        [
            "all",
            metrics["overall"]["n"],
            format_value(metrics["overall"]["psnr"]),
            format_value(metrics["overall"]["ssim"], 1, 4),
        ]
    ]
    rows += [
        [task, block["n"], format_value(block["psnr"]), format_value(block["ssim"], 1, 4)]
        for task, block in metrics["by_task"].items()
    ]
    settings = result["settings"]
    lines = [
        f"## Image-to-image — {os.path.basename(result['data'])}",
        "",
        f"Checkpoint `{result['checkpoint']}`; {settings.get('num_inference_steps', 'n/a')} steps, cfg_text_scale "
        f"{settings.get('cfg_text_scale', 'n/a')}, cfg_img_scale {settings.get('cfg_img_scale', 'n/a')}, "
        f"vae_encode {settings.get('vae_encode', 'n/a')}, seed {settings.get('seed', 'n/a')}.",
        "",
        markdown_table(["task", "n", "PSNR (dB)", "SSIM"], rows),
        "",
        f"Convention: {metrics['convention']} Resized predictions: {metrics['resized_predictions']}; "
        f"pairs with infinite PSNR: {metrics['infinite_psnr']}.",
        *input_and_timing_lines(result, "images"),
    ]
    return "\n".join(lines)


def evaluate_i2i(
    checkpoint: str,
    data: str,
    output_dir: str,
    image_dir: str | None = None,
    batch_size: int = 4,
    num_inference_steps: int = 50,
    cfg_text_scale: float = 4.0,
    cfg_img_scale: float = 2.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    cfg_renorm_type: str = "text_channel",
    cfg_renorm_min: float = 0.0,
    timestep_shift: float = 3.0,
    vae_encode: str = "mean",
    crop_border: int = 0,
    limit: int | None = None,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    model=None,
    processor=None,
) -> dict:
    """Generates the output of every `image` + `instruction` row of `data` (PNG under `output_dir/images`; finished
    rows skipped on a rerun) and scores it against `target` with `score_i2i_pairs`.

    The output size is the input's VAE size (the model's default). Rows of one batch are generated together only when
    their input images have the same size. `vae_encode="mean"` (default) makes the input encoding deterministic.
    """
    start = time.perf_counter()
    records, data_report = load_i2i_records(data, image_dir, limit)
    _, torch_dtype = run_device_dtype(model, device, dtype)
    sampling = {
        "num_inference_steps": num_inference_steps,
        "cfg_text_scale": cfg_text_scale,
        "cfg_img_scale": cfg_img_scale,
        "cfg_interval": list(cfg_interval),
        "cfg_renorm_type": cfg_renorm_type,
        "cfg_renorm_min": cfg_renorm_min,
        "timestep_shift": timestep_shift,
        "vae_encode": vae_encode,
    }
    settings = dict(
        sampling,
        task="i2i",
        checkpoint=os.path.abspath(checkpoint),
        data=os.path.abspath(data),
        seed=seed,
        dtype=str(torch_dtype),
    )
    store = open_run(output_dir, settings, overwrite)
    image_folder = os.path.join(output_dir, "images")
    os.makedirs(image_folder, exist_ok=True)
    todo = [
        record
        for record in records
        if record["id"] not in store or not os.path.isfile(store.items[record["id"]]["generated"])
    ]
    model, processor = model_for_run(model, processor, todo, checkpoint, device, dtype)
    sampling["cfg_interval"] = tuple(cfg_interval)
    for batch in tqdm(in_batches(todo, batch_size), desc="Image-to-image", unit="batch", disable=not progress):
        by_size = defaultdict(list)
        for record in batch:
            try:
                source = open_rgb(record["image"])
            except (ImageLoadError, OSError) as error:
                data_report.skip("unreadable_image", f"{record['image']} ({error})")
                continue
            by_size[source.size].append((record, source))
        for group in by_size.values():
            seeds = [item_seed(seed, record["id"]) for record, _ in group]
            outputs = generate_images(
                model,
                processor,
                [record["instruction"] for record, _ in group],
                seeds,
                sampling,
                conditions=[source for _, source in group],
            )
            rows = []
            for (record, _), image in zip(group, outputs):
                path = os.path.join(image_folder, f"{file_stem(record['id'])}.png")
                save_image(image, path)
                rows.append(dict(record, generated=path))
            store.add(rows)
    items = [store.items[record["id"]] for record in records if record["id"] in store]
    data_report.rows_kept = len(items)
    result = {
        "task": "i2i",
        "checkpoint": settings["checkpoint"],
        "data": settings["data"],
        "settings": dict(settings, crop_border=crop_border),
        "metrics": score_i2i_pairs(items, crop_border),
        "input": data_report.to_dict(),
        "timing": {"wall_s": time.perf_counter() - start, "generated": len(todo), "resumed": len(records) - len(todo)},
        "predictions": store.path,
    }
    result["files"] = write_summary(output_dir, result, _i2i_markdown(result))
    return result


def rescore_i2i(predictions_path: str, output_dir: str | None = None, crop_border: int = 0) -> dict:
    """Scores an existing i2i `predictions.jsonl` (`generated`, `target`, optional `task` per line) without a model."""
    start = time.perf_counter()
    store = PredictionStore(predictions_path)
    items = list(store.items.values())
    result = {
        "task": "i2i",
        "checkpoint": "as recorded",
        "data": predictions_path,
        "settings": {"crop_border": crop_border},
        "metrics": score_i2i_pairs(items, crop_border),
        "input": store.input_report(),
        "timing": {"wall_s": time.perf_counter() - start, "generated": 0, "resumed": len(items)},
        "predictions": predictions_path,
    }
    result["files"] = write_summary(
        output_dir or os.path.dirname(os.path.abspath(predictions_path)), result, _i2i_markdown(result)
    )
    return result


__all__ = ["I2I_CONVENTION", "score_i2i_pairs", "evaluate_i2i", "rescore_i2i"]
