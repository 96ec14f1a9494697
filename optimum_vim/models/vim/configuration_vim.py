"""Configuration of Vision Mamba (Vim, Zhu et al., ICML 2024) as released in hustvl/Vim (midclstok models)."""

from __future__ import annotations

import math

from transformers import PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

# Only the architecture of the released midclstok checkpoints is implemented; these flags document it and refuse the
# rest (the legacy RoPE/head-class-token model uses a different forward pass).
_SUPPORTED = {"cls_token_position": ("middle",), "bimamba_type": ("v2",)}


class VimConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""Configuration of a Vision Mamba image classifier.

    Args:
        hidden_size (`int`, defaults to 192): model width D (`embed_dim` in hustvl/Vim; 192/384/768 for T/S/B).
        num_hidden_layers (`int`, defaults to 24): number of bidirectional Mamba blocks (`depth`).
        d_state (`int`, defaults to 16): SSM state size N.
        expand (`int`, defaults to 2): d_inner E = expand * hidden_size.
        d_conv (`int`, defaults to 4): depthwise causal convolution width.
        dt_rank (`int` or `"auto"`): rank R of the delta projection; "auto" is ceil(hidden_size / 16).
        patch_size (`int`, defaults to 16) / stride (`int`, defaults to 16): patch embedding kernel and stride
            (stride 8 gives the overlapping "+" models).
        image_size (`int`, defaults to 224) / num_channels (`int`, defaults to 3): the only accepted input size.
        norm_eps (`float`, defaults to 1e-5): RMSNorm epsilon.
        residual_in_fp32 (`bool`, defaults to True): carry the residual stream in fp32.
        if_divide_out (`bool`, defaults to True): average the two scan directions (the "div2" models).
        cls_token_position (`str`): only "middle" is supported (class token at index num_patches // 2).
        bimamba_type (`str`): only "v2" is supported (separate parameters for the backward direction).
        drop_rate, drop_path_rate (`float`): training-time dropout on embeddings / stochastic depth.
        initializer_range (`float`): std of the truncated-normal init of linear layers and embeddings.
        dt_min, dt_max, dt_init_floor, dt_scale: Mamba's initialisation of the delta projection.
        use_mamba_kernels (`bool`, defaults to True): use mamba-ssm's CUDA scan when installed and on GPU.
        out_features / out_indices (`list`, optional): stages ``VimBackbone`` returns (``"stem"``: the embeddings,
            ``"stage<i>"``: the residual stream after block i); default the last.
        apply_layernorm (`bool`, defaults to True): ``VimBackbone`` applies the final RMSNorm to each feature.
        reshape_hidden_states (`bool`, defaults to True): ``VimBackbone`` returns (batch, D, H', W') maps (middle class
            token removed) instead of (batch, L, D) sequences.
    """

    model_type = "vim"
    attribute_map = {"embed_dim": "hidden_size", "depth": "num_hidden_layers"}

    hidden_size: int = 192
    num_hidden_layers: int = 24
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    dt_rank: int | str = "auto"
    patch_size: int = 16
    stride: int = 16
    image_size: int = 224
    num_channels: int = 3
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    if_divide_out: bool = True
    cls_token_position: str = "middle"
    bimamba_type: str = "v2"
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    initializer_range: float = 0.02
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    use_mamba_kernels: bool = True
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None
    apply_layernorm: bool = True
    reshape_hidden_states: bool = True

    def __post_init__(self, **kwargs):
        for field, allowed in _SUPPORTED.items():
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(
                    f"VimConfig.{field}={value!r} is not supported; optimum-vim implements the released midclstok "
                    f"models ({field} in {allowed}). The legacy RoPE / head-class-token Vim uses another forward pass."
                )
        if self.dt_rank != "auto" and (not isinstance(self.dt_rank, int) or self.dt_rank < 1):
            raise ValueError(f"dt_rank must be a positive int or 'auto'; got {self.dt_rank!r}")
        for name in ("hidden_size", "num_hidden_layers", "d_state", "expand", "d_conv", "patch_size", "stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"VimConfig.{name} must be >= 1; got {getattr(self, name)}")
        if self.patch_size > self.image_size:
            raise ValueError(f"patch_size {self.patch_size} is larger than image_size {self.image_size}")
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, self.num_hidden_layers + 1)]
        self.set_output_features_output_indices(out_indices=kwargs.pop("out_indices", None),
                                                out_features=kwargs.pop("out_features", None))
        super().__post_init__(**kwargs)

    @property
    def intermediate_size(self) -> int:
        """d_inner E."""
        return self.expand * self.hidden_size

    @property
    def time_step_rank(self) -> int:
        """The resolved dt_rank R."""
        return math.ceil(self.hidden_size / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def grid_size(self) -> int:
        """Patches per side: (image_size - patch_size) // stride + 1 (14 for stride 16, 27 for stride 8 at 224)."""
        return (self.image_size - self.patch_size) // self.stride + 1

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def token_position(self) -> int:
        """Index of the middle class token in the sequence (98 for Vim at 224 / stride 16)."""
        return self.num_patches // 2

    @property
    def sequence_length(self) -> int:
        """Tokens per image including the class token (197 / 730 for the official models)."""
        return self.num_patches + 1

    def model_card_facts(self) -> dict:
        """What the model card says about this architecture (read by ``optimum_vim.hub.cards``)."""
        return {
            "family": "Vision Mamba", "short_name": "Vim", "tags": ["vision-mamba", "vim"],
            "architecture": f"width {self.hidden_size}, depth {self.num_hidden_layers}, d_state {self.d_state}, "
                            f"expand {self.expand}, patch {self.patch_size}/stride {self.stride}",
            "tokens": f"{self.sequence_length} (class token in the middle)",
        }


__all__ = ["VimConfig"]
