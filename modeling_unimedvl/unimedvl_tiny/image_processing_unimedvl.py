"""Image processor of UniMedVL: the original's aspect-preserving resizes for the ViT and the VAE, and ViT patching."""

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature


UNDERSTANDING_VIT_TRANSFORM = (980, 378, 14, 2_007_040)
"""(max long side, min short side, stride, max pixels) of the ViT input for understanding."""
GENERATION_VIT_TRANSFORM = (980, 387, 14, 1_806_336)
"""ViT input of a conditioning image in image-to-image generation (applied after the VAE resize)."""
GENERATION_VAE_TRANSFORM = (1024, 32, 16, 1_806_336)
"""VAE input of a conditioning image; its size is also the default output size."""


def _make_divisible(value: float, stride: int) -> int:
    return max(stride, int(round(value / stride) * stride))


def _scaled_size(width: int, height: int, scale: float, stride: int) -> tuple[int, int]:
    return _make_divisible(round(width * scale), stride), _make_divisible(round(height * scale), stride)


def target_size(width: int, height: int, transform: tuple[int, int, int, int]) -> tuple[int, int]:
    """`(width, height)` after the original `MaxLongEdgeMinShortEdgeResize` with `transform` = (max, min, stride, pixels).

    The long side shrinks to at most `max`, the short side grows to at least `min`, both round to multiples of
    `stride`; then too many pixels or a too-long side scale the result down again.
    """
    max_size, min_size, stride, max_pixels = transform
    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    new_width, new_height = _scaled_size(width, height, scale, stride)
    if new_width * new_height > max_pixels:
        new_width, new_height = _scaled_size(new_width, new_height, max_pixels / (new_width * new_height), stride)
    if max(new_width, new_height) > max_size:
        new_width, new_height = _scaled_size(new_width, new_height, max_size / max(new_width, new_height), stride)
    return new_width, new_height


IMAGE_MODES = ("understanding", "interleave_understanding", "generation")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of a PIL image, as the original's `pil_img2rgb`: an RGBA image, or one with a `transparency` entry
    (palette or single-colour transparency), is pasted on white through its alpha; every other mode goes through
    PIL's `convert("RGB")`, so the alpha of LA / PA images is dropped and 16-bit, 32-bit integer and float images are
    clipped to 0…255 (float values truncated) as PIL converts them. Medical windowing is
    `unimedvl_pipelines.load_medical_image`'s explicit job, never this default."""
    if image.mode == "RGBA" or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return image.convert("RGB")


class UniMedVLImageProcessor(BaseImageProcessor):
    r"""
    Prepares images for UniMedVL exactly as the original implementation does (bicubic PIL resizes, [-1, 1] pixels).

    Understanding (`mode="understanding"`): every image is resized with `understanding_transform` and cut into
    14×14 patches → `pixel_values` `[num_patches, 3 * 14 * 14]` (patch vectors in (row, column, channel) order) and
    `image_grid_hw` `[num_images, 2]`.

    Conditioning images of image generation (`mode="generation"`): every image is resized with
    `generation_vae_transform` → `vae_pixel_values` (a list of `[3, H, W]` tensors); that resized image is resized
    again with `generation_vit_transform` for the ViT inputs.

    Understanding as the original's `InterleaveInferencer` does it (`mode="interleave_understanding"`, the editing
    flow's answer step): the same two resizes as `"generation"`, ViT inputs only (a 256² image becomes 392², 28×28
    patches, where the VQA transform gives 378², 27×27).

    Images are converted to RGB as the original does (`to_rgb`).

    Args:
        understanding_transform, generation_vit_transform, generation_vae_transform (`tuple[int, int, int, int]`):
            (max long side, min short side, stride, max pixels) of each resize.
        max_image_pixels (`int`): inputs with more pixels are rejected (decompression-bomb guard).
    """

    model_input_names = ["pixel_values", "image_grid_hw", "vae_pixel_values"]

    def __init__(
        self,
        understanding_transform=UNDERSTANDING_VIT_TRANSFORM,
        generation_vit_transform=GENERATION_VIT_TRANSFORM,
        generation_vae_transform=GENERATION_VAE_TRANSFORM,
        patch_size: int = 14,
        max_image_pixels: int = 50_000_000,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.understanding_transform = tuple(understanding_transform)
        self.generation_vit_transform = tuple(generation_vit_transform)
        self.generation_vae_transform = tuple(generation_vae_transform)
        self.patch_size = patch_size
        self.max_image_pixels = max_image_pixels

    def load(self, image) -> Image.Image:
        """A PIL RGB image (`to_rgb`) from PIL, a `[H, W(, C)]` uint8/float array or a `[C, H, W]` tensor in [0, 1] /
        [0, 255] (other values are clipped to that range; NaN / inf are refused)."""
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
            if image.ndim == 3 and image.shape[0] in (1, 3, 4):
                image = np.moveaxis(image, 0, -1)
        if isinstance(image, np.ndarray):
            image = _array_to_pil(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"Unsupported image type {type(image).__name__}; pass a PIL image, a numpy array or a tensor.")
        width, height = image.size
        if width < 1 or height < 1:
            raise ValueError(f"Empty image of size {width}x{height}.")
        if width * height > self.max_image_pixels:
            raise ValueError(
                f"Image of {width}x{height} = {width * height} pixels exceeds the limit of {self.max_image_pixels} "
                "pixels (max_image_pixels); downscale or crop it first."
            )
        return to_rgb(image)

    def resize(self, image: Image.Image, transform) -> Image.Image:
        size = target_size(*image.size, transform)
        return image if size == image.size else image.resize(size, Image.BICUBIC)

    @staticmethod
    def to_tensor(image: Image.Image) -> torch.Tensor:
        """PIL RGB → `[3, H, W]` float32 in [-1, 1]."""
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (pixels - 0.5) / 0.5

    def patchify(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """`[3, H, W]` → patches `[h*w, p*p*3]` in (row, column, channel) order and the grid `[h, w]`."""
        p = self.patch_size
        channels, height, width = pixels.shape
        patches = pixels.reshape(channels, height // p, p, width // p, p).permute(1, 3, 2, 4, 0)
        return patches.reshape(-1, p * p * channels), [height // p, width // p]

    def preprocess(self, images, mode: str = "understanding", **kwargs) -> BatchFeature:
        """`images` → `pixel_values` / `image_grid_hw` (and `vae_pixel_values` in `"generation"` mode); see the class."""
        if mode not in IMAGE_MODES:
            raise ValueError(f"mode must be one of {IMAGE_MODES}, got {mode!r}.")
        images = images if isinstance(images, (list, tuple)) else [images]
        patches, grids, vae_pixels = [], [], []
        for image in images:
            image = self.load(image)
            if mode in ("generation", "interleave_understanding"):
                image = self.resize(image, self.generation_vae_transform)
                if mode == "generation":
                    vae_pixels.append(self.to_tensor(image))
                vit_image = self.resize(image, self.generation_vit_transform)
            else:
                vit_image = self.resize(image, self.understanding_transform)
            image_patches, grid = self.patchify(self.to_tensor(vit_image))
            patches.append(image_patches)
            grids.append(grid)
        data = {
            "pixel_values": torch.cat(patches) if patches else None,
            "image_grid_hw": torch.tensor(grids, dtype=torch.long) if grids else None,
        }
        if mode == "generation":
            data["vae_pixel_values"] = vae_pixels
        return BatchFeature(data={k: v for k, v in data.items() if v is not None})


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"Unsupported image array shape {array.shape}; expected [H, W], [H, W, 3] or [H, W, 4].")
    if array.dtype != np.uint8:
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ValueError("The image array holds NaN or infinite values.")
        if array.max() <= 1.0 and array.min() >= 0.0:
            array = array * 255.0
        array = np.clip(np.round(array), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


__all__ = ["UniMedVLImageProcessor", "IMAGE_MODES", "target_size", "to_rgb"]
