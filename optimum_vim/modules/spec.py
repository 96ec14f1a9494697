"""Typed specs of the quantized modules: what config.json's ``layers`` stores per module, as frozen dataclasses.

One class per module kind (:class:`LinearSpec`, :class:`Conv1dSpec`, :class:`ScanSpec`, :class:`OutputSpec`), per
weight format (:class:`IntWeightSpec`, :class:`VQWeightSpec`, and the conv's :class:`ConvWeightSpec`), for the
activation quantizer (:class:`ActivationSpec`, every granularity) and the scan's carried state (:class:`StateSpec`).
Each spec declares the buffers its module stores as data (:meth:`~_Spec.buffers`: name, dtype, shape, like torchao's
``tensor_data_names``), so the module registers them from its spec, the checkpoint check knows every tensor before
loading, and nothing else keeps a list of buffer names.

``from_dict`` validates (a clear ``ValueError`` for an impossible spec) and ``to_dict`` gives the JSON dict of storage
format v1 back. A spec read from a dict remembers which keys the dict had (``keys``), so a saved config round-trips
key for key; a spec built directly writes its required keys, the keys its class always writes, and every field whose
value differs from its default. Pass ``keys`` to reproduce another key set.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple

import torch

from ..primitives import packed_row_bytes

Granularity = Literal[
    "tensor", "token", "token_cluster", "channel", "channel_cluster", "dynamic_token", "dynamic_outlier"
]
GRANULARITIES: tuple[str, ...] = typing.get_args(Granularity)
CodebookDtype = Literal["float32", "float16"]
CODEBOOK_DTYPES = {"float32": torch.float32, "float16": torch.float16}
Inner = Literal["silu", "softplus", "identity"]


class BufferSpec(NamedTuple):
    """One stored tensor of a quantized module: state-dict name (relative to the module), dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class _Spec:
    """Shared ``to_dict`` / ``from_dict`` machinery. Subclasses list ``ALWAYS`` (optional keys written even at their
    default by a directly built spec) and ``TAG`` (the ``(key, value)`` that names the class in its dict)."""

    TAG: ClassVar[tuple[str, str] | None] = None
    ALWAYS: ClassVar[tuple[str, ...]] = ()
    BUFFER_NAMES: ClassVar[tuple[str, ...]] = ()  # every buffer name this kind can store (at its own level)
    # the dict keys this spec was read from (None: built directly); not part of equality
    keys: frozenset[str] | None = field(default=None, compare=False, repr=False, kw_only=True)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden
        pass

    # ---------------------------------------------------------------------------------------------- dicts
    @classmethod
    def _data_fields(cls):
        return [f for f in dataclasses.fields(cls) if f.name != "keys"]

    def _writes(self, f) -> bool:
        value = getattr(self, f.name)
        if f.default is dataclasses.MISSING:
            return True
        if self.keys is not None:
            return f.name in self.keys or value != f.default
        return f.name in self.ALWAYS or value != f.default

    def to_dict(self) -> dict[str, Any]:
        """The JSON dict of this spec (storage format v1)."""
        out: dict[str, Any] = {}
        if self.TAG is not None:
            out[self.TAG[0]] = self.TAG[1]
        for f in self._data_fields():
            if self._writes(f):
                value = getattr(self, f.name)
                out[f.name] = value.to_dict() if isinstance(value, _Spec) else value
        if self.keys is not None:  # the dict's own key order
            order = {k: i for i, k in enumerate(self.keys)}
            out = dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Validated spec from its JSON dict; raises ``ValueError`` for unknown keys or impossible values."""
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__} needs a dict; got {type(d).__name__} {d!r}")
        names = {f.name for f in cls._data_fields()}
        tag = {cls.TAG[0]} if cls.TAG else set()
        unknown = sorted(set(d) - names - tag)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known: {sorted(names | tag)}")
        missing = sorted(f.name for f in cls._data_fields() if f.default is dataclasses.MISSING and f.name not in d)
        if missing:
            raise ValueError(f"{cls.__name__} spec {d!r} lacks {missing}")
        kwargs = {k: cls._parse_field(k, v) for k, v in d.items() if k in names}
        # iteration order of a frozenset is arbitrary; keep the dict's order in a tuple-backed frozenset subclass
        return cls(**kwargs, keys=_Keys(d))

    @classmethod
    def _parse_field(cls, name: str, value):
        return value

    # ---------------------------------------------------------------------------------------------- buffers
    def buffers(self) -> tuple[BufferSpec, ...]:
        """The buffers of the module at this spec's level (nested quantizers excluded)."""
        return ()

    def activations(self) -> dict[str, ActivationSpec]:
        """The nested activation quantizers by slot name (``"input"``, ``"output"``, ``"u"``, ...)."""
        return {}

    def tensors(self) -> tuple[BufferSpec, ...]:
        """Every stored tensor of the module, nested quantizers' under ``<slot>_quantizer.``."""
        out = list(self.buffers())
        for slot, act in self.activations().items():
            out += [b._replace(name=f"{slot}_quantizer.{b.name}") for b in act.buffers()]
        return tuple(out)


class _Keys(frozenset):
    """A frozenset of dict keys that also remembers their order (for ``to_dict``)."""

    def __new__(cls, keys):
        obj = super().__new__(cls, keys)
        obj.order = tuple(keys)
        return obj

    def __iter__(self):
        return iter(self.order)


# ------------------------------------------------------------------------------------------------------ activations
@dataclass(frozen=True)
class ActivationSpec(_Spec):
    """A static (or dynamic per-token) uniform activation quantizer; see :mod:`optimum_vim.modules.activation` for
    what each granularity stores. ``length`` / ``channels`` / ``num_clusters`` are the sizes a granularity needs; the
    ``outlier_*`` / ``refresh`` / ``reverse`` / ``static_outliers`` fields are those of ``dynamic_outlier``."""

    BUFFER_NAMES: ClassVar[tuple[str, ...]] = ("scale", "zero_point", "labels", "factor", "outlier_channels")
    ALWAYS: ClassVar[tuple[str, ...]] = ("symmetric",)
    _OUTLIER_ALWAYS: ClassVar[tuple[str, ...]] = ("outlier_bits", "refresh", "outlier_sigma", "reverse",
                                                  "static_outliers")

    bits: int
    granularity: Granularity
    symmetric: bool = True
    narrow: bool = True
    length: int | None = None
    channels: int | None = None
    num_clusters: int | None = None
    channel_factor: bool = False
    outlier_bits: Literal[8, 16] = 8
    refresh: int = 10
    outlier_sigma: float = 3.0
    reverse: bool = False
    static_outliers: bool = False
    outlier_trigger: Literal["interval", "range"] = "interval"
    outlier_affine: bool = False

    def _writes(self, f) -> bool:
        if self.keys is None and self.granularity == "dynamic_outlier" and f.name in self._OUTLIER_ALWAYS:
            return True
        return super()._writes(f)

    @classmethod
    def from_dict(cls, d):
        if isinstance(d, dict) and d.get("type") == "activation":  # a top-level activation module
            spec = super().from_dict({k: v for k, v in d.items() if k != "type"})
            return dataclasses.replace(spec, keys=_Keys(d))
        return super().from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.keys is not None and "type" in self.keys:
            out = {"type": "activation", **out}
        return out

    def validate(self) -> None:
        gran = self.granularity
        if gran not in GRANULARITIES:
            raise ValueError(f"activation granularity must be one of {GRANULARITIES}; got {gran!r}")
        if not _is_int(self.bits) or not 2 <= self.bits <= 16:
            raise ValueError(f"activation bits must be an int in 2..16; got {self.bits!r}")
        if gran in ("token", "token_cluster") and not self.length:
            raise ValueError(f"granularity {gran!r} needs the sequence length")
        if (gran in ("channel", "channel_cluster") or self.channel_factor) and not self.channels:
            raise ValueError(f"granularity {gran!r} / channel_factor needs the channel count")
        if gran.endswith("cluster") and not self.num_clusters:
            raise ValueError(f"granularity {gran!r} needs num_clusters")
        if gran == "dynamic_token" and not self.symmetric:
            raise ValueError("dynamic_token quantization is symmetric only")
        if gran == "dynamic_outlier":
            self._validate_outliers()

    def _validate_outliers(self) -> None:
        if not _is_int(self.length) or self.length < 1:
            raise ValueError(f"granularity 'dynamic_outlier' needs the sequence length; got {self.length!r}")
        if self.outlier_bits not in (8, 16):
            raise ValueError(f"outlier_bits must be 8 (int8 outliers) or 16 (fp16); got {self.outlier_bits!r}")
        if not _is_int(self.refresh) or self.refresh < 1:
            raise ValueError(f"refresh must be a positive int (tokens per outlier window); got {self.refresh!r}")
        sigma = self.outlier_sigma
        if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not sigma > 0:
            raise ValueError(f"outlier_sigma must be a positive number; got {sigma!r}")
        if self.static_outliers and not self.channels:
            raise ValueError("static_outliers needs the channel count (channels)")
        if self.outlier_trigger not in ("interval", "range"):
            raise ValueError(f"outlier_trigger must be 'interval' or 'range'; got {self.outlier_trigger!r}")
        if not isinstance(self.outlier_affine, bool):
            raise ValueError(f"outlier_affine must be true or false; got {self.outlier_affine!r}")

    @property
    def num_scales(self) -> int:
        """Entries of ``scale`` (0: dynamic per-token scales, no buffer)."""
        return {
            "tensor": 1, "token": self.length, "channel": self.channels, "token_cluster": self.num_clusters,
            "channel_cluster": self.num_clusters, "dynamic_token": 0, "dynamic_outlier": self.length,
        }[self.granularity]

    def buffers(self) -> tuple[BufferSpec, ...]:
        out = []
        n = self.num_scales
        if n:
            out.append(BufferSpec("scale", torch.float32, (n,)))
            if not self.symmetric:
                out.append(BufferSpec("zero_point", torch.int32, (n,)))
        if self.granularity == "token_cluster":
            out.append(BufferSpec("labels", torch.int32, (self.length,)))
        if self.granularity == "channel_cluster":
            out.append(BufferSpec("labels", torch.int32, (self.channels,)))
        if self.channel_factor:
            out.append(BufferSpec("factor", torch.float32, (self.channels,)))
        if self.granularity == "dynamic_outlier" and self.static_outliers:
            out.append(BufferSpec("outlier_channels", torch.uint8, (self.channels,)))
        return tuple(out)


def _present(spec, slots) -> dict[str, ActivationSpec]:
    return {k: getattr(spec, k) for k in slots if getattr(spec, k) is not None}


def _activation_or_none(value):
    return None if value is None else ActivationSpec.from_dict(value)


# ------------------------------------------------------------------------------------------------------ weights
@dataclass(frozen=True)
class IntWeightSpec(_Spec):
    """Symmetric integer weights, +-(2^(b-1)-1) (1 bit: +-scale), one scale per output row or per group of
    ``group_size`` inputs."""

    TAG: ClassVar[tuple[str, str]] = ("format", "int")
    ALWAYS: ClassVar[tuple[str, ...]] = ("group_size",)
    BUFFER_NAMES: ClassVar[tuple[str, ...]] = ("qweight", "weight_scale")

    bits: int
    group_size: int | None = None

    def validate(self) -> None:
        if not _is_int(self.bits) or self.bits not in range(1, 9):
            raise ValueError(f"integer weight bits must be 1..8 (1: binary +-scale); got {self.bits!r}")
        gs = self.group_size
        if gs is not None and (not _is_int(gs) or gs < 1):
            raise ValueError(f"group_size must be a positive int or None; got {gs!r}")

    @property
    def code_bits(self) -> int:
        return self.bits

    def weight_buffers(self, in_features: int, out_features: int) -> tuple[BufferSpec, ...]:
        k, n = in_features, out_features
        groups = 1 if not self.group_size else -(-k // self.group_size)
        codes = (BufferSpec("qweight", torch.int8, (n, k)) if self.bits == 8
                 else BufferSpec("qweight", torch.uint8, (n, packed_row_bytes(k, self.bits))))
        return codes, BufferSpec("weight_scale", torch.float32, (n, groups))


@dataclass(frozen=True)
class VQWeightSpec(_Spec):
    """Codebook weights: each row cut into ``vector_dim``-long sub-vectors, each an ``index_bits``-bit index into a
    ``codebook_size`` x ``vector_dim`` codebook (format in :mod:`optimum_vim.modules.linear`)."""

    TAG: ClassVar[tuple[str, str]] = ("format", "vq")
    ALWAYS: ClassVar[tuple[str, ...]] = ("channel_scale", "codebook_dtype")
    BUFFER_NAMES: ClassVar[tuple[str, ...]] = ("qweight", "codebook", "weight_scale")

    index_bits: int
    vector_dim: int
    codebook_size: int
    channel_scale: bool = False
    codebook_dtype: CodebookDtype = "float32"

    def validate(self) -> None:
        for key in ("index_bits", "vector_dim", "codebook_size"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise ValueError(f"codebook weight spec needs a positive int {key}; got {getattr(self, key)!r}")
        if self.index_bits > 8:
            raise ValueError(f"codebook indices are packed with at most 8 bits; got index_bits={self.index_bits}")
        if self.codebook_size > 1 << self.index_bits:
            raise ValueError(f"{self.codebook_size} codewords need more than {self.index_bits} index bits")
        if self.codebook_dtype not in CODEBOOK_DTYPES:
            raise ValueError(f"codebook_dtype must be one of {sorted(CODEBOOK_DTYPES)}; got {self.codebook_dtype!r}")

    @property
    def code_bits(self) -> int:
        return self.index_bits

    def weight_buffers(self, in_features: int, out_features: int) -> tuple[BufferSpec, ...]:
        n, d = out_features, self.vector_dim
        dtype = CODEBOOK_DTYPES[self.codebook_dtype]
        out = [BufferSpec("qweight", torch.uint8, (n, packed_row_bytes(-(-in_features // d), self.index_bits))),
               BufferSpec("codebook", dtype, (self.codebook_size, d))]
        if self.channel_scale:
            out.append(BufferSpec("weight_scale", dtype, (n, 1)))
        return tuple(out)


WeightSpec = IntWeightSpec | VQWeightSpec
_WEIGHT_FORMATS = {"int": IntWeightSpec, "vq": VQWeightSpec}


def weight_spec_from_dict(d) -> WeightSpec:
    """The weight spec of a linear layer from its dict (``format`` picks the class)."""
    if isinstance(d, (IntWeightSpec, VQWeightSpec)):
        return d
    fmt = d.get("format") if isinstance(d, dict) else None
    if fmt not in _WEIGHT_FORMATS:
        raise ValueError(f"weight format must be 'int' or 'vq'; got {fmt!r}")
    return _WEIGHT_FORMATS[fmt].from_dict(d)


@dataclass(frozen=True)
class ConvWeightSpec(_Spec):
    """Symmetric integer weights of the depthwise conv, one scale per channel or one for the tensor."""

    bits: int
    granularity: Literal["channel", "tensor"] = "channel"

    def validate(self) -> None:
        if not _is_int(self.bits) or self.bits not in range(2, 9):
            raise ValueError(f"conv weight bits must be 2..8; got {self.bits}")
        if self.granularity not in ("channel", "tensor"):
            raise ValueError(f"conv weight granularity must be 'channel' or 'tensor'; got {self.granularity!r}")


@dataclass(frozen=True)
class StateSpec(_Spec):
    """The scan's carried hidden state, re-quantized to ``bits`` after every step."""

    ALWAYS: ClassVar[tuple[str, ...]] = ("bits", "narrow", "channel_scale")

    bits: int = 8
    narrow: bool = False
    channel_scale: bool = False

    def validate(self) -> None:
        if not _is_int(self.bits) or self.bits not in range(2, 9):
            raise ValueError(f"state bits must be 2..8; got {self.bits}")


# ------------------------------------------------------------------------------------------------------ modules
@dataclass(frozen=True)
class ModuleSpec(_Spec):
    """Base of the top-level module specs (``"type"`` in the dict names the class)."""

    KIND: ClassVar[str] = "abstract"

    @property
    def kind(self) -> str:
        return self.KIND

    def num_float_parameters(self) -> int:
        """Float parameters of the module this one replaces (weight and bias); 0 for weightless modules."""
        return 0


@dataclass(frozen=True)
class LinearSpec(ModuleSpec):
    """A quantized ``nn.Linear`` (:class:`~optimum_vim.modules.QLinear`). ``smooth``: PTQ4VM's smoothing, inputs
    divided by ``smooth_scale`` (folded into the weight)."""

    KIND: ClassVar[str] = "linear"
    TAG: ClassVar[tuple[str, str]] = ("type", "linear")
    ALWAYS: ClassVar[tuple[str, ...]] = ("bias", "input")
    BUFFER_NAMES: ClassVar[tuple[str, ...]] = ("qweight", "weight_scale", "codebook", "bias", "smooth_scale")

    in_features: int
    out_features: int
    weight: WeightSpec
    bias: bool = False
    input: ActivationSpec | None = None
    smooth: bool = False

    @classmethod
    def _parse_field(cls, name, value):
        if name == "weight":
            return weight_spec_from_dict(value)
        return _activation_or_none(value) if name == "input" else value

    def validate(self) -> None:
        for key in ("in_features", "out_features"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise ValueError(f"linear spec needs a positive int {key}; got {getattr(self, key)!r}")
        if not isinstance(self.weight, (IntWeightSpec, VQWeightSpec)):
            raise ValueError(f"linear weight must be an IntWeightSpec or VQWeightSpec; got {self.weight!r}")

    def buffers(self) -> tuple[BufferSpec, ...]:
        out = list(self.weight.weight_buffers(self.in_features, self.out_features))
        if self.bias:
            out.append(BufferSpec("bias", torch.float32, (self.out_features,)))
        if self.smooth:
            out.append(BufferSpec("smooth_scale", torch.float32, (self.in_features,)))
        return tuple(out)

    def activations(self) -> dict[str, ActivationSpec]:
        return _present(self, ("input",))

    def num_float_parameters(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Conv1dSpec(ModuleSpec):
    """A quantized depthwise token convolution (:class:`~optimum_vim.modules.QConv1d`): (anti-)causal as Vim's
    (``padding="causal"``, with bias: the defaults, absent from a v1 dict) or non-causal without bias as MambaVision's
    (``padding="same"``, ``bias=False``)."""

    KIND: ClassVar[str] = "conv1d"
    TAG: ClassVar[tuple[str, str]] = ("type", "conv1d")
    ALWAYS: ClassVar[tuple[str, ...]] = ("reverse", "input", "output")
    BUFFER_NAMES: ClassVar[tuple[str, ...]] = ("qweight", "weight_scale", "bias")

    channels: int
    kernel_size: int
    weight: ConvWeightSpec
    reverse: bool = False
    input: ActivationSpec | None = None
    output: ActivationSpec | None = None
    padding: Literal["causal", "same"] = "causal"
    bias: bool = True

    @classmethod
    def _parse_field(cls, name, value):
        if name == "weight":
            return ConvWeightSpec.from_dict(value)
        return _activation_or_none(value) if name in ("input", "output") else value

    @classmethod
    def like(cls, conv, weight: ConvWeightSpec, **kwargs) -> Conv1dSpec:
        """The spec of a quantized twin of the float token conv ``conv`` (a
        :class:`~optimum_vim.modules.float.TokenConv1d`): its channels, width, direction, padding and bias."""
        return cls(conv.weight.shape[0], conv.weight.shape[-1], weight, reverse=bool(conv.reverse),
                   padding=conv.token_padding, bias=conv.bias is not None, **kwargs)

    def validate(self) -> None:
        if not isinstance(self.weight, ConvWeightSpec):
            raise ValueError(f"conv1d weight must be a ConvWeightSpec; got {self.weight!r}")
        if self.padding not in ("causal", "same"):
            raise ValueError(f"conv1d padding must be 'causal' or 'same'; got {self.padding!r}")
        if self.padding == "same" and self.reverse:
            raise ValueError("a conv1d with padding 'same' has no reversed form; use reverse=False")
        if not isinstance(self.bias, bool):
            raise ValueError(f"conv1d bias must be true or false; got {self.bias!r}")

    def buffers(self) -> tuple[BufferSpec, ...]:
        e, k, bits = self.channels, self.kernel_size, self.weight.bits
        codes = (BufferSpec("qweight", torch.int8, (e, k)) if bits == 8
                 else BufferSpec("qweight", torch.uint8, (e, packed_row_bytes(k, bits))))
        scale = BufferSpec("weight_scale", torch.float32, (e if self.weight.granularity == "channel" else 1,))
        return (codes, scale, BufferSpec("bias", torch.float32, (e,))) if self.bias else (codes, scale)

    def activations(self) -> dict[str, ActivationSpec]:
        return _present(self, ("input", "output"))

    def num_float_parameters(self) -> int:
        return self.channels * (self.kernel_size + int(self.bias))


@dataclass(frozen=True)
class OutputSpec(ModuleSpec):
    """An elementwise function (``inner``) between an optional input and an optional output quantizer
    (:class:`~optimum_vim.modules.QOutput`); at least one of them."""

    KIND: ClassVar[str] = "output"
    TAG: ClassVar[tuple[str, str]] = ("type", "output")
    ALWAYS: ClassVar[tuple[str, ...]] = ("input", "output")

    inner: Inner
    input: ActivationSpec | None = None
    output: ActivationSpec | None = None

    @classmethod
    def _parse_field(cls, name, value):
        return _activation_or_none(value) if name in ("input", "output") else value

    def validate(self) -> None:
        if self.inner not in typing.get_args(Inner):
            raise ValueError(f"QOutput inner must be one of {sorted(typing.get_args(Inner))}; got {self.inner!r}")
        if self.input is None and self.output is None:
            raise ValueError(f"QOutput needs an input or an output quantizer spec; got input {self.input!r}, "
                             f"output {self.output!r}")

    def activations(self) -> dict[str, ActivationSpec]:
        return _present(self, ("input", "output"))


SCAN_INPUTS = ("u", "delta", "B", "C")


@dataclass(frozen=True)
class ScanSpec(ModuleSpec):
    """The quantized selective scan of one direction (:class:`~optimum_vim.modules.QSelectiveScan`): input
    quantizers of u, delta, B, C, the output ``y`` before the D skip, and the carried ``state``."""

    KIND: ClassVar[str] = "scan"
    TAG: ClassVar[tuple[str, str]] = ("type", "scan")
    ALWAYS: ClassVar[tuple[str, ...]] = ("reverse", "u", "delta", "B", "C", "y", "state")
    BUFFER_NAMES: ClassVar[tuple[str, ...]] = ("state_scale", "state_channel_scale")

    length: int
    channels: int
    d_state: int
    reverse: bool = False
    u: ActivationSpec | None = None
    delta: ActivationSpec | None = None
    B: ActivationSpec | None = None
    C: ActivationSpec | None = None
    y: ActivationSpec | None = None
    state: StateSpec | None = None

    @classmethod
    def _parse_field(cls, name, value):
        if name == "state":
            return None if not value else StateSpec.from_dict(value)
        return _activation_or_none(value) if name in (*SCAN_INPUTS, "y") else value

    def buffers(self) -> tuple[BufferSpec, ...]:
        if self.state is None:
            return ()
        out = [BufferSpec("state_scale", torch.float32, (self.length,))]
        if self.state.channel_scale:
            out.append(BufferSpec("state_channel_scale", torch.float32, (self.channels,)))
        return tuple(out)

    def activations(self) -> dict[str, ActivationSpec]:
        return _present(self, (*SCAN_INPUTS, "y"))


MODULE_SPECS: dict[str, type] = {cls.KIND: cls for cls in (LinearSpec, Conv1dSpec, OutputSpec, ScanSpec)}
MODULE_SPECS["activation"] = ActivationSpec

AnySpec = LinearSpec | Conv1dSpec | OutputSpec | ScanSpec | ActivationSpec


def spec_from_dict(d) -> AnySpec:
    """The typed spec of one quantized module from its config.json dict (``"type"`` picks the class); a typed spec
    is returned as is."""
    if isinstance(d, _Spec):
        return d
    if not isinstance(d, dict):
        raise ValueError(f"a quantized module spec is a dict with a 'type'; got {type(d).__name__} {d!r}")
    kind = d.get("type")
    if kind not in MODULE_SPECS:
        raise ValueError(f"unknown quantized module type {kind!r}; known: {sorted(MODULE_SPECS)}")
    return MODULE_SPECS[kind].from_dict(d)


def spec_kind(spec: AnySpec) -> str:
    """The ``"type"`` of a spec (``"activation"`` for a bare activation quantizer)."""
    return "activation" if isinstance(spec, ActivationSpec) else spec.kind


def quantized_buffer_names() -> frozenset[str]:
    """Buffer names (last state-dict component) that only quantized modules own at their own level (a float model
    has none of them); nested quantizers' buffers sit under ``*_quantizer.``."""
    names = set()
    for cls in (LinearSpec, Conv1dSpec, ScanSpec):
        names.update(cls.BUFFER_NAMES)
    return frozenset(names - {"bias"})
