"""CPU feature detection: the ISA line every benchmark prints and the per-CPU kernel choices read."""

import platform

import pytest
from optimum_vim_kernels import cpu_features as cf

EPYC_AVX2 = "fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma bmi2 sha_ni"
SAPPHIRE = EPYC_AVX2 + " avx512f avx512bw avx512_vnni avx_vnni avx512_bf16 amx_tile amx_int8 amx_bf16"
GRAVITON = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimddp i8mm sve"


@pytest.fixture
def fake_linux(monkeypatch):
    def install(flags: str, arch: str = "x86_64", model: str = "test cpu"):
        monkeypatch.setattr(platform, "system", lambda: "Linux")
        monkeypatch.setattr(platform, "machine", lambda: arch)
        monkeypatch.setattr(cf, "_linux_flags", lambda: (set(flags.split()), model))
        cf.cpu_features.cache_clear()
        return cf.cpu_features()

    yield install
    cf.cpu_features.cache_clear()


def test_avx2_without_vnni(fake_linux):
    f = fake_linux(EPYC_AVX2, model="AMD EPYC 7B13")
    assert f.avx2 and f.fma and not f.avx512f and not f.vnni and not f.amx
    assert f.isa == "AVX2 (no VNNI)"
    assert "AMD EPYC 7B13" in cf.describe_cpu() and "AVX2 (no VNNI)" in cf.describe_cpu()


def test_avx512_vnni_amx(fake_linux):
    f = fake_linux(SAPPHIRE)
    assert f.avx512f and f.vnni and f.amx
    assert f.isa == "AVX-512 + AVX512-VNNI + BF16 + AMX"


def test_arm_neon_dotprod(fake_linux):
    f = fake_linux(GRAVITON, arch="aarch64")
    assert f.neon and f.neon_dotprod and f.neon_i8mm and f.vnni and not f.avx2
    assert f.isa == "NEON + dotprod + i8mm + SVE"


def test_no_flag_list_falls_back_to_torch_dispatch(monkeypatch, fake_linux):
    monkeypatch.setattr(cf, "_torch_capability", lambda: "AVX2")
    f = fake_linux("")
    assert f.avx2 and not f.avx512f and f.torch_capability == "AVX2"
