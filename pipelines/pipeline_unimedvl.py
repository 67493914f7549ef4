"""diffusers pipelines of UniMedVL: text-to-image and image-conditioned generation (editing, super-resolution,
T2 ↔ FLAIR, H&E → IHC, counterfactuals).

    from unimedvl_pipelines import UniMedVLPipeline, UniMedVLImg2ImgPipeline
    pipe = UniMedVLPipeline.from_pretrained("path/to/converted", dtype=torch.bfloat16).to("cuda")
    image = pipe("Axial T1 brain MRI with a ring-enhancing lesion", height=512, width=512,
                 generator=torch.Generator().manual_seed(0)).images[0]
    edit = UniMedVLImg2ImgPipeline.from_pipe(pipe)
    flair = edit("Generate a FLAIR image from the given T2 MRI slice.", image="t2.dcm").images[0]

Components: `model` (`UniMedVLForConditionalGeneration`, the denoiser, text encoder and VAE in one module),
`processor` (`UniMedVLProcessor`) and `scheduler` (`FlowMatchEulerDiscreteScheduler`). **The VAE is not a separate
component**: it lives inside the model as `model.model.vae` and the pipeline exposes that very module as the
read-only property `pipe.vae` (`pipe.vae is pipe.model.model.vae`), so its weights exist once in memory and once on
disk (inside the model's safetensors). `enable_model_cpu_offload()` therefore moves the model and its VAE together.

The scheduler reproduces the original sampler exactly: `FlowMatchEulerDiscreteScheduler(shift=timestep_shift)` with
`set_timesteps(sigmas=linspace(1, 0, num_inference_steps)[:-1])`, i.e. `num_inference_steps − 1` Euler steps
(the model's `generate_image` does this with the scheduler it is given). Guidance follows BAGEL/UniMedVL:
`guidance_scale` is the text scale (context without the prompt), `image_guidance_scale` the image scale (context
without the input images), both active only while `cfg_interval[0] < sigma ≤ cfg_interval[1]`, followed by the
`cfg_renorm_type` renormalisation (`"global"`, `"channel"`, `"text_channel"`) clamped below by `cfg_renorm_min`.
Initial noise `[batch, h·w, 64]` is drawn on the CPU from `generator` (one generator, or one per image), as the
original does, so the same seed gives the same image as `model.generate(generation_mode="image")`.

Outputs: `"pil"` and `"np"` carry the original's 8-bit pixels `((x·0.5 + 0.5).clamp(0, 1)·255).to(uint8)`
(truncation; `"np"` as float32 `[batch, H, W, 3]` = value / 255, so `(np · 255).round()` gives those bytes back),
`"pt"` the unquantized `[batch, 3, H, W]` float pixels in [0, 1], `"latent"` the final latent tokens
`[batch, h·w, 64]` (accepted back as `latents=`).

Loading: `from_pretrained` reads both the converted transformers folder (`config.json` + safetensors + processor
files; the scheduler is built with the default shift 3.0 unless a `scheduler/` folder exists) and the diffusers layout
written by `save_pretrained` (`model_index.json`, `model/`, `processor/`, `scheduler/`). `dtype`, `device_map`,
`quantization_config` (e.g. `unimedvl_pipelines.quantization.bnb_config(bits=4)`) and `attn_implementation` go to the
model. Limitations: no `negative_prompt` (the text-guidance branch is the context without the prompt, as trained)
and no `interrupt` (the denoising loop runs inside the model's `generate_image`).
"""

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput

from modeling_unimedvl import UniMedVLForConditionalGeneration, UniMedVLProcessor

from .medical_images import load_medical_image


DEFAULT_TIMESTEP_SHIFT = 3.0
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
EDIT_ANSWER_SEPARATOR = "\n\n"
"""UniMedVL's shipped editing flow appends the understanding answer to the instruction after this separator."""


@dataclass
class UniMedVLPipelineOutput(BaseOutput):
    """`images`: list of PIL images, `np.ndarray` `[batch, H, W, 3]`, `torch.Tensor` `[batch, 3, H, W]` or latent tokens
    `[batch, h·w, 64]`; `text`: the understanding answers appended to the prompts (`understanding_first=True`), else None."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    text: list[str] | None = None


def default_scheduler(timestep_shift: float = DEFAULT_TIMESTEP_SHIFT) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler that reproduces the original sampler (static shift, no dynamic shifting)."""
    return FlowMatchEulerDiscreteScheduler(shift=timestep_shift)


def postprocess_images(images: torch.Tensor, output_type: str):
    """Decoded pixels `[batch, 3, H, W]` in [-1, 1] → `output_type` (see the module docstring)."""
    pixels = (images.float() * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return pixels
    as_uint8 = (pixels * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return as_uint8.astype(np.float32) / 255.0
    return [PIL.Image.fromarray(array) for array in as_uint8]


def _onload(module: torch.nn.Module) -> None:
    """Moves an offloaded component to its execution device before a call that does not go through `forward`
    (what diffusers' `apply_forward_hook` does for VAE methods)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(module)


class UniMedVLPipeline(DiffusionPipeline):
    r"""
    Text-to-image generation with UniMedVL (and image-conditioned generation when `image=` is given).

    Args:
        model ([`UniMedVLForConditionalGeneration`]): the unified model; its VAE is `pipe.vae`.
        processor ([`UniMedVLProcessor`]): prompt and image preprocessing.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): the rectified-flow sampler (`shift` = timestep shift).
    """

    model_cpu_offload_seq = "model"
    _callback_tensor_inputs = ["latents"]
    _optional_components = []
    _default_guidance = {
        "guidance_scale": 4.0,
        "image_guidance_scale": 1.0,
        "cfg_interval": (0.4, 1.0),
        "cfg_renorm_type": "global",
    }
    """Defaults of the original text-to-image settings (reference-model §13); editing uses `UniMedVLImg2ImgPipeline`."""

    def __init__(
        self,
        model: UniMedVLForConditionalGeneration,
        processor: UniMedVLProcessor,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ):
        super().__init__()
        self.register_modules(model=model, processor=processor, scheduler=scheduler)

    @property
    def vae(self):
        """The model's own `AutoencoderKL` (`model.model.vae`); not a separate component, never duplicated."""
        return self.model.model.vae

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent token side (16): height and width must be multiples of it."""
        return self.model.config.latent_downsample

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def image_guidance_scale(self) -> float:
        return self._image_guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def current_timestep(self):
        return self._current_timestep

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Loads a converted transformers folder (flat layout) or a diffusers-layout folder / Hub repo.

        Flat layout: `model`, `processor`, `scheduler` may be passed ready-made; every other keyword argument
        (`dtype` / `torch_dtype`, `device_map`, `quantization_config`, `attn_implementation`, …) goes to
        `UniMedVLForConditionalGeneration.from_pretrained`.
        """
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, revision=kwargs.pop("revision", None), token=kwargs.pop("token", None))
        if os.path.isfile(os.path.join(path, "model_index.json")):
            return super().from_pretrained(path, **kwargs)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise OSError(f"{path} holds neither a model_index.json (diffusers layout) nor a config.json (converted UniMedVL folder).")
        return cls.from_transformers_folder(path, **kwargs)

    @classmethod
    def from_transformers_folder(cls, path, model=None, processor=None, scheduler=None, **model_kwargs):
        """Builds the pipeline from the folder written by `python -m modeling_unimedvl.convert`."""
        if "torch_dtype" in model_kwargs:
            model_kwargs["dtype"] = model_kwargs.pop("torch_dtype")
        model_kwargs.setdefault("dtype", "auto")
        if model is None:
            model = UniMedVLForConditionalGeneration.from_pretrained(path, **model_kwargs).eval()
        if processor is None:
            processor = UniMedVLProcessor.from_pretrained(path)
        if scheduler is None:
            scheduler_dir = os.path.join(path, "scheduler")
            if os.path.isfile(os.path.join(scheduler_dir, "scheduler_config.json")):
                scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(scheduler_dir)
            else:
                scheduler = default_scheduler()
        return cls(model=model, processor=processor, scheduler=scheduler)

    # ------------------------------------------------------------------------------------------------ inputs

    def check_inputs(
        self, prompts, images, height, width, num_inference_steps, num_images_per_prompt, output_type,
        cfg_interval, callback_on_step_end_tensor_inputs,
    ) -> None:
        if not prompts or not all(isinstance(prompt, str) and prompt.strip() for prompt in prompts):
            raise ValueError(f"`prompt` must be a non-empty string or a list of non-empty strings, got {prompts!r}.")
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"Got images for {len(images)} prompts but {len(prompts)} prompts; give one image (list) per prompt.")
        factor = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if value is not None and (not isinstance(value, int) or value <= 0 or value % factor):
                raise ValueError(f"`{name}` must be a positive multiple of {factor}, got {value!r}.")
        if num_inference_steps < 2:
            raise ValueError(f"`num_inference_steps` must be at least 2 (one Euler step), got {num_inference_steps}.")
        if num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be at least 1, got {num_images_per_prompt}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if len(cfg_interval) != 2 or not 0.0 <= cfg_interval[0] <= cfg_interval[1] <= 1.0:
            raise ValueError(f"`cfg_interval` must be (low, high) with 0 <= low <= high <= 1, got {cfg_interval!r}.")
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may only hold {self._callback_tensor_inputs}, got {sorted(unknown)}."
            )

    @staticmethod
    def _images_per_prompt(image, num_prompts: int) -> list[list] | None:
        """`image`: one image (for every prompt), a list with one image per prompt, or a list of image lists."""
        if image is None:
            return None
        if not isinstance(image, (list, tuple)):
            return [[image] for _ in range(num_prompts)]
        if all(isinstance(item, (list, tuple)) for item in image):
            return [list(item) for item in image]
        if len(image) == 1:
            return [[image[0]] for _ in range(num_prompts)]
        return [[item] for item in image]

    def answer_instructions(self, prompts: list[str], images: list[list] | None, max_new_tokens: int) -> list[str]:
        """UniMedVL's editing flow, step 1: greedy understanding answers to the instructions about their images."""
        inputs = self.processor(images=images, text=prompts).to(self._execution_device)
        generated = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return self.processor.decode_answers(generated[:, inputs["input_ids"].shape[1] :])

    # ------------------------------------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        cfg_interval: tuple[float, float] | None = None,
        cfg_renorm_type: str | None = None,
        cfg_renorm_min: float = 0.0,
        timestep_shift: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        understanding_first: bool = False,
        understanding_max_new_tokens: int = 800,
        vae_encode: str = "sample",
        think: bool = False,
    ) -> UniMedVLPipelineOutput | tuple:
        r"""
        Generates images from prompts (and input images).

        Args:
            prompt: the description / instruction, or a list of them (a batch).
            image: conditioning image(s): one for all prompts, one per prompt, or a list of images per prompt. PIL
                images, arrays, tensors and paths (PNG/TIFF/DICOM/NIfTI, read with default windowing by
                `load_medical_image`; call it yourself for a window or slice).
            height, width: output size, multiples of 16 (default: the input image's VAE size, or the largest size of
                the latent position table — 1024 for the released model — without an input image).
            num_inference_steps: schedule points; the sampler makes `num_inference_steps − 1` model evaluations per
                guidance branch.
            guidance_scale: text guidance scale (`cfg_text_scale`; default 4.0); ≤ 1 disables guidance.
            image_guidance_scale: image guidance scale (`cfg_img_scale`; default 1.0 here, 2.0 for editing).
            cfg_interval: `(low, high)` sigma range with guidance (default (0.4, 1.0); editing (0.0, 1.0)).
            cfg_renorm_type: `"global"` (default), `"channel"` or `"text_channel"` (editing default).
            cfg_renorm_min: lower clamp of the renorm factor (0.0; raise it against blur).
            timestep_shift: overrides the scheduler's `shift` for this call (default: the scheduler's, 3.0).
            num_images_per_prompt: images per prompt (prompt order is kept: p0, p0, p1, p1, …).
            generator: a CPU `torch.Generator` (or one per image) for the initial noise and the VAE posterior sample.
            latents: initial noise tokens `[batch · num_images_per_prompt, h·w, 64]` instead of drawing them.
            output_type: `"pil"`, `"np"`, `"pt"` or `"latent"` (module docstring).
            return_dict: return a [`UniMedVLPipelineOutput`] (else `(images,)`, or `(images, text)`).
            callback_on_step_end: `fn(pipe, step, timestep, callback_kwargs) -> dict` after every Euler step; a
                returned `"latents"` replaces the latents (`[batch, h·w, 64]`).
            callback_on_step_end_tensor_inputs: tensors passed in `callback_kwargs` (only `"latents"`).
            understanding_first: UniMedVL's shipped editing flow — answer the instruction with the understanding
                expert first (greedy, `understanding_max_new_tokens`), then generate from
                `instruction + "\n\n" + answer`. The answers are returned as `text`.
            vae_encode: `"sample"` (the original) or `"mean"` encoding of the input images.
            think: prefill the original "planning" system prompt (think mode without the text-generation step).
        """
        defaults = self._default_guidance
        guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        image_guidance_scale = defaults["image_guidance_scale"] if image_guidance_scale is None else image_guidance_scale
        cfg_interval = tuple(defaults["cfg_interval"] if cfg_interval is None else cfg_interval)
        cfg_renorm_type = defaults["cfg_renorm_type"] if cfg_renorm_type is None else cfg_renorm_type
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        images = self._images_per_prompt(image, len(prompts))
        self.check_inputs(
            prompts, images, height, width, num_inference_steps, num_images_per_prompt, output_type, cfg_interval,
            callback_on_step_end_tensor_inputs,
        )
        if images is not None:
            images = [[load_medical_image(item) for item in row] for row in images]
        self._guidance_scale, self._image_guidance_scale = guidance_scale, image_guidance_scale
        self._num_timesteps = num_inference_steps - 1
        self._current_timestep = None
        device = self._execution_device
        _onload(self.model)

        answers = None
        if understanding_first:
            answers = self.answer_instructions(prompts, images, understanding_max_new_tokens)
            prompts = [f"{text}{EDIT_ANSWER_SEPARATOR}{answer}" for text, answer in zip(prompts, answers)]
        prompts = [text for text in prompts for _ in range(num_images_per_prompt)]
        if images is not None:
            images = [row for row in images for _ in range(num_images_per_prompt)]
        inputs = self.processor(images=images, text=prompts, generation_mode="image", think=think).to(device)

        scheduler = self.scheduler
        if timestep_shift is not None:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config, shift=timestep_shift)

        with self.progress_bar(total=self._num_timesteps) as progress_bar:

            def on_step_end(step: int, timestep: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
                self._current_timestep = timestep
                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for name in callback_on_step_end_tensor_inputs:
                        callback_kwargs[name] = latents
                    outputs = callback_on_step_end(self, step, timestep, callback_kwargs) or {}
                    latents = outputs.pop("latents", latents)
                progress_bar.update()
                return latents

            result = self.model.generate_image(
                **inputs,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                cfg_text_scale=guidance_scale,
                cfg_img_scale=image_guidance_scale,
                cfg_interval=cfg_interval,
                cfg_renorm_type=cfg_renorm_type,
                cfg_renorm_min=cfg_renorm_min,
                latents=latents,
                generator=generator,
                vae_encode=vae_encode,
                decode=False,
                callback_on_step_end=on_step_end,
                scheduler=scheduler,
            )
        self._current_timestep = None
        final_latents = result.latents
        if output_type == "latent":
            output = final_latents
        else:
            height, width = self.model.output_size(height, width, inputs.get("vae_pixel_values"))
            grid_h, grid_w = height // self.vae_scale_factor, width // self.vae_scale_factor
            output = postprocess_images(self.model.decode_latents(final_latents, grid_h, grid_w), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (output,) if answers is None else (output, answers)
        return UniMedVLPipelineOutput(images=output, text=answers)


class UniMedVLImg2ImgPipeline(UniMedVLPipeline):
    r"""
    Image-conditioned generation with UniMedVL: editing, super-resolution, modality translation (T2 ↔ FLAIR),
    stain translation (H&E → IHC) and counterfactuals. The input image enters the context as a clean VAE block and a
    ViT block; the output has the input's VAE size unless `height`/`width` are given. Defaults are the original
    editing settings: `guidance_scale=4.0`, `image_guidance_scale=2.0`, `cfg_interval=(0.0, 1.0)`,
    `cfg_renorm_type="text_channel"`. Same components and arguments as [`UniMedVLPipeline`], but `image` is required.
    """

    _default_guidance = {
        "guidance_scale": 4.0,
        "image_guidance_scale": 2.0,
        "cfg_interval": (0.0, 1.0),
        "cfg_renorm_type": "text_channel",
    }

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], image=None, **kwargs) -> UniMedVLPipelineOutput | tuple:
        if image is None:
            raise ValueError("UniMedVLImg2ImgPipeline needs `image`; use UniMedVLPipeline for text-to-image.")
        return super().__call__(prompt, image=image, **kwargs)


UniMedVLImg2ImgPipeline.__call__.__signature__ = inspect.signature(UniMedVLPipeline.__call__)

__all__ = [
    "UniMedVLImg2ImgPipeline",
    "UniMedVLPipeline",
    "UniMedVLPipelineOutput",
    "default_scheduler",
    "postprocess_images",
]
