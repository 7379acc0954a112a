"""mypy --strict holds for every part, checked under the installed import names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("mypy")


def test_mypy_strict_passes_on_schemas_client_and_worker(tmp_path: Path) -> None:
    # The parts install as jetledger.<part> through setuptools' package-dir mapping, which
    # mypy cannot follow in an editable install: give it the same layout with symlinks.
    pkg = tmp_path / "src" / "jetledger"
    pkg.mkdir(parents=True)
    for part in ("schemas", "client", "worker"):
        (pkg / part).symlink_to(ROOT / part)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(tmp_path / "cache"),
         "-p", "jetledger.schemas", "-p", "jetledger.client", "-p", "jetledger.worker"],
        cwd=ROOT, env={"MYPYPATH": str(tmp_path / "src"), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
