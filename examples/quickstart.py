"""UniMedVL quickstart, fully offline: answer a question about a CT slice, generate an image, run image-to-image.

    python examples/quickstart.py [--model PATH] [--output-dir outputs/quickstart]

The model is `--model` (a converted UniMedVL folder), else the environment variable UNIMEDVL_MODEL. Until the package
ships its trained default model (UniMedVL-Tiny), the fallback is the tiny *randomly initialised* reference checkpoint
of the original layout in ../shared/reference/tiny_official, converted on the fly: the whole path runs, but its
answers and images are noise. The CT slice is `CT_small.dcm`, which ships inside the pydicom wheel.
"""

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from modeling_unimedvl import UniMedVLForConditionalGeneration, UniMedVLProcessor  # noqa: E402
from modeling_unimedvl.convert import convert_checkpoint  # noqa: E402


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference" / "tiny_official"


def resolve_model(path: str | None, output_dir: pathlib.Path) -> pathlib.Path:
    if path:
        return pathlib.Path(path)
    if (REFERENCE_DIR / "ema.safetensors").is_file():
        converted = output_dir / "reference-tiny-random"
        if not (converted / "config.json").is_file():
            convert_checkpoint(str(REFERENCE_DIR), str(converted), dtype=torch.float32)
        print(f"note: no --model given; using the random-weight reference checkpoint converted to {converted}")
        return converted
    sys.exit("error: no model: pass --model PATH (a folder made by `python -m modeling_unimedvl.convert`).")


def ct_slice() -> Image.Image:
    """CT_small.dcm in Hounsfield units with a soft-tissue window (centre 40, width 400), as an 8-bit image."""
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hounsfield = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    low, high = 40 - 400 / 2, 40 + 400 / 2
    pixels = np.clip((hounsfield - low) / (high - low), 0, 1) * 255
    return Image.fromarray(pixels.astype(np.uint8)).convert("RGB")


def save_image(images: torch.Tensor, path: pathlib.Path) -> pathlib.Path:
    pixels = ((images[0] * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("UNIMEDVL_MODEL"))
    parser.add_argument("--output-dir", default="outputs/quickstart")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    output_dir = pathlib.Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    model_dir = resolve_model(args.model, output_dir)
    model = UniMedVLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = UniMedVLProcessor.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(0)

    image = ct_slice()
    question = "What imaging modality is this, and which body region does it show?"
    inputs = processor(images=image, text=question)
    answer_ids = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = processor.decode_answers(answer_ids[:, inputs["input_ids"].shape[1] :])[0]
    print(f"Q: {question}\nA: {answer!r}")

    prompt = "Axial CT of the head, soft-tissue window."
    generated = model.generate(
        **processor(text=prompt, generation_mode="image"), generation_mode="image", height=128, width=128,
        num_inference_steps=args.steps, generator=generator,
    )
    print(f"text-to-image ({prompt!r}): {save_image(generated.images, output_dir / 'text_to_image.png')}")

    instruction = "Super-resolve this CT slice by a factor of two."
    edited = model.generate(
        **processor(images=image, text=instruction, generation_mode="image"), generation_mode="image",
        num_inference_steps=args.steps, cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0),
        cfg_renorm_type="text_channel", generator=generator,
    )
    print(f"image-to-image ({instruction!r}): {save_image(edited.images, output_dir / 'image_to_image.png')}")
    print(f"done in {time.perf_counter() - start:.1f} s; outputs in {output_dir.resolve()}")


if __name__ == "__main__":
    main()
