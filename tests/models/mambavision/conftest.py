"""Fixtures for the MambaVision tests: the official model code, run in a subprocess (see official_runner.py).

The official code is NVIDIA's (Source Code License-NC), so it is not vendored into this Apache-2.0 repository. The
tests take it from its PyPI wheel ``mambavision==1.2.0`` (whose ``mamba_vision.py`` equals NVlabs/MambaVision at
7860a50 but for the copyright year), with the timm and einops it pins. Neither can be a project dependency:
``mambavision`` pins mamba-ssm (CUDA build) and transformers 4.50, and timm pulls a torchvision that replaces the
CPU torch. So when they are not importable already, pip installs the three hash-pinned wheels without
dependencies into the pytest cache (once per cache; CI reaches PyPI through pip) and only the subprocess sees them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

OFFICIAL_WHEELS = {
    "mambavision==1.2.0": "3a811c581d925cef1862d35312478dfbdf920e6128859eef1678f864fb1dc313",
    "timm==1.0.15": "5a3dc460c24e322ecc7fd1f3e3eb112423ddee320cb059cc1956fbc9731748ef",
    "einops==0.8.1": "919387eb55330f5757c6bea9165c5ff5cfe63a642682ea788a6d472576d81737",
}
RUNNER = Path(__file__).with_name("official_runner.py")


def _installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("mambavision", "timm", "einops"))


@pytest.fixture(scope="session")
def official_pythonpath(request) -> str:
    """A PYTHONPATH entry holding the official package (empty when the environment already has it)."""
    if _installed():
        return ""
    target = Path(request.config.cache.mkdir("official-mambavision-1.2.0"))
    if not (target / "mambavision" / "models" / "mamba_vision.py").is_file():
        reqs = target.parent / "official-mambavision-requirements.txt"
        reqs.write_text("".join(f"{req} --hash=sha256:{sha}\n" for req, sha in OFFICIAL_WHEELS.items()))
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--require-hashes", "--only-binary=:all:",
             "--target", str(target), "-r", str(reqs)], capture_output=True, text=True)
        assert proc.returncode == 0, (
            "could not install the official MambaVision code for the equivalence tests (pip install --no-deps "
            f"{' '.join(OFFICIAL_WHEELS)}):\n{proc.stderr[-2000:]}")
    return str(target)


@pytest.fixture(scope="session")
def run_official(official_pythonpath, tmp_path_factory):
    """``run_official(spec) -> results``: runs official_runner.py on ``spec`` (see its docstring)."""

    def run(spec: dict) -> dict:
        folder = tmp_path_factory.mktemp("official")
        spec_path, out_path = folder / "spec.json", folder / "out.pt"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (official_pythonpath, env.get("PYTHONPATH", "")) if p)
        proc = subprocess.run([sys.executable, str(RUNNER), str(spec_path), str(out_path)], capture_output=True,
                              text=True, env=env)
        assert proc.returncode == 0, f"the official MambaVision code failed:\n{proc.stderr[-4000:]}"
        return torch.load(out_path, weights_only=False)

    return run
