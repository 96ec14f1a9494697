"""CPU kernel family: quantized GEMMs with the semantics of ``reference``, on the fastest exact path of the CPU at hand.

Pure PyTorch (no Triton, no compiler), selected by ``optimum_vim.ops`` dispatch for CPU tensors under
``OPTIMUM_VIM_KERNELS=auto`` (or forced with ``cpu``). The references are written to be obviously right (fp64 integer
products, the weight decoded with generic bit unpacking); these functions compute the same values the fast way.

**Integer activations** (int8 codes: W8A8, W4A8, W2A8, ..., OuroMamba's inliers) run on one of two paths. Both give
results **bit-identical** to ``quant_gemm_ref``, hence to each other, so the choice between them never changes an
output:

* ``int_mm``: ``torch._int_mm`` (int8 x int8 -> int32, oneDNN) against the weight codes as int8 (N, K): 8-bit weights
  as stored, fewer bits unpacked once and cached (1 byte per weight). The activation zero point is subtracted in
  integers through cached weight column sums (``acc - a_zero * colsum(W)``).
* ``sgemm``: the same integer dot products as an fp32 GEMM (the BLAS sgemm the float model uses) over the codes held
  as floats, the zero point folded into the activation codes (``a - a_zero``). Exact: every product is an integer of
  magnitude at most ``amax * wmax`` (``amax = 128 + max|a_zero|``, ``wmax = 2^(bits-1)``), and fp32 holds every
  integer up to 2^24, so any summation order of a K chunk with ``chunk * amax * wmax <= 2^24`` returns the exact sum
  (512 inputs for W8A8 with a zero point, 1024 without, 8192 for 4-bit weights); longer K is cut into such chunks
  whose exact partial sums are added in fp64. Needs IEEE fp32 GEMMs (``torch.get_float32_matmul_precision()`` at its
  default ``"highest"``; with a reduced precision ``auto`` keeps ``int_mm``).

Both end in the reference's epilogue, in its order: ``acc_g * w_scale[:, g]`` summed over the groups in K order, times
``a_scale``, plus bias (then the optional int8 requantization or the output cast).

**Which integer path** (``OPTIMUM_VIM_CPU_GEMM`` = ``auto`` (default) | ``int_mm`` | ``sgemm``, or
:func:`use_gemm_path`): ``auto`` takes ``int_mm`` on x86 CPUs with an int8 dot-product instruction (AVX512-VNNI,
AVX-VNNI or AMX, from :mod:`.cpu_features`; a ``ONEDNN_MAX_CPU_ISA`` cap below VNNI counts as none), where it measured
2.9-8x faster than the fp32 GEMM at Vim's layer shapes. On every other CPU (AVX2-only x86: the int8 GEMM is reported
~25x slower than sgemm on an AMD EPYC, yet measured ~1.7x faster on an Intel core capped at AVX2; ARM) it times both
paths once, on the first call of each (N, K, M bucket, thread count) (M rounded up to a power of two, at most 1024 rows
timed), and
keeps the faster; :func:`gemm_path_choices` lists the decisions.

**Float activations** (weight-only int formats, codebook / VQ weights): the fp32 weight is decoded from the packed
codes on every call (byte lookup tables for 1/2/4-bit codes, a bit-field unpack for 3/5/6/7 bits, the codewords
gathered by index) into a temporary that is freed after the GEMM, which is the reference's own ``a.float() @ w.t()``
on the reference's own values and layout: bit-identical, and nothing but the packed buffers stays resident. The fp32
**decode cache** (the decoded weight kept per layer, 4 bytes per weight, until the packed tensor changes or dies)
saves that decode on every call and is **opt-in**: ``OPTIMUM_VIM_CPU_DECODE_CACHE=1``, :func:`set_decode_cache` or
:func:`use_decode_cache`.

* ``outlier_gemm``: the integer inlier GEMM above plus a GEMM over the fp32 weight columns of the outlier channels
  (only those columns are decoded);
* ``combine_directions``: Vim's direction average, gate and int8 requantization in place on one buffer.

The selective scan's members (``selective_scan``, float and differentiable; ``selective_scan_q``, int8 inputs and the
8-bit state) and ``causal_conv1d`` (inference) are the fused numba kernels of :mod:`optimum_vim_kernels.cpu_scan`,
re-exported here.

Cached values (int8 codes of sub-8-bit A8 weights, weight column sums, opt-in fp32 decodings) are keyed on the packed
tensor (its identity and in-place version counter, so ``load_state_dict`` or any in-place write invalidates them) and
freed with it. :func:`clear_cache` drops every entry; :func:`cache_bytes` reports their size (a model's
``get_memory_footprint()`` includes the entries of its own buffers).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import threading
import time
import weakref

import torch
import torch.nn.functional as F

from .cpu_features import cpu_features
from .cpu_scan import (
    causal_conv1d,
    selective_scan,
    selective_scan_q,
    supports_causal_conv1d,
    supports_selective_scan,
    supports_selective_scan_q,
)
from .reference import (
    check_gemm_args,
    expand_group_scale,
    gemm_epilogue,
    group_bounds,
)
from .tensors import tensor_version

logger = logging.getLogger(__name__)

#: Members compiled by numba: opaque to ``torch.compile``, whose graphs take their PyTorch references instead
OPAQUE_TO_COMPILE = frozenset({"causal_conv1d", "selective_scan", "selective_scan_q"})

# int32 accumulation bound: |a| <= 128, |w| <= 128, plus the zero-point term |a_zero * colsum| <= 256 * 128 * K
MAX_K = 1 << 15
EXACT_FP32 = 1 << 24  # every integer of magnitude <= 2^24 is an fp32 value

GEMM_PATH_ENV = "OPTIMUM_VIM_CPU_GEMM"
GEMM_PATHS = ("int_mm", "sgemm")
DECODE_CACHE_ENV = "OPTIMUM_VIM_CPU_DECODE_CACHE"
TRIAL_ROWS = 1024  # the most activation rows a path-choice timing uses

_cache: dict[tuple, tuple] = {}
_lock = threading.Lock()


def _cached(tensor: torch.Tensor, kind: tuple, build, deps: tuple = ()):
    """``build()`` computed once per (tensor, kind) until ``tensor`` or one of the ``deps`` tensors it is built from
    is replaced, modified in place or freed.

    Under ``torch.compile`` / ``torch.export`` the decoding is traced into the graph instead: an ``id()``-keyed
    lookup would make dynamo guard on each layer's tensor and recompile once per layer until its recompile limit."""
    if torch.compiler.is_compiling():
        return build()
    key = (id(tensor), kind)
    tensors = (tensor, *deps)
    versions = tuple(tensor_version(t) if t is not None else None for t in tensors)
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


def cache_bytes(tensors=None) -> int:
    """Bytes held by the cached weight decodings: all of them, or those built from one of ``tensors`` (e.g. a model's
    buffers). Each storage is counted once, whole (a cached view keeps its full storage alive)."""
    ids = None if tensors is None else {id(t) for t in tensors}
    storages = {}
    for key, (_, _, value) in list(_cache.items()):
        if ids is not None and key[0] not in ids:
            continue
        for t in value if isinstance(value, tuple) else (value,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


# ---------------------------------------------------------------------------------------------------------------
# options: the integer GEMM path and the fp32 decode cache
_forced_path: contextvars.ContextVar[str | None] = contextvars.ContextVar("optimum_vim_cpu_gemm", default=None)
_forced_cache: contextvars.ContextVar[bool | None] = contextvars.ContextVar("optimum_vim_cpu_cache", default=None)
_decode_cache: bool | None = None
_choices: dict[tuple[int, int, int], tuple[str, dict[str, float]]] = {}
_NO_VNNI_CAPS = {"SSE41", "AVX", "AVX2", "AVX512_CORE", "AVX512_MIC", "AVX512_MIC_4OPS"}


@contextlib.contextmanager
def use_gemm_path(path: str | None):
    """Context manager forcing the integer GEMM path (``"int_mm"`` / ``"sgemm"``; ``None`` or ``"auto"``: the
    per-CPU choice) for the calls inside it, over ``$OPTIMUM_VIM_CPU_GEMM``."""
    if path not in (None, "auto", *GEMM_PATHS):
        raise ValueError(f"unknown CPU GEMM path {path!r}; use one of {('auto', *GEMM_PATHS)}")
    token = _forced_path.set(path)
    try:
        yield
    finally:
        _forced_path.reset(token)


def set_decode_cache(enabled: bool | None) -> None:
    """Turns the fp32 decode cache of weight-only / codebook layers on or off for this process (``None``: back to
    ``$OPTIMUM_VIM_CPU_DECODE_CACHE``). Turning it off frees the fp32 decodings already cached."""
    global _decode_cache
    if enabled not in (None, True, False):
        raise TypeError(f"set_decode_cache takes True, False or None; got {enabled!r}")
    _decode_cache = enabled
    if not decode_cache_enabled():
        with _lock:
            for key in [k for k in list(_cache) if k[1][0] == "float"]:  # finalizers may pop entries meanwhile
                _cache.pop(key, None)


@contextlib.contextmanager
def use_decode_cache(enabled: bool = True):
    """Context manager turning the fp32 decode cache on (or off) for the calls inside it, over
    :func:`set_decode_cache` and the environment; what it caches stays cached after the block (until the packed
    tensor changes or dies, :func:`clear_cache`, or ``set_decode_cache(False)``)."""
    token = _forced_cache.set(bool(enabled))
    try:
        yield
    finally:
        _forced_cache.reset(token)


def decode_cache_enabled() -> bool:
    """Whether weight-only / codebook layers keep their decoded fp32 weight (opt-in; default off). Never while
    ``torch.compile`` traces (the graph decodes, and dynamo cannot read the context variable)."""
    if torch.compiler.is_compiling():
        return False
    forced = _forced_cache.get()
    if forced is not None:
        return forced
    if _decode_cache is not None:
        return _decode_cache
    value = os.environ.get(DECODE_CACHE_ENV, "0").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{DECODE_CACHE_ENV}={value!r}; use 1 (cache decoded fp32 weights) or 0 (decode on every call)")


@functools.lru_cache(maxsize=1)
def int8_dot_product() -> bool:
    """Whether ``torch._int_mm`` can use an x86 int8 dot-product instruction here (AVX512-VNNI, AVX-VNNI or AMX, not
    capped away by ``ONEDNN_MAX_CPU_ISA``): then it is known to beat the fp32 GEMM and ``auto`` needs no timing."""
    f = cpu_features()
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if cap in _NO_VNNI_CAPS:
        return False
    return f.avx512_vnni or f.avx_vnni or f.amx


def _inexact_fp32() -> str | None:
    """None when fp32 GEMMs round like IEEE fp32 (the sgemm path is exact), else the setting that prevents it."""
    precision = torch.get_float32_matmul_precision()
    if precision != "highest":
        return f"torch.get_float32_matmul_precision() is {precision!r}"
    onednn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    precision = getattr(onednn, "fp32_precision", "none")
    if precision not in ("none", "ieee"):
        return f"torch.backends.mkldnn.matmul.fp32_precision is {precision!r}"
    return None


def _m_bucket(m: int) -> int:
    return min(1 << max(m - 1, 0).bit_length(), TRIAL_ROWS)


def _best_seconds(fn, repeats: int = 3) -> float:
    fn()  # warm-up: oneDNN / MKL set up their kernels for the shape
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _time_paths(n: int, k: int, rows: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (rows, k), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    return {"int_mm": _best_seconds(lambda: torch._int_mm(a, w.t()).float()),
            "sgemm": _best_seconds(lambda: torch.mm(a.float(), w.float().t()))}


def int_gemm_path(m: int, n: int, k: int) -> str:
    """The integer GEMM path for an (M, K) x (K, N) call: forced (:func:`use_gemm_path`, ``$OPTIMUM_VIM_CPU_GEMM``)
    or chosen for this CPU (module docstring). Under ``torch.compile`` the choice is made while tracing and enters
    the graph as a constant (both paths give the same values)."""
    if torch.compiler.is_compiling():
        return _int_gemm_path_constant(int(m), int(n), int(k))
    return _int_gemm_path(m, n, k)


def _int_gemm_path(m: int, n: int, k: int) -> str:
    forced = _forced_path.get() or os.environ.get(GEMM_PATH_ENV, "auto").strip().lower() or "auto"
    if forced == "int_mm" or (forced == "auto" and int8_dot_product()):
        return "int_mm"
    if forced not in ("auto", "sgemm"):
        raise ValueError(f"{GEMM_PATH_ENV}={forced!r}; use one of {('auto', *GEMM_PATHS)}")
    inexact = _inexact_fp32()
    if forced == "sgemm":
        if inexact:
            raise RuntimeError(f"the sgemm integer path needs IEEE fp32 GEMMs, but {inexact}; call "
                               "torch.set_float32_matmul_precision('highest') or use the int_mm path")
        return forced
    if inexact:
        return "int_mm"
    # per intra-op thread count too: the block-wise engine runs at one thread, inference usually at all cores
    key = (n, k, _m_bucket(m), torch.get_num_threads())
    choice = _choices.get(key)
    if choice is None:
        times = _time_paths(n, k, key[2])
        choice = _choices[key] = (min(times, key=times.get), times)
        logger.info("CPU integer GEMM N=%d K=%d M<=%d, %d threads: int_mm %.0f us, sgemm %.0f us -> %s", n, k,
                    key[2], key[3], times["int_mm"] * 1e6, times["sgemm"] * 1e6, choice[0])
    return choice[0]


_int_gemm_path_constant = torch._dynamo.assume_constant_result(_int_gemm_path)


def gemm_path_choices() -> dict[tuple[int, int, int, int], tuple[str, dict[str, float]]]:
    """The timed choices of ``auto`` so far: ``{(N, K, M bucket, intra-op threads): (path, {path: seconds})}``
    (empty on CPUs where ``auto`` needs no timing)."""
    return dict(_choices)


# ---------------------------------------------------------------------------------------------------------------
# weight decoding
@functools.cache
def _byte_table(bits: int, signed: bool) -> torch.Tensor:
    """(256, 8 // bits): the codes each byte holds, low bits first; signed codes (offset binary, 1 bit: -1 / +1) as
    fp32, unsigned ones (codebook indices) as int32."""
    per = 8 // bits
    byte = torch.arange(256, dtype=torch.int32)[:, None]
    u = (byte >> (torch.arange(per, dtype=torch.int32) * bits)) & ((1 << bits) - 1)
    if not signed:
        return u
    return (u * 2 - 1 if bits == 1 else u - (1 << (bits - 1))).float()


def _unpack_fields(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unsigned codes that straddle bytes (3, 5, 6, 7 bits): every ``bits`` bytes hold 8 codes; int64 (N, count)."""
    n, nbytes = packed.shape
    groups = -(-count // 8)
    p = F.pad(packed, (0, groups * bits - nbytes)) if groups * bits != nbytes else packed
    p = p.reshape(n, groups, bits).to(torch.int64)
    word = (p << (8 * torch.arange(bits, dtype=torch.int64))).sum(-1, keepdim=True)
    codes = (word >> (bits * torch.arange(8, dtype=torch.int64))) & ((1 << bits) - 1)
    return codes.reshape(n, groups * 8)[:, :count]


def _unsigned_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Packed unsigned codes (N, nbytes) -> integer codes (N, count) (a view may pad the rows beyond ``count``)."""
    n = packed.shape[0]
    if bits == 8:
        return packed.int()
    if 8 % bits:
        return _unpack_fields(packed, bits, count)
    codes = _byte_table(bits, False).index_select(0, packed.reshape(-1).int()).reshape(n, -1)
    return codes[:, :count]


def _signed_codes_f32(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Integer weight codes as a contiguous fp32 (N, K) tensor (exact: |code| <= 128)."""
    n = qweight.shape[0]
    if bits == 8:
        if qweight.dtype != torch.int8:
            raise TypeError(f"8-bit weights are stored as int8; got {qweight.dtype}")
        return qweight.float()
    if qweight.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8; got {qweight.dtype}")
    if 8 % bits:
        offset = 1 << (bits - 1)
        return (_unpack_fields(qweight, bits, in_features) - offset).float()
    codes = _byte_table(bits, True).index_select(0, qweight.reshape(-1).int()).reshape(n, -1)
    return codes if codes.shape[1] == in_features else codes[:, :in_features].contiguous()


def decode_weight(qweight, w_scale, bits, in_features, group_size=None, codebook=None) -> torch.Tensor:
    """The fp32 (N, K) weight of a quantized linear: the values and memory layout of
    ``reference.dequantize_weight_ref`` (so a GEMM on it is the reference's GEMM bit for bit), decoded the fast way."""
    n = qweight.shape[0]
    if codebook is not None:
        cb = codebook.float()
        d = cb.shape[1]
        n_vec = -(-in_features // d)
        w = F.embedding(_unsigned_codes(qweight, bits, n_vec), cb).reshape(n, n_vec * d)[:, :in_features]
        return w * w_scale.float() if w_scale is not None else w
    w = _signed_codes_f32(qweight, bits, in_features)
    scale = w_scale.float()
    groups = scale.shape[1]
    if groups == 1:
        return w.mul_(scale)
    if groups * group_size == in_features:
        return w.view(n, groups, group_size).mul_(scale[:, :, None]).view(n, in_features)
    return w.mul_(expand_group_scale(scale, in_features, group_size))


def int8_weight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Integer weight codes as a contiguous int8 (N, K) tensor (cached below 8 bits, 1 byte per weight)."""
    if bits == 8:  # stored as int8 already (decode_int_weight's dtype check, without its int32 copy)
        if qweight.dtype != torch.int8:
            raise TypeError(f"8-bit weights are stored as int8; got {qweight.dtype}")
        return qweight.contiguous()
    return _cached(qweight, ("int8", bits, in_features),
                   lambda: _signed_codes_f32(qweight, bits, in_features).to(torch.int8))


def _colsums(qweight, w8: torch.Tensor, bits: int, bounds: list[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
    """int32 (N,) column sums of each K group of the int8 weight (cached on the packed tensor)."""
    return _cached(qweight, ("colsum", bits, w8.shape[1], tuple(bounds)),
                   lambda: tuple(w8[:, lo:hi].sum(1, dtype=torch.int32) for lo, hi in bounds))


def float_weight(qweight, w_scale, bits, in_features, group_size=None, codebook=None) -> torch.Tensor:
    """The fp32 (N, K) weight of a quantized linear, decoded once and kept (the opt-in decode cache; cached on
    ``qweight``, rebuilt when it, the scale or the codebook changes)."""
    return _cached(qweight, ("float", bits, in_features, group_size),
                   lambda: decode_weight(qweight, w_scale, bits, in_features, group_size, codebook),
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


def _int_mm_groups(a, qweight, w8, bits, bounds, a_zero):
    """Exact integer sums of each K group, ``torch._int_mm`` on int8 codes, as fp32 (M, N) (one group at a time)."""
    colsums = _colsums(qweight, w8, bits, bounds) if a_zero is not None else None
    zero = a_zero.reshape(-1).to(torch.int32) if a_zero is not None else None
    whole = len(bounds) == 1
    for g, (lo, hi) in enumerate(bounds):
        acc = torch._int_mm(a, w8.t()) if whole else torch._int_mm(a[:, lo:hi], w8[:, lo:hi].t())
        if zero is not None:
            if zero.numel() == 1:  # one zero point for every row: a (N,) correction
                acc.sub_(colsums[g] * zero)
            else:
                acc.addr_(zero, colsums[g], alpha=-1)  # acc - a_zero (x) colsum, in place, exact integers
        yield acc.float()  # (a mixed int32 x fp32 product is 5x slower on CPU than converting first)


def _sgemm_groups(a, w8, bounds, a_zero, chunk):
    """The same exact sums as fp32 GEMMs over integer-valued floats (module docstring: K cut into chunks whose sums
    stay within 2^24; partial sums of longer groups added in fp64)."""
    af = a.float()
    if a_zero is not None:
        af.sub_(a_zero.reshape(-1, 1))  # fold the zero point (exact integers)
    for lo, hi in bounds:
        acc = None
        for c0 in range(lo, hi, chunk):
            c1 = min(hi, c0 + chunk)
            part = torch.mm(af[:, c0:c1], w8[:, c0:c1].float().t())
            acc = part if acc is None else acc.double().add_(part)
        yield acc.float()


def _int_gemm(a, qweight, w_scale, bits, in_features, group_size, a_scale, a_zero) -> torch.Tensor:
    """fp32 ``sum_g((a @ W_g^T - a_zero * colsum(W_g)) * w_scale[:, g]) * a_scale`` (the reference's epilogue)."""
    w8 = int8_weight(qweight, bits, in_features)
    bounds = group_bounds(in_features, w_scale.shape[1], group_size)
    path = int_gemm_path(a.shape[0], w8.shape[0], in_features)
    if path == "sgemm":
        # |code - a_zero| <= amax and |w| <= 2^(bits-1) (1 bit: 1): products within amax * wmax
        if torch.compiler.is_compiling():  # no data-dependent bound in a graph: int8-shifted zero points are <= 255
            amax = 128 + (255 if a_zero is not None else 0)
        else:
            amax = 128 + (int(a_zero.abs().max()) if a_zero is not None else 0)
        chunk = EXACT_FP32 // (amax << (bits - 1))
        if chunk < 1:  # absurd zero points: a single product could leave the exact fp32 range
            path = "int_mm"
    a = a.contiguous()
    groups = _sgemm_groups(a, w8, bounds, a_zero, chunk) if path == "sgemm" else \
        _int_mm_groups(a, qweight, w8, bits, bounds, a_zero)
    ws = w_scale.float()
    y = None
    for g, acc in enumerate(groups):
        part = acc.mul_(ws[:, g])
        y = part if y is None else y.add_(part)
    return y.mul_(a_scale.float().reshape(-1, 1))


def _float_weight_for_call(qweight, w_scale, bits, in_features, group_size=None, codebook=None) -> torch.Tensor:
    if decode_cache_enabled():
        return float_weight(qweight, w_scale, bits, in_features, group_size, codebook)
    return decode_weight(qweight, w_scale, bits, in_features, group_size, codebook)


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
    """CPU twin of ``reference.quant_gemm_ref`` (same arguments, bit-identical result; ``a_scale`` and ``a_zero`` may
    also hold one value for every row)."""
    out_dtype = check_gemm_args(a, in_features, codebook, a_scale, out_dtype)
    if not a.is_floating_point():
        if a.dtype != torch.int8:
            raise TypeError(f"integer activations must be int8 codes; got {a.dtype}")
        y = _int_gemm(a, qweight, w_scale, bits, in_features, group_size, a_scale, a_zero)
    else:
        w = _float_weight_for_call(qweight, w_scale, bits, in_features, group_size, codebook)
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
    """CPU twin of ``reference.outlier_gemm_ref``: the integer inlier GEMM plus the GEMM over the fp32 weight columns
    of the outlier channels (decoded alone: the same values as the reference's full decode, gathered)."""
    y = _int_gemm(a_codes, qweight, w_scale, bits, in_features, None, a_scale, None)
    if outlier_idx.numel():
        cols = outlier_idx.long()
        if decode_cache_enabled():
            w = float_weight(qweight, w_scale, bits, in_features)[:, cols]
        else:
            w = int8_weight(qweight, bits, in_features)[:, cols].float().mul_(w_scale.float())
        y = y + outlier_values.float() @ w.t()
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
    "cache_bytes", "causal_conv1d", "clear_cache", "combine_directions", "decode_cache_enabled", "decode_weight",
    "float_weight", "gemm_path_choices", "int8_dot_product", "int8_weight", "int_gemm_path", "outlier_gemm",
    "quant_gemm", "selective_scan", "selective_scan_q", "set_decode_cache", "supports_causal_conv1d",
    "supports_combine_directions", "supports_outlier_gemm", "supports_quant_gemm", "supports_selective_scan",
    "supports_selective_scan_q", "use_decode_cache", "use_gemm_path",
]
