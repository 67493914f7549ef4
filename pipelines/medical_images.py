"""Reading medical images for UniMedVL: PIL, arrays, 8/16-bit PNG/TIFF, DICOM and NIfTI → an 8-bit RGB PIL image.

    from unimedvl_pipelines.medical_images import load_medical_image
    image = load_medical_image("CT.dcm", window="lung")                # rescale slope/intercept, lung window
    image = load_medical_image("brain.nii.gz", axis="axial", slice_index=40)
    image = load_medical_image("scan.png")                             # 16-bit PNG → full-range min–max to 8 bit

Rules:

- **Windowing** (values → 8 bit) uses the DICOM linear VOI function (PS3.3 C.11.2.1.2.1) with a `(center, width)`
  pair: `y = ((x − (c − 0.5)) / (w − 1) + 0.5)` clipped to [0, 1], times 255, rounded to the nearest integer.
  `window` is a preset name (`WINDOW_PRESETS`, CT Hounsfield units), a `(center, width)` pair, `"minmax"` (the
  image's own minimum → 0 and maximum → 255, rounded) or `None` (the default: the DICOM file's first window if it has
  one, otherwise min–max). 8-bit images (and float arrays within [0, 1]) are never windowed unless a window is given.
- **DICOM** (pydicom): the modality LUT (rescale slope/intercept) is applied first, so windows are in Hounsfield units
  for CT; `MONOCHROME1` is inverted after windowing (bright = dense, as for `MONOCHROME2`); multi-frame files take the
  frame `slice_index` (default: the middle one); colour files are returned as RGB.
- **NIfTI** (nibabel): the volume is reoriented to the closest RAS+ orientation; `axis` (`"sagittal"`, `"coronal"`,
  `"axial"` or 0/1/2) and `slice_index` (default: the middle slice) pick a slice, `volume` the time point of 4-D
  images; the slice is shown as radiology viewers do: superior/anterior up, the patient's right on the image's left
  (anterior on the left of sagittal slices). Scale factors (`scl_slope`/`scl_inter`) are applied.
- **Stacks**: multi-page TIFFs and `[depth, H, W]` arrays take the slice `slice_index` (default: the middle one).

Nothing is ever unpickled. Anything that cannot be read raises `ImageLoadError` naming the file and the reason.
"""

import os
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from PIL import Image


WINDOW_PRESETS = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (50.0, 400.0),
    "liver": (30.0, 150.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "soft_tissue": (40.0, 400.0),
}
"""CT window presets `(center, width)` in Hounsfield units."""

NIFTI_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".img.gz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")

Window = Union[None, str, tuple[float, float]]


class ImageLoadError(ValueError):
    """An input image that cannot be read or converted; the message names the source and the reason."""


def resolve_window(window: Window) -> str | tuple[float, float] | None:
    """Validates `window` and turns a preset name into its `(center, width)` pair; `"minmax"` and `None` pass through."""
    if window is None or window == "minmax":
        return window
    if isinstance(window, str):
        name = window.lower().replace("-", "_")
        if name not in WINDOW_PRESETS:
            raise ImageLoadError(
                f"Unknown window {window!r}; use one of {sorted(WINDOW_PRESETS)}, 'minmax' or a (center, width) pair."
            )
        return WINDOW_PRESETS[name]
    try:
        center, width = (float(value) for value in window)
    except (TypeError, ValueError):
        raise ImageLoadError(f"A window is a preset name or a (center, width) pair, got {window!r}.") from None
    if width < 1:
        raise ImageLoadError(f"The window width must be at least 1, got {width}.")
    return center, width


def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear VOI window of `values` (any shape) → uint8 of the same shape (see the module docstring)."""
    values = np.asarray(values, dtype=np.float64)
    if width <= 1:
        return np.where(values <= center - 0.5, 0, 255).astype(np.uint8)
    scaled = ((values - (center - 0.5)) / (width - 1) + 0.5).clip(0.0, 1.0)
    return np.rint(scaled * 255.0).astype(np.uint8)


def minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    """Linear map of the array's minimum → 0 and maximum → 255 (rounded); a constant array gives zeros."""
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) / (high - low) * 255.0).astype(np.uint8)


def to_uint8(values: np.ndarray, window: Window = None) -> np.ndarray:
    """Grey or colour values → uint8: uint8 kept, floats in [0, 1] scaled by 255, anything else windowed / min–max."""
    resolved = resolve_window(window)
    if isinstance(resolved, tuple):
        return apply_window(values, *resolved)
    if resolved is None:
        if values.dtype == np.uint8:
            return values
        if values.dtype == np.bool_:
            return values.astype(np.uint8) * 255
        if np.issubdtype(values.dtype, np.floating) and values.size and values.min() >= 0.0 and values.max() <= 1.0:
            return np.rint(values * 255.0).astype(np.uint8)
    if not np.isfinite(values).all():
        raise ImageLoadError("The image holds NaN or infinite values; clean them before windowing.")
    return minmax_to_uint8(values)


def _pick(count: int, index: int | None, what: str, source: str) -> int:
    index = count // 2 if index is None else index
    if not -count <= index < count:
        raise ImageLoadError(f"{source}: {what} {index} is out of range; it has {count} ({what} 0..{count - 1}).")
    return index % count


def _rgb(pixels: np.ndarray) -> Image.Image:
    """uint8 `[H, W]`, `[H, W, 3]` or `[H, W, 4]` → RGB PIL image (alpha composited on white as the processor does)."""
    if pixels.ndim == 2:
        return Image.fromarray(pixels, mode="L").convert("RGB")
    if pixels.shape[-1] == 4:
        image = Image.fromarray(pixels, mode="RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return Image.fromarray(pixels, mode="RGB")


def array_to_image(array, window: Window = None, slice_index: int | None = None, source: str = "array") -> Image.Image:
    """`[H, W]`, `[H, W, 1|3|4]`, `[depth, H, W]` numpy arrays and `[C, H, W]` / `[H, W]` tensors → RGB PIL image."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.dtype == torch.bfloat16:
            array = array.float()
        array = array.numpy()
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] not in (3, 4):
        array = array[_pick(array.shape[0], slice_index, "slice", source)]
    if array.ndim not in (2, 3) or array.size == 0:
        raise ImageLoadError(f"{source}: unsupported image shape {array.shape}; expected [H, W], [H, W, 3|4] or [depth, H, W].")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ImageLoadError(f"{source}: unsupported pixel type {array.dtype}.")
    return _rgb(to_uint8(array, window))


def _pil_to_image(image: Image.Image, window: Window, slice_index: int | None, source: str) -> Image.Image:
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        image.seek(_pick(frames, slice_index, "page", source))
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F") or (window is not None and image.mode == "L"):
        return array_to_image(np.asarray(image), window, None, source)
    if window is not None:
        raise ImageLoadError(f"{source}: a window applies to grey-scale images, not to a {image.mode} image.")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        return _rgb(np.asarray(image.convert("RGBA")))
    return image.convert("RGB")


def read_dicom(path: str, window: Window = None, slice_index: int | None = None) -> Image.Image:
    """One frame of a DICOM file → RGB image (modality LUT, window, MONOCHROME1 inversion; see the module docstring)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    try:
        dataset = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError) as error:
        raise ImageLoadError(f"{path}: not a readable DICOM file ({error}).") from None
    if "PixelData" not in dataset:
        raise ImageLoadError(f"{path}: the DICOM file holds no pixel data (SOP class {dataset.get('SOPClassUID', '?')}).")
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # decoders raise many types (missing plugins, corrupt streams)
        syntax = getattr(dataset.file_meta, "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise ImageLoadError(
            f"{path}: cannot decode the pixel data (transfer syntax {name}): {error}. Compressed DICOM may need "
            "extra decoders, e.g. `pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg`."
        ) from None
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    samples = int(dataset.get("SamplesPerPixel", 1))
    if frames > 1:
        pixels = pixels[_pick(frames, slice_index, "frame", path)]
    if samples > 1:
        return array_to_image(pixels, window if window is not None else "minmax" if pixels.dtype != np.uint8 else None, None, path)
    values = apply_modality_lut(pixels, dataset)
    resolved = resolve_window(window)
    if resolved is None and "WindowCenter" in dataset and "WindowWidth" in dataset:
        center, width = dataset.WindowCenter, dataset.WindowWidth
        resolved = resolve_window((_first(center), _first(width)))
    grey = to_uint8(np.asarray(values), resolved if resolved is not None else "minmax")
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        grey = 255 - grey
    return _rgb(grey)


def _first(value) -> float:
    """The first of a multi-valued DICOM attribute (files may list several windows), or the value itself."""
    return float(value[0]) if isinstance(value, Sequence) and not isinstance(value, str) else float(value)


def read_nifti(
    path: str, window: Window = None, axis: str | int = "axial", slice_index: int | None = None, volume: int = 0
) -> Image.Image:
    """One slice of a NIfTI/Analyze volume → RGB image, reoriented to RAS+ and shown radiologically (module docstring)."""
    import nibabel
    from nibabel.filebasedimages import ImageFileError

    try:
        image = nibabel.load(path)
    except (ImageFileError, OSError, EOFError, ValueError) as error:
        raise ImageLoadError(f"{path}: not a readable NIfTI file ({error}).") from None
    if len(image.shape) not in (3, 4):
        raise ImageLoadError(f"{path}: expected a 3-D or 4-D volume, got shape {image.shape}.")
    image = nibabel.as_closest_canonical(image)
    axis_index = NIFTI_AXES.get(axis.lower(), axis) if isinstance(axis, str) else axis
    if axis_index not in (0, 1, 2):
        raise ImageLoadError(f"{path}: axis must be one of {sorted(NIFTI_AXES)} or 0, 1, 2, got {axis!r}.")
    index = [slice(None)] * 3
    index[axis_index] = _pick(image.shape[axis_index], slice_index, f"slice along axis {axis}", path)
    if len(image.shape) == 4:
        index.append(_pick(image.shape[3], volume, "volume", path))
    values = np.asarray(image.dataobj[tuple(index)])
    values = np.flip(values, (0, 1)).T
    return array_to_image(np.ascontiguousarray(values), "minmax" if window is None else window, None, path)


def _is_dicom(path: str) -> bool:
    if path.lower().endswith(DICOM_SUFFIXES):
        return True
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def load_medical_image(
    source,
    window: Window = None,
    slice_index: int | None = None,
    axis: str | int = "axial",
    volume: int = 0,
) -> Image.Image:
    """Any supported input (PIL image, numpy array, torch tensor, or a path to PNG/JPEG/TIFF/…, DICOM or NIfTI) → RGB PIL.

    Args:
        source: the image or a file path (`str` / `os.PathLike`).
        window: preset name, `(center, width)`, `"minmax"` or `None` (see the module docstring).
        slice_index: frame / page / slice of multi-frame DICOM, multi-page TIFF, NIfTI volumes and `[depth, H, W]`
            arrays (default: the middle one).
        axis, volume: NIfTI only — slicing axis and 4-D time point.
    """
    if isinstance(source, Image.Image):
        return _pil_to_image(source, window, slice_index, "image")
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return array_to_image(source, window, slice_index)
    if not isinstance(source, (str, os.PathLike)):
        raise ImageLoadError(
            f"Unsupported image input of type {type(source).__name__}; pass a PIL image, a numpy array, a torch tensor "
            "or a file path."
        )
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ImageLoadError(f"{path}: no such file.")
    if path.lower().endswith(NIFTI_SUFFIXES):
        return read_nifti(path, window, axis, slice_index, volume)
    if _is_dicom(path):
        return read_dicom(path, window, slice_index)
    try:
        with Image.open(path) as image:
            return _pil_to_image(image, window, slice_index, path)
    except (Image.UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ImageLoadError(
            f"{path}: not a readable image (PNG, JPEG, TIFF, …), DICOM or NIfTI file ({error})."
        ) from None


__all__ = [
    "ImageLoadError",
    "WINDOW_PRESETS",
    "apply_window",
    "array_to_image",
    "load_medical_image",
    "minmax_to_uint8",
    "read_dicom",
    "read_nifti",
    "resolve_window",
    "to_uint8",
]
