"""Idempotent registration of the ``mambavision`` model type with transformers' Auto classes."""

from __future__ import annotations

_DONE = False

# The Hub files keep the classifier at ``model.head``; MambaVisionForImageClassification holds it at ``head``.
HUB_HEAD_RENAMING = (r"^model\.head\.", "head.")


def register_mambavision_with_transformers() -> None:
    """Registers ``mambavision`` with AutoConfig, AutoModel, AutoModelForImageClassification, AutoBackbone and
    AutoImageProcessor (no ``trust_remote_code``: a Hub repo's config.json names model_type ``mambavision``), and
    the key renaming that loads the Hub repos' ``model.safetensors`` directly. Safe to call repeatedly."""
    global _DONE
    if _DONE:
        return
    from transformers import AutoBackbone, AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .configuration_mambavision import MambaVisionConfig
    from .image_processing_mambavision import MambaVisionImageProcessor
    from .modeling_mambavision import MambaVisionBackbone, MambaVisionForImageClassification, MambaVisionModel

    if MambaVisionConfig.model_type not in CONFIG_MAPPING:
        AutoConfig.register(MambaVisionConfig.model_type, MambaVisionConfig)
    AutoModel.register(MambaVisionConfig, MambaVisionModel, exist_ok=True)
    AutoModelForImageClassification.register(MambaVisionConfig, MambaVisionForImageClassification, exist_ok=True)
    AutoBackbone.register(MambaVisionConfig, MambaVisionBackbone, exist_ok=True)
    AutoImageProcessor.register(MambaVisionConfig, image_processor_classes={"pil": MambaVisionImageProcessor},
                                exist_ok=True)
    register_checkpoint_conversion_mapping(
        MambaVisionForImageClassification.__name__,
        [WeightRenaming(source_patterns=HUB_HEAD_RENAMING[0], target_patterns=HUB_HEAD_RENAMING[1])],
        overwrite=True,
    )
    _DONE = True


__all__ = ["register_mambavision_with_transformers"]
