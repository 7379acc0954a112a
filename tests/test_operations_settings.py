"""Settings: flags > JETLEDGER_* environment > TOML file > defaults; a bad value stops
start-up with exit code 2 and a message naming it; docs/operations.md lists exactly the
WorkerConfig fields; JSON log lines keep stable keys."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from jetledger.client.cli import build_parser
from jetledger.worker.config import WorkerConfig
from jetledger.worker.logs import JsonFormatter, configure_logging
from jetledger.worker.settings import SETTINGS, ConfigError, load_config, settings_table

ROOT = Path(__file__).resolve().parent.parent


def _load(argv: list[str], env: dict[str, str]) -> WorkerConfig:
    return load_config(build_parser().parse_args(["worker", *argv]), environ=env)


def test_precedence_is_flags_then_environment_then_file_then_defaults(tmp_path: Path) -> None:
    toml = tmp_path / "w.toml"
    toml.write_text('batch_size = 100\nstrict = true\nprefix = "fromfile"\n'
                    '[worker]\nack_wait = 7.5\n')
    env = {"JETLEDGER_BATCH_SIZE": "200", "JETLEDGER_HTTP_PORT": "9999",
           "JETLEDGER_CONFIG": str(toml)}
    flags = ["--batch-size", "300", "--no-strict", "--nats-url", "nats://h:1"]
    cfg = _load(flags, env)
    assert (cfg.batch_size, cfg.strict, cfg.nats_url) == (300, False, "nats://h:1")
    assert (cfg.http_port, cfg.prefix, cfg.ack_wait) == (9999, "fromfile", 7.5)
    cfg = _load([], env)
    assert (cfg.batch_size, cfg.strict) == (200, True)
    cfg = _load(["--config", str(toml)], {})
    assert (cfg.batch_size, cfg.http_port) == (100, None)
    cfg = _load([], {})
    defaults = WorkerConfig()
    assert (cfg.batch_size, cfg.prefix, cfg.provision) == (defaults.batch_size, "jetledger", True)
    # An empty variable unsets an optional setting (back to "embedded server").
    assert _load([], {"JETLEDGER_NATS_URL": ""}).nats_url is None


@pytest.mark.parametrize(("where", "value", "expected"), [
    ("file", "batch_size = 'many'", "batch_size (from {file}): 'many' is not an integer"),
    ("file", "replica = 3", "unknown setting(s) replica"),
    ("file", "batch_size = 0", "batch_size must be 1..10000, got 0 (from {file})"),
    ("file", "not toml at all", "not valid TOML"),
    ("env", "JETLEDGER_PROVISION=maybe", "provision (from JETLEDGER_PROVISION): 'maybe' is not"),
    ("env", "JETLEDGER_REPLICAS=9", "replicas must be 1..5, got 9 (from JETLEDGER_REPLICAS)"),
    ("env", "JETLEDGER_LOG_FORMAT=xml", "log_format must be text or json"),
    ("env", "JETLEDGER_PREFIX=a.b", "prefix 'a.b' is not valid"),
    ("flag", "--fetch-timeout=-1",
     "fetch_timeout must be a positive number of seconds, got -1.0 (from --fetch-timeout)"),
    ("flag", "--http-port=70000", "http_port must be 0..65535"),
])
def test_a_bad_setting_is_named_with_its_source(
    tmp_path: Path, where: str, value: str, expected: str
) -> None:
    toml = tmp_path / "w.toml"
    toml.write_text(value if where == "file" else "")
    env = dict([value.split("=", 1)]) if where == "env" else {}
    argv = ["--config", str(toml)] + ([value] if where == "flag" else [])
    with pytest.raises(ConfigError) as err:
        _load(argv, env)
    assert expected.format(file=toml) in str(err.value)


def test_the_worker_command_exits_2_on_a_bad_setting(tmp_path: Path) -> None:
    toml = tmp_path / "w.toml"
    toml.write_text("batch_size = 0\n")
    out = subprocess.run(
        [sys.executable, "-m", "jetledger.client.cli", "worker", "--config", str(toml)],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"}, check=False)
    assert out.returncode == 2
    assert "batch_size must be 1..10000, got 0" in out.stderr and str(toml) in out.stderr
    assert "ready" not in out.stdout


def test_docs_table_lists_exactly_the_workerconfig_fields() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    begin, end = "<!-- settings:begin -->\n", "\n<!-- settings:end -->"
    table = doc[doc.index(begin) + len(begin):doc.index(end)]
    assert table == settings_table(), (
        "docs/operations.md is stale: regenerate with python -m jetledger.worker.settings")
    names = [f.name for f in dataclasses.fields(WorkerConfig)]
    assert [s.name for s in SETTINGS] == names
    for name in names:
        assert f"| `{name}` |" in table
    assert all(s.help for s in SETTINGS), "every setting needs a help text"
    flags = [s.flag for s in SETTINGS]
    assert len(set(flags)) == len(flags)


def test_json_logs_have_stable_keys_and_the_text_format_stays_readable() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        out = io.StringIO()
        configure_logging("info", "json", stream=out)
        log = logging.getLogger("jetledger.test")
        log.info("committed %d", 3, extra={"batch": 7})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
        log.debug("not shown")
        first, second = (json.loads(line) for line in out.getvalue().splitlines())
        assert list(first) == ["ts", "level", "logger", "msg", "batch"]
        assert (first["level"], first["logger"], first["msg"], first["batch"]) == (
            "info", "jetledger.test", "committed 3", 7)
        assert first["ts"].endswith("Z") and "T" in first["ts"]
        assert second["level"] == "error" and "ValueError: boom" in second["exc"]
        text = io.StringIO()
        configure_logging("warning", "text", stream=text)
        log.warning("plain")
        assert text.getvalue().rstrip().endswith("WARNING jetledger.test: plain")
        assert isinstance(JsonFormatter(), logging.Formatter)
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
