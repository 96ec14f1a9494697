"""CPU kernel family: integer GEMMs and cached weight decoding with the semantics of ``reference``.

Pure PyTorch (no Triton), selected by ``optimum_vim.ops`` dispatch for CPU tensors under ``OPTIMUM_VIM_KERNELS=auto``
(or forced with ``cpu``). The references are written to be obviously right (fp64 integer products, the weight decoded
on every call); these functions compute the same values the fast way:

* **int8 activations x integer weights** (W8A8, W4A8, W2A8, ...): ``torch._int_mm`` (int8 x int8 -> int32, exact)
  against the weight codes unpacked once to int8 (N, K) and cached; the activation zero point is subtracted in
  integers through the cached weight column sums (``acc - a_zero * colsum(W)``), never by materialising float
  activations. The epilogue is the reference's, in its order (``acc * w_scale`` per group, summed in K order, times
  ``a_scale``, plus bias), so results are **bit-identical** to ``quant_gemm_ref`` (the integer sums are exact in both,
  and int32 -> fp32 rounds like fp64 -> fp32).
* **float activations** (weight-only int formats, codebook / VQ weights): the fp32 weight is decoded once and cached,
  then one fp32 GEMM, the reference's own ``a.float() @ w.t()`` (bit-identical). This trades memory for speed: the
  cache holds 4 bytes per weight (fp32) for each such layer, on top of its packed buffer.
* ``outlier_gemm``: the int8 inlier GEMM above plus the gathered fp32 outlier columns of the cached weight;
* ``combine_directions``: Vim's direction average, gate and int8 requantization in place on one buffer.

The selective scan has no member here: ``optimum_vim.ops`` runs int8-input scans through its chunked PyTorch scan
on CPU, and scans with a quantized state through the reference loop.

Cached decodings are keyed on the packed tensor (its identity and in-place version counter, so ``load_state_dict``
or any in-place write invalidates them) and freed with it. :func:`clear_cache` drops every entry;
:func:`cache_bytes` reports their size.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F

from .reference import check_gemm_args, decode_int_weight, dequantize_weight_ref, gemm_epilogue, group_bounds

# int32 accumulation bound: |a| <= 128, |w| <= 128, plus the zero-point term |a_zero * colsum| <= 256 * 128 * K
MAX_K = 1 << 15

_cache: dict[tuple, tuple] = {}
_lock = threading.Lock()


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter; they cannot be written outside inference mode
        return -1


def _cached(tensor: torch.Tensor, kind: tuple, build, deps: tuple = ()):
    """``build()`` computed once per (tensor, kind) until ``tensor`` or one of the ``deps`` tensors it is built from
    is replaced, modified in place or freed.

    Under ``torch.compile`` / ``torch.export`` the decoding is traced into the graph instead: an ``id()``-keyed
    lookup would make dynamo guard on each layer's tensor and recompile once per layer until its recompile limit."""
    if torch.compiler.is_compiling():
        return build()
    key = (id(tensor), kind)
    tensors = (tensor, *deps)
    versions = tuple(_version(t) if t is not None else None for t in tensors)
    entry = _cache.get(key)
    if entry is not None and entry[1] == versions and all(
            (r() if r is not None else None) is t for r, t in zip(entry[0], tensors)):
        return entry[2]
    value = build()
    with _lock:
        fresh = key not in _cache
        _cache[key] = (tuple(weakref.ref(t) if t is not None else None for t in tensors), versions, value)
    if fresh:
        weakref.finalize(tensor, _cache.pop, key, None)
    return value


def clear_cache() -> None:
    """Drops every cached weight decoding (they are rebuilt on the next call)."""
    with _lock:
        _cache.clear()


def cache_bytes() -> int:
    """Bytes held by the cached weight decodings."""
    total = 0
    for *_, value in list(_cache.values()):
        for t in value if isinstance(value, tuple) else (value,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def int8_weight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Integer weight codes as a contiguous int8 (N, K) tensor (cached)."""
    if bits == 8:  # stored as int8 already (decode_int_weight's dtype check, without its int32 copy)
        if qweight.dtype != torch.int8:
            raise TypeError(f"8-bit weights are stored as int8; got {qweight.dtype}")
        return qweight.contiguous()
    return _cached(qweight, ("int8", bits, in_features),
                   lambda: decode_int_weight(qweight, bits, in_features).to(torch.int8).contiguous())


def _colsums(w8: torch.Tensor, bounds: list[tuple[int, int]]) -> list[torch.Tensor]:
    """int32 (N,) column sums of each K group of the int8 weight (cached)."""
    return _cached(w8, ("colsum", tuple(bounds)),
                   lambda: tuple(w8[:, lo:hi].sum(1, dtype=torch.int32) for lo, hi in bounds))


def float_weight(qweight, w_scale, bits, in_features, group_size=None, codebook=None) -> torch.Tensor:
    """The fp32 (N, K) weight of a quantized linear, decoded once (cached on ``qweight``, rebuilt when it, the scale
    or the codebook changes)."""
    # the reference's own decoding, layout included, so that the GEMM below is the reference's bit for bit
    return _cached(qweight, ("float", bits, in_features, group_size),
                   lambda: dequantize_weight_ref(qweight, w_scale, bits, in_features, group_size, codebook),
                   deps=(w_scale, codebook))


# ---------------------------------------------------------------------------------------------------------------
# GEMM family
def supports_quant_gemm(*, m, n, k, bits, group_size=None, codebook=False, int_activations=False,
                        act_dtype=torch.float32, vector_dim=None) -> str | None:
    """None when :func:`quant_gemm` serves these arguments, else why not (the caller uses the reference)."""
    if m < 1 or n < 1 or k < 1:
        return "empty matrix"
    if int_activations:
        if codebook:
            return "codebook weights take float activations"
        if act_dtype != torch.int8:
            return f"integer activations must be int8 codes; got {act_dtype}"
        if k > MAX_K:
            return f"K = {k} could overflow the int32 accumulator (CPU integer GEMM: K <= {MAX_K})"
        return None
    if act_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"activations of dtype {act_dtype} are not supported"
    return None


def _int_gemm(a, qweight, w_scale, bits, in_features, group_size, a_scale, a_zero) -> torch.Tensor:
    """fp32 ``sum_g((a @ W_g^T - a_zero * colsum(W_g)) * w_scale[:, g]) * a_scale`` (the reference's epilogue)."""
    w8 = int8_weight(qweight, bits, in_features)
    bounds = group_bounds(in_features, w_scale.shape[1], group_size)
    a = a.contiguous()
    colsums = _colsums(w8, bounds) if a_zero is not None else None
    zero = a_zero.to(torch.int32).reshape(-1) if a_zero is not None else None
    ws = w_scale.float()
    y = None
    for g, (lo, hi) in enumerate(bounds):
        if len(bounds) == 1:
            acc = torch._int_mm(a, w8.t())
        else:
            acc = torch._int_mm(a[:, lo:hi].contiguous(), w8[:, lo:hi].t())
        if zero is not None:
            acc.addr_(zero, colsums[g], alpha=-1)  # acc - a_zero (x) colsum, in place, exact integers
        part = acc.float().mul_(ws[:, g])  # (a mixed int32 x fp32 product is 5x slower on CPU)
        y = part if y is None else y.add_(part)
    return y.mul_(a_scale.float().reshape(-1, 1))


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
    out_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """CPU twin of ``reference.quant_gemm_ref`` (same arguments, bit-identical result)."""
    out_dtype = check_gemm_args(a, in_features, codebook, a_scale, out_dtype)
    if not a.is_floating_point():
        if a.dtype != torch.int8:
            raise TypeError(f"integer activations must be int8 codes; got {a.dtype}")
        y = _int_gemm(a, qweight, w_scale, bits, in_features, group_size, a_scale, a_zero)
    else:
        w = float_weight(qweight, w_scale, bits, in_features, group_size, codebook)
        y = a.float() @ w.t()
    return gemm_epilogue(y, bias, out_scale, out_dtype)


def supports_outlier_gemm(*, m, n, k, bits, num_outliers) -> str | None:
    """None when :func:`outlier_gemm` serves these arguments, else the reason."""
    if m < 1 or n < 1 or k < 1:
        return "empty matrix"
    if k > MAX_K:
        return f"K = {k} could overflow the int32 accumulator (CPU integer GEMM: K <= {MAX_K})"
    return None


def outlier_gemm(a_codes, a_scale, qweight, w_scale, outlier_idx, outlier_values, *, bits, in_features, bias=None,
                 out_dtype=torch.float32) -> torch.Tensor:
    """CPU twin of ``reference.outlier_gemm_ref``: the int8 inlier GEMM plus the gathered fp32 outlier GEMM."""
    y = _int_gemm(a_codes, qweight, w_scale, bits, in_features, None, a_scale, None)
    if outlier_idx.numel():
        w = float_weight(qweight, w_scale, bits, in_features)
        y = y + outlier_values.float() @ w[:, outlier_idx.long()].t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# ---------------------------------------------------------------------------------------------------------------
# direction combine
def supports_combine_directions(*, shape, out_scale_numel=None, out_zero_numel=None) -> str | None:
    """None when :func:`combine_directions` serves (b, L, E) inputs of ``shape``, else the reason."""
    if len(shape) != 3:
        return f"expects (batch, L, E) inputs; got shape {shape}"
    for name, numel in (("out_scale", out_scale_numel), ("out_zero", out_zero_numel)):
        if numel not in (None, 1, shape[1]):
            return f"{name} must have 1 or L = {shape[1]} entries; got {numel}"
    return None


def combine_directions(y_f, y_b, z, divide=True, out_scale=None, out_dtype=None, qmin=-128, qmax=127, out_zero=None):
    """CPU twin of ``reference.combine_directions_ref`` (bit-identical): the same operations in the same order, in
    place on one fp32 buffer, so the int8 codes for out_proj come out of a single activation-sized temporary."""
    y = y_f.float() + y_b.float()
    if divide:
        y.div_(2)
    if z is not None:
        y.mul_(F.silu(z.float()))
    if out_scale is None:
        return y.to(out_dtype or y_f.dtype)
    y.div_(out_scale.float().reshape(1, -1, 1)).round_()
    if out_zero is not None:
        y.add_(out_zero.float().reshape(1, -1, 1))
    return y.clamp_(qmin, qmax).to(torch.int8)


__all__ = [
    "cache_bytes", "clear_cache", "combine_directions", "float_weight", "int8_weight", "outlier_gemm", "quant_gemm",
    "supports_combine_directions", "supports_outlier_gemm", "supports_quant_gemm",
]
