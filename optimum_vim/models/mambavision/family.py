"""The MambaVision adapter (:class:`~optimum_vim.models.family.ModelFamily`): NVlabs' MambaVision as the recipes see it.

Blocks, in execution order, are every unit that carries the stream: per level the residual conv blocks (levels 0-1)
or the token blocks (levels 2-3: MambaVision mixer blocks, then self-attention blocks, each with its MLP), then the
level's downsampler (levels 0-2). Conv blocks and downsamplers hold nothing a recipe targets and run float on both of
the block-wise engine's streams. The stream is ``(map, size)``: the feature map (batch, C, H, W) and the unpadded
``(H, W)`` of each sample (an int64 (batch, 2) tensor). A token block pads the map to whole windows (a no-op once
padded: the stage pads once, before its first token block), runs on the tokens of each window and puts the windows
back, so a chain of blocks computes exactly the stage's pad -> partition -> blocks -> reverse; the next downsampler
crops the padding first. The block losses compare maps as (batch, H*W, C) tokens (along the channels).

Mixer (:data:`MAMBAVISION_MIXER`): one scan direction, not reversed: ``conv1d_x -> act_x -> x_proj -> dt_proj ->
softplus -> ssm``; the z half through its own ``conv1d_z -> act_z``, concatenated with the scan output before
``out_proj`` (no gate). Both convs are non-causal ("same" padding, no bias). The official forward adds ``dt_proj``'s bias
a second time before softplus (``dt_bias_repeats=2``); the model reads that bias from whatever module sits at
``dt_proj`` (the float linear, a calibration stand-in, a :class:`~optimum_vim.modules.QLinear`), so quantized,
dequantized and calibrating models keep the double add with the bias the recipe chose (k-scale searches softplus's
input grid on, and spreads its bias correction over, both additions). Linears by role: ``in_proj, x_proj, dt_proj, out_proj`` (mixers),
``qkv, proj`` (attention), ``fc1, fc2`` (MLPs), ``head``. Tokens: no class token.
"""

from __future__ import annotations

import torch

from ...modules.float import SelectiveScan, TokenConv1d, token_conv1d
from ..family import MixerLayout, MixerRef, ModelFamily, ScanGrid, ScanPath, TokenLayout
from .modeling_mambavision import (
    MambaVisionBackbone,
    MambaVisionDownsample,
    MambaVisionForImageClassification,
    MambaVisionMixer,
    MambaVisionModel,
    MambaVisionTokenBlock,
    check_pixel_values,
    pad_to_windows,
    run_on_windows,
)

MAMBAVISION_MIXER = MixerLayout(
    in_proj="in_proj",
    out_proj="out_proj",
    directions=(ScanPath(reverse=False, conv="conv1d_x", act="act_x", x_proj="x_proj", dt_proj="dt_proj",
                         softplus="softplus", scan="ssm", A_log="A_log", D="D", dt_bias_repeats=2),),
    combine="concat",
    z_conv="conv1d_z",
    z_act="act_z",
)


def _size_of(x: torch.Tensor) -> torch.Tensor:
    """The (batch, 2) int64 ``(H, W)`` of a map, for every sample."""
    return torch.tensor(x.shape[2:], dtype=torch.int64, device=x.device).expand(x.shape[0], 2).contiguous()


class MambaVisionFamily(ModelFamily):
    model_type = "mambavision"
    # the mixers' four linears and the token blocks' attention / MLP linears: PTQ4VM's VMamba port quantizes every
    # linear of the blocks, not only the SSM's, and OuroMamba's MambaVision results come from that PTQ4VM fork
    default_linear_roles = ("in_proj", "x_proj", "dt_proj", "out_proj", "qkv", "proj", "fc1", "fc2")
    float_scan_class = SelectiveScan
    float_conv_class = TokenConv1d
    base_model_class = MambaVisionModel
    classifier_class = MambaVisionForImageClassification

    # ---------------------------------------------------------------------------------------------- blocks
    def blocks(self, model):
        prefix, mv = self.backbone(model)
        head = f"{prefix}.levels" if prefix else "levels"
        out = []
        for i, level in enumerate(mv.levels):
            out += [(f"{head}.{i}.blocks.{j}", block) for j, block in enumerate(level.blocks)]
            if level.downsample is not None:
                out.append((f"{head}.{i}.downsample", level.downsample))
        return out

    def embed(self, model, pixel_values):
        mv = self.backbone(model)[1]
        check_pixel_values(pixel_values, mv.config)
        x = mv.patch_embed(pixel_values.to(mv.patch_embed.conv_down[0].weight.dtype)).float()
        return x, _size_of(x)

    def run_block(self, block, state):
        x, size = state
        if isinstance(block, MambaVisionTokenBlock):
            return run_on_windows(block, pad_to_windows(x, block.window_size), block.window_size), size
        if isinstance(block, MambaVisionDownsample):
            height, width = (int(v) for v in size[0])
            if x.shape[2:] != (height, width):  # the token stage's window padding
                x = x[:, :, :height, :width].contiguous()
            x = block(x)
            return x, _size_of(x)
        return block(x), size

    @staticmethod
    def block_output(state):
        """The map as (batch, H*W, C) tokens: the block losses compare channel vectors."""
        return state[0].flatten(2).transpose(1, 2)

    # ---------------------------------------------------------------------------------------------- units by role
    def mixers(self, model):
        return [MixerRef(f"{name}.mixer", block.mixer, MAMBAVISION_MIXER, name) for name, block in self.blocks(model)
                if isinstance(block, MambaVisionTokenBlock) and isinstance(block.mixer, MambaVisionMixer)]

    def mixer_dims(self, mixer):
        return mixer.d_half, mixer.d_state, mixer.dt_rank

    def conv(self, conv, x, weight):
        return token_conv1d(x, weight, conv.bias, reverse=conv.reverse, padding=conv.token_padding)

    # ---------------------------------------------------------------------------------------------- inputs / outputs
    def token_layout(self, model):
        """The windows of the first token stage (``window**2`` tokens, no class token); later stages have their own
        windows, and every per-position quantizer reads the length of the tensors it calibrates on."""
        cfg = self.backbone(model)[1].config
        ws = cfg.window_size[2]
        return TokenLayout(length=ws * ws, grid=(ws, ws), class_token=None)

    def scan_grid(self, model, block_index):
        """A token block's windows on its stage's map at the configured image size: the stem and every downsampler
        are 3x3 stride-2 convs with padding 1 (a side s becomes ``(s - 1) // 2 + 1``)."""
        name, block = self.blocks(model)[block_index]
        if not isinstance(block, MambaVisionTokenBlock):
            raise ValueError(f"block {block_index} ({name}) is not a token block: it has no scan tokens")
        cfg = self.backbone(model)[1].config
        stage = int(name.split("levels.", 1)[1].split(".", 1)[0])
        side = cfg.image_size
        for _ in range(2 + stage):  # the stem's two convs, then one downsampler per earlier stage
            side = (side - 1) // 2 + 1
        return ScanGrid(side, side, window=block.window_size)

    def input_shape(self, model):
        cfg = model.config
        return cfg.num_channels, cfg.image_size, cfg.image_size

    def patch_stride(self, model):
        return 4  # the stem's two stride-2 convs

    def check_float(self, model, what):
        if not isinstance(model, (MambaVisionForImageClassification, MambaVisionModel, MambaVisionBackbone)):
            raise TypeError(
                f"{what} needs a float MambaVisionForImageClassification (or MambaVisionModel); got "
                f"{type(model).__name__}. Load the float checkpoint with AutoModelForImageClassification.from_pretrained."
            )
