"""The Gradio demo's handlers end to end on the tiny model (the browser test is opt-in: --run-browser)."""

import os
import socket
import sys
import threading

import gradio as gr
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from unimedvl_pipelines import load_medical_image

from conftest import REPO_ROOT


sys.path.insert(0, str(REPO_ROOT / "examples"))
import app as demo_app  # noqa: E402


@pytest.fixture(scope="module")
def demo():
    """The demo on its default model, the shipped UniMedVL-Tiny."""
    return demo_app.UniMedVLDemo(demo_app.resolve_model_path())


def _direct_answer(demo, prompt, max_new_tokens):
    inputs = demo.processor(images=load_medical_image(get_testdata_file("CT_small.dcm")), text=prompt)
    ids = demo.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return demo.processor.decode_answers(ids[:, inputs["input_ids"].shape[1] :])[0]


def test_ask_about_a_dicom_upload(demo):
    answer = demo.ask(get_testdata_file("CT_small.dcm"), "What modality is this image?", False, 8)
    assert answer and answer == _direct_answer(demo, "What modality is this image?", 8)
    report = demo.ask(get_testdata_file("CT_small.dcm"), "", True, 8)
    assert report == _direct_answer(demo, demo_app.REPORT_PROMPT, 8)


def test_generation_tabs_return_uint8_images(demo):
    assert (demo.size_step, demo.max_size) == (16, 64)
    image = demo.text_to_image("CT, axial, head", 64, 2, 4.0, 0)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    edited = demo.image_to_image(get_testdata_file("CT_small.dcm"), "Increase the resolution of this image by a factor of two.", 2, 2.0, 0)
    assert edited.shape == (64, 64, 3) and edited.dtype == np.uint8
    with pytest.raises(gr.Error, match="up to 64 pixels"):
        demo.text_to_image("CT, axial, head", 128, 2, 4.0, 0)


def test_errors_are_one_line_and_hide_server_paths(demo, tmp_path):
    with pytest.raises(gr.Error, match="Upload an image first"):
        demo.ask(None, "What is this?", False, 8)
    with pytest.raises(gr.Error, match="Type a question"):
        demo.ask(get_testdata_file("CT_small.dcm"), "  ", False, 8)
    broken = tmp_path / "scan.dcm"
    broken.write_bytes(b"not a dicom file at all")
    with pytest.raises(gr.Error) as error:
        demo.ask(str(broken), "What is this?", False, 8)
    message = str(error.value)
    assert "scan.dcm" in message and str(tmp_path) not in message and "\n" not in message
    with pytest.raises(gr.Error, match="Describe the image"):
        demo.text_to_image(" ", 64, 2, 4.0, 0)


def test_app_builds(demo):
    assert isinstance(demo_app.build_app(demo), gr.Blocks)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.browser
def test_browser_upload_ask_and_generate(demo):
    """Headless Debian Chromium driven by Playwright: upload a DICOM, ask, see the answer; generate an image."""
    from playwright.sync_api import sync_playwright

    port = _free_port()
    app = demo_app.build_app(demo)
    threading.Thread(
        target=lambda: app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True), daemon=True
    ).start()
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"), args=flags)
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}", timeout=60_000)
        page.locator("#ask-file input[type=file]").set_input_files(get_testdata_file("CT_small.dcm"))
        page.locator("#question textarea").fill("What modality is this image?")
        page.locator("#ask-button").click()
        page.wait_for_function("document.querySelector('#answer textarea').value.length > 0", timeout=120_000)
        assert page.locator("#answer textarea").input_value() == _direct_answer(demo, "What modality is this image?", 64)
        page.get_by_role("tab", name="Text to image").click()
        page.locator("#prompt textarea").fill("CT, axial, head")
        page.locator("#generate-button").click()
        page.locator("#generated img").wait_for(timeout=300_000)
        browser.close()
    app.close()
