"""Medical image reading: windowing formula, 16-bit PNG/TIFF, DICOM (pydicom test files), NIfTI (nibabel test files)."""

import os

import nibabel
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from unimedvl_pipelines.medical_images import (
    WINDOW_PRESETS,
    ImageLoadError,
    apply_window,
    load_medical_image,
)


NIBABEL_DATA = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data")


def dicom_file(name):
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not shipped in the pydicom wheel"
    return path


def grey(image):
    array = np.asarray(image)
    assert image.mode == "RGB" and (array[..., 0] == array[..., 1]).all() and (array[..., 0] == array[..., 2]).all()
    return array[..., 0]


def test_window_formula_on_known_values():
    # DICOM linear VOI: y = ((x - (c - 0.5)) / (w - 1) + 0.5) clipped to [0, 1], x 255, rounded.
    values = np.array([-1000.0, -1350.5, -1349.0, -600.0, -599.5, 149.0, 149.5, 3000.0])
    center, width = WINDOW_PRESETS["lung"]
    expected = [0, 0, round((((-1349.0 + 600.5) / 1499 + 0.5) * 255)), 128, 128, 255, 255, 255]
    expected[0] = round(((-1000.0 + 600.5) / 1499 + 0.5) * 255)
    assert apply_window(values, center, width).tolist() == expected
    assert apply_window(np.array([39.0, 40.0]), 40.0, 1.0).tolist() == [0, 255]


def test_ct_dicom_rescale_window_and_presets():
    path = dicom_file("CT_small.dcm")
    dataset = pydicom.dcmread(path)
    hounsfield = dataset.pixel_array.astype(np.float64) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    for window in ("lung", "bone", "brain", "abdomen", "mediastinum", (40, 400)):
        center, width = WINDOW_PRESETS[window] if isinstance(window, str) else window
        image = grey(load_medical_image(path, window=window))
        assert image.shape == (128, 128)
        for row, column in ((0, 0), (64, 64), (100, 30), (10, 120)):
            value = hounsfield[row, column]
            expected = np.clip((value - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255
            assert image[row, column] == int(np.rint(expected)), (window, row, column, value)
    # CT_small has no window in the file: the default is min-max of the rescaled values.
    default = grey(load_medical_image(path)).astype(np.float64)
    expected = np.rint((hounsfield - hounsfield.min()) / (hounsfield.max() - hounsfield.min()) * 255)
    assert np.array_equal(default, expected) and default.min() == 0 and default.max() == 255


def test_mr_dicom_uses_the_file_window():
    path = dicom_file("MR_small.dcm")
    dataset = pydicom.dcmread(path)
    assert float(dataset.WindowCenter) == 600 and float(dataset.WindowWidth) == 1600
    image = grey(load_medical_image(path))
    assert np.array_equal(image, apply_window(dataset.pixel_array, 600.0, 1600.0))
    assert not np.array_equal(image, grey(load_medical_image(path, window="minmax")))


def test_monochrome1_is_inverted(tmp_path):
    dataset = pydicom.dcmread(dicom_file("MR_small.dcm"))
    dataset.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "mono1.dcm"
    dataset.save_as(path)
    inverted = grey(load_medical_image(path))
    assert np.array_equal(inverted, 255 - apply_window(dataset.pixel_array, 600.0, 1600.0))


def test_multiframe_dicom_frame_choice():
    path = dicom_file("rtdose.dcm")
    frames = pydicom.dcmread(path).pixel_array
    assert frames.shape == (15, 10, 10)
    middle = grey(load_medical_image(path))
    assert np.array_equal(middle, np.rint((frames[7] - frames[7].min()) / np.ptp(frames[7]) * 255).astype(np.uint8))
    third = grey(load_medical_image(path, slice_index=3))
    assert np.array_equal(third, np.rint((frames[3] - frames[3].min()) / np.ptp(frames[3]) * 255).astype(np.uint8))
    with pytest.raises(ImageLoadError, match=r"rtdose\.dcm: frame 15 is out of range; it has 15"):
        load_medical_image(path, slice_index=15)


def test_nifti_axes_slices_and_display_orientation():
    path = os.path.join(NIBABEL_DATA, "anatomical.nii")
    canonical = nibabel.as_closest_canonical(nibabel.load(path))
    volume = np.asarray(canonical.dataobj).astype(np.float64)
    assert nibabel.aff2axcodes(canonical.affine) == ("R", "A", "S") and volume.shape == (33, 41, 25)
    image = grey(load_medical_image(path))  # axial, middle slice 12, min-max
    axial = volume[:, :, 12]
    expected = np.rint((axial - axial.min()) / (axial.max() - axial.min()) * 255)
    # image[r, c] = slice[X-1-c, Y-1-r]: anterior up, patient's right on the image's left.
    assert image.shape == (41, 33)
    assert np.array_equal(image, expected[::-1, ::-1].T)
    sagittal = grey(load_medical_image(path, axis="sagittal", slice_index=5, window=(300, 600)))
    assert sagittal.shape == (25, 41)
    assert sagittal[3, 7] == apply_window(volume[5, 41 - 1 - 7, 25 - 1 - 3], 300, 600)
    coronal = grey(load_medical_image(path, axis=1, slice_index=-1, window="minmax"))
    assert coronal.shape == (25, 33)
    with pytest.raises(ImageLoadError, match="anatomical.nii: slice along axis axial 25 is out of range"):
        load_medical_image(path, slice_index=25)
    with pytest.raises(ImageLoadError, match="axis must be one of"):
        load_medical_image(path, axis="oblique")


def test_nifti_4d_volume_choice():
    path = os.path.join(NIBABEL_DATA, "example4d.nii.gz")
    canonical = nibabel.as_closest_canonical(nibabel.load(path))
    data = np.asarray(canonical.dataobj).astype(np.float64)
    second = grey(load_medical_image(path, volume=1, slice_index=10, window=(500, 1000)))
    assert np.array_equal(second, apply_window(data[:, :, 10, 1], 500, 1000)[::-1, ::-1].T)
    with pytest.raises(ImageLoadError, match="volume 2 is out of range; it has 2"):
        load_medical_image(path, volume=2)


def test_16_bit_png_and_tiff_default_to_the_original_conversion_minmax_on_request(tmp_path, caplog):
    values = np.array([[0, 1000], [30000, 60000]], dtype=np.uint16)
    values = np.kron(values, np.ones((4, 4), dtype=np.uint16)) + np.arange(8, dtype=np.uint16)
    for name in ("scan.png", "scan.tif"):
        Image.fromarray(values).save(tmp_path / name)
        caplog.clear()
        image = grey(load_medical_image(tmp_path / name))  # the original: Image.open(path).convert("RGB") clips
        assert np.array_equal(image, np.asarray(Image.open(tmp_path / name).convert("RGB"))[..., 0])
        assert image[0, 3] == 3 and image[0, 4] == 255 and image[4, 0] == 255  # 3 kept, 1004 and 30000 clipped
        assert f"{name}: I;16 values in [0, 60007] are clipped to 0..255" in caplog.text  # said, not silent
        normalised = grey(load_medical_image(tmp_path / name, window="minmax"))
        low, high = values.min(), values.max()
        assert np.array_equal(normalised, np.rint((values - low) / (high - low) * 255.0).astype(np.uint8))
    windowed = grey(load_medical_image(tmp_path / "scan.png", window=(1000, 2000)))
    assert np.array_equal(windowed, apply_window(values, 1000, 2000))


def test_ordinary_pil_images_equal_the_original_pil_img2rgb(tmp_path):
    """The original's `pil_img2rgb`: RGBA / transparency composited on white (paste with the alpha mask), else
    `convert("RGB")` (grey+alpha loses its alpha; I/F values clipped)."""
    rng = np.random.default_rng(1)

    def original(image):
        if image.mode == "RGBA" or image.info.get("transparency", None) is not None:
            image = image.convert("RGBA")
            white = Image.new(mode="RGB", size=image.size, color=(255, 255, 255))
            white.paste(image, mask=image.split()[3])
            return white
        return image.convert("RGB")

    grey_alpha = Image.fromarray(rng.integers(0, 256, (9, 7, 2), dtype=np.uint8), mode="LA")
    palette = Image.fromarray(rng.integers(0, 256, (9, 7), dtype=np.uint8)).convert("P")
    palette.info["transparency"] = 3
    images = [
        grey_alpha,
        Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8), mode="RGBA"),
        palette,
        Image.fromarray(rng.integers(-2000, 3000, (9, 7), dtype=np.int32), mode="I"),
        Image.fromarray(rng.uniform(-5, 400, (9, 7)).astype(np.float32), mode="F"),
        Image.fromarray(rng.integers(0, 256, (9, 7), dtype=np.uint8), mode="L"),
    ]
    for image in images:
        assert np.array_equal(np.asarray(load_medical_image(image)), np.asarray(original(image))), image.mode
        image.save(tmp_path / "x.tif") if image.mode in ("I", "F") else image.save(tmp_path / "x.png")
        path = tmp_path / ("x.tif" if image.mode in ("I", "F") else "x.png")
        assert np.array_equal(np.asarray(load_medical_image(path)), np.asarray(original(Image.open(path)))), image.mode
    assert grey(load_medical_image(grey_alpha)).tolist() == np.asarray(grey_alpha)[..., 0].tolist()  # alpha dropped


def test_multipage_tiff_and_arrays(tmp_path):
    pages = [Image.fromarray(np.full((6, 5), value, dtype=np.uint8)) for value in (10, 20, 30)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    assert grey(load_medical_image(tmp_path / "stack.tif"))[0, 0] == 20
    assert grey(load_medical_image(tmp_path / "stack.tif", slice_index=2))[0, 0] == 30
    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(load_medical_image(rgb)), rgb)
    assert np.array_equal(np.asarray(load_medical_image(torch.from_numpy(rgb).permute(2, 0, 1))), rgb)
    unit = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    assert grey(load_medical_image(unit)).tolist() == np.rint(unit * 255).astype(np.uint8).tolist()
    hounsfield = np.array([[-1000, 0], [40, 2000]], dtype=np.int16)
    assert grey(load_medical_image(hounsfield, window="brain")).tolist() == apply_window(hounsfield, 40, 80).tolist()
    stack = np.stack([np.full((4, 5), v, dtype=np.int16) for v in (0, 100, 200)])  # [depth, H, W]
    assert (grey(load_medical_image(stack, window=(100, 201))) == 128).all()  # middle slice: 100
    assert (grey(load_medical_image(stack, slice_index=0, window=(100, 201))) == 1).all()
    pil = Image.fromarray(rgb)
    assert np.array_equal(np.asarray(load_medical_image(pil)), rgb)


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(ImageLoadError, match=r"missing\.dcm: no such file"):
        load_medical_image(tmp_path / "missing.dcm")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match=r"junk\.png: not a readable image file"):
        load_medical_image(tmp_path / "junk.png")
    (tmp_path / "broken.dcm").write_bytes(b"\0" * 64)
    with pytest.raises(ImageLoadError, match=r"broken\.dcm: not a readable DICOM file"):
        load_medical_image(tmp_path / "broken.dcm")
    (tmp_path / "broken.nii").write_bytes(b"\0" * 64)
    with pytest.raises(ImageLoadError, match=r"broken\.nii: not a readable NIfTI file"):
        load_medical_image(tmp_path / "broken.nii")
    with pytest.raises(ImageLoadError, match="array: unknown window 'lungs'"):
        load_medical_image(np.zeros((4, 4), dtype=np.int16), window="lungs")
    with pytest.raises(ImageLoadError, match="array: the window width must be at least 1"):
        load_medical_image(np.zeros((4, 4), dtype=np.int16), window=(0, 0))
    with pytest.raises(ImageLoadError, match="unsupported image shape"):
        load_medical_image(np.zeros((2, 2, 2, 2)))
    with pytest.raises(ImageLoadError, match="NaN or infinite"):
        load_medical_image(np.array([[np.nan, 1.0], [2.0, 3.0]]))
    with pytest.raises(ImageLoadError, match="Unsupported image input of type int"):
        load_medical_image(3)
    dataset = pydicom.dcmread(dicom_file("MR_small.dcm"))
    del dataset.PixelData
    dataset.save_as(tmp_path / "nopixels.dcm")
    with pytest.raises(ImageLoadError, match=r"nopixels\.dcm: the DICOM file holds no pixel data"):
        load_medical_image(tmp_path / "nopixels.dcm")
