"""MambaVision (NVlabs/MambaVision, CVPR 2025) as a transformers model, on optimum-vim's ops.

Hierarchical, channel-first: a conv stem (/4), two stages of residual conv blocks, two stages of token blocks on
windows of the feature map (the first half of each stage's blocks mix tokens with the MambaVision mixer, the rest with
self-attention; every token block adds an MLP), a conv downsampler after stages 1-3, a final BatchNorm, average
pooling and the linear ``head``.

Parameter names equal the official ones under a ``model.`` prefix (the layout of the Hub repos' ``model.safetensors``;
only the classifier ``head`` sits at the top here, the Hub files keep it at ``model.head``). The mixer's steps are
submodules, so that quantizers can wrap each one: ``in_proj -> (x, z)``; ``x: conv1d_x -> act_x -> x_proj ->
(dt, B, C)``, ``delta = softplus(dt_proj(dt) + dt_proj.bias)`` (the official mixer adds the delta bias twice: once in
``dt_proj`` and once as the scan's ``delta_bias``), ``ssm`` (selective scan, no gate); ``z: conv1d_z -> act_z``;
``out_proj(concat(y, z))``. The convolutions are depthwise and non-causal (``padding="same"``, no bias): the shared
float :class:`~optimum_vim.modules.float.TokenConv1d` and :class:`~optimum_vim.modules.float.SelectiveScan` that the
quantized modules dequantize to.
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
from transformers.modeling_outputs import BackboneOutput, BaseModelOutputWithPooling, ImageClassifierOutput

from ...modules.float import SelectiveScan, TokenConv1d
from ...pretrained import QuantizableModelMixin
from ..outputs import classifier_output
from .configuration_mambavision import MambaVisionConfig


class MambaVisionMixer(nn.Module):
    """The MambaVision mixer: (batch, L, D) -> (batch, L, D). ``in_proj`` (D -> E, no bias) splits into x and z of
    E / 2 channels each; both go through their own non-causal depthwise conv + SiLU; x alone through the selective
    scan; ``out_proj`` (E -> D, no bias) reads ``concat(y, z)``."""

    def __init__(self, config: MambaVisionConfig, width: int):
        super().__init__()
        d_inner = config.expand * width
        self.d_half = d_inner // 2
        self.d_state = config.d_state
        self.dt_rank = config.time_step_rank(width)
        self.in_proj = nn.Linear(width, d_inner, bias=False)
        self.conv1d_x = TokenConv1d(self.d_half, config.d_conv, padding="same", bias=False)
        self.conv1d_z = TokenConv1d(self.d_half, config.d_conv, padding="same", bias=False)
        self.act_x = nn.SiLU()
        self.act_z = nn.SiLU()
        self.x_proj = nn.Linear(self.d_half, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_half, bias=True)
        self.softplus = nn.Softplus()
        self.ssm = SelectiveScan(use_mamba_kernels=config.use_mamba_kernels)
        self.A_log = nn.Parameter(torch.empty(self.d_half, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_half))
        self.out_proj = nn.Linear(d_inner, width, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)
        x = self.act_x(self.conv1d_x(x))
        z = self.act_z(self.conv1d_z(z))
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = self.softplus(self.dt_proj(dt) + self.dt_proj.bias)  # the official double delta bias
        A = -torch.exp(self.A_log.double() if self.A_log.dtype == torch.float64 else self.A_log.float())
        y = self.ssm(x, delta, A, B, C, self.D)
        return self.out_proj(torch.cat([y, z], dim=-1))


class MambaVisionAttention(nn.Module):
    """Multi-head self-attention over the tokens of a window: ``qkv`` (D -> 3D), scaled dot-product attention,
    ``proj`` (D -> D)."""

    def __init__(self, config: MambaVisionConfig, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=config.qkv_bias)
        self.attn_drop = config.attn_drop_rate
        self.proj = nn.Linear(width, width)
        self.proj_drop = nn.Dropout(config.drop_rate)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, n, c = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class MambaVisionMlp(nn.Module):
    """``fc1 -> GELU -> fc2`` (with dropout), as timm's ``Mlp``."""

    def __init__(self, config: MambaVisionConfig, width: int):
        super().__init__()
        hidden = int(width * config.mlp_ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(config.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p <= 0:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


def _layer_scale(config_value, width: int) -> nn.Parameter | None:
    """The official layer scale: a per-channel parameter when the config sets a number, else none (scale 1)."""
    if config_value is None or isinstance(config_value, bool) or not isinstance(config_value, (int, float)):
        return None
    return nn.Parameter(torch.full((width,), float(config_value)))


class MambaVisionTokenBlock(GradientCheckpointingLayer):
    """``x + gamma_1 * mixer(norm1(x))``, then ``x + gamma_2 * mlp(norm2(x))`` on (windows, L, D); ``mixer`` is a
    :class:`MambaVisionMixer` or a :class:`MambaVisionAttention`."""

    def __init__(self, config: MambaVisionConfig, stage: int, index: int, drop_path: float):
        super().__init__()
        width = config.stage_dims[stage]
        self.is_mixer = index in config.mixer_blocks(stage)
        self.window_size = config.window_size[stage]  # the stage's windows (the block itself runs on their tokens)
        self.norm1 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mixer = (MambaVisionMixer(config, width) if self.is_mixer
                      else MambaVisionAttention(config, width, config.num_heads[stage]))
        self.norm2 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = MambaVisionMlp(config, width)
        self.gamma_1 = _layer_scale(config.layer_scale, width)
        self.gamma_2 = _layer_scale(config.layer_scale, width)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mixer(self.norm1(x))
        x = x + _drop_path(h if self.gamma_1 is None else self.gamma_1 * h, self.drop_path, self.training)
        h = self.mlp(self.norm2(x))
        return x + _drop_path(h if self.gamma_2 is None else self.gamma_2 * h, self.drop_path, self.training)


class MambaVisionConvBlock(GradientCheckpointingLayer):
    """``x + gamma * BN(conv2(GELU_tanh(BN(conv1(x)))))`` on (batch, D, H, W) (3x3 convs with bias)."""

    def __init__(self, config: MambaVisionConfig, stage: int, drop_path: float):
        super().__init__()
        width = config.stage_dims[stage]
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(width, eps=1e-5)
        self.act1 = nn.GELU(approximate="tanh")
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(width, eps=1e-5)
        self.gamma = _layer_scale(config.layer_scale_conv, width)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        if self.gamma is not None:
            h = h * self.gamma.view(1, -1, 1, 1)
        return x + _drop_path(h, self.drop_path, self.training)


class MambaVisionDownsample(nn.Module):
    """3x3 stride-2 convolution (no bias) doubling the channels: ``reduction.0``."""

    def __init__(self, width: int):
        super().__init__()
        self.reduction = nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(x)


class MambaVisionPatchEmbed(nn.Module):
    """The stem: two 3x3 stride-2 convs (no bias), each with BatchNorm (eps 1e-4) and ReLU: (batch, C, H, W) ->
    (batch, dim, H/4, W/4). ``conv_down.{0,1,3,4}`` hold the weights."""

    def __init__(self, config: MambaVisionConfig):
        super().__init__()
        self.conv_down = nn.Sequential(
            nn.Conv2d(config.num_channels, config.in_dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(config.in_dim, eps=1e-4),
            nn.ReLU(),
            nn.Conv2d(config.in_dim, config.dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(config.dim, eps=1e-4),
            nn.ReLU(),
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.conv_down(pixel_values)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(batch, C, H, W) with H, W multiples of ``window`` -> (batch * windows, window**2, C), windows in row-major
    order, tokens row-major inside each window."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // window, window, w // window, window)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, window * window, c)


def pad_to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(batch, C, H, W) zero-padded on the right / bottom to multiples of ``window`` (unchanged when they are)."""
    height, width = x.shape[2:]
    pad_r, pad_b = (window - width % window) % window, (window - height % window) % window
    return F.pad(x, (0, pad_r, 0, pad_b)) if pad_r or pad_b else x


def run_on_windows(block: nn.Module, x: torch.Tensor, window: int) -> torch.Tensor:
    """``block`` applied to the tokens of every ``window`` x ``window`` window of a (batch, C, H, W) map whose sides
    are multiples of ``window``; returns the map."""
    return window_reverse(block(window_partition(x, window)), window, *x.shape[2:])


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (batch * windows, window**2, C) -> (batch, C, height, width)."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((height // window) * (width // window))
    x = windows.reshape(b, height // window, width // window, window, window, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)


class MambaVisionStage(nn.Module):
    """One level: its blocks, then the downsampler (stages 1-3). Token stages zero-pad the map to a multiple of the
    window, run the blocks on each window's tokens and crop back. ``forward`` returns ``(features, next_input)``:
    the stage output before and after the downsampler."""

    def __init__(self, config: MambaVisionConfig, stage: int, drop_paths: list[float]):
        super().__init__()
        self.is_conv = stage < 2
        self.window_size = config.window_size[stage]
        if self.is_conv:
            self.blocks = nn.ModuleList(MambaVisionConvBlock(config, stage, p) for p in drop_paths)
        else:
            self.blocks = nn.ModuleList(MambaVisionTokenBlock(config, stage, i, p) for i, p in enumerate(drop_paths))
        self.downsample = MambaVisionDownsample(config.stage_dims[stage]) if stage < 3 else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_conv:
            for block in self.blocks:
                x = block(x)
        else:
            height, width = x.shape[2:]
            ws = self.window_size
            padded = pad_to_windows(x, ws)
            tokens = window_partition(padded, ws)
            for block in self.blocks:
                tokens = block(tokens)
            x = window_reverse(tokens, ws, *padded.shape[2:])
            if padded.shape[2:] != (height, width):
                x = x[:, :, :height, :width].contiguous()
        return x, (self.downsample(x) if self.downsample is not None else x)


def check_pixel_values(pixel_values, config: MambaVisionConfig) -> None:
    """Raises ValueError unless ``pixel_values`` is a float (batch, C, H, W) tensor with the configured channels."""
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"pixel_values must be a torch.Tensor (batch, {config.num_channels}, H, W); got "
                         f"{type(pixel_values).__name__}. Prepare images with the model's image processor.")
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be a floating-point tensor (normalised images); got {pixel_values.dtype}. "
                         "Use the model's image processor to rescale and normalise raw images.")
    if pixel_values.dim() != 4 or pixel_values.shape[1] != config.num_channels:
        raise ValueError(f"pixel_values must have shape (batch, {config.num_channels}, H, W); got "
                         f"{tuple(pixel_values.shape)}")


class MambaVisionPreTrainedModel(QuantizableModelMixin, PreTrainedModel):
    """Weight init, config class and loading metadata shared by the MambaVision models. Loading, saving, the model
    card and the Hub come from :class:`optimum_vim.pretrained.QuantizableModelMixin`, shared by every model family."""

    config_class = MambaVisionConfig
    config: MambaVisionConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["MambaVisionTokenBlock", "MambaVisionConvBlock"]
    supports_gradient_checkpointing = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The official model's effective init: truncated normal (std 0.02) linears with zero bias (``dt_proj``
        included: the official model's blanket Linear init runs after the mixer's own), unit/zero norms, PyTorch's
        default conv init, S4D-real ``A_log``, ``D = 1``, layer scales at their configured value."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in else 0
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, MambaVisionMixer):
            a = torch.arange(1, module.d_state + 1, dtype=torch.float32, device=module.A_log.device)
            init.copy_(module.A_log, torch.log(a).expand(module.d_half, -1))
            init.ones_(module.D)
        if isinstance(module, MambaVisionTokenBlock):
            for gamma in (module.gamma_1, module.gamma_2):
                if gamma is not None:
                    init.constant_(gamma, float(self.config.layer_scale))
        elif isinstance(module, MambaVisionConvBlock) and module.gamma is not None:
            init.constant_(module.gamma, float(self.config.layer_scale_conv))


class MambaVisionModel(MambaVisionPreTrainedModel):
    """MambaVision without the head: ``last_hidden_state`` is the final BatchNorm'd map (batch, 8 dim, H/32, W/32),
    ``pooler_output`` its average (batch, 8 dim); ``hidden_states`` (with ``output_hidden_states``) the stem output
    and each stage's output before its downsampler (what the Hub model's ``forward`` returns as features)."""

    def __init__(self, config: MambaVisionConfig):
        super().__init__(config)
        self.patch_embed = MambaVisionPatchEmbed(config)
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        starts = [sum(config.depths[:i]) for i in range(4)]
        self.levels = nn.ModuleList(
            MambaVisionStage(config, i, rates[starts[i] : starts[i] + config.depths[i]]) for i in range(4)
        )
        self.norm = nn.BatchNorm2d(config.num_features)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def stage_features(self, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``([stem, stage1, ..., stage4], last)``: the stem output and every stage's output before its downsampler,
        and the last stage's output (the input of the final norm)."""
        check_pixel_values(pixel_values, self.config)
        x = self.patch_embed(pixel_values.to(self.patch_embed.conv_down[0].weight.dtype))
        features = [x]
        for level in self.levels:
            out, x = level(x)
            features.append(out)
        return features, x

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        features, x = self.stage_features(pixel_values)
        x = self.norm(x)
        pooled = x.mean(dim=(2, 3))
        hidden = tuple(features) if output_hidden_states else None
        if not return_dict:
            return tuple(v for v in (x, pooled, hidden) if v is not None)
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled, hidden_states=hidden)


class MambaVisionForImageClassification(MambaVisionPreTrainedModel):
    """MambaVision with the linear ``head`` on the pooled features; returns ``ImageClassifierOutput``."""

    def __init__(self, config: MambaVisionConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = MambaVisionModel(config)
        self.head = nn.Linear(config.num_features, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        outputs = self.model(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        return classifier_output(self, outputs, labels, return_dict)


class MambaVisionBackbone(BackboneMixin, MambaVisionPreTrainedModel):
    """MambaVision as a transformers backbone (``AutoBackbone``): ``feature_maps`` are the maps named by
    ``config.out_features`` (``"stem"``: (batch, dim, H/4, W/4); ``"stage<i>"``: stage i's output before its
    downsampler, (batch, dim * 2**(i-1), H / 2**(i+1), W / 2**(i+1))). Loads classifier checkpoints (``head`` unused)."""

    has_attentions = False

    def __init__(self, config: MambaVisionConfig):
        super().__init__(config)
        self.model = MambaVisionModel(config)
        self.num_features = [config.dim] + config.stage_dims
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs):
        features, _ = self.model.stage_features(pixel_values)
        maps = tuple(f for name, f in zip(self.stage_names, features) if name in self.out_features)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        out = BackboneOutput(feature_maps=maps, hidden_states=tuple(features) if output_hidden_states else None)
        return out if return_dict is not False else out.to_tuple()


__all__ = [
    "MambaVisionBackbone",
    "MambaVisionForImageClassification",
    "MambaVisionModel",
    "MambaVisionPreTrainedModel",
]
