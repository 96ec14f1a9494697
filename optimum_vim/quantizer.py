"""ViMHfQuantizer: runs a recipe inside ``from_pretrained`` and reloads saved quantized checkpoints.

Quantize-on-load (float checkpoint + ``ViMQuantizationConfig``): the float weights load normally, then
``_process_model_after_weight_loading`` calibrates (the recipe returns a plan), swaps the modules and records each
module's spec in the config. Pre-quantized reload (config.json carries the config with ``layers``): the checkpoint
files are checked (header, sizes, format stamp, every quantized tensor's shape and dtype) and empty quantized modules
are built on the meta device before any weight loads, so the state dict fills them by name.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.quantizers import HfQuantizer

from .calibration import describe_source, prepare_calibration_batches
from .modules.spec import spec_from_dict
from .quantization_config import ViMQuantizationConfig
from .recipes import apply_plan, build_quantized_skeleton, get_recipe_class, quantized_modules
from .recipes.base import _has_submodule
from .serialization import METADATA_FORMAT_KEY, METADATA_RECIPE_KEY, check_quantized_checkpoint

logger = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _is_vim(model) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "vim"


def _align_names(specs: dict[str, dict], model: nn.Module) -> dict[str, dict]:
    """Maps spec names saved from one Vim class onto another (``VimForImageClassification`` <-> ``VimModel``)."""
    prefix = getattr(model, "base_model_prefix", "vim")
    has_prefix = hasattr(model, prefix)
    out = {}
    for name, spec in specs.items():
        if name.startswith(prefix + ".") and not has_prefix:
            out[name[len(prefix) + 1 :]] = spec  # saved from the classifier, loaded as the backbone
        elif not name.startswith(prefix + ".") and has_prefix and not _has_submodule(model, name):
            out[f"{prefix}.{name}"] = spec  # saved from the backbone, loaded as the classifier
        elif _has_submodule(model, name):
            out[name] = spec
        else:
            logger.info("quantized module %s does not exist in %s; skipped", name, type(model).__name__)
    return out


class ViMHfQuantizer(HfQuantizer):
    """The transformers quantizer of optimum-vim (``quant_method="vim"``)."""

    requires_calibration = False

    def __init__(self, quantization_config: ViMQuantizationConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        if self.pre_quantized and not quantization_config.is_quantized_layout:
            raise ValueError(
                "this checkpoint's quantization_config has no per-layer specs ('layers'); it was not written by "
                "optimum-vim's save_pretrained, or is from an incompatible version"
            )
        if not self.pre_quantized and quantization_config.is_quantized_layout:
            raise ValueError(
                "the ViMQuantizationConfig carries per-layer specs of an already quantized model; to quantize a float "
                "checkpoint pass a fresh config (recipe, bits), to reload a quantized one call from_pretrained on it"
            )

    # ------------------------------------------------------------------------------------------ environment
    def validate_environment(self, device_map=None, **kwargs):
        if device_map is not None and not self.pre_quantized:
            values = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
            if "disk" in values:
                raise ValueError(
                    "quantize-on-load cannot calibrate modules offloaded to disk; use device_map='cpu' or a GPU map, "
                    "save the quantized model, then reload it with any device_map"
                )

    def update_dtype(self, dtype):
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"optimum-vim runs Vim in float32, float16 or bfloat16; got dtype={dtype}")
        return dtype

    # ------------------------------------------------------------------------------------------ loading
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from .pretrained import QuantizableModelMixin

        if not isinstance(model, QuantizableModelMixin):  # any family wired into optimum-vim, not one model type
            raise TypeError(
                f"ViMQuantizationConfig quantizes the model families of optimum-vim (e.g. Vision Mamba, model_type "
                f"'vim'); got {type(model).__name__} (model_type {getattr(model.config, 'model_type', None)!r}), "
                "whose PreTrainedModel does not inherit optimum_vim.pretrained.QuantizableModelMixin"
            )
        if not self.pre_quantized:
            return model
        cfg = self.quantization_config
        # the specs under the names of the class being loaded (a backbone saved from the classifier, or the reverse);
        # the config then describes this model, so that saving it again writes matching names
        cfg.layers = _align_names(cfg.layers, model)
        build_quantized_skeleton(model, cfg.layers)
        if checkpoint_files:
            expected = {}
            for name, spec in cfg.layers.items():
                for buf in spec_from_dict(spec).tensors():
                    expected[f"{name}.{buf.name}"] = (buf.shape, str(buf.dtype).removeprefix("torch."))
            check_quantized_checkpoint(checkpoint_files, expected, cfg.format_version, recipe=cfg.recipe,
                                       prefix=getattr(model, "base_model_prefix", "vim"))
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        if self.pre_quantized:
            stale = [n for n, b in model.named_buffers() if b.is_meta]
            if stale:
                raise RuntimeError(f"{len(stale)} quantized buffers were not loaded, e.g. {stale[:3]}")
            for mod in quantized_modules(model).values():
                mod.requires_grad_(False)
            if cfg.dequantize:
                self._dequantize(model)
            return model
        return run_recipe(model, cfg)

    # ------------------------------------------------------------------------------------------ saving
    def get_state_dict_and_metadata(self, model):
        return None, {METADATA_FORMAT_KEY: str(self.quantization_config.format_version),
                      METADATA_RECIPE_KEY: str(self.quantization_config.recipe)}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """Quantized Vims train: every quantizer has a straight-through path (``optimum_vim.modules.training``),
        float parameters and PEFT adapters get gradients, weight codes stay frozen."""
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """Trainer may fine-tune the quantized model itself (no adapter needed): the float parameters, and the
        quantization scales after ``optimum_vim.training.enable_scale_training``."""
        return True

    # ------------------------------------------------------------------------------------------ dequantize
    def _dequantize(self, model, dtype=None):
        return dequantize_model(model, dtype)


def run_recipe(model: nn.Module, cfg: ViMQuantizationConfig) -> nn.Module:
    """Calibrates ``cfg.recipe`` on a loaded float model of a supported family, swaps its modules (in place) and
    records the per-layer specs in ``cfg`` (which becomes ``model.config.quantization_config``)."""
    from .models.family import family_of

    family = family_of(model)  # a clear error for a model no family adapter describes
    if cfg.is_quantized_layout:
        raise ValueError("this ViMQuantizationConfig was already used to quantize a model; create a new one")
    recipe_cls = get_recipe_class(cfg.recipe)
    # the config's processor, else the checkpoint's, for every recipe that reads one, data-free ones included
    # (OuroMamba bounds its synthetic pixels with it): the same one the CLI and the benchmarks pass
    processor = cfg.image_processor
    if processor is None and recipe_cls.uses_image_processor(cfg):
        processor = _checkpoint_processor(model)
    recipe = recipe_cls.from_config(cfg, image_processor=processor)
    batches = None
    if recipe.requires_data(cfg):
        batches = prepare_calibration_batches(
            cfg.calibration_dataset, processor, cfg.num_calibration_samples, cfg.calibration_batch_size,
            cfg.seed, family.input_shape(model),
        )
        param = next(model.parameters())
        batches = [b.to(param.dtype) for b in batches]
    elif cfg.calibration_dataset is not None:
        logger.info("recipe %s does not use calibration data with these settings; it is ignored", cfg.recipe)
    plan = recipe.calibrate(model, batches)
    if not plan.layers:
        raise ValueError("nothing was quantized: every target module is excluded by modules_to_not_convert / overrides")
    apply_plan(model, plan)
    cfg.layers = plan.specs()
    # a data-free recipe that made its own calibration set says so (e.g. "calibrated on 128 synthetic images")
    cfg.calibration_source = plan.info.get("calibration_source") or (
        describe_source(cfg.calibration_dataset) if batches is not None else "none"
    )
    if cfg.base_model is None:
        cfg.base_model = _hub_source(model)
    model.config.quantization_config = cfg
    logger.info("quantized %d modules with recipe %s", len(plan.layers), cfg.recipe)
    return model


def quantize_model(model: nn.Module, quantization_config: ViMQuantizationConfig) -> nn.Module:
    """Quantizes an already-loaded float Vim in place, through the same path as
    ``from_pretrained(..., quantization_config=...)``; the result saves, reloads and dequantizes the same way."""
    quantizer = ViMHfQuantizer(quantization_config, pre_quantized=False)
    run_recipe(model, quantization_config)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = quantization_config.quant_method
    return model


def dequantize_model(model: nn.Module, dtype=None) -> nn.Module:
    """Replaces every quantized module by the float module it stands for (:meth:`QModule.dequantize
    <optimum_vim.modules.QModule.dequantize>`: dequantized weights; activation quantizers are dropped; folded
    reparameterisations stay folded, which is exact in float)."""
    use_mamba = getattr(getattr(model, "config", None), "use_mamba_kernels", True)
    if isinstance(dtype, str):  # config.dtype of a deep-copied model is a string ("float32")
        dtype = getattr(torch, dtype)
    for name, mod in quantized_modules(model).items():
        model.set_submodule(name, mod.dequantize(dtype, use_mamba_kernels=use_mamba))
    return model


def _hub_source(model) -> str | None:
    """The Hub id the float model was loaded from, or None for a local folder. Decided now, while the path means
    what it meant to ``from_pretrained`` (a relative folder name looks like "org/name" too)."""
    import os

    from .hub.cards import _is_repo_id

    source = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not source or os.path.exists(str(source)) or not _is_repo_id(source):
        return None
    return str(source)


def _checkpoint_processor(model):
    path = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not path:
        return None
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as err:
        logger.warning("no image processor found next to %s (%s)", path, err)
        return None
