"""UniMedVL pipelines: diffusers text-to-image / image-to-image pipelines, medical image reading (DICOM, NIfTI,
16-bit PNG/TIFF), bitsandbytes configs and the `unimedvl` command line.

Understanding (VQA, reports) needs no extra class: a converted folder loads with
`transformers.pipeline("image-text-to-text", model=path)` once `modeling_unimedvl` is imported (this package imports it).
"""

import modeling_unimedvl  # noqa: F401  (registers the Auto classes used by transformers.pipeline)

from .medical_images import WINDOW_PRESETS, ImageLoadError, load_medical_image
from .pipeline_unimedvl import UniMedVLImg2ImgPipeline, UniMedVLPipeline, UniMedVLPipelineOutput
from .quantization import bnb_config


__all__ = [
    "ImageLoadError",
    "UniMedVLImg2ImgPipeline",
    "UniMedVLPipeline",
    "UniMedVLPipelineOutput",
    "WINDOW_PRESETS",
    "bnb_config",
    "load_medical_image",
]
