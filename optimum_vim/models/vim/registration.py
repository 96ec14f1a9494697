"""Registration of the Vim family with transformers (listed in ``optimum_vim._registration.MODEL_FAMILIES``)."""

from __future__ import annotations


def register() -> None:
    """``vim``: VimConfig, VimModel, VimForImageClassification, VimBackbone and the image processors (the
    torchvision one only when torchvision imports)."""
    from ..._registration import register_model_family
    from .configuration_vim import VimConfig
    from .image_processing_vim import VimImageProcessor, fast_image_processor_class
    from .modeling_vim import VimBackbone, VimForImageClassification, VimModel

    processors = {"pil": VimImageProcessor}
    fast = fast_image_processor_class()  # None unless torchvision imports
    if fast is not None:
        processors["torchvision"] = fast
    register_model_family(VimConfig, model=VimModel, image_classification=VimForImageClassification,
                          backbone=VimBackbone, image_processors=processors,
                          adapter="optimum_vim.models.vim.family:VimFamily")
