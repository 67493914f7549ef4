"""UniMedVL for transformers: importing this package registers the classes with the `Auto*` API."""

from .logging_filters import silence_optional_kernel_notice


silence_optional_kernel_notice()  # before diffusers imports bitsandbytes: importing the package prints nothing

from transformers import (  # noqa: E402
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoProcessor,
)

from .configuration_unimedvl import UniMedVLConfig  # noqa: E402
from .default_model import default_model_path, resolve_model_path
from .image_processing_unimedvl import UniMedVLImageProcessor
from .modeling_unimedvl import (
    UniMedVLForConditionalGeneration,
    UniMedVLImageGenerationOutput,
    UniMedVLModel,
    UniMedVLPreTrainedModel,
)
from .processing_unimedvl import UniMedVLProcessor


AutoConfig.register(UniMedVLConfig.model_type, UniMedVLConfig, exist_ok=True)
AutoModel.register(UniMedVLConfig, UniMedVLModel, exist_ok=True)
AutoModelForImageTextToText.register(UniMedVLConfig, UniMedVLForConditionalGeneration, exist_ok=True)
AutoModelForMultimodalLM.register(UniMedVLConfig, UniMedVLForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(UniMedVLConfig, image_processor_classes={"pil": UniMedVLImageProcessor}, exist_ok=True)
AutoProcessor.register(UniMedVLConfig, UniMedVLProcessor, exist_ok=True)

# A saved folder carries its code and an `auto_map`, so it also loads with `trust_remote_code=True` without this package.
UniMedVLConfig.register_for_auto_class()
UniMedVLForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
UniMedVLImageProcessor.register_for_auto_class()
UniMedVLProcessor.register_for_auto_class()

__all__ = [
    "UniMedVLConfig",
    "UniMedVLForConditionalGeneration",
    "UniMedVLImageGenerationOutput",
    "UniMedVLImageProcessor",
    "UniMedVLModel",
    "UniMedVLPreTrainedModel",
    "UniMedVLProcessor",
    "default_model_path",
    "resolve_model_path",
]
