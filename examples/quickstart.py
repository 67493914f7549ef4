"""UniMedVL quickstart, fully offline: answer a question about a CT slice, generate an image, run image-to-image.

    python examples/quickstart.py [--model PATH] [--output-dir outputs/quickstart]

The model is `--model` (a converted UniMedVL folder or Hub id), else the environment variable UNIMEDVL_MODEL, else the
package's shipped default, UniMedVL-Tiny (`modeling_unimedvl/unimedvl_tiny/`, a 4 M-parameter model trained by
`python -m unimedvl_training.build_unimedvl_tiny`; see `model_cards/UniMedVL-Tiny.md`). The CT slice is
`CT_small.dcm`, which ships inside the pydicom wheel, read with the soft-tissue window. The prompts are the formats
UniMedVL-Tiny was trained on; images are generated at the model's largest size (64 px for Tiny).
"""

import argparse
import os
import pathlib
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from modeling_unimedvl import UniMedVLForConditionalGeneration, UniMedVLProcessor, resolve_model_path  # noqa: E402
from unimedvl_pipelines.medical_images import load_medical_image  # noqa: E402
from unimedvl_pipelines.pipeline_unimedvl import postprocess_images  # noqa: E402


QUESTION = "What modality is this image?"
PROMPT = "CT, axial, head"
INSTRUCTION = "Increase the resolution of this image by a factor of two."


def save_image(images: torch.Tensor, path: pathlib.Path) -> pathlib.Path:
    """The first of `images` `[batch, 3, H, W]` in [-1, 1] as a PNG, quantised as the pipelines do."""
    postprocess_images(images, "pil")[0].save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="converted UniMedVL folder or Hub id (default: UNIMEDVL_MODEL, else UniMedVL-Tiny)")
    parser.add_argument("--output-dir", default="outputs/quickstart")
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    output_dir = pathlib.Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    model_dir = resolve_model_path(args.model)
    print(f"model: {model_dir}")
    model = UniMedVLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = UniMedVLProcessor.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(0)

    image = load_medical_image(get_testdata_file("CT_small.dcm"), window="soft_tissue")
    inputs = processor(images=image, text=QUESTION)
    answer_ids = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = processor.decode_answers(answer_ids[:, inputs["input_ids"].shape[1] :])[0]
    print(f"Q: {QUESTION}\nA: {answer!r}")

    sampling = {"num_inference_steps": args.steps, "cfg_text_scale": 3.0, "cfg_interval": (0.0, 1.0), "timestep_shift": 1.0}
    generated = model.generate(
        **processor(text=PROMPT, generation_mode="image"), generation_mode="image", generator=generator, **sampling
    )
    print(f"text-to-image ({PROMPT!r}): {save_image(generated.images, output_dir / 'text_to_image.png')}")

    edited = model.generate(
        **processor(images=image, text=INSTRUCTION, generation_mode="image"), generation_mode="image",
        generator=generator, cfg_img_scale=1.0, **sampling,
    )
    print(f"image-to-image ({INSTRUCTION!r}): {save_image(edited.images, output_dir / 'image_to_image.png')}")
    print(f"done in {time.perf_counter() - start:.1f} s; outputs in {output_dir.resolve()}")


if __name__ == "__main__":
    main()
