"""Idempotent registration of the Vim model type with transformers' Auto classes."""

from __future__ import annotations

_DONE = False


def register_vim_with_transformers() -> None:
    """Registers ``vim`` with AutoConfig, AutoModel, AutoModelForImageClassification and AutoImageProcessor, and
    the ``vim`` quantization method (config + quantizer) with transformers' quantizer registry.

    Safe to call repeatedly (transformers raises on a second AutoConfig registration of the same name).
    """
    global _DONE
    if _DONE:
        return
    from transformers import AutoBackbone, AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .models.vim import VimBackbone, VimConfig, VimForImageClassification, VimImageProcessor, VimModel
    from .models.vim.image_processing_vim import fast_image_processor_class

    if VimConfig.model_type not in CONFIG_MAPPING:
        AutoConfig.register(VimConfig.model_type, VimConfig)
    AutoModel.register(VimConfig, VimModel, exist_ok=True)
    AutoModelForImageClassification.register(VimConfig, VimForImageClassification, exist_ok=True)
    AutoBackbone.register(VimConfig, VimBackbone, exist_ok=True)
    processors = {"pil": VimImageProcessor}
    fast = fast_image_processor_class()  # None unless torchvision imports
    if fast is not None:
        processors["torchvision"] = fast
    AutoImageProcessor.register(VimConfig, image_processor_classes=processors, exist_ok=True)
    from transformers.quantizers import register_quantization_config, register_quantizer
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    from .quantization_config import QUANT_METHOD, ViMQuantizationConfig
    from .quantizer import ViMHfQuantizer

    # register_quantizer / register_quantization_config raise on a second registration: guard by membership
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(ViMQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(ViMHfQuantizer)
    from .models.mambavision import register_mambavision_with_transformers

    register_mambavision_with_transformers()
    _DONE = True
