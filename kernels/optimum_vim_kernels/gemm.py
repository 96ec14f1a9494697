"""One Triton GEMM family for quantized weights, with a constexpr-selected weight decoder.

``quant_gemm`` has the signature and semantics of :func:`optimum_vim_kernels.reference.quant_gemm_ref`:

* weights: int8 (``bits=8``), packed int4 / int2 (storage format v1: low bits first, offset-binary), packed
  binary 1-bit (0 -> -1, 1 -> +1), or codebook
  (packed 1..8-bit indices selecting ``vector_dim``-wide codewords, optional per-channel scale);
  per-channel ``w_scale (N, 1)`` or per-group ``w_scale (N, G)``;
* activations: float (fp16 / bf16 / fp32: the weight tile is dequantized in registers, fp32 accumulation:
  W8A16, W4A16, W2A16, W1A16, VQ) or int8 codes (int8 x int8 -> int32 ``tl.dot``: W8A8, W4A8, W2A8) with per-row or
  per-tensor ``a_scale``, optional per-row zero point (subtracted in integers), optional int8 requantized output.

Epilogue order equals the reference: per weight group ``acc_g * w_scale[:, g]`` summed in K order, times
``a_scale``, plus bias. Rounding is round-half-to-even via the 1.5 * 2^23 trick (no libdevice, interpreter-safe).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_RNE = tl.constexpr(12582912.0)  # 1.5 * 2**23: (x + c) - c rounds fp32 |x| < 2**22 to the nearest even integer


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _decode_int_tile(w_ptr, offs_k, offs_n, K, N, stride_wn, BITS: tl.constexpr):
    """Signed integer codes (int32) of the weight tile, laid out [BLOCK_K, BLOCK_N]; masked entries are 0."""
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    if BITS == 8:
        code = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None], mask=mask, other=0).to(tl.int32)
    else:
        per_byte = 8 // BITS
        byte = tl.load(w_ptr + offs_n[None, :] * stride_wn + (offs_k // per_byte)[:, None], mask=mask, other=0)
        code = (byte.to(tl.int32) >> ((offs_k % per_byte) * BITS)[:, None]) & ((1 << BITS) - 1)
        # offset binary (1 bit: binary, 0 -> -1, 1 -> +1); masked positions would decode to a nonzero value, so
        # they are zeroed to keep integer sums exact
        if BITS == 1:
            code = tl.where(mask, 2 * code - 1, 0)
        else:
            code = tl.where(mask, code - (1 << (BITS - 1)), 0)
    return code


@triton.jit
def _decode_vq_tile(w_ptr, cb_ptr, offs_k, offs_n, K, N, stride_wn, row_bytes, BITS: tl.constexpr,
                    VEC: tl.constexpr):
    """Codebook values (fp32) of the weight tile [BLOCK_K, BLOCK_N]: packed BITS-bit indices pick VEC-wide codewords.

    BITS in {1, 2, 4, 8} never straddle bytes (shift-and-mask one byte); other widths (3, 5, 6, 7: the index widths
    a clamped codebook gets) read the 16-bit little-endian window holding the index's bits."""
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    vec = offs_k // VEC
    if 8 % BITS == 0:
        per_byte = 8 // BITS
        byte = tl.load(w_ptr + offs_n[None, :] * stride_wn + (vec // per_byte)[:, None], mask=mask, other=0)
        idx = (byte.to(tl.int32) >> ((vec % per_byte) * BITS)[:, None]) & ((1 << BITS) - 1)
    else:
        bit = vec * BITS
        first = bit // 8
        row = w_ptr + offs_n[None, :] * stride_wn
        lo = tl.load(row + first[:, None], mask=mask, other=0).to(tl.int32)
        hi = tl.load(row + first[:, None] + 1, mask=mask & ((first + 1) < row_bytes)[:, None], other=0).to(tl.int32)
        idx = ((lo | (hi << 8)) >> (bit % 8)[:, None]) & ((1 << BITS) - 1)
    return tl.load(cb_ptr + idx * VEC + (offs_k % VEC)[:, None], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _quant_gemm_kernel(
    a_ptr, w_ptr, ws_ptr, cb_ptr, bias_ptr, as_ptr, az_ptr, os_ptr, c_ptr,
    M, N, K, stride_am, stride_ak, stride_wn, stride_cm, stride_cn, n_groups, w_row_bytes,
    BITS: tl.constexpr, VQ: tl.constexpr, VEC: tl.constexpr, GROUP: tl.constexpr, PER_GROUP: tl.constexpr,
    INT_A: tl.constexpr, HAS_WS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    A_PER_ROW: tl.constexpr, REQUANT: tl.constexpr, OS_PER_ROW: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if INT_A:
        acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        if HAS_ZERO:
            zero = tl.load(az_ptr + offs_m, mask=m_mask, other=0)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=m_mask[:, None] & k_mask[None, :], other=0)
        if VQ:
            w = _decode_vq_tile(w_ptr, cb_ptr, offs_k, offs_n, K, N, stride_wn, w_row_bytes, BITS, VEC)
        else:
            w = _decode_int_tile(w_ptr, offs_k, offs_n, K, N, stride_wn, BITS)
        if INT_A:
            part = tl.dot(a, w.to(tl.int8))
            if HAS_ZERO:
                part -= zero[:, None] * tl.sum(w, axis=0)[None, :]
            if PER_GROUP:  # BLOCK_K == GROUP: every K step is one weight group, flushed with its scale
                ws = tl.load(ws_ptr + offs_n * n_groups + k0 // GROUP, mask=n_mask, other=0.0)
                acc += part.to(tl.float32) * ws[None, :]
            else:
                acc_i += part
        else:
            wf = w.to(tl.float32)
            if HAS_WS:
                if PER_GROUP:
                    ws = tl.load(ws_ptr + offs_n[None, :] * n_groups + (offs_k // GROUP)[:, None],
                                 mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                    wf = wf * ws
                else:
                    wf = wf * tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
            if DOT_F32:
                acc += tl.dot(a.to(tl.float32), wf, input_precision="ieee")
            else:
                acc += tl.dot(a, wf.to(a.dtype))
    if INT_A:
        if not PER_GROUP:
            acc = acc_i.to(tl.float32) * tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        if A_PER_ROW:
            acc = acc * tl.load(as_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
        else:
            acc = acc * tl.load(as_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = m_mask[:, None] & n_mask[None, :]
    if REQUANT:
        # div_rn is IEEE division like torch's (Triton's `/` lowers to div.full.f32 on NVIDIA, up to 2 ulp off, which
        # can flip a tie); clamping before the 1.5 * 2^23 rounding trick keeps it inside its exact range and equals
        # the reference's round-then-clamp because the bounds are integers
        if OS_PER_ROW:
            q = tl.math.div_rn(acc, tl.load(os_ptr + offs_m, mask=m_mask, other=1.0)[:, None])
        else:
            q = tl.math.div_rn(acc, tl.load(os_ptr))
        q = tl.minimum(tl.maximum(q, -128.0), 127.0)
        q = (q + _RNE) - _RNE
        tl.store(c_ptrs, q.to(tl.int8), mask=c_mask)
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def supports_quant_gemm(*, m, n, k, bits, group_size=None, codebook=False, int_activations=False,
                        act_dtype=torch.float32, vector_dim=None) -> str | None:
    """None when :func:`quant_gemm` serves these arguments, else why not (the caller uses the reference)."""
    if codebook:
        if int_activations:
            return "codebook weights take float activations"
        if bits not in range(1, 9):
            return f"codebook indices of {bits} bits do not fit the 1..8-bit packing"
        if vector_dim is not None and (vector_dim < 1 or vector_dim & (vector_dim - 1)):
            return f"codebook vector_dim {vector_dim} is not a power of two (kernel tiles need one)"
    elif bits not in (1, 2, 4, 8):
        return f"{bits}-bit packed weights straddle bytes and are decoded by the reference only (kernel: 1, 2, 4, 8)"
    if int_activations:
        if act_dtype != torch.int8:
            return f"integer activations must be int8 codes; got {act_dtype}"
    elif act_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"activations of dtype {act_dtype} are not supported"
    if group_size and not codebook:
        if group_size & (group_size - 1) or group_size < 32 or group_size > 256:
            return f"group_size {group_size}: the kernel needs a power of two in [32, 256]"
    if m < 1 or n < 1 or k < 1:
        return "empty matrix"
    return None


def _blocks(m, n, k, group, int_a):
    if _interpreting():  # few programs, one K step where possible: the interpreter pays per op and per program
        bm, bn, bk = min(64, max(16, _pow2(m))), min(64, max(16, _pow2(n))), min(256, max(32, _pow2(k)))
    else:
        bm, bn, bk = (64, 64, 64) if m >= 64 else (16, 64, 64)
    if group:
        bk = group
    if int_a:
        bk = max(bk, 32)
    return bm, bn, bk


def check_launch_config(config, *, group, int_a) -> tuple[int, int, int, int, int | None]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` validated against the kernel's constraints (powers of
    two, tiles of at least 16, ``BLOCK_K == group_size`` for per-group weights, ``BLOCK_K >= 32`` for int8
    activations); ``num_stages`` None: Triton's default. Raises ValueError otherwise."""
    bm, bn, bk, warps = (int(v) for v in config[:4])
    stages = int(config[4]) if len(config) > 4 and config[4] is not None else None
    pow2 = all(v >= 1 and v & (v - 1) == 0 for v in (bm, bn, bk, warps))
    if not pow2 or min(bm, bn, bk) < 16 or (group and bk != group) or (int_a and bk < 32) or \
            (stages is not None and not 1 <= stages <= 8):
        raise ValueError(f"quant_gemm launch config {tuple(config)} does not fit this call (group_size={group}, "
                         f"int8 activations={int_a})")
    return bm, bn, bk, warps, stages


def heuristic_config(m, n, k, *, group, int_a) -> tuple[int, int, int, int, None]:
    """The built-in launch configuration (no tuned table): fixed tiles by M, 8 warps, Triton's default stages."""
    return (*_blocks(m, n, k, group, int_a), 8, None)


def launch_key(a, w_scale, *, bits, group_size=None, codebook=None, out_scale=None) -> tuple[str, int | None, bool]:
    """``(variant, group, int8 activations)`` of a call: the tuned-table variant key
    (:func:`optimum_vim_kernels.tuning.gemm_variant`) and the facts the launch configuration depends on."""
    from .tuning import gemm_variant

    group = group_size if w_scale is not None and w_scale.shape[1] > 1 else None
    int_a = not a.is_floating_point()
    variant = gemm_variant(bits=bits, int_activations=int_a, act_dtype_name=str(a.dtype).removeprefix("torch."),
                           group_size=group, vector_dim=codebook.shape[1] if codebook is not None else None,
                           requant=out_scale is not None)
    return variant, group, int_a


def launch_config(m, n, k, *, group, int_a, variant: str, device) -> tuple[int, int, int, int, int | None]:
    """The launch configuration of a call: the tuned entry of this GPU model (``optimum_vim_kernels.tuning``) for
    ``variant`` and ``(n, k)`` at the nearest M bucket when there is one, else :func:`heuristic_config`."""
    if not _interpreting():
        from .tuning import cuda_lookup

        tuned = cuda_lookup(device, "quant_gemm", variant, (n, k), m)
        if tuned is not None:
            try:
                return check_launch_config(tuned, group=group, int_a=int_a)
            except ValueError:
                pass  # an entry of another kernel revision: the heuristics are always valid
    return heuristic_config(m, n, k, group=group, int_a=int_a)


def quant_gemm(
    a, qweight, w_scale, *, bits, in_features, group_size=None, codebook=None, a_scale=None, a_zero=None,
    bias=None, out_dtype=None, out_scale=None, config=None,
):
    """Triton twin of ``reference.quant_gemm_ref``: ``(M, K) x quantized (N, K) -> (M, N)``.

    ``config``: ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps[, num_stages])`` to launch with instead of
    :func:`launch_config`'s choice (the tuner's sweep)."""
    m, k = a.shape
    n = qweight.shape[0]
    int_a = not a.is_floating_point()
    reason = supports_quant_gemm(m=m, n=n, k=k, bits=bits, group_size=group_size, codebook=codebook is not None,
                                 int_activations=int_a, act_dtype=a.dtype,
                                 vector_dim=codebook.shape[1] if codebook is not None else None)
    if reason is not None:
        raise ValueError(f"quant_gemm kernel cannot serve this call: {reason}")
    if k != in_features:
        raise ValueError(f"activations have {k} features, the weight {in_features}")
    if int_a and a_scale is None:
        raise ValueError("integer activations need a_scale")
    out_dtype = out_dtype or (a.dtype if a.is_floating_point() else torch.float32)
    per_group = w_scale is not None and w_scale.shape[1] > 1
    group = group_size if per_group else None
    dev = a.device
    c = torch.empty(m, n, device=dev, dtype=torch.int8 if out_scale is not None else out_dtype)
    dummy = torch.zeros(1, device=dev, dtype=torch.float32)
    ws = w_scale.float().contiguous() if w_scale is not None else dummy
    vec = codebook.shape[1] if codebook is not None else 1
    if codebook is not None and vec & (vec - 1):
        raise ValueError(f"codebook vector_dim must be a power of two; got {vec}")
    variant = launch_key(a, w_scale, bits=bits, group_size=group_size, codebook=codebook, out_scale=out_scale)[0]
    if config is not None:
        bm, bn, bk, warps, stages = check_launch_config(config, group=group, int_a=int_a)
    else:
        bm, bn, bk, warps, stages = launch_config(m, n, k, group=group, int_a=int_a, variant=variant, device=dev)
    # bf16 arithmetic is broken in the interpreter and fp32 dots must be exact (no TF32) to match the reference
    dot_f32 = (not int_a) and (a.dtype == torch.float32 or (a.dtype == torch.bfloat16 and _interpreting()))
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    args = (
        a, qweight, ws, codebook.float().contiguous() if codebook is not None else dummy,
        bias.float().contiguous() if bias is not None else dummy,
        a_scale.float().contiguous() if a_scale is not None else dummy,
        a_zero.to(torch.int32).contiguous() if a_zero is not None else torch.zeros(1, device=dev, dtype=torch.int32),
        out_scale.float().contiguous() if out_scale is not None else dummy, c,
        m, n, k, a.stride(0), a.stride(1), qweight.stride(0), c.stride(0), c.stride(1), ws.shape[1] if ws.dim() == 2 else 1,
        qweight.shape[1],
    )
    meta = dict(
        BITS=bits, VQ=codebook is not None, VEC=vec, GROUP=group or 1, PER_GROUP=per_group, INT_A=int_a,
        HAS_WS=w_scale is not None, HAS_ZERO=a_zero is not None, HAS_BIAS=bias is not None,
        A_PER_ROW=a_scale is not None and a_scale.numel() > 1, REQUANT=out_scale is not None,
        OS_PER_ROW=out_scale is not None and out_scale.numel() > 1, DOT_F32=dot_f32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )
    launch = {"num_warps": warps} if stages is None else {"num_warps": warps, "num_stages": stages}
    if a.is_cuda:
        with torch.cuda.device(a.device):
            _quant_gemm_kernel[grid](*args, **meta, **launch)
    else:
        _quant_gemm_kernel[grid](*args, **meta, **launch)
    return c
