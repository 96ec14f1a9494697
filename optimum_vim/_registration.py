"""Idempotent registration of optimum-vim's model families and quantizer with transformers.

A model family registers its classes in one function of its own package that calls :func:`register_model_family`;
adding a family adds one ``"module:function"`` line to :data:`MODEL_FAMILIES`.
"""

from __future__ import annotations

import importlib

# one line per model family: the function that registers it (with register_model_family)
MODEL_FAMILIES = (
    "optimum_vim.models.vim.registration:register",
    "optimum_vim.models.mambavision.registration:register",
)

_DONE = False


def register_model_family(config_class, *, model=None, image_classification=None, backbone=None,
                          image_processors: dict | None = None, adapter: str | None = None) -> None:
    """Registers one model family with transformers' Auto classes: ``AutoConfig`` (``config_class.model_type``),
    ``AutoModel`` (``model``), ``AutoModelForImageClassification``, ``AutoBackbone`` and ``AutoImageProcessor``
    (``image_processors``: ``{"pil": cls, "torchvision": fast_cls}``); None leaves an Auto class out. ``adapter``
    (``"module:Class"``, a :class:`~optimum_vim.models.family.ModelFamily`) is what the recipes ask about the
    family's blocks and quantizable modules; without one the family loads and saves but is not quantized.
    Idempotent."""
    from transformers import AutoBackbone, AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if config_class.model_type not in CONFIG_MAPPING:  # AutoConfig raises on a second registration of the name
        AutoConfig.register(config_class.model_type, config_class)
    for auto, cls in ((AutoModel, model), (AutoModelForImageClassification, image_classification),
                      (AutoBackbone, backbone)):
        if cls is not None:
            auto.register(config_class, cls, exist_ok=True)
    if image_processors:
        AutoImageProcessor.register(config_class, image_processor_classes=image_processors, exist_ok=True)
    if adapter is not None:
        from .models.family import FAMILIES

        FAMILIES[config_class.model_type] = adapter


def register_quantizer() -> None:
    """Registers the ``vim`` quantization method (config + quantizer) with transformers' quantizer registry."""
    from transformers.quantizers import register_quantization_config, register_quantizer
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    from .quantization_config import QUANT_METHOD, ViMQuantizationConfig
    from .quantizer import ViMHfQuantizer

    # register_quantizer / register_quantization_config raise on a second registration: guard by membership
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(ViMQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(ViMHfQuantizer)


def register_vim_with_transformers() -> None:
    """Registers every model family of :data:`MODEL_FAMILIES` (``vim``, ``mambavision``: AutoConfig, AutoModel,
    AutoModelForImageClassification, AutoBackbone, AutoImageProcessor) and the ``vim`` quantization method with
    transformers. Safe to call repeatedly."""
    global _DONE
    if _DONE:
        return
    for entry in MODEL_FAMILIES:
        module, function = entry.split(":")
        getattr(importlib.import_module(module), function)()
    register_quantizer()
    _DONE = True
