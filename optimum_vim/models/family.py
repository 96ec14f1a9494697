"""Model-family adapters: what recipes, the block-wise engine, the observers and OuroMamba-Gen need to know about a
model, asked of one object per family instead of written against one model's classes.

A family adapter names

* the **blocks** in execution order (:meth:`ModelFamily.blocks`), how to embed inputs into the stream that enters the
  first block (:meth:`ModelFamily.embed`) and how to run one block on that stream (:meth:`ModelFamily.run_block`):
  the block-wise engine calibrates a block against its float twin with nothing else;
* the quantizable units by **role** (:meth:`ModelFamily.linears`, :meth:`ModelFamily.scans`): the role of a module is
  its user-facing name in ``recipe_args["targets"]``, ``overrides`` and ``modules_to_not_convert`` (for Vim the leaf
  names ``in_proj``, ``x_proj_b``, ``conv1d`` ...);
* the **mixers** and their dataflow per scan direction (:class:`MixerLayout`, :class:`ScanPath`): conv -> act ->
  x_proj -> (dt | B | C) -> dt_proj -> softplus -> scan, whether a gate multiplies the scan output or the z branch is
  concatenated, which directions walk the tokens in reverse (k-scale and OuroMamba read this);
* the **token layout** (:class:`TokenLayout`: class-token position or none, the patch grid), where each block's scan
  tokens lie on its feature map (:class:`ScanGrid`, :meth:`ModelFamily.scan_grid`: whole-map sequences or windows)
  and the input geometry;
* the float scan and conv classes (a float model is recognised by them).

A hierarchical family (MambaVision: conv stages, then mixer and attention blocks per stage, downsamplers between)
lists every unit that carries the stream as a block, in order; units with nothing a recipe targets (a conv stage, a
downsampler) run float on both of the engine's streams, and the stream state can change shape between units (the
state is whatever :meth:`ModelFamily.run_block` takes and returns). Its mixers declare ``combine="concat"`` with their
z-branch conv and activation, ``class_token=None`` in the token layout; attention ``qkv`` / ``proj`` and MLP ``fc1`` /
``fc2`` are linears with those roles (:meth:`ModelFamily.linears`), selectable by ``targets``.

Each family names its adapter where it registers with transformers (``register_model_family(...,
adapter="module:Class")``, the one line per family in ``optimum_vim._registration.MODEL_FAMILIES``), which fills
:data:`FAMILIES` (``model_type -> "module:Class"``, imported on first use, so this module imports no model code);
:func:`family_of` finds the adapter of a model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

# model_type -> "module:Class" of its adapter, filled by optimum_vim.register_model_family(..., adapter=...)
FAMILIES: dict[str, str] = {}

_LOADED: dict[str, ModelFamily] = {}


@dataclass(frozen=True)
class ScanPath:
    """The modules of one scan direction of a mixer, as paths relative to the mixer: ``x -> conv -> act (u) ->
    x_proj -> (dt | B | C); dt -> dt_proj -> softplus (delta) -> scan(u, delta, A, B, C, D)``.

    ``reverse``: the scan (and its conv) walk the tokens in reverse order; its tensors stay in token order.
    ``A_log`` / ``D``: parameter names (relative to the mixer) of the direction's S4D parameters.
    ``dt_bias_repeats``: how often dt_proj's bias enters softplus's input (MambaVision's official forward adds it a
    second time: ``softplus(dt_proj(dt) + dt_proj.bias)``; the model reads it from whatever module is at dt_proj)."""

    reverse: bool
    conv: str
    act: str
    x_proj: str
    dt_proj: str
    softplus: str
    scan: str
    A_log: str
    D: str | None
    dt_bias_repeats: int = 1


@dataclass(frozen=True)
class MixerLayout:
    """A Mamba mixer's dataflow (paths relative to the mixer module).

    ``in_proj`` gives ``(x | z)`` (two halves along the last axis); each entry of ``directions`` runs on x;
    ``combine`` says what meets the scan outputs before ``out_proj``:

    * ``"gate"`` (Vim): ``out_proj(mean_or_sum(y_dir) * act_z(z))`` with ``gate`` the SiLU module on z;
    * ``"concat"`` (MambaVision): ``out_proj(concat(y, z_act(z_conv(z))))``, no gate multiply.
    """

    in_proj: str
    out_proj: str
    directions: tuple[ScanPath, ...]
    combine: str = "gate"
    gate: str | None = None  # the activation on z whose output multiplies the scan output ("gate")
    z_conv: str | None = None  # the conv on the z branch ("concat")
    z_act: str | None = None  # the activation after it ("concat")


@dataclass(frozen=True)
class MixerRef:
    """A mixer of a model: its full module name, the module, its layout and the block it sits in."""

    name: str
    module: nn.Module
    layout: MixerLayout
    block: str

    def path(self, rel: str) -> str:
        """Full module name of ``rel`` (a path of the layout)."""
        return f"{self.name}.{rel}"


@dataclass(frozen=True)
class LinearRef:
    """A linear of a model: full name, role (its user-facing name) and whether it reads a reversed scan's tensors."""

    name: str
    role: str
    reverse: bool = False


@dataclass(frozen=True)
class ScanRef:
    """A float selective scan: full name, the direction it belongs to and the index of its block."""

    name: str
    module: nn.Module
    direction: ScanPath
    mixer: MixerRef
    block_index: int

    @property
    def reverse(self) -> bool:
        return self.direction.reverse


@dataclass(frozen=True)
class TokenLayout:
    """The token sequence the mixers see: ``length`` tokens, the patch grid ``(rows, cols)`` and the class token's
    index (None: no class token)."""

    length: int
    grid: tuple[int, int]
    class_token: int | None

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class ScanGrid:
    """Where the tokens one block's scans see lie on that block's feature map, for readouts that need the 2-D layout
    (OuroMamba-Gen's Δ-weighted patching and patch InfoNCE).

    ``rows`` x ``cols``: the block's token map (its real positions, row-major). ``window``: None when each image is one
    sequence (the map's tokens in row-major order, the class token at ``class_token`` when there is one); else the
    scans run on the tokens of each ``window`` x ``window`` window of the map zero-padded on the right / bottom to
    whole windows, windows row-major, tokens row-major inside each (no class token), so the scan batch is
    ``images * windows``.
    """

    rows: int
    cols: int
    window: int | None = None
    class_token: int | None = None

    def __post_init__(self):
        if self.window is not None and self.class_token is not None:
            raise ValueError("a windowed token layout has no class token")

    @property
    def num_patches(self) -> int:
        return self.rows * self.cols

    @property
    def _padded(self) -> tuple[int, int]:
        w = self.window
        return -(-self.rows // w) * w, -(-self.cols // w) * w

    @property
    def scans_per_image(self) -> int:
        """Scan sequences per image: its windows (1 without windows)."""
        if self.window is None:
            return 1
        hp, wp = self._padded
        return (hp // self.window) * (wp // self.window)

    @property
    def sequence_length(self) -> int:
        """Tokens per scan sequence (a window's, or the whole map's with its class token)."""
        if self.window is not None:
            return self.window * self.window
        return self.num_patches + (self.class_token is not None)

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(scan batch, L, *f) in scan layout -> (images, rows * cols, *f) on the map: windows put back, padding and
        class token dropped."""
        if self.window is None:
            if self.class_token is None:
                return x
            return torch.cat([x[:, : self.class_token], x[:, self.class_token + 1 :]], dim=1)
        w, (hp, wp) = self.window, self._padded
        feat = x.shape[2:]
        images = x.shape[0] // self.scans_per_image
        x = x.reshape(images, hp // w, wp // w, w, w, *feat).transpose(2, 3).reshape(images, hp, wp, *feat)
        return x[:, : self.rows, : self.cols].reshape(images, self.num_patches, *feat)

    def from_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_grid`: (images, rows * cols, *f) -> (scan batch, L, *f), zeros at the padding and the
        class token."""
        if self.window is None:
            if self.class_token is None:
                return x
            pad = x.new_zeros(x.shape[0], 1, *x.shape[2:])
            return torch.cat([x[:, : self.class_token], pad, x[:, self.class_token :]], dim=1)
        w, (hp, wp) = self.window, self._padded
        images, feat = x.shape[0], x.shape[2:]
        x = x.reshape(images, self.rows, self.cols, *feat)
        if (hp, wp) != (self.rows, self.cols):
            full = x.new_zeros(images, hp, wp, *feat)
            full[:, : self.rows, : self.cols] = x
            x = full
        x = x.reshape(images, hp // w, w, wp // w, w, *feat).transpose(2, 3)
        return x.reshape(images * self.scans_per_image, w * w, *feat)

    def real_tokens(self, images: int, device=None) -> torch.Tensor:
        """(scan batch, L) bool: the tokens that are map positions (not padding, not the class token)."""
        ones = torch.ones(images, self.num_patches, dtype=torch.bool, device=device)
        return self.from_grid(ones)


class ModelFamily:
    """Base class of model-family adapters (see the module docstring). A family implements the methods that raise
    ``NotImplementedError``; the rest derive from them."""

    model_type: ClassVar[str] = "abstract"
    # roles of the linears the PTQ recipes quantize by default (for Vim PTQ4VM's six block linears; a family may add
    # attention / MLP linears, as PTQ4VM's VMamba port does)
    default_linear_roles: ClassVar[tuple[str, ...]] = ()
    # positional arguments of the float scan module's forward that carry u, delta, B and C (observers hook them)
    scan_inputs: ClassVar[dict[str, int]] = {"u": 0, "delta": 1, "B": 3, "C": 4}
    float_scan_class: ClassVar[type[nn.Module] | None] = None
    float_conv_class: ClassVar[type[nn.Module] | None] = None
    # the family's base model (found inside a classifier or backbone) and its image classifier: with them this class
    # gives backbone(), num_labels() and logits()
    base_model_class: ClassVar[type[nn.Module] | None] = None
    classifier_class: ClassVar[type[nn.Module] | None] = None

    def backbone(self, model: nn.Module) -> tuple[str, nn.Module]:
        """``(name, module)`` of the family's base model inside ``model`` (name ``""`` when ``model`` is it)."""
        if self.base_model_class is None:
            raise NotImplementedError(f"{type(self).__name__} names no base_model_class")
        for name, mod in model.named_modules():
            if isinstance(mod, self.base_model_class):
                return name, mod
        raise TypeError(f"expected a {self.model_type} model ({self.base_model_class.__name__} inside); got "
                        f"{type(model).__name__}")

    # ---------------------------------------------------------------------------------------------- blocks
    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(full name, module)`` of every block in execution order."""
        raise NotImplementedError

    def embed(self, model: nn.Module, pixel_values: torch.Tensor) -> tuple:
        """The stream entering the first block for ``pixel_values``: a tuple of tensors (or None), the state one block
        hands the next."""
        raise NotImplementedError

    def run_block(self, block: nn.Module, state: tuple) -> tuple:
        """Runs one block (float, student or quantized) on a stream state and returns the next state."""
        raise NotImplementedError

    @staticmethod
    def block_output(state: tuple) -> torch.Tensor:
        """The tensor of a state the block losses compare (the block's hidden output)."""
        return state[0]

    # ---------------------------------------------------------------------------------------------- units by role
    def mixers(self, model: nn.Module) -> list[MixerRef]:
        """Every Mamba mixer of the model, in model order."""
        raise NotImplementedError

    def role(self, name: str) -> str:
        """The user-facing role of the module named ``name`` (default: its leaf name)."""
        return name.rsplit(".", 1)[-1]

    def linears(self, model: nn.Module) -> list[LinearRef]:
        """Every ``nn.Linear`` of the model, in model order, with its role and scan order."""
        reverse = {}
        for mixer in self.mixers(model):
            for d in mixer.layout.directions:
                reverse[mixer.path(d.x_proj)] = reverse[mixer.path(d.dt_proj)] = d.reverse
        return [LinearRef(n, self.role(n), reverse.get(n, False))
                for n, m in model.named_modules() if isinstance(m, nn.Linear)]

    def scans(self, model: nn.Module, *, float_only: bool = True) -> list[ScanRef]:
        """The selective scans of every mixer, in model order (with ``float_only``, the ones still float)."""
        blocks = {name: i for i, (name, _) in enumerate(self.blocks(model))}
        out = []
        for mixer in self.mixers(model):
            for d in mixer.layout.directions:
                mod = mixer.module.get_submodule(d.scan)
                if float_only and self.float_scan_class is not None and not isinstance(mod, self.float_scan_class):
                    continue
                out.append(ScanRef(mixer.path(d.scan), mod, d, mixer, blocks[mixer.block]))
        return out

    def direction_of(self, model: nn.Module, name: str) -> ScanPath | None:
        """The scan direction whose modules include ``name`` (a full module name), or None."""
        for mixer in self.mixers(model):
            for d in mixer.layout.directions:
                if name in {mixer.path(p) for p in (d.conv, d.act, d.x_proj, d.dt_proj, d.softplus, d.scan)}:
                    return d
        return None

    # ---------------------------------------------------------------------------------------------- mixer math
    def mixer_dims(self, mixer: nn.Module) -> tuple[int, int, int]:
        """``(d_inner, d_state, dt_rank)`` of a mixer."""
        raise NotImplementedError

    def scan_A(self, mixer: nn.Module, direction: ScanPath) -> torch.Tensor:
        """The fp32 state matrix ``A = -exp(A_log)`` of one direction."""
        return -torch.exp(getattr(mixer, direction.A_log).detach().float())

    def conv(self, conv: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The mixer conv ``conv`` applied to ``x`` (batch, L, channels) with ``weight`` in place of its own."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------- inputs / outputs
    def token_layout(self, model: nn.Module) -> TokenLayout:
        raise NotImplementedError

    def scan_grid(self, model: nn.Module, block_index: int) -> ScanGrid:
        """Where the scan tokens of block ``block_index`` (of :meth:`blocks`) lie on its map, at the model's input
        size (default: one sequence per image with the :meth:`token_layout`'s grid and class token)."""
        layout = self.token_layout(model)
        return ScanGrid(*layout.grid, class_token=layout.class_token)

    def input_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the images the model takes."""
        raise NotImplementedError

    def patch_stride(self, model: nn.Module) -> int:
        """Pixels between neighbouring patches (OuroMamba-Gen's default jitter is half of it)."""
        raise NotImplementedError

    def num_labels(self, model: nn.Module) -> int:
        """Classes of the model's head (0 for a backbone without one)."""
        if self.classifier_class is None:
            raise NotImplementedError(f"{type(self).__name__} names no classifier_class")
        return model.config.num_labels if isinstance(model, self.classifier_class) else 0

    def logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """Runs the model on ``pixel_values``; the classification logits, or None for a backbone (it still runs, so
        hooks see the forward)."""
        if self.classifier_class is not None and isinstance(model, self.classifier_class):
            return model(pixel_values=pixel_values).logits
        model(pixel_values=pixel_values)
        return None

    def check_float(self, model: nn.Module, what: str) -> None:
        """Raises a clear error when ``model`` is not a float model of this family that ``what`` can run on."""


def family_of(model: nn.Module) -> ModelFamily:
    """The adapter of ``model``'s family, found by ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    _registered()
    if model_type not in FAMILIES:
        raise TypeError(f"optimum-vim has no model-family adapter for {type(model).__name__} (model_type "
                        f"{model_type!r}); supported model types: {sorted(FAMILIES)}")
    return get_family(model_type)


def get_family(model_type: str) -> ModelFamily:
    """The adapter registered for ``model_type`` (imported on first use)."""
    _registered()
    if model_type not in _LOADED:
        module, cls = FAMILIES[model_type].split(":")
        _LOADED[model_type] = getattr(importlib.import_module(module), cls)()
    return _LOADED[model_type]


def known_roles(attribute: str = "default_linear_roles") -> dict[str, tuple[str, ...]]:
    """``{model_type: family.<attribute>}`` over every registered family (config-time checks of ``targets``)."""
    _registered()
    return {t: tuple(getattr(get_family(t), attribute)) for t in FAMILIES}


def _registered() -> None:
    """Makes sure the families of ``optimum_vim._registration.MODEL_FAMILIES`` have named their adapters (they do
    when ``import optimum_vim`` registered them; a bare import of this module may come first)."""
    from .._registration import register_vim_with_transformers

    register_vim_with_transformers()
