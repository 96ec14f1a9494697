"""PyTorch references of every kernel in this package (pure torch: importable without Triton).

Each function has the signature of its Triton twin and computes exactly what the kernel must compute:
integer products are accumulated exactly (fp64 holds every int8 x int8 sum up to K = 2^37), then the epilogue
is applied in fp32 in the documented order. Kernels are tested against these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .format import unpack_codes, unpack_signed


# ---------------------------------------------------------------------------------------------------------------
# weight decoding
def decode_int_weight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Integer weight codes (N, K) as int32 from int8 storage (8 bit) or packed uint8 (fewer bits)."""
    if bits == 8:
        if qweight.dtype != torch.int8:
            raise TypeError(f"8-bit weights are stored as int8; got {qweight.dtype}")
        return qweight.to(torch.int32)
    return unpack_signed(qweight, bits, in_features)


def expand_group_scale(scale: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """(N, G) per-group scales -> (N, K) per-weight scales (G == 1: per output channel)."""
    if scale.shape[1] == 1:
        return scale.expand(-1, in_features)
    return scale.repeat_interleave(group_size, dim=1)[:, :in_features]


def decode_vq_weight(indices: torch.Tensor, codebook: torch.Tensor, index_bits: int, in_features: int) -> torch.Tensor:
    """Codebook weights (N, K): packed indices (N, ceil(K/d * bits / 8)) select d-dim codewords of ``codebook``."""
    d = codebook.shape[1]
    n_vec = -(-in_features // d)
    idx = unpack_codes(indices, index_bits, n_vec).long()
    return codebook[idx].reshape(indices.shape[0], n_vec * d)[:, :in_features]


def dequantize_weight_ref(
    qweight: torch.Tensor,
    w_scale: torch.Tensor | None,
    bits: int,
    in_features: int,
    group_size: int | None = None,
    codebook: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 weight (N, K) of an int-format (``codebook is None``) or codebook-format quantized linear."""
    if codebook is not None:
        w = decode_vq_weight(qweight, codebook.float(), bits, in_features)
        return w * w_scale.float() if w_scale is not None else w
    codes = decode_int_weight(qweight, bits, in_features).float()
    return codes * expand_group_scale(w_scale.float(), in_features, group_size)


# ---------------------------------------------------------------------------------------------------------------
# GEMM family
def quant_gemm_ref(
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
    out_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = a @ W^T + bias`` for a quantized weight ``W``.

    Args:
        a: (M, K) float activations (weight-only formats: W8A16, W4A16, W2A16, VQ) or int8 codes (A8 formats),
            in which case ``a_scale`` (M,) or (1,) fp32 is required and ``a_zero`` (M,) int32 is optional
            (activation value = a_scale * (a - a_zero)).
        qweight: int8 (N, K) for 8-bit, packed uint8 (N, ceil(K*bits/8)) for fewer bits, or packed codebook indices.
        w_scale: fp32 (N, G) group scales, G = ceil(K / group_size) (G = 1: per channel); codebooks: (N, 1) or None.
        bits: weight code bits (int formats) or index bits (codebook).
        codebook: (C, d) codewords for the codebook format (float activations only).
        out_scale: (M,) or (1,): requantize the output to int8 codes ``clamp(round(y / out_scale), -128, 127)``.

    Epilogue order (A8): ``acc_g`` exact integer sums per weight group; ``y = sum_g(acc_g * w_scale[:, g]) *
    a_scale + bias`` in fp32. Float activations: ``y = a @ dequantized(W)^T + bias`` accumulated in fp32.
    """
    m, _ = a.shape
    out_dtype = check_gemm_args(a, in_features, codebook, a_scale, out_dtype)
    if not a.is_floating_point():
        w_codes = decode_int_weight(qweight, bits, in_features).double()  # (N, K)
        a_codes = a.double()
        n = w_codes.shape[0]
        y = torch.zeros(m, n, dtype=torch.float32, device=a.device)
        for g, (lo, hi) in enumerate(group_bounds(in_features, w_scale.shape[1], group_size)):
            sl = slice(lo, hi)
            acc = a_codes[:, sl] @ w_codes[:, sl].t()  # exact integers
            if a_zero is not None:
                acc = acc - a_zero.double()[:, None] * w_codes[:, sl].sum(1)[None, :]
            y = y + acc.float() * w_scale[:, g].float()[None, :]
        y = y * a_scale.float().reshape(-1, 1)
    else:
        w = dequantize_weight_ref(qweight, w_scale, bits, in_features, group_size, codebook)
        y = a.float() @ w.t()
    return gemm_epilogue(y, bias, out_scale, out_dtype)


def group_bounds(in_features: int, groups: int, group_size: int | None) -> list[tuple[int, int]]:
    """``[lo, hi)`` input ranges of the ``groups`` weight groups (one group: the whole row)."""
    gs = in_features if groups == 1 else group_size
    return [(g * gs, min((g + 1) * gs, in_features)) for g in range(groups)]


def check_gemm_args(a, in_features, codebook, a_scale, out_dtype):
    """Validates the activation side of a quantized GEMM call; returns the output dtype."""
    if a.shape[1] != in_features:
        raise ValueError(f"activations have {a.shape[1]} features, the weight {in_features}")
    if not a.is_floating_point():
        if codebook is not None:
            raise ValueError("codebook weights take float activations")
        if a_scale is None:
            raise ValueError("integer activations need a_scale")
    return out_dtype or (a.dtype if a.is_floating_point() else torch.float32)


def gemm_epilogue(y: torch.Tensor, bias, out_scale, out_dtype) -> torch.Tensor:
    """The shared tail of the GEMM twins, in place on the fp32 result ``y``: ``+ bias``, then either int8
    requantization ``clamp(round(y / out_scale), -128, 127)`` or the cast to ``out_dtype``."""
    if bias is not None:
        y = y.add_(bias.float())
    if out_scale is not None:
        return y.div_(out_scale.float().reshape(-1, 1)).round_().clamp_(-128, 127).to(torch.int8)
    return y.to(out_dtype)


def outlier_gemm_ref(
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
    """OuroMamba mixed-precision GEMM: low-bit inliers on the full matrix plus a gathered GEMM over outlier columns.

    Args:
        a_codes: (M, K) int8 inlier codes (outlier columns already zero), ``a_scale`` (M,) their scales.
        qweight / w_scale: per-channel quantized weight (w_scale (N, 1)).
        outlier_idx: (P,) int32 column indices of the outlier channels; ``outlier_values``: (M, P) float values of
            those columns (already quantized at the outlier precision, dequantized).
    ``y = (a_codes @ Wq^T) * w_scale * a_scale + outlier_values @ W[:, outlier_idx]^T + bias``.
    """
    y = quant_gemm_ref(a_codes, qweight, w_scale, bits=bits, in_features=in_features, a_scale=a_scale)
    if outlier_idx.numel():
        w = dequantize_weight_ref(qweight, w_scale, bits, in_features)
        y = y + outlier_values.float() @ w[:, outlier_idx.long()].t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# ---------------------------------------------------------------------------------------------------------------
# selective scan
def selective_scan_q_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    *,
    u_scale: torch.Tensor | None = None,
    delta_scale: torch.Tensor | None = None,
    delta_zero: torch.Tensor | None = None,
    B_scale: torch.Tensor | None = None,
    C_scale: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    reverse: bool = False,
    h_scale: torch.Tensor | None = None,
    h_channel_scale: torch.Tensor | None = None,
    h_qmin: int = -128,
    h_qmax: int = 127,
    out_dtype: torch.dtype | None = None,
    state_callback=None,
) -> torch.Tensor:
    """Selective scan over (batch, L, E) tensors with optionally int8 inputs and an 8-bit carried state.

    Args:
        u, delta: (b, L, E); B, C: (b, L, N); A: (E, N) fp32; D: (E,); z: (b, L, E) gate input.
        Integer inputs (int8 codes) are dequantized with their scale: ``*_scale`` of shape (L,) (static per token
        position) or (1,) (per tensor); ``delta_zero`` (same shape, int32) for an affine delta.
        delta_bias (E,) and delta_softplus: ``delta = softplus(delta + delta_bias)`` as mamba-ssm's kernel does.
        reverse: scan from the last token to the first (Vim's backward direction) without flipping tensors.
        h_scale: (L,) per-step scales, or (1,) one for every step: after step t the carried state is replaced by
            ``clamp(round(h / (h_scale[t] * h_channel_scale[e])), h_qmin, h_qmax) * scale`` (the output of step t
            still uses the unquantized state, as in k-scaled PTQ).
        state_callback: reference-only debugging hook, called as ``state_callback(t, h, scale)`` with the carried
            state (b, E, N) after step t (re-quantized when ``h_scale`` is given) and its scale (None, or a tensor
            broadcastable against h); the Triton twin has no such argument.
    Returns ``y = (C . h + D * u) * silu(z)`` in ``out_dtype`` (default: float32).
    """

    def deq(x, scale, zero=None):
        if x.is_floating_point():
            return x.float()
        if scale is None:
            raise ValueError("integer scan inputs need their scale")
        xf = x.float()
        if zero is not None:
            xf = xf - zero.float().reshape(1, -1, 1) if zero.numel() > 1 else xf - zero.float()
        return xf * (scale.float().reshape(1, -1, 1) if scale.numel() > 1 else scale.float())

    uf, df = deq(u, u_scale), deq(delta, delta_scale, delta_zero)
    Bf, Cf = deq(B, B_scale), deq(C, C_scale)
    if delta_bias is not None:
        df = df + delta_bias.float()
    if delta_softplus:
        df = F.softplus(df)
    b, length, e = uf.shape
    Af = A.float()
    h = torch.zeros(b, e, Af.shape[1], dtype=torch.float32, device=uf.device)
    ys = [None] * length
    steps = range(length - 1, -1, -1) if reverse else range(length)
    for t in steps:
        h = torch.exp(df[:, t, :, None] * Af) * h + (df[:, t] * uf[:, t])[:, :, None] * Bf[:, t, None, :]
        ys[t] = (h * Cf[:, t, None, :]).sum(-1)
        if h_scale is not None:
            s = (h_scale[t] if h_scale.numel() > 1 else h_scale.reshape(())).float()
            if h_channel_scale is not None:
                s = s * h_channel_scale.float()[None, :, None]
            h = torch.round(h / s).clamp_(h_qmin, h_qmax) * s
        if state_callback is not None:
            state_callback(t, h, s if h_scale is not None else None)
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + uf * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(out_dtype or torch.float32)


def combine_directions_ref(y_f: torch.Tensor, y_b: torch.Tensor, z: torch.Tensor | None, divide: bool = True,
                           out_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                           qmin: int = -128, qmax: int = 127, out_zero: torch.Tensor | None = None) -> torch.Tensor:
    """Vim's combine ahead of out_proj: ``(y_f + y_b) / 2 * silu(z)`` (gate optional), optionally requantized to int8
    codes ``clamp(round(y / out_scale) + out_zero, qmin, qmax)`` with ``out_scale`` (and the optional int32
    ``out_zero``) of shape (L,) (per token position) or (1,) (per tensor) for the next integer GEMM.
    Shapes (b, L, E)."""
    y = y_f.float() + y_b.float()
    if divide:
        y = y / 2
    if z is not None:
        y = y * F.silu(z.float())
    if out_scale is not None:
        q = torch.round(y / out_scale.float().reshape(1, -1, 1))
        if out_zero is not None:
            q = q + out_zero.float().reshape(1, -1, 1)
        return q.clamp_(qmin, qmax).to(torch.int8)
    return y.to(out_dtype or y_f.dtype)


def save_scan_inputs(ctx, u, delta, A, B, C, D, z, reverse) -> None:
    """Stores a selective scan's inputs on an autograd ``ctx`` (D and z optional); :func:`saved_scan_inputs` reads
    them back. Shared by the PyTorch scan's and the fused CPU scan's autograd functions."""
    ctx.reverse = reverse
    ctx.has_d, ctx.has_z = D is not None, z is not None
    ctx.save_for_backward(u, delta, A, B, C, D if D is not None else torch.empty(0),
                          z if z is not None else torch.empty(0))


def saved_scan_inputs(ctx) -> tuple:
    """``(u, delta, A, B, C, D, z)`` stored by :func:`save_scan_inputs` (D / z None when absent)."""
    u, delta, A, B, C, D, z = ctx.saved_tensors
    return u, delta, A, B, C, D if ctx.has_d else None, z if ctx.has_z else None

