"""Vision Mamba model family."""

from .configuration_vim import VimConfig
from .image_processing_vim import VimImageProcessor
from .modeling_vim import VimBackbone, VimForImageClassification, VimModel, VimPreTrainedModel

__all__ = ["VimBackbone", "VimConfig", "VimForImageClassification", "VimImageProcessor", "VimModel", "VimPreTrainedModel"]
