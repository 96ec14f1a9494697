"""A second model family for the tests: a tiny MambaVision-shaped model and its adapter.

Unlike Vim, its mixer has one scan direction, a non-gated z branch with its own conv (concatenated before
``out_proj``), no class token, MLP linears ``fc1`` / ``fc2``, and blocks that carry a single tensor (the residual
is added inside the block). The recipes must calibrate it through the adapter alone.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from optimum_vim.models.family import MixerLayout, MixerRef, ModelFamily, ScanPath, TokenLayout
from optimum_vim.modules.float import SelectiveScan, TokenConv1d
from optimum_vim.ops import causal_conv1d

D_STATE, DT_RANK = 4, 2

TOY_MIXER = MixerLayout(
    in_proj="in_proj", out_proj="out_proj",
    directions=(ScanPath(reverse=False, conv="conv1d", act="act", x_proj="x_proj", dt_proj="dt_proj",
                         softplus="softplus", scan="ssm", A_log="A_log", D="D"),),
    combine="concat", z_conv="conv1d_z", z_act="act_z",
)


class ToyMixer(nn.Module):
    def __init__(self, d: int, e: int):
        super().__init__()
        h = e // 2
        self.in_proj = nn.Linear(d, e, bias=False)
        self.conv1d, self.act = TokenConv1d(h, 3), nn.SiLU()
        self.x_proj = nn.Linear(h, DT_RANK + 2 * D_STATE, bias=False)
        self.dt_proj = nn.Linear(DT_RANK, h, bias=True)
        self.softplus = nn.Softplus()
        self.ssm = SelectiveScan(use_mamba_kernels=False)
        self.conv1d_z, self.act_z = TokenConv1d(h, 3), nn.SiLU()
        self.A_log = nn.Parameter(torch.log(torch.arange(1, D_STATE + 1).float().repeat(h, 1)))
        self.D = nn.Parameter(torch.ones(h))
        self.out_proj = nn.Linear(e, d, bias=False)

    def forward(self, x):
        x, z = self.in_proj(x).chunk(2, dim=-1)
        u = self.act(self.conv1d(x))
        dt, B, C = torch.split(self.x_proj(u), [DT_RANK, D_STATE, D_STATE], dim=-1)
        y = self.ssm(u, self.softplus(self.dt_proj(dt)), -torch.exp(self.A_log.float()), B, C, self.D)
        return self.out_proj(torch.cat([y, self.act_z(self.conv1d_z(z))], dim=-1))


class ToyBlock(nn.Module):
    def __init__(self, d: int, e: int):
        super().__init__()
        self.norm1, self.mixer = nn.LayerNorm(d), ToyMixer(d, e)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class ToyModel(nn.Module):
    """(batch, 1, 28, 28) -> 7 x 7 patches of width 16 -> 2 blocks -> mean -> 10 logits."""

    def __init__(self, d: int = 16, e: int = 32, depth: int = 2):
        super().__init__()
        self.config = SimpleNamespace(model_type="toymamba", num_labels=10)
        self.patch_embed = nn.Conv2d(1, d, 4, stride=4)
        self.blocks = nn.ModuleList(ToyBlock(d, e) for _ in range(depth))
        self.head = nn.Linear(d, 10)

    def embed(self, pixel_values):
        return self.patch_embed(pixel_values).flatten(2).transpose(1, 2)

    def forward(self, pixel_values):
        x = self.embed(pixel_values)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


class ToyFamily(ModelFamily):
    model_type = "toymamba"
    default_linear_roles = ("in_proj", "x_proj", "dt_proj", "out_proj", "fc1", "fc2")
    float_scan_class = SelectiveScan
    float_conv_class = TokenConv1d

    def blocks(self, model):
        return [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]

    def embed(self, model, pixel_values):
        return (model.embed(pixel_values).float(),)

    def run_block(self, block, state):
        return (block(state[0]),)

    def mixers(self, model):
        return [MixerRef(f"{name}.mixer", block.mixer, TOY_MIXER, name) for name, block in self.blocks(model)]

    def mixer_dims(self, mixer):
        return mixer.D.numel(), D_STATE, DT_RANK

    def conv(self, conv, x, weight):
        return causal_conv1d(x, weight, conv.bias, reverse=conv.reverse)

    def token_layout(self, model):
        return TokenLayout(length=49, grid=(7, 7), class_token=None)

    def input_shape(self, model):
        return 1, 28, 28

    def patch_stride(self, model):
        return 4

    def num_labels(self, model):
        return 10

    def logits(self, model, pixel_values):
        return model(pixel_values)
