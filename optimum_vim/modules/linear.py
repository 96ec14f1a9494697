"""QLinear: the quantized linear layer every recipe emits.

Its spec is a :class:`~optimum_vim.modules.spec.LinearSpec`: ``in_features`` K, ``out_features`` N, ``bias``, the
weight format (:class:`~optimum_vim.modules.spec.IntWeightSpec`: ``bits`` 1..8, symmetric +-(2^(b-1)-1), 1 bit: +-1,
``group_size`` None or G; or :class:`~optimum_vim.modules.spec.VQWeightSpec`: ``index_bits``, ``vector_dim``,
``codebook_size``, ``channel_scale``, ``codebook_dtype``, the codebook format below), ``input`` (None or the
:class:`~optimum_vim.modules.spec.ActivationSpec` of a static / dynamic input quantizer) and ``smooth`` (PTQ4VM
smoothing: inputs divided by ``smooth_scale``, folded into W). Its ``to_dict()`` is what config.json stores, e.g.
``{"type": "linear", "in_features": K, "out_features": N, "bias": false, "weight": {"format": "int", "bits": 4,
"group_size": null}, "input": null}``.

Buffers (declared by the spec; state-dict names under the module): ``qweight`` (int8 (N, K) for 8 bit, packed uint8
otherwise, or packed codebook indices), ``weight_scale`` (fp32 (N, G) or (N, 1)), ``codebook`` (fp32 (C, d)),
``bias`` (fp32 (N,)), ``smooth_scale`` (fp32 (K,)), and ``input_quantizer.*``.

Codebook format ("vq"): each output row is cut into ``ceil(K / d)`` sub-vectors of ``d`` inputs (the last one
zero-padded when ``d`` does not divide ``K``; the padding is dropped on decode), each stored as an ``index_bits``-bit
index (packed, storage format v1: ``qweight`` (N, ceil(ceil(K/d) * b / 8)) uint8) into the layer's ``codebook``
(C, d); ``W[n] = weight_scale[n] * concat(codebook[idx[n, j]])[:K]``. ``codebook_dtype`` (default float32) is the
storage dtype of ``codebook`` and of the optional per-channel ``weight_scale`` (N, 1); both are widened to fp32
before any arithmetic, so fp16 storage halves the codebook overhead without changing the GEMM.

An input quantizer of granularity ``dynamic_outlier`` (OuroMamba) in front of per-channel integer weights runs the
layer as ``ops.outlier_gemm``: the int8 inlier codes on the full matrix plus a gathered GEMM over the outlier columns
(the Triton ``outlier_gemm`` kernel on CUDA, its reference on CPU).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.quantized import combine_directions, dequantize_weight_ref, outlier_gemm, quant_gemm
from .activation import QActivation
from .base import QModule, mark_nan, nan_rows, register_qmodule
from .spec import IntWeightSpec, LinearSpec
from .training import linear_train_forward, needs_grad


@register_qmodule("linear")
class QLinear(QModule):
    """Quantized ``nn.Linear`` over (..., K) inputs. Forward goes through :func:`optimum_vim.ops.quant_gemm`:
    integer codes and row scales when the input quantizer has one scale per token and the weight is integer
    (W8A8, W4A8, ...), float activations for weight-only formats, and quantize-dequantize otherwise."""

    SPEC = LinearSpec
    OPTIONAL_BUFFERS = ("weight_scale", "bias", "smooth_scale")

    def __init__(self, spec: LinearSpec | dict):
        super().__init__(spec)
        spec = self.spec
        self.in_features, self.out_features = spec.in_features, spec.out_features
        self.format = "int" if isinstance(spec.weight, IntWeightSpec) else "vq"
        self.bits = spec.weight.code_bits
        self.group_size = spec.weight.group_size if self.format == "int" else None
        self.input_quantizer = QActivation(spec.input) if spec.input is not None else None

    def _float_module(self, use_mamba_kernels: bool) -> nn.Module:
        new = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            new.weight.copy_(self.effective_weight())
            if new.bias is not None:
                new.bias.copy_(self.bias)
        return new

    def num_weight_parameters(self) -> int:
        """Float parameters this layer stands for (weight and bias), as ``num_parameters()`` counts them."""
        return self.spec.num_float_parameters()

    @property
    def codebook_or_none(self):
        return getattr(self, "codebook", None) if self.format == "vq" else None

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight (N, K) the layer applies (smoothing folded in)."""
        return dequantize_weight_ref(
            self.qweight, self.weight_scale, self.bits, self.in_features, self.group_size, self.codebook_or_none
        )

    def effective_weight(self) -> torch.Tensor:
        """The float weight acting on the *unsmoothed* input: ``W_hat / smooth_scale`` (what :meth:`dequantize`'s
        ``nn.Linear`` holds)."""
        w = self.dequantized_weight()
        return w / self.smooth_scale if self.smooth_scale is not None else w

    def forward(self, x: torch.Tensor, combine: tuple | None = None) -> torch.Tensor:
        """``x`` (..., K) -> (..., N). With ``combine=(y_b, z, divide)`` (only when :meth:`can_fuse_combine`), ``x``
        is Vim's forward-direction scan output and the layer computes
        ``self((x + y_b) / 2 * silu(z))`` with the average, gate and input quantization fused; going through the
        module call keeps forward hooks working (a pre-hook sees ``x = y_f`` and the rest in ``combine``).
        With a gradient to compute, the float straight-through path runs instead (:mod:`optimum_vim.modules.training`)."""
        if needs_grad(self, x, *(combine or ())[:2]):
            return linear_train_forward(self, x, combine)
        if combine is not None:
            y_b, z, divide = combine
            return self._forward_combined(x, y_b, z, divide)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QLinear expects {self.in_features} input features; got {x.shape[-1]}")
        out_shape = (*x.shape[:-1], self.out_features)
        out_dtype = x.dtype
        if self.smooth_scale is not None:
            x = x / self.smooth_scale.to(x.dtype)
        gemm_args = dict(
            bits=self.bits, in_features=self.in_features, group_size=self.group_size, bias=self.bias,
            out_dtype=out_dtype,
        )
        if self.input_quantizer is not None:
            if self._outlier_gemm_ok():
                return self._forward_outliers(x, out_dtype).reshape(out_shape)
            rows = self.input_quantizer.row_quantize(x) if self.format == "int" else None
            if rows is not None:
                codes, scale, zero = rows
                y = quant_gemm(codes, self.qweight, self.weight_scale, a_scale=scale, a_zero=zero, **gemm_args)
                return mark_nan(y.reshape(out_shape), nan_rows(x))  # NaN in -> NaN out (codes cannot hold NaN)
            x = self.input_quantizer(x)
        y = quant_gemm(
            x.reshape(-1, self.in_features), self.qweight, self.weight_scale, codebook=self.codebook_or_none,
            **gemm_args,
        )
        return y.reshape(out_shape)

    def _outlier_gemm_ok(self) -> bool:
        """OuroMamba's dynamic outlier extractor in front of per-channel integer weights, symmetric int8 inliers:
        the inlier GEMM + gathered outlier GEMM (``ops.outlier_gemm``) serves the layer."""
        iq = self.input_quantizer
        if torch.compiler.is_exporting():  # a gathered GEMM has a data-dependent width: export fake-quantizes
            return False
        return (iq.granularity == "dynamic_outlier" and iq.symmetric and iq.qmax <= 127 and self.format == "int"
                and not self.group_size and self.smooth_scale is None)

    def _forward_outliers(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        codes, a_scale, idx, values = self.input_quantizer.outlier_gemm_operands(x)
        return outlier_gemm(codes, a_scale, self.qweight, self.weight_scale, idx, values, bits=self.bits,
                            in_features=self.in_features, bias=self.bias, out_dtype=out_dtype)

    def can_fuse_combine(self) -> bool:
        """Whether :meth:`forward` can take Vim's two scan directions and the gate (``combine=``): integer weights
        behind a static per-tensor or per-token input quantizer (symmetric, or affine 8-bit codes carried as int8
        minus 128 like :meth:`QActivation.row_quantize`), no smoothing."""
        iq = self.input_quantizer
        return not (
            self.format != "int" or self.smooth_scale is not None or iq is None
            or iq.granularity not in ("tensor", "token") or iq.spec.channel_factor
            or iq.qmax - iq.qmin > 255
        )

    def _forward_combined(self, y_f: torch.Tensor, y_b: torch.Tensor, z: torch.Tensor, divide: bool) -> torch.Tensor:
        """out_proj of ``(y_f + y_b) / 2 * silu(z)`` with the combine fused into the input quantization: one pass (the
        Triton combine kernel on GPU) emits the int8 codes that the integer GEMM consumes."""
        if not self.can_fuse_combine():
            raise ValueError("this QLinear cannot fuse the direction combine (see can_fuse_combine)")
        if y_f.dim() != 3 or y_f.shape[-1] != self.in_features:
            raise ValueError(f"QLinear expects (batch, L, {self.in_features}) inputs; got {tuple(y_f.shape)}")
        iq = self.input_quantizer
        iq._check_input(y_f)
        b, length, k = y_f.shape
        rows = iq.static_rows(b, length)  # int8-shifted zero point and clamp bounds, row scales / zeros (cached)
        codes = combine_directions(y_f, y_b, z, divide=divide, out_scale=iq.scale, out_zero=rows.zero, qmin=rows.qmin,
                                   qmax=rows.qmax)
        y = quant_gemm(
            codes.reshape(-1, k), self.qweight, self.weight_scale, bits=self.bits, in_features=k,
            group_size=self.group_size, a_scale=rows.scale_rows, a_zero=rows.zero_rows, bias=self.bias,
            out_dtype=y_f.dtype,
        )
        nan = nan_rows(y_f, y_b, z)  # NaN in -> NaN out (codes cannot hold NaN)
        return mark_nan(y.reshape(b, length, self.out_features), nan)
