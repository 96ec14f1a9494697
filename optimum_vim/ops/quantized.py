"""Quantized ops: the one dispatch point between the quantized modules and the kernels (Triton on CUDA, the CPU
family on CPU) or the references."""

from __future__ import annotations

import torch
from optimum_vim_kernels.reference import (
    combine_directions_ref,
    dequantize_weight_ref,
    outlier_gemm_ref,
    quant_gemm_ref,
    selective_scan_q_ref,
)

from .dispatch import pick_kernel
from .scan import selective_scan_codes
from .scan_loop import selective_scan_q_loop


def quant_gemm(
    a: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor | None,
    *,
    bits: int,
    in_features: int,
    group_size: int | None = None,
    codebook: torch.Tensor | None = None,
    a_scale: torch.Tensor | None = None,
    a_zero: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Quantized-weight GEMM ``(M, K) -> (M, N)``; see ``optimum_vim_kernels.reference.quant_gemm_ref``. With int8
    codes, ``a_scale`` / ``a_zero`` hold one value per row (M,) or one for every row (1,)."""
    kwargs = dict(
        bits=bits, in_features=in_features, group_size=group_size, codebook=codebook, a_scale=a_scale,
        a_zero=a_zero, bias=bias, out_dtype=out_dtype,
    )
    kernel = pick_kernel(
        "gemm", "quant_gemm", a, m=a.shape[0], n=qweight.shape[0], k=in_features, bits=bits,
        group_size=group_size, codebook=codebook is not None, int_activations=not a.is_floating_point(),
        act_dtype=a.dtype, vector_dim=codebook.shape[1] if codebook is not None else None,
    )
    if kernel is None:
        return quant_gemm_ref(a, qweight, w_scale, **kwargs)
    if a_zero is not None and a_zero.numel() != a.shape[0] and not kernel.__module__.endswith(".cpu"):
        kwargs["a_zero"] = a_zero.expand(a.shape[0])  # the Triton GEMM reads one zero point per row
    return kernel(a, qweight, w_scale, **kwargs)


def outlier_gemm(
    a_codes: torch.Tensor,
    a_scale: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    outlier_idx: torch.Tensor,
    outlier_values: torch.Tensor,
    *,
    bits: int,
    in_features: int,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """OuroMamba's mixed-precision GEMM ``(M, K) -> (M, N)``: inlier int8 codes on the full matrix plus the gathered
    outlier columns; see ``optimum_vim_kernels.reference.outlier_gemm_ref``."""
    kwargs = dict(bits=bits, in_features=in_features, bias=bias, out_dtype=out_dtype)
    kernel = pick_kernel(
        "outlier", "outlier_gemm", a_codes, m=a_codes.shape[0], n=qweight.shape[0], k=in_features, bits=bits,
        num_outliers=int(outlier_idx.numel()),
    )
    fn = kernel if kernel is not None else outlier_gemm_ref
    return fn(a_codes, a_scale, qweight, w_scale, outlier_idx, outlier_values, **kwargs)


def selective_scan_q(u, delta, A, B, C, D=None, z=None, **kwargs) -> torch.Tensor:
    """Selective scan with int8 inputs and/or a per-step 8-bit state; see ``selective_scan_q_ref``.

    Without a kernel and without state quantization, the chunked PyTorch scan runs on the codes, dequantizing them
    into its time-major layout (:func:`~optimum_vim.ops.scan.selective_scan_codes`; same values as the reference
    loop up to float summation order). Under ``torch.export``: one scan node (:mod:`optimum_vim.ops.scan_loop`)."""
    if torch.compiler.is_exporting():
        return selective_scan_q_loop(u, delta, A, B, C, D, z, **kwargs)
    kernel = pick_kernel(
        "scan", "selective_scan_q", u, length=u.shape[1], d_state=A.shape[1],
        state_quant=kwargs.get("h_scale") is not None,
    )
    if kernel is not None:
        return kernel(u, delta, A, B, C, D, z, **kwargs)
    if kwargs.get("h_scale") is None and not kwargs.get("delta_softplus") and kwargs.get("delta_bias") is None:
        scales = {k: kwargs.get(k) for k in ("u_scale", "delta_scale", "delta_zero", "B_scale", "C_scale")}
        return selective_scan_codes(u, delta, A, B, C, D, z, reverse=kwargs.get("reverse", False), **scales,
                                    out_dtype=kwargs.get("out_dtype") or torch.float32)
    return selective_scan_q_ref(u, delta, A, B, C, D, z, **kwargs)


def combine_directions(y_f, y_b, z, *, divide=True, out_scale, out_zero=None, qmin=-128, qmax=127) -> torch.Tensor:
    """Vim's combine ahead of out_proj, ``(y_f + y_b) / 2 * silu(z)``, emitted as int8 codes
    ``clamp(round(y / out_scale) + out_zero, qmin, qmax)`` for out_proj's integer GEMM; see
    ``combine_directions_ref``."""
    kernel = pick_kernel(
        "scan", "combine_directions", y_f, shape=tuple(y_f.shape), out_scale_numel=out_scale.numel(),
        out_zero_numel=None if out_zero is None else out_zero.numel(),
    )
    fn = kernel if kernel is not None else combine_directions_ref
    return fn(y_f, y_b, z, divide=divide, out_scale=out_scale, out_zero=out_zero, qmin=qmin, qmax=qmax)


__all__ = ["combine_directions", "dequantize_weight_ref", "outlier_gemm", "quant_gemm", "selective_scan_q"]
