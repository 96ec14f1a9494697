"""benchmarks/gpu_check.sh --dry-run, as CI runs it on a CPU: everything up to the launch is checked (arguments,
files, imports, the stage scripts' own dry runs, the kernel tests' collection), nothing runs on a GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
from gpu_check_helpers import wheel_problems  # noqa: E402


def _check(*args, cwd=REPO, timeout=600):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_dry_run_checks_everything_up_to_the_launch(tmp_path):
    wheels, data = tmp_path / "wheels", tmp_path / "data"
    wheels.mkdir()
    res = _check("--dry-run", "--out", str(tmp_path / "out"), "--wheels", str(wheels), "--data", str(data))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "budget 350 s" in out and "dry run OK" in out and "timeout_s=440" in out
    for stage in ("env (40 s)", "kernels (100 s)", "e2e (90 s)", "e2e_det (25 s)", "bench (95 s)"):
        assert stage in out, stage
    assert re.search(r"kernel tests: \d+/\d+ tests collected \(\d+ deselected\)", out)
    assert "configurations valid: ['kscale', 'ouromamba', 'ptq4vm', 'rtn', 'vimvq']" in out
    assert "no Fashion-MNIST" in out and "wheels: 0" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["check.log", "summary.md"]
    assert "dry run OK" in (tmp_path / "out" / "check.log").read_text()


@pytest.mark.parametrize("args,message", [
    (["--stages", "env,train"], "unknown stage 'train'"),
    (["--tune-seconds", "soon"], "--tune-seconds must be a whole number"),
    (["--frobnicate"], "unknown option '--frobnicate'"),
    (["--budget", "bench=soon"], "--budget takes STAGE=SECONDS"),
])
def test_bad_arguments_stop_before_anything_runs(tmp_path, args, message):
    res = _check("--dry-run", "--out", str(tmp_path / "out"), *args, timeout=60)
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1 and err[0].startswith(f"gpu_check.sh: error: {message}")
    assert not (tmp_path / "out").exists()


def test_wheels_that_would_stop_the_device_install_are_refused(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("dill-0.4.1-py3-none-any.whl", "dill-0.4.0-py3-none-any.whl"):
        (wheels / name).write_bytes(b"")
    res = _check("--dry-run", "--out", str(tmp_path / "out"), "--wheels", str(wheels), timeout=120)
    assert res.returncode == 2 and "a second version of dill" in res.stdout
    assert "gpu_check.sh: error: the wheels in" in res.stdout + res.stderr  # the log takes both streams
    assert "kernel tests" not in res.stdout  # stopped before the checks that follow


def test_wheel_tags_for_the_device():
    names, problems = wheel_problems([
        "w/datasets-5.2.0-py3-none-any.whl", "w/multiprocess-0.70.19-py312-none-any.whl",
        "w/numpy-2.4.6-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
        "w/torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl", "w/pillow-13.0.0-cp312-cp312-macosx_11_0_arm64.whl",
        "w/notes.txt.whl"])
    assert names == ["datasets", "multiprocess", "numpy", "pillow", "torch"]
    assert len(problems) == 3
    assert "cp311" in problems[0] and "macosx_11_0_arm64" in problems[1] and "not a wheel" in problems[2]
