"""The Gradio demo end to end on the shipped UniMedVL-Tiny: handlers called directly, and (opt-in, --run-browser) the
page in headless Debian Chromium driven by Playwright, checking what a first-time user sees."""

import os
import socket
import sys
import threading
import time

import gradio as gr
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from unimedvl_pipelines import load_medical_image

from conftest import REPO_ROOT


sys.path.insert(0, str(REPO_ROOT / "examples"))
import app as demo_app  # noqa: E402
import quickstart  # noqa: E402


CT = get_testdata_file("CT_small.dcm")
MODALITY = "What modality is this image?"


@pytest.fixture(scope="module")
def demo():
    """The demo on its default model, the shipped UniMedVL-Tiny."""
    return demo_app.UniMedVLDemo(demo_app.resolve_model_path())


def _direct_answer(demo, path, prompt, max_new_tokens, **read):
    """The answer of the model itself for the file read by `load_medical_image` as the quickstart and the CLI read it."""
    inputs = demo.processor(images=load_medical_image(path, **read), text=prompt)
    ids = demo.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return demo.processor.decode_answers(ids[:, inputs["input_ids"].shape[1] :])[0].strip()


def test_demo_reads_uploads_as_the_quickstart_and_cli_do(demo):
    """The 'MR in the demo, CT in the quickstart' bug: the demo read CT_small.dcm with its full range, the quickstart
    with a soft-tissue window. Both now read it through `load_medical_image` with a window that the page names."""
    image, words = demo.read(CT, quickstart.CT_WINDOW)
    assert image.tobytes() == quickstart.ct_slice().tobytes()
    assert words == "CT_small.dcm, soft tissue window (centre 40, width 400)"
    assert demo_app.CT_EXAMPLE_WINDOW == quickstart.CT_WINDOW
    expected = quickstart.answer_questions(demo.model, demo.processor, quickstart.ct_slice(), [MODALITY])[0]
    assert demo.ask(CT, MODALITY, window=quickstart.CT_WINDOW, max_new_tokens=16) == expected == "CT"
    automatic, words = demo.read(CT)
    assert automatic.tobytes() == load_medical_image(CT).tobytes()  # as `unimedvl ask` without --window
    assert words == "CT_small.dcm, full range (the file stores no window)"
    assert demo.ask(CT, MODALITY, max_new_tokens=16) == _direct_answer(demo, CT, MODALITY, 16)


def test_named_window_and_slice_reach_the_model(demo):
    lung = demo.preview(CT, "lung")
    assert "lung window (centre -600, width 1500)" in lung.caption
    assert demo.ask(CT, MODALITY, window="lung", max_new_tokens=8) == _direct_answer(demo, CT, MODALITY, 8, window="lung")
    nifti = demo_app.bundled_examples()["anatomical.nii"]
    view = demo.preview(nifti, "auto", "sagittal", "3")
    assert view.caption.startswith("anatomical.nii, sagittal slice 4 of ")
    assert view.image.tobytes() == demo.model_view(load_medical_image(nifti, axis="sagittal", slice_index=3), demo.processor.image_processor.understanding_transform).tobytes()


def test_preview_is_the_exact_model_input(demo):
    view = demo.preview(CT)
    transform = demo.processor.image_processor.understanding_transform
    assert view.image.size == demo.model_view(load_medical_image(CT), transform).size
    inputs = demo.processor(images=load_medical_image(CT), text=MODALITY)
    grid = inputs["image_grid_hw"][0].tolist()
    patch = demo.processor.image_processor.patch_size
    assert view.image.size == (grid[1] * patch, grid[0] * patch)
    assert f"the model reads it at {view.image.width} × {view.image.height} px" in view.caption


def test_answers_name_the_model(demo):
    preview, caption, answer, card, status = demo.ask_ui(CT, MODALITY, False, "auto", "axial", "", 8)
    assert status == "" and answer == _direct_answer(demo, CT, MODALITY, 8)
    assert card.startswith(f"**{demo.name}** — ") and f"**{answer}**" in card
    assert demo.name == "UniMedVL-Tiny" and "not a medical device" in demo.nature
    assert min(preview.size) >= 256  # enlarged to a viewable size
    report = demo.ask(CT, "", report=True, max_new_tokens=24)
    assert report == _direct_answer(demo, CT, demo_app.REPORT_PROMPT, 24)


def test_generation_reports_every_step_and_is_viewable(demo):
    steps = []
    image, caption, status = demo.text_to_image_ui("CT, axial, head", demo.max_size, 5, 3.0, 7, progress=lambda value, desc: steps.append((value, desc)))
    assert status == "" and [value for value, _ in steps] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert steps[-1][1] == "Denoising step 4 of 4"
    assert min(image.size) >= 256 and "shown enlarged" in caption and demo.name in caption
    direct = demo.text_to_image("CT, axial, head", demo.max_size, 5, 3.0, 7)
    assert image.resize(direct.size, Image.NEAREST).tobytes() == direct.tobytes()


def test_image_to_image_shows_input_beside_output(demo):
    seen, output, reference, caption, status = demo.image_to_image_ui(CT, demo_app.SR_INSTRUCTION, True, "auto", "axial", "", 3, 1.0, 0, progress=None)
    assert status == "" and seen.size == output.size == reference.size and min(seen.size) >= 256
    assert "halved and enlarged back ×2" in caption and "CT_small.dcm" in caption
    model_input, model_output, model_reference, _ = demo.image_to_image(CT, demo_app.SR_INSTRUCTION, True, steps=3, seed=0)
    assert model_input.size == model_output.size == model_reference.size == (demo.max_size, demo.max_size)


def test_bundled_examples_are_in_the_wheels_only():
    examples = demo_app.bundled_examples()
    assert set(examples) == {"CT_small.dcm", "MR_small.dcm", "anatomical.nii", "example4d.nii.gz"}
    shared = str((REPO_ROOT.parent / "shared").resolve())
    for path in examples.values():
        assert os.path.isfile(path) and "site-packages" in path and not os.path.realpath(path).startswith(shared)
    assert set(demo_app.launch_options()["allowed_paths"]) == {os.path.dirname(path) for path in examples.values()}


def test_app_builds(demo):
    assert isinstance(demo_app.build_app(demo), gr.Blocks)


# ----------------------------------------------------------------------------------------------------------------------
# In a browser
# ----------------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def page(demo):
    """The demo served on a free local port and opened in headless Debian Chromium."""
    from playwright.sync_api import sync_playwright

    port = _free_port()
    app = demo_app.build_app(demo)
    app.queue()
    threading.Thread(
        target=lambda: app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **demo_app.launch_options()),
        daemon=True,
    ).start()
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"), args=flags)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        for _ in range(60):
            try:
                page.goto(f"http://127.0.0.1:{port}", timeout=60_000)
                break
            except Exception:  # the server thread may not listen yet
                time.sleep(1)
        page.wait_for_selector("#ask-button", timeout=60_000)
        yield page
        browser.close()
    app.close()


def _image_width(page, selector: str, timeout: int = 120_000) -> int:
    page.wait_for_function(f"document.querySelector('{selector} img') && document.querySelector('{selector} img').naturalWidth > 0", timeout=timeout)
    return page.eval_on_selector(f"{selector} img", "image => image.naturalWidth")


@pytest.mark.browser
def test_browser_model_name_and_nature_on_the_page(page, demo):
    header = page.locator("#model-card").inner_text()
    assert demo.name in header and "not a medical device" in header and "trained from scratch" in header


@pytest.mark.browser
def test_browser_example_preview_answer(page, demo):
    """Click the CT_small.dcm example: the preview names the window, the answer equals the model's and names it."""
    page.get_by_role("tab", name="Ask / report").click()
    page.locator("#ask-examples").get_by_text(MODALITY).first.click()
    page.wait_for_function("document.querySelector('#preview-caption').innerText.includes('CT_small.dcm')", timeout=60_000)
    caption = page.locator("#preview-caption").inner_text()
    assert "soft tissue window (centre 40, width 400)" in caption and "the model reads it at" in caption
    assert _image_width(page, "#preview") >= 256
    page.locator("#ask-button").click()
    page.wait_for_function("document.querySelector('#answer textarea').value.length > 0", timeout=120_000)
    answer = page.locator("#answer textarea").input_value()
    assert answer == _direct_answer(demo, CT, MODALITY, 64, window="soft_tissue")
    page.wait_for_function(f"document.querySelector('#answer-card').innerText.includes('{demo.name}')", timeout=30_000)


@pytest.mark.browser
def test_browser_nifti_example_names_the_slice(page):
    page.locator("#ask-examples").get_by_text("Which body region is shown?").first.click()
    page.wait_for_function("document.querySelector('#preview-caption').innerText.includes('anatomical.nii')", timeout=60_000)
    assert "axial slice" in page.locator("#preview-caption").inner_text()
    page.wait_for_timeout(3_000)  # a preview of the file the example replaced must not arrive late and overwrite it
    assert "anatomical.nii" in page.locator("#preview-caption").inner_text()


@pytest.mark.browser
def test_browser_errors_stay_on_the_page_in_plain_words(page):
    page.get_by_role("tab", name="Text to image").click()
    page.locator("#prompt textarea").fill("")
    page.locator("#seed input").fill("")
    page.locator("#generate-button").click()
    page.wait_for_function("document.querySelector('#generate-status').innerText.includes('Describe the image')", timeout=30_000)
    time.sleep(12)  # a toast would be gone by now
    assert "Describe the image to generate" in page.locator("#generate-status").inner_text()
    page.locator("#prompt textarea").fill("CT, axial, head")
    page.locator("#generate-button").click()
    page.wait_for_function("document.querySelector('#generate-status').innerText.includes('The seed is empty')", timeout=30_000)
    assert "whole number from 0 to 4,294,967,295" in page.locator("#generate-status").inner_text()
    page.locator("#seed input").fill("0")


@pytest.mark.browser
def test_browser_generation_progress_and_size(page, demo):
    page.get_by_role("tab", name="Text to image").click()
    page.locator("#prompt-examples").get_by_text("CT, axial, head").first.click()
    page.locator("#steps input[type=number]").fill("100")
    page.locator("#steps input[type=number]").press("Enter")
    page.locator("#generate-button").click()
    page.wait_for_function("document.body.innerText.includes('Denoising step')", timeout=120_000)
    assert _image_width(page, "#generated", 300_000) >= 256
    assert demo.name in page.locator("#generated-caption").inner_text()


@pytest.mark.browser
def test_browser_image_to_image_before_and_after(page):
    page.get_by_role("tab", name="Image to image").click()
    page.locator("#edit-examples").get_by_text("CT_small.dcm").first.click()
    page.wait_for_function("document.querySelector('#instruction textarea').value.length > 0", timeout=30_000)
    page.locator("#edit-button").click()
    for selector in ("#edit-input", "#edit-output", "#edit-reference"):
        assert _image_width(page, selector, 300_000) >= 256
    assert "halved and enlarged back" in page.locator("#edit-caption").inner_text()
