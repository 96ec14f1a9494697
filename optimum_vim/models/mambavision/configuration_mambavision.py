"""Configuration of MambaVision (Hatamizadeh & Kautz, CVPR 2025; NVlabs/MambaVision) as a native transformers model.

Reads the ``config.json`` of the Hub repos ``nvidia/MambaVision-*`` (written for their remote code: ``depths``,
``num_heads``, ``window_size``, ``dim``, ``in_dim``, ``mlp_ratio``, ``drop_path_rate``, ``layer_scale``,
``layer_scale_conv``, the eval transform ``mean`` / ``std`` / ``crop_pct`` / ``crop_mode`` and, for some repos, the
whole training-argument dump) without remote code; unknown keys are kept as attributes.
"""

from __future__ import annotations

import math

from transformers import PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

# The released models (the official factory functions ``mamba_vision_{T,T2,S,B,L,L2}``): sizes, eval crop, Hub repo.
# The mixer settings (d_state 8, d_conv 3, expand 1) and qkv_bias are the same for every model.
MAMBAVISION_PRESETS: dict[str, dict] = {
    "T": dict(depths=[1, 3, 8, 4], num_heads=[2, 4, 8, 16], window_size=[8, 8, 14, 7], dim=80, in_dim=32,
              drop_path_rate=0.2, layer_scale=None, crop_pct=1.0),
    "T2": dict(depths=[1, 3, 11, 4], num_heads=[2, 4, 8, 16], window_size=[8, 8, 14, 7], dim=80, in_dim=32,
               drop_path_rate=0.2, layer_scale=None, crop_pct=0.98),
    "S": dict(depths=[3, 3, 7, 5], num_heads=[2, 4, 8, 16], window_size=[8, 8, 14, 7], dim=96, in_dim=64,
              drop_path_rate=0.2, layer_scale=None, crop_pct=0.93),
    "B": dict(depths=[3, 3, 10, 5], num_heads=[2, 4, 8, 16], window_size=[8, 8, 14, 7], dim=128, in_dim=64,
              drop_path_rate=0.3, layer_scale=1e-5, crop_pct=1.0),
    "L": dict(depths=[3, 3, 10, 5], num_heads=[4, 8, 16, 32], window_size=[8, 8, 14, 7], dim=196, in_dim=64,
              drop_path_rate=0.3, layer_scale=1e-5, crop_pct=1.0),
    "L2": dict(depths=[3, 3, 12, 5], num_heads=[4, 8, 16, 32], window_size=[8, 8, 14, 7], dim=196, in_dim=64,
               drop_path_rate=0.3, layer_scale=1e-5, crop_pct=1.0),
}
HUB_REPOS = {name: f"nvidia/MambaVision-{name}-1K" for name in MAMBAVISION_PRESETS}


def preset_name(name: str) -> str:
    """``"T"`` for ``"T"``, ``"mamba_vision_T"``, ``"MambaVision-T-1K"`` or ``"nvidia/MambaVision-T-1K"``."""
    key = name.rsplit("/", 1)[-1]
    for prefix in ("mamba_vision_", "MambaVision-", "mambavision-", "mambavision_"):
        key = key.removeprefix(prefix)
    key = key.split("-")[0].upper()
    if key not in MAMBAVISION_PRESETS:
        raise ValueError(f"unknown MambaVision model {name!r}; known: {sorted(MAMBAVISION_PRESETS)} "
                         "(e.g. 'T', 'mamba_vision_T' or 'nvidia/MambaVision-T-1K')")
    return key


class MambaVisionConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""Configuration of a MambaVision image classifier / backbone.

    Args:
        depths (`list[int]`, 4 entries): blocks per stage; stages 1-2 are conv blocks, in stages 3-4 the first half
            of the blocks (``ceil(depth / 2)``) use the MambaVision mixer and the rest windowed self-attention.
        num_heads (`list[int]`, 4 entries): attention heads per stage (only stages 3-4 use them).
        window_size (`list[int]`, 4 entries): token windows (side) of stages 3-4; feature maps are zero-padded to a
            multiple and split into windows, each window is one token sequence.
        dim (`int`): channels after the stem (stage 1); doubled by each of the three downsamplers.
        in_dim (`int`): channels of the stem's first convolution.
        mlp_ratio (`float`): MLP hidden width / stage width in the token blocks.
        drop_path_rate (`float`): stochastic depth, linearly increasing over all blocks (training only).
        layer_scale (`float`, optional): init of the per-channel ``gamma_1`` / ``gamma_2`` of the token blocks
            (present in the checkpoint only when set: B, L, L2 use 1e-5).
        layer_scale_conv (`float`, optional): init of the conv blocks' ``gamma`` (unset in every released model).
        qkv_bias (`bool`): bias of the attention ``qkv`` projection.
        d_state (`int`, 8), d_conv (`int`, 3), expand (`int`, 1), dt_rank (`int` or "auto"): the mixer's SSM state
            size, conv width, inner width factor (E = expand * width, split in halves for the x and z branches) and
            delta rank ("auto": ceil(width / 16)).
        num_channels (`int`), image_size (`int`): input channels and the eval resolution (the image processor's
            crop); the network itself accepts any size.
        layer_norm_eps (`float`): LayerNorm epsilon of the token blocks.
        drop_rate, attn_drop_rate (`float`): dropout after MLP / attention projections, attention dropout.
        use_mamba_kernels (`bool`): let the scan dispatch use mamba-ssm / Triton on GPU (else the PyTorch scan).
        out_features / out_indices: stages ``MambaVisionBackbone`` returns (``"stem"``, ``"stage1"`` ... ``"stage4"``:
            each stage's output before its downsampler); default the last.
    """

    model_type = "mambavision"
    attribute_map = {"in_chans": "num_channels"}

    depths: list[int] | tuple[int, ...] = (1, 3, 8, 4)
    num_heads: list[int] | tuple[int, ...] = (2, 4, 8, 16)
    window_size: list[int] | tuple[int, ...] = (8, 8, 14, 7)
    dim: int = 80
    in_dim: int = 32
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.2
    layer_scale: float | None = None
    layer_scale_conv: float | None = None
    qkv_bias: bool = True
    d_state: int = 8
    d_conv: int = 3
    expand: int = 1
    dt_rank: int | str = "auto"
    num_channels: int = 3
    image_size: int = 224
    layer_norm_eps: float = 1e-5
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    initializer_range: float = 0.02
    use_mamba_kernels: bool = True
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    def __post_init__(self, **kwargs):
        for name in ("depths", "num_heads", "window_size"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or len(value) != 4 or any(
                    not isinstance(v, int) or v < 1 for v in value):
                raise ValueError(f"MambaVisionConfig.{name} must be 4 positive ints (one per stage); got {value!r}")
            setattr(self, name, list(value))
        for name in ("dim", "in_dim", "d_state", "d_conv", "expand", "num_channels", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"MambaVisionConfig.{name} must be >= 1; got {getattr(self, name)}")
        for stage in (2, 3):
            width, heads = self.stage_dims[stage], self.num_heads[stage]
            if width % heads:
                raise ValueError(f"stage {stage + 1} has {width} channels, not divisible by num_heads[{stage}]={heads}")
            if (self.expand * width) % 2:
                raise ValueError(f"stage {stage + 1}: the mixer splits expand * width = {self.expand * width} "
                                 "channels into two halves; use an even width")
        if self.dt_rank != "auto" and (not isinstance(self.dt_rank, int) or self.dt_rank < 1):
            raise ValueError(f"dt_rank must be a positive int or 'auto'; got {self.dt_rank!r}")
        self._default_hub_labels(kwargs)
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, 5)]
        self.set_output_features_output_indices(out_indices=kwargs.pop("out_indices", None),
                                                out_features=kwargs.pop("out_features", None))
        super().__post_init__(**kwargs)

    def model_card_facts(self) -> dict:
        """What the model card says about this architecture (read by ``optimum_vim.hub.cards``)."""
        return {
            "family": "MambaVision", "short_name": "MambaVision", "tags": ["mambavision", "vision-mamba"],
            "architecture": f"dim {self.dim}, depths {'/'.join(map(str, self.depths))}, heads "
                            f"{'/'.join(map(str, self.num_heads))}, windows {'/'.join(map(str, self.window_size))}, "
                            f"d_state {self.d_state}",
            "tokens": "windows of " + " / ".join(f"{w}x{w}" for w in self.window_size[2:]) + " tokens in stages 3 / 4 "
                      "(no class token)",
        }

    def _default_hub_labels(self, kwargs: dict) -> None:
        """A Hub remote-code config.json has no ``id2label``; its head has ``num_classes`` (training args) or the
        1,000 ImageNet-1k classes (every released model): label them, instead of transformers' default 2 labels."""
        classes = kwargs.pop("num_classes", None)
        if self.id2label is not None or kwargs.get("num_labels") is not None:
            return
        auto_map = kwargs.get("auto_map") or {}
        remote = any("mambavision" in str(v).lower() and not str(v).startswith("optimum_vim_loader.")
                     for v in (auto_map.values() if isinstance(auto_map, dict) else ()))
        if classes is None and remote:
            classes = 1000
        if classes == 1000:
            from ..vim.convert_vim_checkpoint import imagenet1k_labels

            self.id2label = dict(enumerate(imagenet1k_labels()))
            self.label2id = {name: i for i, name in self.id2label.items()}
        elif isinstance(classes, int) and classes > 0:
            kwargs["num_labels"] = classes

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> MambaVisionConfig:
        """The configuration of a released model (``"T"``, ``"T2"``, ``"S"``, ``"B"``, ``"L"``, ``"L2"``, or their
        timm / Hub names), 1,000 ImageNet labels; ``kwargs`` override fields."""
        preset = dict(MAMBAVISION_PRESETS[preset_name(name)])
        preset.setdefault("num_classes", 1000)
        preset.update(kwargs)
        if "num_labels" in kwargs or "id2label" in kwargs:
            preset.pop("num_classes")
        return cls(**preset)

    @property
    def stage_dims(self) -> list[int]:
        """Channels of the four stages: dim, 2 dim, 4 dim, 8 dim."""
        return [self.dim * 2**i for i in range(4)]

    @property
    def num_features(self) -> int:
        """Channels of the final feature map (the head's input): 8 dim."""
        return self.stage_dims[-1]

    def mixer_blocks(self, stage: int) -> range:
        """Indices of the MambaVision-mixer blocks of ``stage`` (0-based, 2 or 3): the first ``ceil(depth / 2)``;
        the remaining blocks use self-attention."""
        depth = self.depths[stage]
        return range(depth // 2 + 1 if depth % 2 else depth // 2)

    def time_step_rank(self, width: int) -> int:
        """The mixer's delta rank R at a stage of ``width`` channels."""
        return math.ceil(width / 16) if self.dt_rank == "auto" else int(self.dt_rank)


__all__ = ["HUB_REPOS", "MAMBAVISION_PRESETS", "MambaVisionConfig", "preset_name"]
