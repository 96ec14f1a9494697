"""GPU speed of the quantized Vim forward (Triton kernels) against fp16 with the same scan, side by side in one run;
``--tune`` sweeps the kernels' launch configurations on Vim's shapes and writes the winners for the kernels to read.

Table mode (default) prints, for Vim-T/S/B (official shapes, 24 blocks, random weights: speed does not depend on
values) at each batch:

* end to end: forward time (median of CUDA-event timings after warm-up), speed-up over the fp16 model, peak memory,
  for fp16 (cuBLAS linears + our Triton scan, the float path of ``OPTIMUM_VIM_KERNELS=auto`` without mamba-ssm;
  also fp16 with mamba-ssm's scan when it imports), W8A8 and W4A8 (RTN, per-token static int8 activations, int8
  scan inputs, fused direction combine), W4A16 (g128) and 2-bit VQ (8-bit indices over 4-dim codewords: a random
  codebook, timing only), the quantized ones through ``OPTIMUM_VIM_KERNELS=triton``;
* per kernel: every kernel launch of block 0 is recorded during one forward and replayed alone: its time, achieved
  TFLOP/s (TOP/s for int8) and GB/s, and their fractions of the device's peaks, which the script measures first
  (fp16 and int8 GEMMs of 8192^3 through cuBLAS, a 1 GiB device-to-device copy).

``--json`` / ``--markdown`` write the raw rows and the tables (rewritten after every row, so a run stopped by a
timeout keeps what it measured). Without a GPU the script says so and exits 2; ``--smoke`` runs the same code on CPU
with the Triton interpreter at toy sizes (a check that the script works, no numbers).

``--tune`` times candidate ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` of ``quant_gemm`` for every block
linear of the chosen models (M = 197 x batch at stride 16 and 730 x batch at stride 8, batches 1, 8, 64) in the four
formats, and ``(BLOCK_E, num_warps)`` of ``selective_scan_q`` (float and int8 inputs), the built-in choice among the
candidates; the fastest per bucketed M (batch for the scan) goes to ``--tune-out`` in the layout of
``optimum_vim_kernels/tuning.py``. Commit it as ``kernels/optimum_vim_kernels/tuned/<device>.json`` (the name the
output's ``"file"`` field gives); ``--tune-seconds`` bounds the sweep (what was measured by then is written).

    python benchmarks/gpu_kernels.py --json bench.json --markdown bench.md        # on a CUDA machine
    python benchmarks/gpu_kernels.py --tune --tune-out tuned.json --tune-seconds 150
    python benchmarks/gpu_kernels.py --smoke [--tune]                              # CPU, interpreter, toy sizes

(The file is not called ``kernels.py``: run as a script, ``benchmarks/`` comes first on ``sys.path`` and such a name
would shadow the ``kernels`` package that transformers >= 5.25 imports.)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import statistics
import sys
import time

import torch

MODELS = {"tiny": 192, "small": 384, "base": 768}  # hidden size of Vim-T / S / B (24 blocks, d_state 16)
FORMATS = ("w8a8", "w4a8", "w4a16", "vq2")
TUNE_BATCHES = (1, 8, 64)  # M = tokens x batch: 197 x b at stride 16, 730 x b at stride 8 (27 x 27 patches + 1)


# --------------------------------------------------------------------------------------------------- timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, repeats=20, warmup=5) -> float:
    """Median wall time of ``fn()`` in ms: CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def measure_peaks(device) -> dict:
    """What this device reaches on plain work: fp16 / int8 GEMM throughput (cuBLAS, 8192^3) and copy bandwidth
    (1 GiB device to device, bytes read + written). NaN on the CPU (smoke runs)."""
    if device.type != "cuda":
        return {"fp16_tflops": float("nan"), "int8_tops": float("nan"), "bandwidth_gbs": float("nan")}
    n = 8192

    def gemm_rate(x, mm):
        return 2 * n**3 / time_ms(lambda: mm(x, x), device, 10, 3) / 1e9

    def copy_rate(src):
        dst = torch.empty_like(src)
        return 2 * src.numel() / time_ms(lambda: dst.copy_(src), device, 10, 3) / 1e6

    peaks = {"fp16_tflops": gemm_rate(torch.randn(n, n, device=device, dtype=torch.float16), torch.matmul),
             "int8_tops": gemm_rate(torch.randint(-100, 100, (n, n), device=device, dtype=torch.int8), torch._int_mm),
             "bandwidth_gbs": copy_rate(torch.empty(1 << 30, device=device, dtype=torch.uint8))}
    torch.cuda.empty_cache()
    return peaks


# --------------------------------------------------------------------------------------------------- models
def build(size: str, smoke: bool, stride: int = 16):
    from optimum_vim import VimConfig, VimForImageClassification

    if smoke:
        cfg = VimConfig(hidden_size=32, num_hidden_layers=1, d_state=4, patch_size=8, stride=8, image_size=32)
    else:
        cfg = VimConfig(hidden_size=MODELS[size], num_hidden_layers=24, stride=stride)
    torch.manual_seed(0)
    return VimForImageClassification(cfg).eval()


def quantized(model_fp32, fmt: str, device, dtype, smoke: bool):
    """A copy of the float model in ``fmt`` (w8a8, w4a8, w4a16, vq2), calibrated on ``device``, cast to ``dtype``."""
    from optimum_vim import ViMQuantizationConfig, quantize_model
    from optimum_vim.models.family import get_family
    from optimum_vim.modules import QLinear, build_qmodule, load_qmodule_tensors
    from optimum_vim.primitives import pack_codes

    BLOCK_LINEARS = get_family("vim").default_linear_roles

    model = copy.deepcopy(model_fp32).to(device)
    c = model.config
    calib = torch.randn(8, c.num_channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(0))
    if fmt == "vq2":
        for name, mod in list(model.named_modules()):
            if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in BLOCK_LINEARS:
                k, n = mod.in_features, mod.out_features
                spec = {"type": "linear", "in_features": k, "out_features": n, "bias": mod.bias is not None,
                        "weight": {"format": "vq", "index_bits": 8, "vector_dim": 4, "codebook_size": 256}}
                with torch.device(device):
                    q = build_qmodule(spec)
                g = torch.Generator().manual_seed(0)
                tensors = {"qweight": pack_codes(torch.randint(0, 256, (n, -(-k // 4)), generator=g), 8),
                           "codebook": torch.randn(256, 4, generator=g) * mod.weight.std().item()}
                if mod.bias is not None:
                    tensors["bias"] = mod.bias.detach().float()
                load_qmodule_tensors(q, tensors)
                model.set_submodule(name, q)
        assert any(isinstance(m, QLinear) for m in model.modules())
    else:
        wb, ab, group = {"w8a8": (8, 8, None), "w4a8": (4, 8, None), "w4a16": (4, None, 128)}[fmt]
        if smoke and group:
            group = 32
        args = {"act_granularity": "token", "scan_act_bits": 8} if ab else {}
        cfg = ViMQuantizationConfig(weight_bits=wb, act_bits=ab, weight_group_size=group, recipe_args=args,
                                    calibration_dataset=calib, calibration_batch_size=8, num_calibration_samples=8)
        quantize_model(model, cfg)
    return model.to(dtype=dtype)


# --------------------------------------------------------------------------------------------------- kernels
_LAUNCHERS = (("gemm", "quant_gemm"), ("scan", "selective_scan_q"), ("scan", "combine_directions"),
              ("outlier", "outlier_gemm"))


@contextlib.contextmanager
def record_launches():
    """Records every Triton launcher call and every ``F.linear`` (the fp16 model's cuBLAS GEMMs) made in the body
    as ``(kind, fn, args, kwargs)``; the calls still run."""
    import importlib

    calls: list[tuple] = []
    patched = []

    def recorder(kind, fn):
        def wrapped(*args, **kwargs):
            calls.append((kind, fn, args, kwargs))
            return fn(*args, **kwargs)
        return wrapped

    for module, name in _LAUNCHERS:
        mod = importlib.import_module(f"optimum_vim_kernels.{module}")
        patched.append((mod, name, getattr(mod, name)))
        setattr(mod, name, recorder(name, getattr(mod, name)))
    patched.append((torch.nn.functional, "linear", torch.nn.functional.linear))
    torch.nn.functional.linear = recorder("linear", torch.nn.functional.linear)
    try:
        yield calls
    finally:
        for mod, name, fn in reversed(patched):
            setattr(mod, name, fn)


def _layer_names(config) -> dict[tuple[int, int], str]:
    """(N, K) of each block linear -> its name (distinct for every Vim size)."""
    d, e, r, n = config.hidden_size, config.intermediate_size, config.time_step_rank, config.d_state
    return {(2 * e, d): "in_proj", (r + 2 * n, e): "x_proj", (e, r): "dt_proj", (d, e): "out_proj"}


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _work(kind, args, kwargs, out, names) -> tuple[str, float, float, str]:
    """(name, flops, bytes moved, which compute peak applies) of one recorded launch."""
    if kind in ("quant_gemm", "outlier_gemm", "linear"):
        a = args[0]
        m, k = a.reshape(-1, a.shape[-1]).shape
        w = args[2] if kind == "outlier_gemm" else args[1]
        n = w.shape[0]
        name = names.get((n, k), f"gemm {n}x{k}")
        peak = "int8_tops" if not a.is_floating_point() else "fp16_tflops"
        return name, 2.0 * m * n * k, _nbytes(*args, *kwargs.values(), out), peak
    if kind == "selective_scan_q":
        u, A = args[0], args[2]
        b, length, e = u.shape
        return "scan (one direction)", 7.0 * b * length * e * A.shape[1], _nbytes(*args, *kwargs.values(), out), ""
    return "combine", 0.0, _nbytes(*args, *kwargs.values(), out), ""


def kernel_rows(model, batch, policy, device, dtype, peaks, repeats, warmup) -> list[dict]:
    """Each launch of block 0 during one forward, replayed alone: time and fractions of the measured peaks."""
    from optimum_vim.ops.dispatch import use_kernels

    block = model.vim.layers[0]
    c = model.config
    h = torch.randn(batch, c.sequence_length, c.hidden_size, device=device, dtype=dtype)
    with torch.no_grad(), use_kernels(policy), record_launches() as calls:
        block(h, None)
    names = _layer_names(c)
    grouped: dict[str, list] = {}
    with torch.no_grad():
        for kind, fn, args, kwargs in calls:
            out = fn(*args, **kwargs)
            name, flops, nbytes, peak = _work(kind, args, kwargs, out, names)
            ms = time_ms(lambda fn=fn, args=args, kwargs=kwargs: fn(*args, **kwargs), device, repeats, warmup)
            grouped.setdefault(name, []).append((ms, flops, nbytes, peak))
    rows = []
    for name, runs in grouped.items():
        ms = sum(r[0] for r in runs) / len(runs)
        flops, nbytes, peak = runs[0][1], runs[0][2], runs[0][3]
        tflops = flops / ms / 1e9 if flops else float("nan")
        gbs = nbytes / ms / 1e6
        rows.append({"kernel": name, "launches": len(runs), "ms": ms, "tflops": tflops, "gbs": gbs,
                     "compute_frac": tflops / peaks[peak] if peak else float("nan"),
                     "memory_frac": gbs / peaks["bandwidth_gbs"]})
    return rows


def _float_scans(model, backend: str) -> None:
    """Sets the backend of every float selective scan (``VimSelectiveScan``) of ``model``."""
    from optimum_vim.models.vim.modeling_vim import VimSelectiveScan

    for mod in model.modules():
        if isinstance(mod, VimSelectiveScan):
            mod.backend = backend


# --------------------------------------------------------------------------------------------------- tables
def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.0f}%"


def markdown(result: dict) -> str:
    head = (f"device: {result['device']}; torch {result['torch']}, triton {result['triton']}; "
            f"measured peaks: fp16 {result['peaks']['fp16_tflops']:.0f} TFLOP/s, int8 {result['peaks']['int8_tops']:.0f} "
            f"TOP/s, copy {result['peaks']['bandwidth_gbs']:.0f} GB/s; median of {result['repeats']} after warm-up\n")
    lines = [head, "| model | batch | variant | forward (ms) | speed-up vs fp16 | peak memory (MiB) |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['forward_ms']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['peak_mib']:.0f} |")
    lines += ["", "| model | batch | variant | kernel (block 0) | launches | time (ms) | TFLOP/s | GB/s | "
              "of peak compute | of peak bandwidth |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for k in r["kernels"]:
            tf = "-" if k["tflops"] != k["tflops"] else f"{k['tflops']:.1f}"
            lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {k['kernel']} | {k['launches']} | "
                         f"{k['ms']:.4f} | {tf} | {k['gbs']:.0f} | {_pct(k['compute_frac'])} | "
                         f"{_pct(k['memory_frac'])} |")
    return "\n".join(lines) + "\n"


def _write(path, text):
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)


def _environment(device) -> dict:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter, smoke run)"
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__, "command": " ".join(sys.argv)}


def run_tables(args, device, dtype) -> int:
    from optimum_vim.ops.dispatch import mamba_scan_available, use_kernels

    smoke = args.smoke
    models = args.models[:1] if smoke else args.models
    batches = [1, 2] if smoke else args.batches
    repeats, warmup = (1, 1) if smoke else (args.repeats, 5)
    result = {**_environment(device), "repeats": repeats, "peaks": measure_peaks(device), "rows": []}
    print(f"device: {result['device']}; peaks {result['peaks']}", flush=True)
    fp_label = str(dtype).removeprefix("torch.").replace("float", "fp")
    for size in models:
        base = build(size, smoke)
        # every float scan (the fp model's, and those the weight-only formats keep) runs our Triton scan, so that the
        # speed-ups compare the same scan fusion; mamba-ssm's scan is an extra fp row when it imports
        variants = {fp_label: (base.to(device=device, dtype=dtype), "auto", "triton")}
        if device.type == "cuda" and mamba_scan_available():
            variants[f"{fp_label} (mamba-ssm scan)"] = (variants[fp_label][0], "auto", "mamba")
        for fmt in args.formats:
            variants[fmt.upper()] = (quantized(build(size, smoke), fmt, device, dtype, smoke), "triton", "triton")
        c = base.config
        for b in batches:
            x = torch.randn(b, c.num_channels, c.image_size, c.image_size, device=device, dtype=dtype)
            base_ms = None
            for label, (model, policy, scan_backend) in variants.items():
                _float_scans(model, scan_backend)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                with torch.no_grad(), use_kernels(policy):
                    ms = time_ms(lambda model=model, x=x: model(x), device, repeats, warmup)
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
                base_ms = base_ms or ms
                row = {"model": f"Vim-{size[0].upper()}", "batch": b, "variant": label, "forward_ms": ms,
                       "speedup": base_ms / ms, "peak_mib": peak,
                       "kernels": kernel_rows(model, b, policy, device, dtype, result["peaks"], repeats, warmup)}
                result["rows"].append(row)
                print(f"| {row['model']} | {b} | {label} | {ms:.2f} | {row['speedup']:.2f}x | {peak:.0f} |", flush=True)
                _write(args.json, json.dumps(result, indent=1))
                _write(args.markdown, markdown(result))
        del variants
    print()
    print(markdown(result))
    return 0


# --------------------------------------------------------------------------------------------------- tuning
GEMM_CANDIDATES = (  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_K becomes the group when grouped
    (16, 64, 64, 4, 4), (16, 128, 64, 4, 3), (32, 64, 64, 4, 4), (32, 128, 64, 4, 3), (64, 64, 64, 4, 4),
    (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 256, 64, 8, 3),
)
SCAN_CANDIDATES = tuple((e, w) for e in (8, 16, 32, 64, 128) for w in (1, 2, 4, 8))


def _gemm_operands(fmt, m, n, k, device, dtype, smoke):
    """Random operands of one quant_gemm call in format ``fmt`` (launcher kwargs included)."""
    from optimum_vim_kernels.format import pack_codes, pack_signed

    g = torch.Generator().manual_seed(0)
    if fmt == "vq2":
        vec = 4
        qw = pack_codes(torch.randint(0, 256, (n, -(-k // vec)), generator=g), 8)
        kw = dict(bits=8, in_features=k, codebook=torch.randn(256, vec, generator=g).to(device))
        return torch.randn(m, k, generator=g).to(device, dtype), qw.to(device), None, kw
    bits = 8 if fmt == "w8a8" else 4
    hi = (1 << (bits - 1)) - 1
    codes = torch.randint(-hi, hi + 1, (n, k), generator=g)
    qw = codes.to(torch.int8) if bits == 8 else pack_signed(codes, bits)
    if fmt == "w4a16":
        group = 32 if smoke else 128
        ws = torch.rand(n, -(-k // group), generator=g) + 0.01
        kw = dict(bits=4, in_features=k, group_size=group)
        return torch.randn(m, k, generator=g).to(device, dtype), qw.to(device), ws.to(device), kw
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    kw = dict(bits=bits, in_features=k, a_scale=(torch.rand(m, generator=g) + 0.01).to(device), out_dtype=dtype)
    return a.to(device), qw.to(device), (torch.rand(n, 1, generator=g) + 0.01).to(device), kw


def run_tune(args, device, dtype) -> int:
    from optimum_vim_kernels import gemm, scan
    from optimum_vim_kernels.tuning import bucket, device_slug, scan_variant

    smoke = args.smoke
    deadline = time.monotonic() + args.tune_seconds
    env = _environment(device)
    table = {**env, "file": f"kernels/optimum_vim_kernels/tuned/{device_slug(env['device'])}.json",
             "quant_gemm": {}, "selective_scan_q": {}, "measured": []}
    repeats, warmup = (1, 0) if smoke else (10, 2)
    # smoke: two candidates per kernel, one batch (the interpreter pays per launch); the real sweep takes them all
    gemm_candidates, scan_candidates = (GEMM_CANDIDATES[:2], SCAN_CANDIDATES[:2]) if smoke else \
        (GEMM_CANDIDATES, SCAN_CANDIDATES)

    def save():
        _write(args.tune_out, json.dumps(table, indent=1, sort_keys=True))

    def best_of(run, default, candidates):
        """(best_ms, best, default_ms): every candidate and the built-in ``default`` timed; failures skipped."""
        timed = {}
        for cand in sorted({default, *candidates}, key=str):
            try:
                timed[cand] = time_ms(lambda cand=cand: run(cand), device, repeats, warmup)
            except Exception as err:  # noqa: BLE001 - a candidate that does not compile / fit is skipped
                print(f"  candidate {cand}: {type(err).__name__}: {str(err)[:120]}", flush=True)
        if default not in timed:
            return None
        best = min(timed, key=timed.get)
        return timed[best], best, timed[default]

    def record(op, variant, shape, size, best, best_ms, default, ms_default, **info):
        entry = list(best) if op == "selective_scan_q" else [*best[:4], best[4]]
        table[op].setdefault(variant, {}).setdefault(f"{shape[0]}x{shape[1]}", {})[str(bucket(size))] = entry
        table["measured"].append({"op": op, "variant": variant, **info, "best": list(best), "best_ms": best_ms,
                                  "default": list(default), "default_ms": ms_default})
        print(f"{op} {variant} {info}: {tuple(best)} {best_ms:.4f} ms (built-in {tuple(default)}: "
              f"{ms_default:.4f} ms)", flush=True)
        save()

    stopped = False
    for size in (["smoke"] if smoke else args.tune_models):
        for stride in ([None] if smoke else (16, 8)):
            cfg = build("tiny", True).config if smoke else build_config(size, stride)
            e, n_state = cfg.intermediate_size, cfg.d_state
            for b in ((1,) if smoke else TUNE_BATCHES):
                m = cfg.sequence_length * b
                for fmt in args.formats:
                    for (n, k), layer in _layer_names(cfg).items():
                        if time.monotonic() > deadline:
                            stopped = True
                            break
                        a, qw, ws, kw = _gemm_operands(fmt, m, n, k, device, dtype, smoke)
                        variant, group, int_a = gemm.launch_key(a, ws, bits=kw["bits"], group_size=kw.get("group_size"),
                                                                codebook=kw.get("codebook"))
                        cands = [gemm.check_launch_config((c[0], c[1], group or max(c[2], 32 if int_a else 16), c[3],
                                                           c[4]), group=group, int_a=int_a) for c in gemm_candidates]
                        win = best_of(functools.partial(_launch_gemm, a, qw, ws, kw),
                                      gemm.heuristic_config(m, n, k, group=group, int_a=int_a), cands)
                        if win is not None:
                            record("quant_gemm", variant, (n, k), m, win[1], win[0],
                                   gemm.heuristic_config(m, n, k, group=group, int_a=int_a), win[2], layer=layer, m=m,
                                   n=n, k=k)
                for int_inputs in (False, True):  # the scan of this shape, float and int8 inputs
                    if time.monotonic() > deadline:
                        stopped = True
                        break
                    ops_args, ops_kw = _scan_operands(b, cfg.sequence_length, e, n_state, int_inputs, device, dtype)
                    default = scan.heuristic_scan_config(b, e, n_state, device)
                    win = best_of(functools.partial(_launch_scan, ops_args, ops_kw), default, scan_candidates)
                    if win is not None:
                        record("selective_scan_q", scan_variant(int_inputs=int_inputs, state_quant=False), (e, n_state),
                               b, win[1], win[0], default, win[2], batch=b, tokens=cfg.sequence_length, e=e, n=n_state)
    table["complete"] = not stopped
    save()
    print(f"{'stopped at the time budget; ' if stopped else ''}wrote {args.tune_out} (commit as {table['file']})")
    return 0


def _launch_gemm(a, qw, ws, kw, config):
    from optimum_vim_kernels import gemm

    return gemm.quant_gemm(a, qw, ws, **kw, config=config)


def _launch_scan(args, kw, config):
    from optimum_vim_kernels import scan

    return scan.selective_scan_q(*args, **kw, config=config)


def build_config(size: str, stride: int = 16):
    from optimum_vim import VimConfig

    return VimConfig(hidden_size=MODELS[size], num_hidden_layers=24, stride=stride)


def _scan_operands(b, length, e, n, int_inputs, device, dtype):
    g = torch.Generator().manual_seed(0)
    A = -(torch.rand(e, n, generator=g) + 0.5).to(device)
    D = torch.randn(e, generator=g).to(device)
    if int_inputs:
        codes = lambda *shape: torch.randint(-127, 128, shape, generator=g, dtype=torch.int8).to(device)  # noqa: E731
        scale = lambda: (torch.rand(length, generator=g) * 0.02 + 0.001).to(device)  # noqa: E731
        args = (codes(b, length, e), codes(b, length, e), A, codes(b, length, n), codes(b, length, n), D, None)
        kw = dict(u_scale=scale(), delta_scale=scale(), B_scale=scale(), C_scale=scale(), reverse=False)
        return args, kw
    f = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    delta = torch.nn.functional.softplus(f(b, length, e).float() - 2).to(dtype)
    return (f(b, length, e), delta, A, f(b, length, n), f(b, length, n), D, f(b, length, e)), dict(out_dtype=dtype)


def dry_run(args) -> int:
    """The plan of a run, from the real model configurations (no model is built, nothing is timed)."""
    import optimum_vim_kernels.tuning  # noqa: F401 - the table module the tuner writes for

    if args.tune:
        shapes = {(size, stride, nk) for size in args.tune_models for stride in (16, 8)
                  for nk in _layer_names(build_config(size, stride))}
        tokens = sorted({build_config("tiny", s).sequence_length for s in (16, 8)})
        print(f"dry run --tune: {len(shapes)} GEMM shapes x {len(args.formats)} formats x M = {tokens} tokens x "
              f"batches {list(TUNE_BATCHES)}, {len(GEMM_CANDIDATES)} GEMM and {len(SCAN_CANDIDATES)} scan candidates, "
              f"budget {args.tune_seconds:.0f} s -> {args.tune_out}")
    else:
        for size in args.models:
            c = build_config(size)
            print(f"dry run: Vim-{size[0].upper()} (hidden {c.hidden_size}, E {c.intermediate_size}, "
                  f"{c.sequence_length} tokens) x batches {args.batches} x fp16 + {args.formats}, "
                  f"{args.repeats} repeats -> {args.json}, {args.markdown}")
    return 0


# --------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "small", "base"], choices=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default=None, help="write the raw rows here (JSON)")
    p.add_argument("--markdown", default=None, help="write the tables here (Markdown)")
    p.add_argument("--tune", action="store_true", help="sweep launch configurations instead of the tables")
    p.add_argument("--tune-models", nargs="+", default=["small", "tiny", "base"], choices=list(MODELS))
    p.add_argument("--tune-seconds", type=float, default=150.0)
    p.add_argument("--tune-out", default="tuned.json")
    p.add_argument("--smoke", action="store_true", help="toy sizes on CPU with the Triton interpreter")
    p.add_argument("--dry-run", action="store_true", help="check the arguments and print the plan; run nothing")
    args = p.parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("benchmarks/gpu_kernels.py needs a CUDA GPU (none found); use --smoke to check the script on CPU")
        return 2
    import optimum_vim  # noqa: F401

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.float16
    return run_tune(args, device, dtype) if args.tune else run_tables(args, device, dtype)


if __name__ == "__main__":
    sys.exit(main())
