"""Image metrics (docs/evaluation.md §4-5): FID / KID through torchmetrics, MS-SSIM diversity, PSNR / SSIM.

Conventions, fixed here and written into every summary:

- FID / KID: features are extracted once per image by either torch-fidelity's Inception-v3 (2048-d pool features,
  from a local weights file, uint8 input resized to 299 inside) or a user feature extractor (any `nn.Module` mapping
  float `[N, 3, S, S]` in [0, 1] to `[N, d]`); the features then feed `torchmetrics` `FrechetInceptionDistance` /
  `KernelInceptionDistance` per group. Only the Inception path is comparable with published FID, and only at equal
  sample counts. Grayscale images are replicated to 3 channels.
- MS-SSIM diversity: mean pairwise `torchmetrics` MS-SSIM between the samples of one prompt (Gaussian window 11,
  sigma 1.5, data_range 1 on [0, 1] images, `normalize="relu"`, scale weights (0.0448, 0.2856, 0.3001, 0.2363,
  0.1333) truncated to the number of scales and not renormalised), averaged over prompts; lower = more diverse.
- PSNR / SSIM: per image on 8-bit values with data_range 255, then averaged over images; SSIM is torchmetrics'
  Gaussian 11 x 11, sigma 1.5, K1 0.01, K2 0.03 (reflect-padded input, padded border cropped from the SSIM map);
  `crop_border` pixels are removed from every side before both metrics; grayscale targets are scored on one channel,
  colour targets on RGB (mean over channels). PSNR of identical images is infinite.
"""

import importlib
import importlib.util
import itertools
import os
import warnings

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from ..medical_images import open_image_file

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def load_image_tensor(path: str, size: int | None = None, grayscale: bool = False) -> torch.Tensor:
    """`[C, H, W]` float in [0, 1] (C = 1 if `grayscale` else 3); resized to `size x size` (bicubic) when given."""
    with open_image_file(path) as file:
        image = file.convert("L" if grayscale else "RGB")
    if size is not None:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array)
    return tensor[None] if grayscale else tensor.permute(2, 0, 1).contiguous()


def load_feature_extractor(spec: str) -> nn.Module:
    """A feature extractor from `"package.module:factory"`: `factory()` must return an `nn.Module` mapping float
    images `[N, 3, S, S]` in [0, 1] to features `[N, d]`. The module is put in eval mode."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--feature-extractor must look like 'package.module:factory', got {spec!r}.")
    factory = getattr(importlib.import_module(module_name), attribute, None)
    if factory is None:
        raise ValueError(f"Module {module_name} has no attribute {attribute!r} (from --feature-extractor {spec!r}).")
    extractor = factory() if not isinstance(factory, nn.Module) else factory
    if not isinstance(extractor, nn.Module):
        raise TypeError(f"{spec} returned {type(extractor).__name__}, expected a torch.nn.Module.")
    return extractor.eval()


def load_inception_extractor(weights_path: str) -> nn.Module:
    """torch-fidelity's Inception-v3 (2048-d) from a local weights file, via torchmetrics; never downloads."""
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ImportError(
            "FID/KID with Inception weights needs the torch-fidelity package (pip install torch-fidelity), which is "
            "not installed. Install it, or pass a custom extractor with --feature-extractor package.module:factory."
        )
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(
            f"Inception weights file {weights_path} not found; give a local copy of "
            "weights-inception-2015-12-05-6726825d.pth (nothing is downloaded)."
        )
    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights_path)
    return metric.inception.eval()


@torch.no_grad()
def extract_features(extractor: nn.Module, images: torch.Tensor, uint8_input: bool) -> torch.Tensor:
    """Features `[N, d]` (float64) of float images `[N, 3, S, S]` in [0, 1]; `uint8_input` for Inception."""
    if uint8_input:
        images = (images * 255).round().to(torch.uint8)
    features = extractor(images)
    if isinstance(features, (tuple, list)):
        features = features[0]
    return features.reshape(features.shape[0], -1).double()


class _Precomputed(nn.Module):
    """Identity "extractor" so torchmetrics' FID / KID accumulate features computed once per image."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid_from_features(
    real: torch.Tensor, fake: torch.Tensor, kid_subset_size: int = 1000, kid_subsets: int = 100, seed: int = 0
) -> dict:
    """FID and KID (mean, std) from features `[N_real, d]`, `[N_fake, d]` via torchmetrics.

    KID's subset size is `min(kid_subset_size, N_real, N_fake)` (reported); its random subsets are drawn with
    `seed`. Needs at least 2 samples on each side; otherwise the values are None with the reason.
    """
    result = {"n_real": int(real.shape[0]), "n_fake": int(fake.shape[0])}
    if min(real.shape[0], fake.shape[0]) < 2:
        return dict(
            result, fid=None, kid_mean=None, kid_std=None, kid_subset_size=None, unavailable="fewer than 2 samples"
        )
    fid = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    subset_size = min(kid_subset_size, real.shape[0], fake.shape[0])
    with warnings.catch_warnings():  # its "saves all features" warning is moot: features are held here anyway
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=kid_subsets, subset_size=subset_size)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global generator: seed them
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return dict(
        result, fid=float(fid.compute()), kid_mean=float(kid_mean), kid_std=float(kid_std), kid_subset_size=subset_size
    )


def ms_ssim_diversity(groups: list[torch.Tensor], scales: int = 5) -> dict:
    """Mean pairwise MS-SSIM within each group `[k, C, H, W]` (k >= 2, [0, 1] images), averaged over groups.

    Raises a `ValueError` if the images are too small for `scales` (the smaller side must exceed 10 * 2^(scales-1)).
    """
    if not 1 <= scales <= len(MS_SSIM_BETAS):
        raise ValueError(f"MS-SSIM scales must be in 1..{len(MS_SSIM_BETAS)}, got {scales}.")
    groups = [group for group in groups if group.shape[0] >= 2]
    if not groups:
        return {"ms_ssim_diversity": None, "n_groups": 0, "unavailable": "needs at least 2 samples per prompt"}
    side = min(min(group.shape[-2:]) for group in groups)
    needed = (SSIM_WINDOW - 1) * 2 ** (scales - 1)
    if side <= needed:
        usable = max(
            (s for s in range(1, len(MS_SSIM_BETAS) + 1) if side > (SSIM_WINDOW - 1) * 2 ** (s - 1)), default=0
        )
        raise ValueError(
            f"MS-SSIM with {scales} scales needs images larger than {needed} px on the smaller side, got {side} px; "
            f"generate larger images or use --ms-ssim-scales {usable}."
        )
    per_group = []
    for group in groups:
        pairs = list(itertools.combinations(range(group.shape[0]), 2))
        first = group[[i for i, _ in pairs]]
        second = group[[j for _, j in pairs]]
        values = multiscale_structural_similarity_index_measure(
            first,
            second,
            data_range=1.0,
            kernel_size=SSIM_WINDOW,
            sigma=SSIM_SIGMA,
            betas=MS_SSIM_BETAS[:scales],
            reduction="none",
        )
        per_group.append(float(values.mean()))
    return {"ms_ssim_diversity": sum(per_group) / len(per_group), "n_groups": len(per_group), "scales": scales}


def psnr_ssim(
    prediction: torch.Tensor, target: torch.Tensor, data_range: float = 255.0, crop_border: int = 0
) -> tuple[float, float]:
    """PSNR (dB) and SSIM of one image pair `[C, H, W]` on the same scale (e.g. 8-bit values with data_range 255)."""
    if prediction.shape != target.shape:
        raise ValueError(f"Prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape.")
    if crop_border:
        if min(prediction.shape[-2:]) <= 2 * crop_border:
            raise ValueError(f"crop_border {crop_border} leaves nothing of a {tuple(prediction.shape[-2:])} image.")
        prediction = prediction[..., crop_border:-crop_border, crop_border:-crop_border]
        target = target[..., crop_border:-crop_border, crop_border:-crop_border]
    prediction, target = prediction[None].double(), target[None].double()
    psnr = peak_signal_noise_ratio(prediction, target, data_range=data_range)
    ssim = structural_similarity_index_measure(
        prediction, target, data_range=data_range, kernel_size=SSIM_WINDOW, sigma=SSIM_SIGMA
    )
    return float(psnr), float(ssim)


__all__ = [
    "MS_SSIM_BETAS",
    "load_image_tensor",
    "load_feature_extractor",
    "load_inception_extractor",
    "extract_features",
    "fid_kid_from_features",
    "ms_ssim_diversity",
    "psnr_ssim",
]
