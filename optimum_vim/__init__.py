"""optimum-vim: Vision Mamba as a native transformers model, and post-training quantization recipes for it.

``import optimum_vim`` registers the ``vim`` model type with transformers' Auto classes (no ``trust_remote_code``).
"""

from ._registration import register_vim_with_transformers
from .models.vim import VimConfig, VimForImageClassification, VimImageProcessor, VimModel, VimPreTrainedModel

__version__ = "0.1.0"

register_vim_with_transformers()

__all__ = [
    "VimConfig",
    "VimForImageClassification",
    "VimImageProcessor",
    "VimModel",
    "VimPreTrainedModel",
    "__version__",
]
