"""Idempotent registration of the Vim model type with transformers' Auto classes."""

from __future__ import annotations

_DONE = False


def register_vim_with_transformers() -> None:
    """Registers ``vim`` with AutoConfig, AutoModel, AutoModelForImageClassification and AutoImageProcessor.

    Safe to call repeatedly (transformers raises on a second AutoConfig registration of the same name).
    """
    global _DONE
    if _DONE:
        return
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .models.vim import VimConfig, VimForImageClassification, VimImageProcessor, VimModel

    if VimConfig.model_type not in CONFIG_MAPPING:
        AutoConfig.register(VimConfig.model_type, VimConfig)
    AutoModel.register(VimConfig, VimModel, exist_ok=True)
    AutoModelForImageClassification.register(VimConfig, VimForImageClassification, exist_ok=True)
    AutoImageProcessor.register(VimConfig, image_processor_classes={"pil": VimImageProcessor}, exist_ok=True)
    _DONE = True
