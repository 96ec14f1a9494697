"""Convert MambaVision checkpoints to a native transformers folder (no remote code).

Two sources:

* a Hub repo folder ``nvidia/MambaVision-*`` (``config.json`` written for the remote code + ``model.safetensors``,
  whose keys carry a ``model.`` prefix). Such a folder also loads directly with
  ``AutoModelForImageClassification.from_pretrained`` once optimum-vim is imported; converting it adds a
  ``preprocessor_config.json`` (the repos ship none), drops ``auto_map`` and stores the head as ``head.*``.
* an official training checkpoint ``mambavision_*.pth.tar`` (timm's checkpoint dict: ``state_dict`` /
  ``state_dict_ema`` or ``model``, ``arch``, ``args`` as an ``argparse.Namespace``). It is read with
  ``torch.load(weights_only=True)`` and an allow-list holding only ``argparse.Namespace``.

Sizes (stem and stage widths, depths, layer scales, classes) are read off the tensors; heads and window sizes are not
in the tensors and come from the released model the sizes identify (T/T2/S/B/L/L2), from ``arch``, or from the
caller (``num_heads=``, ``window_size=``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from ...serialization import atomic_save
from ..vim.convert_vim_checkpoint import CheckpointConversionError, read_weights_only
from .configuration_mambavision import MAMBAVISION_PRESETS, MambaVisionConfig, preset_name

logger = logging.getLogger(__name__)

_STEM_KEYS = ("patch_embed.conv_down.0.weight", "patch_embed.conv_down.3.weight")
# fields of a Hub remote-code config.json that describe the network (everything else is kept as metadata)
_HUB_ARCH_FIELDS = ("depths", "num_heads", "window_size", "dim", "in_dim", "mlp_ratio", "drop_path_rate",
                    "layer_scale", "layer_scale_conv")


def load_official_checkpoint(path: str | os.PathLike, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], str | None]:
    """Reads an official ``.pth.tar`` safely: ``(state dict with official keys, arch name or None)``."""
    path = Path(path)
    obj = read_weights_only(path, "MambaVision")
    keys = ("state_dict_ema", "model_ema") if use_ema else ("state_dict", "model")
    state = next((obj[k] for k in keys if k in obj), None)
    if state is None:
        if use_ema:
            raise CheckpointConversionError(f"{path} has no EMA weights ('state_dict_ema'; keys: {sorted(obj)[:8]})")
        if _STEM_KEYS[0] not in obj and "module." + _STEM_KEYS[0] not in obj:
            raise CheckpointConversionError(
                f"{path} has no 'state_dict' / 'model' entry and is not a bare MambaVision state dict "
                f"(keys: {sorted(obj)[:8]})")
        state = obj
    if not isinstance(state, dict):
        raise CheckpointConversionError(f"{path}: the weights are a {type(state).__name__}, expected a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if state and min(state).startswith("encoder."):  # as the official loader: a detection encoder's weights
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    arch = obj.get("arch")
    if arch is None:
        arch = getattr(obj.get("args"), "model", None)
    return state, arch if isinstance(arch, str) else None


def load_hub_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Reads a Hub repo folder (``config.json`` + ``model.safetensors``, or sharded safetensors with an index):
    ``(state dict with official keys, config dict)``. Keys lose the Hub wrapper's ``model.`` prefix."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; pass a MambaVision Hub repo folder")
    hub_config = json.loads(config_path.read_text())
    if hub_config.get("model_type") not in (None, "mambavision"):
        raise CheckpointConversionError(f"{config_path} has model_type {hub_config.get('model_type')!r}, "
                                        "not 'mambavision'")
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no model.safetensors (the .pth.tar converts with "
                                "convert_mambavision_checkpoint(<file>.pth.tar, ...))")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return {re.sub(r"^(module\.)?model\.", "", k): v for k, v in state.items()}, hub_config


def _stage_depth(state: dict, level: int) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(rf"levels\.{level}\.blocks\.(\d+)\.", k))}
    if not ids or sorted(ids) != list(range(len(ids))):
        raise CheckpointConversionError(f"not a MambaVision checkpoint: level {level} has blocks {sorted(ids)}")
    return len(ids)


def infer_mambavision_config(state: dict[str, torch.Tensor], preset: str | None = None, hub_config: dict | None = None,
                             **overrides) -> MambaVisionConfig:
    """The :class:`MambaVisionConfig` of ``state`` (official keys, no prefix; tensors may be on the meta device).

    Stem / stage widths, depths, MLP ratio, qkv bias, mixer sizes, layer scales and the number of classes come from
    the tensors; ``num_heads`` / ``window_size`` from ``overrides``, else ``hub_config``, else ``preset`` (a released
    model's name), else the released model these sizes identify. A value that contradicts the tensors raises
    :class:`CheckpointConversionError` naming the evidence."""
    missing = [k for k in _STEM_KEYS if k not in state]
    if missing:
        raise CheckpointConversionError(f"not a MambaVision checkpoint: missing {missing}")
    stem0, stem3 = (state[k] for k in _STEM_KEYS)
    depths = [_stage_depth(state, i) for i in range(4)]
    if any(k.startswith("levels.4.") for k in state):
        raise CheckpointConversionError("checkpoint has more than 4 levels; MambaVision has 4")
    dim = stem3.shape[0]
    inferred = dict(depths=depths, dim=dim, in_dim=stem0.shape[0], num_channels=stem0.shape[1])
    stage3 = "levels.2.blocks.0."
    mixer = stage3 + "mixer."
    if mixer + "A_log" not in state:
        raise CheckpointConversionError(f"{mixer}A_log is missing: the first block of stage 3 must be a mixer block")
    width = dim * 4
    d_half, d_state = state[mixer + "A_log"].shape
    inferred.update(
        d_state=d_state, expand=2 * d_half // width, d_conv=state[mixer + "conv1d_x.weight"].shape[-1],
        dt_rank=state[mixer + "dt_proj.weight"].shape[1], mlp_ratio=state[stage3 + "mlp.fc1.weight"].shape[0] / width,
    )
    if inferred["dt_rank"] == -(-width // 16):
        inferred["dt_rank"] = "auto"
    attn = next((k for k in state if re.match(r"levels\.[23]\.blocks\.\d+\.mixer\.qkv\.weight$", k)), None)
    if attn is not None:
        inferred["qkv_bias"] = attn.replace("weight", "bias") in state
    if float(inferred["mlp_ratio"]).is_integer():
        inferred["mlp_ratio"] = float(inferred["mlp_ratio"])
    has_ls = stage3 + "gamma_1" in state
    has_ls_conv = "levels.0.blocks.0.gamma" in state
    hub_config = hub_config or {}
    known = _identify_preset(depths, dim, preset)
    fields = {}
    for name in ("num_heads", "window_size"):
        fields[name] = overrides.pop(name, None) or hub_config.get(name) or (known or {}).get(name)
        if fields[name] is None:
            raise CheckpointConversionError(
                f"{name} is not stored in the tensors and these sizes (depths {depths}, dim {dim}) are not a released "
                f"MambaVision; pass {name}=[...] (4 values)")
    # the layer-scale values only initialise training; what matters for the weights is whether gammas exist
    layer_scale = hub_config.get("layer_scale") if has_ls else None
    layer_scale_conv = hub_config.get("layer_scale_conv") if has_ls_conv else None
    inferred.update(fields, layer_scale=(layer_scale or 1e-5) if has_ls else None,
                    layer_scale_conv=(layer_scale_conv or 1e-5) if has_ls_conv else None)
    for key in ("drop_path_rate",):
        value = hub_config.get(key, (known or {}).get(key))
        if value is not None:
            inferred[key] = value
    for key in ("depths", "dim", "in_dim", "mlp_ratio"):
        theirs = hub_config.get(key)
        if theirs is not None and theirs != inferred[key]:
            raise CheckpointConversionError(f"config.json says {key}={theirs} but the tensors have {inferred[key]}")
    for key, value in list(overrides.items()):
        if key in inferred and value is not None and value != inferred[key] and key not in ("drop_path_rate",):
            raise CheckpointConversionError(f"the checkpoint implies {key}={inferred[key]} but {key}={value} was "
                                            "requested")
    extra = {k: v for k, v in overrides.items() if v is not None}
    for key in ("mean", "std", "crop_pct", "crop_mode"):
        if key in hub_config:
            extra.setdefault(key, hub_config[key])
    side = _eval_resolution(hub_config)
    if side is not None:
        extra.setdefault("image_size", side)
    if "crop_pct" not in extra and known is not None:
        extra["crop_pct"] = known["crop_pct"]
    if "head.weight" in state and "id2label" not in extra and "num_labels" not in extra:
        extra["num_classes"] = state["head.weight"].shape[0]
    elif "head.weight" not in state and "id2label" not in extra:
        extra.setdefault("num_labels", 0)
    return MambaVisionConfig(**{**inferred, **extra})


def _eval_resolution(hub_config: dict) -> int | None:
    """The eval resolution a Hub config.json states (``resolution``, or the training args' ``img_size`` /
    ``input_size``: the 512 px models), else None (224)."""
    for key in ("resolution", "img_size", "input_size"):
        value = hub_config.get(key)
        if isinstance(value, (list, tuple)) and value:
            value = value[-1]
        if isinstance(value, int) and value > 0:
            return value
    return None


def _identify_preset(depths: list[int], dim: int, preset: str | None) -> dict | None:
    """The released model with these depths and width (all six differ), checked against ``preset`` if given."""
    if preset is not None:
        name = preset_name(preset)
        known = MAMBAVISION_PRESETS[name]
        if known["depths"] != depths or known["dim"] != dim:
            raise CheckpointConversionError(
                f"the checkpoint has depths {depths}, dim {dim}; MambaVision-{name} has depths {known['depths']}, "
                f"dim {known['dim']}")
        return known
    for known in MAMBAVISION_PRESETS.values():
        if known["depths"] == depths and known["dim"] == dim:
            return known
    return None


def official_to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys -> ``MambaVisionForImageClassification`` keys: ``model.`` prefix, ``head.*`` unchanged."""
    return {(k if k.startswith("head.") else "model." + k): v.detach().clone().contiguous() for k, v in state.items()}


def convert_mambavision_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    preset: str | None = None,
    use_ema: bool = False,
    **config_overrides,
) -> Path:
    """Converts a MambaVision checkpoint (a Hub repo folder or an official ``.pth.tar``) into a native transformers
    folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json``: the model's eval transform) and
    returns its path. Writes into a temporary folder moved into place only when everything succeeded."""
    from .image_processing_mambavision import MambaVisionImageProcessor
    from .modeling_mambavision import MambaVisionForImageClassification

    source, output_dir = Path(source), Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} exists and is not empty; choose a new folder")
    hub_config = None
    if source.is_dir():
        state, hub_config = load_hub_checkpoint(source)
    else:
        state, arch = load_official_checkpoint(source, use_ema=use_ema)
        if preset is None and arch is not None:
            try:
                preset = preset_name(arch)
            except ValueError:
                logger.warning("checkpoint arch %r is not a released MambaVision; sizes come from the tensors", arch)
    config = infer_mambavision_config(state, preset=preset, hub_config=hub_config, **config_overrides)
    hf_state = official_to_hf_state_dict(state)
    model = MambaVisionForImageClassification(config)
    expected = model.state_dict()
    unexpected, absent = sorted(set(hf_state) - set(expected)), sorted(set(expected) - set(hf_state))
    if unexpected or absent:
        raise CheckpointConversionError(f"key mismatch after renaming: missing {absent[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in expected.items():
        if hf_state[key].shape != tensor.shape:
            raise CheckpointConversionError(f"{key}: checkpoint shape {tuple(hf_state[key].shape)} != "
                                            f"{tuple(tensor.shape)}")
    model.load_state_dict(hf_state, strict=True)
    processor = MambaVisionImageProcessor.from_model_config(config)
    atomic_save(lambda folder: (model.save_pretrained(folder), processor.save_pretrained(folder)), output_dir)
    logger.info("converted %s -> %s", source, output_dir)
    return output_dir


__all__ = [
    "convert_mambavision_checkpoint",
    "infer_mambavision_config",
    "load_hub_checkpoint",
    "load_official_checkpoint",
    "official_to_hf_state_dict",
]
