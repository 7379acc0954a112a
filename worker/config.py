"""Worker settings, with the defaults a ledger needs.

Every field is one setting: `settings.py` turns each into a TOML key, a `JETLEDGER_*`
environment variable and a command-line flag, and docs/operations.md documents exactly these
fields (a test keeps the two in step). `metadata["help"]` is the one-line description.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jetledger.schemas import DEFAULT_PREFIX, Subjects, check_token
from jetledger.schemas.errors import InvalidInput, InvalidToken

__all__ = ["LOG_FORMATS", "SettingError", "WorkerConfig"]

LOG_FORMATS = ("text", "json")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingError(InvalidInput):
    """One setting has a value the worker cannot run with; `setting` names the field."""

    code = "invalid_setting"

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


def _h(help: str, **meta: Any) -> dict[str, Any]:
    """Field metadata: the setting's one-line description (and a flag name if it differs)."""
    return {"help": help, **meta}


@dataclass(slots=True)
class WorkerConfig:
    """Everything the worker needs to run. `nats_url=None` means: start an embedded server."""

    data_dir: Path = field(
        default_factory=lambda: Path("jetledger-data"),
        metadata=_h("directory of the ledger file (and of the embedded server's store)"))
    nats_url: str | None = field(default=None, metadata=_h(
        "NATS server/cluster URL(s), comma-separated; unset: start an embedded nats-server"))
    nats_user: str | None = field(default=None, metadata=_h("NATS user name"))
    nats_password: str | None = field(
        default=None, repr=False, metadata=_h("NATS password", secret=True))
    nats_creds: Path | None = field(
        default=None, metadata=_h("NATS credentials file (JWT + NKey seed)"))
    #: The worker's private reply inbox; with per-user permissions it gets subscribe on
    #: `<inbox_prefix>.>` only, so it cannot read anyone else's replies.
    inbox_prefix: str = field(
        default="_INBOX", metadata=_h("prefix of the worker's reply inboxes"))
    nats_monitor_url: str | None = field(default=None, metadata=_h(
        "NATS monitoring URL (http://host:8222): used at start to warn if the server does "
        "not fsync every write"))
    prefix: str = field(default=DEFAULT_PREFIX, metadata=_h("subject prefix"))
    stream_name: str = field(
        default="JETLEDGER", metadata=_h("JetStream stream name", flag="--stream"))
    consumer_name: str = field(
        default="jetledger-worker", metadata=_h("durable consumer name", flag="--consumer"))
    #: False: never call the JetStream admin API; bind the consumer `jetledger admin init`
    #: created. True still falls back to binding when NATS denies the admin calls.
    provision: bool = field(default=True, metadata=_h(
        "create/update the stream and consumer at start (needs admin rights); false: bind "
        "the existing durable only"))
    replicas: int = field(
        default=1, metadata=_h("stream and consumer replicas (3 in production)"))
    #: Embedded server only: 4222 is what NATS clients try first; 0 picks a free port.
    embedded_port: int = field(default=4222, metadata=_h(
        "embedded server's client port (0: any free port)", flag="--port"))
    db_filename: str = field(
        default="ledger.db", metadata=_h("ledger file name inside data_dir"))
    quick_check: bool = field(default=True, metadata=_h(
        "refuse to start if the ledger file fails PRAGMA quick_check"))
    # 2000: the storage path measured 1.75x faster than at 500 (docs/performance.md); a fetch
    # still returns at once with what is there, so small loads keep their latency.
    batch_size: int = field(default=2000, metadata=_h(
        "messages fetched and committed per transaction (1..10000; at most 8 MiB of them)"))
    fetch_timeout: float = field(
        default=1.0, metadata=_h("seconds one fetch waits for messages"))
    ack_wait: float = field(default=30.0, metadata=_h("consumer AckWait in seconds"))
    #: Unknown kinds are refused instead of stored as plain mappings.
    strict: bool = field(default=False, metadata=_h("refuse unknown event kinds"))
    #: Concurrent queries served at once; more get an "overloaded" answer at once.
    query_concurrency: int = field(default=32, metadata=_h(
        "queries served at once; more are answered 'overloaded'"))
    query_queue_group: str = field(
        default="jetledger", metadata=_h("queue group of the query service"))
    #: How often the consumer's ack floor is recorded in the ledger (for consumer recovery).
    floor_interval: float = field(default=5.0, metadata=_h(
        "seconds between records of the consumer's ack floor"))
    #: Longest pause between retries of a batch the database refused (locked, full, read-only).
    max_retry_delay: float = field(default=5.0, metadata=_h(
        "longest pause (s) between retries of a refused batch"))
    sqlite_busy_timeout_ms: int = field(
        default=5000, metadata=_h("SQLite busy timeout in milliseconds"))
    reconnect_wait: float = field(default=1.0, metadata=_h(
        "seconds between NATS reconnect attempts (the worker never stops trying)"))
    http_host: str = field(
        default="127.0.0.1", metadata=_h("address of the metrics/health HTTP server"))
    http_port: int | None = field(default=None, metadata=_h(
        "port of the metrics/health HTTP server (/metrics, /healthz, /readyz); unset: off, "
        "0: any free port"))
    consumer_info_interval: float = field(default=5.0, metadata=_h(
        "seconds between consumer-info polls (pending gauge, readiness)"))
    #: Below the orchestrator's kill timeout (Kubernetes 30 s, systemd TimeoutStopSec).
    stop_timeout: float = field(default=20.0, metadata=_h(
        "seconds a graceful stop may take before the worker exits hard (nothing unacked is "
        "lost: it is redelivered)"))
    log_level: str = field(default="INFO", metadata=_h("DEBUG, INFO, WARNING, ERROR"))
    log_format: str = field(default="text", metadata=_h(
        "text (for a terminal) or json (one object per line)"))

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.nats_creds is not None:
            self.nats_creds = Path(self.nats_creds)
        for name in ("prefix", "stream_name", "consumer_name", "query_queue_group"):
            _token(name, getattr(self, name))
        _check("replicas", 1 <= self.replicas <= 5, f"replicas must be 1..5, got {self.replicas}")
        _check("batch_size", 1 <= self.batch_size <= 10_000,
               f"batch_size must be 1..10000, got {self.batch_size}")
        _check("query_concurrency", self.query_concurrency >= 1,
               "query_concurrency must be at least 1")
        _check("embedded_port", 0 <= self.embedded_port <= 65535,
               f"embedded_port must be 0..65535, got {self.embedded_port}")
        _check("http_port", self.http_port is None or 0 <= self.http_port <= 65535,
               f"http_port must be 0..65535, got {self.http_port}")
        for name in ("fetch_timeout", "ack_wait", "floor_interval", "max_retry_delay",
                     "consumer_info_interval", "stop_timeout", "reconnect_wait"):
            value = getattr(self, name)
            _check(name, value > 0, f"{name} must be a positive number of seconds, got {value}")
        _check("sqlite_busy_timeout_ms", self.sqlite_busy_timeout_ms >= 0,
               "sqlite_busy_timeout_ms must not be negative")
        _check("db_filename", bool(self.db_filename) and "/" not in self.db_filename,
               f"db_filename must be a plain file name, got {self.db_filename!r}")
        _check("inbox_prefix", bool(self.inbox_prefix) and not any(
            c in self.inbox_prefix for c in " \t*>") and not self.inbox_prefix.endswith("."),
            f"inbox_prefix {self.inbox_prefix!r} is not a valid subject prefix")
        self.log_level = self.log_level.upper()
        _check("log_level", self.log_level in _LOG_LEVELS,
               f"log_level must be one of {', '.join(_LOG_LEVELS)}, got {self.log_level!r}")
        _check("log_format", self.log_format in LOG_FORMATS,
               f"log_format must be text or json, got {self.log_format!r}")
        _check("nats_url", self.nats_url is None or "://" in self.nats_url,
               f"nats_url must look like nats://host:4222, got {self.nats_url!r}")
        _check("nats_monitor_url", self.nats_monitor_url is None
               or self.nats_monitor_url.startswith(("http://", "https://")),
               f"nats_monitor_url must be an http(s) URL, got {self.nats_monitor_url!r}")

    @property
    def db_path(self) -> Path:
        return self.data_dir / self.db_filename

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.prefix)

    @property
    def log_level_number(self) -> int:
        return int(logging.getLevelName(self.log_level))


def _check(setting: str, ok: bool, message: str) -> None:
    if not ok:
        raise SettingError(setting, message)


def _token(setting: str, value: str) -> None:
    try:
        check_token(value, setting)
    except InvalidToken as exc:
        raise SettingError(setting, exc.message) from None
