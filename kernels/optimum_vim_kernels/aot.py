"""Ahead-of-time compilation of every kernel variant for a GPU target, on any machine (no GPU needed).

The Triton wheel ships ptxas and cuobjdump, so CPU-only CI can catch GPU-only compile errors, shared-memory
overflow and register spills that the interpreter never sees. Must run with ``TRITON_INTERPRET`` unset::

    python -m optimum_vim_kernels.aot            # table of variants: shared memory, registers, spills
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SM90 = GPUTarget("cuda", 90, 32)
MAX_SHARED = 232448  # bytes of shared memory per block on H100 (227 KiB)


@dataclass
class Compiled:
    name: str
    shared: int
    registers: int | None
    stack: int | None
    has_wgmma: bool


def _signature(fn, pointers: dict[str, str], constexprs: dict, floats=()) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in pointers:
            sig[name] = pointers[name]
        elif name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return sig


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    reg = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return (int(reg.group(1)) if reg else None), (int(stack.group(1)) if stack else None)


def variants():
    """(name, jit function, pointer types, constexprs, float scalar args) of every variant worth compiling."""
    from . import gemm, outlier, scan

    out = []
    base = dict(VQ=False, VEC=1, GROUP=1, PER_GROUP=False, HAS_WS=True, HAS_ZERO=False, HAS_BIAS=True,
                A_PER_ROW=True, REQUANT=False, OS_PER_ROW=False, DOT_F32=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)
    gemm_ptrs = {"a_ptr": "*i8", "w_ptr": "*u8", "ws_ptr": "*fp32", "cb_ptr": "*fp32", "bias_ptr": "*fp32",
                 "as_ptr": "*fp32", "az_ptr": "*i32", "os_ptr": "*fp32", "c_ptr": "*fp16"}
    for bits in (8, 4, 2, 1):
        wt = "*i8" if bits == 8 else "*u8"
        out.append((f"gemm W{bits}A8 per-channel", gemm._quant_gemm_kernel, {**gemm_ptrs, "w_ptr": wt},
                    {**base, "BITS": bits, "INT_A": True, "HAS_ZERO": True}, ()))
        out.append((f"gemm W{bits}A8 g64 int8-out", gemm._quant_gemm_kernel, {**gemm_ptrs, "w_ptr": wt, "c_ptr": "*i8"},
                    {**base, "BITS": bits, "INT_A": True, "GROUP": 64, "PER_GROUP": True, "REQUANT": True,
                     "OS_PER_ROW": True}, ()))
        for act in ("fp16", "bf16"):
            out.append((f"gemm W{bits}A16 ({act}) g128", gemm._quant_gemm_kernel,
                        {**gemm_ptrs, "a_ptr": f"*{act}", "w_ptr": wt, "c_ptr": f"*{act}"},
                        {**base, "BITS": bits, "INT_A": False, "GROUP": 128, "PER_GROUP": True, "BLOCK_K": 128}, ()))
    out.append(("gemm VQ 8-bit idx d4 (fp16)", gemm._quant_gemm_kernel, {**gemm_ptrs, "a_ptr": "*fp16"},
                {**base, "BITS": 8, "VQ": True, "VEC": 4, "INT_A": False}, ()))
    out.append(("gemm VQ 6-bit idx d2 (fp16)", gemm._quant_gemm_kernel, {**gemm_ptrs, "a_ptr": "*fp16"},
                {**base, "BITS": 6, "VQ": True, "VEC": 2, "INT_A": False}, ()))
    out.append(("outlier gemm W4A8", outlier._outlier_gemm_kernel,
                {"a_ptr": "*i8", "as_ptr": "*fp32", "w_ptr": "*u8", "ws_ptr": "*fp32", "idx_ptr": "*i32",
                 "ov_ptr": "*fp32", "bias_ptr": "*fp32", "c_ptr": "*fp16"},
                dict(BITS=4, HAS_BIAS=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_P=32), ()))
    scan_ptrs = {n: "*fp32" for n in scan._scan_kernel.arg_names if n.endswith("_ptr")}
    scan_ptrs["dz_ptr"] = "*i32"
    for reverse in (False, True):
        for int_in in (False, True):
            for hq in (False, True):
                ptrs = dict(scan_ptrs)
                if int_in:
                    ptrs.update(u_ptr="*i8", d_ptr="*i8", b_ptr="*i8", c_ptr="*i8")
                else:
                    ptrs.update(u_ptr="*fp16", d_ptr="*fp16", b_ptr="*fp16", c_ptr="*fp16", z_ptr="*fp16", y_ptr="*fp16")
                consts = dict(N=16, BLOCK_E=64, REVERSE=reverse, U_INT=int_in, U_TOK=int_in, D_INT=int_in, D_TOK=False,
                              D_ZERO=int_in, B_INT=int_in, B_TOK=int_in, C_INT=int_in, C_TOK=int_in, HAS_DBIAS=not int_in,
                              SOFTPLUS=not int_in, HAS_D=True, HAS_Z=True, HQ=hq, HQ_CH=hq)
                name = f"scan {'rev' if reverse else 'fwd'} {'int8' if int_in else 'fp16'}{' +state8' if hq else ''}"
                out.append((name, scan._scan_kernel, ptrs, consts, ("h_qmin", "h_qmax")))
    out.append(("combine int8-out", scan._combine_kernel,
                {"yf_ptr": "*fp16", "yb_ptr": "*fp16", "z_ptr": "*fp16", "os_ptr": "*fp32", "oz_ptr": "*i32",
                 "out_ptr": "*i8"},
                dict(DIVIDE=True, HAS_Z=True, REQUANT=True, OS_TOK=True, BLOCK=1024, QMIN=-128.0, QMAX=127.0,
                     HAS_OZ=True), ()))
    return out


def compile_all(target: GPUTarget = SM90) -> list[Compiled]:
    """Compiles every variant for ``target`` and reports its resources."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset (run in a fresh process)")
    results = []
    for name, fn, ptrs, consts, floats in variants():
        sig = _signature(fn, ptrs, consts, floats)
        # the GEMMs launch with 8 warps (4 spill registers at 64x64 tiles with in-register weight decoding)
        warps = 8 if name.startswith(("gemm", "outlier")) else 4
        kernel = triton.compile(ASTSource(fn, sig, consts), target=target, options={"num_warps": warps})
        regs, stack = _resources(kernel.asm["cubin"])
        results.append(Compiled(name, kernel.metadata.shared, regs, stack, "wgmma" in kernel.asm.get("ptx", "")))
    return results


def main() -> int:
    rows = compile_all()
    print("| variant | shared (bytes) | registers | stack | wgmma |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.name} | {r.shared} | {r.registers} | {r.stack} | {r.has_wgmma} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
