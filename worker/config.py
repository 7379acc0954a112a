"""Worker settings, with the defaults a ledger needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from jetledger.schemas import DEFAULT_PREFIX, Subjects, check_token
from jetledger.schemas.errors import InvalidInput

__all__ = ["WorkerConfig"]


@dataclass(slots=True)
class WorkerConfig:
    """Everything the worker needs to run. `nats_url=None` means: start an embedded server."""

    data_dir: Path = field(default_factory=lambda: Path("jetledger-data"))
    nats_url: str | None = None
    prefix: str = DEFAULT_PREFIX
    stream_name: str = "JETLEDGER"
    consumer_name: str = "jetledger-worker"
    replicas: int = 1
    #: Embedded server only: 4222 is what NATS clients try first; 0 picks a free port.
    embedded_port: int = 4222
    db_filename: str = "ledger.db"
    batch_size: int = 500
    fetch_timeout: float = 1.0
    ack_wait: float = 30.0
    #: Unknown kinds are refused instead of stored as plain mappings.
    strict: bool = False
    #: Concurrent queries served at once; more get an "overloaded" answer at once.
    query_concurrency: int = 32
    query_queue_group: str = "jetledger"
    #: How often the consumer's ack floor is recorded in the ledger (for consumer recovery).
    floor_interval: float = 5.0
    #: Longest pause between retries of a batch the database refused (locked, full, read-only).
    max_retry_delay: float = 5.0
    sqlite_busy_timeout_ms: int = 5000

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        check_token(self.prefix, "prefix")
        for name in ("stream_name", "consumer_name"):
            check_token(getattr(self, name), name)
        if not 1 <= self.replicas <= 5:
            raise InvalidInput(f"replicas must be 1..5, got {self.replicas}")
        if not 1 <= self.batch_size <= 10_000:
            raise InvalidInput(f"batch_size must be 1..10000, got {self.batch_size}")
        if self.query_concurrency < 1:
            raise InvalidInput("query_concurrency must be at least 1")

    @property
    def db_path(self) -> Path:
        return self.data_dir / self.db_filename

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.prefix)
