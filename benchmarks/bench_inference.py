"""Inference benchmark of UniMedVL at full size (14.6 B parameters, bf16, random weights built on the GPU).

Measures, in one run, the GPU's copy bandwidth and bf16 matmul throughput, then: prefill of a VQA context (a
512×512 image through `UniMedVLImageProcessor` + a 40-token question), greedy decoding of 256 tokens at batch 1,
decode throughput at batch 8 and 32, text-to-image at 512² and 1024² (50 steps, text CFG 4.0 on t ∈ (0.4, 1]),
image-to-image at 512² (text + image CFG on (0, 1], `text_channel` renorm) and peak GPU memory. Each figure is a JSON
line with its roofline floor computed from the configuration and the ceilings measured in the same run (see
`accounting.py`), and, at full size, the original implementation's figure on one H100 80GB.

    python -m benchmarks.bench_inference [--output results.jsonl]      # full size, CUDA
    python -m benchmarks.bench_inference --tiny                          # tiny model on the CPU, seconds
"""

import argparse
import os
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image


os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modeling_unimedvl import UniMedVLForConditionalGeneration, UniMedVLImageProcessor  # noqa: E402

from . import accounting  # noqa: E402
from .configs import full_size_config, tiny_config  # noqa: E402
from .measurement import (  # noqa: E402
    JsonLinesReport,
    ceilings_records,
    machine_header,
    module_bytes,
    peak_memory_bytes,
    reset_peak_memory,
    resolve_device,
    time_call,
    timed_record,
)


BENCHMARKS = ("prefill", "decode", "text_to_image", "image_to_image")

ORIGINAL_H100 = {
    "prefill": 0.15,
    "decode_batch1": 9.5,
    "text_to_image_512": 8.4,
    "text_to_image_1024": 17.0,
    "image_to_image_512": 15.1,
    "peak_memory": 31.1,
}
"""The original implementation on one H100 80GB at full size (seconds; decode in tokens/s; memory in GiB)."""

T2I_SETTINGS = dict(
    cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.4, 1.0), cfg_renorm_type="global", timestep_shift=3.0
)
I2I_SETTINGS = dict(
    cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel", timestep_shift=3.0
)


@dataclass(frozen=True)
class InferenceSettings:
    """Sizes of one benchmark run; `FULL` follows the issue, `TINY` the same code at CPU scale."""

    image_size: int
    text_tokens: int
    decode_tokens: int
    decode_batches: tuple[int, ...]
    t2i_sizes: tuple[int, ...]
    i2i_size: int
    steps: int
    repeats: int
    copy_bytes: int
    matmul_size: int


FULL = InferenceSettings(
    image_size=512,
    text_tokens=40,
    decode_tokens=256,
    decode_batches=(8, 32),
    t2i_sizes=(512, 1024),
    i2i_size=512,
    steps=50,
    repeats=3,
    copy_bytes=2**30,
    matmul_size=8192,
)
TINY = InferenceSettings(
    image_size=64,
    text_tokens=40,
    decode_tokens=24,
    decode_batches=(8, 32),
    t2i_sizes=(64, 128),
    i2i_size=64,
    steps=6,
    repeats=2,
    copy_bytes=64 * 2**20,
    matmul_size=1024,
)


def tiny_image_processor() -> UniMedVLImageProcessor:
    """The real processor with resize targets scaled down so that a 64×64 image gives 4×4 ViT and latent grids."""
    return UniMedVLImageProcessor(
        understanding_transform=(56, 28, 14, 56 * 56),
        generation_vit_transform=(56, 28, 14, 56 * 56),
        generation_vae_transform=(64, 32, 16, 64 * 64),
    )


class BenchmarkInputs:
    """Tokenizer-free model inputs built from the configuration's special ids and a random image.

    Understanding: `[<|vision_start|>, image × N, <|vision_end|>, <|im_start|>, text × T, <|im_end|>, <|im_start|>]`;
    text-to-image: `[<|im_start|>, text × T, <|im_end|>]`; image-to-image: a VAE block and a ViT block of the image,
    then the text segment (the processor's layout). Text ids are random ids below every special id.
    """

    def __init__(self, config, image_processor: UniMedVLImageProcessor, device: torch.device, text_tokens: int, seed: int = 0):
        self.config, self.image_processor, self.device = config, image_processor, device
        special = (config.bos_token_id, config.eos_token_id, config.vision_start_token_id, config.vision_end_token_id,
                   config.image_token_id, config.latent_token_id, config.pad_token_id or 0)
        high = min(s for s in special if s > 0)
        generator = torch.Generator().manual_seed(seed)
        self.text = torch.randint(1, high, (text_tokens,), generator=generator).tolist()
        self.rng = np.random.default_rng(seed)

    def image(self, size: int) -> Image.Image:
        return Image.fromarray(self.rng.integers(0, 256, (size, size, 3), dtype=np.uint8))

    def _segment(self) -> list[int]:
        return [self.config.bos_token_id, *self.text, self.config.eos_token_id]

    def _block(self, token_id: int, count: int) -> list[int]:
        return [self.config.vision_start_token_id] + [token_id] * count + [self.config.vision_end_token_id]

    def _ids(self, ids: list[int], batch: int) -> dict:
        input_ids = torch.tensor([ids] * batch, device=self.device)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def understanding(self, image_size: int, batch: int) -> dict:
        """A VQA context per row (the same image and question), ready for `model(...)` / `model.generate(...)`."""
        vision = self.image_processor(self.image(image_size), mode="understanding")
        num_patches = int(vision["image_grid_hw"].prod())
        ids = self._block(self.config.image_token_id, num_patches) + self._segment() + [self.config.bos_token_id]
        return {
            **self._ids(ids, batch),
            "pixel_values": vision["pixel_values"].repeat(batch, 1).to(self.device),
            "image_grid_hw": vision["image_grid_hw"].repeat(batch, 1).to(self.device),
        }

    def text_to_image(self) -> dict:
        return self._ids(self._segment(), 1)

    def image_to_image(self, image_size: int) -> dict:
        vision = self.image_processor(self.image(image_size), mode="generation")
        vae_pixels = vision["vae_pixel_values"][0]
        latent_tokens = (vae_pixels.shape[1] // self.config.latent_downsample) * (vae_pixels.shape[2] // self.config.latent_downsample)
        ids = (
            self._block(self.config.latent_token_id, latent_tokens)
            + self._block(self.config.image_token_id, int(vision["image_grid_hw"].prod()))
            + self._segment()
        )
        return {
            **self._ids(ids, 1),
            "pixel_values": vision["pixel_values"].to(self.device),
            "image_grid_hw": vision["image_grid_hw"].to(self.device),
            "vae_pixel_values": [vae_pixels.to(self.device)],
        }


class InferenceBenchmark:
    """Runs the benchmark rows on one model and reports each as a JSON line."""

    def __init__(self, model, config, settings: InferenceSettings, inputs: BenchmarkInputs, device, report: JsonLinesReport,
                 bandwidth: float, matmul: float, full_size: bool):
        self.model, self.config, self.settings, self.inputs = model, config, settings, inputs
        self.device, self.report, self.bandwidth, self.matmul = device, report, bandwidth, matmul
        self.full_size = full_size
        self.geometry = accounting.model_geometry(config)
        self.element_bytes = next(model.parameters()).element_size()
        self.peaks: dict[str, int] = {}

    def _time(self, fn, warmup_fn=None) -> float:
        """Median seconds of `fn` after one call of `warmup_fn` (a cheaper call with the same shapes) or of `fn`."""
        (warmup_fn or fn)()
        return time_call(fn, self.device, warmup=0, repeats=self.settings.repeats)

    def _add(self, work: accounting.Work, flops_bytes: tuple[float, float]) -> None:
        work.add(*flops_bytes, self.matmul, self.bandwidth)

    def _emit(self, name: str, seconds: float, work: accounting.Work, original_key: str | None = None, **fields) -> dict:
        peak = peak_memory_bytes(self.device)
        self.peaks[name] = peak
        record = timed_record(name, seconds, work.floor_seconds, flops=work.flops, bytes=work.bytes,
                              peak_memory_gib=peak / 2**30 if self.device.type == "cuda" else None, **fields)
        key = original_key or name
        if self.full_size and key in ORIGINAL_H100:
            original = ORIGINAL_H100[key]
            record["original_h100"] = original
            if "tokens_per_s" in record:
                record["speedup_vs_original"] = record["tokens_per_s"] / original
            else:
                record["speedup_vs_original"] = original / seconds
        return self.report.emit(record)

    # ------------------------------------------------------------------ rows

    def prefill(self) -> dict:
        inputs = self.inputs.understanding(self.settings.image_size, 1)
        length = inputs["input_ids"].shape[1]
        image_tokens = [int(inputs["image_grid_hw"].prod())]
        reset_peak_memory(self.device)
        seconds = self._time(lambda: self.model(**inputs, use_cache=True, logits_to_keep=1))
        work = accounting.Work()
        self._add(work, accounting.prefill(self.geometry, [length], image_tokens, self.element_bytes))
        return self._emit("prefill", seconds, work, context_tokens=length, image_tokens=image_tokens[0])

    def decode(self, batch: int) -> dict:
        """Greedy decoding of `decode_tokens` tokens (end of sequence disabled); the decode time is
        `t(decode_tokens) − t(1)`, i.e. the prefill and the first token are left out."""
        inputs = self.inputs.understanding(self.settings.image_size, batch)
        length = inputs["input_ids"].shape[1]
        new_tokens = self.settings.decode_tokens

        def generate(count: int) -> None:
            out = self.model.generate(
                **inputs, max_new_tokens=count, min_new_tokens=count, do_sample=False, eos_token_id=None,
                pad_token_id=self.config.pad_token_id,
            )
            if out.shape != (batch, length + count):
                raise RuntimeError(f"generate returned {tuple(out.shape)}, expected {(batch, length + count)}.")

        reset_peak_memory(self.device)
        first = self._time(lambda: generate(1))
        total = self._time(lambda: generate(new_tokens), warmup_fn=lambda: generate(min(4, new_tokens)))
        work = accounting.Work()
        for step in range(1, new_tokens):
            self._add(work, accounting.decode_step(self.geometry, [length + step - 1] * batch, self.element_bytes))
        tokens = batch * (new_tokens - 1)
        seconds = total - first
        return self._emit(
            f"decode_batch{batch}", seconds, work, batch=batch, context_tokens=length, new_tokens=new_tokens,
            tokens=tokens, tokens_per_s=tokens / seconds, limit_tokens_per_s=tokens / work.floor_seconds,
            end_to_end_seconds=total, prefill_and_first_token_seconds=first,
        )

    def _image_generation(self, name: str, inputs: dict, size: int, settings: dict, contexts: list[int],
                          image_tokens: list[int], encode: bool) -> dict:
        steps = self.settings.steps
        kwargs = dict(settings, height=size, width=size, num_inference_steps=steps)

        def generate(num_inference_steps: int = steps) -> None:
            out = self.model.generate(
                **inputs, generation_mode="image", generator=torch.Generator().manual_seed(0),
                **dict(kwargs, num_inference_steps=num_inference_steps),
            )
            if out.images.shape != (1, 3, size, size):
                raise RuntimeError(f"generate_image returned images of {tuple(out.images.shape)}, expected (1, 3, {size}, {size}).")

        reset_peak_memory(self.device)
        seconds = self._time(generate, warmup_fn=lambda: generate(min(3, steps)))
        latent_tokens = (size // self.config.latent_downsample) ** 2
        branches = accounting.flow_schedule(
            steps, settings["timestep_shift"], settings["cfg_interval"], settings["cfg_text_scale"] > 1,
            settings["cfg_img_scale"] > 1,
        )
        work = accounting.Work()
        self._add(work, accounting.prefill(self.geometry, contexts, image_tokens, self.element_bytes))
        vae_bytes = module_bytes(self.model.model.vae)
        if encode:
            self._add(work, (accounting.vae_flops(self.config, "encode", size, size), vae_bytes))
        for rows in branches:
            self._add(work, accounting.flow_step(self.geometry, latent_tokens, contexts[:rows], self.element_bytes))
        self._add(work, (accounting.vae_flops(self.config, "decode", size, size), vae_bytes))
        return self._emit(
            name, seconds, work, height=size, width=size, steps=steps, euler_steps=len(branches),
            model_calls=sum(branches), context_tokens=contexts, latent_tokens=latent_tokens, **{
                k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()
            },
        )

    def text_to_image(self, size: int) -> dict:
        inputs = self.inputs.text_to_image()
        length = inputs["input_ids"].shape[1]
        # CFG contexts: full prompt, without the last text segment (empty), without images (= full prompt)
        return self._image_generation(f"text_to_image_{size}", inputs, size, T2I_SETTINGS, [length, 0, length], [], False)

    def image_to_image(self, size: int) -> dict:
        inputs = self.inputs.image_to_image(size)
        length = inputs["input_ids"].shape[1]
        text = len(self.inputs.text) + 2
        # CFG contexts: everything, the images without the instruction, the instruction without the images
        contexts = [length, length - text, text]
        image_tokens = [int(inputs["image_grid_hw"].prod())]
        return self._image_generation(f"image_to_image_{size}", inputs, size, I2I_SETTINGS, contexts, image_tokens, True)

    def peak_memory(self, weights: int) -> dict:
        """The largest peak of the batch-1 rows (the issue's figure) and of all rows, against the weights' bytes."""
        batch_one = [peak for name, peak in self.peaks.items() if not name.startswith("decode_batch") or name == "decode_batch1"]
        peak = max(batch_one or self.peaks.values() or [peak_memory_bytes(self.device)])
        overall = max(list(self.peaks.values()) or [peak])
        record = {
            "name": "peak_memory",
            "measured": peak / 2**30,
            "limit": weights / 2**30,
            "ratio": weights / peak,
            "unit": "GiB",
            "all_rows_gib": overall / 2**30,
            "weights_gib": weights / 2**30,
            "source": "torch.cuda.max_memory_allocated" if self.device.type == "cuda" else "process peak RSS (ru_maxrss)",
        }
        if self.full_size:
            record["original_h100"] = ORIGINAL_H100["peak_memory"]
        return self.report.emit(record)


def build_model(config, device: torch.device, dtype: torch.dtype):
    """Random-initialised model built directly on `device` in `dtype` (no CPU copy, no download)."""
    with torch.device(device):
        model = UniMedVLForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def run(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = resolve_device(args.device, args.tiny)
    settings = TINY if args.tiny else FULL
    overrides = {k: v for k, v in (("repeats", args.repeats), ("decode_tokens", args.decode_tokens), ("steps", args.steps)) if v is not None}
    settings = replace(settings, **overrides)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = tiny_config() if args.tiny else full_size_config()
    report = JsonLinesReport(args.output)
    try:
        report.emit(machine_header(device, "tiny" if args.tiny else "full", "bench_inference"))
        copy_record, matmul_record = ceilings_records(device, settings.copy_bytes, settings.matmul_size, dtype)
        report.emit(copy_record)
        report.emit(matmul_record)

        torch.manual_seed(0)
        begin = time.perf_counter()
        model = build_model(config, device, dtype)
        weights = module_bytes(model)
        geometry = accounting.model_geometry(config)
        report.emit({
            "name": "model", "parameters": sum(p.numel() for p in model.parameters()), "weights_gib": weights / 2**30,
            "dtype": str(dtype).removeprefix("torch."), "build_seconds": time.perf_counter() - begin,
            "attn_implementation": config.text_config._attn_implementation,
            "active_decode_bytes_per_token": (geometry.expert_params + geometry.lm_head_params) * next(model.parameters()).element_size(),
        })
        processor = tiny_image_processor() if args.tiny else UniMedVLImageProcessor()
        inputs = BenchmarkInputs(config, processor, device, settings.text_tokens)
        bench = InferenceBenchmark(model, config, settings, inputs, device, report, copy_record["value"],
                                   matmul_record["value"], full_size=not args.tiny)
        selected = args.only or BENCHMARKS
        if "prefill" in selected:
            bench.prefill()
        if "decode" in selected:
            for batch in (1, *settings.decode_batches):
                bench.decode(batch)
        if "text_to_image" in selected:
            for size in settings.t2i_sizes:
                bench.text_to_image(size)
        if "image_to_image" in selected:
            bench.image_to_image(settings.i2i_size)
        bench.peak_memory(weights)
    finally:
        report.close()
    return report.records


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model, small sizes, few steps (CPU by default)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda, or cpu with --tiny)")
    parser.add_argument("--output", default=None, help="also write the JSON lines to this file")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None, help="run only these rows")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per row (median reported)")
    parser.add_argument("--decode-tokens", type=int, default=None, help="tokens generated in the decode rows")
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps of the image rows")
    args = parser.parse_args(argv)
    if args.decode_tokens is not None and args.decode_tokens < 2:
        parser.error("--decode-tokens must be at least 2 (the decode time is t(n) - t(1)).")
    return args


if __name__ == "__main__":
    run()
