"""NaN in -> NaN out: the quantized modules (integer codes cannot hold NaN) mark the outputs a NaN input reaches, as
the float modules do; a NaN image gives NaN logits, never a confident class."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageClassification

import optimum_vim  # noqa: F401
from tests.support.helpers import quantize


def _nan_image(one_pixel=False):
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    if one_pixel:
        x[0, 0, 13, 6] = float("nan")  # sample 1 stays finite
    else:
        x[0] = float("nan")
    return x


@pytest.mark.parametrize("kw", [
    dict(weight_bits=4, act_bits=8),
    dict(weight_bits=4, act_bits=4),
    dict(weight_bits=8, act_bits=8, recipe_args={"scan_act_bits": 8}),
    dict(weight_bits=8, act_bits=8, recipe_args={"act_granularity": "token", "act_symmetric": True}),
    dict(weight_bits=4, act_bits=None),
], ids=["w4a8", "w4a4", "w8a8-scan8", "w8a8-token", "w4"])
@pytest.mark.parametrize("one_pixel", [False, True], ids=["all-nan", "one-pixel"])
def test_nan_image_gives_nan_logits(tiny_vim_dir, kw, one_pixel):
    fp = AutoModelForImageClassification.from_pretrained(tiny_vim_dir)
    q = quantize(tiny_vim_dir, **kw)
    x = _nan_image(one_pixel)
    with torch.no_grad():
        ref, out = fp(x).logits, q(x).logits
    assert torch.isnan(ref[0]).all() and torch.isfinite(ref[1]).all()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), out


def _nan_at(shape, positions, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    for pos in positions:
        x[pos] = float("nan")
    return x


@pytest.mark.parametrize("act", [
    {"bits": 8, "granularity": "tensor", "symmetric": False},        # int8 codes -> integer GEMM
    {"bits": 8, "granularity": "token", "length": 6, "symmetric": True},
    {"bits": 8, "granularity": "dynamic_token"},
    {"bits": 4, "granularity": "channel", "channels": 16},           # fake-quantized float path
], ids=["tensor-affine", "token", "dynamic", "channel-fake"])
def test_qlinear_nan_rows_match_float(act):
    from optimum_vim.modules import build_qmodule

    spec = {"type": "linear", "in_features": 16, "out_features": 8, "bias": True,
            "weight": {"format": "int", "bits": 4, "group_size": None}, "input": act}
    layer = build_qmodule(spec)
    with torch.no_grad():
        layer.qweight.random_(0, 255)
        layer.weight_scale.fill_(0.1)
        layer.input_quantizer.scale.fill_(0.05) if hasattr(layer.input_quantizer, "scale") else None
    x = _nan_at((2, 6, 16), [(0, 1, 3), (1, 5, 0)])
    float_out = x @ layer.dequantized_weight().T + layer.bias
    out = layer(x)
    assert torch.equal(torch.isnan(out), torch.isnan(float_out))
    assert torch.isnan(out).sum() == 2 * 8


def test_fused_combine_propagates_nan(tiny_vim_dir):
    q = quantize(tiny_vim_dir, weight_bits=8, act_bits=8)
    out_proj = q.vim.layers[0].mixer.out_proj
    assert out_proj.can_fuse_combine()
    yf, yb, z = (torch.randn(2, 50, out_proj.in_features) for _ in range(3))
    yf[0, 3, 1], yb[1, 7, 0], z[1, 9, 5] = float("nan"), float("nan"), float("nan")
    fused = out_proj(yf, combine=(yb, z, True))
    unfused = out_proj((yf + yb) / 2 * torch.nn.functional.silu(z))
    expected = torch.zeros(2, 50, dtype=torch.bool)
    expected[0, 3] = expected[1, 7] = expected[1, 9] = True
    assert torch.equal(torch.isnan(fused).all(-1), expected) and torch.equal(torch.isnan(fused), torch.isnan(unfused))


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("gran", ["tensor", "channel"], ids=["int8-codes", "fake-quant"])
def test_qscan_nan_positions_match_float_scan(reverse, gran):
    from optimum_vim.modules import build_qmodule
    from optimum_vim.ops import selective_scan

    b, length, e, n = 2, 7, 5, 4
    def act(sym, channels):
        return {"bits": 8, "granularity": gran, "symmetric": sym, "channels": channels}

    scan = build_qmodule({"type": "scan", "reverse": reverse, "length": length, "channels": e, "d_state": n,
                          "u": act(True, e), "delta": act(False, e), "B": act(True, n), "C": act(True, n)})
    for name in ("u", "delta", "B", "C"):
        getattr(scan, f"{name}_quantizer").scale.fill_(0.05)
    g = torch.Generator().manual_seed(1)
    u = _nan_at((b, length, e), [(0, 2, 1)], 1)
    delta = torch.rand(b, length, e, generator=g) * 0.5
    delta[1, 4, 3] = float("nan")
    B = _nan_at((b, length, n), [(1, 1, 2)], 2)
    C = _nan_at((b, length, n), [(0, 5, 0)], 3)
    A = -torch.rand(e, n, generator=g) - 0.5
    D = torch.ones(e)
    ref = selective_scan(u, delta, A, B, C, D, reverse=reverse, backend="torch")
    out = scan(u, delta, A, B, C, D)
    assert (scan.u_quantizer.static_codes(u) is None) == (gran == "channel")
    assert torch.isnan(ref).any() and not torch.isnan(ref).all()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))


def test_conv_and_output_quantizers_propagate_nan():
    from optimum_vim.modules import build_qmodule

    act = {"bits": 8, "granularity": "tensor", "symmetric": True}
    conv = build_qmodule({"type": "conv1d", "channels": 4, "kernel_size": 3, "weight": {"bits": 8},
                          "input": act, "output": act})
    out_q = build_qmodule({"type": "output", "inner": "silu", "output": act})
    with torch.no_grad():
        conv.qweight.fill_(3)
        for q in (conv.input_quantizer, conv.output_quantizer, out_q.output_quantizer):
            q.scale.fill_(0.05)
        conv.weight_scale.fill_(0.1)
    x = _nan_at((1, 6, 4), [(0, 2, 1)])
    float_conv = torch.nn.functional.conv1d(torch.nn.functional.pad(x.transpose(1, 2), (2, 0)),
                                            conv.dequantized_weight(), conv.bias, groups=4).transpose(1, 2)
    assert torch.equal(torch.isnan(conv(x)), torch.isnan(float_conv)) and torch.isnan(float_conv).sum() == 3
    assert torch.equal(torch.isnan(out_q(x)), torch.isnan(x))
