"""`SqliteThread`: one SQLite connection, used only from a thread of its own.

The writer's transaction is about ten statements. Handing each to a database thread and back
(as aiosqlite does: a round trip through the event loop, ~80 µs here when the loop is idle,
more when it is busy receiving the next batch) put every one of those waits into every
commit. Here a whole transaction is one function and one hand-off. The reader does the same
with its pool of connections (`reader.py`).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Concatenate, ParamSpec, TypeVar

__all__ = ["SqliteThread"]

T = TypeVar("T")
P = ParamSpec("P")


class SqliteThread:
    """A connection that lives on one thread: it is made there (`open`), used there (`run`)
    and closed there, so SQLite's same-thread check stays on. Calls run one at a time, in the
    order they were made. A call whose caller is cancelled still runs to its end: the
    function, not the caller, decides what a half-done call leaves behind (the writer's
    transaction commits or rolls back inside it)."""

    def __init__(self, executor: ThreadPoolExecutor, conn: sqlite3.Connection) -> None:
        self._executor = executor
        self._conn: sqlite3.Connection | None = conn

    @classmethod
    async def open(cls, connect: Callable[[], sqlite3.Connection], name: str) -> SqliteThread:
        """Start a thread called `name` and make its connection there with `connect`."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        try:
            conn = await asyncio.get_running_loop().run_in_executor(executor, connect)
        except BaseException:
            executor.shutdown(wait=False)  # `connect` closes what it opened before failing
            raise
        return cls(executor, conn)

    async def run(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """`fn(connection, *args, **kwargs)` on the connection's thread."""
        conn = self._conn
        if conn is None:
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(conn, *args, **kwargs))

    async def close(self) -> None:
        """Close the connection after the calls already made, then end the thread."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        finally:
            self._executor.shutdown(wait=False)
