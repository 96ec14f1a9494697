"""Vision Mamba (hustvl/Vim, midclstok "bimamba v2" models) as a transformers model.

The forward pass is the official one (see ``VimModel.forward``); parameter names equal the official state-dict keys
under a ``vim.`` prefix (``head.*`` stays at the top of ``VimForImageClassification``), so conversion is a rename.
Every tensor that a quantization recipe touches is produced by its own submodule inside :class:`VimMixer`:
``in_proj -> conv1d -> act -> x_proj -> dt_proj -> softplus -> ssm`` (and the ``_b`` twins for the backward scan),
``act_z`` for the gate and ``out_proj``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

from ...modules.float import SelectiveScan, TokenConv1d
from ...ops import add_rms_norm, rms_norm
from ...pretrained import QuantizableModelMixin
from ..outputs import classifier_output
from .configuration_vim import VimConfig


class VimRMSNorm(nn.Module):
    """RMSNorm with a weight only (as mamba-ssm's Triton RMSNorm); fp32 math, output in the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, *, prenorm: bool = False,
                residual_in_fp32: bool = True):
        """``RMSNorm(x)``; with ``prenorm=True`` the fused residual add of mamba-ssm's blocks:
        ``residual = x + residual`` (``x`` when None), returns ``(RMSNorm(residual), residual)``. Blocks call the module
        (not its weight) so that hooks on it run, e.g. accelerate's offload hooks that bring the weight in."""
        if prenorm:
            return add_rms_norm(x, residual, self.weight, self.eps, residual_in_fp32=residual_in_fp32)
        return rms_norm(x, self.weight, self.eps)


# the float conv and scan live below the model families (the quantized modules dequantize to them)
VimConv1d = TokenConv1d
VimSelectiveScan = SelectiveScan


class VimMixer(nn.Module):
    """Bidirectional Mamba mixer, ``bimamba_type="v2"`` with ``if_divide_out=True`` (hustvl/Vim ``mamba_simple.py``).

    (batch, L, D) -> (batch, L, D). Both directions share ``in_proj``, ``out_proj`` and the gate ``z``; the backward
    direction has its own ``conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b`` and runs in reverse token order.
    """

    def __init__(self, config: VimConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        d_model, d_inner = config.hidden_size, config.intermediate_size
        self.d_inner = d_inner
        self.d_state = config.d_state
        self.dt_rank = config.time_step_rank
        self.divide_out = config.if_divide_out
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.act_z = nn.SiLU()
        for suffix, reverse in (("", False), ("_b", True)):
            self.add_module("conv1d" + suffix, VimConv1d(d_inner, config.d_conv, reverse=reverse))
            self.add_module("act" + suffix, nn.SiLU())
            self.add_module("x_proj" + suffix, nn.Linear(d_inner, self.dt_rank + 2 * self.d_state, bias=False))
            self.add_module("dt_proj" + suffix, nn.Linear(self.dt_rank, d_inner, bias=True))
            self.add_module("softplus" + suffix, nn.Softplus())
            self.add_module("ssm" + suffix, VimSelectiveScan(reverse=reverse, use_mamba_kernels=config.use_mamba_kernels))
        # S4D-real parameters; A = -exp(A_log) is always computed in fp32
        self.A_log = nn.Parameter(torch.empty(d_inner, self.d_state))
        self.A_b_log = nn.Parameter(torch.empty(d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.D_b = nn.Parameter(torch.empty(d_inner))

    def _direction(self, x: torch.Tensor, suffix: str) -> torch.Tensor:
        conv, act = getattr(self, "conv1d" + suffix), getattr(self, "act" + suffix)
        x_proj, dt_proj = getattr(self, "x_proj" + suffix), getattr(self, "dt_proj" + suffix)
        softplus, ssm = getattr(self, "softplus" + suffix), getattr(self, "ssm" + suffix)
        A_log, D = (self.A_log, self.D) if suffix == "" else (self.A_b_log, self.D_b)
        u = act(conv(x))
        x_dbl = x_proj(u)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = softplus(dt_proj(dt))
        A = -torch.exp(A_log.double() if A_log.dtype == torch.float64 else A_log.float())
        return ssm(u, delta, A, B, C, D)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(hidden_states)
        x, z = xz.chunk(2, dim=-1)
        out_f = self._direction(x, "")
        out_b = self._direction(x, "_b")
        can_fuse = getattr(self.out_proj, "can_fuse_combine", None)
        if can_fuse is not None and can_fuse() and type(self.act_z) is nn.SiLU:
            # a quantized out_proj with static int8 input scales takes both directions and z: the average, the gate
            # and the input quantization run as one pass (optimum_vim.modules.QLinear, combine=)
            return self.out_proj(out_f, combine=(out_b, z, self.divide_out))
        gate = self.act_z(z)
        out_f, out_b = out_f * gate, out_b * gate
        y = (out_f + out_b) / 2 if self.divide_out else out_f + out_b
        return self.out_proj(y)


class VimBlock(GradientCheckpointingLayer):
    """Pre-norm residual block: ``residual += hidden; hidden = mixer(RMSNorm(residual))`` (mamba-ssm ``Block``).
    Checkpointed (recomputed in backward) after ``model.activation_checkpointing_enable()`` (``gradient_checkpointing_enable``)."""

    def __init__(self, config: VimConfig, layer_idx: int, drop_path: float = 0.0):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = VimRMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mixer = VimMixer(config, layer_idx)
        self.drop_path = drop_path

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is not None and self.training and self.drop_path > 0:
            hidden_states = _drop_path(hidden_states, self.drop_path)
        normed, residual = self.norm(hidden_states, residual, prenorm=True, residual_in_fp32=self.residual_in_fp32)
        return self.mixer(normed), residual


def _drop_path(x: torch.Tensor, p: float) -> torch.Tensor:
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class VimPatchEmbed(nn.Module):
    """Conv2d patch embedding (``patch_embed.proj``), flattened to (batch, num_patches, D)."""

    def __init__(self, config: VimConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, stride=config.stride)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


class VimPreTrainedModel(QuantizableModelMixin, PreTrainedModel):
    """Weight init, config class and loading metadata shared by the Vim models. Loading, saving, the model card and
    the Hub come from :class:`optimum_vim.pretrained.QuantizableModelMixin`, shared by every model family."""

    config_class = VimConfig
    config: VimConfig
    base_model_prefix = "vim"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["VimBlock"]
    supports_gradient_checkpointing = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Vim's init: truncated normal for linears and embeddings, Mamba's S4D-real A and dt bias, ones for D."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, VimConv1d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.trunc_normal_(module.weight, std=std)
            init.zeros_(module.bias)
        elif isinstance(module, VimRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, VimModel):
            init.trunc_normal_(module.cls_token, std=std)
            init.trunc_normal_(module.pos_embed, std=std)
        if isinstance(module, VimMixer):
            self._init_mixer(module)

    def _init_mixer(self, mixer: VimMixer) -> None:
        cfg = self.config
        a = torch.arange(1, mixer.d_state + 1, dtype=torch.float32, device=mixer.A_log.device)
        a_log = torch.log(a).expand(mixer.d_inner, -1)
        init.copy_(mixer.A_log, a_log)
        init.copy_(mixer.A_b_log, a_log)
        init.ones_(mixer.D)
        init.ones_(mixer.D_b)
        dt_std = mixer.dt_rank**-0.5 * cfg.dt_scale
        # a quantized projection (QLinear: codes and scales in buffers, always loaded from the checkpoint) has nothing
        # to initialise; transformers calls this for modules whose weights it did not see, e.g. ones offloaded to disk
        for dt_proj in (p for p in (mixer.dt_proj, mixer.dt_proj_b) if isinstance(p, nn.Linear)):
            init.uniform_(dt_proj.weight, -dt_std, dt_std)
            dt = torch.exp(
                torch.rand(mixer.d_inner, device=dt_proj.bias.device) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                + math.log(cfg.dt_min)
            ).clamp(min=cfg.dt_init_floor)
            init.copy_(dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        # kaiming-uniform (a=sqrt(5)) scaled by 1/sqrt(depth): Mamba's GPT-2 style rescale of the residual-branch
        # output projection, written as one init call so that loaded weights are never touched
        bound = 1.0 / math.sqrt(mixer.d_inner) / math.sqrt(cfg.num_hidden_layers)
        if isinstance(mixer.out_proj, nn.Linear):
            init.uniform_(mixer.out_proj.weight, -bound, bound)


def check_pixel_values(pixel_values, config: VimConfig, any_size: bool = False) -> None:
    """Raises ValueError unless ``pixel_values`` is a float (batch, C, H, W) tensor of the configured size (any size
    of at least one patch with ``any_size``: ``interpolate_pos_encoding=True``)."""
    expected = (config.num_channels, config.image_size, config.image_size)
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(
            f"pixel_values must be a torch.Tensor of shape (batch, {', '.join(map(str, expected))}); got "
            f"{type(pixel_values).__name__}. Use the model's image processor (AutoImageProcessor) to prepare images."
        )
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values must be a floating-point tensor (normalised images); got dtype {pixel_values.dtype}. "
            "Use the model's image processor (AutoImageProcessor) to rescale and normalise raw images."
        )
    if pixel_values.dim() != 4:
        raise ValueError(
            f"pixel_values must have 4 dims (batch, channels, height, width); got shape {tuple(pixel_values.shape)}"
        )
    if pixel_values.shape[1] != config.num_channels:
        raise ValueError(
            f"this Vim expects {config.num_channels} channel(s); got {pixel_values.shape[1]} "
            f"(shape {tuple(pixel_values.shape)}). Convert the images (e.g. RGB vs grayscale) with the image processor."
        )
    if any_size:
        if min(pixel_values.shape[2:]) < config.patch_size:
            raise ValueError(f"images must be at least one patch ({config.patch_size} pixels) high and wide; got "
                             f"{pixel_values.shape[2]}x{pixel_values.shape[3]}")
    elif tuple(pixel_values.shape[2:]) != (config.image_size, config.image_size):
        raise ValueError(
            f"this Vim expects {config.image_size}x{config.image_size} images (its position embedding has a fixed "
            f"length); got {pixel_values.shape[2]}x{pixel_values.shape[3]}. Resize with the model's image processor, "
            "or pass interpolate_pos_encoding=True to interpolate the position embedding to this size."
        )


class VimModel(VimPreTrainedModel):
    """Vim backbone: patch embedding, middle class token, position embedding, blocks and the final RMSNorm.

    Returns ``BaseModelOutputWithPooling`` with ``last_hidden_state`` (batch, L, D) after ``norm_f`` and
    ``pooler_output`` (batch, D), the class-token feature the official head reads.
    """

    def __init__(self, config: VimConfig):
        super().__init__(config)
        self.patch_embed = VimPatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.sequence_length, config.hidden_size))
        self.pos_drop = nn.Dropout(config.drop_rate)
        # drop-path schedule of hustvl/Vim: [0] + linspace(0, rate, depth), shifted by one
        rates = [0.0] + [config.drop_path_rate * i / max(config.num_hidden_layers - 1, 1) for i in range(config.num_hidden_layers)]
        self.layers = nn.ModuleList(
            VimBlock(config, i, drop_path=rates[i]) for i in range(config.num_hidden_layers)
        )
        self.norm_f = VimRMSNorm(config.hidden_size, eps=config.norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The patch embedding (what ``enable_input_require_grads`` hooks for adapter training with checkpointing)."""
        return self.patch_embed

    def embed(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """(batch, C, H, W) -> (batch, L, D): patches, middle class token, position embedding. With
        ``interpolate_pos_encoding`` any image size: the class token goes to the middle of the new sequence
        (index ``num_patches // 2``) and the patch position embeddings are interpolated (:meth:`interpolate_pos_embed`)."""
        check_pixel_values(pixel_values, self.config, any_size=interpolate_pos_encoding)
        pixel_values = pixel_values.to(self.patch_embed.proj.weight.dtype)
        grid = self.grid_size(*pixel_values.shape[2:])
        x = self.patch_embed(pixel_values)
        pos = x.shape[1] // 2
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([x[:, :pos], cls, x[:, pos:]], dim=1)
        pos_embed = self.pos_embed if x.shape[1] == self.pos_embed.shape[1] else self.interpolate_pos_embed(*grid)
        return self.pos_drop(x + pos_embed.to(x.dtype))

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patches per column and per row of a ``height`` x ``width`` image."""
        p, s = self.config.patch_size, self.config.stride
        return (height - p) // s + 1, (width - p) // s + 1

    def interpolate_pos_embed(self, rows: int, cols: int) -> torch.Tensor:
        """The position embedding (1, rows * cols + 1, D) for a ``rows`` x ``cols`` patch grid: the trained
        embedding's middle class-token entry is taken out, its patch grid resized bicubically (as ViT/DeiT fine-tuning
        at another resolution does), and the class-token entry put back in the middle of the new sequence."""
        cfg = self.config
        t, g = cfg.token_position, cfg.grid_size
        pe = self.pos_embed
        cls_pe, patches = pe[:, t : t + 1], torch.cat([pe[:, :t], pe[:, t + 1 :]], dim=1)
        patches = patches.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
        patches = F.interpolate(patches, size=(rows, cols), mode="bicubic", align_corners=False)
        patches = patches.permute(0, 2, 3, 1).reshape(1, rows * cols, -1).to(pe.dtype)
        mid = rows * cols // 2
        return torch.cat([patches[:, :mid], cls_pe, patches[:, mid:]], dim=1)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden_states = self.embed(pixel_values, interpolate_pos_encoding)
        token_position = (hidden_states.shape[1] - 1) // 2  # the middle class token: num_patches // 2
        residual = None
        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states if residual is None else residual + hidden_states)
            hidden_states, residual = layer(hidden_states, residual)
        if self.training and self.layers and self.layers[-1].drop_path > 0:
            hidden_states = _drop_path(hidden_states, self.layers[-1].drop_path)
        out, _ = self.norm_f(hidden_states, residual, prenorm=True, residual_in_fp32=self.config.residual_in_fp32)
        if all_hidden is not None:
            all_hidden.append(out)
        pooled = out[:, token_position, :]
        if not return_dict:
            return tuple(v for v in (out, pooled, tuple(all_hidden) if all_hidden is not None else None) if v is not None)
        return BaseModelOutputWithPooling(
            last_hidden_state=out,
            pooler_output=pooled,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )


class VimForImageClassification(VimPreTrainedModel):
    """Vim with the linear ``head`` on the middle class token; returns ``ImageClassifierOutput`` (loss with labels)."""

    def __init__(self, config: VimConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vim = VimModel(config)
        self.head = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        outputs = self.vim(pixel_values, output_hidden_states=output_hidden_states, return_dict=True,
                           interpolate_pos_encoding=interpolate_pos_encoding)
        return classifier_output(self, outputs, labels, return_dict)


class VimBackbone(BackboneMixin, VimPreTrainedModel):
    """Vim as a transformers backbone (``AutoBackbone``) for dense tasks: ``feature_maps`` are the residual stream
    after the blocks named by ``config.out_features`` / ``out_indices`` (``"stem"``: the embeddings), each through the
    final RMSNorm (``apply_layernorm``) and, with ``reshape_hidden_states``, as (batch, D, H', W') maps without the
    middle class token. Loads the weights of ``VimModel`` / ``VimForImageClassification`` checkpoints, quantized ones
    included (``head`` is not used)."""

    has_attentions = False

    def __init__(self, config: VimConfig):
        super().__init__(config)
        self.vim = VimModel(config)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, interpolate_pos_encoding: bool = False, **kwargs):
        from transformers.modeling_outputs import BackboneOutput

        vim, cfg = self.vim, self.config
        hidden = vim.embed(pixel_values, interpolate_pos_encoding)
        rows, cols = vim.grid_size(*pixel_values.shape[2:])
        stream, residual = [hidden], None
        for layer in vim.layers:
            hidden, residual = layer(hidden, residual)
            stream.append(residual + hidden)  # the residual stream after this block
        maps = []
        for name, state in zip(self.stage_names, stream):
            if name not in self.out_features:
                continue
            if cfg.apply_layernorm:
                state = vim.norm_f(state.to(hidden.dtype))
            if cfg.reshape_hidden_states:
                mid = (state.shape[1] - 1) // 2  # the middle class token
                state = torch.cat([state[:, :mid], state[:, mid + 1 :]], dim=1)
                state = state.reshape(state.shape[0], rows, cols, -1).permute(0, 3, 1, 2).contiguous()
            maps.append(state)
        output_hidden_states = output_hidden_states if output_hidden_states is not None else cfg.output_hidden_states
        out = BackboneOutput(feature_maps=tuple(maps), hidden_states=tuple(stream) if output_hidden_states else None)
        return out if return_dict is not False else out.to_tuple()


__all__ = ["VimBackbone", "VimForImageClassification", "VimModel", "VimPreTrainedModel"]
