"""The jetledger worker: consumes JetStream, commits to SQLite, answers queries."""

from .app import Worker
from .config import WorkerConfig

__all__ = ["Worker", "WorkerConfig"]
