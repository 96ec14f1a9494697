"""What the CPU at hand can do: the instruction-set extensions that decide which CPU kernel is fastest.

Kernel choices that are fast on one CPU and slow on another (an int8 GEMM is ~25x slower than the fp32 one on an
AVX2 CPU without VNNI, several times faster on one with AMX) are made per CPU from :func:`cpu_features`, and every
benchmark prints :func:`describe_cpu` in its header so a table always says which CPU it was measured on.

Detection reads ``/proc/cpuinfo`` on Linux, ``sysctl`` on macOS and falls back to PyTorch's own dispatch level
(``torch.backends.cpu.get_cpu_capability()``, e.g. ``AVX2`` / ``AVX512`` / ``DEFAULT``) elsewhere (Windows).
"""

from __future__ import annotations

import functools
import platform
import subprocess
from dataclasses import dataclass, fields

# Linux /proc/cpuinfo flag -> our feature name (x86); ARM "Features" words below
_X86_FLAGS = {
    "avx2": "avx2",
    "fma": "fma",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "avx512_bf16": "avx512_bf16",
    "amx_tile": "amx_tile",
    "amx_int8": "amx_int8",
    "amx_bf16": "amx_bf16",
}
_ARM_FLAGS = {"asimd": "neon", "asimddp": "neon_dotprod", "i8mm": "neon_i8mm", "sve": "sve"}


@dataclass(frozen=True)
class CpuFeatures:
    """Instruction-set extensions of this CPU (False where unknown)."""

    arch: str = ""
    model: str = ""
    avx2: bool = False
    fma: bool = False
    avx512f: bool = False
    avx512bw: bool = False
    avx512_vnni: bool = False
    avx_vnni: bool = False
    avx512_bf16: bool = False
    amx_tile: bool = False
    amx_int8: bool = False
    amx_bf16: bool = False
    neon: bool = False
    neon_dotprod: bool = False
    neon_i8mm: bool = False
    sve: bool = False
    torch_capability: str = ""

    @property
    def vnni(self) -> bool:
        """An int8 dot-product instruction (x86 VNNI, 256- or 512-bit, or ARM SDOT): integer GEMMs can be fast."""
        return self.avx512_vnni or self.avx_vnni or self.neon_dotprod

    @property
    def amx(self) -> bool:
        return self.amx_tile and self.amx_int8

    @property
    def isa(self) -> str:
        """The short ISA summary benchmarks print, e.g. ``AVX2 (no VNNI)`` or ``AVX-512 + VNNI + AMX``."""
        if self.neon or self.arch in ("arm64", "aarch64"):
            parts = ["NEON"] + [n for n, on in (("dotprod", self.neon_dotprod), ("i8mm", self.neon_i8mm),
                                                ("SVE", self.sve)) if on]
            return " + ".join(parts)
        if self.avx512f:
            base = "AVX-512"
        elif self.avx2:
            base = "AVX2"
        else:
            base = self.torch_capability or "baseline x86"
        extras = []
        if self.avx512_vnni:
            extras.append("AVX512-VNNI")
        elif self.avx_vnni:
            extras.append("AVX-VNNI")
        if self.avx512_bf16:
            extras.append("BF16")
        if self.amx:
            extras.append("AMX")
        if not self.vnni and base in ("AVX2", "AVX-512"):
            return f"{base} (no VNNI)"
        return " + ".join([base, *extras])


def _torch_capability() -> str:
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - older torch without the query
        return ""


def _linux_flags() -> tuple[set[str], str]:
    flags: set[str] = set()
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("flags", "features") and not flags:
                    flags = set(value.split())
                elif key in ("model name", "cpu model", "hardware") and not model:
                    model = value.strip()
    except OSError:
        pass
    return flags, model


def _macos_flags() -> tuple[set[str], str]:
    def sysctl(name: str) -> str:
        try:
            return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    model = sysctl("machdep.cpu.brand_string")
    flags = {w.lower() for w in (sysctl("machdep.cpu.features") + " " + sysctl("machdep.cpu.leaf7_features")).split()}
    if platform.machine() == "arm64":  # Apple silicon: NEON always, dot product from the M1 on, i8mm from the M2 on
        flags |= {"asimd"}
        if sysctl("hw.optional.arm.FEAT_DotProd") == "1":
            flags.add("asimddp")
        if sysctl("hw.optional.arm.FEAT_I8MM") == "1":
            flags.add("i8mm")
    else:  # Intel macs name the flags in capitals with dots (AVX2, AVX512F, AVX512VNNI, ...)
        flags = {f.replace(".", "_") for f in flags}
        renames = {"avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avxvnni": "avx_vnni",
                   "fma": "fma", "avx2": "avx2", "avx512f": "avx512f", "avx512bw": "avx512bw"}
        flags = {renames.get(f, f) for f in flags}
    return flags, model


@functools.lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    """The features of this machine's CPU (computed once per process)."""
    system, arch = platform.system(), platform.machine().lower()
    if system == "Linux":
        flags, model = _linux_flags()
    elif system == "Darwin":
        flags, model = _macos_flags()
    else:
        flags, model = set(), platform.processor()
    cap = _torch_capability()
    found = {name: True for flag, name in {**_X86_FLAGS, **_ARM_FLAGS}.items() if flag in flags}
    if not flags:  # no flag list (Windows): what PyTorch dispatches to is the best we know
        if cap.startswith("AVX512"):
            found.update(avx2=True, fma=True, avx512f=True, avx512bw=True)
        elif cap.startswith("AVX2"):
            found.update(avx2=True, fma=True)
        if arch in ("arm64", "aarch64"):
            found["neon"] = True
    known = {f.name for f in fields(CpuFeatures)}
    return CpuFeatures(arch=arch, model=model or platform.processor() or arch, torch_capability=cap,
                       **{k: v for k, v in found.items() if k in known})


def describe_cpu() -> str:
    """One line for benchmark headers: model, ISA summary, PyTorch's dispatch level, cores."""
    import os

    f = cpu_features()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU: {f.model} | ISA: {f.isa} | torch dispatch: {f.torch_capability or '?'} | {cores} cores"


__all__ = ["CpuFeatures", "cpu_features", "describe_cpu"]
