"""The reference folder's recorded cases (`golden.json` + `golden.safetensors`), run through the package's public API.

Shared by the float32 parity test and the bfloat16 test: which cases the folder holds, what the original ran for
each, and the package calls that reproduce it. Every size and setting comes from `golden.json`.
"""

import json
import pathlib

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file


def recorded_cases(reference_dir: pathlib.Path) -> list[str]:
    """The case prefixes of the tensors in `golden.safetensors` (none if the folder has no such file)."""
    path = reference_dir / "golden.safetensors"
    if not path.is_file():
        return []
    with safe_open(str(path), "pt") as handle:
        return sorted({key.split(".", 1)[0] for key in handle.keys()})


def load_golden(reference_dir: pathlib.Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with open(reference_dir / "golden.json") as handle:
        return json.load(handle), load_file(str(reference_dir / "golden.safetensors"))


def case_kind(case_name: str, case: dict | None) -> str:
    """What the original ran for a case, from its parameters in golden.json: `chat` (`Bagel.chat`),
    `interleave_understanding` (`interleave_inference(understanding_output=True)`), `generation`
    (`interleave_inference` with an image output) or `vae` (the autoencoder record)."""
    if case is None:
        return "vae" if case_name == "vae" else "unknown"
    if "image_shapes" in case:
        return "generation"
    if "max_think_token_n" in case:
        return "interleave_understanding"
    if "max_length" in case:
        return "chat"
    return "unknown"


def input_image(reference_dir: pathlib.Path, case: dict | None) -> Image.Image:
    return Image.open(reference_dir / (case or {}).get("input", "input.png"))


def understanding_inputs(processor, reference_dir, case: dict, kind: str):
    """Image then prompt, with the generation prompt; the image as `Bagel.chat` or the interleave inferencer sees it."""
    mode = "interleave_understanding" if kind == "interleave_understanding" else "understanding"
    return processor(images=input_image(reference_dir, case), text=case["prompt"], mode=mode)


def decoding_steps(case: dict, kind: str) -> int:
    return case["max_think_token_n"] if kind == "interleave_understanding" else case["max_length"]


def generation_inputs(processor, reference_dir, case: dict):
    """The prompt (and the input image, before or after the instruction as `order` says) in image mode, with the
    think system prompt when the case thinks."""
    think = bool(case.get("think", False))
    if "input" not in case:
        return processor(text=case["prompt"], generation_mode="image", think=think)
    instruction = case["instruction"]
    prompt = f"{instruction}<image>" if case.get("order", "image,text") == "text,image" else instruction
    return processor(images=input_image(reference_dir, case), text=prompt, generation_mode="image", think=think)


def with_generation_prompt(inputs, bos_token_id: int) -> dict:
    """`inputs` with `<|im_start|>` appended: the context in which the original decodes a text segment."""
    start = torch.full((inputs["input_ids"].shape[0], 1), bos_token_id, dtype=inputs["input_ids"].dtype)
    context = dict(inputs, input_ids=torch.cat([inputs["input_ids"], start], 1))
    context["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(start)], 1)
    return context


def sampler_settings(case: dict) -> dict:
    """The case's sampler arguments for `generate_image`."""
    height, width = case["image_shapes"]
    return dict(
        height=height,
        width=width,
        num_inference_steps=case["num_timesteps"],
        timestep_shift=case["timestep_shift"],
        cfg_text_scale=case["cfg_text_scale"],
        cfg_img_scale=case["cfg_img_scale"],
        cfg_interval=tuple(case["cfg_interval"]),
        cfg_renorm_type=case["cfg_renorm_type"],
        cfg_renorm_min=case["cfg_renorm_min"],
    )


def to_uint8(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[1, 3, H, W]` in [-1, 1] → the 8-bit image `[H, W, 3]` the original saves (truncation, in the images' dtype)
    and the float pixel values before truncation."""
    pixels = ((images * 0.5 + 0.5).clamp(0, 1) * 255).permute(0, 2, 3, 1)[0]
    return pixels.to(torch.uint8), pixels.float()
