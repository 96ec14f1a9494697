"""The ``dynamic_outlier`` activation granularity (OuroMamba's extractor): detection per sample at run time,
windows refreshed in scan order, 8-bit / fp16 outliers, and the QLinear that runs it through ``outlier_gemm``."""

from __future__ import annotations

import pytest
import torch

from optimum_vim.calibration.tensors import rtn_weight_tensors
from optimum_vim.modules import QActivation, build_qmodule, load_qmodule_tensors
from optimum_vim.ops.dispatch import use_kernels
from optimum_vim.primitives.outliers import detect_outlier_masks, extract_outliers


def _quantizer(length, channels, bits=4, symmetric=True, **extra):
    spec = {"granularity": "dynamic_outlier", "bits": bits, "symmetric": symmetric, "length": length,
            "channels": channels, **extra}
    q = QActivation(spec)
    return q


def _naive_masks(x, lo, hi, refresh, sigma, reverse):
    """Token-by-token loop over one sample at a time (no window vectorisation): the extractor as specified."""
    b, length, c = x.shape
    order = list(range(length))[::-1] if reverse else list(range(length))
    out = torch.zeros(b, length, c, dtype=torch.bool)
    for i in range(b):
        mask = torch.zeros(c, dtype=torch.bool)
        for step, t in enumerate(order):
            if step % refresh == 0:
                mask = torch.zeros(c, dtype=torch.bool)
            xi = x[i, t].masked_fill(mask, 0.0)
            if ((xi > hi[t]) | (xi < lo[t])).any():
                a = xi.abs()
                mask = mask | (a > a.mean() + sigma * a.std())
            out[i, t] = mask
    return out


def _moving_outliers(b=3, length=23, c=32, seed=0):
    """Activations whose outlier channels move from token to token (the OuroMamba observation)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, c, generator=g)
    for t in range(length):
        ch = torch.randint(0, c, (b, 2), generator=g)
        x[torch.arange(b)[:, None], t, ch] = 25.0 * torch.sign(torch.randn(b, 2, generator=g))
    return x


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("refresh", [10, 4, 1], ids=["r10", "r4", "r1"])
def test_detection_matches_the_token_by_token_definition(reverse, refresh):
    x = _moving_outliers()
    hi = torch.full((23,), 3.0)
    got = detect_outlier_masks(x, -hi, hi, refresh=refresh, sigma=3.0, reverse=reverse)
    want = _naive_masks(x, -hi, hi, refresh, 3.0, reverse)
    assert torch.equal(got, want)
    assert got.any() and not got.all()


def test_outliers_persist_inside_a_window_and_reset_at_the_refresh():
    x = torch.randn(1, 20, 16) * 0.1
    x[0, 2, 5] = 50.0  # one outlier at token 2, channel 5
    s = torch.full((20,), 0.5 / 7)  # inlier range +-0.5
    split = extract_outliers(x, s, None, -7, 7, refresh=10)
    m = split.outlier_mask[0, :, 5]
    assert not m[:2].any() and m[2:10].all() and not m[10:].any()
    assert split.outlier_mask.sum() == 8  # nothing else was flagged
    # backward scan: the window of token 2 is tokens 9..0 in scan order, so it covers tokens 0..2 only
    mr = extract_outliers(x, s, None, -7, 7, refresh=10, reverse=True).outlier_mask[0, :, 5]
    assert mr[:3].all() and not mr[3:].any()


def test_outliers_are_kept_at_8_bit_or_fp16_and_the_inliers_on_the_static_grid():
    x = _moving_outliers(seed=1)
    s = torch.full((23,), 3.0 / 7)
    for bits in (8, 16):
        split = extract_outliers(x, s, None, -7, 7, outlier_bits=bits)
        m = split.outlier_mask
        assert m.any()
        assert torch.equal(split.inlier_codes[m], torch.zeros(int(m.sum())))
        assert (split.outlier_values[~m] == 0).all()
        err = (split.outlier_values - x)[m].abs().max()
        if bits == 16:
            assert torch.equal(split.outlier_values[m], x[m].half().float())
        else:
            assert err <= 25.0 / 127 / 2 + 1e-5
        inl = split.inlier_codes[~m]
        assert inl.min() >= -7 and inl.max() <= 7 and torch.equal(inl, inl.round())
    # mixed precision beats the same static 4-bit grid without the extractor by a wide margin
    plain = (torch.round(x / s.view(1, -1, 1)).clamp(-7, 7) * s.view(1, -1, 1) - x).pow(2).mean()
    mixed = (extract_outliers(x, s, None, -7, 7).dequantize() - x).pow(2).mean()
    assert mixed < plain / 10


def test_each_sample_decides_alone():
    x = _moving_outliers(b=4)
    s = torch.full((23,), 3.0 / 7)
    full = extract_outliers(x, s, None, -7, 7).dequantize()
    for i in range(4):
        torch.testing.assert_close(extract_outliers(x[i : i + 1], s, None, -7, 7).dequantize(), full[i : i + 1],
                                   rtol=0, atol=0)


def test_asymmetric_delta_grid_and_4_sigma():
    g = torch.Generator().manual_seed(0)
    delta = torch.rand(2, 12, 24, generator=g) * 0.2
    delta[:, 3, 7] = 9.0
    scale = torch.full((12,), 0.2 / 15)
    zero = torch.zeros(12, dtype=torch.int32)
    q = _quantizer(12, 24, symmetric=False, outlier_sigma=4.0)
    load_qmodule_tensors(q, {"scale": scale, "zero_point": zero})
    out = q(delta)
    assert (out - delta).abs().max() < 0.2 / 15  # the 9.0 spike is an outlier, the rest fits the unsigned grid
    split = q.outlier_split(delta)
    assert split.outlier_mask[:, 3, 7].all() and split.zero is not None


def test_static_outlier_list_ablation():
    x = _moving_outliers(seed=2)
    q = _quantizer(23, 32, static_outliers=True)
    mask = torch.zeros(32, dtype=torch.uint8)
    mask[[1, 4]] = 1
    load_qmodule_tensors(q, {"scale": torch.full((23,), 3.0 / 7), "outlier_channels": mask})
    split = q.outlier_split(x)
    assert torch.equal(split.outlier_mask, mask.bool().expand(3, 23, 32))
    dyn = _quantizer(23, 32)
    load_qmodule_tensors(dyn, {"scale": torch.full((23,), 3.0 / 7)})
    # the moving outliers defeat a static list; the dynamic extractor follows them
    assert (dyn(x) - x).pow(2).mean() < (q(x) - x).pow(2).mean() / 10


def test_quantize_of_an_outlier_quantizer_points_to_outlier_split():
    q = _quantizer(23, 32)
    load_qmodule_tensors(q, {"scale": torch.full((23,), 3.0 / 7)})
    with pytest.raises(ValueError, match="outlier_split"):
        q.quantize(_moving_outliers())


def test_spec_is_validated_and_reload_is_bit_identical():
    with pytest.raises(ValueError, match="outlier_bits"):
        _quantizer(8, 4, outlier_bits=4)
    with pytest.raises(ValueError, match="refresh"):
        _quantizer(8, 4, refresh=0)
    with pytest.raises(ValueError, match="outlier_sigma"):
        _quantizer(8, 4, outlier_sigma=-1)
    with pytest.raises(ValueError, match="sequence length"):
        QActivation({"granularity": "dynamic_outlier", "bits": 4})
    with pytest.raises(ValueError, match="channel count"):
        QActivation({"granularity": "dynamic_outlier", "bits": 4, "length": 8, "static_outliers": True})
    q = _quantizer(23, 32, outlier_bits=16, refresh=5, outlier_sigma=2.5, reverse=True)
    load_qmodule_tensors(q, {"scale": torch.rand(23) * 0.5 + 0.1})
    assert set(dict(q.named_buffers())) == {"scale"}
    again = build_qmodule(q.spec)
    again.load_state_dict(q.state_dict())
    x = _moving_outliers(seed=3)
    assert torch.equal(again(x), q(x)) and again.spec == q.spec
    with pytest.raises(ValueError, match="23 tokens"):
        q(torch.randn(1, 22, 32))


def _outlier_linear(k=32, n=24, length=23, bias=True):
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.1
    spec = {"type": "linear", "in_features": k, "out_features": n, "bias": bias,
            "weight": {"format": "int", "bits": 4, "group_size": None},
            "input": {"granularity": "dynamic_outlier", "bits": 4, "symmetric": True, "length": length,
                      "channels": k}}
    layer = build_qmodule(spec)
    tensors = {**rtn_weight_tensors(w, 4, None), "input_quantizer.scale": torch.full((length,), 3.0 / 7)}
    if bias:
        tensors["bias"] = torch.randn(n)
    load_qmodule_tensors(layer, tensors)
    return layer


def test_qlinear_runs_the_outlier_gemm_reference_on_cpu():
    layer = _outlier_linear()
    x = _moving_outliers(seed=4)
    y = layer(x)
    want = layer.input_quantizer(x) @ layer.dequantized_weight().t() + layer.bias
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    codes, a_scale, idx, values = layer.input_quantizer.outlier_gemm_operands(x)
    assert codes.dtype == torch.int8 and codes.shape == (3 * 23, 32) and a_scale.shape == (3 * 23,)
    mask = layer.input_quantizer.outlier_split(x).outlier_mask.reshape(-1, 32)
    assert torch.equal(idx.long(), mask.any(0).nonzero().reshape(-1)) and values.shape == (3 * 23, idx.numel())
    assert 0 < int((values != 0).sum()) <= int(mask.sum())  # a row's values are zero off its own outliers


def test_qlinear_outlier_gemm_under_triton_equals_the_reference(count_calls):
    pytest.importorskip("triton")
    from optimum_vim_kernels import outlier

    device = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU, interpreted here
    layer = _outlier_linear(k=32, n=16, length=12).to(device)
    x = _moving_outliers(b=2, length=12, seed=5).to(device)
    with use_kernels("reference"):
        ref = layer(x)
    calls = count_calls(outlier, "outlier_gemm")
    with use_kernels("triton"):
        out = layer(x)
    assert calls["n"] == 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    with use_kernels("reference"):
        layer(x)
    assert calls["n"] == 1  # the reference policy never reaches the kernel


def test_official_delta_rules_range_trigger_and_affine_outliers():
    """The official Δ quantizer: detection when the inliers' span exceeds the grid's width (not when a value leaves
    the interval), and 8-bit outliers on an affine [0, 255] grid per (sample, token)."""
    x = torch.zeros(1, 2, 12)
    x[0, 0] = torch.linspace(-1.0, 10.0, 12)  # leaves [0, 15] below, but spans only 11 < 15
    x[0, 1] = torch.linspace(0.5, 14.0, 12)
    x[0, 1, 3] = 40.0  # spans 39.5 > 15
    lo, hi = torch.zeros(2), torch.full((2,), 15.0)
    interval = detect_outlier_masks(x, lo, hi, refresh=1, sigma=1.0, reverse=False)
    span = detect_outlier_masks(x, lo, hi, refresh=1, sigma=1.0, reverse=False, trigger="range")
    assert interval[0, 0].any() and not span[0, 0].any()
    assert span[0, 1, 3] and interval[0, 1, 3]
    with pytest.raises(ValueError, match="trigger"):
        detect_outlier_masks(x, lo, hi, refresh=1, sigma=1.0, reverse=False, trigger="max")
    # affine outliers: one zero point per (sample, token); zeros of the inlier channels stay exact
    g = torch.Generator().manual_seed(0)
    y = torch.rand(2, 5, 16, generator=g) * 0.1
    y[:, :, 2] = 3.0 + torch.rand(2, 5, generator=g)
    y[:, :, 7] = 9.0
    scale, zero = torch.full((5,), 0.01), torch.zeros(5)
    listed = torch.zeros(16, dtype=torch.bool)
    listed[[2, 7]] = True
    split = extract_outliers(y, scale, zero, 0, 15, refresh=10, sigma=3.0, outlier_affine=True, static_mask=listed)
    values = split.outlier_values
    assert torch.equal(values == 0, ~split.outlier_mask)
    step = y.masked_fill(~split.outlier_mask, 0.0).amax(-1, keepdim=True) / 255
    assert ((values - y).abs().masked_fill(~split.outlier_mask, 0.0) <= step / 2 + 1e-6).all()
    symmetric = extract_outliers(y, scale, zero, 0, 15, refresh=10, sigma=3.0, static_mask=listed).outlier_values
    assert not torch.equal(values, symmetric)


def test_official_rules_travel_in_the_spec_and_reload_bit_identically():
    q = _quantizer(6, 32, symmetric=False, outlier_trigger="range", outlier_affine=True)
    with torch.no_grad():
        q.scale.copy_(torch.full((6,), 0.2))
        q.zero_point.copy_(torch.full((6,), 3, dtype=torch.int32))
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1)) * 2
    x[:, :, 5] = 30.0
    again = _quantizer(6, 32, symmetric=False, outlier_trigger="range", outlier_affine=True)
    load_qmodule_tensors(again, dict(q.state_dict()))
    assert torch.equal(again(x), q(x))
    assert not torch.equal(q(x), _reloaded_default(q, x))
    with pytest.raises(ValueError, match="outlier_trigger"):
        _quantizer(6, 8, outlier_trigger="span")
    with pytest.raises(ValueError, match="outlier_affine"):
        _quantizer(6, 8, outlier_affine="yes")


def _reloaded_default(q, x):
    plain = _quantizer(6, 32, symmetric=False)
    load_qmodule_tensors(plain, dict(q.state_dict()))
    return plain(x)


def test_qoutput_with_only_an_input_quantizer():
    spec = {"type": "output", "inner": "softplus", "output": None,
            "input": {"granularity": "dynamic_outlier", "bits": 4, "symmetric": False, "length": 6, "channels": 8}}
    q = build_qmodule(spec)
    with torch.no_grad():
        q.input_quantizer.scale.fill_(0.25)
        q.input_quantizer.zero_point.fill_(8)
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(q(x), torch.nn.functional.softplus(q.input_quantizer(x)))
    assert not torch.equal(q(x), torch.nn.functional.softplus(x))
    with pytest.raises(ValueError, match="input or an output"):
        build_qmodule({"type": "output", "inner": "softplus", "input": None, "output": None})


def test_a_single_channel_is_never_an_outlier_and_warns_nothing():
    """A one-channel input (a tiny model's dt_proj, dt_rank 1) has no spread to be an outlier against: every rule
    flags nothing, without Tensor.std's degrees-of-freedom warning."""
    import warnings

    from optimum_vim.calibration.outlier_fakequant import calibration_outlier_masks, static_outlier_channels

    x = torch.randn(3, 12, 1) * 50
    lo, hi = torch.full((12,), -0.01), torch.full((12,), 0.01)  # every token clips
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not detect_outlier_masks(x, lo, hi, refresh=4, sigma=3.0, reverse=False).any()
        for threshold in ("inliers", "raw"):
            assert not calibration_outlier_masks(x, 4, 3.0, False, threshold).any()
        assert not static_outlier_channels(x).any()
