"""The quantized module family: every path of every module against a float re-computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from optimum_vim_kernels.reference import selective_scan_q_ref

from optimum_vim.calibration.tensors import rtn_weight_tensors
from optimum_vim.modules import (
    QActivation,
    QLinear,
    QOutput,
    build_qmodule,
    load_qmodule_tensors,
)
from optimum_vim.ops import causal_conv1d, selective_scan_torch
from optimum_vim.ops.dispatch import use_kernels
from optimum_vim.primitives import pack_codes


def _act(spec, **tensors):
    q = QActivation(spec)
    load_qmodule_tensors(q, tensors)
    return q


def test_activation_tensor_affine_roundtrip_and_row_codes():
    x = torch.randn(2, 5, 7) * 3
    q = _act({"bits": 8, "symmetric": False, "granularity": "tensor"},
             scale=torch.tensor([0.05]), zero_point=torch.tensor([120], dtype=torch.int32))
    out = q(x)
    inside = (x > -120 * 0.05) & (x < 135 * 0.05)
    assert (out - x)[inside].abs().max() <= 0.025 + 1e-6
    assert out[x > 10].eq(135 * 0.05).all()  # clamped at the top code
    codes, scale, zero = q.row_quantize(x)
    # one scale and zero point serve every row of a per-tensor quantizer
    assert codes.dtype == torch.int8 and codes.shape == (10, 7) and scale.shape == (1,) and zero.shape == (1,)
    rebuilt = (codes.float() - zero.float()[:, None]) * scale[:, None]
    assert torch.equal(rebuilt.reshape(2, 5, 7), out)


def test_activation_per_token_and_length_check():
    scales = torch.linspace(0.01, 0.1, 5)
    q = _act({"bits": 4, "symmetric": True, "granularity": "token", "length": 5}, scale=scales)
    x = torch.randn(3, 5, 6)
    out = q(x)
    expected = torch.clamp(torch.round(x / scales.view(1, 5, 1)), -7, 7) * scales.view(1, 5, 1)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="calibrated for 5 tokens"):
        q(torch.randn(1, 6, 6))


@pytest.mark.parametrize("gran,sym", [("tensor", False), ("tensor", True), ("token", False), ("token_cluster", True)])
def test_row_codes_follow_their_buffers_and_the_batch(gran, sym):
    """The per-call constants of a static row quantizer are cached: codes must still follow in-place buffer writes
    (load_state_dict), replaced buffers and new batch sizes, and equal the primitive's quantize_int8 values."""
    from optimum_vim.primitives import quantize_int8

    spec = {"bits": 8, "symmetric": sym, "granularity": gran, "length": 5, "num_clusters": 2}
    tensors = {"scale": torch.rand(1 if gran == "tensor" else 2 if gran == "token_cluster" else 5) * 0.05 + 0.01}
    if gran == "token_cluster":
        tensors["labels"] = torch.tensor([0, 1, 1, 0, 1], dtype=torch.int32)
    if not sym:
        tensors["zero_point"] = torch.randint(100, 150, tensors["scale"].shape, dtype=torch.int32)
    q = _act(spec, **tensors)

    def expected(x):
        scale, zero = q.scale_and_zero(x)
        shift = q.code_shift
        zero = None if zero is None else zero - shift
        return quantize_int8(x, scale, zero, q.qmin - shift, q.qmax - shift).reshape(-1, x.shape[-1])

    for batch in (3, 1, 3):
        x = torch.randn(batch, 5, 6) * 2
        codes, scale, zero = q.row_quantize(x)
        assert torch.equal(codes, expected(x))
        rows = 1 if gran == "tensor" else batch * 5
        assert scale.shape == (rows,) and (zero is None) == sym and (sym or zero.shape == (rows,))
        assert torch.equal(((codes.float() - (0 if sym else zero.float()[:, None])) * scale[:, None]).reshape(x.shape),
                           q(x))  # the GEMM operands rebuild the fake-quantized activation exactly
    q.scale.mul_(2)  # in place
    assert torch.equal(q.row_quantize(x)[0], expected(x))
    q.scale = q.scale * 0.25  # replaced
    assert torch.equal(q.row_quantize(x)[0], expected(x))


def test_activation_clusters_and_channel_factor():
    labels = torch.tensor([0, 1, 1, 0], dtype=torch.int32)
    q = _act({"bits": 8, "symmetric": True, "narrow": False, "granularity": "token_cluster", "length": 4,
              "num_clusters": 2}, scale=torch.tensor([0.1, 0.2]), labels=labels)
    x = torch.randn(2, 4, 3)
    per_token = torch.tensor([0.1, 0.2, 0.2, 0.1]).view(1, 4, 1)
    assert torch.equal(q(x), torch.clamp(torch.round(x / per_token), -128, 127) * per_token)
    qc = _act({"bits": 8, "granularity": "channel_cluster", "channels": 3, "num_clusters": 2, "channel_factor": True},
              scale=torch.tensor([0.1, 0.3]), labels=torch.tensor([1, 0, 1], dtype=torch.int32),
              factor=torch.tensor([1.0, 2.0, 0.5]))
    s = torch.tensor([0.3, 0.2, 0.15]).view(1, 1, 3)
    torch.testing.assert_close(qc(x), torch.clamp(torch.round(x / s), -127, 127) * s)
    assert qc.row_quantize(x) is None  # per-channel scales cannot sit in a GEMM epilogue


def test_activation_dynamic_token():
    q = QActivation({"bits": 8, "granularity": "dynamic_token"})
    x = torch.randn(2, 3, 16)
    out = q(x)
    s = x.abs().amax(-1, keepdim=True) / 127
    assert torch.equal(out, torch.round(x / s).clamp(-127, 127) * s)
    with pytest.raises(ValueError, match="symmetric only"):
        QActivation({"bits": 8, "granularity": "dynamic_token", "symmetric": False})


@pytest.mark.parametrize("bad", [{"bits": 8, "granularity": "row"}, {"bits": 1, "granularity": "tensor"},
                                 {"bits": 8, "granularity": "token"}], ids=["granularity", "bits", "no-length"])
def test_activation_spec_validation(bad):
    with pytest.raises(ValueError):
        QActivation(bad)


def _linear(w, b=None, bits=8, group=None, act=None, act_tensors=None, smooth=None):
    n, k = w.shape
    spec = {"type": "linear", "in_features": k, "out_features": n, "bias": b is not None,
            "weight": {"format": "int", "bits": bits, "group_size": group}, "input": act, "smooth": smooth is not None}
    mod = build_qmodule(spec)
    tensors = rtn_weight_tensors(w * smooth if smooth is not None else w, bits, group)
    if b is not None:
        tensors["bias"] = b
    if smooth is not None:
        tensors["smooth_scale"] = smooth
    tensors.update({f"input_quantizer.{k}": v for k, v in (act_tensors or {}).items()})
    load_qmodule_tensors(mod, tensors)
    return mod


@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (4, 16), (3, None), (2, 8)], ids=["w8", "w4", "w4-g16", "w3", "w2-g8"])
def test_qlinear_weight_only_matches_dequantized_linear(bits, group):
    w, b = torch.randn(24, 40), torch.randn(24)
    mod = _linear(w, b, bits, group)
    x = torch.randn(2, 9, 40)
    ref = F.linear(x.double(), mod.dequantized_weight().double(), b.double())
    torch.testing.assert_close(mod(x).double(), ref, rtol=1e-5, atol=1e-5)
    err = (mod.dequantized_weight() - w).abs().max()
    assert err <= w.abs().max() / ((1 << (bits - 1)) - 1) / 2 + 1e-6  # RTN error bound: half a step


@pytest.mark.parametrize("bits,group,sym", [(8, None, False), (4, None, True), (8, 16, False), (4, 8, False)],
                         ids=["w8a8", "w4a8-sym", "w8a8-g16", "w4a8-g8"])
def test_qlinear_integer_path_equals_fake_quant_path(bits, group, sym):
    w, b = torch.randn(20, 32), torch.randn(20)
    act = {"bits": 8, "symmetric": sym, "granularity": "token", "length": 6}
    act_t = {"scale": torch.rand(6) * 0.05 + 0.01}
    if not sym:
        act_t["zero_point"] = torch.randint(100, 150, (6,), dtype=torch.int32)
    mod = _linear(w, b, bits, group, act, act_t)
    x = torch.randn(3, 6, 32)
    assert mod.input_quantizer.row_quantize(x) is not None  # the integer path is taken
    y = mod(x)
    ref = F.linear(mod.input_quantizer(x).double(), mod.dequantized_weight().double(), b.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_qlinear_smoothing_is_exact_in_float():
    w = torch.randn(8, 16)
    smooth = torch.rand(16) + 0.5
    mod = _linear(w, bits=8, smooth=smooth)
    x = torch.randn(1, 3, 16)
    torch.testing.assert_close(mod(x), F.linear(x, mod.effective_weight()), rtol=1e-5, atol=1e-5)
    assert (mod.effective_weight() - w).abs().max() < 0.05


def test_qlinear_codebook_format():
    codebook = torch.randn(16, 4)
    idx = torch.randint(0, 16, (6, 5))  # 6 rows x 20 inputs / 4 per vector
    spec = {"type": "linear", "in_features": 20, "out_features": 6, "bias": False,
            "weight": {"format": "vq", "index_bits": 4, "vector_dim": 4, "codebook_size": 16, "channel_scale": True}}
    mod = build_qmodule(spec)
    scale = torch.rand(6, 1) + 0.5
    load_qmodule_tensors(mod, {"qweight": pack_codes(idx, 4), "codebook": codebook, "weight_scale": scale})
    w = codebook[idx].reshape(6, 20) * scale
    assert torch.equal(mod.dequantized_weight(), w)
    x = torch.randn(2, 3, 20)
    torch.testing.assert_close(mod(x), F.linear(x, w))
    with pytest.raises(ValueError, match="index bits"):
        QLinear({**spec, "weight": {**spec["weight"], "codebook_size": 32}})


def test_build_on_meta_gives_declared_shapes():
    spec = {"type": "linear", "in_features": 30, "out_features": 10, "bias": True,
            "weight": {"format": "int", "bits": 4, "group_size": 8},
            "input": {"bits": 8, "symmetric": False, "granularity": "token", "length": 17}}
    with torch.device("meta"):
        mod = build_qmodule(spec)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in mod.state_dict().items()}
    assert shapes == {
        "qweight": ((10, 15), torch.uint8), "weight_scale": ((10, 4), torch.float32), "bias": ((10,), torch.float32),
        "input_quantizer.scale": ((17,), torch.float32), "input_quantizer.zero_point": ((17,), torch.int32),
    }
    assert not list(mod.parameters())  # buffers only


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_qconv1d_and_qoutput(reverse):
    w = torch.randn(12, 1, 4) * 0.5
    b = torch.randn(12)
    spec = {"type": "conv1d", "channels": 12, "kernel_size": 4, "reverse": reverse, "weight": {"bits": 8},
            "output": {"bits": 8, "granularity": "tensor"}}
    mod = build_qmodule(spec)
    scale = w.reshape(12, 4).abs().amax(1) / 127
    codes = torch.round(w.reshape(12, 4) / scale[:, None]).to(torch.int8)
    load_qmodule_tensors(mod, {"qweight": codes, "weight_scale": scale, "bias": b,
                               "output_quantizer.scale": torch.tensor([0.02])})
    x = torch.randn(2, 9, 12)
    conv = causal_conv1d(x, codes.float().unsqueeze(1) * scale.view(12, 1, 1), b, reverse=reverse)
    torch.testing.assert_close(mod(x), torch.clamp(torch.round(conv / 0.02), -127, 127) * 0.02)
    silu_q = QOutput({"type": "output", "inner": "silu", "output": {"bits": 8, "granularity": "tensor"}})
    load_qmodule_tensors(silu_q, {"output_quantizer.scale": torch.tensor([0.01])})
    assert torch.equal(silu_q(x), torch.clamp(torch.round(F.silu(x) / 0.01), -127, 127) * 0.01)


def _scan_args(b=2, length=7, e=6, n=4):
    g = torch.Generator().manual_seed(3)
    u = torch.randn(b, length, e, generator=g)
    delta = F.softplus(torch.randn(b, length, e, generator=g) - 1)
    A = -torch.exp(torch.randn(e, n, generator=g) * 0.3)
    B, C = torch.randn(b, length, n, generator=g), torch.randn(b, length, n, generator=g)
    D = torch.randn(e, generator=g)
    return u, delta, A, B, C, D


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_qscan_input_quantizers_then_float_scan(reverse):
    u, delta, A, B, C, D = _scan_args()
    spec = {"type": "scan", "reverse": reverse, "length": 7, "channels": 6, "d_state": 4,
            "u": {"bits": 8, "granularity": "tensor"}, "B": {"bits": 8, "granularity": "token", "length": 7}}
    mod = build_qmodule(spec)
    load_qmodule_tensors(mod, {"u_quantizer.scale": torch.tensor([0.03]), "B_quantizer.scale": torch.rand(7) * 0.05 + 0.01})
    ref = selective_scan_torch(mod.u_quantizer(u), delta, A, mod.B_quantizer(B), C, D, reverse=reverse)
    with use_kernels("reference"):  # the PyTorch scan reading the codes: bit-identical to dequantizing first
        assert torch.equal(mod(u, delta, A, B, C, D), ref)
    out = mod(u, delta, A, B, C, D)  # CPU default: the fused scan reading the codes, within its tolerance
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, selective_scan_torch(u, delta, A, B, C, D, reverse=reverse), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_qscan_state_quantization_per_step(reverse):
    u, delta, A, B, C, D = _scan_args()
    spec = {"type": "scan", "reverse": reverse, "length": 7, "channels": 6, "d_state": 4,
            "state": {"bits": 8, "narrow": False, "channel_scale": True},
            "y": {"bits": 8, "granularity": "tensor"}}
    mod = build_qmodule(spec)
    h_scale, h_ch = torch.rand(7) * 0.02 + 0.005, torch.rand(6) + 0.5
    load_qmodule_tensors(mod, {"state_scale": h_scale, "state_channel_scale": h_ch, "y_quantizer.scale": torch.tensor([0.05])})
    z = torch.randn(2, 7, 6)
    out = mod(u, delta, A, B, C, D, z)
    y = selective_scan_q_ref(u, delta, A, B, C, reverse=reverse, h_scale=h_scale, h_channel_scale=h_ch)
    expected = (mod.y_quantizer(y) + u * D) * F.silu(z)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # the reference's state quantization really happens: a coarse state grid changes the result
    coarse = selective_scan_q_ref(u, delta, A, B, C, reverse=reverse, h_scale=h_scale * 50, h_channel_scale=h_ch)
    assert (coarse - y).abs().max() > 1e-3
    unquantized = selective_scan_torch(u, delta, A, B, C, reverse=reverse)
    torch.testing.assert_close(selective_scan_q_ref(u, delta, A, B, C, reverse=reverse), unquantized, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="calibrated for 7 tokens"):
        mod(u[:, :5], delta[:, :5], A, B[:, :5], C[:, :5], D)


@pytest.mark.parametrize("k", [40, 64, 33], ids=["ragged", "even", "short-last"])
def test_binary_weights_use_per_group_mean(k):
    from optimum_vim.calibration.tensors import binary_weight_tensors, weight_absmean

    w = torch.randn(5, k, generator=torch.Generator().manual_seed(k))
    mean = weight_absmean(w, 32)
    want = torch.stack([w[:, i:i + 32].abs().mean(1) for i in range(0, k, 32)], 1)
    torch.testing.assert_close(mean, want)
    assert weight_absmean(w.to("meta"), 32).device.type == "meta"  # stays on the weight's device
    t = binary_weight_tensors(w, 32)
    assert t["qweight"].shape == (5, -(-k // 8)) and t["qweight"].dtype == torch.uint8
