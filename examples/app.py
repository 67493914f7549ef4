"""UniMedVL Gradio demo: questions and reports about an image (PNG/JPEG/TIFF/DICOM/NIfTI), text-to-image, image-to-image.

    python examples/app.py [--model PATH] [--host 127.0.0.1] [--port 7860]

Space-ready: `examples/README.md` holds the Space front matter and `examples/requirements.txt` its requirements. The
model is `--model`, else UNIMEDVL_MODEL, else the package's shipped default, UniMedVL-Tiny.

What a first-time user sees: the model's name and what kind of model it is (at the top and beside every answer); a
preview of the exact image the model reads (the DICOM window, NIfTI slice and resize named); outputs enlarged to a
viewable size with the input beside them; clickable examples on the DICOM / NIfTI files that ship inside the pydicom
and nibabel wheels; per-step progress while images are generated; errors in plain words that stay on the page.

Uploads are read exactly as `examples/quickstart.py` and the `unimedvl` CLI read them (`load_medical_image` with the
same default window), so the three entry points give the same answer for the same file and question. Uploads are
limited to 50 MB and 40 million pixels; the pixel count is read from the file header before anything is decoded.
"""

import argparse
import os
import pathlib
import zlib
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradio as gr  # noqa: E402
import nibabel  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from modeling_unimedvl import UniMedVLForConditionalGeneration, UniMedVLProcessor, resolve_model_path  # noqa: E402
from modeling_unimedvl.default_model import TINY_IMAGE_TO_IMAGE, TINY_TEXT_TO_IMAGE, describe_model  # noqa: E402
from unimedvl_pipelines.cli import REPORT_PROMPT  # noqa: E402
from unimedvl_pipelines.medical_images import (  # noqa: E402
    DICOM_SUFFIXES,
    NIFTI_AXES,
    NIFTI_SUFFIXES,
    WINDOW_PRESETS,
    ImageFileInfo,
    ImageLoadError,
    inspect_image_file,
    load_medical_image,
    stored_window,
)
from unimedvl_pipelines.pipeline_unimedvl import postprocess_images  # noqa: E402


MAX_UPLOAD_BYTES = 50 * 2**20
MAX_IMAGE_PIXELS = 40_000_000
MAX_SEED = 2**32 - 1
DISPLAY_SIDE = 320
"""Images are enlarged (never reduced) to about this many pixels on their long side for viewing."""
UPLOAD_TYPES = [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".nii", ".nii.gz", ".gz"]
DISCLAIMER = "Research demo. Not a medical device: never use its answers or images for diagnosis or treatment."
AUTO_WINDOW = "auto"
WINDOW_CHOICES = [("Automatic: the file's own window, else its full range", AUTO_WINDOW)] + [
    (f"{name.replace('_', ' ')} (centre {center:g}, width {width:g} HU)", name) for name, (center, width) in WINDOW_PRESETS.items()
] + [("Full range (darkest → black, brightest → white)", "minmax")]
CT_EXAMPLE_WINDOW = "soft_tissue"
"""`CT_small.dcm` stores no window: its example names the CT window the quickstart uses too."""
QUESTION_EXAMPLES = ["What modality is this image?", "Which body region is shown?", "In which plane was this image taken?"]
GENERATION_EXAMPLES = ["CT, axial, head", "MR, sagittal, spine and muscles", "CT, axial, thorax", "MR, coronal, abdomen"]
SR_INSTRUCTION = "Increase the resolution of this image by a factor of two."


class DemoInputError(ValueError):
    """A problem with what the user entered, worded for the user (shown on the page, never as a traceback)."""


@dataclass
class ModelView:
    """An upload as the model reads it: `image` (the exact pixels, after the model's resize) and `caption` (the
    file, the window or slice used and the size)."""

    image: Image.Image
    caption: str


# ----------------------------------------------------------------------------------------------------------------------
# Reading uploads
# ----------------------------------------------------------------------------------------------------------------------


def check_upload(path: str | None) -> ImageFileInfo:
    """What the upload's header says (`inspect_image_file`: nothing is decoded) after the checks that need no
    decoding: a file is given, ≤ 50 MB, a format the demo reads, ≤ 40 million pixels per image / slice / frame."""
    if not path:
        raise DemoInputError("Upload an image first (PNG, JPEG, TIFF, DICOM or NIfTI), or click one of the examples.")
    name = os.path.basename(path)
    size = os.path.getsize(path)
    if size > MAX_UPLOAD_BYTES:
        raise DemoInputError(f"{name} is {size / 2**20:.0f} MB; this demo accepts files up to {MAX_UPLOAD_BYTES // 2**20} MB.")
    try:
        info = inspect_image_file(path)
    except ImageLoadError as error:
        if "refused before decoding" in str(error):  # beyond PIL's own decompression-bomb limit
            raise DemoInputError(
                f"{name} is far larger than the {MAX_IMAGE_PIXELS // 1_000_000} million pixels this demo accepts; "
                "reduce it and upload it again."
            ) from None
        kind = "a NIfTI file" if name.lower().endswith(NIFTI_SUFFIXES) else "a DICOM file" if name.lower().endswith(DICOM_SUFFIXES) else "an image"
        raise DemoInputError(f"{name} is not {kind} this demo can read: use PNG, JPEG, TIFF, DICOM or NIfTI.") from None
    if info.pixels > MAX_IMAGE_PIXELS:
        raise DemoInputError(
            f"{name} is {info.width:,} × {info.height:,} pixels ({info.pixels / 1e6:,.0f} million); this demo accepts "
            f"images up to {MAX_IMAGE_PIXELS // 1_000_000} million pixels. Reduce it (for example to 2,000 × 2,000) "
            "and upload it again."
        )
    return info


def parse_slice(text) -> int | None:
    """The slice / frame box: empty → None (the middle one), else a whole number."""
    if text is None or str(text).strip() == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise DemoInputError(f"The slice must be a whole number (or empty for the middle slice), not {str(text)!r}.") from None
    if not value.is_integer():
        raise DemoInputError(f"The slice must be a whole number (or empty for the middle slice), not {text}.")
    return int(value)


def window_words(info: ImageFileInfo, window: str) -> str:
    """Which window turns the file's values into grey levels, in words (the loader's rule for `window`)."""
    if window in WINDOW_PRESETS:
        center, width = WINDOW_PRESETS[window]
        return f"{window.replace('_', ' ')} window (centre {center:g}, width {width:g})"
    if window == "minmax":
        return "full range"
    if info.format == "NIfTI":
        return "full range of the slice"
    if info.format == "DICOM":
        stored = stored_window(pydicom.dcmread(info.path, stop_before_pixels=True), info.path)
        if stored:
            return f"the file's window (centre {stored[0]:g}, width {stored[1]:g})"
        return "full range (the file stores no window)"
    return "as stored"


def slice_words(info: ImageFileInfo, axis: str, slice_index: int | None) -> str:
    """Which slice / frame of a volume or multi-frame file is shown, in words ('' for single images)."""
    if info.format == "NIfTI":
        image = nibabel.load(info.path)
        voxel_axis = int(list(nibabel.io_orientation(image.affine)[:, 0]).index(NIFTI_AXES[axis]))
        count = int(image.shape[voxel_axis])
    elif info.frames > 1:
        axis, count = "frame", info.frames
    else:
        return ""
    index = count // 2 if slice_index is None else slice_index % count
    return f"{axis} {'' if axis == 'frame' else 'slice '}{index + 1} of {count}" + (" (the middle one)" if slice_index is None else "")


def enlarged(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """`image` enlarged by the smallest whole factor that makes its long side at least `side` (nearest neighbour:
    every pixel stays visible as it is) for viewing; large images are left as they are."""
    factor = max(1, -(-side // max(image.size)))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def parse_seed(value) -> int:
    """The seed box: a whole number in [0, 2³² − 1]; anything else is a `DemoInputError` in words."""
    hint = f"Enter a seed: a whole number from 0 to {MAX_SEED:,} (the same seed gives the same image)."
    if value is None or str(value).strip() == "":
        raise DemoInputError(f"The seed is empty. {hint}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"The seed {value!r} is not a number. {hint}") from None
    if not number.is_integer():
        raise DemoInputError(f"The seed {value} is not a whole number. {hint}")
    if not 0 <= number <= MAX_SEED:
        raise DemoInputError(f"The seed {value} is out of range. {hint}")
    return int(number)


# ----------------------------------------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------------------------------------


class UniMedVLDemo:
    """The three tasks of the demo around one loaded model.

    The task methods (`ask`, `text_to_image`, `image_to_image`, `preview`) raise `DemoInputError` for bad input; the
    `*_ui` methods are the Gradio handlers: they return the outputs and a status line, which holds the plain-language
    error (and stays on the page) when something is wrong.
    """

    def __init__(self, model_dir: str | pathlib.Path):
        self.model = UniMedVLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.processor = UniMedVLProcessor.from_pretrained(model_dir)
        self.name, self.nature = describe_model(model_dir, self.model)
        config = self.model.config
        self.size_step = config.latent_downsample
        self.max_size = config.max_latent_size * config.latent_downsample  # 64 px for UniMedVL-Tiny, 1024 for the 14B

    # ------------------------------------------------------------------ inputs

    def read(self, path: str | None, window: str = AUTO_WINDOW, axis: str = "axial", slice_text=None) -> tuple[Image.Image, str]:
        """The upload as an RGB image (read as the quickstart and the CLI read it) and its description in words."""
        info = check_upload(path)
        name = os.path.basename(path)
        window = window or AUTO_WINDOW
        if window != AUTO_WINDOW and window not in WINDOW_PRESETS and window != "minmax":
            raise DemoInputError(f"Unknown window {window!r}; choose one from the list.")
        axis = axis or "axial"
        if axis not in NIFTI_AXES:
            raise DemoInputError(f"Unknown slice direction {axis!r}; choose axial, coronal or sagittal.")
        slice_index = parse_slice(slice_text)
        try:
            image = load_medical_image(
                path, window=None if window == AUTO_WINDOW else window, axis=axis, slice_index=slice_index, max_pixels=MAX_IMAGE_PIXELS,
            )
        except ImageLoadError as error:
            raise DemoInputError(_plain_load_error(error, path, name)) from None
        except (OSError, EOFError, ValueError, zlib.error):  # damaged data behind a readable header
            raise DemoInputError(f"{name} could not be read: the file looks damaged or cut short.") from None
        words = [name, slice_words(info, axis, slice_index), window_words(info, window)]
        return image, ", ".join(word for word in words if word)

    def model_view(self, image: Image.Image, transform) -> Image.Image:
        """The exact pixels the model gets from `image` under one of the processor's resize rules."""
        image_processor = self.processor.image_processor
        return image_processor.resize(image_processor.load(image), transform)

    def preview(self, path, window=AUTO_WINDOW, axis="axial", slice_text=None) -> ModelView:
        """What the model reads for a question about the upload."""
        return self._view(*self.read(path, window, axis, slice_text))

    def _view(self, image: Image.Image, words: str) -> ModelView:
        seen = self.model_view(image, self.processor.image_processor.understanding_transform)
        return ModelView(seen, f"{words}; the model reads it at {seen.width} × {seen.height} px (shown enlarged).")

    # ------------------------------------------------------------------ tasks

    @staticmethod
    def _prompt(question: str, report: bool) -> str:
        prompt = REPORT_PROMPT if report else (question or "").strip()
        if not prompt:
            raise DemoInputError("Type a question (or click one of the example questions), or tick 'Write a report'.")
        return prompt

    def _answer(self, image: Image.Image, prompt: str, max_new_tokens: int) -> str:
        inputs = self.processor(images=image, text=prompt)
        ids = self.model.generate(**inputs, max_new_tokens=int(max_new_tokens), do_sample=False)
        return self.processor.decode_answers(ids[:, inputs["input_ids"].shape[1] :])[0].strip()

    def ask(self, path, question: str, report: bool = False, window=AUTO_WINDOW, axis="axial", slice_text=None, max_new_tokens: int = 64) -> str:
        """The model's answer to `question` (or a report) about the upload."""
        prompt = self._prompt(question, report)
        image, _ = self.read(path, window, axis, slice_text)
        return self._answer(image, prompt, max_new_tokens)

    def _sampler(self, steps, seed, progress) -> dict:
        steps = int(steps)
        if steps < 2:
            raise DemoInputError("Use at least 2 steps.")
        evaluations = steps - 1

        def on_step(step, timestep, latents):
            if progress is not None:
                progress((step + 1, evaluations), desc=f"Denoising step {step + 1} of {evaluations}")
            return latents

        return {
            "num_inference_steps": steps,
            "generator": torch.Generator().manual_seed(parse_seed(seed)),
            "callback_on_step_end": on_step,
        }

    def text_to_image(self, prompt: str, size: int, steps: int, guidance: float, seed, progress=None) -> Image.Image:
        """A generated image (PIL, the model's size) for `prompt`."""
        if not (prompt or "").strip():
            raise DemoInputError("Describe the image to generate, e.g. 'CT, axial, head' (modality, plane, body region).")
        size = int(size)
        if size % self.size_step or not self.size_step <= size <= self.max_size:
            raise DemoInputError(f"{self.name} generates images of {self.size_step} to {self.max_size} pixels in steps of {self.size_step}.")
        sampler = self._sampler(steps, seed, progress)
        inputs = self.processor(text=prompt.strip(), generation_mode="image")
        settings = dict(TINY_TEXT_TO_IMAGE, cfg_text_scale=float(guidance), **sampler)
        result = self.model.generate(**inputs, generation_mode="image", height=size, width=size, **settings)
        return postprocess_images(result.images, "pil")[0]

    def image_to_image(
        self, path, instruction: str, halve_first: bool = False, window=AUTO_WINDOW, axis="axial", slice_text=None,
        steps: int = 25, image_guidance: float = 1.0, seed=0, progress=None,
    ) -> tuple[Image.Image, Image.Image, Image.Image | None, str]:
        """`(model input, output, reference, caption)`: the image the model is given (at its generation size), its
        output, and with `halve_first` the upload at that size before it was halved (the reference for a ×2 task)."""
        if not (instruction or "").strip():
            raise DemoInputError(f"Type an instruction, e.g. '{SR_INSTRUCTION}'")
        image, words = self.read(path, window, axis, slice_text)
        sampler = self._sampler(steps, seed, progress)
        seen = self.model_view(image, self.processor.image_processor.generation_vae_transform)
        reference = None
        if halve_first:
            reference = seen
            half = seen.resize((max(1, seen.width // 2), max(1, seen.height // 2)), Image.BICUBIC)
            seen = half.resize(reference.size, Image.BICUBIC)
        inputs = self.processor(images=seen, text=instruction.strip(), generation_mode="image")
        settings = dict(TINY_IMAGE_TO_IMAGE, cfg_img_scale=float(image_guidance), **sampler)
        result = self.model.generate(**inputs, generation_mode="image", **settings)
        output = postprocess_images(result.images, "pil")[0]
        how = " halved and enlarged back ×2 (bicubic), the model's ×2 task;" if halve_first else ""
        caption = f"{words};{how} model input and output {output.width} × {output.height} px (shown enlarged)."
        return seen, output, reference, caption

    # ------------------------------------------------------------------ Gradio handlers

    def signature(self) -> str:
        return f"**{self.name}** — {self.nature}"

    def preview_ui(self, path, window, axis, slice_text):
        """Upload / window / slice changed: `(preview, caption, status)`."""
        if not path:
            return None, "", ""
        try:
            view = self.preview(path, window, axis, slice_text)
        except DemoInputError as error:
            return None, "", _status(error)
        return enlarged(view.image), view.caption, ""

    def ask_ui(self, path, question, report, window, axis, slice_text, max_new_tokens):
        """Ask button: `(preview, caption, answer, answer with the model's name, status)`."""
        try:
            image, words = self.read(path, window, axis, slice_text)
            view = self._view(image, words)
            answer = self._answer(image, self._prompt(question, report), max_new_tokens)
        except DemoInputError as error:
            return None, "", "", "", _status(error)
        what = "report" if report else f"answer to “{question.strip()}”"
        return enlarged(view.image), view.caption, answer, f"{self.signature()}\n\nIts {what}: **{answer}**", ""

    def text_to_image_ui(self, prompt, size, steps, guidance, seed, progress=gr.Progress()):
        """Generate button: `(image enlarged, caption, status)`."""
        try:
            image = self.text_to_image(prompt, size, steps, guidance, seed, progress)
        except DemoInputError as error:
            return None, "", _status(error)
        caption = f"Generated by {self.signature()}\n\n{image.width} × {image.height} px, shown enlarged; prompt “{prompt.strip()}”, seed {parse_seed(seed)}."
        return enlarged(image), caption, ""

    def image_to_image_ui(self, path, instruction, halve_first, window, axis, slice_text, steps, image_guidance, seed, progress=gr.Progress()):
        """Run button: `(model input, output, reference, caption, status)`, all images enlarged alike."""
        try:
            seen, output, reference, caption = self.image_to_image(
                path, instruction, halve_first, window, axis, slice_text, steps, image_guidance, seed, progress
            )
        except DemoInputError as error:
            return None, None, None, "", _status(error)
        return enlarged(seen), enlarged(output), enlarged(reference) if reference else None, f"By {self.signature()}\n\n{caption}", ""


def _status(error: Exception) -> str:
    return f"⚠️ **Could not run:** {error}"


def _plain_load_error(error: ImageLoadError, path: str, name: str) -> str:
    """The loader's message with the server path replaced by the file's name."""
    message = str(error).replace(str(path), name).replace(os.path.dirname(str(path)) + os.sep, "")
    return message.splitlines()[0] if message else f"{name} could not be read."


# ----------------------------------------------------------------------------------------------------------------------
# Page
# ----------------------------------------------------------------------------------------------------------------------


def bundled_examples() -> dict[str, str]:
    """Medical files that ship inside the pydicom and nibabel wheels (no other data is used)."""
    nifti_dir = pathlib.Path(nibabel.__file__).parent / "tests" / "data"
    return {
        "CT_small.dcm": get_testdata_file("CT_small.dcm"),
        "MR_small.dcm": get_testdata_file("MR_small.dcm"),
        "anatomical.nii": str(nifti_dir / "anatomical.nii"),
        "example4d.nii.gz": str(nifti_dir / "example4d.nii.gz"),
    }


def example_dirs() -> list[str]:
    """Folders of the bundled examples (Gradio serves files only from allowed folders)."""
    return sorted({os.path.dirname(path) for path in bundled_examples().values()})


def _read_controls(prefix: str):
    with gr.Accordion("How the file is read (DICOM window, NIfTI slice)", open=False):
        window = gr.Dropdown(WINDOW_CHOICES, value=AUTO_WINDOW, label="Window (CT / grey-scale values → grey levels)", elem_id=f"{prefix}-window")
        with gr.Row():
            axis = gr.Dropdown(list(NIFTI_AXES), value="axial", label="NIfTI slice direction", elem_id=f"{prefix}-axis")
            slice_text = gr.Textbox(value="", label="Slice or frame number (empty: the middle one)", elem_id=f"{prefix}-slice")
    return window, axis, slice_text


def build_app(demo: UniMedVLDemo) -> gr.Blocks:
    examples = bundled_examples()
    with gr.Blocks(title=f"UniMedVL demo — {demo.name}") as app:
        gr.Markdown(
            f"# UniMedVL demo\nRunning {demo.signature()}\n\n{DISCLAIMER}", elem_id="model-card"
        )
        with gr.Tab("Ask / report"):
            gr.Markdown("Upload a medical image (or click an example below), then ask a question about it. The preview "
                        "shows exactly what the model reads: the DICOM window or NIfTI slice and the size it is resized to.")
            with gr.Row():
                with gr.Column():
                    ask_file = gr.File(label="Image (PNG, JPEG, TIFF, DICOM, NIfTI)", file_types=UPLOAD_TYPES, elem_id="ask-file")
                    window, axis, slice_text = _read_controls("ask")
                    question = gr.Textbox(label="Question", elem_id="question", placeholder=QUESTION_EXAMPLES[0])
                    report = gr.Checkbox(label="Write a report instead of answering", value=False, elem_id="report")
                    max_tokens = gr.Slider(8, 256, value=64, step=8, label="Longest answer (tokens)")
                    ask_button = gr.Button("Ask", variant="primary", elem_id="ask-button")
                with gr.Column():
                    preview = gr.Image(label="What the model sees", type="pil", interactive=False, elem_id="preview", height=DISPLAY_SIDE)
                    preview_caption = gr.Markdown(elem_id="preview-caption")
                    answer_card = gr.Markdown(elem_id="answer-card")
                    answer = gr.Textbox(label=f"Answer ({demo.name})", elem_id="answer", interactive=False)
                    ask_status = gr.Markdown(elem_id="ask-status")
            gr.Examples(
                [[examples["CT_small.dcm"], QUESTION_EXAMPLES[0], CT_EXAMPLE_WINDOW], [examples["MR_small.dcm"], QUESTION_EXAMPLES[0], AUTO_WINDOW],
                 [examples["anatomical.nii"], QUESTION_EXAMPLES[1], AUTO_WINDOW], [examples["example4d.nii.gz"], QUESTION_EXAMPLES[2], AUTO_WINDOW]],
                [ask_file, question, window], label="Examples (files bundled with pydicom and nibabel)", elem_id="ask-examples",
            )
            read_inputs = [ask_file, window, axis, slice_text]
            # One listener for all four controls: an example sets the file and the window at once, and two listeners
            # would run side by side, the one that read the old file finishing last and showing it.
            gr.on([control.change for control in read_inputs], demo.preview_ui, read_inputs,
                  [preview, preview_caption, ask_status], trigger_mode="always_last")
            ask_button.click(
                demo.ask_ui, [ask_file, question, report, window, axis, slice_text, max_tokens],
                [preview, preview_caption, answer, answer_card, ask_status],
            )
        with gr.Tab("Text to image"):
            gr.Markdown(f"Describe the image to generate. {demo.name} was trained on prompts of the form "
                        "*modality, plane, body region* — click an example.")
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", elem_id="prompt")
                    gr.Examples([[text] for text in GENERATION_EXAMPLES], [prompt], label="Example prompts", elem_id="prompt-examples")
                    size = gr.Slider(demo.size_step, demo.max_size, value=demo.max_size, step=demo.size_step, label="Size (px)")
                    steps = gr.Slider(2, 100, value=TINY_TEXT_TO_IMAGE["num_inference_steps"], step=1, label="Steps (more: slower, smoother)", elem_id="steps")
                    guidance = gr.Slider(1.0, 10.0, value=TINY_TEXT_TO_IMAGE["cfg_text_scale"], step=0.5, label="Prompt guidance (higher: follows the prompt more closely)")
                    seed = gr.Number(value=0, precision=0, label="Seed (same seed, same image)", elem_id="seed")
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                with gr.Column():
                    generated = gr.Image(label="Generated image", type="pil", interactive=False, elem_id="generated", height=DISPLAY_SIDE)
                    generated_caption = gr.Markdown(elem_id="generated-caption")
                    generate_status = gr.Markdown(elem_id="generate-status")
            generate_button.click(
                demo.text_to_image_ui, [prompt, size, steps, guidance, seed], [generated, generated_caption, generate_status]
            )
        with gr.Tab("Image to image"):
            gr.Markdown(f"{demo.name} works on images of at most {demo.max_size} × {demo.max_size} px: the upload is "
                        "reduced to that size first. Tick *halve first* to watch the ×2 task on a sharp image: the "
                        "model gets the upload halved and enlarged back, and the original is shown for comparison.")
            with gr.Row():
                with gr.Column():
                    edit_file = gr.File(label="Input image", file_types=UPLOAD_TYPES, elem_id="edit-file")
                    edit_window, edit_axis, edit_slice = _read_controls("edit")
                    instruction = gr.Textbox(label="Instruction", elem_id="instruction")
                    halve = gr.Checkbox(label="Halve the resolution first (to see the ×2 task)", value=False, elem_id="halve")
                    edit_steps = gr.Slider(2, 100, value=TINY_IMAGE_TO_IMAGE["num_inference_steps"], step=1, label="Steps")
                    image_guidance = gr.Slider(1.0, 5.0, value=TINY_IMAGE_TO_IMAGE["cfg_img_scale"], step=0.5, label="Input-image guidance")
                    edit_seed = gr.Number(value=0, precision=0, label="Seed", elem_id="edit-seed")
                    edit_button = gr.Button("Run", variant="primary", elem_id="edit-button")
                with gr.Column():
                    with gr.Row():
                        edit_input = gr.Image(label="Input the model gets", type="pil", interactive=False, elem_id="edit-input", height=DISPLAY_SIDE)
                        edit_output = gr.Image(label="Output", type="pil", interactive=False, elem_id="edit-output", height=DISPLAY_SIDE)
                    edit_reference = gr.Image(label="Original at the model's size (reference)", type="pil", interactive=False, elem_id="edit-reference", height=DISPLAY_SIDE)
                    edit_caption = gr.Markdown(elem_id="edit-caption")
                    edit_status = gr.Markdown(elem_id="edit-status")
            gr.Examples(
                [[examples["CT_small.dcm"], SR_INSTRUCTION, True, CT_EXAMPLE_WINDOW], [examples["MR_small.dcm"], SR_INSTRUCTION, True, AUTO_WINDOW]],
                [edit_file, instruction, halve, edit_window], label="Examples (files bundled with pydicom)", elem_id="edit-examples",
            )
            edit_button.click(
                demo.image_to_image_ui,
                [edit_file, instruction, halve, edit_window, edit_axis, edit_slice, edit_steps, image_guidance, edit_seed],
                [edit_input, edit_output, edit_reference, edit_caption, edit_status],
            )
    return app


def launch_options() -> dict:
    """`launch()` arguments every way of serving the demo needs (upload limit, the bundled examples' folders)."""
    return {"max_file_size": MAX_UPLOAD_BYTES, "allowed_paths": example_dirs(), "show_error": True}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="converted UniMedVL folder or Hub id (default: UNIMEDVL_MODEL, else UniMedVL-Tiny)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    app = build_app(UniMedVLDemo(resolve_model_path(args.model)))
    app.queue(max_size=16).launch(server_name=args.host, server_port=args.port, **launch_options())


if __name__ == "__main__":
    main()
