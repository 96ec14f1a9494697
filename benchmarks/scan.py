"""Selective scan on CPU: the fused numba scan (the CPU default) beside the PyTorch scan (the reference) and a naive
per-step loop, side by side in one run, plus the whole float model before / after.

Sections (each timing is the median of ``--repeats`` calls, baseline and candidate interleaved call by call, so
that a change in machine load hits both alike):

1. first-call cost of the fused scan: compile into an empty numba cache (cold) and load from it (warm), each in a
   fresh process;
2. the scan op at the fixture's mixer shapes (d_inner 128, d_state 8, 50 tokens; batch 64 and 1), Vim-Tiny's (384,
   16, 197 tokens; batch 8 and 1), and forward + backward at the calibration shape (256 x 50 tokens, fixture
   widths), at 1 and 2 threads; the naive loop restates mamba-ssm's ``selective_scan_ref`` (forward rows only);
3. the float model's forward, ``OPTIMUM_VIM_KERNELS=reference`` (before: the PyTorch scan) against the default
   (after), fixture batch 64 and a Vim-Tiny-shaped model (random weights) batch 8;
4. ``--calibration``: PTQ4VM W4A4 at its defaults on the fixture (256 images, 100 JLSS steps per block) with the
   block-wise engine on each ``--threads`` count: wall and process CPU seconds, whether every quantized tensor equals
   the first run's bit for bit, and the quantized model on the full Fashion-MNIST test split (top-1, logit SQNR and
   agreement with the float model).

    python benchmarks/scan.py                  # all of it, 1 and 2 threads
    python benchmarks/scan.py --isa avx2       # the same under the AVX2 emulation (no AVX-512, no VNNI)
    python benchmarks/scan.py --quick          # a smoke run (small repeats, no compile-cost processes)
    python benchmarks/scan.py --calibration --threads 2 1 --no-ops --no-model --no-compile
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": ""}
"""Emulates an AVX2-only CPU without VNNI (e.g. AMD EPYC Zen 2/3): PyTorch's kernels, oneDNN, MKL and numba's code
generation all limited to AVX2 + FMA. Must be set before torch / numba are imported (``--isa avx2`` re-runs)."""

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "vim-fashion-mnist")

# (name, batch, tokens, d_inner, d_state)
OP_SHAPES = [("fixture", 64, 50, 128, 8), ("fixture", 1, 50, 128, 8), ("Vim-T", 8, 197, 384, 16),
             ("Vim-T", 1, 197, 384, 16)]
TRAIN_SHAPE = ("fixture calibration", 256, 50, 128, 8)

_COMPILE_PROBE = r"""
import time, torch
clock = time.process_time if CPU_CLOCK else time.perf_counter
t0 = clock()
from optimum_vim_kernels import cpu_scan
u = torch.randn(2, 9, 70); d = torch.rand(2, 9, 70) * 0.1; A = -torch.rand(70, 8) - 0.5
B, C, D = torch.randn(2, 9, 8), torch.randn(2, 9, 8), torch.randn(70)
t1 = clock()
with torch.no_grad():
    cpu_scan.selective_scan(u, d, A, B, C, D)
t2 = clock()
x = [t.clone().requires_grad_() for t in (u, d, A, B, C, D)]
cpu_scan.selective_scan(*x).sum().backward()
t3 = clock()
codes = torch.randint(-128, 127, (2, 9, 70), dtype=torch.int8)
cpu_scan.selective_scan_q(codes, d, A, B, C, D, u_scale=torch.ones(1), h_scale=torch.ones(9))
t4 = clock()
print(f"{t1 - t0:.3f} {t2 - t1:.3f} {t3 - t2:.3f} {t4 - t3:.3f}")
"""


def naive_scan(u, delta, A, B, C, D):
    """Per-step loop in the style of mamba-ssm's selective_scan_ref. u, delta: (b, E, L); B, C: (b, N, L)."""
    import torch

    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    delta_b_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for i in range(u.shape[2]):
        x = delta_a[:, :, i] * x + delta_b_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    return torch.stack(ys, dim=2) + u * D[:, None]


def _inputs(b, length, e, n, seed=0):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, length, e, generator=g)
    delta = F.softplus(torch.randn(b, length, e, generator=g) - 2)
    A = -torch.exp(torch.randn(e, n, generator=g) * 0.5)
    B, C = torch.randn(b, length, n, generator=g), torch.randn(b, length, n, generator=g)
    D = torch.randn(e, generator=g)
    return u, delta, A, B, C, D


CLOCK = time.perf_counter


def _interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, called in turn ``repeats`` times after one warm-up call each (``CLOCK``:
    wall time, or with ``--clock cpu`` the calling thread's CPU time, which a busy machine's preemptions do not
    inflate; only meaningful at one thread, where all the work runs on the calling thread)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = CLOCK()
            fn()
            times[k].append(CLOCK() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def compile_cost(cpu_clock: bool) -> None:
    print(f"\n### First-call cost of the fused scan (fresh process each, {'process CPU' if cpu_clock else 'wall'} "
          "seconds)\n")
    print("| cache | import (s) | first forward (s) | first backward (s) | first int8 + 8-bit-state forward (s) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        for label in ("cold (empty cache: compiles)", "warm (loads the on-disk cache)"):
            probe = f"CPU_CLOCK = {cpu_clock}\n" + _COMPILE_PROBE
            out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                 check=True).stdout.split()
            print(f"| {label} | " + " | ".join(out) + " |", flush=True)


def op_table(threads_list, repeats: int) -> None:
    import torch
    from optimum_vim_kernels import cpu_scan

    from optimum_vim.ops import selective_scan_torch

    print("\n### Scan op\n")
    print("| shape | batch | tokens | mode | threads | naive loop (ms) | PyTorch scan (ms) | fused scan (ms) "
          "| speed-up vs PyTorch | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for threads in threads_list:
        torch.set_num_threads(threads)
        for name, b, length, e, n in OP_SHAPES:
            u, delta, A, B, C, D = _inputs(b, length, e, n)
            tr = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731
            theirs = (tr(u), tr(delta), A, tr(B), tr(C), D)
            with torch.no_grad():
                ref = selective_scan_torch(u, delta, A, B, C, D)
                diff = (cpu_scan.selective_scan(u, delta, A, B, C, D) - ref).abs().max().item()
                args = (u, delta, A, B, C, D)
                t = _interleaved({
                    "naive": lambda theirs=theirs: naive_scan(*theirs),
                    "torch": lambda args=args: selective_scan_torch(*args),
                    "fused": lambda args=args: cpu_scan.selective_scan(*args),
                }, repeats)
            print(f"| {name} | {b} | {length} | forward | {threads} | {1e3 * t['naive']:.2f} | {1e3 * t['torch']:.2f} "
                  f"| {1e3 * t['fused']:.2f} | {t['torch'] / t['fused']:.1f}x | {diff:.1e} |", flush=True)
        name, b, length, e, n = TRAIN_SHAPE
        inputs = [x.requires_grad_() for x in _inputs(b, length, e, n)]
        w = torch.randn(b, length, e)

        def step(fn, inputs=inputs, w=w):
            for x in inputs:
                x.grad = None
            (fn(*inputs) * w).sum().backward()

        grads = {}
        for key, fn in (("torch", selective_scan_torch), ("fused", cpu_scan.selective_scan)):
            step(fn)
            grads[key] = [x.grad.clone() for x in inputs]
        diff = max(((a - b_).abs().max() / b_.abs().max()).item() for a, b_ in zip(grads["fused"], grads["torch"]))
        t = _interleaved({"torch": lambda: step(selective_scan_torch), "fused": lambda: step(cpu_scan.selective_scan)},
                         max(3, repeats // 2))
        print(f"| {name} | {b} | {length} | forward+backward | {threads} | - | {1e3 * t['torch']:.1f} "
              f"| {1e3 * t['fused']:.1f} | {t['torch'] / t['fused']:.1f}x | {diff:.1e} (grads, relative) |",
              flush=True)


def model_table(threads_list, repeats: int) -> None:
    import torch
    from transformers import AutoModelForImageClassification

    from optimum_vim import VimConfig, VimForImageClassification
    from optimum_vim.ops.dispatch import use_kernels

    print("\n### Float model forward: PyTorch scan (before) against the fused scan (after)\n")
    print("| model | batch | threads | before (ms) | after (ms) | speed-up | max abs logit diff |")
    print("|---|---|---|---|---|---|---|")
    fixture = AutoModelForImageClassification.from_pretrained(FIXTURE).eval()
    torch.manual_seed(0)
    vim_t = VimForImageClassification(VimConfig(hidden_size=192, num_hidden_layers=24, d_state=16, expand=2,
                                                patch_size=16, stride=16, image_size=224, num_channels=3,
                                                num_labels=1000)).eval()
    cases = [("fixture", fixture, torch.randn(64, 1, 28, 28)), ("fixture", fixture, torch.randn(1, 1, 28, 28)),
             ("Vim-T shape (random weights)", vim_t, torch.randn(8, 3, 224, 224))]
    for threads in threads_list:
        torch.set_num_threads(threads)
        for name, model, x in cases:
            def before(model=model, x=x):
                with use_kernels("reference"):
                    return model(x).logits

            with torch.no_grad():
                diff = (model(x).logits - before()).abs().max().item()
                t = _interleaved({"before": before, "after": lambda model=model, x=x: model(x).logits},
                                 max(3, repeats // 2))
            print(f"| {name} | {x.shape[0]} | {threads} | {1e3 * t['before']:.1f} | {1e3 * t['after']:.1f} | "
                  f"{t['before'] / t['after']:.2f}x | {diff:.1e} |", flush=True)


def calibration_table(threads_list) -> None:
    import torch
    from accuracy import logit_sqnr_db, logits_on
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from optimum_vim import ViMQuantizationConfig
    from optimum_vim.evaluation import iter_batches, load_named_dataset

    print("\n### PTQ4VM W4A4 default calibration on the fixture (256 images, 100 steps per block)\n")
    print("| threads | calibration wall (s) | process CPU (s) | bit-identical to the first row | top-1 | logit SQNR (dB) "
          "| agreement with FP |")
    print("|---|---|---|---|---|---|---|")
    processor = AutoImageProcessor.from_pretrained(FIXTURE)
    calib = load_named_dataset("fashion-mnist", "train")
    test = load_named_dataset("fashion-mnist", "test")
    batches = list(iter_batches(test, processor, 1000))
    pixels, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    fp_logits = logits_on(AutoModelForImageClassification.from_pretrained(FIXTURE), pixels)
    first = None
    for threads in threads_list:
        torch.set_num_threads(threads)
        cfg = ViMQuantizationConfig(recipe="ptq4vm", weight_bits=4, act_bits=4, calibration_dataset=calib,
                                    image_processor=processor)
        wall, cpu = time.perf_counter(), time.process_time()
        model = AutoModelForImageClassification.from_pretrained(FIXTURE, quantization_config=cfg)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        state = {k: v.clone() for k, v in model.state_dict().items()}
        same = "-" if first is None else str(state.keys() == first.keys()
                                                and all(torch.equal(v, first[k]) for k, v in state.items()))
        first = first or state
        logits = logits_on(model, pixels)
        top1 = (logits.argmax(-1) == labels).float().mean().item()
        agree = (logits.argmax(-1) == fp_logits.argmax(-1)).float().mean().item()
        print(f"| {threads} | {wall:.1f} | {cpu:.1f} | {same} | {100 * top1:.2f}% | "
              f"{logit_sqnr_db(fp_logits, logits):.2f} | {100 * agree:.2f}% |", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--isa", choices=["native", "avx2"], default="native",
                   help="avx2: re-run under the AVX2 emulation environment (AVX2_ENV)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: time with the calling thread's CPU time (one thread only; robust on a shared machine)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 repeats, no compile-cost processes")
    p.add_argument("--no-ops", action="store_true", help="skip the scan-op table")
    p.add_argument("--no-compile", action="store_true", help="skip the first-call (compile) cost")
    p.add_argument("--no-model", action="store_true", help="skip the whole-model table")
    p.add_argument("--calibration", action="store_true", help="time PTQ4VM W4A4 calibration per --threads count")
    args = p.parse_args(argv)
    if args.isa == "avx2" and os.environ.get("NUMBA_CPU_NAME") != "haswell":
        argv = [a for a in (argv if argv is not None else sys.argv[1:])]
        return subprocess.run([sys.executable, os.path.abspath(__file__), *argv], env={**os.environ, **AVX2_ENV}).returncode
    repeats = 2 if args.quick else args.repeats
    if args.clock == "cpu":
        if args.threads != [1]:
            p.error("--clock cpu measures the calling thread only: use it with --threads 1")
        global CLOCK
        CLOCK = time.thread_time

    import numba
    import torch
    from optimum_vim_kernels.cpu_features import describe_cpu

    emulated = {k: os.environ[k] for k in AVX2_ENV if k in os.environ}
    print(describe_cpu())
    print(f"torch {torch.__version__}, numba {numba.__version__}, threads {args.threads}, median of {repeats} "
          f"(interleaved, {args.clock} clock), load average {os.getloadavg()[0]:.1f}"
          + (f"; AVX2 emulation: {' '.join(f'{k}={v!r}' for k, v in emulated.items())}" if emulated else ""))
    if not args.quick and not args.no_compile:
        compile_cost(args.clock == "cpu")
    if not args.no_ops:
        op_table(args.threads, repeats)
    if not args.no_model:
        model_table(args.threads, repeats)
    if args.calibration:
        calibration_table(args.threads)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
