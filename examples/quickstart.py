"""UniMedVL quickstart, fully offline: answer questions about a CT slice, generate an image, run 2× super-resolution.

    python examples/quickstart.py [--model PATH] [--output-dir outputs/quickstart]

The model is `--model` (a converted UniMedVL folder or Hub id), else the environment variable UNIMEDVL_MODEL, else the
package's shipped default, UniMedVL-Tiny (`modeling_unimedvl/unimedvl_tiny/`, trained by
`python -m unimedvl_training.build_unimedvl_tiny`; see `model_cards/UniMedVL-Tiny.md`). The CT slice is
`CT_small.dcm`, which ships inside the pydicom wheel, read with the soft-tissue window exactly as the demo's example
of that file and `unimedvl ask ... --window soft_tissue` read it. The prompts are the formats UniMedVL-Tiny was trained on; images are
generated at the model's largest size (64 px for Tiny).

Writes to the output folder: `question_input.png` (the slice as the model sees it), `text_to_image.png`,
`super_resolution_input.png` / `super_resolution_output.png` / `super_resolution_reference.png` (the slice at the
model's size, halved and enlarged back as the model's input; the model's output; the slice itself) and
`quickstart.png`, all of them side by side and enlarged (the picture in the README).
"""

import argparse
import os
import pathlib
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from modeling_unimedvl import UniMedVLForConditionalGeneration, UniMedVLProcessor, resolve_model_path  # noqa: E402
from modeling_unimedvl.default_model import TINY_IMAGE_TO_IMAGE, TINY_TEXT_TO_IMAGE, describe_model  # noqa: E402
from unimedvl_pipelines.medical_images import load_medical_image  # noqa: E402
from unimedvl_pipelines.pipeline_unimedvl import postprocess_images  # noqa: E402


QUESTIONS = ("What modality is this image?", "Which body region is shown?", "In which plane was this image taken?")
PROMPT = "CT, axial, head"
INSTRUCTION = "Increase the resolution of this image by a factor of two."
PANEL_SIDE = 192
CT_WINDOW = "soft_tissue"
"""`CT_small.dcm` stores no window; its full range (the loader's default then) looks unlike the windowed CT images
UniMedVL-Tiny was trained on, so the quickstart and the demo's example name a CT window."""


def ct_slice() -> Image.Image:
    """pydicom's `CT_small.dcm` with the soft-tissue window, read exactly as the demo's example of that file and
    `unimedvl ask CT_small.dcm ... --window soft_tissue` read it (the file stores no window of its own)."""
    return load_medical_image(get_testdata_file("CT_small.dcm"), window=CT_WINDOW)


def answer_questions(model, processor, image: Image.Image, questions) -> list[str]:
    """Greedy answers of the model to `questions` about `image` (one batch)."""
    inputs = processor(images=[[image]] * len(questions), text=list(questions))
    answer_ids = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    return [answer.strip() for answer in processor.decode_answers(answer_ids[:, inputs["input_ids"].shape[1] :])]


def psnr(image: Image.Image, reference: Image.Image) -> float:
    """PSNR (dB) of two grey 8-bit images of one size."""
    error = np.asarray(image.convert("L"), dtype=np.float64) - np.asarray(reference.convert("L"), dtype=np.float64)
    return float(10 * np.log10(255.0**2 / max(np.mean(error**2), 1e-10)))


def panel(images: list[tuple[str, Image.Image]], side: int = PANEL_SIDE) -> Image.Image:
    """The images side by side, each enlarged (nearest neighbour) to `side` px on its long side, captioned below."""
    caption_height = 34
    strip = Image.new("RGB", (side * len(images), side + caption_height), "white")
    draw = ImageDraw.Draw(strip)
    for index, (caption, image) in enumerate(images):
        factor = side / max(image.size)
        shown = image.resize((round(image.width * factor), round(image.height * factor)), Image.NEAREST)
        strip.paste(shown, (index * side + (side - shown.width) // 2, (side - shown.height) // 2))
        for line, text in enumerate(caption.split("\n")):
            draw.text((index * side + 4, side + 2 + 15 * line), text, fill="black")
    return strip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="converted UniMedVL folder or Hub id (default: UNIMEDVL_MODEL, else UniMedVL-Tiny)")
    parser.add_argument("--output-dir", default="outputs/quickstart")
    args = parser.parse_args(argv)
    output_dir = pathlib.Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    model_dir = resolve_model_path(args.model)
    model = UniMedVLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = UniMedVLProcessor.from_pretrained(model_dir)
    name, nature = describe_model(model_dir, model)
    print(f"model: {model_dir}\n{name}: {nature}")

    # Questions about pydicom's CT slice, read as the demo and the CLI read it with the same window
    image = ct_slice()
    seen = processor.image_processor.resize(image, processor.image_processor.understanding_transform)
    seen.save(output_dir / "question_input.png")
    answers = answer_questions(model, processor, image, QUESTIONS)
    for question, answer in zip(QUESTIONS, answers):
        print(f"Q: {question}\nA: {answer!r}")

    # Text to image
    generated = model.generate(
        **processor(text=PROMPT, generation_mode="image"), generation_mode="image", generator=torch.Generator().manual_seed(0),
        **TINY_TEXT_TO_IMAGE,
    )
    text_to_image = postprocess_images(generated.images, "pil")[0]
    text_to_image.save(output_dir / "text_to_image.png")
    print(f"text-to-image ({PROMPT!r}): {output_dir / 'text_to_image.png'}")

    # 2x super-resolution: the slice at the model's size is the reference; halved and enlarged back, the input
    image_processor = processor.image_processor
    reference = image_processor.resize(image, image_processor.generation_vae_transform).convert("L").convert("RGB")
    low = reference.resize((reference.width // 2, reference.height // 2), Image.BICUBIC).resize(reference.size, Image.BICUBIC)
    edited = model.generate(
        **processor(images=low, text=INSTRUCTION, generation_mode="image"), generation_mode="image",
        generator=torch.Generator().manual_seed(0), **TINY_IMAGE_TO_IMAGE,
    )
    output = postprocess_images(edited.images, "pil")[0]
    for file_name, picture in (("input", low), ("output", output), ("reference", reference)):
        picture.save(output_dir / f"super_resolution_{file_name}.png")
    print(
        f"2x super-resolution ({INSTRUCTION!r}): {output_dir / 'super_resolution_output.png'}; PSNR against the slice "
        f"{psnr(output, reference):.2f} dB (bicubic input {psnr(low, reference):.2f} dB)"
    )

    panel([
        (f"CT_small.dcm as the model sees it\nA: {', '.join(answers)}", seen),
        (f"generated: '{PROMPT}'\n{text_to_image.width} px, seed 0", text_to_image),
        (f"x2 input (halved, bicubic)\n{psnr(low, reference):.2f} dB", low),
        (f"x2 output ({name})\n{psnr(output, reference):.2f} dB", output),
        (f"reference\n(the slice at {reference.width} px)", reference),
    ]).save(output_dir / "quickstart.png")
    print(f"done in {time.perf_counter() - start:.1f} s; outputs in {output_dir.resolve()}")


if __name__ == "__main__":
    main()
