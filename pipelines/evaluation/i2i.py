"""Image-to-image evaluation (super-resolution, T2 -> FLAIR, stain translation): generation, then PSNR / SSIM."""

import math
import os
import time
from collections import defaultdict

import numpy as np
import torch
from PIL import Image

from ..medical_images import open_image_file
from .image_metrics import psnr_ssim
from .predictions import PredictionStore, prediction_images_folder, save_prediction_image
from .records import load_i2i_records
from .runner import (
    generate_images,
    item_seed,
    kept_predictions,
    model_for_run,
    progress_batches,
    readable_images,
    start_run,
)
from .summary import format_value, input_and_timing_lines, markdown_table, run_timing, save_result

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
    fields = dict(sampling, seed=seed)
    settings, store = start_run("i2i", checkpoint, data, output_dir, fields, model, device, dtype, overwrite)
    image_folder = prediction_images_folder(output_dir)
    todo = [record for record in records if not store.finished(record["id"], "generated")]
    model, processor = model_for_run(model, processor, todo, checkpoint, device, dtype)
    for batch in progress_batches(todo, batch_size, "Image-to-image", progress):
        by_size = defaultdict(list)
        for record, (source,) in readable_images(batch, "image", data_report):
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
                rows.append(dict(record, generated=save_prediction_image(image, image_folder, record["id"])))
            store.add(rows)
    items = kept_predictions(store, records, data_report)
    metrics = score_i2i_pairs(items, crop_border)
    timing = run_timing(start, len(todo), len(records) - len(todo))
    settings = dict(settings, crop_border=crop_border)
    return save_result(output_dir, _i2i_markdown, "i2i", settings, metrics, data_report.to_dict(), timing, store.path)


def rescore_i2i(predictions_path: str, output_dir: str | None = None, crop_border: int = 0) -> dict:
    """Scores an existing i2i `predictions.jsonl` (`generated`, `target`, optional `task` per line) without a model."""
    start = time.perf_counter()
    store = PredictionStore(predictions_path)
    items = list(store.items.values())
    metrics = score_i2i_pairs(items, crop_border)
    timing = run_timing(start, 0, len(items))
    output_dir = output_dir or os.path.dirname(os.path.abspath(predictions_path))
    return save_result(
        output_dir, _i2i_markdown, "i2i", {"crop_border": crop_border}, metrics, store.input_report(), timing,
        predictions_path, checkpoint="as recorded", data=predictions_path,
    )


__all__ = ["I2I_CONVENTION", "score_i2i_pairs", "evaluate_i2i", "rescore_i2i"]
