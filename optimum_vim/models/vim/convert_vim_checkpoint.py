"""Convert the official hustvl/Vim ``.pth`` checkpoints (midclstok, bimamba v2) to a transformers folder.

The files are training checkpoints: a pickled dict with ``model`` (the weights), ``model_ema``, optimizer state and an
``argparse.Namespace`` of the training arguments. They are read with ``torch.load(weights_only=True)`` and an
allow-list holding only ``argparse.Namespace``: any other pickled global is refused, nothing else is executed.

Sizes (width, depth, d_state, expand, dt_rank, d_conv, classes, patch size and stride) are read off the tensors.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
from importlib import resources
from pathlib import Path

import torch

from ...serialization import atomic_save
from .configuration_vim import VimConfig

logger = logging.getLogger(__name__)

# The only non-tensor global the official files pickle (the training args); everything else is refused.
SAFE_GLOBALS = (argparse.Namespace,)
_LAYER_KEYS_V2 = (
    "mixer.A_log", "mixer.A_b_log", "mixer.D", "mixer.D_b", "mixer.in_proj.weight", "mixer.out_proj.weight",
    "mixer.conv1d.weight", "mixer.conv1d.bias", "mixer.conv1d_b.weight", "mixer.conv1d_b.bias",
    "mixer.x_proj.weight", "mixer.x_proj_b.weight", "mixer.dt_proj.weight", "mixer.dt_proj.bias",
    "mixer.dt_proj_b.weight", "mixer.dt_proj_b.bias", "norm.weight",
)
_TOP_KEYS = ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "norm_f.weight")


class CheckpointConversionError(ValueError):
    """The checkpoint is not an official midclstok bimamba-v2 Vim checkpoint, or contradicts the requested config."""


def imagenet1k_labels() -> list[str]:
    """The 1,000 ImageNet-1k class names in the standard (sorted synset) order."""
    data = json.loads(resources.files(__package__).joinpath("imagenet1k_labels.json").read_text())
    return data["labels"]


def read_weights_only(path: Path, family: str) -> dict:
    """The dict an official ``family`` checkpoint file holds, unpickled with the allow-list only (tensors, plain
    containers, ``argparse.Namespace``); a missing file, a refused global or a non-dict is a clear error."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError / RuntimeError with the offending global in the message
        raise CheckpointConversionError(
            f"could not read {path} as a weights-only checkpoint ({_unpickling_reason(err)}). optimum-vim only "
            "unpickles tensors, plain containers and argparse.Namespace; a file that needs anything else is not an "
            f"official {family} checkpoint, and loading it with full unpickling could run arbitrary code."
        ) from err
    if not isinstance(obj, dict):
        raise CheckpointConversionError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def load_official_checkpoint(path: str | os.PathLike, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Reads an official ``.pth`` safely and returns its model state dict (``model``, or ``model_ema``)."""
    path = Path(path)
    obj = read_weights_only(path, "Vim")
    key = "model_ema" if use_ema else "model"
    if key in obj:
        state = obj[key]
        if not isinstance(state, dict):
            raise CheckpointConversionError(f"{path}: '{key}' is a {type(state).__name__}, expected a state dict")
    elif use_ema:
        raise CheckpointConversionError(f"{path} has no 'model_ema' entry (keys: {sorted(obj)[:8]})")
    elif "patch_embed.proj.weight" in obj:
        state = obj  # a bare state dict
    else:
        raise CheckpointConversionError(f"{path} has no 'model' entry and is not a bare Vim state dict (keys: {sorted(obj)[:8]})")
    _check_official_model_name(obj.get("args"), path)
    return {k.removeprefix("module."): v for k, v in state.items()}


def _unpickling_reason(err: Exception) -> str:
    """What torch's weights-only unpickler refused, without torch's advice to retry with ``weights_only=False``
    (an unsafe retry that optimum-vim never invites)."""
    text = str(err)
    match = re.search(r"(Unsupported global: [^\n]*?|Unsupported operand [^\n]*?)(?:\. |\n|$)", text)
    if match:
        return match.group(1).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln and "succeed" not in ln]
    return lines[0] if lines else type(err).__name__


def _check_official_model_name(args, path) -> None:
    name = getattr(args, "model", None)
    if isinstance(name, str) and ("rope" in name or not re.search(r"midclstok|middle_cls_token", name)):
        raise CheckpointConversionError(
            f"{path} was trained as '{name}'. Only the midclstok models (middle class token, no RoPE) are supported; "
            "the legacy RoPE / head-class-token Vim (vim_tiny_73p1.pth) uses a different forward pass."
        )


def infer_vim_config(state: dict[str, torch.Tensor], image_size: int = 224, **overrides) -> VimConfig:
    """Builds the VimConfig that matches ``state`` (official key names, no prefix).

    ``overrides`` may pin fields (e.g. ``stride=16``); a value that contradicts the tensors raises
    :class:`CheckpointConversionError` naming the evidence.
    """
    if any(k.startswith("rope.") for k in state) or "rope.freqs_cos" in state:
        raise CheckpointConversionError(
            "checkpoint has RoPE buffers: it is the legacy Vim (head class token + RoPE), which optimum-vim does not "
            "implement. Use a midclstok checkpoint (hustvl/Vim-{tiny,small,base}-midclstok)."
        )
    missing_top = [k for k in _TOP_KEYS if k not in state]
    if missing_top:
        raise CheckpointConversionError(f"not a Vim checkpoint: missing {missing_top}")
    layer_ids = sorted({int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))})
    if not layer_ids:
        raise CheckpointConversionError("not a Vim checkpoint: no 'layers.N.' keys")
    depth = layer_ids[-1] + 1
    missing = [f"layers.{i}.{k}" for i in range(depth) for k in _LAYER_KEYS_V2 if f"layers.{i}.{k}" not in state]
    if missing:
        v2_missing = [k for k in missing if re.search(r"_b(\.|_log|$)", k)]
        hint = (
            " The backward-direction tensors (A_b_log, D_b, conv1d_b, x_proj_b, dt_proj_b) are absent, so this is not "
            "a bimamba v2 checkpoint." if v2_missing else ""
        )
        raise CheckpointConversionError(f"{len(missing)} expected tensors are missing, e.g. {missing[:4]}.{hint}")

    proj = state["patch_embed.proj.weight"]
    hidden, channels, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    a_log = state["layers.0.mixer.A_log"]
    d_inner, d_state = a_log.shape
    if d_inner % hidden:
        raise CheckpointConversionError(f"d_inner {d_inner} is not a multiple of the width {hidden}")
    dt_rank = state["layers.0.mixer.dt_proj.weight"].shape[1]
    d_conv = state["layers.0.mixer.conv1d.weight"].shape[-1]
    seq = state["pos_embed"].shape[1]
    grid = math.isqrt(seq - 1)
    if grid * grid != seq - 1:
        raise CheckpointConversionError(f"pos_embed has {seq} rows, which is not a square grid plus one class token")
    if grid == 1:
        stride = patch
    else:
        stride, rem = divmod(image_size - patch, grid - 1)
        if rem:
            raise CheckpointConversionError(
                f"pos_embed has {seq} rows ({grid}x{grid} patches) which no stride gives for image_size {image_size} "
                f"and patch {patch}; pass the right image_size"
            )
    inferred = dict(
        hidden_size=hidden, num_hidden_layers=depth, d_state=d_state, expand=d_inner // hidden, d_conv=d_conv,
        dt_rank=dt_rank, patch_size=patch, stride=stride, image_size=image_size, num_channels=channels,
    )
    for key, value in overrides.items():
        if key in inferred and value is not None and value != inferred[key]:
            detail = ""
            if key == "stride":
                detail = (
                    f" (pos_embed has {seq} rows = {grid}x{grid} patches + class token; the stride-8 '+' fine-tunes have "
                    "730 rows, the stride-16 models 197)"
                )
            raise CheckpointConversionError(
                f"the checkpoint implies {key}={inferred[key]} but {key}={value} was requested{detail}"
            )
    if "head.weight" in state:
        num_labels = state["head.weight"].shape[0]
    else:
        num_labels = 0
    extra = {k: v for k, v in overrides.items() if k not in inferred and v is not None}
    if num_labels == 1000 and "id2label" not in extra:
        extra["id2label"] = dict(enumerate(imagenet1k_labels()))
        extra["label2id"] = {name: i for i, name in extra["id2label"].items()}
    return VimConfig(**inferred, num_labels=num_labels, **extra)


def official_to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames official keys to ``VimForImageClassification`` keys: ``vim.`` prefix, ``head.*`` unchanged."""
    out = {}
    for key, value in state.items():
        if key.startswith("rope."):
            continue
        new_key = key if key.startswith("head.") else "vim." + key
        out[new_key] = value.detach().clone().contiguous()
    return out


def convert_vim_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    image_size: int = 224,
    use_ema: bool = False,
    **config_overrides,
) -> Path:
    """Converts an official Vim ``.pth`` into a transformers folder and returns its path.

    Writes ``config.json``, ``model.safetensors``, ``preprocessor_config.json`` (the official eval transform) into a
    temporary folder first and moves it into place only when everything succeeded, so a failure leaves nothing behind.
    """
    from .image_processing_vim import VimImageProcessor
    from .modeling_vim import VimForImageClassification

    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} exists and is not empty; choose a new folder")
    state = load_official_checkpoint(checkpoint, use_ema=use_ema)
    config = infer_vim_config(state, image_size=image_size, **config_overrides)
    hf_state = official_to_hf_state_dict(state)
    model = VimForImageClassification(config)
    expected = set(model.state_dict())
    unexpected = sorted(set(hf_state) - expected)
    missing = sorted(expected - set(hf_state))
    if unexpected or missing:
        raise CheckpointConversionError(f"key mismatch after renaming: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in model.state_dict().items():
        if hf_state[key].shape != tensor.shape:
            raise CheckpointConversionError(f"{key}: checkpoint shape {tuple(hf_state[key].shape)} != {tuple(tensor.shape)}")
    model.load_state_dict(hf_state, strict=True)
    processor = VimImageProcessor(
        crop_size={"height": image_size, "width": image_size},
        size={"shortest_edge": int(image_size / 0.875)},
        color_mode="RGB" if config.num_channels == 3 else "L",
    )
    atomic_save(lambda folder: (model.save_pretrained(folder), processor.save_pretrained(folder)), output_dir)
    logger.info("converted %s -> %s (%s)", checkpoint, output_dir, config.to_diff_dict())
    return output_dir


__all__ = [
    "CheckpointConversionError",
    "convert_vim_checkpoint",
    "imagenet1k_labels",
    "infer_vim_config",
    "load_official_checkpoint",
    "official_to_hf_state_dict",
]
