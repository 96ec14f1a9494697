"""Helpers of benchmarks/gpu_check.sh: ``wheels`` (can these wheels install on the device?), ``env`` (versions and
the GPU, as JSON) and ``summary`` (summary.md from the stage results and the files the stages wrote).

    python benchmarks/gpu_check_helpers.py wheels WHEEL...
    python benchmarks/gpu_check_helpers.py env OUT.json
    python benchmarks/gpu_check_helpers.py summary OUTDIR STAGE=RESULT=SECONDS...
"""

from __future__ import annotations

import json
import platform
import re
import sys
from pathlib import Path

# the device machine: CPython 3.12 on manylinux x86_64 (/work/.library/device: KINDS.md)
DEVICE_PYTHON_TAGS = {"py3", "py312", "cp312"}
_WHEEL = re.compile(r"(?P<name>[^-]+)-(?P<ver>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl")


def wheel_problems(paths: list[str]) -> tuple[list[str], list[str]]:
    """(distribution names, problems) of a wheel folder's files for the device: a name that is not a wheel's, a
    wheel for another Python or platform, two versions of one distribution (pip stops the whole install)."""
    seen: dict[str, str] = {}
    problems = []
    for path in paths:
        m = _WHEEL.fullmatch(Path(path).name)
        if not m:
            problems.append(f"{path}: not a wheel file name")
            continue
        name = m["name"].lower().replace("_", "-")
        if not DEVICE_PYTHON_TAGS & set(m["py"].split(".")):
            problems.append(f"{path}: built for {m['py']}; the device runs CPython 3.12")
        if not all(p == "any" or (p.endswith("x86_64") and "linux" in p) for p in m["plat"].split(".")):
            problems.append(f"{path}: platform {m['plat']}; the device is manylinux x86_64")
        if name in seen:
            problems.append(f"{path}: a second version of {name} (also {seen[name]}); keep one, two stop the install")
        seen[name] = path
    return sorted(seen), problems


def env(out: str) -> int:
    """Versions, the GPU and the optional packages, written to ``out``; exit 3 without a CUDA GPU."""
    import torch
    import transformers
    import triton

    import optimum_vim
    from optimum_vim.ops.dispatch import mamba_scan_available

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "transformers": transformers.__version__,
            "optimum_vim": optimum_vim.__version__, "optimum_vim_from": str(Path(optimum_vim.__file__).parent),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "mamba_ssm": mamba_scan_available()}
    try:
        import datasets

        info["datasets"] = datasets.__version__
    except ImportError:
        info["datasets"] = None
    Path(out).write_text(json.dumps(info, indent=1))
    print(info)
    return 0 if info["gpu"] else 3


def summary(outdir: str, stages: list[str]) -> str:
    """summary.md: the stage table, the kernel tests' verdict, the e2e tables, the calibration timing, the benchmark
    tables, the tuning."""
    out = Path(outdir)
    lines = ["# gpu_check summary", ""]
    if (out / "env.json").is_file():
        lines += ["```", (out / "env.json").read_text().strip(), "```", ""]
    lines += ["| stage | result | seconds |", "|---|---|---|"]
    for item in stages:
        name, result, seconds = item.split("=", 2)
        lines.append(f"| {name} | {result} | {seconds} |")
    log = out / "check.log"
    if log.is_file():
        verdicts = [ln for ln in log.read_text(errors="replace").splitlines()
                    if re.match(r"(FAILED|ERROR) ", ln) or re.search(r"\d+ (passed|failed)", ln)]
        lines += ["", *verdicts[-40:]]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_e2e import markdown as e2e_markdown

    for name in ("e2e", "e2e_det"):
        path = out / f"{name}.json"
        if path.is_file():
            result = json.loads(path.read_text())
            lines += ["", f"## {name}.json (deterministic algorithms: {result.get('deterministic')})", "",
                      e2e_markdown(result)]
            lines += [f"{key}: {json.dumps(result[key])[:1500]}" for key in ("float", "rtn_cpu_vs_gpu", "cli")
                      if key in result]
    if (out / "calib.json").is_file():
        c = json.loads((out / "calib.json").read_text())
        lines += ["", f"## calib.json: PTQ4VM W4A4 on a Vim-S shape, {c['blocks']} blocks in {c['seconds']:.1f} s -> "
                  f"24 blocks ~ {c['estimate_24_blocks_s']:.0f} s (goal < {c['goal_s']} s; scan in training: "
                  f"{c['training_scan']})"]
    if (out / "bench.md").is_file():
        lines += ["", "## benchmarks/gpu_kernels.py", "", (out / "bench.md").read_text()]
    if (out / "tuned.json").is_file():
        t = json.loads((out / "tuned.json").read_text())
        gains = sorted(r["default_ms"] / r["best_ms"] for r in t.get("measured", []) if r["best_ms"] > 0)
        lines += ["", f"## tuned.json: {len(gains)} shapes tuned, complete: {t.get('complete')}; commit as "
                  f"{t.get('file')}"]
        if gains:
            lines.append(f"winners over the built-in choice: median {gains[len(gains) // 2]:.2f}x, max {gains[-1]:.2f}x")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "wheels":
        names, problems = wheel_problems(rest)
        for p in problems:
            print(f"  wheel problem: {p}")
        print(f"  wheels: {len(names)} ({', '.join(names) or 'none'})")
        return 1 if problems else 0
    if command == "env":
        return env(rest[0])
    if command == "summary":
        print(summary(rest[0], rest[1:]))
        return 0
    print(f"unknown command {command!r}\n{__doc__}")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
