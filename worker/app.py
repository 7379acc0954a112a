"""The worker service: wires NATS (embedded or external), the ledger file, ingest and queries.

Least privilege: with `provision = false` the worker never calls the JetStream admin API
(`jetledger admin init` created the stream and consumer); it only binds the durable. With
`provision = true` it creates/updates them, and falls back to binding when NATS denies it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from .config import WorkerConfig
from .consumer import Ingestor
from .health import Check, HealthServer, StartupError, check_database, server_syncs_always
from .jetstream import ensure_stream
from .metrics import CONTENT_TYPE, InstrumentedWriter, WorkerMetrics
from .natsserver import NatsServer, NatsServerConfig
from .reader import LedgerReader
from .service import QueryService
from .writer import LedgerWriter

__all__ = ["AdminDenied", "PermissionWatch", "Worker", "connect_nats"]

log = logging.getLogger("jetledger.worker")
T = TypeVar("T")


class AdminDenied(Exception):
    """NATS refused a JetStream API call for lack of permission."""


class PermissionWatch:
    """Permission violations of one connection. NATS never fails the call itself: the
    request just times out and the violation arrives on `error_cb` (field notes), so admin
    calls are raced against it to fail fast."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._changed = asyncio.Event()

    def note(self, text: str) -> None:
        self.seen.append(text)
        self._changed.set()

    async def admin_call(self, aw: Awaitable[T]) -> T:
        """Await `aw`; raise `AdminDenied` once a `$JS.API` violation arrives meanwhile
        (nats-py reports the subject lower-cased)."""
        start = len(self.seen)
        task = asyncio.ensure_future(aw)
        try:
            while True:
                self._changed.clear()
                waiter = asyncio.ensure_future(self._changed.wait())
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                denied = [s for s in self.seen[start:] if "$js.api." in s.lower()]
                if denied:
                    raise AdminDenied(denied[-1])
                if task.done():
                    return task.result()
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task


async def connect_nats(
    cfg: WorkerConfig,
    url: str,
    name: str,
    watch: PermissionWatch,
    *,
    max_reconnect_attempts: int = 60,
    connect_timeout: int = 5,
) -> NATS:
    """Connect with the configured credentials and inbox prefix; violations go to `watch`."""

    async def on_error(exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            watch.note(str(exc))
        log.warning("NATS (%s): %s", name, exc)

    async def on_disconnect() -> None:
        if nc.is_closed:  # our own close() calls this too: not worth a warning
            log.debug("NATS (%s): closed", name)
        else:
            log.warning("NATS (%s): disconnected; reconnecting", name)

    async def on_reconnect() -> None:
        log.info("NATS (%s): reconnected", name)

    auth: dict[str, Any] = {}
    if cfg.nats_user is not None:
        auth.update(user=cfg.nats_user, password=cfg.nats_password or "")
    if cfg.nats_creds is not None:
        auth["user_credentials"] = str(cfg.nats_creds)
    nc = NATS()
    await nc.connect(
        [u.strip() for u in url.split(",")],
        name=name,
        max_reconnect_attempts=max_reconnect_attempts,
        reconnect_time_wait=cfg.reconnect_wait,  # type: ignore[arg-type]  # typed int, a float works
        connect_timeout=connect_timeout,
        inbox_prefix=cfg.inbox_prefix,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        **auth,
    )
    return nc


class _BindingIngestor(Ingestor):
    """The ingest loop, minus consumer provisioning when the worker may not (or must not)
    manage the consumer: then it binds the durable `jetledger admin init` created.

    Overrides `Ingestor._subscribe`; see the report for the `provision` flag proposed for
    consumer.py, which makes this class unnecessary.
    """

    def __init__(self, nc: NATS, js: JetStreamContext, writer: LedgerWriter, cfg: WorkerConfig,
                 *, provision: bool, watch: PermissionWatch) -> None:
        super().__init__(nc, js, writer, cfg)
        self.provision = provision
        self._watch = watch
        self.bound = False

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        self.bound = False
        if self.provision:
            try:
                sub = await self._watch.admin_call(super()._subscribe())
                self.bound = True
                return sub
            except AdminDenied as exc:
                log.warning("no permission to manage consumer %s (%s); binding the existing "
                            "durable instead (set provision = false to skip the attempt)",
                            self._cfg.consumer_name, exc)
                self.provision = False
        sub = await self._js.pull_subscribe_bind(self._cfg.consumer_name, self._cfg.stream_name)
        self.bound = True
        return sub


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
        self.metrics = WorkerMetrics(
            stats=lambda: self.ingestor.stats if self.ingestor is not None else None,
            ready=self.is_ready, writer=lambda: self._writer)
        self.health: HealthServer | None = None
        self._watches: dict[str, PermissionWatch] = {}
        self._running = False
        self._consumer_check: Check | None = None  # None: not known (yet, or not allowed)
        self._poller: asyncio.Task[None] | None = None

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
        if cfg.http_port is not None:
            # First, so probes answer (liveness yes, readiness no) during a slow start.
            self.health = HealthServer(cfg.http_host, cfg.http_port, self.checks,
                                       lambda: (self.metrics.render(), CONTENT_TYPE))
            await self.health.start()
            log.info("metrics and probes on %s (/metrics, /healthz, /readyz)", self.health.url)
        if cfg.quick_check:
            await asyncio.to_thread(check_database, cfg.db_path)
        if cfg.nats_url is None:
            self.server = NatsServer(
                NatsServerConfig(store_dir=cfg.data_dir / "nats", port=cfg.embedded_port)
            )
            await self.server.astart()
            self.url = self.server.url
            log.info("embedded nats-server (sync_interval: always) at %s", self.url)
        else:
            await self._check_sync()
        self._ingest_nc = await self._connect("jetledger-worker-ingest")
        js = self._ingest_nc.jetstream()
        watch = self._watches["jetledger-worker-ingest"]
        provision = cfg.provision
        if provision:
            try:
                await watch.admin_call(ensure_stream(js, cfg))
            except AdminDenied as exc:
                log.warning("no permission to create or update stream %s (%s); using it as "
                            "it is (set provision = false to skip the attempt)",
                            cfg.stream_name, exc)
                provision = False
        writer = await InstrumentedWriter.open(
            cfg.db_path, js_stream=cfg.stream_name, busy_timeout_ms=cfg.sqlite_busy_timeout_ms
        )
        assert isinstance(writer, InstrumentedWriter)
        writer.metrics = self.metrics
        self._writer = writer
        if not provision:
            await self._check_consumer(js, writer, watch)
        # Queries get their own NATS connection and SQLite connections: a large reply or a
        # slow query never sits in front of a fetch or a commit.
        self._query_nc = await self._connect("jetledger-worker-query")
        self._reader = await LedgerReader.open(
            cfg.db_path, max_reply_bytes=self._query_nc.max_payload
        )
        self._service = QueryService(self._query_nc, self._reader, cfg,
                                     observe=self.metrics.observe_query)
        await self._service.start()
        self.ingestor = _BindingIngestor(self._ingest_nc, js, writer, cfg,
                                         provision=provision, watch=watch)
        self._poller = asyncio.create_task(self._poll_consumer())

    async def _connect(self, name: str) -> NATS:
        watch = self._watches.setdefault(name, PermissionWatch())
        # Unlimited reconnects: a ledger worker waits out an outage rather than exiting
        # after the client's default budget (60 x 2 s) into a live-but-idle process.
        return await connect_nats(self.cfg, self.url, name, watch, max_reconnect_attempts=-1)

    async def _check_sync(self) -> None:
        """Warn when the NATS server acks JetStream writes before fsyncing them."""
        url = self.cfg.nats_monitor_url
        if url is None:
            log.info("nats_monitor_url is not set: cannot check that NATS fsyncs every write "
                     "(jetstream { sync_interval: always })")
            return
        try:
            always = await asyncio.to_thread(server_syncs_always, url)
        except Exception as exc:  # noqa: BLE001 - a check, not a dependency
            log.warning("could not read %s/varz to check NATS sync_interval: %s", url, exc)
            return
        if not always:
            log.warning("the NATS server at %s does not fsync every JetStream write (its "
                        "sync_interval is not `always`): acknowledged events can be lost on "
                        "power failure or an OS crash; set jetstream { sync_interval: always }",
                        url)

    async def _check_consumer(
        self, js: JetStreamContext, writer: LedgerWriter, watch: PermissionWatch
    ) -> None:
        """Before binding an existing durable: it must exist, and must not be ahead of this
        ledger file (a new or restored file would silently miss what the consumer acked)."""
        cfg = self.cfg
        try:
            info = await watch.admin_call(js.consumer_info(cfg.stream_name, cfg.consumer_name))
        except NotFoundError:
            raise StartupError(
                f"stream {cfg.stream_name} or its consumer {cfg.consumer_name} does not exist: "
                "run `jetledger admin init` with admin credentials first") from None
        except (AdminDenied, TimeoutError) as exc:
            log.warning("cannot read consumer info (%s): not checking that the consumer "
                        "matches this ledger file", exc)
            return
        last, _ = await writer.ingest_state()
        acked = info.ack_floor.stream_seq if info.ack_floor else 0
        if acked > last:
            raise StartupError(
                f"consumer {cfg.consumer_name} has acked stream sequences up to {acked}, but "
                f"this ledger file holds only up to {last}: it is new or restored. Recreate "
                "it with `jetledger rebuild`, or let the consumer replay with `jetledger "
                "admin init --reset-consumer` (admin credentials)")

    async def _poll_consumer(self) -> None:
        """Consumer info for the pending gauges and readiness, every consumer_info_interval."""
        assert self._query_nc is not None
        cfg = self.cfg
        js = self._query_nc.jetstream(timeout=min(5.0, cfg.consumer_info_interval))
        watch = self._watches["jetledger-worker-query"]
        while not self._stop.is_set():
            if not getattr(self.ingestor, "bound", False):
                # Before the first bind the consumer may not exist yet (the ingest loop
                # creates it when it may): no verdict until then.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.1)
                continue
            try:
                info = await watch.admin_call(
                    js.consumer_info(cfg.stream_name, cfg.consumer_name))
            except NotFoundError:
                self._consumer_check = Check(False, f"consumer {cfg.consumer_name} not found")
            except AdminDenied:
                log.info("no permission to read consumer info: pending gauges stay empty")
                self._consumer_check = None
                return
            except Exception as exc:  # noqa: BLE001 - timeouts, reconnects: try again later
                log.debug("consumer info unavailable: %s", exc)
            else:
                self.metrics.note_consumer(info.num_pending or 0, info.num_ack_pending or 0)
                self._consumer_check = Check(True, f"{info.num_pending} pending, "
                                                   f"{info.num_ack_pending} unacked")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), cfg.consumer_info_interval)

    def checks(self) -> dict[str, Check]:
        """Readiness: NATS connected, consumer bound (and present), storage accepting."""
        out: dict[str, Check] = {}
        conns = [nc for nc in (self._ingest_nc, self._query_nc) if nc is not None]
        connected = len(conns) == 2 and all(nc.is_connected for nc in conns)
        out["nats"] = Check(connected, "connected" if connected else "not connected")
        ing = self.ingestor
        bound = (self._running and not self._stop.is_set() and ing is not None
                 and getattr(ing, "bound", True))
        if not bound:
            out["consumer"] = Check(False, "stopping" if self._stop.is_set() else "not bound")
        elif self._consumer_check is not None and not self._consumer_check.ok:
            out["consumer"] = self._consumer_check
        else:
            detail = self._consumer_check.detail if self._consumer_check else "bound"
            out["consumer"] = Check(True, detail)
        error = ing.stats.last_error if ing is not None else "not open"
        out["storage"] = Check(error is None, error or "accepting commits")
        return out

    def is_ready(self) -> bool:
        return all(c.ok for c in self.checks().values())

    @property
    def http_url(self) -> str:
        """Base URL of /metrics, /healthz, /readyz (needs `http_port`)."""
        if self.health is None:
            raise RuntimeError("the HTTP server is off: set http_port")
        return self.health.url

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Ingest until `request_stop()`; the current batch is finished or left unacked."""
        assert self.ingestor is not None, "call start() first"
        self._running = True
        started = time.monotonic()
        try:
            await self.ingestor.run(self._stop)
        finally:
            self._running = False
            log.info("ingest stopped after %.1fs", time.monotonic() - started)

    async def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(BaseException):
                await self._poller
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
        if self.health is not None:
            await self.health.close()
        self._service = self._reader = self._writer = None
        self._query_nc = self._ingest_nc = None
        self.server = None
        self.health = None
        self._poller = None
