"""Inference benchmark of UniMedVL at full size (14.6 B parameters, bf16, random weights built on the GPU).

Measures, in one run, the GPU's copy bandwidth and bf16 matmul throughput, then: prefill of a VQA context (a
512×512 image through `UniMedVLImageProcessor` + a 40-token question), greedy decoding of 256 tokens at batch 1,
decode throughput at batch 8 and 32, text-to-image at 512² and 1024² (50 steps, text CFG 4.0 on t ∈ (0.4, 1]),
image-to-image at 512² (text + image CFG on (0, 1], `text_channel` renorm) and peak GPU memory. Each figure is a JSON
line with its roofline floor computed from the configuration and the ceilings measured in the same run (see
`accounting.py`), and, at full size, the original implementation's figure on one H100 80GB.

    python -m benchmarks.bench_inference [--output results.jsonl]      # full size, CUDA
    python -m benchmarks.bench_inference --tiny                          # tiny model on the CPU, seconds

`--variants eager compiled` adds the compiled variants of the decode and image rows (static cache and the denoising
step compiled through `compile_config`; CUDA graphs on a GPU), `--quantization nf4` runs the rows on 4-bit NF4 weights;
rows run in the order of `--only`. The
step rows (`--only decode_step denoise_step`, see `steps.py`) compare the decoding and the denoising step eager and
compiled, with host synchronisations, aten ops and graph breaks per step, and against `--baseline REV` (the package
at another git revision) on the same weights; `--tiny --depth full --threads 1` is the CPU proxy of the full model's
per-step overheads (28 decoder and 26 ViT layers at tiny width).
"""

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image


os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modeling_unimedvl import UniMedVLForConditionalGeneration, UniMedVLImageProcessor  # noqa: E402

from modeling_unimedvl.modeling_unimedvl import CACHE_FIELD  # noqa: E402

from . import accounting, steps  # noqa: E402
from .configs import TINY_DEPTHS, full_size_config, tiny_config  # noqa: E402
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
from .quantization import quantize_nf4  # noqa: E402


BENCHMARKS = ("prefill", "decode", "text_to_image", "image_to_image")
"""The rows of a default run."""
STEP_BENCHMARKS = ("decode_step", "denoise_step")
"""Step-level rows, run when named in `--only`."""

STEP_SETTINGS = dict(
    cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="global", timestep_shift=3.0
)
"""The denoising-step row: text guidance on every step, i.e. two model rows (the full and the text-guidance context)."""

ORIGINAL_H100 = {
    "prefill": 0.15,
    "decode_batch1": 9.5,
    "text_to_image_512": 8.4,
    "text_to_image_1024": 17.0,
    "image_to_image_512": 15.1,
    "peak_memory": 31.1,
}
"""The original implementation on one H100 80GB at full size (seconds; decode in tokens/s; memory in GiB)."""

ISSUE_TARGETS = {"decode_batch1": ("tokens_per_s", 170.0, "min"), "text_to_image_1024": ("seconds", 10.0, "max"),
                 "image_to_image_512": ("seconds", 4.5, "max")}
"""The performance issue's targets on one H100 at full size: (field, bound, whether it is a minimum or a maximum)."""

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
    step_tokens: int = 33
    """Tokens generated per timed run of the `decode_step` row."""
    step_image_size: int = 512
    """Image side of the `denoise_step` row (512: the issue's table; 1024 latent tokens)."""
    step_runs: tuple[int, int] = (2, 5)
    """`num_inference_steps` of the two `generate_image` runs whose difference times one Euler step."""


FULL = InferenceSettings(
    image_size=512,
    text_tokens=40,
    decode_tokens=256,
    decode_batches=(1, 8, 32),
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
    decode_batches=(1, 8, 32),
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
                 bandwidth: float, matmul: float, full_size: bool, compile_config=None, tag: str = ""):
        self.model, self.config, self.settings, self.inputs = model, config, settings, inputs
        self.device, self.report, self.bandwidth, self.matmul = device, report, bandwidth, matmul
        self.full_size = full_size
        self.compile_config = compile_config
        """`CompileConfig` of the compiled variants (`--compile`, and the step rows)."""
        self.tag = tag
        """Suffix of every row name (`_nf4` for the quantized run)."""
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
        original_key = original_key or name
        name = name + self.tag
        peak = peak_memory_bytes(self.device)
        self.peaks[name] = (peak, fields.get("batch", 1))
        record = timed_record(name, seconds, work.floor_seconds, flops=work.flops, bytes=work.bytes,
                              peak_memory_gib=peak / 2**30 if self.device.type == "cuda" else None, **fields)
        if self.full_size and original_key in ISSUE_TARGETS:
            field, bound, kind = ISSUE_TARGETS[original_key]
            record.update(target={field: bound, "kind": kind},
                          meets_target=record[field] >= bound if kind == "min" else record[field] <= bound)
        if self.full_size and original_key in ORIGINAL_H100:
            original = ORIGINAL_H100[original_key]
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

    def decode(self, batch: int, compiled: bool = False) -> dict:
        """Greedy decoding of `decode_tokens` tokens (end of sequence disabled); the decode time is
        `t(decode_tokens) − t(1)`, i.e. the prefill and the first token are left out. `compiled`: static cache and
        the decoding step compiled by `generate` (`compile_config`; CUDA graphs on a GPU)."""
        inputs = self.inputs.understanding(self.settings.image_size, batch)
        length = inputs["input_ids"].shape[1]
        new_tokens = self.settings.decode_tokens
        options = {"cache_implementation": "static", "compile_config": self.compile_config} if compiled else {}

        def generate(count: int) -> None:
            out = self.model.generate(
                **inputs, max_new_tokens=count, min_new_tokens=count, do_sample=False, eos_token_id=None,
                pad_token_id=self.config.pad_token_id, **options,
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
        suffix = "_compiled" if compiled else ""
        return self._emit(
            f"decode_batch{batch}{suffix}", seconds, work, original_key=f"decode_batch{batch}", batch=batch,
            context_tokens=length, new_tokens=new_tokens, compiled=compiled,
            tokens=tokens, tokens_per_s=tokens / seconds, limit_tokens_per_s=tokens / work.floor_seconds,
            end_to_end_seconds=total, prefill_and_first_token_seconds=first,
        )

    def _image_generation(self, name: str, inputs: dict, size: int, settings: dict, contexts: list[int],
                          image_tokens: list[int], encode: bool, compiled: bool) -> dict:
        steps = self.settings.steps
        kwargs = dict(settings, height=size, width=size, num_inference_steps=steps)
        if compiled:
            kwargs["compile_config"] = self.compile_config

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
            name + ("_compiled" if compiled else ""), seconds, work, original_key=name, compiled=compiled, height=size,
            width=size, steps=steps, euler_steps=len(branches),
            model_calls=sum(branches), context_tokens=contexts, latent_tokens=latent_tokens, **{
                k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()
            },
        )

    def text_to_image(self, size: int, compiled: bool = False) -> dict:
        inputs = self.inputs.text_to_image()
        length = inputs["input_ids"].shape[1]
        # CFG contexts: full prompt, without the last text segment (empty), without images (= full prompt)
        return self._image_generation(
            f"text_to_image_{size}", inputs, size, T2I_SETTINGS, [length, 0, length], [], False, compiled
        )

    def image_to_image(self, size: int, compiled: bool = False) -> dict:
        inputs = self.inputs.image_to_image(size)
        length = inputs["input_ids"].shape[1]
        text = len(self.inputs.text) + 2
        # CFG contexts: everything, the images without the instruction, the instruction without the images
        contexts = [length, length - text, text]
        image_tokens = [int(inputs["image_grid_hw"].prod())]
        return self._image_generation(
            f"image_to_image_{size}", inputs, size, I2I_SETTINGS, contexts, image_tokens, True, compiled
        )

    # ------------------------------------------------------------------ step rows

    def decode_step(self, baseline=None) -> list[dict]:
        """The decoding step at batch 1 (see `steps.py`): ms per token of `generate` with the dynamic cache, the static
        cache (eager) and the static cache compiled (`compile_config`), the baseline's dynamic and static cache;
        host synchronisations and aten ops of the forward of one step and per token of the whole loop; graphs and
        breaks of the step; whether each variant's greedy tokens equal this package's eager ones."""
        inputs = self.inputs.understanding(self.settings.image_size, 1)
        tokens, pad = self.settings.step_tokens, self.config.pad_token_id
        static = {"cache_implementation": "static", "disable_compile": True}
        variants = {"eager": (self.model, {}), "static": (self.model, static)}
        variants["compiled"] = (self.model, {"cache_implementation": "static", "compile_config": self.compile_config})
        if baseline is not None:
            variants = {"baseline": (baseline, {}), "baseline_static": (baseline, static), **variants}
        records = {name: {"name": "decode_step" + self.tag, "variant": name} for name in variants}
        for name in ("baseline_static", "static"):  # first: explain resets dynamo, compiled functions included
            if name in variants:
                decode = steps.DecodeSteps(variants[name][0], inputs, CACHE_FIELD, 2)
                records[name].update(steps.explain_graphs(variants[name][0].__call__, **decode.inputs()))
        runs = {
            name: functools.partial(steps.greedy_tokens, model, inputs, pad_token_id=pad, **options)
            for name, (model, options) in variants.items()
        }
        reference = runs["eager"](tokens)
        for name, run in runs.items():
            records[name]["tokens_equal_eager"] = bool(torch.equal(run(tokens), reference))
        samples = self._interleaved_ms_per_unit(runs, 1, tokens)
        for name, (model, options) in variants.items():
            record = records[name]
            record.update(batch=1, context_tokens=inputs["input_ids"].shape[1], new_tokens=tokens,
                          ms_per_token=samples[name][0], ms_per_token_all=samples[name][1])
            loop = steps.ops_per_unit(runs[name], 1, tokens, host_reads=name != "compiled")
            record.update({f"loop_{key}_per_token": value for key, value in loop.items()})
            if name != "eager" and name != "baseline":
                record.update(self._decode_forward_figures(model, inputs, compiled=name == "compiled"))
        self._ratios(records, "ms_per_token")
        return [self.report.emit(record) for record in records.values()]

    def _interleaved_ms_per_unit(
        self, runs: dict[str, Callable[[int], object]], low: int, high: int
    ) -> dict[str, tuple[float, list[float]]]:
        """`{variant: (ms per unit, per-repeat ms per unit)}` from `repeats` timed calls of each variant's
        `run(low)` and `run(high)` ([`steps.ms_per_unit`] of them; the per-repeat figures are the single-pair
        differences, noisy under load), after one warm-up run of both lengths each (compilation, first-use set-up of
        every shape); the variants interleaved, so that a change of machine load hits all of them alike."""
        for run in runs.values():
            run(low), run(high)
        seconds = {name: ([], []) for name in runs}
        for _ in range(self.settings.repeats):
            for name, run in runs.items():
                for count, times in zip((low, high), seconds[name]):
                    times.append(time_call(lambda: run(count), self.device, warmup=0, repeats=1))
        return {
            name: (steps.ms_per_unit(short, long, low, high),
                   [steps.ms_per_unit([s], [t], low, high) for s, t in zip(short, long)])
            for name, (short, long) in seconds.items()
        }

    @torch.no_grad()
    def _decode_forward_figures(self, model, inputs: dict, compiled: bool) -> dict:
        """Counts, graphs and time of the forward of one decoding step on a static cache, as `generate` calls it (on a
        cache of `generate`'s size, so that the forward it compiled is reused)."""
        tokens = self.settings.step_tokens
        decode = steps.DecodeSteps(model, inputs, CACHE_FIELD, tokens)
        forward = model.get_compiled_call(self.compile_config) if compiled else model.__call__
        decode.step(forward)
        counts = steps.count_ops(lambda: decode.step(forward), host_reads=not compiled)
        figures = {f"forward_{key}": value for key, value in counts.record().items()}
        timed_steps = tokens - 2

        def decode_run() -> None:
            for _ in range(timed_steps):
                decode.step(forward)

        times = []
        for _ in range(self.settings.repeats):
            decode.reset()
            times.append(time_call(decode_run, self.device, warmup=0, repeats=1) / timed_steps * 1e3)
        figures.update(forward_ms=statistics.median(times), forward_ms_all=times)
        return figures

    def denoise_step(self, baseline=None) -> list[dict]:
        """The denoising step of text-to-image at `step_image_size`² with two guidance rows on every step (see
        `steps.py`): ms per Euler step of `generate_image` eager and with the step compiled (`compile_config`), and
        the baseline's; host synchronisations and aten ops per step; graphs and breaks of the step (the baseline:
        of its model call); the compiled and the baseline's final latents against this package's eager ones."""
        size, runs = self.settings.step_image_size, self.settings.step_runs
        inputs = self.inputs.text_to_image()
        variants = {"eager": (self.model, {}), "compiled": (self.model, {"compile_config": self.compile_config})}
        if baseline is not None:
            variants = {"baseline": (baseline, {}), **variants}
        records = {name: {"name": "denoise_step" + self.tag, "variant": name} for name in variants}
        for name in ("baseline", "eager"):  # first: explain resets dynamo, compiled functions included
            if name in variants:
                records[name].update(self._denoise_step_graphs(variants[name][0], inputs, size))
        step_runs = {
            name: functools.partial(steps.generate_image_latents, model, inputs, size, settings=STEP_SETTINGS, **options)
            for name, (model, options) in variants.items()
        }
        reference = step_runs["eager"](runs[1])
        for name, run in step_runs.items():
            records[name]["latents_max_abs_diff_to_eager"] = (run(runs[1]) - reference).abs().max().item()
        samples = self._interleaved_ms_per_unit(step_runs, *runs)
        for name, (model, options) in variants.items():
            record = records[name]
            record.update(height=size, width=size, latent_tokens=(size // self.config.latent_downsample) ** 2, rows=2,
                          ms_per_step=samples[name][0], ms_per_step_all=samples[name][1])
            loop = steps.ops_per_unit(step_runs[name], *runs, host_reads=name != "compiled")
            record.update({f"loop_{key}_per_step": value for key, value in loop.items()})
            record.update(self._denoise_step_figures(model, inputs, size, name))
        self._ratios(records, "ms_per_step")
        return [self.report.emit(record) for record in records.values()]

    @staticmethod
    def _denoise_step_graphs(model, inputs: dict, size: int) -> dict:
        """Graphs and breaks of the step function (a revision before it: of its model call, `_flow_velocity`)."""
        name = "denoising_step" if hasattr(model, "denoising_step") else "_flow_velocity"
        with steps.recording(model, name) as calls:
            steps.generate_image_latents(model, inputs, size, 2, STEP_SETTINGS)
        prefix = "model_call_" if name == "_flow_velocity" else ""
        return {prefix + key: value for key, value in steps.explain_graphs(getattr(model, name), *calls[0]).items()}

    @torch.no_grad()
    def _denoise_step_figures(self, model, inputs: dict, size: int, variant: str) -> dict:
        """Counts and time of one call of the step function (the baseline has none)."""
        if variant == "baseline":
            return {}
        with steps.recording(model, "denoising_step") as calls:
            steps.generate_image_latents(model, inputs, size, 2, STEP_SETTINGS)
        step = model._compiled_denoising_step(self.compile_config) if variant == "compiled" else model.denoising_step
        step(*calls[0]), step(*calls[0])
        counts = steps.count_ops(lambda: step(*calls[0]), host_reads=variant != "compiled")
        figures = {f"step_{key}": value for key, value in counts.record().items()}
        seconds = time_call(lambda: step(*calls[0]), self.device, warmup=0, repeats=max(3, self.settings.repeats))
        figures["step_ms"] = seconds * 1e3
        return figures

    @staticmethod
    def _ratios(records: dict[str, dict], key: str) -> None:
        """Adds each variant's time as a fraction of the eager one and of the baseline's (when measured)."""
        for name, record in records.items():
            record[f"{key}_vs_eager"] = record[key] / records["eager"][key]
            if "baseline" in records:
                record[f"{key}_vs_baseline"] = record[key] / records["baseline"][key]

    def peak_memory(self, weights: int) -> dict:
        """The largest peak of the batch-1 rows (the issue's figure) and of all rows, against the weights' bytes."""
        batch_one = [peak for peak, batch in self.peaks.values() if batch == 1]
        peak = max(batch_one or [peak_memory_bytes(self.device)])
        overall = max([peak for peak, _ in self.peaks.values()] or [peak])
        record = {
            "name": "peak_memory" + self.tag,
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
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = TINY if args.tiny else FULL
    overrides = {
        key: value
        for key, value in (("repeats", args.repeats), ("decode_tokens", args.decode_tokens), ("steps", args.steps),
                           ("step_image_size", args.step_size), ("step_tokens", args.step_tokens),
                           ("decode_batches", tuple(args.decode_batches or ()) or None),
                           ("t2i_sizes", tuple(args.t2i_sizes or ()) or None))
        if value is not None
    }
    settings = replace(settings, **overrides)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = tiny_config(args.depth) if args.tiny else full_size_config()
    report = JsonLinesReport(args.output)
    try:
        header = machine_header(device, "tiny" if args.tiny else "full", "bench_inference")
        header.update(depth=args.depth if args.tiny else "full", quantization=args.quantization, variants=args.variants,
                      compile_backend=args.compile_backend, compile_dynamic=args.compile_dynamic, baseline=args.baseline)
        if hasattr(os, "getloadavg"):
            header["load_average"] = list(os.getloadavg())
        report.emit(header)
        copy_record, matmul_record = ceilings_records(device, settings.copy_bytes, settings.matmul_size, dtype)
        report.emit(copy_record)
        report.emit(matmul_record)

        torch.manual_seed(0)
        begin = time.perf_counter()
        model = build_model(config, device, dtype)
        baseline = None
        if args.baseline is not None:
            baseline = steps.baseline_model(steps.load_baseline_package(args.baseline), model)
        quantized_layers = quantize_nf4(model) if args.quantization == "nf4" else 0
        weights = module_bytes(model)
        geometry = accounting.model_geometry(config)
        report.emit({
            "name": "model", "parameters": sum(p.numel() for p in model.parameters()), "weights_gib": weights / 2**30,
            "dtype": str(dtype).removeprefix("torch."), "build_seconds": time.perf_counter() - begin,
            "attn_implementation": config.text_config._attn_implementation,
            "decoder_layers": config.text_config.num_hidden_layers, "vit_layers": config.vision_config.num_hidden_layers,
            "quantization": args.quantization, "nf4_linear_layers": quantized_layers,
            "active_decode_bytes_per_token": (geometry.expert_params + geometry.lm_head_params) * next(model.parameters()).element_size(),
        })
        processor = tiny_image_processor() if args.tiny else UniMedVLImageProcessor()
        inputs = BenchmarkInputs(config, processor, device, settings.text_tokens)
        compile_config = steps.compile_config_for(device, args.compile_backend, dynamic=args.compile_dynamic)
        bench = InferenceBenchmark(
            model, config, settings, inputs, device, report, copy_record["value"], matmul_record["value"],
            full_size=not args.tiny, compile_config=compile_config, tag="_nf4" if args.quantization == "nf4" else "",
        )
        compiled_variants = [variant == "compiled" for variant in args.variants]
        rows = {
            "prefill": lambda: bench.prefill(),
            "decode": lambda: [bench.decode(batch, compiled) for batch in settings.decode_batches for compiled in compiled_variants],
            "text_to_image": lambda: [
                bench.text_to_image(size, compiled) for size in settings.t2i_sizes for compiled in compiled_variants
            ],
            "image_to_image": lambda: [bench.image_to_image(settings.i2i_size, compiled) for compiled in compiled_variants],
            "decode_step": lambda: bench.decode_step(baseline),
            "denoise_step": lambda: bench.denoise_step(baseline),
        }
        selected = list(dict.fromkeys(args.only or BENCHMARKS))
        for name in selected:
            rows[name]()
        if any(name in selected for name in BENCHMARKS):
            bench.peak_memory(weights)
    finally:
        report.close()
    return report.records


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model, small sizes, few steps (CPU by default)")
    parser.add_argument("--depth", choices=sorted(TINY_DEPTHS), default="tiny",
                        help="layers of the --tiny model: tiny (2 + 2) or full (28 decoder + 26 ViT layers)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda, or cpu with --tiny)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch.set_num_threads)")
    parser.add_argument("--output", default=None, help="also write the JSON lines to this file")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS + STEP_BENCHMARKS, default=None,
                        help=f"run only these rows (the step rows {', '.join(STEP_BENCHMARKS)} run only when named)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per row (median reported)")
    parser.add_argument("--decode-tokens", type=int, default=None, help="tokens generated in the decode rows")
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps of the image rows")
    parser.add_argument("--variants", nargs="+", choices=("eager", "compiled"), default=["eager"],
                        help="decode and image rows: eager, and/or compiled (static cache / compiled denoising step)")
    parser.add_argument("--decode-batches", nargs="+", type=int, default=None, help="batch sizes of the decode rows")
    parser.add_argument("--t2i-sizes", nargs="+", type=int, default=None, help="image sides of the text-to-image rows")
    parser.add_argument("--compile-dynamic", action="store_true",
                        help="compile with dynamic shapes (one graph for every batch size / image size; fewer compiles)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled variants (inductor; eager or aot_eager to check quickly)")
    parser.add_argument("--quantization", choices=("none", "nf4"), default="none", help="nf4: 4-bit NF4 linear layers")
    parser.add_argument("--baseline", default=None, metavar="REV",
                        help="step rows: also measure the package as committed at this git revision, same weights")
    parser.add_argument("--step-size", type=int, default=None, help="image side of the denoise_step row (default 512)")
    parser.add_argument("--step-tokens", type=int, default=None, help="tokens per timed run of the decode_step row")
    args = parser.parse_args(argv)
    if args.decode_tokens is not None and args.decode_tokens < 2:
        parser.error("--decode-tokens must be at least 2 (the decode time is t(n) - t(1)).")
    if args.step_tokens is not None and args.step_tokens < 5:
        parser.error("--step-tokens must be at least 5 (warm-up, counted and timed decoding steps).")
    if args.depth != "tiny" and not args.tiny:
        parser.error("--depth applies to the --tiny model (the full-size model has the release's depth).")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1.")
    return args


if __name__ == "__main__":
    run()
