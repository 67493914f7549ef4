"""Text-to-image evaluation: seeded, batched, resumable generation; FID / KID per modality; MS-SSIM diversity."""

import os
import time
from collections import defaultdict

import torch
from torch import nn

from .image_metrics import (
    extract_features,
    fid_kid_from_features,
    load_feature_extractor,
    load_image_tensor,
    load_inception_extractor,
    ms_ssim_diversity,
)
from .predictions import prediction_images_folder, save_prediction_image
from .records import load_generation_records
from .runner import generate_images, item_seed, model_for_run, progress_batches, run_device_dtype, start_run
from .summary import format_value, input_and_timing_lines, markdown_table, run_timing, save_result

GENERATION_DEFINITIONS = {
    "fid": "Frechet distance of extractor features (torchmetrics FrechetInceptionDistance on precomputed features); "
    "comparable with published gFID only with the Inception extractor and equal N",
    "kid_mean": "Kernel Inception Distance (torchmetrics; polynomial kernel degree 3, gamma 1/d, coef 1), mean over "
    "subsets of size kid_subset_size",
    "ms_ssim_diversity": "mean pairwise MS-SSIM between samples of the same prompt (lower = more diverse)",
}


def _features(
    paths: list[str], extractor: nn.Module, uint8_input: bool, image_size: int, batch_size: int, device
) -> torch.Tensor:
    chunks = []
    for index in range(0, len(paths), batch_size):
        images = torch.stack([load_image_tensor(path, image_size) for path in paths[index : index + batch_size]])
        chunks.append(extract_features(extractor, images.to(device), uint8_input).cpu())
    return torch.cat(chunks)


def score_generation(
    items: list[dict],
    feature_extractor: str | nn.Module | None = None,
    inception_weights: str | None = None,
    feature_image_size: int = 299,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    ms_ssim_scales: int = 5,
    batch_size: int = 16,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """FID / KID per modality and overall, and MS-SSIM diversity, from prediction rows
    (`record_id`, `modality`, `real_image`, `generated` path).

    Real set = one reference image per record; generated set = every sample; KID subsets are drawn with `seed`.
    Both are read as RGB (grayscale replicated) and resized to `feature_image_size` squared (bicubic) before feature
    extraction.
    """
    if feature_extractor is not None and inception_weights is not None:
        raise ValueError("Give either --feature-extractor or --inception-weights, not both.")
    result = {"n_generated": len(items), "n_prompts": len({item["record_id"] for item in items})}
    extractor = None
    if inception_weights is not None:
        extractor, uint8_input, result["feature_extractor"] = (
            load_inception_extractor(inception_weights),
            True,
            f"inception-v3 ({inception_weights})",
        )
    elif feature_extractor is not None:
        spec = feature_extractor if isinstance(feature_extractor, str) else type(feature_extractor).__name__
        extractor = (
            load_feature_extractor(feature_extractor)
            if isinstance(feature_extractor, str)
            else feature_extractor.eval()
        )
        uint8_input, result["feature_extractor"] = False, f"custom: {spec} (not comparable with published FID)"
    if extractor is None:
        result["fid_kid"] = None
        result["fid_kid_unavailable"] = (
            "no feature extractor: pass --inception-weights FILE or --feature-extractor module:factory"
        )
    else:
        extractor = extractor.to(device)
        reals = {item["record_id"]: item for item in items}
        real_paths = [item["real_image"] for item in reals.values()]
        real_features = _features(real_paths, extractor, uint8_input, feature_image_size, batch_size, device)
        fake_features = _features(
            [item["generated"] for item in items], extractor, uint8_input, feature_image_size, batch_size, device
        )
        real_modality = [item["modality"] for item in reals.values()]
        fake_modality = [item["modality"] for item in items]
        groups = {"all": (list(range(len(real_paths))), list(range(len(items))))}
        for modality in sorted(set(real_modality)):
            groups[modality] = (
                [i for i, value in enumerate(real_modality) if value == modality],
                [i for i, value in enumerate(fake_modality) if value == modality],
            )
        result["fid_kid"] = {
            name: fid_kid_from_features(
                real_features[real_index], fake_features[fake_index], kid_subset_size, kid_subsets, seed
            )
            for name, (real_index, fake_index) in groups.items()
        }
    by_prompt = defaultdict(list)
    for item in items:
        by_prompt[item["record_id"]].append(item["generated"])
    sample_groups = [
        torch.stack([load_image_tensor(path) for path in paths]) for paths in by_prompt.values() if len(paths) > 1
    ]
    result["diversity"] = ms_ssim_diversity(sample_groups, ms_ssim_scales)
    return result


def _generation_markdown(result: dict) -> str:
    metrics = result["metrics"]
    settings = result["settings"]
    lines = [
        f"## Text-to-image generation — {os.path.basename(result['data'])}",
        "",
        f"Checkpoint `{result['checkpoint']}`; {metrics['n_prompts']} prompts x {settings['samples_per_prompt']} "
        f"samples = {metrics['n_generated']} images at {settings['height']}x{settings['width']}, "
        f"{settings['num_inference_steps']} steps, cfg_text_scale {settings['cfg_text_scale']}, "
        f"seed {settings['seed']}.",
        "",
    ]
    if metrics["fid_kid"] is None:
        lines.append(f"FID / KID not computed: {metrics['fid_kid_unavailable']}.")
    else:
        lines.append(
            f"Features: {metrics['feature_extractor']}; images resized to "
            f"{settings['feature_image_size']} px squared (bicubic), grayscale replicated to RGB."
        )
        rows = [
            [
                name,
                block["n_real"],
                block["n_fake"],
                format_value(block["fid"]),
                format_value(block["kid_mean"], 1, 4),
                format_value(block["kid_std"], 1, 4),
                block["kid_subset_size"] if block["kid_subset_size"] else "n/a",
            ]
            for name, block in metrics["fid_kid"].items()
        ]
        lines += [
            "",
            markdown_table(["modality", "n real", "n generated", "FID", "KID mean", "KID std", "KID subset"], rows),
        ]
    diversity = metrics["diversity"]
    if diversity["ms_ssim_diversity"] is None:
        lines += ["", f"MS-SSIM diversity not computed: {diversity['unavailable']}."]
    else:
        lines += [
            "",
            f"MS-SSIM diversity: {diversity['ms_ssim_diversity']:.4f} over {diversity['n_groups']} prompts "
            f"({diversity['scales']} scales, Gaussian 11, sigma 1.5, data_range 1, relu-normalised; "
            "lower = more diverse).",
        ]
    lines += input_and_timing_lines(result, "images")
    return "\n".join(lines)


def evaluate_generation(
    checkpoint: str,
    data: str,
    output_dir: str,
    feature_extractor: str | nn.Module | None = None,
    inception_weights: str | None = None,
    image_dir: str | None = None,
    samples_per_prompt: int = 1,
    height: int = 512,
    width: int = 512,
    num_inference_steps: int = 50,
    cfg_text_scale: float = 4.0,
    cfg_interval: tuple[float, float] = (0.4, 1.0),
    cfg_renorm_type: str = "global",
    cfg_renorm_min: float = 0.0,
    timestep_shift: float = 3.0,
    batch_size: int = 4,
    feature_image_size: int = 299,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    ms_ssim_scales: int = 5,
    limit: int | None = None,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    model=None,
    processor=None,
) -> dict:
    """Generates `samples_per_prompt` images per prompt of `data` (PNG files under `output_dir/images`, one
    prediction line per image; finished images are skipped on a rerun), then scores them with `score_generation`.

    Each sample's initial noise comes from a seed derived from (`seed`, record id, sample index), so results do not
    depend on batching or on resuming.
    """
    start = time.perf_counter()
    records, data_report = load_generation_records(data, image_dir, limit)
    run_device, _ = run_device_dtype(model, device, dtype)
    sampling = {
        "height": height,
        "width": width,
        "num_inference_steps": num_inference_steps,
        "cfg_text_scale": cfg_text_scale,
        "cfg_interval": list(cfg_interval),
        "cfg_renorm_type": cfg_renorm_type,
        "cfg_renorm_min": cfg_renorm_min,
        "timestep_shift": timestep_shift,
    }
    fields = dict(sampling, samples_per_prompt=samples_per_prompt, seed=seed)
    settings, store = start_run("generation", checkpoint, data, output_dir, fields, model, device, dtype, overwrite)
    image_folder = prediction_images_folder(output_dir)
    jobs = [
        (record, sample)
        for record in records
        for sample in range(samples_per_prompt)
        if not store.finished(f"{record['id']}#{sample}", "generated")
    ]
    model, processor = model_for_run(model, processor, jobs, checkpoint, device, dtype)
    for batch in progress_batches(jobs, batch_size, "Generation", progress):
        seeds = [item_seed(seed, record["id"], sample) for record, sample in batch]
        images = generate_images(model, processor, [record["prompt"] for record, _ in batch], seeds, sampling)
        rows = []
        for (record, sample), image, sample_seed in zip(batch, images, seeds):
            item_id = f"{record['id']}#{sample}"
            path = save_prediction_image(image, image_folder, item_id)
            rows.append(
                {
                    "id": item_id,
                    "record_id": record["id"],
                    "sample": sample,
                    "seed": sample_seed,
                    "prompt": record["prompt"],
                    "modality": record["modality"],
                    "real_image": record["image"],
                    "generated": path,
                }
            )
        store.add(rows)
    items = [store.items[f"{record['id']}#{sample}"] for record in records for sample in range(samples_per_prompt)]
    data_report.rows_kept = len(records)
    metrics = score_generation(
        items,
        feature_extractor,
        inception_weights,
        feature_image_size,
        kid_subset_size,
        kid_subsets,
        ms_ssim_scales,
        batch_size,
        run_device,
        seed,
    )
    timing = run_timing(start, len(jobs), len(records) * samples_per_prompt - len(jobs))
    settings = dict(
        settings,
        feature_image_size=feature_image_size,
        kid_subset_size=kid_subset_size,
        kid_subsets=kid_subsets,
        ms_ssim_scales=ms_ssim_scales,
    )
    return save_result(
        output_dir, _generation_markdown, "generation", settings, metrics, data_report.to_dict(), timing, store.path,
        GENERATION_DEFINITIONS,
    )


__all__ = ["GENERATION_DEFINITIONS", "score_generation", "evaluate_generation"]
