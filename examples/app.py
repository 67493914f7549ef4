"""UniMedVL Gradio demo: questions and reports about an image (PNG/JPEG/TIFF/DICOM/NIfTI), text-to-image, image-to-image.

    python examples/app.py [--model PATH] [--host 127.0.0.1] [--port 7860]

Space-ready: `examples/README.md` holds the Space front matter and `examples/requirements.txt` its requirements. The
model is `--model`, else UNIMEDVL_MODEL, else the package's shipped default, UniMedVL-Tiny. Uploads are
limited in size and pixels; errors are shown as one line without any server path.
"""

import argparse
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from modeling_unimedvl import UniMedVLForConditionalGeneration, UniMedVLProcessor, resolve_model_path  # noqa: E402
from unimedvl_pipelines.cli import REPORT_PROMPT  # noqa: E402
from unimedvl_pipelines.medical_images import ImageLoadError, load_medical_image  # noqa: E402
from unimedvl_pipelines.pipeline_unimedvl import postprocess_images  # noqa: E402


MAX_UPLOAD_BYTES = 50 * 2**20
MAX_IMAGE_PIXELS = 40_000_000
DISCLAIMER = "Research demo. Not a medical device: never use its answers or images for diagnosis or treatment."


class UniMedVLDemo:
    """The three tasks of the demo around one loaded model; every method returns plain values for Gradio."""

    def __init__(self, model_dir: str | pathlib.Path):
        self.model = UniMedVLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.processor = UniMedVLProcessor.from_pretrained(model_dir)
        self.processor.image_processor.max_image_pixels = MAX_IMAGE_PIXELS
        config = self.model.config
        self.size_step = config.latent_downsample
        self.max_size = config.max_latent_size * config.latent_downsample  # 64 px for UniMedVL-Tiny, 1024 for the 14B

    @staticmethod
    def load_upload(path: str | None):
        """The uploaded file as an RGB PIL image; errors name the file by its base name only."""
        if not path:
            raise gr.Error("Upload an image first (PNG, JPEG, TIFF, DICOM or NIfTI).")
        name = os.path.basename(path)
        if os.path.getsize(path) > MAX_UPLOAD_BYTES:
            raise gr.Error(f"{name} is larger than {MAX_UPLOAD_BYTES // 2**20} MB.")
        try:
            return load_medical_image(path)
        except ImageLoadError as error:
            raise gr.Error(str(error).replace(str(path), name).replace(os.path.dirname(str(path)), "")) from None

    @staticmethod
    def to_numpy(images: torch.Tensor) -> np.ndarray:
        """`[1, 3, H, W]` in [-1, 1] → `[H, W, 3]` uint8, quantised as the pipelines (and the original) do."""
        return np.asarray(postprocess_images(images, "pil")[0])

    def ask(self, path: str | None, question: str, report: bool, max_new_tokens: int) -> str:
        image = self.load_upload(path)
        prompt = REPORT_PROMPT if report else (question or "").strip()
        if not prompt:
            raise gr.Error("Type a question, or choose 'report'.")
        try:
            inputs = self.processor(images=image, text=prompt)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        ids = self.model.generate(**inputs, max_new_tokens=int(max_new_tokens), do_sample=False)
        return self.processor.decode_answers(ids[:, inputs["input_ids"].shape[1] :])[0]

    def text_to_image(self, prompt: str, size: int, steps: int, guidance: float, seed: int) -> np.ndarray:
        if not (prompt or "").strip():
            raise gr.Error("Describe the image to generate.")
        inputs = self.processor(text=prompt, generation_mode="image")
        try:
            result = self.model.generate(
                **inputs, generation_mode="image", height=int(size), width=int(size), num_inference_steps=int(steps),
                cfg_text_scale=float(guidance), cfg_img_scale=1.0, generator=torch.Generator().manual_seed(int(seed)),
            )
        except ValueError as error:  # e.g. a size the model cannot generate
            raise gr.Error(str(error)) from None
        return self.to_numpy(result.images)

    def image_to_image(self, path: str | None, instruction: str, steps: int, image_guidance: float, seed: int) -> np.ndarray:
        image = self.load_upload(path)
        if not (instruction or "").strip():
            raise gr.Error("Type an instruction, e.g. 'Generate the FLAIR image of this T2 slice.'")
        inputs = self.processor(images=image, text=instruction, generation_mode="image")
        result = self.model.generate(
            **inputs, generation_mode="image", num_inference_steps=int(steps), cfg_text_scale=4.0,
            cfg_img_scale=float(image_guidance), cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel",
            generator=torch.Generator().manual_seed(int(seed)),
        )
        return self.to_numpy(result.images)


def build_app(demo: UniMedVLDemo) -> gr.Blocks:
    upload_types = [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".nii", ".gz", ".bmp"]
    with gr.Blocks(title="UniMedVL") as app:
        gr.Markdown(f"# UniMedVL\n{DISCLAIMER}")
        with gr.Tab("Ask / report"):
            ask_file = gr.File(label="Image (PNG, JPEG, TIFF, DICOM, NIfTI)", file_types=upload_types, elem_id="ask-file")
            question = gr.Textbox(label="Question", elem_id="question")
            report = gr.Checkbox(label="Write a report instead", value=False)
            max_tokens = gr.Slider(8, 512, value=64, step=8, label="Max new tokens")
            answer = gr.Textbox(label="Answer", elem_id="answer")
            gr.Button("Ask", elem_id="ask-button").click(demo.ask, [ask_file, question, report, max_tokens], answer)
        with gr.Tab("Text to image"):
            prompt = gr.Textbox(label="Prompt", elem_id="prompt")
            size = gr.Slider(
                demo.size_step, demo.max_size, value=min(256, demo.max_size), step=demo.size_step, label="Size (px)"
            )
            steps = gr.Slider(2, 100, value=30, step=1, label="Steps")
            guidance = gr.Slider(1.0, 10.0, value=4.0, step=0.5, label="Text guidance")
            seed = gr.Number(value=0, precision=0, label="Seed")
            generated = gr.Image(label="Generated", elem_id="generated")
            gr.Button("Generate", elem_id="generate-button").click(
                demo.text_to_image, [prompt, size, steps, guidance, seed], generated
            )
        with gr.Tab("Image to image"):
            edit_file = gr.File(label="Input image", file_types=upload_types)
            instruction = gr.Textbox(label="Instruction")
            edit_steps = gr.Slider(2, 100, value=30, step=1, label="Steps")
            image_guidance = gr.Slider(1.0, 5.0, value=2.0, step=0.5, label="Image guidance")
            edit_seed = gr.Number(value=0, precision=0, label="Seed")
            edited = gr.Image(label="Result")
            gr.Button("Run").click(demo.image_to_image, [edit_file, instruction, edit_steps, image_guidance, edit_seed], edited)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="converted UniMedVL folder or Hub id (default: UNIMEDVL_MODEL, else UniMedVL-Tiny)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    model_dir = resolve_model_path(args.model)
    app = build_app(UniMedVLDemo(model_dir))
    app.queue(max_size=16).launch(server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD_BYTES, show_error=True)


if __name__ == "__main__":
    main()
