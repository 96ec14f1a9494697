"""Fused CPU selective scan (forward and backward) and causal conv1d, compiled with numba.

The PyTorch scan (``optimum_vim.ops.scan``) walks the tokens in Python with a handful of tensor ops per step; here
the whole recurrence of a block of channels runs in one compiled loop with its state in registers / L1, and ``exp``
is a vectorisable polynomial, so the compiler keeps every step in SIMD lanes (one lane per channel).

Work split, fixed by the shapes only (never by the thread count), which makes every result bit-identical whatever
the number of threads:

* a **task** is one batch sample times one block of channels (``FORWARD_BLOCK`` / ``BACKWARD_BLOCK``); every
  (sample, channel) sequence is computed by one thread, step after step in scan order, and its state sum over ``n``
  runs in index order;
* sums across sequences are written per task and reduced afterwards in a fixed order: ``grad_A`` / ``grad_D`` over
  the batch in sample order, ``grad_B`` / ``grad_C`` over the channels in block order (inside a block: 8 interleaved
  partial sums, then a fixed tree);
* the tasks are cut into ``torch.get_num_threads()`` contiguous ranges run by a thread pool (the compiled loops release
  the GIL), so numba's own threading layer is never used: calls from several Python threads at once are safe.

Numerics: fp32 throughout (fp16 / bf16 inputs are upcast, fp64 runs the PyTorch reference); ``exp`` is Cody-Waite
range reduction plus the Cephes polynomial (within 2 ulp of exp on [-87, 88]), exactly 0 below ``e^-87`` (no
denormals); multiply-adds may fuse (FMA), sums are never reordered. Against the PyTorch scan the results differ by float rounding only (the
tests state and check the tolerances). Scans with an 8-bit carried state follow ``selective_scan_q_ref`` exactly:
``h <- clamp(rint(h / s), qmin, qmax) * s`` after each step with ``s = h_scale[t] * h_channel_scale[e]``, the
output of that step read from the unquantized state.

Compiled code is cached on disk (numba ``cache=True``, next to this file or in numba's user cache directory when
that is read-only); the first call in a fresh environment compiles (a few seconds, reported by ``benchmarks/scan.py``).
Without numba :func:`supports_selective_scan` says so (one WARNING naming the package to install) and
``optimum_vim.ops`` runs the PyTorch scan.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading

import numpy as np
import torch

from .reference import save_scan_inputs, saved_scan_inputs

logger = logging.getLogger(__name__)

FORWARD_BLOCK = 64
"""Channels per forward task (the SIMD lanes that walk the tokens together)."""
BACKWARD_BLOCK = 32
"""Channels per backward task, a multiple of 8 (the lane-sum width); its recomputed states, (L, N, 32) fp32, stay
in the core's L2 cache (400 KB at Vim-T's 197 tokens and 16 states)."""

_LANES = 8
_MIN_PARALLEL_WORK = 1 << 16  # state updates (b * L * E * N) below which one thread does the whole call

try:  # numba is a dependency; a broken or missing install degrades to the PyTorch scan
    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic
except Exception as _err:  # noqa: BLE001 - any import failure (missing, ABI mismatch) means "not available"
    numba = None
    _IMPORT_ERROR = f"{type(_err).__name__}: {_err}"
else:
    _IMPORT_ERROR = None

_warned = False


def numba_available() -> bool:
    return numba is not None


def _unavailable_reason() -> str | None:
    global _warned
    if _IMPORT_ERROR is None:
        return None
    reason = f"numba is not importable ({_IMPORT_ERROR}); install it with `pip install numba`"
    if not _warned:
        _warned = True
        logger.warning("fused CPU selective scan unavailable, the (slower) PyTorch scan runs instead: %s", reason)
    return reason


# ---------------------------------------------------------------------------------------------------------------
# compiled kernels
if numba is not None:
    _f32 = np.float32
    _ZERO, _ONE, _HALF = _f32(0.0), _f32(1.0), _f32(0.5)
    _EXP_LO, _EXP_HI, _EXP_ZERO_BELOW = _f32(-87.0), _f32(88.5), _f32(-87.0)
    _LOG2E = _f32(1.44269504088896341)
    _LN2_HI, _LN2_LO = _f32(0.693359375), _f32(-2.12194440e-4)
    # minimax polynomial of (exp(r) - 1 - r) / r^2 on |r| <= ln2 / 2 (the Cephes expf coefficients)
    _P0, _P1, _P2 = _f32(1.9875691500e-4), _f32(1.3981999507e-3), _f32(8.3334519073e-3)
    _P3, _P4, _P5 = _f32(4.1665795894e-2), _f32(1.6666665459e-1), _f32(5.0000001201e-1)
    _INF = _f32(np.inf)
    # fused multiply-adds where the compiler finds them (no reassociation: every sum keeps its written order)
    _FASTMATH = {"contract"}

    @intrinsic
    def _pow2(typingctx, k):
        """``2 ** k`` for an integral float32 ``k`` in [-126, 127], written straight into the exponent bits."""
        if k != types.float32:
            return None

        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            biased = builder.add(builder.fptosi(args[0], i32), ir.Constant(i32, 127))
            return builder.bitcast(builder.shl(biased, ir.Constant(i32, 23)), ir.FloatType())

        return types.float32(types.float32), codegen

    @intrinsic
    def _wide_vectors(typingctx):
        """Marks the function being compiled with LLVM's ``"prefer-vector-width"="512"``: on AVX-512 CPUs the loop
        vectoriser then fills 16 fp32 lanes instead of stopping at 8 (2x on this scan); elsewhere it changes nothing
        (the width is capped by the target's registers). Per function, so no other numba code is affected."""

        def codegen(context, builder, signature, args):
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')  # string attribute, not in _known
            return context.get_dummy_value()

        return types.none(), codegen

    @numba.njit(inline="always", fastmath=_FASTMATH)
    def _exp(x):
        """float32 ``exp``, branch-free (vectorises): NaN stays NaN, 0 below e^-87, inf above e^88.5."""
        xc = _EXP_LO if x < _EXP_LO else x
        xc = _EXP_HI if xc > _EXP_HI else xc
        k = np.floor(xc * _LOG2E + _HALF)
        r = xc - k * _LN2_HI
        r = r - k * _LN2_LO
        p = _P0 * r + _P1
        p = p * r + _P2
        p = p * r + _P3
        p = p * r + _P4
        p = p * r + _P5
        e = (p * r * r + r + _ONE) * _pow2(k)
        e = _ZERO if x < _EXP_ZERO_BELOW else e
        return _INF if x > _EXP_HI else e

    @numba.njit(inline="always", fastmath=_FASTMATH)
    def _silu(z):
        return z / (_ONE + _exp(-z))

    @numba.njit(inline="always")
    def _lane_sum(row, acc):
        """Sum of ``row`` (length a multiple of ``_LANES``) in a fixed order: 8 interleaved partial sums, then a tree."""
        for k in range(_LANES):
            acc[k] = row[k]
        for j in range(_LANES, row.shape[0], _LANES):
            for k in range(_LANES):
                acc[k] += row[j + k]
        return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))

    @numba.njit(inline="always", fastmath=_FASTMATH)
    def _forward_task(b, e0, w, reverse, has_d, has_z, quant, u, u_s, dl, dl_s, dl_z, Bm, B_s, Cm, C_s, At, D, z,
                      h_s, h_cs, h_min, h_max, y, h, dtv, dtu, uv, yv):
        """One task: channels ``[e0, e0 + w)`` of sample ``b``, every step in scan order (inlined twice, so that
        full blocks run with a constant ``w``)."""
        n_state = Bm.shape[2]
        length = u.shape[1]
        h[:, :] = _ZERO
        for i in range(length):
            t = length - 1 - i if reverse else i
            su, sd, zd = u_s[t], dl_s[t], dl_z[t]
            u_row, d_row = u[b, t, e0:e0 + w], dl[b, t, e0:e0 + w]
            for j in range(w):
                d = (_f32(d_row[j]) - zd) * sd
                x = _f32(u_row[j]) * su
                dtv[j] = d
                uv[j] = x
                dtu[j] = d * x
                yv[j] = _ZERO
            for n in range(n_state):
                bn = _f32(Bm[b, t, n]) * B_s[t]
                cn = _f32(Cm[b, t, n]) * C_s[t]
                a_row, h_row = At[n, e0:e0 + w], h[n]
                for j in range(w):
                    hn = _exp(dtv[j] * a_row[j]) * h_row[j] + dtu[j] * bn
                    h_row[j] = hn
                    yv[j] += hn * cn
            if quant:
                st, cs_row = h_s[t], h_cs[e0:e0 + w]
                for n in range(n_state):
                    h_row = h[n]
                    for j in range(w):
                        s = st * cs_row[j]
                        q = np.rint(h_row[j] / s)
                        q = h_min if q < h_min else q
                        q = h_max if q > h_max else q
                        h_row[j] = q * s
            if has_d:
                d_w = D[e0:e0 + w]
                for j in range(w):
                    yv[j] += uv[j] * d_w[j]
            if has_z:
                z_row = z[b, t, e0:e0 + w]
                for j in range(w):
                    yv[j] *= _silu(z_row[j])
            y_row = y[b, t, e0:e0 + w]
            for j in range(w):
                y_row[j] = yv[j]

    @numba.njit(nogil=True, cache=True, boundscheck=False, fastmath=_FASTMATH)
    def _forward_tasks(task0, task1, u, u_s, dl, dl_s, dl_z, Bm, B_s, Cm, C_s, At, D, z, flags, h_s, h_cs,
                       h_min, h_max, y):
        """Forward of tasks ``[task0, task1)`` (task = sample * blocks + block of ``FORWARD_BLOCK`` channels) into
        ``y`` (b, L, E) fp32.

        u, dl: (b, L, E) and Bm, Cm: (b, L, N), float32 values or int8 codes; ``*_s`` (L,) scales and ``dl_z`` (L,)
        zero points (ones / zeros for float inputs); At (N, E) = A transposed; D (E,); z (b, L, E) or (1, 1, 1);
        h_s (L,), h_cs (E,) state scales. ``flags``: reverse, has_D, has_z, quantize_state."""
        _wide_vectors()
        reverse, has_d, has_z, quant = flags[0], flags[1], flags[2], flags[3]
        channels = u.shape[2]
        blocks = (channels + FORWARD_BLOCK - 1) // FORWARD_BLOCK
        h = np.empty((Bm.shape[2], FORWARD_BLOCK), dtype=np.float32)
        dtv = np.empty(FORWARD_BLOCK, dtype=np.float32)
        dtu = np.empty(FORWARD_BLOCK, dtype=np.float32)
        uv = np.empty(FORWARD_BLOCK, dtype=np.float32)
        yv = np.empty(FORWARD_BLOCK, dtype=np.float32)
        for task in range(task0, task1):
            b = task // blocks
            e0 = (task % blocks) * FORWARD_BLOCK
            if channels - e0 >= FORWARD_BLOCK:
                _forward_task(b, e0, FORWARD_BLOCK, reverse, has_d, has_z, quant, u, u_s, dl, dl_s, dl_z, Bm, B_s,
                              Cm, C_s, At, D, z, h_s, h_cs, h_min, h_max, y, h, dtv, dtu, uv, yv)
            else:
                _forward_task(b, e0, channels - e0, reverse, has_d, has_z, quant, u, u_s, dl, dl_s, dl_z, Bm, B_s,
                              Cm, C_s, At, D, z, h_s, h_cs, h_min, h_max, y, h, dtv, dtu, uv, yv)

    @numba.njit(nogil=True, cache=True, boundscheck=False, fastmath=_FASTMATH)
    def _backward_tasks(task0, task1, u, dl, Bm, Cm, At, D, z, g, flags, gu, gdl, gz, gB_part, gC_part, gA_part,
                        gD_part):
        """Backward of tasks ``[task0, task1)`` (task = sample * blocks + block of ``BACKWARD_BLOCK`` channels):
        recomputes the task's states, then walks the steps back.

        Writes gu, gdl, gz (b, L, E) for the task's channels, its channel-block partials of grad B / C into
        ``gB_part`` / ``gC_part`` (b, blocks, L, N), its per-sample partials of grad A / D into ``gA_part`` (b, N, E)
        / ``gD_part`` (b, E). ``flags``: reverse, has_D, has_z."""
        _wide_vectors()
        reverse, has_d, has_z = flags[0], flags[1], flags[2]
        _, length, channels = u.shape
        n_state = Bm.shape[2]
        blocks = (channels + BACKWARD_BLOCK - 1) // BACKWARD_BLOCK
        hist = np.empty((length, n_state, BACKWARD_BLOCK), dtype=np.float32)  # state after each step, scan order
        ybuf = np.empty((length, BACKWARD_BLOCK), dtype=np.float32)
        gs = np.empty((n_state, BACKWARD_BLOCK), dtype=np.float32)  # d loss / d h of the step being walked
        da_next = np.empty((n_state, BACKWARD_BLOCK), dtype=np.float32)
        prod_b = np.empty((n_state, BACKWARD_BLOCK), dtype=np.float32)
        prod_c = np.empty((n_state, BACKWARD_BLOCK), dtype=np.float32)
        no_state = np.zeros((n_state, BACKWARD_BLOCK), dtype=np.float32)  # the state before the first step
        ga = np.empty((n_state, BACKWARD_BLOCK), dtype=np.float32)
        gd = np.empty(BACKWARD_BLOCK, dtype=np.float32)
        gy = np.empty(BACKWARD_BLOCK, dtype=np.float32)
        dtv = np.empty(BACKWARD_BLOCK, dtype=np.float32)
        dtu = np.empty(BACKWARD_BLOCK, dtype=np.float32)
        g_dtu = np.empty(BACKWARD_BLOCK, dtype=np.float32)
        g_dta = np.empty(BACKWARD_BLOCK, dtype=np.float32)
        acc = np.empty(_LANES, dtype=np.float32)
        for task in range(task0, task1):
            b = task // blocks
            blk = task % blocks
            e0 = blk * BACKWARD_BLOCK
            w = min(BACKWARD_BLOCK, channels - e0)
            prod_b[:, :] = _ZERO  # lanes past the last channel stay 0 in the lane sums
            prod_c[:, :] = _ZERO
            d_w = D[e0:e0 + w]
            # forward recompute: the state after every step
            for i in range(length):
                t = length - 1 - i if reverse else i
                u_row, d_row = u[b, t, e0:e0 + w], dl[b, t, e0:e0 + w]
                y_i = ybuf[i]
                for j in range(w):
                    dtv[j] = d_row[j]
                    dtu[j] = d_row[j] * u_row[j]
                    y_i[j] = _ZERO
                prev = hist[i - 1] if i > 0 else no_state
                for n in range(n_state):
                    bn, cn = Bm[b, t, n], Cm[b, t, n]
                    a_row, p_row, h_row = At[n, e0:e0 + w], prev[n], hist[i, n]
                    for j in range(w):
                        hn = _exp(dtv[j] * a_row[j]) * p_row[j] + dtu[j] * bn
                        h_row[j] = hn
                        y_i[j] += hn * cn
            # backward walk, last step of the scan first
            gs[:, :] = _ZERO
            da_next[:, :] = _ZERO
            ga[:, :] = _ZERO
            gd[:] = _ZERO
            for i in range(length - 1, -1, -1):
                t = length - 1 - i if reverse else i
                u_row, d_row, g_row = u[b, t, e0:e0 + w], dl[b, t, e0:e0 + w], g[b, t, e0:e0 + w]
                for j in range(w):
                    dtv[j] = d_row[j]
                    dtu[j] = d_row[j] * u_row[j]
                    gy[j] = g_row[j]
                    g_dtu[j] = _ZERO
                    g_dta[j] = _ZERO
                if has_z:
                    z_row, gz_row, y_i = z[b, t, e0:e0 + w], gz[b, t, e0:e0 + w], ybuf[i]
                    for j in range(w):
                        zz = z_row[j]
                        sig = _ONE / (_ONE + _exp(-zz))
                        yfull = y_i[j] + u_row[j] * d_w[j] if has_d else y_i[j]
                        gz_row[j] = gy[j] * yfull * sig * (_ONE + zz * (_ONE - sig))
                        gy[j] = gy[j] * (zz * sig)
                for j in range(w):
                    gd[j] += gy[j] * u_row[j]
                prev = hist[i - 1] if i > 0 else no_state  # the first step has no predecessor: no A / dt term
                for n in range(n_state):
                    bn, cn = Bm[b, t, n], Cm[b, t, n]
                    a_row, p_row, h_row = At[n, e0:e0 + w], prev[n], hist[i, n]
                    gs_row, dn_row, ga_row, pb_row, pc_row = gs[n], da_next[n], ga[n], prod_b[n], prod_c[n]
                    for j in range(w):
                        s = gy[j] * cn + dn_row[j] * gs_row[j]
                        gs_row[j] = s
                        pc_row[j] = gy[j] * h_row[j]
                        pb_row[j] = s * dtu[j]
                        g_dtu[j] += s * bn
                        da = _exp(dtv[j] * a_row[j])
                        dn_row[j] = da
                        tmp = s * p_row[j] * da
                        ga_row[j] += tmp * dtv[j]
                        g_dta[j] += tmp * a_row[j]
                    gB_part[b, blk, t, n] = _lane_sum(pb_row, acc)
                    gC_part[b, blk, t, n] = _lane_sum(pc_row, acc)
                gu_row, gdl_row = gu[b, t, e0:e0 + w], gdl[b, t, e0:e0 + w]
                for j in range(w):
                    gu_row[j] = g_dtu[j] * dtv[j] + (gy[j] * d_w[j] if has_d else _ZERO)
                    gdl_row[j] = g_dta[j] + g_dtu[j] * u_row[j]
            for n in range(n_state):
                ga_out, ga_row = gA_part[b, n, e0:e0 + w], ga[n]
                for j in range(w):
                    ga_out[j] = ga_row[j]
            gd_out = gD_part[b, e0:e0 + w]
            for j in range(w):
                gd_out[j] = gd[j]

    @numba.njit(nogil=True, cache=True, boundscheck=False, fastmath=_FASTMATH)
    def _conv_tasks(task0, task1, x, w, bias, reverse, out):
        """Depthwise causal (``reverse``: anti-causal) conv of tasks ``[task0, task1)`` (task = sample * blocks +
        block of ``FORWARD_BLOCK`` channels): ``out[t] = bias + sum_k w[:, k] * x[t - (K-1) + k]`` (reverse:
        ``x[t + (K-1) - k]``), zero outside the sequence, taps added in k order. x, out: (b, L, E); w: (K, E)."""
        _wide_vectors()
        _, length, channels = x.shape
        taps = w.shape[0]
        blocks = (channels + FORWARD_BLOCK - 1) // FORWARD_BLOCK
        for task in range(task0, task1):
            b = task // blocks
            e0 = (task % blocks) * FORWARD_BLOCK
            e1 = min(channels, e0 + FORWARD_BLOCK)
            b_row = bias[e0:e1]
            for t in range(length):
                o_row = out[b, t, e0:e1]
                first = t - (taps - 1)  # the oldest token a causal tap reads
                inside = first >= 0 if not reverse else t + taps - 1 < length
                if taps == 4 and inside:  # Vim's d_conv: all taps in one pass over the row
                    if reverse:
                        r0, r1, r2, r3 = x[b, t + 3, e0:e1], x[b, t + 2, e0:e1], x[b, t + 1, e0:e1], x[b, t, e0:e1]
                    else:
                        r0, r1, r2, r3 = x[b, first, e0:e1], x[b, first + 1, e0:e1], x[b, first + 2, e0:e1], \
                            x[b, t, e0:e1]
                    w0, w1, w2, w3 = w[0, e0:e1], w[1, e0:e1], w[2, e0:e1], w[3, e0:e1]
                    for j in range(e1 - e0):
                        o_row[j] = (((b_row[j] + r0[j] * w0[j]) + r1[j] * w1[j]) + r2[j] * w2[j]) + r3[j] * w3[j]
                    continue
                for j in range(e1 - e0):
                    o_row[j] = b_row[j]
                for k in range(taps):
                    src = t + (taps - 1) - k if reverse else t - (taps - 1) + k
                    if 0 <= src < length:
                        x_row, w_row = x[b, src, e0:e1], w[k, e0:e1]
                        for j in range(e1 - e0):
                            o_row[j] += x_row[j] * w_row[j]

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def _sum_leading(x, out):
        """``out = x[0] + x[1] + ...`` over the leading axis, in index order (x: (k, m), out: (m,))."""
        out[:] = x[0]
        for i in range(1, x.shape[0]):
            for j in range(x.shape[1]):
                out[j] += x[i, j]

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def _sum_blocks(part, out):
        """``out[b] = part[b, 0] + part[b, 1] + ...`` in block order (part: (b, k, m), out: (b, m))."""
        for b in range(part.shape[0]):
            out[b, :] = part[b, 0]
            for k in range(1, part.shape[1]):
                for j in range(part.shape[2]):
                    out[b, j] += part[b, k, j]


# ---------------------------------------------------------------------------------------------------------------
# thread pool
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 1) - 1),
                                                          thread_name_prefix="optimum-vim-scan")
        return _pool


_compiled: set = set()
_compile_lock = threading.Lock()


def _ensure_compiled(kernel, args) -> None:
    """Compiles (or loads from the on-disk cache) ``kernel`` for the types of ``args`` once, serially, so that pool
    threads never compile concurrently."""
    key = (kernel.__name__, tuple((a.dtype.str, a.ndim) if isinstance(a, np.ndarray) else type(a) for a in args))
    if key in _compiled:
        return
    with _compile_lock:
        if key not in _compiled:
            kernel(0, 0, *args)  # an empty task range: compiles, runs nothing
            _compiled.add(key)


def _run_tasks(kernel, tasks: int, work: int, *args) -> None:
    """Runs ``kernel(task0, task1, *args)`` over ``[0, tasks)`` cut into contiguous ranges, one per thread
    (``torch.get_num_threads()``; one range when the work is small). The ranges never change a result."""
    _ensure_compiled(kernel, args)
    threads = min(torch.get_num_threads(), tasks)
    if threads <= 1 or work < _MIN_PARALLEL_WORK:
        kernel(0, tasks, *args)
        return
    bounds = [tasks * k // threads for k in range(threads + 1)]
    pool = _executor()
    futures = [pool.submit(kernel, bounds[k], bounds[k + 1], *args) for k in range(1, threads)]
    kernel(bounds[0], bounds[1], *args)
    for f in futures:
        f.result()


# ---------------------------------------------------------------------------------------------------------------
# launchers
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _f32_np(t: torch.Tensor) -> np.ndarray:
    return _np(t.float()) if t.dtype != torch.float32 else _np(t)


def _per_step(v: torch.Tensor | None, length: int, fill: float) -> np.ndarray:
    """A ``(L,)`` or ``(1,)`` scale / zero point as an fp32 (L,) array (``fill`` when None)."""
    if v is None:
        return np.full(length, fill, dtype=np.float32)
    v = v.detach().float().reshape(-1)
    if v.numel() not in (1, length):
        raise ValueError(f"scan scales and zero points must have 1 or L = {length} entries; got {v.numel()}")
    return _np(v.expand(length))


def _values(x: torch.Tensor, name: str) -> np.ndarray:
    """int8 codes stay int8 (dequantized in the kernel); floats go to fp32."""
    if x.is_floating_point():
        return _f32_np(x)
    if x.dtype != torch.int8:
        raise TypeError(f"integer scan input {name} must hold int8 codes; got {x.dtype}")
    return _np(x)


def _tasks(batch: int, channels: int, block: int) -> int:
    return batch * ((channels + block - 1) // block)


_EMPTY_Z = np.zeros((1, 1, 1), dtype=np.float32)


def _forward(u, delta, A, B, C, D, z, *, reverse=False, u_scale=None, delta_scale=None, delta_zero=None,
             B_scale=None, C_scale=None, delta_bias=None, delta_softplus=False, h_scale=None, h_channel_scale=None,
             h_qmin=-128, h_qmax=127) -> torch.Tensor:
    """fp32 (b, L, E) output of the fused forward (no autograd)."""
    batch, length, channels = u.shape
    n_state = A.shape[1]
    given = {"u": (u, u_scale), "delta": (delta, delta_scale), "B": (B, B_scale), "C": (C, C_scale)}
    for name, (x, scale) in given.items():
        if not x.is_floating_point() and scale is None:
            raise TypeError(f"{name} holds integer codes ({x.dtype}) but no {name}_scale was given")
    if delta_bias is not None or delta_softplus:
        # the reference's order, in PyTorch (one pass over delta; the model's own scans never take this path)
        if not delta.is_floating_point():
            zero = 0.0 if delta_zero is None else delta_zero.float().reshape(1, -1, 1)
            delta = (delta.float() - zero) * delta_scale.float().reshape(1, -1, 1)
            delta_scale = delta_zero = None
        delta = delta.float() + (delta_bias.float() if delta_bias is not None else 0.0)
        delta = torch.nn.functional.softplus(delta) if delta_softplus else delta
    y = torch.empty(batch, length, channels, dtype=torch.float32)
    if y.numel() == 0:
        return y
    quant = h_scale is not None
    flags = np.array([reverse, D is not None, z is not None, quant])
    _run_tasks(
        _forward_tasks, _tasks(batch, channels, FORWARD_BLOCK), batch * length * channels * n_state,
        _values(u, "u"), _per_step(u_scale, length, 1.0),
        _values(delta, "delta"), _per_step(delta_scale, length, 1.0), _per_step(delta_zero, length, 0.0),
        _values(B, "B"), _per_step(B_scale, length, 1.0), _values(C, "C"), _per_step(C_scale, length, 1.0),
        _f32_np(A.t()), _f32_np(D) if D is not None else np.zeros(channels, np.float32),
        _f32_np(z) if z is not None else _EMPTY_Z, flags,
        _per_step(h_scale, length, 1.0) if quant else np.ones(length, np.float32),
        _f32_np(h_channel_scale) if quant and h_channel_scale is not None else np.ones(channels, np.float32),
        np.float32(h_qmin), np.float32(h_qmax), y.numpy(),
    )
    return y


def _backward(grad_out, u, delta, A, B, C, D, z, reverse):
    """Gradients ``(u, delta, A, B, C, D, z)`` in fp32 (D / z entries None when absent)."""
    batch, length, channels = u.shape
    n_state = A.shape[1]
    blocks = (channels + BACKWARD_BLOCK - 1) // BACKWARD_BLOCK
    f32 = dict(dtype=torch.float32)
    gu, gdl = torch.empty(batch, length, channels, **f32), torch.empty(batch, length, channels, **f32)
    gz = torch.empty(batch, length, channels, **f32) if z is not None else torch.zeros(1, 1, 1, **f32)
    gB_part = torch.empty(batch, blocks, length, n_state, **f32)
    gC_part = torch.empty(batch, blocks, length, n_state, **f32)
    gA_part = torch.empty(batch, n_state, channels, **f32)
    gD_part = torch.empty(batch, channels, **f32)
    flags = np.array([reverse, D is not None, z is not None])
    _run_tasks(
        _backward_tasks, _tasks(batch, channels, BACKWARD_BLOCK), batch * length * channels * n_state,
        _f32_np(u), _f32_np(delta), _f32_np(B), _f32_np(C), _f32_np(A.t()),
        _f32_np(D) if D is not None else np.zeros(channels, np.float32), _f32_np(z) if z is not None else _EMPTY_Z,
        _f32_np(grad_out), flags, gu.numpy(), gdl.numpy(), gz.numpy(), gB_part.numpy(), gC_part.numpy(),
        gA_part.numpy(), gD_part.numpy(),
    )
    gB, gC = torch.empty(batch, length * n_state, **f32), torch.empty(batch, length * n_state, **f32)
    _sum_blocks(gB_part.numpy().reshape(batch, blocks, -1), gB.numpy())
    _sum_blocks(gC_part.numpy().reshape(batch, blocks, -1), gC.numpy())
    gA = torch.empty(n_state * channels, **f32)
    _sum_leading(gA_part.numpy().reshape(batch, -1), gA.numpy())
    gD = None
    if D is not None:
        gD = torch.empty(channels, **f32)
        _sum_leading(gD_part.numpy(), gD.numpy())
    return (gu, gdl, gA.reshape(n_state, channels).t().contiguous(), gB.reshape(batch, length, n_state),
            gC.reshape(batch, length, n_state), gD, gz if z is not None else None)


class _FusedScanFn(torch.autograd.Function):
    """Fused forward; the backward recomputes the states per task (nothing but the inputs is kept in between)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, reverse):
        save_scan_inputs(ctx, u, delta, A, B, C, D, z, reverse)
        return _forward(u, delta, A, B, C, D, z, reverse=reverse).to(u.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        u, delta, A, B, C, D, z = saved_scan_inputs(ctx)
        grads = _backward(grad_out, u, delta, A, B, C, D, z, ctx.reverse)
        like = (u, delta, A, B, C, D, z)
        return (*(g.to(t.dtype) if g is not None else None for g, t in zip(grads, like)), None)


# ---------------------------------------------------------------------------------------------------------------
# the CPU family's scan members (re-exported by ``optimum_vim_kernels.cpu``)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports_selective_scan(*, dtype=torch.float32, device=None) -> str | None:
    """None when :func:`selective_scan` serves float inputs of ``dtype`` on ``device``, else why not (the PyTorch
    scan runs)."""
    reason = _unavailable_reason()
    if reason is not None:
        return reason
    if device is not None and torch.device(device).type != "cpu":
        return f"the fused CPU scan takes CPU tensors; got {device}"
    if dtype not in _FLOAT_DTYPES:
        return f"{dtype} inputs run the PyTorch scan (the fused scan computes in fp32)"
    return None


def selective_scan(u, delta, A, B, C, D=None, z=None, reverse=False) -> torch.Tensor:
    """Fused twin of ``optimum_vim.ops.scan.selective_scan_torch`` (same arguments and layout; differentiable in
    u, delta, A, B, C, D, z). Output in ``u.dtype``."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z))
    if needs_grad:
        return _FusedScanFn.apply(u, delta, A, B, C, D, z, bool(reverse))
    return _forward(u, delta, A, B, C, D, z, reverse=bool(reverse)).to(u.dtype)


def supports_selective_scan_q(*, length=None, d_state=None, state_quant=False) -> str | None:
    """None when :func:`selective_scan_q` serves the call (any length, state size and state quantization)."""
    return _unavailable_reason()


def selective_scan_q(u, delta, A, B, C, D=None, z=None, *, u_scale=None, delta_scale=None, delta_zero=None,
                     B_scale=None, C_scale=None, delta_bias=None, delta_softplus=False, reverse=False, h_scale=None,
                     h_channel_scale=None, h_qmin=-128, h_qmax=127, out_dtype=None) -> torch.Tensor:
    """Fused twin of ``reference.selective_scan_q_ref`` (int8 codes or floats for u / delta / B / C, optional
    delta bias + softplus, optional 8-bit carried state), inference only."""
    y = _forward(u, delta, A, B, C, D, z, reverse=bool(reverse), u_scale=u_scale, delta_scale=delta_scale,
                 delta_zero=delta_zero, B_scale=B_scale, C_scale=C_scale, delta_bias=delta_bias,
                 delta_softplus=delta_softplus, h_scale=h_scale, h_channel_scale=h_channel_scale, h_qmin=h_qmin,
                 h_qmax=h_qmax)
    return y.to(out_dtype or torch.float32)


def supports_causal_conv1d(*, dtype=torch.float32, device=None, requires_grad=False) -> str | None:
    """None when :func:`causal_conv1d` serves the call (float inputs on CPU, no autograd), else why not."""
    reason = supports_selective_scan(dtype=dtype, device=device)
    if reason is None and requires_grad:
        reason = "the fused conv has no backward; autograd runs the PyTorch conv"
    return reason


def causal_conv1d(x, weight, bias=None, reverse=False) -> torch.Tensor:
    """Fused twin of ``optimum_vim.ops.conv.causal_conv1d`` (inference): one pass over x instead of a padded copy
    and K multiply-adds over the whole tensor. Output in ``x.dtype``, fp32 accumulation."""
    batch, length, channels = x.shape
    w = weight.reshape(channels, -1)
    out = torch.empty(batch, length, channels, dtype=torch.float32)
    if out.numel():
        _run_tasks(_conv_tasks, _tasks(batch, channels, FORWARD_BLOCK), out.numel() * w.shape[1] // 4, _f32_np(x),
                   _f32_np(w.t()), _f32_np(bias) if bias is not None else np.zeros(channels, np.float32),
                   bool(reverse), out.numpy())
    return out.to(x.dtype)


__all__ = ["BACKWARD_BLOCK", "FORWARD_BLOCK", "causal_conv1d", "supports_causal_conv1d", "numba_available", "selective_scan", "selective_scan_q", "supports_selective_scan",
           "supports_selective_scan_q"]
