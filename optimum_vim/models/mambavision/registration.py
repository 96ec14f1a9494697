"""Registration of the MambaVision family with transformers (listed in ``optimum_vim._registration.MODEL_FAMILIES``)."""

from __future__ import annotations

# The Hub files keep the classifier at ``model.head``; MambaVisionForImageClassification holds it at ``head``.
HUB_HEAD_RENAMING = (r"^model\.head\.", "head.")


def register() -> None:
    """``mambavision``: AutoConfig, AutoModel, AutoModelForImageClassification, AutoBackbone and AutoImageProcessor
    (no ``trust_remote_code``: a Hub repo's config.json names model_type ``mambavision``), and the key renaming that
    loads the Hub repos' ``model.safetensors`` directly. Safe to call repeatedly."""
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    from ..._registration import register_model_family
    from .configuration_mambavision import MambaVisionConfig
    from .image_processing_mambavision import MambaVisionImageProcessor
    from .modeling_mambavision import MambaVisionBackbone, MambaVisionForImageClassification, MambaVisionModel

    register_model_family(MambaVisionConfig, model=MambaVisionModel,
                          image_classification=MambaVisionForImageClassification, backbone=MambaVisionBackbone,
                          image_processors={"pil": MambaVisionImageProcessor},
                          adapter="optimum_vim.models.mambavision.family:MambaVisionFamily")
    register_checkpoint_conversion_mapping(
        MambaVisionForImageClassification.__name__,
        [WeightRenaming(source_patterns=HUB_HEAD_RENAMING[0], target_patterns=HUB_HEAD_RENAMING[1])],
        overwrite=True,
    )


# the name the package exports (``import optimum_vim`` already runs it)
register_mambavision_with_transformers = register

__all__ = ["register", "register_mambavision_with_transformers"]
