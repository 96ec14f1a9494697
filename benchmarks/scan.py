"""Selective scan on CPU: optimum-vim's PyTorch scan against a naive per-step loop, side by side in one run.

The baseline restates the algorithm of mamba-ssm's ``selective_scan_ref`` (channel-first tensors, ``exp(delta*A)``
and ``delta*B*u`` built up front, then one step per token with indexing and a per-step einsum). Both compute the
same fp32 result (checked below). Shapes are Vim-Tiny's mixer: d_inner 384, d_state 16, 197 tokens (stride 16)
and 730 tokens (stride 8).

    python benchmarks/scan.py            # inference (no grad)
    python benchmarks/scan.py --train    # forward + backward as well
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from optimum_vim.ops import selective_scan_torch


def naive_scan(u, delta, A, B, C, D):
    """Per-step loop in the style of mamba-ssm's selective_scan_ref. u, delta: (b, E, L); B, C: (b, N, L)."""
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    delta_b_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for i in range(u.shape[2]):
        x = delta_a[:, :, i] * x + delta_b_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    return torch.stack(ys, dim=2) + u * D[:, None]


def _inputs(b, length, e=384, n=16, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(b, length, e, generator=g)
    delta = F.softplus(torch.randn(b, length, e, generator=g) - 2)
    A = -torch.exp(torch.randn(e, n, generator=g) * 0.5)
    B, C = torch.randn(b, length, n, generator=g), torch.randn(b, length, n, generator=g)
    D = torch.randn(e, generator=g)
    ours = [t.clone().requires_grad_(requires_grad) for t in (u, delta, A, B, C, D)]
    tr = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731
    theirs = [tr(u), tr(delta), A.clone(), tr(B), tr(C), D.clone()]
    theirs = [t.requires_grad_(requires_grad) for t in theirs]
    return ours, theirs


def _time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="also time forward + backward")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [("Vim-T stride 16", 1, 197), ("Vim-T stride 16", 8, 197), ("Vim-T stride 8", 1, 730)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| shape | batch | tokens | mode | naive loop (ms) | optimum-vim (ms) | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name, b, length in shapes:
        ours, theirs = _inputs(b, length)
        with torch.no_grad():
            y_ours = selective_scan_torch(*ours)
            y_naive = naive_scan(*theirs).transpose(1, 2)
            diff = (y_ours - y_naive).abs().max().item()
            t_naive = _time(lambda theirs=theirs: naive_scan(*theirs), args.repeats)
            t_ours = _time(lambda ours=ours: selective_scan_torch(*ours), args.repeats)
        print(f"| {name} | {b} | {length} | inference | {1e3 * t_naive:.1f} | {1e3 * t_ours:.1f} | "
              f"{t_naive / t_ours:.1f}x | {diff:.1e} |", flush=True)
        if args.train:
            ours, theirs = _inputs(b, length, requires_grad=True)
            w = torch.randn(b, length, 384)

            def step_ours(ours=ours, w=w):
                (selective_scan_torch(*ours) * w).sum().backward()

            def step_naive(theirs=theirs, w=w):
                (naive_scan(*theirs) * w.transpose(1, 2)).sum().backward()

            t_naive = _time(step_naive, max(3, args.repeats // 2))
            t_ours = _time(step_ours, max(3, args.repeats // 2))
            print(f"| {name} | {b} | {length} | forward+backward | {1e3 * t_naive:.1f} | {1e3 * t_ours:.1f} | "
                  f"{t_naive / t_ours:.1f}x | - |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
