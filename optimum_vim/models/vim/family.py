"""The Vim adapter (:class:`~optimum_vim.models.family.ModelFamily`): hustvl's Vision Mamba as the recipes see it.

Blocks: ``<backbone>.layers.{i}``, each ``(hidden, residual) -> (mixer(RMSNorm(residual + hidden)), residual)``; the
stream is ``(hidden, residual)`` (residual None before the first block). Mixer: bidirectional (``bimamba v2``), the
forward direction ``conv1d -> act -> x_proj -> dt_proj -> softplus -> ssm`` and the backward one with the ``_b``
modules walking the tokens in reverse, the gate ``act_z(z)`` multiplying both, averaged into ``out_proj``. Tokens: the
patch grid with the class token in the middle (``num_patches // 2``).
"""

from __future__ import annotations

from ...ops import causal_conv1d
from ..family import MixerLayout, MixerRef, ModelFamily, ScanPath, TokenLayout
from .modeling_vim import VimConv1d, VimForImageClassification, VimMixer, VimModel, VimSelectiveScan

VIM_MIXER = MixerLayout(
    in_proj="in_proj",
    out_proj="out_proj",
    directions=tuple(
        ScanPath(reverse=sfx == "_b", conv="conv1d" + sfx, act="act" + sfx, x_proj="x_proj" + sfx,
                 dt_proj="dt_proj" + sfx, softplus="softplus" + sfx, scan="ssm" + sfx,
                 A_log="A_log" if sfx == "" else "A_b_log", D="D" + sfx)
        for sfx in ("", "_b")
    ),
    combine="gate",
    gate="act_z",
)


class VimFamily(ModelFamily):
    model_type = "vim"
    # the six block linears every published Vim PTQ method quantizes (both scan directions)
    default_linear_roles = ("in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj")
    float_scan_class = VimSelectiveScan
    float_conv_class = VimConv1d
    base_model_class = VimModel
    classifier_class = VimForImageClassification

    def blocks(self, model):
        prefix, vim = self.backbone(model)
        head = f"{prefix}.layers" if prefix else "layers"
        return [(f"{head}.{i}", block) for i, block in enumerate(vim.layers)]

    def embed(self, model, pixel_values):
        return self.backbone(model)[1].embed(pixel_values).float(), None

    def run_block(self, block, state):
        return block(*state)

    def mixers(self, model):
        return [MixerRef(f"{name}.mixer", block.mixer, VIM_MIXER, name) for name, block in self.blocks(model)
                if isinstance(block.mixer, VimMixer)]

    def mixer_dims(self, mixer):
        return mixer.d_inner, mixer.d_state, mixer.dt_rank

    def conv(self, conv, x, weight):
        return causal_conv1d(x, weight, conv.bias, reverse=conv.reverse)

    def token_layout(self, model):
        cfg = self.backbone(model)[1].config
        return TokenLayout(length=cfg.sequence_length, grid=(cfg.grid_size, cfg.grid_size),
                           class_token=cfg.token_position)

    def input_shape(self, model):
        cfg = model.config
        return cfg.num_channels, cfg.image_size, cfg.image_size

    def patch_stride(self, model):
        return model.config.stride

    def check_float(self, model, what):
        if not isinstance(model, (VimForImageClassification, VimModel)):
            raise TypeError(
                f"{what} needs a float VimForImageClassification (or VimModel); got {type(model).__name__}. Load the "
                "float checkpoint with AutoModelForImageClassification.from_pretrained."
            )
