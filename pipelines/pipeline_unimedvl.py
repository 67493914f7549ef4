"""diffusers pipelines of UniMedVL: text-to-image and image-conditioned generation (editing, super-resolution,
T2 ↔ FLAIR, H&E → IHC, counterfactuals), with the original's think mode, its editing flow's understanding step and its
VQA-with-reconstruction mode (`inference_ver=1`).

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

The scheduler gives the original schedule: `FlowMatchEulerDiscreteScheduler(shift=timestep_shift)` with
`set_timesteps(sigmas=linspace(1, 0, num_inference_steps)[:-1])`, i.e. `num_inference_steps − 1` Euler steps taken as
the original takes them (the model's `generate_image` does this with the scheduler it is given). Guidance follows
BAGEL/UniMedVL: `guidance_scale` is the text scale, `image_guidance_scale` the image scale, both active only while
`cfg_interval[0] < sigma ≤ cfg_interval[1]`, followed by the `cfg_renorm_type` renormalisation (`"global"`,
`"channel"`, `"text_channel"`) clamped below by `cfg_renorm_min`; the guidance contexts are built from the prompt
and images as the original's `interleave_inference` builds them (`modeling_unimedvl.cfg_context_masks`).

Defaults: the text-to-image defaults are the original BAGEL notebook's (`guidance_scale=4.0`,
`image_guidance_scale=1.0`, `cfg_interval=(0.4, 1.0)`, `global`); the original inferencer's own default image scale
for text-to-image is 1.5 (`UniMedVLForConditionalGeneration.generate_image` keeps it), which for a prompt without
an image only extrapolates the conditional branch with a third model evaluation per step — pass
`image_guidance_scale=1.5` to reproduce it. The editing defaults are UniMedVL's shipped editing flow's (below).

Randomness: `generator` is one `torch.Generator` or one per image. A row's VAE posterior samples and then its initial
noise (`[h·w, 64]`, CPU, float32) come from its generator, in the original's order, so the same seed gives the same
image as `model.generate(generation_mode="image")` and a row of a batch the same image as its single run with that
generator; a generator on another device than the draw is replaced by one there seeded with its `initial_seed()`
(`modeling_unimedvl.sampling_unimedvl`). Text steps that sample (`text_do_sample=True`) use the global RNG, as
transformers' `generate` does.

Outputs: `"pil"` and `"np"` carry the original's 8-bit pixels `((x·0.5 + 0.5).clamp(0, 1)·255).to(uint8)`
(truncation, computed in the VAE's dtype as the original does; `"np"` as float32 `[batch, H, W, 3]` = value / 255, so
`(np · 255).round()` gives those bytes back), `"pt"` the unquantized `[batch, 3, H, W]` float32 pixels in [0, 1],
`"latent"` the final latent tokens `[batch, h·w, 64]` (accepted back as `latents=`). Rows of different sizes (inputs
of different sizes without `height`/`width`) keep their own sizes; `"np"`, `"pt"` and `"latent"` are then lists with
one array / tensor per image.

Loading: `from_pretrained` reads both the converted transformers folder (`config.json` + safetensors + processor
files; the scheduler is built with the default shift 3.0 unless a `scheduler/` folder exists) and the diffusers layout
written by `save_pretrained` (`model_index.json`, `model/`, `processor/`, `scheduler/`). `dtype`, `device_map`,
`quantization_config` (e.g. `unimedvl_pipelines.quantization.bnb_config(bits=4)`) and `attn_implementation` go to the
model. Limitations: no `negative_prompt` (the text-guidance branch is the context without the prompt, as trained)
and no `interrupt` (the denoising loop runs inside the model's `generate_image`).
"""

import inspect
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from transformers import CompileConfig

from .medical_images import load_medical_image


try:
    from modeling_unimedvl.atomic_files import staged_folder, write_json
    from modeling_unimedvl.image_processing_unimedvl import to_rgb
    from modeling_unimedvl.sampling_unimedvl import check_sampler_arguments, generators_on
except ImportError:  # loaded by `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` without the package:
    from .atomic_files import staged_folder, write_json  # the saved folder carries these files next to this one
    from .image_processing_unimedvl import to_rgb
    from .sampling_unimedvl import check_sampler_arguments, generators_on


DEFAULT_TIMESTEP_SHIFT = 3.0
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
EDIT_ANSWER_SEPARATOR = "\n\n"
"""UniMedVL's shipped editing flow appends a non-empty understanding answer to the instruction after this separator."""
UNDERSTANDING_MAX_THINK_TOKEN_N = 800
"""Decoding steps of the editing flow's understanding answer (`codes/interactive_image_generator.py`)."""
PLANNING_MAX_THINK_TOKEN_N = 1000
"""Decoding steps of think mode's planning text (the default of the original's `interleave_inference`)."""
PIPELINE_CODE_MODULE = "pipeline_unimedvl"
"""Module name of the pipeline code in a saved folder (`model_index.json` `_class_name`: [module, class])."""
COMPONENT_CODE_MODULES = {"model": "modeling_unimedvl", "processor": "processing_unimedvl"}
"""Module file of each custom component's code inside its subfolder (written there by its `save_pretrained`)."""
SAMPLER_ARGUMENT_NAMES = {
    "cfg_text_scale": "guidance_scale",
    "cfg_img_scale": "image_guidance_scale",
}
"""The pipelines' names of the sampler arguments that the model calls otherwise."""


@dataclass
class UniMedVLPipelineOutput(BaseOutput):
    """`images`: list of PIL images, `np.ndarray` `[batch, H, W, 3]`, `torch.Tensor` `[batch, 3, H, W]` or latent tokens
    `[batch, h·w, 64]` (lists of per-image arrays / tensors when the images differ in size; `None` when nothing was
    generated); `text`: one string per image: the planning text (`think=True`), the understanding answer
    (`understanding_first=True`) or the VQA answer (`vqa_with_reconstruction`), else None."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | list | None
    text: list[str] | None = None


def default_scheduler(timestep_shift: float = DEFAULT_TIMESTEP_SHIFT) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler that gives the original schedule (static shift, no dynamic shifting)."""
    return FlowMatchEulerDiscreteScheduler(shift=timestep_shift)


def postprocess_images(images: torch.Tensor | list[torch.Tensor], output_type: str):
    """Decoded pixels `[batch, 3, H, W]` in [-1, 1] (or a list of `[3, H, W]` of different sizes) → `output_type`
    (see the module docstring). The 8-bit conversion runs in the images' dtype (the VAE's), as the original's."""
    if isinstance(images, (list, tuple)):
        converted = [postprocess_images(image[None], output_type)[0] for image in images]
        return converted
    pixels = (images * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return pixels.float()
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


def _as_input_image(image):
    """Paths (PNG/TIFF/DICOM/NIfTI) are read by `load_medical_image` with its defaults; PIL images, arrays and tensors
    go to the processor as they are (the original's `convert("RGB")`, no windowing)."""
    return load_medical_image(image) if isinstance(image, (str, os.PathLike)) else image


class UniMedVLPipeline(DiffusionPipeline):
    r"""
    Text-to-image generation with UniMedVL (and image-conditioned generation when `image=` is given).

    Args:
        model ([`UniMedVLForConditionalGeneration`]): the unified model; its VAE is `pipe.vae`.
        processor ([`UniMedVLProcessor`]): prompt and image preprocessing.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): the rectified-flow schedule (`shift` = timestep shift).
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
    """Text-to-image defaults of the original BAGEL notebook (module docstring); editing uses `UniMedVLImg2ImgPipeline`."""

    def __init__(
        self,
        model: "UniMedVLForConditionalGeneration",
        processor: "UniMedVLProcessor",
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
        """Loads this pipeline class from a diffusers-layout folder (`save_pretrained`: `model_index.json`, `model/`,
        `processor/`, `scheduler/`), a converted transformers folder (flat: `config.json`, weights, processor files) or
        a Hub repo of either, with the installed package's classes (no remote code runs).

        `model`, `processor`, `scheduler` may be passed ready-made; every other keyword argument (`dtype` /
        `torch_dtype`, `device_map`, `quantization_config`, `attn_implementation`, …) goes to
        `UniMedVLForConditionalGeneration.from_pretrained`. Without this package, `DiffusionPipeline.from_pretrained(
        folder, trust_remote_code=True)` loads a saved folder through the code that travels with it.
        """
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, revision=kwargs.pop("revision", None), token=kwargs.pop("token", None))
        if os.path.isfile(os.path.join(path, "model_index.json")):
            return cls.from_components_folder(path, **kwargs)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise OSError(f"{path} holds neither a model_index.json (diffusers layout) nor a config.json (converted UniMedVL folder).")
        return cls.from_components_folder(path, model_dir=path, processor_dir=path, **kwargs)

    @classmethod
    def from_components_folder(
        cls, path, model=None, processor=None, scheduler=None, model_dir=None, processor_dir=None, **model_kwargs
    ):
        """Builds the pipeline from the `model`, `processor` and `scheduler` found in `path` (their subfolders unless
        `model_dir` / `processor_dir` say otherwise; the default scheduler when there is no `scheduler/`)."""
        from modeling_unimedvl import UniMedVLForConditionalGeneration, UniMedVLProcessor

        if "torch_dtype" in model_kwargs:
            model_kwargs["dtype"] = model_kwargs.pop("torch_dtype")
        model_kwargs.setdefault("dtype", "auto")
        if model is None:
            model_dir = model_dir or os.path.join(path, "model")
            model = UniMedVLForConditionalGeneration.from_pretrained(model_dir, **model_kwargs).eval()
        if processor is None:
            processor = UniMedVLProcessor.from_pretrained(processor_dir or os.path.join(path, "processor"))
        if scheduler is None:
            scheduler_dir = os.path.join(path, "scheduler")
            if os.path.isfile(os.path.join(scheduler_dir, "scheduler_config.json")):
                scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(scheduler_dir)
            else:
                scheduler = default_scheduler()
        return cls(model=model, processor=processor, scheduler=scheduler)

    def save_pretrained(self, save_directory, overwrite: bool = True, **kwargs) -> None:
        """Writes the diffusers layout — `model_index.json`, `model/`, `processor/`, `scheduler/` — plus the code that
        loads it without this package (`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`): the
        pipeline module next to `model_index.json` and each component's code in its subfolder. The folder is staged
        and swapped into place (a non-empty `save_directory` is replaced unless `overwrite=False`)."""
        with staged_folder(os.fspath(save_directory), overwrite=overwrite) as staging:
            super().save_pretrained(staging, **kwargs)
            self._write_code_files(staging)

    def _write_code_files(self, folder: str) -> None:
        """Names the pipeline and component classes by their code files in `model_index.json` and copies the
        pipeline's code (this module and the modules it imports) next to it."""
        index_path = os.path.join(folder, "model_index.json")
        with open(index_path) as handle:
            index = json.load(handle)
        index["_class_name"] = [PIPELINE_CODE_MODULE, type(self).__name__]
        for name, module in COMPONENT_CODE_MODULES.items():
            component_class = type(getattr(self, name)).__name__
            if not os.path.isfile(os.path.join(folder, name, f"{module}.py")):
                raise OSError(f"{name}/ was saved without its code file {module}.py; import modeling_unimedvl first.")
            index[name] = [module, component_class]
        write_json(index_path, index)
        for function in (load_medical_image, to_rgb, check_sampler_arguments, write_json):
            source = inspect.getsourcefile(function)
            shutil.copyfile(source, os.path.join(folder, os.path.basename(source)))
        shutil.copyfile(__file__, os.path.join(folder, f"{PIPELINE_CODE_MODULE}.py"))

    # ------------------------------------------------------------------------------------------------ inputs

    def check_inputs(
        self, prompts, images, height, width, num_inference_steps, num_images_per_prompt, output_type,
        guidance_scale, image_guidance_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min, timestep_shift,
        callback_on_step_end_tensor_inputs,
    ) -> None:
        if not prompts or not all(isinstance(prompt, str) and prompt.strip() for prompt in prompts):
            raise ValueError(f"`prompt` must be a non-empty string or a list of non-empty strings, got {prompts!r}.")
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"Got images for {len(images)} prompts but {len(prompts)} prompts; give one image (list) per prompt.")
        factor = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % factor):
                raise ValueError(f"`{name}` must be a positive multiple of {factor}, got {value!r}.")
        if (height is None) != (width is None):
            given, missing = ("height", "width") if width is None else ("width", "height")
            raise ValueError(f"`{given}` was given without `{missing}`: give both (multiples of {factor}) or neither.")
        check_sampler_arguments(
            num_inference_steps, timestep_shift, guidance_scale, image_guidance_scale, cfg_interval, cfg_renorm_type,
            cfg_renorm_min, names=SAMPLER_ARGUMENT_NAMES,
        )
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be an integer of at least 1, got {num_images_per_prompt!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
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

    def answer_instructions(
        self,
        prompts: list[str],
        images: list[list] | None,
        max_think_token_n: int = UNDERSTANDING_MAX_THINK_TOKEN_N,
        text_do_sample: bool = False,
        text_temperature: float = 0.3,
    ) -> list[str]:
        """UniMedVL's editing flow, step 1: the understanding answers to the instructions about their images, as the
        original's `interleave_inference(understanding_output=True)`: each image resized by the VAE-side transform and
        then the ViT transform (`mode="interleave_understanding"`), the answer decoded by
        `model.generate_text_segment` (at most `max_think_token_n − 1` tokens)."""
        inputs = self.processor(images=images, text=prompts, mode="interleave_understanding").to(self._execution_device)
        return self.model.generate_text_segment(
            **inputs, tokenizer=self.processor.tokenizer, max_think_token_n=max_think_token_n,
            do_sample=text_do_sample, temperature=text_temperature,
        )

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
        latents: torch.Tensor | list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        understanding_first: bool = False,
        think: bool = False,
        max_think_token_n: int | None = None,
        text_do_sample: bool = False,
        text_temperature: float = 0.3,
        vae_encode: str = "sample",
        compile_config: CompileConfig | None = None,
    ) -> UniMedVLPipelineOutput | tuple:
        r"""
        Generates images from prompts (and input images).

        Args:
            prompt: the description / instruction, or a list of them (a batch).
            image: conditioning image(s): one for all prompts, one per prompt, or a list of images per prompt. PIL
                images, arrays and tensors go to the processor as they are (converted to RGB as the original does);
                paths (PNG/TIFF/DICOM/NIfTI) are read by `load_medical_image` with its default windowing (call it
                yourself for a window or slice).
            height, width: output size, both or neither, multiples of 16 (default: each prompt's first input
                image's VAE size, or the largest size of the latent position table — 1024 for the released model —
                without an input image).
            num_inference_steps: schedule points; the sampler makes `num_inference_steps − 1` model evaluations per
                guidance branch.
            guidance_scale: text guidance scale (`cfg_text_scale`; default 4.0); ≤ 1 disables guidance.
            image_guidance_scale: image guidance scale (`cfg_img_scale`; default 1.0 here — the original inferencer's
                is 1.5, see the module docstring — and 2.0 for editing).
            cfg_interval: `(low, high)` sigma range with guidance (default (0.4, 1.0); editing (0.0, 1.0)).
            cfg_renorm_type: `"global"` (default), `"channel"` or `"text_channel"` (editing default).
            cfg_renorm_min: lower clamp of the renorm factor (0.0; raise it against blur).
            timestep_shift: overrides the scheduler's `shift` for this call (default: the scheduler's, 3.0).
            num_images_per_prompt: images per prompt (prompt order is kept: p0, p0, p1, p1, …).
            generator: a `torch.Generator` (or one per image) for the VAE posterior samples and the initial noise.
            latents: initial noise tokens `[batch · num_images_per_prompt, h·w, 64]` instead of drawing them (a list
                of `[h·w, 64]` when the images differ in size).
            output_type: `"pil"`, `"np"`, `"pt"` or `"latent"` (module docstring).
            return_dict: return a [`UniMedVLPipelineOutput`] (else `(images,)`, or `(images, text)`).
            callback_on_step_end: `fn(pipe, step, timestep, callback_kwargs) -> dict` after every Euler step; a
                returned `"latents"` replaces the latents (`[batch, h·w, 64]`).
            callback_on_step_end_tensor_inputs: tensors passed in `callback_kwargs` (only `"latents"`).
            understanding_first: UniMedVL's shipped editing flow — answer the instruction about its image(s) first
                (`answer_instructions`), then generate from `instruction + "\n\n" + answer` (the instruction alone
                when the answer is empty). The answers are returned as `text`.
            think: the original's think mode — the planning system prompt, then a planning text generated on the
                full context and appended to it (not to the guidance contexts), then the image; the planning texts
                are returned as `text`. Not combined with `understanding_first`.
            max_think_token_n: decoding steps of those text steps, as the original's (the last step's token is not
                kept; default 800 for the understanding answer, 1000 for the planning text).
            text_do_sample, text_temperature: sample those texts at this temperature (default greedy).
            vae_encode: `"sample"` (the original) or `"mean"` encoding of the input images.
            compile_config: a transformers `CompileConfig`: the denoising step is compiled with it (e.g.
                `CompileConfig(fullgraph=True, mode="reduce-overhead")`: CUDA graphs on a GPU); the same images.
        """
        defaults = self._default_guidance
        guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        image_guidance_scale = defaults["image_guidance_scale"] if image_guidance_scale is None else image_guidance_scale
        cfg_interval = defaults["cfg_interval"] if cfg_interval is None else cfg_interval
        cfg_renorm_type = defaults["cfg_renorm_type"] if cfg_renorm_type is None else cfg_renorm_type
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        images = self._images_per_prompt(image, len(prompts))
        self.check_inputs(
            prompts, images, height, width, num_inference_steps, num_images_per_prompt, output_type, guidance_scale,
            image_guidance_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min, timestep_shift,
            callback_on_step_end_tensor_inputs,
        )
        if understanding_first and think:
            raise ValueError("Use `understanding_first` or `think`, not both: each adds its own text step.")
        if images is not None:
            images = [[_as_input_image(item) for item in row] for row in images]
        self._guidance_scale, self._image_guidance_scale = guidance_scale, image_guidance_scale
        self._num_timesteps = num_inference_steps - 1
        self._current_timestep = None
        device = self._execution_device
        _onload(self.model)

        text = None
        if understanding_first:
            steps = UNDERSTANDING_MAX_THINK_TOKEN_N if max_think_token_n is None else max_think_token_n
            text = self.answer_instructions(prompts, images, steps, text_do_sample, text_temperature)
            prompts = [f"{p}{EDIT_ANSWER_SEPARATOR}{answer}" if answer else p for p, answer in zip(prompts, text)]
            text = [answer for answer in text for _ in range(num_images_per_prompt)]
        prompts = [row_prompt for row_prompt in prompts for _ in range(num_images_per_prompt)]
        if images is not None:
            images = [row for row in images for _ in range(num_images_per_prompt)]
        inputs = self.processor(images=images, text=prompts, generation_mode="image", think=think).to(device)
        thinking = {}
        if think:
            steps = PLANNING_MAX_THINK_TOKEN_N if max_think_token_n is None else max_think_token_n
            thinking = dict(
                think=True, tokenizer=self.processor.tokenizer, max_think_token_n=steps,
                text_do_sample=text_do_sample, text_temperature=text_temperature,
            )

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
                cfg_interval=tuple(cfg_interval),
                cfg_renorm_type=cfg_renorm_type,
                cfg_renorm_min=cfg_renorm_min,
                latents=latents,
                generator=generator,
                vae_encode=vae_encode,
                decode=output_type != "latent",
                callback_on_step_end=on_step_end,
                scheduler=scheduler,
                compile_config=compile_config,
                **thinking,
            )
        self._current_timestep = None
        if think:
            text = result.text
        output = result.latents if output_type == "latent" else postprocess_images(result.images, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (output,) if text is None else (output, text)
        return UniMedVLPipelineOutput(images=output, text=text)

    # ------------------------------------------------------------------------------------------------ inference_ver=1

    @torch.no_grad()
    def vqa_with_reconstruction(
        self,
        image,
        question: str,
        reconstruct_image: bool = False,
        max_think_token_n: int = 1000,
        text_do_sample: bool = False,
        text_temperature: float = 0.3,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        image_guidance_scale: float = 1.5,
        cfg_interval: tuple[float, float] = (0.4, 1.0),
        cfg_renorm_type: str = "global",
        cfg_renorm_min: float = 0.0,
        timestep_shift: float = 3.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
    ) -> UniMedVLPipelineOutput:
        r"""
        The original's `InterleaveInferencer(image, text, inference_ver=1)`: VQA with the images encoded by the VAE
        and the ViT, and optionally a "reconstruction" of every input image from the answer.

        The images (one or a list, in order) enter as a clean VAE block and a ViT block each (posterior sample from
        `generator`), then the question; the answer is decoded as `model.generate_text_segment` does
        (`max_think_token_n`, greedy unless `text_do_sample`). With `reconstruct_image` and a non-blank answer, each
        input image is then generated at its own VAE size from `[images, question, answer]`, with the text-guidance
        context without the answer and the image-guidance context `[question, answer]`; every generated image is
        appended (as a VAE block, encoded from its 8-bit pixels) to the full and text-guidance contexts before the
        next one. Defaults are the original mode's (guidance 3.0 / 1.5 on (0.4, 1.0], global renorm, 50 steps,
        shift 3). Returns `images` (`None` without reconstruction) and `text` (`[answer]`).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"`question` must be a non-empty string, got {question!r}.")
        check_sampler_arguments(
            num_inference_steps, timestep_shift, guidance_scale, image_guidance_scale, cfg_interval, cfg_renorm_type,
            cfg_renorm_min, names=SAMPLER_ARGUMENT_NAMES,
        )
        images = [_as_input_image(item) for item in (image if isinstance(image, (list, tuple)) else [image])]
        model, config, device = self.model, self.model.config, self._execution_device
        _onload(model)
        inputs = self.processor(images=images, text=question, mode="generation").to(device)
        vae_generator = generators_on(generator, 1, self.vae.device)[0]
        encoded, grids = model.model.encode_images(inputs["vae_pixel_values"], sample=True, generator=vae_generator)
        vit_inputs = {"pixel_values": inputs["pixel_values"], "image_grid_hw": inputs["image_grid_hw"]}
        answer = model.generate_text_segment(
            inputs["input_ids"], inputs["attention_mask"], self.processor.tokenizer, max_think_token_n,
            text_do_sample, text_temperature, latents=encoded, latent_grid_hw=grids, **vit_inputs,
        )[0]
        if not reconstruct_image or not answer.strip():
            self.maybe_free_model_hooks()
            return UniMedVLPipelineOutput(images=None, text=[answer])

        tokens = self.processor.tokenizer.encode(answer, add_special_tokens=False)
        context = torch.cat([inputs["input_ids"][:, :-1], torch.tensor([[config.bos_token_id, *tokens, config.eos_token_id]], device=device)], 1)
        answer_span = torch.zeros_like(context, dtype=torch.bool)
        answer_span[:, inputs["input_ids"].shape[1] - 1 :] = True
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config, shift=timestep_shift)
        outputs = []
        for index in range(len(images)):
            height, width = (int(side) * self.vae_scale_factor for side in grids[index].tolist())
            result = model.generate_image(
                input_ids=context, image_latents=(encoded, grids), height=height, width=width,
                num_inference_steps=num_inference_steps, cfg_text_scale=guidance_scale, cfg_img_scale=image_guidance_scale,
                cfg_interval=tuple(cfg_interval), cfg_renorm_type=cfg_renorm_type, cfg_renorm_min=cfg_renorm_min,
                cfg_text_mask=~answer_span, generator=generator, scheduler=scheduler,
                **vit_inputs,
            )
            outputs.append(result.latents[0] if output_type == "latent" else result.images[0])
            if index + 1 < len(images):
                generated = postprocess_images(result.images, "pil")[0]
                pixels = self.processor.image_processor(generated, mode="generation")["vae_pixel_values"][0]
                new_tokens, new_grid = model.model.encode_images([pixels], sample=True, generator=vae_generator)
                encoded, grids = torch.cat([encoded, new_tokens]), torch.cat([grids, new_grid])
                block = [config.vision_start_token_id] + [config.latent_token_id] * new_tokens.shape[0] + [config.vision_end_token_id]
                context = torch.cat([context, torch.tensor([block], device=device)], 1)
                answer_span = torch.cat([answer_span, torch.zeros(1, len(block), dtype=torch.bool, device=device)], 1)
        self.maybe_free_model_hooks()
        output = outputs if output_type == "latent" else postprocess_images(outputs, output_type)
        return UniMedVLPipelineOutput(images=output, text=[answer])


class UniMedVLImg2ImgPipeline(UniMedVLPipeline):
    r"""
    Image-conditioned generation with UniMedVL: editing, super-resolution, modality translation (T2 ↔ FLAIR),
    stain translation (H&E → IHC) and counterfactuals. The input image enters the context as a clean VAE block and a
    ViT block; the output has the input's VAE size unless `height`/`width` are given. Defaults are UniMedVL's shipped
    editing settings: `guidance_scale=4.0`, `image_guidance_scale=2.0`, `cfg_interval=(0.0, 1.0)`,
    `cfg_renorm_type="text_channel"` (with `understanding_first=True` for its answer step). Same components and
    arguments as [`UniMedVLPipeline`], but `image` is required.
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
