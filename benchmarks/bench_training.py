"""Training-throughput benchmark of UniMedVL: tokens/s and model FLOPs utilisation of a mid-size configuration.

The model (Qwen2.5-1.5B geometry with its generation expert, SigLIP so400m, FLUX VAE; 3.5 B trainable parameters)
is built with random fp32 weights on the GPU and trained with AdamW under bf16 autocast and activation checkpointing.
Every step takes a padded batch whose rows mix an understanding image (ViT tokens), a text answer (cross-entropy) and
a noised VAE target (flow matching): loss = 0.25 · CE + 1.0 · MSE(velocity, ε − x₀) over the noised latent tokens,
both from the model's own forward (`out.loss`, `out.velocity`). The VAE is frozen and encodes the target images
inside every step, as in the original training.

MFU = model FLOPs per step / step time / matmul throughput measured in the same run (`accounting.training_flops`:
3 × forward, attention included, activation recomputation not counted); `mfu_6nd` uses the plain
6 · (active parameters per LLM token) · (LLM tokens). On an H100 the datasheet peak (989 TFLOP/s bf16 dense) is
printed for reference.

    python -m benchmarks.bench_training [--output training.jsonl]   # CUDA
    python -m benchmarks.bench_training --tiny                        # tiny model on the CPU, seconds
"""

import argparse
import os
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from transformers.modeling_layers import GradientCheckpointingLayer


os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modeling_unimedvl import UniMedVLForConditionalGeneration, UniMedVLImageProcessor  # noqa: E402
from unimedvl_training import flow_matching_mse, noise_latents, sample_timesteps  # noqa: E402

from . import accounting  # noqa: E402
from .bench_inference import tiny_image_processor  # noqa: E402
from .configs import tiny_config, training_config  # noqa: E402
from .measurement import (  # noqa: E402
    H100_BF16_DENSE_SPEC_FLOPS,
    JsonLinesReport,
    ceilings_records,
    machine_header,
    peak_memory_bytes,
    reset_peak_memory,
    resolve_device,
    synchronize,
)


CE_WEIGHT = 0.25
MSE_WEIGHT = 1.0


@dataclass(frozen=True)
class TrainingSettings:
    """One run's sizes: row `r` of a batch holds an understanding image of `vit_image_size`², `text_tokens[r % n]`
    answer tokens and a noised `vae_image_size`² target; `steps` timed steps follow `warmup_steps` untimed ones."""

    batch_size: int
    vit_image_size: int
    vae_image_size: int
    text_tokens: tuple[int, ...]
    steps: int
    warmup_steps: int
    copy_bytes: int
    matmul_size: int
    learning_rate: float = 1e-5


FULL = TrainingSettings(
    batch_size=2, vit_image_size=512, vae_image_size=512, text_tokens=(512, 256), steps=10, warmup_steps=3,
    copy_bytes=2**30, matmul_size=8192,
)
TINY = TrainingSettings(
    batch_size=3, vit_image_size=64, vae_image_size=64, text_tokens=(40, 24, 56), steps=3, warmup_steps=1,
    copy_bytes=64 * 2**20, matmul_size=1024,
)


class TrainingBatches:
    """Padded training batches built from the configuration's special ids, random images and random text.

    Row layout: `[<|vision_start|>, image × N, <|vision_end|>, <|im_start|>, text × T, <|im_end|>, <|vision_start|>,
    latent × M, <|vision_end|>]`, right-padded; labels on the text and `<|im_end|>`; the latent block is a noised
    target. The ViT inputs go through `UniMedVLImageProcessor` once; every batch draws new text, noise and timesteps.
    """

    def __init__(self, config, image_processor: UniMedVLImageProcessor, settings: TrainingSettings, device: torch.device, seed: int = 0):
        self.config, self.settings, self.device = config, settings, device
        self.generator = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        images = [Image.fromarray(rng.integers(0, 256, (settings.vit_image_size,) * 2 + (3,), dtype=np.uint8)) for _ in range(settings.batch_size)]
        vision = image_processor(images, mode="understanding")
        self.pixel_values = vision["pixel_values"].to(device)
        self.image_grid_hw = vision["image_grid_hw"].to(device)
        self.image_tokens = (self.image_grid_hw[:, 0] * self.image_grid_hw[:, 1]).tolist()
        grid = settings.vae_image_size // config.latent_downsample
        self.latent_grid = [grid, grid]
        specials = (config.bos_token_id, config.eos_token_id, config.vision_start_token_id, config.vision_end_token_id,
                    config.image_token_id, config.latent_token_id, config.pad_token_id or 0)
        self.text_high = min(s for s in specials if s > 0)

    def row(self, index: int) -> tuple[list[int], list[int]]:
        """Token ids and labels of row `index`."""
        config = self.config
        text = torch.randint(1, self.text_high, (self.settings.text_tokens[index % len(self.settings.text_tokens)],), generator=self.generator).tolist()
        vit = [config.vision_start_token_id] + [config.image_token_id] * self.image_tokens[index] + [config.vision_end_token_id]
        segment = [config.bos_token_id, *text, config.eos_token_id]
        latent = [config.vision_start_token_id] + [config.latent_token_id] * (self.latent_grid[0] * self.latent_grid[1]) + [config.vision_end_token_id]
        labels = [-100] * (len(vit) + 1) + [*text, config.eos_token_id] + [-100] * len(latent)
        return vit + segment + latent, labels

    def vae_images(self) -> list[torch.Tensor]:
        """Random target images `[3, H, W]` in [-1, 1] (encoded by the frozen VAE inside the step)."""
        size = self.settings.vae_image_size
        return [torch.rand(3, size, size, generator=self.generator).mul_(2).sub_(1).to(self.device) for _ in range(self.settings.batch_size)]

    def __call__(self) -> dict:
        rows = [self.row(index) for index in range(self.settings.batch_size)]
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), self.config.pad_token_id or 0, dtype=torch.long)
        labels = torch.full_like(input_ids, -100)
        attention_mask = torch.zeros_like(input_ids)
        for index, (ids, row_labels) in enumerate(rows):
            input_ids[index, : len(ids)] = torch.tensor(ids)
            labels[index, : len(ids)] = torch.tensor(row_labels)
            attention_mask[index, : len(ids)] = 1
        batch = len(rows)
        return {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
            "labels": labels.to(self.device),
            "pixel_values": self.pixel_values,
            "image_grid_hw": self.image_grid_hw,
            "vae_pixel_values": self.vae_images(),
            "latent_grid_hw": torch.tensor([self.latent_grid] * batch, device=self.device),
            "timesteps": sample_timesteps(batch, shift=1.0, generator=self.generator),
            "noise": torch.randn(batch * self.latent_grid[0] * self.latent_grid[1], self.config.patch_latent_dim, generator=self.generator).to(self.device),
            "row_lengths": [len(ids) for ids, _ in rows],
        }


def training_step(model, optimizer, batch: dict, autocast_dtype: torch.dtype | None) -> tuple[float, float, float]:
    """One optimiser step on `batch`; returns (loss, CE, MSE) as tensors' values (read after the step)."""
    device = batch["input_ids"].device
    with torch.no_grad():
        clean, _ = model.model.encode_images(batch["vae_pixel_values"], sample=True)
    lengths = batch["latent_grid_hw"][:, 0] * batch["latent_grid_hw"][:, 1]
    noised = noise_latents(clean, batch["noise"], batch["timesteps"].to(device), lengths)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with autocast:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            image_grid_hw=batch["image_grid_hw"],
            latents=noised,
            latent_grid_hw=batch["latent_grid_hw"],
            latent_timesteps=batch["timesteps"].to(device),
            labels=batch["labels"],
        )
        target = batch["noise"] - clean
        mse = flow_matching_mse(out.velocity, target, torch.ones(target.shape[0], dtype=torch.bool, device=device))
        loss = CE_WEIGHT * out.loss + MSE_WEIGHT * mse
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), out.loss.detach(), mse.detach()


def build_training_model(config, device: torch.device):
    """fp32 random-initialised model on `device`, VAE frozen, activation checkpointing on."""
    with torch.device(device):
        model = UniMedVLForConditionalGeneration._from_config(config, dtype=torch.float32)
    model.model.vae.requires_grad_(False)
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23; the older name is deprecated there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model.train()


def checkpointed_layers(model) -> int:
    """Number of decoder / ViT layers that recompute their activations in the backward pass."""
    return sum(1 for module in model.modules() if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing)


def run(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = resolve_device(args.device, args.tiny)
    settings = TINY if args.tiny else FULL
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size)) if v is not None}
    settings = replace(settings, **overrides)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    matmul_dtype = autocast_dtype or torch.float32
    config = tiny_config() if args.tiny else training_config()
    report = JsonLinesReport(args.output)
    try:
        report.emit(machine_header(device, "tiny" if args.tiny else "full", "bench_training"))
        copy_record, matmul_record = ceilings_records(device, settings.copy_bytes, settings.matmul_size, matmul_dtype)
        report.emit(copy_record)
        report.emit(matmul_record)

        torch.manual_seed(0)
        model = build_training_model(config, device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, fused=device.type == "cuda")
        geometry = accounting.model_geometry(config)
        report.emit({
            "name": "training_model",
            "trainable_parameters": sum(p.numel() for p in trainable),
            "frozen_parameters": sum(p.numel() for p in model.parameters() if not p.requires_grad),
            "autocast": str(autocast_dtype).removeprefix("torch.") if autocast_dtype else None,
            "checkpointed_layers": checkpointed_layers(model),
            "optimizer": "AdamW" + (" (fused)" if device.type == "cuda" else ""),
        })

        processor = tiny_image_processor() if args.tiny else UniMedVLImageProcessor()
        batches = TrainingBatches(config, processor, settings, device)
        reset_peak_memory(device)
        losses, times, row_lengths = [], [], []
        for step in range(settings.warmup_steps + settings.steps):
            batch = batches()
            synchronize(device)
            begin = time.perf_counter()
            values = training_step(model, optimizer, batch, autocast_dtype)
            synchronize(device)
            if step >= settings.warmup_steps:
                times.append(time.perf_counter() - begin)
                row_lengths.append(batch["row_lengths"])
            losses.append([float(v) for v in values])

        seconds = statistics.median(times)
        lengths = row_lengths[0]
        tokens = sum(lengths)
        latent_tokens = int(batch["latent_grid_hw"].prod(dim=1).sum())
        flops = accounting.training_flops(geometry, lengths, batches.image_tokens, latent_tokens)
        flops_6nd = 6 * (geometry.expert_matmul_params + geometry.lm_head_params) * tokens
        record = {
            "name": "training_throughput",
            "tokens_per_s": tokens / seconds,
            "step_seconds": seconds,
            "step_seconds_all": times,
            "tokens_per_step": tokens,
            "padded_tokens_per_step": len(lengths) * max(lengths),
            "rows": len(lengths),
            "vit_tokens_per_step": sum(batches.image_tokens),
            "latent_tokens_per_step": latent_tokens,
            "model_flops_per_step": flops,
            "mfu": flops / seconds / matmul_record["value"],
            "mfu_6nd": flops_6nd / seconds / matmul_record["value"],
            "matmul_throughput": matmul_record["value"],
            "loss_first": losses[0][0],
            "loss_last": losses[-1][0],
            "ce_last": losses[-1][1],
            "mse_last": losses[-1][2],
            "peak_memory_gib": peak_memory_bytes(device) / 2**30,
        }
        if "spec_value" in matmul_record:
            record["spec_peak_flops"] = H100_BF16_DENSE_SPEC_FLOPS
            record["mfu_vs_spec"] = flops / seconds / H100_BF16_DENSE_SPEC_FLOPS
        report.emit(record)
    finally:
        report.close()
    return report.records


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model, small batch (CPU by default)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda, or cpu with --tiny)")
    parser.add_argument("--output", default=None, help="also write the JSON lines to this file")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (median reported)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per batch")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1.")
    return args


if __name__ == "__main__":
    run()
