"""CPU kernel family (``optimum_vim_kernels.cpu``) against the references: both integer GEMM paths (``int_mm``,
``sgemm``) and the float-activation paths (decode per call, opt-in decode cache) bit-identical to the references,
the per-CPU path choice, cached decodings invalidated and counted, and ``auto`` dispatch on CPU tensors."""

from __future__ import annotations

import gc

import pytest
import torch
from optimum_vim_kernels import cpu, reference
from optimum_vim_kernels.format import pack_codes, pack_signed
from transformers import AutoModelForImageClassification

from optimum_vim import ViMQuantizationConfig
from optimum_vim.ops.dispatch import KernelUnsupportedError, pick_kernel, use_kernels

SHAPES = [(1, 8, 32), (37, 45, 100), (70, 24, 130), (5, 3, 7)]
PATHS = ["int_mm", "sgemm"]


@pytest.fixture(params=PATHS)
def gemm_path(request):
    """Runs the test once per integer GEMM path, forced."""
    with cpu.use_gemm_path(request.param):
        yield request.param


@pytest.fixture(params=[False, True], ids=["decode", "cache"])
def decode_cache(request):
    """Runs the test with weights decoded on every call (default) and with the opt-in fp32 decode cache."""
    cpu.set_decode_cache(request.param)
    yield request.param
    cpu.set_decode_cache(None)


def _weight(n, k, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    if bits == 1:
        codes = torch.randint(0, 2, (n, k), generator=g) * 2 - 1
    else:
        hi = (1 << (bits - 1)) - 1
        codes = torch.randint(-hi, hi + 1, (n, k), generator=g)
    return codes, (codes.to(torch.int8) if bits == 8 else pack_signed(codes, bits))


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("bits", [8, 4, 3, 2, 1])
@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("zero", [False, True])
def test_int8_activations_bit_identical(m, n, k, bits, group, zero, gemm_path):
    _, qw = _weight(n, k, bits)
    g = torch.Generator().manual_seed(1)
    ws = torch.rand(n, 1 if group is None else -(-k // group), generator=g) + 0.05
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    kw = dict(bits=bits, in_features=k, group_size=group, a_scale=torch.rand(m, generator=g) + 0.01,
              a_zero=torch.randint(-128, 128, (m,), dtype=torch.int32, generator=g) if zero else None,
              bias=torch.randn(n, generator=g))
    assert torch.equal(cpu.quant_gemm(a, qw, ws, **kw), reference.quant_gemm_ref(a, qw, ws, **kw))
    out_scale = torch.rand(m, generator=g) + 0.5
    assert torch.equal(cpu.quant_gemm(a, qw, ws, out_scale=out_scale, **kw),
                       reference.quant_gemm_ref(a, qw, ws, out_scale=out_scale, **kw))


@pytest.mark.parametrize("m,n,k,bits,zero", [(33, 17, 1101, 8, 127), (9, 20, 2404, 8, None), (4, 9, 909, 8, -128),
                                             (3, 4, 20001, 4, 127)])
def test_sgemm_path_is_exact_beyond_fp32_sums(m, n, k, bits, zero):
    """Extreme odd codes (|a - a_zero| = 255 or 128, |w| at its largest odd value) over a K whose exact sums leave
    fp32's 24-bit range: the sgemm path's K chunks keep every sum exact (the reference rounds the exact integer once)."""
    hi = (1 << (bits - 1)) - 1
    w = torch.full((n, k), hi, dtype=torch.int64)
    w[:, ::7] = -hi
    qw = w.to(torch.int8) if bits == 8 else pack_signed(w, bits)
    a = torch.full((m, k), -128 if zero != -128 else 127, dtype=torch.int8)
    a[:, 1::5] = 127 if zero != -128 else -128
    a_zero = None if zero is None else torch.full((m,), zero, dtype=torch.int32)
    kw = dict(bits=bits, in_features=k, a_scale=torch.ones(m), a_zero=a_zero)
    exact = (a.double() - (0 if zero is None else zero)) @ w.double().t()
    assert exact.abs().max() > 2**24 and not torch.equal(exact, exact.float().double())  # beyond fp32
    ref = reference.quant_gemm_ref(a, qw, torch.ones(n, 1), **kw)
    assert torch.equal(ref, exact.float())
    for path in PATHS:
        with cpu.use_gemm_path(path):
            assert torch.equal(cpu.quant_gemm(a, qw, torch.ones(n, 1), **kw), ref), path


def test_one_zero_point_and_scale_for_every_row(gemm_path):
    """A per-tensor quantizer hands the GEMM (1,) scale and zero point; the result equals the per-row call."""
    m, n, k = 23, 19, 50
    _, qw = _weight(n, k, 4)
    ws = torch.rand(n, 1) + 0.1
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    one = dict(bits=4, in_features=k, a_scale=torch.tensor([0.02]), a_zero=torch.tensor([-17], dtype=torch.int32))
    rows = dict(bits=4, in_features=k, a_scale=torch.full((m,), 0.02),
                a_zero=torch.full((m,), -17, dtype=torch.int32))
    out = cpu.quant_gemm(a, qw, ws, **one)
    assert torch.equal(out, cpu.quant_gemm(a, qw, ws, **rows))
    assert torch.equal(out, reference.quant_gemm_ref(a, qw, ws, **one))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (3, None)])
def test_float_activations_bit_identical(dtype, bits, group, decode_cache):
    m, n, k = 19, 33, 70
    _, qw = _weight(n, k, bits)
    ws = torch.rand(n, 1 if group is None else -(-k // group)) + 0.05
    a = torch.randn(m, k).to(dtype)
    kw = dict(bits=bits, in_features=k, group_size=group, bias=torch.randn(n))
    out = cpu.quant_gemm(a, qw, ws, **kw)
    assert out.dtype == dtype and torch.equal(out, reference.quant_gemm_ref(a, qw, ws, **kw))


@pytest.mark.parametrize("vec,scaled", [(4, True), (8, False), (3, True), (3, False)])
def test_codebook_weights_bit_identical(vec, scaled, decode_cache):
    m, n, k = 11, 21, 70
    cb = torch.randn(256, vec)
    qw = pack_codes(torch.randint(0, 256, (n, -(-k // vec))), 8)
    ws = torch.rand(n, 1) + 0.5 if scaled else None
    a = torch.randn(m, k)
    kw = dict(bits=8, in_features=k, codebook=cb)
    assert torch.equal(cpu.quant_gemm(a, qw, ws, **kw), reference.quant_gemm_ref(a, qw, ws, **kw))


@pytest.mark.parametrize("num_outliers", [0, 5])
def test_outlier_gemm_bit_identical(num_outliers, gemm_path, decode_cache):
    m, n, k = 29, 35, 80
    _, qw = _weight(n, k, 4)
    ws = torch.rand(n, 1) * 0.1
    a = torch.randint(-7, 8, (m, k), dtype=torch.int8)
    idx = torch.randperm(k)[:num_outliers].to(torch.int32)
    a[:, idx.long()] = 0
    args = (a, torch.rand(m) + 0.05, qw, ws, idx, torch.randn(m, num_outliers) * 20)
    kw = dict(bits=4, in_features=k, bias=torch.randn(n))
    assert torch.equal(cpu.outlier_gemm(*args, **kw), reference.outlier_gemm_ref(*args, **kw))


@pytest.mark.parametrize("length_scale", [True, False])
def test_combine_directions_bit_identical(length_scale):
    b, length, e = 3, 9, 16
    y_f, y_b, z = (torch.randn(b, length, e) for _ in range(3))
    scale = torch.rand(length if length_scale else 1) * 0.02 + 0.01
    zero = torch.randint(-10, 10, scale.shape, dtype=torch.int32)
    for kw in (dict(out_scale=scale, out_zero=zero), dict(out_scale=scale), dict()):
        assert torch.equal(cpu.combine_directions(y_f, y_b, z, **kw), reference.combine_directions_ref(y_f, y_b, z, **kw))


def test_decoded_weights_are_cached_and_invalidated():
    cpu.clear_cache()
    _, qw = _weight(16, 40, 4)
    ws = torch.rand(16, 1)
    a = torch.randint(-128, 128, (3, 40), dtype=torch.int8)
    w8 = cpu.int8_weight(qw, 4, 40)
    assert cpu.int8_weight(qw, 4, 40) is w8  # decoded once
    assert cpu.cache_bytes() >= 16 * 40
    before = cpu.quant_gemm(a, qw, ws, bits=4, in_features=40, a_scale=torch.ones(3))
    qw.copy_(_weight(16, 40, 4, seed=7)[1])  # an in-place write (load_state_dict) bumps the version counter
    assert cpu.int8_weight(qw, 4, 40) is not w8
    after = cpu.quant_gemm(a, qw, ws, bits=4, in_features=40, a_scale=torch.ones(3))
    assert not torch.equal(before, after)
    assert torch.equal(after, reference.quant_gemm_ref(a, qw, ws, bits=4, in_features=40, a_scale=torch.ones(3)))
    w = cpu.float_weight(qw, ws, 4, 40)
    ws.mul_(2)  # the scale is part of the key too
    assert not torch.equal(cpu.float_weight(qw, ws, 4, 40), w)
    del qw, w8
    gc.collect()
    assert cpu.cache_bytes() == 0  # freed with the packed tensor


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("k,group", [(64, None), (61, None), (96, 32), (100, 32)])
def test_fast_weight_decoding_equals_the_reference_decoding(bits, k, group):
    """Byte tables (1/2/4 bits), bit fields (3/5/6/7) and int8 storage: the reference's values and memory layout."""
    n = 13
    _, qw = _weight(n, k, bits, seed=bits)
    ws = torch.rand(n, 1 if group is None else -(-k // group)) + 0.1
    ref = reference.dequantize_weight_ref(qw, ws, bits, k, group)
    fast = cpu.decode_weight(qw, ws, bits, k, group)
    assert torch.equal(fast, ref) and fast.stride() == ref.stride()
    assert torch.equal(cpu.int8_weight(qw, bits, k).long(), reference.decode_int_weight(qw, bits, k).long())


@pytest.mark.parametrize("index_bits,vec", [(8, 4), (6, 2), (4, 3), (2, 8), (1, 5), (3, 2)])
@pytest.mark.parametrize("scaled", [True, False])
def test_fast_codebook_decoding_equals_the_reference_decoding(index_bits, vec, scaled):
    n, k = 11, 38  # 38 inputs: the last sub-vector is padded for vec 3, 5 and 8
    n_vec = -(-k // vec)
    cb = torch.randn(1 << index_bits, vec).half()
    qw = pack_codes(torch.randint(0, 1 << index_bits, (n, n_vec)), index_bits)
    ws = torch.rand(n, 1).half() + 0.5 if scaled else None
    ref = reference.dequantize_weight_ref(qw, ws, index_bits, k, codebook=cb)
    fast = cpu.decode_weight(qw, ws, index_bits, k, codebook=cb)
    assert torch.equal(fast, ref) and fast.stride() == ref.stride()


def test_weight_only_layers_keep_no_fp32_copy_unless_asked(decode_cache):
    cpu.clear_cache()
    n, k = 24, 64
    _, qw = _weight(n, k, 4)
    ws = torch.rand(n, 1)
    a = torch.randn(5, k)
    out = cpu.quant_gemm(a, qw, ws, bits=4, in_features=k)
    assert torch.equal(out, reference.quant_gemm_ref(a, qw, ws, bits=4, in_features=k))
    assert cpu.cache_bytes() == (4 * n * k if decode_cache else 0)
    assert cpu.cache_bytes([qw]) == cpu.cache_bytes() and cpu.cache_bytes([ws]) == 0  # attributed to the codes
    cpu.set_decode_cache(False)  # turning the cache off frees what it held
    assert cpu.cache_bytes() == 0


def test_decode_cache_switch_refuses_bad_values(monkeypatch):
    with pytest.raises(TypeError, match="True, False or None"):
        cpu.set_decode_cache("yes")
    monkeypatch.setenv(cpu.DECODE_CACHE_ENV, "maybe")
    with pytest.raises(ValueError, match="use 1"):
        cpu.decode_cache_enabled()
    monkeypatch.setenv(cpu.DECODE_CACHE_ENV, "on")
    assert cpu.decode_cache_enabled()


def test_gemm_path_is_forced_by_the_environment_or_the_context(monkeypatch):
    monkeypatch.setenv(cpu.GEMM_PATH_ENV, "sgemm")
    assert cpu.int_gemm_path(64, 32, 32) == "sgemm"
    with cpu.use_gemm_path("int_mm"):  # the context wins over the environment
        assert cpu.int_gemm_path(64, 32, 32) == "int_mm"
    monkeypatch.setenv(cpu.GEMM_PATH_ENV, "fast")
    with pytest.raises(ValueError, match="OPTIMUM_VIM_CPU_GEMM='fast'"):
        cpu.int_gemm_path(64, 32, 32)
    with pytest.raises(ValueError, match="unknown CPU GEMM path"), cpu.use_gemm_path("fast"):
        pass


def test_auto_times_the_paths_once_per_shape_bucket_where_int8_dot_products_are_missing(monkeypatch, count_calls):
    """Without VNNI / AMX the choice is measured (once per (N, K, M bucket)); with them int_mm needs no timing; an
    fp32 GEMM in reduced precision rules sgemm out."""
    monkeypatch.delenv(cpu.GEMM_PATH_ENV, raising=False)
    monkeypatch.setattr(cpu, "_choices", {})
    monkeypatch.setattr(cpu, "int8_dot_product", lambda: False)
    timings = count_calls(cpu, "_time_paths")
    first = cpu.int_gemm_path(50, 24, 40)
    assert first in PATHS and timings["n"] == 1
    assert cpu.int_gemm_path(60, 24, 40) == first and timings["n"] == 1  # same bucket (M <= 64): no new timing
    cpu.int_gemm_path(5000, 24, 40)  # M bucket 1024
    threads = torch.get_num_threads()
    assert timings["n"] == 2 and set(cpu.gemm_path_choices()) == {(24, 40, 64, threads), (24, 40, 1024, threads)}
    path, times = cpu.gemm_path_choices()[(24, 40, 64, threads)]
    assert path == min(times, key=times.get) and set(times) == set(PATHS)
    torch.set_num_threads(1 if threads != 1 else 2)  # the engine calibrates at one thread: its own choice
    try:
        cpu.int_gemm_path(50, 24, 40)
        assert timings["n"] == 3
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(cpu, "int8_dot_product", lambda: True)
    assert cpu.int_gemm_path(7, 8, 9) == "int_mm" and timings["n"] == 3
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        monkeypatch.setattr(cpu, "int8_dot_product", lambda: False)
        assert cpu.int_gemm_path(7, 8, 9) == "int_mm" and timings["n"] == 3
        with pytest.raises(RuntimeError, match="IEEE fp32"), cpu.use_gemm_path("sgemm"):
            cpu.int_gemm_path(7, 8, 9)
    finally:
        torch.set_float32_matmul_precision(previous)


def test_int8_dot_product_follows_the_cpu_and_an_isa_cap(monkeypatch):
    from optimum_vim_kernels import cpu_features

    monkeypatch.setattr(cpu, "cpu_features", lambda: cpu_features.CpuFeatures(avx2=True, avx512_vnni=True))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    cpu.int8_dot_product.cache_clear()
    try:
        assert cpu.int8_dot_product()
        cpu.int8_dot_product.cache_clear()
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN capped below VNNI: no int8 dot products
        assert not cpu.int8_dot_product()
        cpu.int8_dot_product.cache_clear()
        monkeypatch.setattr(cpu, "cpu_features", lambda: cpu_features.CpuFeatures(avx2=True, fma=True))
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
        assert not cpu.int8_dot_product()  # an AVX2-only CPU (AMD EPYC Zen 2/3)
    finally:
        cpu.int8_dot_product.cache_clear()


def test_supports_gives_reasons():
    assert cpu.supports_quant_gemm(m=4, n=4, k=4, bits=3) is None
    assert "int8 codes" in cpu.supports_quant_gemm(m=4, n=4, k=4, bits=4, int_activations=True, act_dtype=torch.int16)
    assert "overflow" in cpu.supports_quant_gemm(m=4, n=4, k=1 << 16, bits=8, int_activations=True,
                                                 act_dtype=torch.int8)
    assert "float activations" in cpu.supports_quant_gemm(m=4, n=4, k=4, bits=8, codebook=True,
                                                          int_activations=True, act_dtype=torch.int8)
    with pytest.raises(KernelUnsupportedError, match="overflow"), use_kernels("cpu"):
        pick_kernel("gemm", "quant_gemm", torch.zeros(1), m=4, n=4, k=1 << 16, bits=8, int_activations=True,
                    act_dtype=torch.int8)
    with use_kernels("reference"):
        assert pick_kernel("gemm", "quant_gemm", torch.zeros(1), m=4, n=4, k=4, bits=8) is None
    assert pick_kernel("gemm", "quant_gemm", torch.zeros(1), m=4, n=4, k=4, bits=8) is cpu.quant_gemm  # auto


@pytest.fixture(scope="module")
def quantized_models(tiny_vim_dir):
    data = torch.randn(16, 1, 28, 28)
    configs = {
        "w8a8-tensor": ViMQuantizationConfig(weight_bits=8, act_bits=8, calibration_dataset=data),
        "w4a8-token-scan": ViMQuantizationConfig(weight_bits=4, act_bits=8, calibration_dataset=data,
                                                 recipe_args={"act_granularity": "token", "scan_act_bits": 8}),
        "w3-g32": ViMQuantizationConfig(weight_bits=3, weight_group_size=32),
    }
    return {k: AutoModelForImageClassification.from_pretrained(tiny_vim_dir, quantization_config=c).eval()
            for k, c in configs.items()}


@pytest.mark.parametrize("name", ["w8a8-tensor", "w4a8-token-scan", "w3-g32"])
def test_whole_model_on_cpu_kernels_equals_reference(quantized_models, name, count_calls, gemm_path, decode_cache):
    model = quantized_models[name]
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad(), use_kernels("reference"):
        ref = model(x).logits
    calls = count_calls(cpu, "quant_gemm")
    with torch.no_grad():
        auto = model(x).logits
        with use_kernels("cpu"):
            forced = model(x).logits
    assert calls["n"] == 2 * 12  # every block linear of both forwards went through the CPU GEMM
    assert torch.equal(auto, ref) and torch.equal(forced, ref)


def test_memory_footprint_counts_the_kernel_caches(quantized_models, decode_cache):
    """get_memory_footprint() = parameters + buffers + what the CPU kernels keep for this model: int8 codes of the
    sub-8-bit A8 weights (1 byte per weight) always, fp32 decodings (4 bytes per weight) only with the opt-in cache."""
    cpu.clear_cache()
    x = torch.randn(2, 1, 28, 28)
    for name, kept in (("w4a8-token-scan", 1), ("w3-g32", 4 if decode_cache else 0)):
        model = quantized_models[name]
        stored = sum(t.nelement() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        assert model.get_memory_footprint() == stored  # nothing cached before a forward
        with torch.no_grad():
            model(x)
        weights = sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "qweight"))
        extra = model.get_memory_footprint() - stored
        assert kept * weights <= extra == cpu.cache_bytes(model.buffers()), name
        assert extra <= kept * weights + 4 * 2 * weights // 8, name  # + int32 column sums at most
    cpu.clear_cache()
    gc.collect()


def test_nan_inputs_still_give_nan_rows_on_cpu_kernels(quantized_models, gemm_path):
    layer = quantized_models["w8a8-tensor"].vim.layers[0].mixer.in_proj
    x = torch.randn(2, 5, layer.in_features)
    x[1, 3, 7] = float("nan")
    x[0, 2, 1], x[0, 2, 4] = float("inf"), float("-inf")  # sums to NaN, holds none: not a NaN row
    with torch.no_grad():
        y = layer(x)
    nan = torch.isnan(y).any(-1)
    assert nan[1, 3] and int(nan.sum()) == 1 and torch.isnan(y[1, 3]).all()
    x[1, 3, 7] = 0.0  # +inf and -inf in different rows: the whole tensor sums to NaN, no row holds one
    x[1, 0, 0] = float("-inf")
    with torch.no_grad():
        assert not torch.isnan(layer(x)).any()
