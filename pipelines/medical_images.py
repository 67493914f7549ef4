"""Reading medical images for UniMedVL: PIL, arrays, 8/16-bit PNG/TIFF, DICOM and NIfTI → an 8-bit RGB PIL image.

    from unimedvl_pipelines.medical_images import load_medical_image
    image = load_medical_image("CT.dcm", window="lung")                # rescale slope/intercept, lung window
    image = load_medical_image("brain.nii.gz", axis="axial", slice_index=40)
    image = load_medical_image("scan.png", window="minmax")           # 16-bit PNG → full-range min–max to 8 bit
    info = check_image_file("upload.png", max_pixels=40_000_000)       # size from the header, before any decoding

Rules:

- **Ordinary images** (PIL images, PNG/JPEG/TIFF/… files) are converted exactly as the original UniMedVL code does
  (`pil_img2rgb`): RGBA and palette images with transparency are composited on white, everything else is
  `Image.convert("RGB")` (grey+alpha loses its alpha; 16-bit / 32-bit / float values are clipped to 0..255 by PIL,
  with a logged warning when that clips anything, since `window="minmax"` or a CT window is then usually wanted).
- **Windowing** (values → 8 bit) is explicit for ordinary images and uses the DICOM linear VOI function
  (PS3.3 C.11.2.1.2.1) with a `(center, width)` pair: `y = ((x − (c − 0.5)) / (w − 1) + 0.5)` clipped to [0, 1],
  times 255, rounded to the nearest integer. `window` is a preset name (`WINDOW_PRESETS`, CT Hounsfield units), a
  `(center, width)` pair, `"minmax"` (the image's own minimum → 0 and maximum → 255, rounded) or `None` (the default:
  the original's conversion for ordinary images; the file's first window for DICOM, min–max when it has none; min–max
  for NIfTI and for arrays that are not 8-bit, boolean or floats within [0, 1]).
- **DICOM** (pydicom): the modality LUT (rescale slope/intercept) is applied first, so windows are in Hounsfield units
  for CT; a stored window of width < 1 (e.g. 0) is ignored with a logged warning (min–max instead); `MONOCHROME1` is
  inverted after windowing (bright = dense, as for `MONOCHROME2`); multi-frame files take the frame `slice_index`
  (default: the middle one); colour files are returned as RGB.
- **NIfTI** (nibabel): the volume is reoriented to the closest RAS+ orientation; `axis` (`"sagittal"`, `"coronal"`,
  `"axial"` or 0/1/2) and `slice_index` (default: the middle slice) pick a slice, `volume` the time point of 4-D
  images; the slice is shown as radiology viewers do: superior/anterior up, the patient's right on the image's left
  (anterior on the left of sagittal slices). Scale factors (`scl_slope`/`scl_inter`) are applied.
- **Stacks**: multi-page TIFFs and `[depth, H, W]` arrays take the slice `slice_index` (default: the middle one);
  `[H, W, 2]` arrays are grey + alpha (the alpha is dropped, as `convert("RGB")` does).
- **Safety**: a file's size is read from its header and checked against `max_pixels` (per image / slice / frame) and
  `max_voxels` (all frames a DICOM file decodes at once) before any pixel is decoded (`check_image_file`); files are
  opened only with the PIL plugins of `PIL_FORMATS` (never e.g. EPS, whose plugin runs Ghostscript), whatever their
  suffix. Nothing is ever unpickled. Anything that cannot be read raises `ImageLoadError` naming the file and the reason.
"""

import logging
import os
import struct
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from PIL import Image


try:
    from modeling_unimedvl.image_processing_unimedvl import to_rgb
except ImportError:  # a saved pipeline folder loaded as remote code carries the image processor next to this file
    from .image_processing_unimedvl import to_rgb


logger = logging.getLogger(__name__)


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
PIL_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP", "JPEG2000")
"""The PIL plugins a file may be opened with (the formats the package reads; none runs an external program)."""
DEFAULT_MAX_PIXELS = 50_000_000
"""Largest image / slice / frame read by default (the image processor's `max_image_pixels`)."""
DEFAULT_MAX_VOXELS = 2**28
"""Largest number of pixels a DICOM file may decode at once (all its frames), by default: 512 × 512 × 1024."""
GREY_VALUE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
"""PIL modes holding values beyond 8 bit, which `convert("RGB")` clips."""

Window = Union[None, str, tuple[float, float]]


class ImageLoadError(ValueError):
    """An input image that cannot be read or converted; the message names the source and the reason."""


@dataclass(frozen=True)
class ImageFileInfo:
    """What a file's header says, read without decoding any pixel (`inspect_image_file`).

    `width` × `height` is the largest image the loader may produce from one page / frame / slice (for NIfTI, the two
    largest spatial sizes); `frames` counts pages, frames or the remaining axis; `decoded_pixels` is what decoding
    holds in memory at once (all frames for DICOM, one page / slice otherwise)."""

    path: str
    format: str
    width: int
    height: int
    frames: int = 1
    decoded_pixels: int = 0

    @property
    def pixels(self) -> int:
        return self.width * self.height


def resolve_window(window: Window, source: str = "image") -> str | tuple[float, float] | None:
    """Validates `window` and turns a preset name into its `(center, width)` pair; `"minmax"` and `None` pass through.
    Errors name `source` (the file or "image"/"array")."""
    if window is None or window == "minmax":
        return window
    if isinstance(window, str):
        name = window.lower().replace("-", "_")
        if name not in WINDOW_PRESETS:
            raise ImageLoadError(
                f"{source}: unknown window {window!r}; use one of {sorted(WINDOW_PRESETS)}, 'minmax' or a (center, width) pair."
            )
        return WINDOW_PRESETS[name]
    try:
        center, width = (float(value) for value in window)
    except (TypeError, ValueError):
        raise ImageLoadError(f"{source}: a window is a preset name or a (center, width) pair, got {window!r}.") from None
    if not (np.isfinite(center) and np.isfinite(width)):
        raise ImageLoadError(f"{source}: the window center and width must be finite numbers, got ({center}, {width}).")
    if width < 1:
        raise ImageLoadError(f"{source}: the window width must be at least 1, got {width}.")
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


def check_finite(values: np.ndarray, source: str) -> None:
    """Raises `ImageLoadError` naming `source` when a float array holds NaN or infinite values."""
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        count = int((~np.isfinite(values)).sum())
        raise ImageLoadError(
            f"{source}: the image holds {count} NaN or infinite values; replace them (e.g. numpy.nan_to_num) before loading."
        )


def to_uint8(values: np.ndarray, window: Window = None, source: str = "image") -> np.ndarray:
    """Grey or colour values → uint8: uint8 kept, floats in [0, 1] scaled by 255, anything else windowed / min–max.
    NaN / infinite values are refused (naming `source`) whatever the window."""
    resolved = resolve_window(window, source)
    check_finite(values, source)
    if isinstance(resolved, tuple):
        return apply_window(values, *resolved)
    if resolved is None:
        if values.dtype == np.uint8:
            return values
        if values.dtype == np.bool_:
            return values.astype(np.uint8) * 255
        if np.issubdtype(values.dtype, np.floating) and values.size and values.min() >= 0.0 and values.max() <= 1.0:
            return np.rint(values * 255.0).astype(np.uint8)
    return minmax_to_uint8(values)


def _pick(count: int, index: int | None, what: str, source: str) -> int:
    index = count // 2 if index is None else index
    if not -count <= index < count:
        raise ImageLoadError(f"{source}: {what} {index} is out of range; it has {count} ({what} 0..{count - 1}).")
    return index % count


def _rgb(pixels: np.ndarray) -> Image.Image:
    """uint8 `[H, W]`, `[H, W, 3]` or `[H, W, 4]` → RGB PIL image (RGBA composited on white, as the original does)."""
    if pixels.ndim == 2:
        return Image.fromarray(pixels).convert("RGB")
    return to_rgb(Image.fromarray(pixels))


def array_to_image(array, window: Window = None, slice_index: int | None = None, source: str = "array") -> Image.Image:
    """`[H, W]`, `[H, W, 1|2|3|4]`, `[depth, H, W]` numpy arrays and `[C, H, W]` / `[H, W]` tensors → RGB PIL image
    (`[H, W, 2]` is grey + alpha: the alpha is dropped)."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.dtype == torch.bfloat16:
            array = array.float()
        array = array.numpy()
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 2, 3, 4):
            array = np.moveaxis(array, 0, -1)
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] in (1, 2):
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] not in (3, 4):
        array = array[_pick(array.shape[0], slice_index, "slice", source)]
    if array.ndim not in (2, 3) or array.size == 0:
        raise ImageLoadError(f"{source}: unsupported image shape {array.shape}; expected [H, W], [H, W, 3|4] or [depth, H, W].")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or np.iscomplexobj(array):
        raise ImageLoadError(f"{source}: unsupported pixel type {array.dtype}.")
    return _rgb(to_uint8(array, window, source))


def _pil_to_image(image: Image.Image, window: Window, slice_index: int | None, source: str) -> Image.Image:
    """One page of a PIL image → RGB: windowed when a window is given, else converted as the original does."""
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        image.seek(_pick(frames, slice_index, "page", source))
    if window is not None:
        if image.mode not in GREY_VALUE_MODES + ("L",):
            raise ImageLoadError(f"{source}: a window applies to grey-scale images, not to a {image.mode} image.")
        return array_to_image(np.asarray(image), window, None, source)
    if image.mode in GREY_VALUE_MODES:
        values = np.asarray(image)
        check_finite(values, source)
        if values.size and (values.min() < 0 or values.max() > 255):
            logger.warning(
                "%s: %s values in [%s, %s] are clipped to 0..255 as the original UniMedVL does; pass "
                "window='minmax' or a CT window (e.g. --window minmax) to map them instead.",
                source, image.mode, values.min(), values.max(),
            )
    return to_rgb(image)


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
    values = np.asarray(apply_modality_lut(pixels, dataset))
    resolved = resolve_window(window, path)
    if resolved is None:
        resolved = stored_window(dataset, path)
    grey = to_uint8(values, resolved if resolved is not None else "minmax", path)
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        grey = 255 - grey
    return _rgb(grey)


def stored_window(dataset, path: str) -> tuple[float, float] | None:
    """The file's first `(WindowCenter, WindowWidth)`, or None when it has none or an unusable one (width < 1, not a
    number), which is logged as a warning because the image then falls back to min–max."""
    if "WindowCenter" not in dataset or "WindowWidth" not in dataset:
        return None
    try:
        center, width = _first(dataset.WindowCenter), _first(dataset.WindowWidth)
    except (TypeError, ValueError, IndexError):
        center, width = float("nan"), float("nan")
    if not (np.isfinite(center) and np.isfinite(width)) or width < 1:
        logger.warning(
            "%s: the file's window (center %g, width %g) is unusable (the width must be at least 1); using the image's "
            "min–max instead. Pass a window (e.g. --window soft_tissue) to choose one.",
            path, center, width,
        )
        return None
    return center, width


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
    try:
        values = np.asarray(image.dataobj[tuple(index)])
    except (EOFError, OSError, ValueError, zlib.error) as error:
        raise ImageLoadError(f"{path}: the NIfTI data is truncated or corrupt ({error}).") from None
    values = np.flip(values, (0, 1)).T
    return array_to_image(np.ascontiguousarray(values), "minmax" if window is None else window, None, path)


def _is_dicom(path: str) -> bool:
    if path.lower().endswith(DICOM_SUFFIXES):
        return True
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def _dicom_info(path: str) -> ImageFileInfo:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, struct.error) as error:
        raise ImageLoadError(f"{path}: not a readable DICOM file ({error}).") from None
    return ImageFileInfo(path, "DICOM", columns, rows, frames, columns * rows * frames * samples)


def _nifti_info(path: str) -> ImageFileInfo:
    import nibabel
    from nibabel.filebasedimages import ImageFileError

    try:
        shape = tuple(int(size) for size in nibabel.load(path).shape)
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as error:
        raise ImageLoadError(f"{path}: not a readable NIfTI file ({error}).") from None
    spatial = sorted(shape[:3], reverse=True) + [1, 1, 1]
    width, height = spatial[0], spatial[1]
    frames = spatial[2] * (shape[3] if len(shape) > 3 else 1)
    return ImageFileInfo(path, "NIfTI", width, height, frames, width * height)


def _pil_info(path: str) -> ImageFileInfo:
    try:
        with warnings.catch_warnings():  # PIL's own bomb warning: the caller's limit is checked right after
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path, formats=PIL_FORMATS)
        with image:
            width, height = image.size
            image_format = image.format or "image"
            # TIFF / PNG / WebP count pages from their headers; GIF would walk (and partly decode) every frame
            frames = getattr(image, "n_frames", 1) if image_format != "GIF" else 1
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"{path}: refused before decoding: {error}") from None
    except Exception as error:  # PIL plugins raise many types for damaged headers
        raise ImageLoadError(
            f"{path}: not a readable image file: its content is none of {', '.join(PIL_FORMATS)}, DICOM or NIfTI "
            f"({' '.join(str(error).split()) or type(error).__name__})."
        ) from None
    return ImageFileInfo(path, image_format, width, height, frames, width * height)


def inspect_image_file(path) -> ImageFileInfo:
    """The format and size of an image file (PNG/JPEG/TIFF/…, DICOM or NIfTI) read from its header only.

    Raises:
        ImageLoadError: no such file, or a file none of the supported readers recognises (naming the file).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageLoadError(f"{path}: no such file.")
    if path.lower().endswith(NIFTI_SUFFIXES):
        return _nifti_info(path)
    if _is_dicom(path):
        return _dicom_info(path)
    return _pil_info(path)


def check_image_file(path, max_pixels: int | None = DEFAULT_MAX_PIXELS, max_voxels: int | None = DEFAULT_MAX_VOXELS) -> ImageFileInfo:
    """`inspect_image_file(path)`, refusing (before any decoding) files whose image / slice / frame has more than
    `max_pixels` pixels or whose decoding holds more than `max_voxels` pixels at once (`None` = no limit).

    Raises:
        ImageLoadError: unreadable, unsupported or too large, with the file, its size and the limit in the message.
    """
    info = inspect_image_file(path)
    if info.width < 1 or info.height < 1:
        raise ImageLoadError(f"{info.path}: the {info.format} header gives an empty image ({info.width}x{info.height}).")
    if max_pixels is not None and info.pixels > max_pixels:
        raise ImageLoadError(
            f"{info.path}: the {info.format} image is {info.width}x{info.height} = {info.pixels:,} pixels, above the "
            f"limit of {max_pixels:,}; downscale or crop it first."
        )
    if max_voxels is not None and info.decoded_pixels > max_voxels:
        raise ImageLoadError(
            f"{info.path}: decoding the {info.format} file needs {info.decoded_pixels:,} pixels at once "
            f"({info.frames} frames of {info.width}x{info.height}), above the limit of {max_voxels:,}."
        )
    return info


def open_image_file(path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """`PIL.Image.open(path)` for the plugins of `PIL_FORMATS` only, after `check_image_file` (size from the header);
    for code that needs the file's own PIL mode (e.g. metrics). DICOM / NIfTI files are refused: use
    `load_medical_image`.

    Raises:
        ImageLoadError: unreadable, too large, or not a PIL-readable image, naming the file.
    """
    info = check_image_file(path, max_pixels)
    if info.format in ("DICOM", "NIfTI"):
        raise ImageLoadError(f"{info.path}: a {info.format} file; read it with load_medical_image.")
    return Image.open(info.path, formats=PIL_FORMATS)


def load_medical_image(
    source,
    window: Window = None,
    slice_index: int | None = None,
    axis: str | int = "axial",
    volume: int = 0,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_voxels: int | None = DEFAULT_MAX_VOXELS,
) -> Image.Image:
    """Any supported input (PIL image, numpy array, torch tensor, or a path to PNG/JPEG/TIFF/…, DICOM or NIfTI) → RGB PIL.

    Args:
        source: the image or a file path (`str` / `os.PathLike`).
        window: preset name, `(center, width)`, `"minmax"` or `None` (see the module docstring).
        slice_index: frame / page / slice of multi-frame DICOM, multi-page TIFF, NIfTI volumes and `[depth, H, W]`
            arrays (default: the middle one).
        axis, volume: NIfTI only — slicing axis and 4-D time point.
        max_pixels, max_voxels: size limits of files, checked from the header before decoding (`check_image_file`).
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
    info = check_image_file(source, max_pixels, max_voxels)
    path = info.path
    if info.format == "NIfTI":
        return read_nifti(path, window, axis, slice_index, volume)
    if info.format == "DICOM":
        return read_dicom(path, window, slice_index)
    try:
        with Image.open(path, formats=PIL_FORMATS) as image:
            return _pil_to_image(image, window, slice_index, path)
    except ImageLoadError:
        raise
    except Exception as error:  # PIL decoders raise many types for truncated or corrupt data
        raise ImageLoadError(
            f"{path}: the {info.format} data cannot be decoded ({' '.join(str(error).split()) or type(error).__name__})."
        ) from None


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_VOXELS",
    "ImageFileInfo",
    "ImageLoadError",
    "PIL_FORMATS",
    "WINDOW_PRESETS",
    "apply_window",
    "array_to_image",
    "check_image_file",
    "inspect_image_file",
    "load_medical_image",
    "minmax_to_uint8",
    "open_image_file",
    "read_dicom",
    "read_nifti",
    "resolve_window",
    "to_uint8",
]
