"""`LedgerClient`: append events to jetledger and query them, over NATS.

    async with await LedgerClient.connect("nats://127.0.0.1:4222", tenant="acme") as ledger:
        result = await ledger.append(new_event(tenant="acme", stream="run-1",
                                               data=StepStarted(step_id="s1", name="plan")),
                                     wait=True)
        page = await ledger.events(stream="run-1")
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any, Literal, TypeVar

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.js.errors import APIError, NoStreamResponseError

from jetledger.schemas import (
    CONTENT_TYPE,
    DEFAULT_PREFIX,
    HEADER_NOTIFY,
    MSGPACK,
    Event,
    EventBatch,
    EventsPage,
    EventsQuery,
    GetQuery,
    HeadQuery,
    Outcome,
    StoredEvent,
    StreamHead,
    StreamsPage,
    StreamsQuery,
    Subjects,
    check_token,
    encode,
)
from jetledger.schemas.codec import canonical_bytes, content_type_of, decode, normalize_event
from jetledger.schemas.envelope import MAX_BATCH_EVENTS
from jetledger.schemas.errors import (
    ConflictError,
    EventTooLarge,
    ExpectedSeqMismatch,
    InvalidEvent,
    InternalError,
    InvalidInput,
    JetledgerError,
    LedgerTimeout,
    NotFound,
    OutcomeUnknown,
    PermissionDenied,
    TransportError,
    Unavailable,
    error_for_code,
)
from jetledger.schemas.queries import (
    ErrorReply,
    RejectionsPage,
    RejectionsQuery,
    StreamQuery,
    StreamRecord,
    TenantStats,
    TenantStatsQuery,
)

__all__ = ["AppendResult", "LedgerClient"]

T = TypeVar("T")


class AppendResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What `append` learned. `outcome` is "accepted" (JetStream stored it; the worker has not
    reported yet) unless you waited, then "inserted" or "duplicate" with `seq`/`position`."""

    id: str
    outcome: Literal["accepted", "inserted", "duplicate"]
    js_seq: int | None = None
    stream: str | None = None
    seq: int | None = None
    position: int | None = None


def _header_bytes(headers: dict[str, str]) -> int:
    # NATS/1.0\r\n + "k: v\r\n"... + \r\n, as the client puts them on the wire.
    return 12 + sum(len(k) + len(v) + 4 for k, v in headers.items())


class LedgerClient:
    """Async client for producers and readers. Bind `tenant` to skip it on every query."""

    def __init__(
        self,
        nc: NATS,
        *,
        tenant: str | None = None,
        prefix: str = DEFAULT_PREFIX,
        content_type: str = MSGPACK,
        timeout: float = 5.0,
        publish_attempts: int = 3,
        own_connection: bool = False,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream(timeout=timeout)
        self._subjects = Subjects(prefix)
        self.tenant = check_token(tenant, "tenant") if tenant is not None else None
        self._ct = content_type
        self.timeout = timeout
        self._attempts = max(1, publish_attempts)
        self._own = own_connection
        self._permission_errors: list[str] = []

    @classmethod
    async def connect(
        cls,
        url: str | Sequence[str] = "nats://127.0.0.1:4222",
        *,
        tenant: str | None = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        creds: str | None = None,
        inbox_prefix: str | None = None,
        connect_timeout: float = 5.0,
        max_reconnect_attempts: int = 60,
        nats_options: dict[str, Any] | None = None,
        **client_options: Any,
    ) -> LedgerClient:
        """Open a NATS connection owned (and closed) by the client.

        Bound to a tenant, replies come to the inbox prefix `_INBOX_<tenant>` (unless given):
        with per-tenant NATS users (deploy/nats/auth.conf) a tenant may only read its own
        inbox, and a client on the default `_INBOX` prefix would never see its PubAcks.
        `nats_options` go to `nats.connect` as they are; other keywords to the client.
        """
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            # Permission violations are not raised by the call; they arrive here.
            if "permissions violation" in str(exc).lower():
                errors.append(str(exc))

        options: dict[str, Any] = {
            "servers": [url] if isinstance(url, str) else list(url),
            "error_cb": on_error,
            "connect_timeout": connect_timeout,
            "max_reconnect_attempts": max_reconnect_attempts,
        }
        if tenant is not None:
            options["inbox_prefix"] = f"_INBOX_{check_token(tenant, 'tenant')}"
        for key, value in (("user", user), ("password", password), ("token", token),
                           ("user_credentials", creds), ("inbox_prefix", inbox_prefix)):
            if value is not None:
                options[key] = value
        options.update(nats_options or {})
        try:
            # nats-py retries a first connect without end for some settings: bound it.
            nc = await asyncio.wait_for(nats.connect(**options),
                                        timeout=connect_timeout * 3)
        except (OSError, nats.errors.Error) as exc:
            raise Unavailable(f"cannot connect to NATS at {url}: {exc}; is the worker (or "
                              "your NATS server) running?") from None
        client = cls(nc, tenant=tenant, own_connection=True, **client_options)
        client._permission_errors = errors
        return client

    async def close(self) -> None:
        if self._own and not self._nc.is_closed:
            await self._nc.drain()

    async def __aenter__(self) -> LedgerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- appending -------------------------------------------------------------------

    async def append(
        self, event: Event, *, wait: bool = False, timeout: float | None = None
    ) -> AppendResult:
        """Publish one event; returns once JetStream stored it, or with `wait=True` once the
        worker committed it. Raises `RejectedError` subclasses if the worker refused it."""
        event = self._validate(event)
        subject = self._subjects.event(event.tenant, event.kind)
        results = await self._send(subject, event, event.tenant, [event], wait, timeout)
        return results[0]

    async def append_batch(
        self, events: Sequence[Event], *, wait: bool = False, timeout: float | None = None
    ) -> list[AppendResult]:
        """Append events as one unit: all are stored with consecutive seqs, or none are."""
        if not events:
            raise InvalidInput("append_batch needs at least one event")
        if len(events) > MAX_BATCH_EVENTS:
            raise InvalidInput(f"a batch holds at most {MAX_BATCH_EVENTS} events")
        checked = [self._validate(e) for e in events]
        tenants = {e.tenant for e in checked}
        if len(tenants) != 1:
            raise InvalidInput("all events of a batch must belong to one tenant")
        subject = self._subjects.batch(checked[0].tenant)
        return await self._send(subject, EventBatch(events=checked), checked[0].tenant,
                                checked, wait, timeout)

    def _validate(self, event: Event) -> Event:
        # Exactly the worker's rules: encode, then decode with validation.
        try:
            decoded = decode(encode(event), Event)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidEvent(f"event {event.id!r} is not valid: {exc}") from None
        except TypeError as exc:
            raise InvalidEvent(f"event {event.id!r} cannot be encoded: {exc}") from None
        return normalize_event(decoded)

    async def _send(
        self,
        subject: str,
        body: Any,
        tenant: str,
        events: list[Event],
        wait: bool,
        timeout: float | None,
    ) -> list[AppendResult]:
        payload = encode(body, self._ct)
        headers = {CONTENT_TYPE: self._ct}
        ids = [e.id for e in events]
        sub = None
        if wait:
            inbox = self._nc.new_inbox()
            try:
                sub = await self._nc.subscribe(inbox, max_msgs=1)  # before publishing: no race
            except nats.errors.Error as exc:
                raise Unavailable(f"cannot subscribe on NATS ({type(exc).__name__}: {exc}); "
                                  "nothing was sent") from None
            headers[HEADER_NOTIFY] = inbox
        size = len(payload) + _header_bytes(headers) + len(subject)
        if size > self._nc.max_payload:
            if sub is not None:
                await sub.unsubscribe()
            raise EventTooLarge(
                f"message of {size} bytes (payload + headers) exceeds the server's max_payload "
                f"of {self._nc.max_payload} bytes; store large content elsewhere and reference "
                "it from the event"
            )
        try:
            js_seq = await self._publish(subject, payload, headers, ids)
            if sub is None:
                return [AppendResult(id=i, outcome="accepted", js_seq=js_seq) for i in ids]
            return await self._await_outcome(sub, tenant, events, js_seq, timeout)
        finally:
            if sub is not None:
                try:
                    await sub.unsubscribe()
                except Exception:  # noqa: BLE001 - already gone (max_msgs reached)
                    pass

    async def _publish(
        self, subject: str, payload: bytes, headers: dict[str, str], ids: list[str]
    ) -> int:
        """JetStream publish; an unconfirmed publish is retried with the same bytes (the same
        event id), and the worker stores the event once however often it arrives. Once one
        attempt went unconfirmed, a later failure is not definite either: OutcomeUnknown."""
        last: Exception | None = None
        for attempt in range(self._attempts):
            if attempt:
                await asyncio.sleep(min(0.1 * 2 ** (attempt - 1), 1.0))
            try:
                ack = await self._js.publish(subject, payload, timeout=self.timeout,
                                             headers=headers)
                return ack.seq
            except TimeoutError as exc:  # nats-py's and asyncio's
                self._raise_if_denied(subject)
                last = exc
                continue
            except (NoRespondersError, NoStreamResponseError):
                self._raise_if_denied(subject)
                definite: JetledgerError = Unavailable(
                    f"no JetStream stream captures {subject!r}: start the jetledger worker "
                    "(it creates the stream) or check the subject prefix")
            except APIError as exc:
                if exc.err_code == 10054:  # over the stream's max_msg_size
                    definite = EventTooLarge(
                        f"JetStream refused the event: {exc.description} (the stream's "
                        "max_msg_size); store large content elsewhere and reference it")
                else:
                    definite = Unavailable(f"JetStream refused the event: {exc.description} "
                                           f"(error {exc.err_code})")
            except nats.errors.Error as exc:  # closed connection, outbound buffer full, ...
                definite = Unavailable(f"cannot publish to NATS ({type(exc).__name__}: "
                                       f"{exc}); nothing was sent")
            if last is None:
                raise definite from None
            raise OutcomeUnknown(
                f"JetStream did not confirm event(s) {ids} ({last!r}), then: {definite}; an "
                "earlier attempt may be stored: append again with the same ids, it is safe"
            ) from None
        raise OutcomeUnknown(
            f"JetStream did not confirm event(s) {ids} after {self._attempts} attempts "
            f"({last!r}); they may or may not be stored: append again with the same ids, "
            "it is safe"
        )

    def _raise_if_denied(self, subject: str) -> None:
        if self._permission_errors:
            detail = self._permission_errors.pop()
            self._permission_errors.clear()
            raise PermissionDenied(f"NATS refused access for {subject!r}: {detail}")

    async def _await_outcome(
        self, sub: Any, tenant: str, events: list[Event], js_seq: int, timeout: float | None
    ) -> list[AppendResult]:
        try:
            msg = await sub.next_msg(timeout=timeout or self.timeout)
            outcomes = decode(msg.data, list[Outcome])
        except TimeoutError:
            # The notice is best effort (a worker crash can lose it): ask the ledger.
            return await self._outcome_by_query(tenant, events, js_seq)
        except nats.errors.Error as exc:
            raise LedgerTimeout(
                f"lost the connection while waiting for the worker ({type(exc).__name__}); "
                f"the event(s) are in JetStream (seq {js_seq}) and will be committed") from None
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InternalError(f"malformed outcome notice from the worker: {exc}") from None
        results: list[AppendResult] = []
        for out in outcomes:
            if out.outcome in ("inserted", "duplicate"):
                results.append(AppendResult(id=out.id, outcome=out.outcome, js_seq=js_seq,
                                            stream=out.stream, seq=out.seq,
                                            position=out.position))
                continue
            err = error_for_code(out.code or "rejected", out.reason or "rejected")
            if isinstance(err, ExpectedSeqMismatch):
                err.actual_seq = out.actual_seq
            if hasattr(err, "event_id"):
                err.event_id = out.id or None
            raise err
        return results

    async def _outcome_by_query(
        self, tenant: str, events: list[Event], js_seq: int
    ) -> list[AppendResult]:
        """No notice came: decide the outcome from what the ledger holds under each id."""
        results = []
        for event in events:
            try:
                stored = await self.get(event.id, tenant=tenant)
            except (NotFound, TransportError):
                # JetStream stored it (js_seq): never report that as "unavailable".
                raise LedgerTimeout(
                    f"no outcome for event {event.id!r} (in JetStream at seq {js_seq}) and it "
                    "is not stored yet: the worker is behind or not running, or it rejected "
                    "the event (see `jetledger rejections`)"
                ) from None
            if stored.js_seq == js_seq:
                outcome: Literal["inserted", "duplicate"] = "inserted"
            elif _same_content(event, stored):
                outcome = "duplicate"  # an earlier copy of this event was stored
            else:
                raise ConflictError(
                    f"event id {event.id!r} is already stored with different content "
                    f"(at position {stored.position}); the original stays",
                    event_id=event.id)
            results.append(AppendResult(id=event.id, outcome=outcome, js_seq=js_seq,
                                        stream=stored.stream, seq=stored.seq,
                                        position=stored.position))
        return results

    # --- queries ---------------------------------------------------------------------

    def _tenant(self, tenant: str | None) -> str:
        t = tenant or self.tenant
        if t is None:
            raise InvalidInput("pass tenant=..., or bind the client to one: "
                               "LedgerClient(..., tenant='acme')")
        return t

    async def _query(self, tenant: str | None, op: str, request: Any, reply: type[T]) -> T:
        subject = self._subjects.query(self._tenant(tenant), op)
        try:
            msg = await self._nc.request(subject, encode(request, self._ct),
                                         timeout=self.timeout, headers={CONTENT_TYPE: self._ct})
        except NoRespondersError:
            self._raise_if_denied(subject)
            raise Unavailable(
                f"no jetledger worker answers {subject!r}; is it running?") from None
        except TimeoutError:  # nats-py's and asyncio's
            self._raise_if_denied(subject)
            raise LedgerTimeout(f"no answer to {op!r} within {self.timeout}s") from None
        except nats.errors.Error as exc:  # closed connection, outbound buffer full, ...
            raise Unavailable(f"cannot reach the ledger over NATS ({type(exc).__name__}: "
                              f"{exc})") from None
        ct = content_type_of(msg.headers)
        if msg.headers and "Nats-Service-Error-Code" in msg.headers:
            raise _error_reply(msg.data, msg.headers, ct)
        try:
            return decode(msg.data, reply, ct)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InternalError(f"malformed {op!r} reply from the worker: {exc}") from None

    async def events(
        self,
        *,
        tenant: str | None = None,
        stream: str | None = None,
        kinds: Sequence[str] = (),
        correlation_id: str | None = None,
        causation_id: str | None = None,
        time_from: datetime | None = None,
        time_to: datetime | None = None,
        after_position: int | None = None,
        after_seq: int | None = None,
        limit: int = 100,
        order: Literal["asc", "desc"] = "asc",
        order_by: Literal["position", "occurred_at"] = "position",
        cursor: str | None = None,
    ) -> EventsPage:
        """One page of events; pass `page.next_cursor` back as `cursor` for the next.

        Filters combine with AND; `time_from`/`time_to` are inclusive bounds on
        `occurred_at`. `order_by="occurred_at"` interleaves sources by when events happened.
        """
        q = EventsQuery(stream=stream, kinds=list(kinds), correlation_id=correlation_id,
                        causation_id=causation_id, time_from=time_from, time_to=time_to,
                        after_position=after_position, after_seq=after_seq, limit=limit,
                        order=order, order_by=order_by, cursor=cursor)
        return await self._query(tenant, "events", q, EventsPage)

    async def iter_events(self, **filters: Any) -> AsyncIterator[StoredEvent]:
        """Every matching event, page after page (same filters as `events`)."""
        cursor = filters.pop("cursor", None)
        while True:
            page = await self.events(cursor=cursor, **filters)
            for event in page.events:
                yield event
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def get(self, event_id: str, *, tenant: str | None = None) -> StoredEvent:
        return await self._query(tenant, "get", GetQuery(id=event_id), StoredEvent)

    async def stream_head(self, stream: str, *, tenant: str | None = None) -> StreamHead:
        """The stream's latest seq and positions; `NotFound` if it has no events."""
        return await self._query(tenant, "head", HeadQuery(stream=stream), StreamHead)

    async def streams(
        self,
        *,
        tenant: str | None = None,
        last_kinds: Sequence[str] = (),
        limit: int = 100,
        order: Literal["asc", "desc"] = "desc",
        cursor: str | None = None,
    ) -> StreamsPage:
        """The tenant's streams, newest first; `last_kinds` keeps those whose latest event
        is of one of these kinds (open escalations: `last_kinds=["escalation_recorded"]`)."""
        q = StreamsQuery(last_kinds=list(last_kinds), limit=limit, order=order, cursor=cursor)
        return await self._query(tenant, "streams", q, StreamsPage)

    async def stream_record(self, stream: str, *, tenant: str | None = None) -> StreamRecord:
        """A stream's head with the event that opened it and its latest event."""
        return await self._query(tenant, "stream", StreamQuery(stream=stream), StreamRecord)

    async def stats(self, *, tenant: str | None = None) -> TenantStats:
        """How many events, streams and rejections the tenant has."""
        return await self._query(tenant, "stats", TenantStatsQuery(), TenantStats)

    async def rejections(
        self,
        *,
        tenant: str | None = None,
        codes: Sequence[str] = (),
        limit: int = 100,
        order: Literal["asc", "desc"] = "desc",
        cursor: str | None = None,
    ) -> RejectionsPage:
        """What the worker refused for the tenant, and why."""
        q = RejectionsQuery(codes=list(codes), limit=limit, order=order, cursor=cursor)
        return await self._query(tenant, "rejections", q, RejectionsPage)

    async def tail(
        self,
        *,
        tenant: str | None = None,
        after_position: int | None = None,
        poll_interval: float = 2.0,
        **filters: Any,
    ) -> AsyncIterator[StoredEvent]:
        """Every matching event after `after_position` (None: from now), then each new one
        as it is committed, forever. Never skips or repeats: it always asks the ledger for
        what follows the last position it yielded; commit notices only say when to ask, and
        a periodic poll covers notices lost or a worker restart."""
        t = self._tenant(tenant)
        wake = asyncio.Event()

        async def on_notice(msg: Any) -> None:
            wake.set()

        try:
            sub = await self._nc.subscribe(self._subjects.live(t), cb=on_notice)
        except nats.errors.Error as exc:
            raise Unavailable(f"cannot subscribe on NATS ({type(exc).__name__}: {exc})") from None
        try:
            if after_position is None:
                newest = await self.events(tenant=t, order="desc", limit=1)
                after_position = newest.events[0].position if newest.events else 0
            last = after_position
            while True:
                wake.clear()
                try:
                    async for event in self.iter_events(tenant=t, after_position=last,
                                                        **filters):
                        last = event.position
                        yield event
                except (Unavailable, LedgerTimeout):
                    if self._nc.is_closed:
                        raise  # NATS gave up: waiting on would hang the caller silently
                    # Otherwise the worker is restarting: try again after the next wake-up.
                try:
                    await asyncio.wait_for(wake.wait(), poll_interval)
                except TimeoutError:
                    pass
        finally:
            await sub.unsubscribe()


def _error_reply(data: bytes, headers: dict[str, str], ct: str) -> Exception:
    try:
        err = decode(data, ErrorReply, ct)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return error_for_code("internal", headers.get("Nats-Service-Error", "unknown error"))
    return error_for_code(err.code, err.message)


def _same_content(event: Event, stored: StoredEvent) -> bool:
    """Compared in the worker's canonical form, as its dedupe does."""
    as_sent = Event(**{f: getattr(stored, f) for f in Event.__struct_fields__})
    return canonical_bytes(normalize_event(event)) == canonical_bytes(normalize_event(as_sent))
