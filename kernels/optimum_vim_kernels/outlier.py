"""OuroMamba's mixed-precision GEMM: a low-bit inlier GEMM over the full matrix plus a gathered GEMM over the
outlier columns, in one kernel. Twin of :func:`optimum_vim_kernels.reference.outlier_gemm_ref`.

The inlier part is an int8 x int8 -> int32 dot on the inlier codes (outlier columns already zero); the outlier part
gathers the P outlier columns of the quantized weight, dequantizes them in registers and multiplies them with the
(already outlier-precision-quantized, float) outlier activations. ``y = acc_in * w_scale * a_scale + acc_out + bias``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemm import _blocks, _decode_int_tile, _pow2


@triton.jit
def _outlier_gemm_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, idx_ptr, ov_ptr, bias_ptr, c_ptr,
    M, N, K, P, stride_am, stride_wn, stride_ovm, stride_cm,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
                    mask=m_mask[:, None] & (offs_k[None, :] < K), other=0)
        w = _decode_int_tile(w_ptr, offs_k, offs_n, K, N, stride_wn, BITS)
        acc_i += tl.dot(a, w.to(tl.int8))
    ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
    acc = acc_i.to(tl.float32) * ws[None, :]
    acc = acc * tl.load(as_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
    acc_out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_mask = offs_p < P
        cols = tl.load(idx_ptr + offs_p, mask=p_mask, other=0)
        ov = tl.load(ov_ptr + offs_m[:, None] * stride_ovm + offs_p[None, :],
                     mask=m_mask[:, None] & p_mask[None, :], other=0.0).to(tl.float32)
        # gathered weight columns: decode at k = cols[p] (rows of the [P, N] tile)
        wcol = _decode_int_tile(w_ptr, cols, offs_n, K, N, stride_wn, BITS).to(tl.float32)
        wcol = tl.where(p_mask[:, None], wcol * ws[None, :], 0.0)
        acc_out += tl.dot(ov, wcol, input_precision="ieee")
    acc += acc_out
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def supports_outlier_gemm(*, m, n, k, bits, num_outliers) -> str | None:
    """None when :func:`outlier_gemm` serves these arguments, else the reason."""
    if bits not in (1, 2, 4, 8):
        return f"{bits}-bit packed weights are decoded by the reference only (kernel: 1, 2, 4, 8)"
    if num_outliers > k:
        return f"{num_outliers} outlier columns exceed the {k} input features"
    if m < 1 or n < 1 or k < 1:
        return "empty matrix"
    return None


def outlier_gemm(a_codes, a_scale, qweight, w_scale, outlier_idx, outlier_values, *, bits, in_features, bias=None,
                 out_dtype=torch.float32):
    """Triton twin of ``reference.outlier_gemm_ref``.

    a_codes: (M, K) int8 inlier codes; a_scale: (M,) fp32; qweight/w_scale: per-channel quantized weight (N, 1)
    scales; outlier_idx: (P,) int32 columns; outlier_values: (M, P) float outlier activations. Returns (M, N).
    """
    a_codes = a_codes.contiguous()
    m, k = a_codes.shape
    n = qweight.shape[0]
    p = int(outlier_idx.numel())
    reason = supports_outlier_gemm(m=m, n=n, k=k, bits=bits, num_outliers=p)
    if reason is not None:
        raise ValueError(f"outlier_gemm kernel cannot serve this call: {reason}")
    if w_scale.shape[1] != 1:
        raise ValueError("outlier_gemm takes per-channel weight scales (N, 1)")
    bm, bn, bk = _blocks(m, n, k, None, True)
    bp = max(16, min(64, _pow2(max(p, 1))))
    dev = a_codes.device
    c = torch.empty(m, n, device=dev, dtype=out_dtype)
    dummy = torch.zeros(1, device=dev, dtype=torch.float32)
    idx = outlier_idx.to(torch.int32).contiguous() if p else torch.zeros(1, device=dev, dtype=torch.int32)
    ov = outlier_values.float().contiguous() if p else torch.zeros(m, 1, device=dev)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    args = (a_codes, a_scale.float().reshape(-1).expand(m).contiguous(), qweight,
            w_scale.float().contiguous(), idx, ov, bias.float().contiguous() if bias is not None else dummy, c,
            m, n, k, p, a_codes.stride(0), qweight.stride(0), ov.stride(0), c.stride(0))
    meta = dict(BITS=bits, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_P=bp)
    if a_codes.is_cuda:
        with torch.cuda.device(dev):
            _outlier_gemm_kernel[grid](*args, **meta, num_warps=8)
    else:
        _outlier_gemm_kernel[grid](*args, **meta, num_warps=8)
    return c


__all__ = ["outlier_gemm", "supports_outlier_gemm"]
