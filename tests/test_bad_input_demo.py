"""Bad input to the Gradio demo's handlers (called directly, as Gradio calls them): each row → the plain-language
message the page shows in its status line, which stays until the next action (no toast, no traceback)."""

import gzip
import os
import struct
import sys
import zlib

import pytest
from pydicom.data import get_testdata_file

from conftest import REPO_ROOT


sys.path.insert(0, str(REPO_ROOT / "examples"))
import app as demo_app  # noqa: E402


CT = get_testdata_file("CT_small.dcm")
SR = demo_app.SR_INSTRUCTION
JARGON = ("max_image_pixels", "Traceback", "NoneType", "Overflow", "unpacking", "int()", "Error:")


@pytest.fixture(scope="module")
def demo():
    return demo_app.UniMedVLDemo(demo_app.resolve_model_path())


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` × `height` grey pixels and whose data is cut off (a few hundred bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make_file(tmp_path, kind: str) -> str | None:
    """The file a row uploads (under `tmp_path`, whose path must never appear in a message)."""
    if kind == "none":
        return None
    if kind == "ct":
        return CT
    if kind == "nifti":
        return demo_app.bundled_examples()["anatomical.nii"]
    path = tmp_path / {
        "text_as_png": "notes.png", "garbage_dicom": "scan.dcm", "huge_png": "huge.png", "bomb_png": "bomb.png",
        "oversized_file": "big.png", "truncated_nifti": "brain.nii.gz", "flat_nifti": "flat.nii", "unknown_format": "notes.txt",
    }[kind]
    if kind in ("text_as_png", "unknown_format"):
        path.write_text("these are my notes, not an image")
    elif kind == "garbage_dicom":
        path.write_bytes(b"not a dicom file at all")
    elif kind == "huge_png":
        path.write_bytes(png_header(13_000, 13_000))  # 169 million pixels in a few hundred bytes
    elif kind == "bomb_png":
        path.write_bytes(png_header(20_000, 20_000))  # beyond PIL's own decompression-bomb limit
    elif kind == "oversized_file":
        with open(path, "wb") as handle:
            handle.truncate(51 * 2**20)  # sparse: 51 MB without using the disk
    elif kind == "truncated_nifti":
        import nibabel
        import numpy as np

        image = nibabel.Nifti1Image(np.arange(32 * 32 * 8, dtype=np.int16).reshape(32, 32, 8), np.eye(4))
        nibabel.save(image, str(path))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "flat_nifti":
        import nibabel
        import numpy as np

        nibabel.save(nibabel.Nifti1Image(np.zeros((16, 16), dtype=np.int16), np.eye(4)), str(path))
    return str(path)


ASK = "ask"
GENERATE = "generate"
EDIT = "edit"
PREVIEW = "preview"

ROWS = [
    # (id, handler, file, arguments, expected words in the message)
    ("no_upload", ASK, "none", {}, "Upload an image first"),
    ("empty_question", ASK, "ct", {"question": "   "}, "Type a question"),
    ("text_named_png", ASK, "text_as_png", {}, "notes.png is not an image this demo can read"),
    ("garbage_dicom", ASK, "garbage_dicom", {}, "scan.dcm is not a DICOM file this demo can read"),
    ("unknown_format", ASK, "unknown_format", {}, "notes.txt is not an image this demo can read: use PNG, JPEG, TIFF, DICOM or NIfTI"),
    ("169_megapixel_png", ASK, "huge_png", {}, "13,000 × 13,000 pixels (169 million); this demo accepts images up to 40 million pixels"),
    ("400_megapixel_png", ASK, "bomb_png", {}, "bomb.png is far larger than the 40 million pixels"),
    ("51_megabyte_file", ASK, "oversized_file", {}, "big.png is 51 MB; this demo accepts files up to 50 MB"),
    ("truncated_nifti", ASK, "truncated_nifti", {}, ("brain.nii.gz: the NIfTI data is truncated", "brain.nii.gz could not be read: the file looks damaged")),
    ("2d_nifti", ASK, "flat_nifti", {}, "flat.nii: expected a 3-D or 4-D volume"),
    ("slice_not_a_number", ASK, "ct", {"slice_text": "middle"}, "The slice must be a whole number"),
    ("slice_out_of_range", ASK, "nifti", {"slice_text": "999"}, "anatomical.nii: slice along axis axial 999 is out of range"),
    ("unknown_window", ASK, "ct", {"window": "disco"}, "Unknown window 'disco'"),
    ("empty_prompt", GENERATE, None, {"prompt": " "}, "Describe the image to generate"),
    ("empty_seed", GENERATE, None, {"seed": None}, "The seed is empty. Enter a seed: a whole number from 0 to 4,294,967,295"),
    ("seed_2_to_64", GENERATE, None, {"seed": 2**64}, "The seed 18446744073709551616 is out of range"),
    ("negative_seed", GENERATE, None, {"seed": -1}, "The seed -1 is out of range"),
    ("fractional_seed", GENERATE, None, {"seed": 1.5}, "The seed 1.5 is not a whole number"),
    ("size_too_large", GENERATE, None, {"size": 4096}, "{name} generates images of {step} to {max} pixels in steps of {step}"),
    ("one_step", GENERATE, None, {"steps": 1}, "Use at least 2 steps"),
    ("edit_no_upload", EDIT, "none", {}, "Upload an image first"),
    ("edit_empty_instruction", EDIT, "ct", {"instruction": ""}, "Type an instruction"),
    ("edit_empty_seed", EDIT, "ct", {"seed": ""}, "The seed is empty"),
    ("edit_huge_png", EDIT, "huge_png", {}, "169 million"),
    ("preview_garbage_dicom", PREVIEW, "garbage_dicom", {}, "scan.dcm is not a DICOM file this demo can read"),
]


def call(demo, handler: str, path, arguments: dict):
    """Calls one Gradio handler with defaults for everything a row does not set; returns its status line."""
    if handler == ASK:
        values = {"question": "What modality is this image?", "report": False, "window": "auto", "axis": "axial", "slice_text": "", "max_new_tokens": 8}
        values.update(arguments)
        outputs = demo.ask_ui(path, values["question"], values["report"], values["window"], values["axis"], values["slice_text"], values["max_new_tokens"])
    elif handler == GENERATE:
        values = {"prompt": "CT, axial, head", "size": 64, "steps": 2, "guidance": 3.0, "seed": 0}
        values.update(arguments)
        outputs = demo.text_to_image_ui(values["prompt"], values["size"], values["steps"], values["guidance"], values["seed"], progress=None)
    elif handler == EDIT:
        values = {"instruction": SR, "halve": True, "window": "auto", "axis": "axial", "slice_text": "", "steps": 2, "guidance": 1.0, "seed": 0}
        values.update(arguments)
        outputs = demo.image_to_image_ui(
            path, values["instruction"], values["halve"], values["window"], values["axis"], values["slice_text"],
            values["steps"], values["guidance"], values["seed"], progress=None,
        )
    else:
        outputs = demo.preview_ui(path, "auto", "axial", "")
    assert all(output is None or output == "" for output in outputs[:-1]), "a failed call must not show stale outputs"
    return outputs[-1]


@pytest.mark.parametrize("row", ROWS, ids=[row[0] for row in ROWS])
def test_bad_input_shows_a_plain_message(demo, tmp_path, monkeypatch, row):
    name, handler, kind, arguments, expected = row
    path = make_file(tmp_path, kind) if kind else None
    if kind in ("huge_png", "bomb_png", "oversized_file"):
        # the limits are checked from the header / file size: nothing may be decoded first
        monkeypatch.setattr(demo_app, "load_medical_image", lambda *a, **k: pytest.fail("decoded before the size check"))
    status = call(demo, handler, path, arguments)
    assert status.startswith("⚠️ **Could not run:** ")
    folders = (str(tmp_path), os.path.dirname(CT), os.path.dirname(demo_app.bundled_examples()["anatomical.nii"]))
    assert "\n" not in status and not any(folder in status for folder in folders), status
    assert not any(word in status for word in JARGON), status
    alternatives = expected if isinstance(expected, tuple) else (expected,)
    assert any(text.format(name=demo.name, step=demo.size_step, max=demo.max_size) in status for text in alternatives), status


def test_good_input_after_a_bad_one_clears_the_message(demo, tmp_path):
    assert call(demo, ASK, None, {}).startswith("⚠️")
    preview, caption, answer, card, status = demo.ask_ui(CT, "What modality is this image?", False, "auto", "axial", "", 8)
    assert status == "" and answer and demo.name in card and "CT_small.dcm" in caption


def test_the_table_covers_every_handler():
    assert {row[1] for row in ROWS} == {ASK, GENERATE, EDIT, PREVIEW}
    assert len(ROWS) >= 20


def test_gzip_bomb_nifti_is_refused_from_its_header(demo, tmp_path, monkeypatch):
    """A NIfTI header declaring 30,000 × 30,000 slices is refused before nibabel reads any voxel."""
    import nibabel
    import numpy as np

    header = nibabel.Nifti1Header()
    header.set_data_shape((30_000, 30_000, 2))
    header.set_data_dtype(np.uint8)
    path = tmp_path / "bomb.nii.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(header.binaryblock + b"\0" * 4)
    monkeypatch.setattr(demo_app, "load_medical_image", lambda *a, **k: pytest.fail("decoded before the size check"))
    status = call(demo, ASK, str(path), {})
    assert "30,000 × 30,000 pixels (900 million)" in status
