"""The README's promises: its example runs against a real worker, and CI runs exactly the
README's test command."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from conftest import RunningWorker

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


async def test_readme_example_runs(worker: RunningWorker, tmp_path: Path) -> None:
    (code,) = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(code.splitlines()) <= 25
    script = tmp_path / "example.py"
    script.write_text(code.replace("nats://127.0.0.1:4222", worker.url))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert len(lines) == 5, lines
    assert lines[0] == "inserted 1 1"
    assert lines[1].startswith("1 step_started ")
    assert lines[2].startswith("2 tool_call_completed ")
    assert lines[3] == "2"  # both appends waited for their commit: the head is deterministic
    assert lines[4].startswith("live: ")


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line.strip() for line in README.splitlines()
                   if line.strip().endswith("python -m pytest"))
    assert command in ci
