"""MambaVision model family (NVlabs/MambaVision): native transformers classes, Hub / official checkpoint loading."""

from .configuration_mambavision import HUB_REPOS, MAMBAVISION_PRESETS, MambaVisionConfig
from .image_processing_mambavision import MambaVisionImageProcessor
from .modeling_mambavision import (
    MambaVisionBackbone,
    MambaVisionForImageClassification,
    MambaVisionModel,
    MambaVisionPreTrainedModel,
)
from .registration import register_mambavision_with_transformers

__all__ = [
    "HUB_REPOS",
    "MAMBAVISION_PRESETS",
    "MambaVisionBackbone",
    "MambaVisionConfig",
    "MambaVisionForImageClassification",
    "MambaVisionImageProcessor",
    "MambaVisionModel",
    "MambaVisionPreTrainedModel",
    "register_mambavision_with_transformers",
]
