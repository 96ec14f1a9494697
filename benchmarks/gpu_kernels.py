"""GPU speed of the quantized Vim forward (Triton kernels) against fp16, side by side in one run.

Prints, for Vim-T/S/B (official shapes, random weights: speed does not depend on values) at batch 1 and 64:
per-layer times (in_proj GEMM, one scan direction) and end-to-end forward time and peak memory of

* fp16, PyTorch path (optimum-vim's scan), and fp16 with mamba-ssm's CUDA scan when installed;
* W8A8 (RTN, per-token static activations, int8 scan inputs), W4A8, W4A16 (g128) and 2-bit VQ
  (8-bit indices over 4-dim codewords; a random codebook, timing only), all through ``OPTIMUM_VIM_KERNELS=triton``.

Timings are CUDA-synchronised medians after warm-up. Without a GPU the script says so and exits;
``--smoke`` runs the same code on CPU with the Triton interpreter at toy sizes (a check that the script works).

    python benchmarks/gpu_kernels.py                     # on a CUDA machine
    python benchmarks/gpu_kernels.py --models tiny --batches 1 64

(The file is not called ``kernels.py``: run as a script, ``benchmarks/`` comes first on ``sys.path`` and such a name
would shadow the ``kernels`` package that transformers >= 5.25 imports.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

SIZES = {"tiny": 192, "small": 384, "base": 768}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats=20, warmup=5):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build(size: str, smoke: bool):
    from optimum_vim import VimConfig, VimForImageClassification

    if smoke:
        cfg = VimConfig(hidden_size=32, num_hidden_layers=1, d_state=4, patch_size=8, stride=8, image_size=32)
    else:
        cfg = VimConfig(hidden_size=SIZES[size], num_hidden_layers=24)
    torch.manual_seed(0)
    return VimForImageClassification(cfg).eval()


def quantized(model_fp32, fmt: str, device, dtype, smoke: bool):
    """A quantized copy of the float model in ``fmt`` (w8a8, w4a8, w4a16, vq2)."""
    import copy

    from optimum_vim import ViMQuantizationConfig, quantize_model
    from optimum_vim.modules import QLinear, build_qmodule, load_qmodule_tensors
    from optimum_vim.primitives import pack_codes
    from optimum_vim.recipes import BLOCK_LINEARS

    model = copy.deepcopy(model_fp32)
    c = model.config
    calib = torch.randn(8, c.num_channels, c.image_size, c.image_size)
    if fmt == "vq2":
        for name, mod in list(model.named_modules()):
            if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in BLOCK_LINEARS:
                k, n = mod.in_features, mod.out_features
                spec = {"type": "linear", "in_features": k, "out_features": n, "bias": mod.bias is not None,
                        "weight": {"format": "vq", "index_bits": 8, "vector_dim": 4, "codebook_size": 256}}
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
    return model.to(device=device, dtype=dtype)


def _layer_times(model, batch, policy, device, dtype, repeats, smoke):
    """Median time of layer 0's in_proj and of its forward scan on inputs of the model's sequence length."""
    from optimum_vim.ops.dispatch import use_kernels

    c = model.config
    mixer = model.vim.layers[0].mixer
    length, e, n = c.sequence_length, c.intermediate_size, c.d_state
    h = torch.randn(batch, length, c.hidden_size, device=device, dtype=dtype)
    u = torch.randn(batch, length, e, device=device, dtype=dtype)
    delta = torch.nn.functional.softplus(torch.randn(batch, length, e, device=device, dtype=dtype) - 2)
    A = -torch.exp(mixer.A_log.float())
    B = torch.randn(batch, length, n, device=device, dtype=dtype)
    C = torch.randn(batch, length, n, device=device, dtype=dtype)
    warm = 1 if smoke else 5
    with torch.no_grad(), use_kernels(policy):
        proj = 1e3 * _time(lambda: mixer.in_proj(h), device, repeats, warm)
        scan = 1e3 * _time(lambda: mixer.ssm(u, delta, A, B, C, mixer.D), device, repeats, warm)
    return proj, scan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "small", "base"], choices=list(SIZES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--formats", nargs="+", default=["w8a8", "w4a8", "w4a16", "vq2"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="toy sizes on CPU with the Triton interpreter")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("benchmarks/gpu_kernels.py needs a CUDA GPU (none found); use --smoke to check the script on CPU")
        return 2
    import optimum_vim  # noqa: F401
    from optimum_vim.ops.dispatch import use_kernels

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.float16
    models = args.models[:1] if args.smoke else args.models
    batches = [1, 2] if args.smoke else args.batches
    repeats = 1 if args.smoke else args.repeats
    try:
        import mamba_ssm  # noqa: F401

        has_mamba = device.type == "cuda"
    except ImportError:
        has_mamba = False
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter, smoke run)"
    print(f"device: {name}; torch {torch.__version__}; median of {repeats} after warm-up; fp16 baseline\n")
    print("| model | batch | variant | forward (ms) | speed-up vs fp16 | peak memory (MiB) | in_proj (ms) | "
          "scan, one direction (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for size in models:
        base = build(size, args.smoke)
        variants = {"fp16 (PyTorch scan)": (base, "reference")}
        fp = base.to(device=device, dtype=dtype)
        for layer in fp.vim.layers:
            layer.mixer.ssm.backend = layer.mixer.ssm_b.backend = "torch"
        if has_mamba:
            import copy

            mamba = copy.deepcopy(fp)
            for layer in mamba.vim.layers:
                layer.mixer.ssm.backend = layer.mixer.ssm_b.backend = "mamba"
            variants["fp16 (mamba-ssm scan)"] = (mamba, "reference")
        for fmt in args.formats:
            variants[fmt.upper()] = (quantized(build(size, args.smoke), fmt, device, dtype, args.smoke), "triton")
        c = fp.config
        for b in batches:
            x = torch.randn(b, c.num_channels, c.image_size, c.image_size, device=device, dtype=dtype)
            base_ms = None
            for label, (model, policy) in variants.items():
                model = model.to(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                with torch.no_grad(), use_kernels(policy):
                    ms = 1e3 * _time(lambda model=model, x=x: model(x), device, repeats, warmup=1 if args.smoke else 5)
                peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
                proj_ms, scan_ms = _layer_times(model, b, policy, device, dtype, repeats, args.smoke)
                base_ms = base_ms or ms
                print(f"| Vim-{size[0].upper()} | {b} | {label} | {ms:.2f} | {base_ms / ms:.2f}x | {peak:.0f} | "
                      f"{proj_ms:.3f} | {scan_ms:.3f} |", flush=True)
        del variants
    return 0


if __name__ == "__main__":
    sys.exit(main())
