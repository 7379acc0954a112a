"""The worker service: wires NATS (embedded or external), the ledger file, ingest and queries."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats
from nats.aio.client import Client as NATS

from .config import WorkerConfig
from .consumer import Ingestor
from .jetstream import ensure_stream
from .natsserver import NatsServer, NatsServerConfig
from .reader import LedgerReader
from .service import QueryService
from .writer import LedgerWriter

__all__ = ["Worker"]

log = logging.getLogger("jetledger.worker")


class Worker:
    """Run with `async with Worker(cfg) as w: await w.run()`; `request_stop()` ends `run`."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.server: NatsServer | None = None
        self._ingest_nc: NATS | None = None
        self._query_nc: NATS | None = None
        self._writer: LedgerWriter | None = None
        self._reader: LedgerReader | None = None
        self._service: QueryService | None = None
        self.ingestor: Ingestor | None = None
        self._stop = asyncio.Event()
        self.url = cfg.nats_url or ""

    async def __aenter__(self) -> Worker:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        cfg = self.cfg
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        if cfg.nats_url is None:
            self.server = NatsServer(
                NatsServerConfig(store_dir=cfg.data_dir / "nats", port=cfg.embedded_port)
            )
            await self.server.astart()
            self.url = self.server.url
            log.info("embedded nats-server (sync_interval: always) at %s", self.url)
        self._ingest_nc = await self._connect("jetledger-worker-ingest")
        js = self._ingest_nc.jetstream()
        await ensure_stream(js, cfg)
        self._writer = await LedgerWriter.open(
            cfg.db_path, js_stream=cfg.stream_name, busy_timeout_ms=cfg.sqlite_busy_timeout_ms
        )
        # Queries get their own NATS connection and SQLite connections: a large reply or a
        # slow query never sits in front of a fetch or a commit.
        self._query_nc = await self._connect("jetledger-worker-query")
        self._reader = await LedgerReader.open(
            cfg.db_path, max_reply_bytes=self._query_nc.max_payload
        )
        self._service = QueryService(self._query_nc, self._reader, cfg)
        await self._service.start()
        self.ingestor = Ingestor(self._ingest_nc, js, self._writer, cfg)

    async def _connect(self, name: str) -> NATS:
        async def on_error(exc: Exception) -> None:
            log.warning("NATS (%s): %s", name, exc)

        async def on_disconnect() -> None:
            log.warning("NATS (%s): disconnected; reconnecting", name)

        async def on_reconnect() -> None:
            log.info("NATS (%s): reconnected", name)

        # Unlimited reconnects: a ledger worker waits out an outage rather than exiting
        # after the client's default budget (60 x 2 s) into a live-but-idle process.
        return await nats.connect(
            self.url,
            name=name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Ingest until `request_stop()`; the current batch is finished or left unacked."""
        assert self.ingestor is not None, "call start() first"
        await self.ingestor.run(self._stop)

    async def close(self) -> None:
        self._stop.set()
        if self._service is not None:
            with contextlib.suppress(Exception):
                await self._service.stop()
        for nc in (self._query_nc, self._ingest_nc):
            if nc is not None and not nc.is_closed:
                with contextlib.suppress(Exception):
                    await nc.drain()
        if self._reader is not None:
            await self._reader.close()
        if self._writer is not None:
            await self._writer.close()
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
        self._service = self._reader = self._writer = None
        self._query_nc = self._ingest_nc = None
        self.server = None
