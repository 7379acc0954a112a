"""The query side as a NATS micro service (`$SRV.PING/INFO/STATS`, one endpoint per op).

Endpoints listen on `<prefix>.q.*.<op>` in a queue group; the tenant is read from the
subject, so bus permissions on query subjects are tenant isolation. Each request runs in its
own task under a bound: one slow query does not hold up the others, and when the bound is
reached a request gets an immediate "overloaded" answer instead of a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats import micro
from nats.aio.client import Client as NATS
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, Service, ServiceConfig

from jetledger.schemas import CONTENT_TYPE, encode
from jetledger.schemas.codec import content_type_of, decode
from jetledger.schemas.errors import InvalidQuery, InvalidToken, JetledgerError, Overloaded
from jetledger.schemas.queries import (
    OPS,
    ErrorReply,
    EventsQuery,
    GetQuery,
    HeadQuery,
    RejectionsQuery,
    StreamQuery,
    StreamsQuery,
    TenantStatsQuery,
)

from .config import WorkerConfig
from .reader import LedgerReader

__all__ = ["VERSION", "Observer", "QueryService"]

log = logging.getLogger("jetledger.worker")
VERSION = "0.1.0"

#: (reader, tenant, request body, content type) -> the reply's bytes in that content type.
Handler = Callable[[LedgerReader, str, bytes, str], Awaitable[bytes]]
#: Called once per request answered: (op, outcome: "ok" or an error code, seconds).
Observer = Callable[[str, str, float], None]


def _body(data: bytes, type_: type[Any], content_type: str) -> Any:
    if not data:
        data = b"{}" if content_type.endswith("json") else b"\x80"  # empty map: all defaults
    try:
        return decode(data, type_, content_type)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidQuery(f"malformed {type_.__name__} request: {exc}") from None


# Replies holding events come encoded from the reader (stored bytes spliced in, off the
# event loop); the others are small and encoded here.
async def _events(reader: LedgerReader, tenant: str, data: bytes, ct: str) -> bytes:
    return await reader.events(tenant, _body(data, EventsQuery, ct), ct)


async def _get(reader: LedgerReader, tenant: str, data: bytes, ct: str) -> bytes:
    return await reader.get(tenant, _body(data, GetQuery, ct).id, ct)


async def _head(reader: LedgerReader, tenant: str, data: bytes, ct: str) -> bytes:
    return encode(await reader.head(tenant, _body(data, HeadQuery, ct).stream), ct)


async def _streams(reader: LedgerReader, tenant: str, data: bytes, ct: str) -> bytes:
    return encode(await reader.streams(tenant, _body(data, StreamsQuery, ct)), ct)


async def _stream(reader: LedgerReader, tenant: str, data: bytes, ct: str) -> bytes:
    return await reader.stream(tenant, _body(data, StreamQuery, ct).stream, ct)


async def _rejections(reader: LedgerReader, tenant: str, data: bytes, ct: str) -> bytes:
    return encode(await reader.rejections(tenant, _body(data, RejectionsQuery, ct)), ct)


async def _stats(reader: LedgerReader, tenant: str, data: bytes, ct: str) -> bytes:
    _body(data, TenantStatsQuery, ct)  # validates the (empty) request
    return encode(await reader.stats(tenant), ct)


HANDLERS: dict[str, Handler] = {
    "events": _events,
    "get": _get,
    "head": _head,
    "streams": _streams,
    "stream": _stream,
    "rejections": _rejections,
    "stats": _stats,
}
assert set(HANDLERS) == set(OPS), "every op of the wire contract has a handler"


class QueryService:
    def __init__(
        self,
        nc: NATS,
        reader: LedgerReader,
        cfg: WorkerConfig,
        *,
        observe: Observer | None = None,
    ) -> None:
        self._nc = nc
        self._observe: Observer = observe or (lambda op, outcome, seconds: None)
        self._reader = reader
        self._cfg = cfg
        self._subjects = cfg.subjects
        self._slots = asyncio.Semaphore(cfg.query_concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._service: Service | None = None
        self._unknown: Any = None

    async def start(self) -> None:
        self._service = await micro.add_service(
            self._nc,
            ServiceConfig(
                name="jetledger",
                version=VERSION,
                description="jetledger queries: " + ", ".join(HANDLERS),
                queue_group=self._cfg.query_queue_group,
            ),
        )
        for op in HANDLERS:
            await self._service.add_endpoint(
                EndpointConfig(
                    name=op,
                    subject=self._subjects.query_wildcard(op),
                    handler=self._dispatcher(op),
                    queue_group=self._cfg.query_queue_group,
                )
            )
        # Requests to an op that does not exist would otherwise meet "no responders" with no
        # explanation. This listener sees every query subject (its own queue group, so one
        # worker answers) and answers only unknown ops or invalid tenant tokens.
        self._unknown = await self._nc.subscribe(
            f"{self._subjects.prefix}.q.>", queue=f"{self._cfg.query_queue_group}-unknown",
            cb=self._reject_unknown,
        )

    async def _reject_unknown(self, msg: Any) -> None:
        parts = msg.subject.split(".")
        if len(parts) == 4 and parts[3] in HANDLERS:
            return
        try:
            self._subjects.parse_query(msg.subject)
            err: JetledgerError = InvalidQuery(
                f"unknown query op {parts[3]!r}; the ops are: {', '.join(HANDLERS)}")
        except InvalidToken as exc:
            err = InvalidQuery(f"{exc.message}; use {self._subjects.prefix}.q.<tenant>.<op>")
        if msg.reply:
            await _respond_error(Request(msg), err, content_type_of(msg.headers))
        self._observe("unknown", err.code, 0.0)

    async def stop(self) -> None:
        if self._unknown is not None:
            await self._unknown.unsubscribe()
        if self._service is not None:
            await self._service.stop()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    def _dispatcher(self, op: str) -> Callable[[Request], Awaitable[None]]:
        async def dispatch(request: Request) -> None:
            if self._slots.locked():
                await _respond_error(request, Overloaded(
                    f"{self._cfg.query_concurrency} queries are already running; retry shortly"
                ), content_type_of(request.headers))
                self._observe(op, Overloaded.code, 0.0)
                return
            await self._slots.acquire()
            task = asyncio.create_task(self._serve(op, request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return dispatch

    async def _serve(self, op: str, request: Request) -> None:
        ct = content_type_of(request.headers)
        started = time.perf_counter()
        outcome = "ok"
        try:
            tenant, _ = self._subjects.parse_query(request.subject)
            reply = await HANDLERS[op](self._reader, tenant, request.data, ct)
            await request.respond(reply, headers={CONTENT_TYPE: ct})
        except JetledgerError as exc:
            outcome = exc.code
            await _respond_error(request, exc, ct)
        except Exception:
            # Never send internals (reprs, SQL) to the caller: they go to the log.
            outcome = "internal"
            log.exception("query %s on %s failed", op, request.subject)
            await _respond_error(request, None, ct)
        finally:
            self._slots.release()
            self._observe(op, outcome, time.perf_counter() - started)


async def _respond_error(request: Request, exc: JetledgerError | None, ct: str) -> None:
    code, status = (exc.code, exc.status) if exc else ("internal", 500)
    message = exc.message if exc else "internal error in the jetledger worker; see its log"
    try:
        await request.respond_error(
            str(status), f"{code}: {message}",
            data=encode(ErrorReply(code=code, message=message), ct),
            headers={CONTENT_TYPE: ct},
        )
    except Exception:
        log.debug("could not send error reply", exc_info=True)
