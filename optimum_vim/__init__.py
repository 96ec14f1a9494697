"""optimum-vim: Vision Mamba as a native transformers model, and post-training quantization recipes for it.

``import optimum_vim`` registers the ``vim`` model type with transformers' Auto classes (no ``trust_remote_code``).
"""

from ._registration import register_model_family, register_vim_with_transformers
from .models.vim import (
    VimBackbone,
    VimConfig,
    VimForImageClassification,
    VimImageProcessor,
    VimModel,
    VimPreTrainedModel,
)

__version__ = "0.1.0"

register_vim_with_transformers()

from . import hub  # noqa: E402
from .evaluation import evaluate  # noqa: E402
from .quantization_config import ViMQuantizationConfig  # noqa: E402
from .quantizer import ViMHfQuantizer, dequantize_model, quantize_model  # noqa: E402
from .recipes.ouromamba.generation import generate_calibration_images  # noqa: E402

__all__ = [
    "VimBackbone",
    "VimConfig",
    "VimForImageClassification",
    "VimImageProcessor",
    "VimModel",
    "VimPreTrainedModel",
    "ViMHfQuantizer",
    "ViMQuantizationConfig",
    "__version__",
    "dequantize_model",
    "evaluate",
    "generate_calibration_images",
    "hub",
    "quantize_model",
    "register_model_family",
    "register_vim_with_transformers",
]
