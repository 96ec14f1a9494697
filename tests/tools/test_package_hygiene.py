"""Package hygiene: no source comment points outside the repository."""

from __future__ import annotations

import optimum_vim  # noqa: F401


def test_no_source_comment_points_outside_the_repository():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    offenders = [str(p.relative_to(root)) for sub in ("optimum_vim", "kernels", "optimum") for p in (root / sub).rglob("*.py")
                 if "../shared" in p.read_text() or "/work/" in p.read_text()]
    assert not offenders
