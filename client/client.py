"""`LedgerClient`: append events to jetledger and query them, over NATS.

    async with await LedgerClient.connect("nats://127.0.0.1:4222", tenant="acme") as ledger:
        result = await ledger.append(new_event(tenant="acme", stream="run-1",
                                               data=StepStarted(step_id="s1", name="plan")),
                                     wait=True)
        page = await ledger.events(stream="run-1")

Concurrent appends of one tenant are coalesced, group-commit style: while `max_in_flight`
publishes of the tenant await JetStream's ack, further appends queue, and when one of those
publishes is acked the queue goes out as one bundle (a non-atomic `EventBatch`: each event is
decided on its own). The server fsyncs each message, so this is what lets many producers'
appends through; a lone append is sent at once, alone, as without coalescing.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
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
from jetledger.schemas.codec import (
    canonical_bytes,
    content_type_of,
    decode,
    encode_bundle,
    normalize_event,
)
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


#: Bytes a bundle's frame adds around its events' own bytes, at most (JSON:
#: `{"events":[` ... `],"atomic":false}` plus a comma per event; MessagePack is smaller).
_BUNDLE_FRAME = 32
#: Per-tenant publishes awaiting JetStream's ack before appends queue for a bundle. One is
#: the fastest measured (1 > 2 > 4, at 8 tenants x 256 appends in flight: 8.4k, 6.3k,
#: 6.2k events/s end to end): the server fsyncs messages one after another, so a second
#: message in flight barely shortens anyone's wait and halves the events per message.
DEFAULT_MAX_IN_FLIGHT = 1
#: Ledger lookups at once when a bundle's notice is lost (within the service's concurrency).
_FALLBACK_QUERIES = 8

#: What one append of a delivery ended in: its result, or the error to raise for it.
_Result = AppendResult | JetledgerError


@dataclass(eq=False, slots=True)
class _Pending:
    """An append waiting for a bundle."""

    event: Event
    item: bytes  # the event encoded in the client's content type: its bytes in the bundle
    wait: bool
    timeout: float | None
    future: asyncio.Future[AppendResult]


class _Lane:
    """One tenant's publishes in flight and the appends queued behind them."""

    __slots__ = ("in_flight", "queue")

    def __init__(self) -> None:
        self.in_flight = 0
        self.queue: deque[_Pending] = deque()


def _ids_text(ids: list[str]) -> str:
    if len(ids) <= 5:
        return str(ids)
    return f"{ids[:3]} and {len(ids) - 3} more"


def _fail(future: asyncio.Future[AppendResult], exc: BaseException) -> None:
    """Give one append of a bundle its own copy of the bundle's error (each caller gets an
    exception object, and a traceback, of its own)."""
    if not future.done():
        future.set_exception(copy.copy(exc))


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
        coalesce: bool = True,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        """`coalesce`: bundle concurrent `append`s of a tenant (see the module docstring);
        False sends one message per append. `max_in_flight`: publishes of one tenant
        awaiting JetStream's ack before further appends queue for a bundle."""
        self._nc = nc
        self._js = nc.jetstream(timeout=timeout)
        self._subjects = Subjects(prefix)
        self.tenant = check_token(tenant, "tenant") if tenant is not None else None
        self._ct = content_type
        self.timeout = timeout
        self._attempts = max(1, publish_attempts)
        self._own = own_connection
        self._permission_errors: list[str] = []
        self.coalesce = coalesce
        self.max_in_flight = max(1, max_in_flight)
        self._lanes: dict[str, _Lane] = {}
        self._bundles: set[asyncio.Task[None]] = set()
        # Per-append costs that add up at tens of thousands of appends a second: event
        # subjects (token checks) and header sizes (constant per connection).
        self._event_subjects: dict[tuple[str, str], str] = {}
        self._ct_header = _header_bytes({CONTENT_TYPE: content_type})
        # A notify inbox is a new_inbox() (the inbox prefix, a dot and a 22-character NUID),
        # a dot and a counter (20 digits: more than a 64-bit count).
        self._notify_header = (_header_bytes({CONTENT_TYPE: content_type,
                                              HEADER_NOTIFY: nc.new_inbox() + "." + "9" * 20})
                               - self._ct_header)
        # One subscription receives every notice of this client (`<inbox>.*`), each message
        # its own token: a subscribe, an unsubscribe and nats-py's next_msg (a task, a
        # wait_for and a uuid) per message were a large part of a waiting append's cost.
        self._notices: Subscription | None = None
        self._notice_prefix = ""
        self._notice_ids = itertools.count(1)
        self._notice_waiters: dict[str, asyncio.Future[Msg]] = {}
        self._notices_lock = asyncio.Lock()

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
        # Appends already made are answered before the connection goes.
        while self._bundles or any(lane.in_flight or lane.queue
                                   for lane in self._lanes.values()):
            if self._bundles:
                await asyncio.gather(*self._bundles, return_exceptions=True)
            else:
                await asyncio.sleep(0.001)
        if self._notices is not None and not self._own and not self._nc.is_closed:
            # A borrowed connection outlives the client: take the notice interest back.
            try:
                await self._notices.unsubscribe()
            except nats.errors.Error:
                pass  # gone with a reconnect or already closed: nothing to take back
        self._notices = None
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
        worker committed it. Raises `RejectedError` subclasses if the worker refused it.

        With coalescing on, the event may travel in a bundle with other appends of its
        tenant; its result and its errors are its own, as if it had gone alone (except
        that a publish error or an unknown outcome of the bundle is every member's)."""
        event, item = self._validate(event)
        tenant = event.tenant
        subject = self._event_subject(tenant, event.kind)
        if not self.coalesce:
            return (await self._send(subject, item, tenant, [event], wait, timeout))[0]
        self._check_size(len(item), subject, wait)  # before it can join a bundle
        lane = self._lanes.get(tenant)
        if lane is None:
            lane = self._lanes[tenant] = _Lane()
        if lane.in_flight < self.max_in_flight and not lane.queue:
            # A free slot: go now and alone (no added latency); the slot is given back as
            # soon as JetStream acked, not when the worker's outcome comes.
            lane.in_flight += 1
            release = self._releaser(tenant, lane)
            try:
                (result,) = await self._deliver(subject, item, tenant, [event], [wait],
                                                timeout, lambda _js_seq: release())
            finally:
                release()
            if isinstance(result, JetledgerError):
                raise result
            return result
        pending = _Pending(event, item, wait, timeout,
                           asyncio.get_running_loop().create_future())
        lane.queue.append(pending)
        try:
            return await pending.future
        except asyncio.CancelledError:
            # Not yet taken into a bundle: never sent. Once taken, the bundle goes on for
            # the others and this one's result is dropped.
            if pending in lane.queue:
                lane.queue.remove(pending)
            raise

    def _event_subject(self, tenant: str, kind: str) -> str:
        key = (tenant, kind)
        subject = self._event_subjects.get(key)
        if subject is None:
            if len(self._event_subjects) >= 4096:
                self._event_subjects.clear()  # bounded, whatever the kinds producers invent
            subject = self._event_subjects[key] = self._subjects.event(tenant, kind)
        return subject

    def _releaser(self, tenant: str, lane: _Lane) -> Callable[[], None]:
        """Frees one in-flight slot of the lane (once, however often it is called) and sends
        what queued behind it: on the next turn of the loop, so that the appenders just
        answered, which typically append again at once, join that bundle instead of one of
        them going alone and the rest waiting a whole round trip (twice the events per
        message: the server fsyncs each message, so that is what counts)."""
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                asyncio.get_running_loop().call_soon(self._free, tenant, lane)

        return release

    def _free(self, tenant: str, lane: _Lane) -> None:
        lane.in_flight -= 1
        self._pump(tenant, lane)

    def _pump(self, tenant: str, lane: _Lane) -> None:
        while lane.queue and lane.in_flight < self.max_in_flight:
            bundle = self._take(tenant, lane)
            if not bundle:
                continue  # only appends whose callers gave up were left: nothing to send
            lane.in_flight += 1
            release = self._releaser(tenant, lane)
            task = asyncio.create_task(self._send_bundle(tenant, bundle, release))
            self._bundles.add(task)
            task.add_done_callback(functools.partial(self._bundle_done, bundle, release))

    def _bundle_done(self, bundle: list[_Pending], release: Callable[[], None],
                     task: asyncio.Task[None]) -> None:
        """A bundle task cancelled before it ever ran (its `finally` never ran either)
        must still give its slot back and answer its appends, or the lane stalls."""
        self._bundles.discard(task)
        release()
        for p in bundle:
            if not p.future.done():
                p.future.cancel()

    def _take(self, tenant: str, lane: _Lane) -> list[_Pending]:
        """The queue's head, as much of it as one message holds: at most MAX_BATCH_EVENTS
        events and max_payload bytes with headers (a notify inbox counted as if needed).
        Appends waiting for the worker share a bundle only with those that wait as long:
        one notice serves the bundle, so each waits for it exactly its own timeout."""
        subject = self._subjects.batch(tenant)
        budget = (self._nc.max_payload - len(subject) - _BUNDLE_FRAME - self._ct_header
                  - self._notify_header)
        bundle: list[_Pending] = []
        used = 0
        patience: float | None = None  # the timeout of the bundle's waiting appends
        while lane.queue and len(bundle) < MAX_BATCH_EVENTS:
            head = lane.queue[0]
            if head.future.done():
                # Its caller was cancelled (a timeout, say) and has not yet run its own
                # clean-up: it was told the append failed, so the event must not be sent.
                lane.queue.popleft()
                continue
            size = len(head.item) + 1
            if bundle and used + size > budget:  # the first fits alone: checked on queueing
                break
            if head.wait:
                timeout = head.timeout or self.timeout
                if patience is None:
                    patience = timeout
                elif timeout != patience:
                    break
            used += size
            bundle.append(lane.queue.popleft())
        return bundle

    async def _send_bundle(self, tenant: str, bundle: list[_Pending],
                           release: Callable[[], None]) -> None:
        try:
            await self._bundle_part(tenant, bundle, release)
        finally:
            release()

    async def _bundle_part(
        self, tenant: str, bundle: list[_Pending], release: Callable[[], None]
    ) -> None:
        """Send `bundle` (alone on its event subject if it is one event) and answer each of
        its appends."""
        events = [p.event for p in bundle]
        waits = [p.wait for p in bundle]

        def accepted(js_seq: int) -> None:
            for p in bundle:  # those not waiting for the worker are answered now
                if not p.wait and not p.future.done():
                    p.future.set_result(AppendResult(id=p.event.id, outcome="accepted",
                                                     js_seq=js_seq))
            release()

        if len(bundle) == 1:
            subject = self._event_subject(tenant, events[0].kind)
            payload = bundle[0].item
        else:
            subject = self._subjects.batch(tenant)
            payload = encode_bundle([p.item for p in bundle], self._ct)
        # One notice serves the bundle; its waiting members all have this timeout (`_take`).
        timeout = max((p.timeout or self.timeout for p in bundle if p.wait), default=None)
        try:
            results = await self._deliver(subject, payload, tenant, events, waits, timeout,
                                          accepted)
        except EventTooLarge as exc:
            if len(bundle) == 1:
                _fail(bundle[0].future, exc)
                return
            # The stream's max_msg_size (which the client cannot see) refused the bundle,
            # definitely: nothing was stored, so its halves may go, in order.
            half = len(bundle) // 2
            await self._bundle_part(tenant, bundle[:half], release)
            await self._bundle_part(tenant, bundle[half:], release)
            return
        except asyncio.CancelledError:
            for p in bundle:  # the loop is going away: nobody will answer them
                p.future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - the bundle's fate is each member's
            for p in bundle:
                _fail(p.future, exc)
            return
        for p, result in zip(bundle, results, strict=True):
            if p.future.done():
                continue  # answered at the ack, or its caller was cancelled
            if isinstance(result, JetledgerError):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)

    async def append_batch(
        self, events: Sequence[Event], *, wait: bool = False, timeout: float | None = None
    ) -> list[AppendResult]:
        """Append events as one unit: all are stored with consecutive seqs, or none are."""
        if not events:
            raise InvalidInput("append_batch needs at least one event")
        if len(events) > MAX_BATCH_EVENTS:
            raise InvalidInput(f"a batch holds at most {MAX_BATCH_EVENTS} events")
        checked = [self._validate(e)[0] for e in events]
        tenants = {e.tenant for e in checked}
        if len(tenants) != 1:
            raise InvalidInput("all events of a batch must belong to one tenant")
        subject = self._subjects.batch(checked[0].tenant)
        return await self._send(subject, encode(EventBatch(events=checked), self._ct),
                                checked[0].tenant, checked, wait, timeout)

    def _validate(self, event: Event) -> tuple[Event, bytes]:
        """The event as the worker will see it, and the bytes to send: exactly the worker's
        rules, applied to exactly those bytes (the MessagePack ones are sent as checked, not
        encoded a second time)."""
        try:
            raw = encode(event)
            decoded = decode(raw, Event)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidEvent(f"event {event.id!r} is not valid: {exc}") from None
        except TypeError as exc:
            raise InvalidEvent(f"event {event.id!r} cannot be encoded: {exc}") from None
        normalized = normalize_event(decoded)
        return normalized, raw if self._ct == MSGPACK else encode(normalized, self._ct)

    async def _send(
        self,
        subject: str,
        payload: bytes,
        tenant: str,
        events: list[Event],
        wait: bool,
        timeout: float | None,
    ) -> list[AppendResult]:
        """Send one message whose events share one fate (a single event, an atomic batch)."""
        results = await self._deliver(subject, payload, tenant, events, [wait] * len(events),
                                      timeout)
        for result in results:
            if isinstance(result, JetledgerError):
                raise result
        return [r for r in results if isinstance(r, AppendResult)]

    def _check_size(self, payload_size: int, subject: str, wait: bool) -> None:
        headers = self._ct_header + (self._notify_header if wait else 0)
        self._raise_if_too_large(payload_size + headers + len(subject))

    def _raise_if_too_large(self, size: int) -> None:
        if size > self._nc.max_payload:
            raise EventTooLarge(
                f"message of {size} bytes (payload + headers) exceeds the server's max_payload "
                f"of {self._nc.max_payload} bytes; store large content elsewhere and reference "
                "it from the event"
            )

    async def _deliver(
        self,
        subject: str,
        payload: bytes,
        tenant: str,
        events: list[Event],
        waits: list[bool],
        timeout: float | None,
        on_published: Callable[[int], None] | None = None,
    ) -> list[_Result]:
        """Publish one message and learn each of its events' results (the worker's outcome
        for those that wait). Errors of the publish itself are raised: they are every
        event's. `on_published(js_seq)` runs once JetStream acked."""
        headers = {CONTENT_TYPE: self._ct}
        ids = [e.id for e in events]
        inbox: str | None = None
        notice: asyncio.Future[Msg] | None = None
        if any(waits):
            inbox, notice = await self._notice_inbox()
            headers[HEADER_NOTIFY] = inbox
        try:
            self._raise_if_too_large(len(payload) + _header_bytes(headers) + len(subject))
            js_seq = await self._publish(subject, payload, headers, ids)
            if on_published is not None:
                on_published(js_seq)
            accepted: list[_Result] = [AppendResult(id=i, outcome="accepted", js_seq=js_seq)
                                       for i in ids]
            if notice is None:
                return accepted
            return await self._await_outcome(notice, tenant, events, waits, js_seq, timeout,
                                             accepted)
        finally:
            if inbox is not None:
                self._notice_waiters.pop(inbox, None)

    async def _notice_inbox(self) -> tuple[str, asyncio.Future[Msg]]:
        """A fresh notify inbox for one message, and the future its notice will resolve.
        The client's notice subscription is made on first use, before that first publish
        (one connection: the server sees the interest before the message)."""
        if self._notices is None:
            async with self._notices_lock:
                if self._notices is None:
                    prefix = self._nc.new_inbox()
                    try:
                        self._notices = await self._nc.subscribe(f"{prefix}.*",
                                                                 cb=self._on_notice)
                    except nats.errors.Error as exc:
                        raise Unavailable(f"cannot subscribe on NATS ({type(exc).__name__}: "
                                          f"{exc}); nothing was sent") from None
                    self._notice_prefix = prefix
        inbox = f"{self._notice_prefix}.{next(self._notice_ids)}"
        notice: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._notice_waiters[inbox] = notice
        return inbox, notice

    async def _on_notice(self, msg: Msg) -> None:
        notice = self._notice_waiters.pop(msg.subject, None)
        if notice is not None and not notice.done():
            notice.set_result(msg)  # one notice per message; a late or repeated one is dropped

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
                f"JetStream did not confirm event(s) {_ids_text(ids)} ({last!r}), then: "
                f"{definite}; an "
                "earlier attempt may be stored: append again with the same ids, it is safe"
            ) from None
        raise OutcomeUnknown(
            f"JetStream did not confirm event(s) {_ids_text(ids)} after {self._attempts} "
            "attempts "
            f"({last!r}); they may or may not be stored: append again with the same ids, "
            "it is safe"
        )

    def _raise_if_denied(self, subject: str) -> None:
        if self._permission_errors:
            detail = self._permission_errors.pop()
            self._permission_errors.clear()
            raise PermissionDenied(f"NATS refused access for {subject!r}: {detail}")

    async def _await_outcome(
        self,
        notice: asyncio.Future[Msg],
        tenant: str,
        events: list[Event],
        waits: list[bool],
        js_seq: int,
        timeout: float | None,
        accepted: list[_Result],
    ) -> list[_Result]:
        """The worker's notice for the message: one outcome per event, in order (a message
        rejected whole may have one for all). Events not waiting keep `accepted`."""
        try:
            msg = await self._next_notice(notice, timeout or self.timeout)
            outcomes = decode(msg.data, list[Outcome])
        except TimeoutError:
            # The notice is best effort (a worker crash can lose it): ask the ledger.
            return await self._outcomes_by_query(tenant, events, waits, accepted, js_seq)
        except nats.errors.Error as exc:
            err: JetledgerError = LedgerTimeout(
                f"lost the connection while waiting for the worker ({type(exc).__name__}); "
                f"the event(s) are in JetStream (seq {js_seq}) and will be committed")
            return [copy.copy(err) if w else a for w, a in zip(waits, accepted, strict=True)]
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            err = InternalError(f"malformed outcome notice from the worker: {exc}")
            return [copy.copy(err) if w else a for w, a in zip(waits, accepted, strict=True)]
        if len(outcomes) != len(events):
            if len(outcomes) == 1 and outcomes[0].outcome not in ("inserted", "duplicate"):
                outcomes = [outcomes[0]] * len(events)  # the message was rejected whole
            else:
                err = InternalError(f"the worker's notice has {len(outcomes)} outcomes for "
                                    f"{len(events)} events")
                return [copy.copy(err) if w else a
                        for w, a in zip(waits, accepted, strict=True)]
        return [_result(out, js_seq) if w else a
                for out, w, a in zip(outcomes, waits, accepted, strict=True)]

    async def _next_notice(self, notice: asyncio.Future[Msg], timeout: float) -> Msg:
        """The notice, or TimeoutError; ConnectionClosedError once the connection is closed
        for good (nothing wakes a shared subscription's waiters then: a timer looks every
        0.5 s). Awaited directly, with a timer rather than wait_for or asyncio.wait: each
        of those adds turns of the event loop between the notice and its appends, and a
        busy producer's loop turns slowly."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        timer: asyncio.TimerHandle

        def check() -> None:
            nonlocal timer
            if notice.done():
                return
            if self._nc.is_closed:
                notice.set_exception(nats.errors.ConnectionClosedError())
            elif loop.time() >= deadline:
                notice.set_exception(TimeoutError())
            else:
                timer = loop.call_at(min(deadline, loop.time() + 0.5), check)

        timer = loop.call_at(min(deadline, loop.time() + 0.5), check)
        try:
            return await notice
        finally:
            timer.cancel()

    async def _outcomes_by_query(
        self, tenant: str, events: list[Event], waits: list[bool], accepted: list[_Result],
        js_seq: int,
    ) -> list[_Result]:
        """`_outcome_by_query` for every waiting event of a message, a few at a time and
        under one deadline: a bundle holds up to 1000 events, and asking one after another
        would keep them all waiting up to 1000 timeouts when the worker is not answering."""
        gate = asyncio.Semaphore(_FALLBACK_QUERIES)

        async def one(event: Event) -> _Result:
            async with gate:
                try:
                    return await self._outcome_by_query(tenant, event, js_seq)
                except JetledgerError as exc:  # overloaded, say: not an outcome either way
                    return _no_outcome(event, js_seq, exc)

        tasks = {i: asyncio.ensure_future(one(e))
                 for i, (e, w) in enumerate(zip(events, waits, strict=True)) if w}
        if tasks:
            await asyncio.wait(tasks.values(), timeout=self.timeout)
        results = list(accepted)
        for i, task in tasks.items():
            if task.done():
                results[i] = task.result()
            else:
                task.cancel()
                results[i] = _no_outcome(events[i], js_seq, None)
        return results

    async def _outcome_by_query(self, tenant: str, event: Event, js_seq: int) -> _Result:
        """No notice came: decide the outcome from what the ledger holds under the id."""
        try:
            stored = await self.get(event.id, tenant=tenant)
        except (NotFound, TransportError):
            # JetStream stored it (js_seq): never report that as "unavailable".
            return _no_outcome(event, js_seq, None)
        if stored.js_seq == js_seq:
            outcome: Literal["inserted", "duplicate"] = "inserted"
        elif _same_content(event, stored):
            outcome = "duplicate"  # an earlier copy of this event was stored
        else:
            return ConflictError(
                f"event id {event.id!r} is already stored with different content "
                f"(at position {stored.position}); the original stays",
                event_id=event.id)
        return AppendResult(id=event.id, outcome=outcome, js_seq=js_seq,
                            stream=stored.stream, seq=stored.seq, position=stored.position)

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
            # A caller that broke out of the loop leaves the generator for Python to close
            # later, often after the client closed: the subscription went with it then.
            with contextlib.suppress(nats.errors.ConnectionClosedError,
                                     nats.errors.ConnectionDrainingError):
                await sub.unsubscribe()


def _error_reply(data: bytes, headers: dict[str, str], ct: str) -> Exception:
    try:
        err = decode(data, ErrorReply, ct)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return error_for_code("internal", headers.get("Nats-Service-Error", "unknown error"))
    return error_for_code(err.code, err.message)


def _result(out: Outcome, js_seq: int) -> _Result:
    """One event's outcome from a notice, as its append's result or its error."""
    if out.outcome in ("inserted", "duplicate"):
        return AppendResult(id=out.id, outcome=out.outcome, js_seq=js_seq, stream=out.stream,
                            seq=out.seq, position=out.position)
    err = error_for_code(out.code or "rejected", out.reason or "rejected")
    if isinstance(err, ExpectedSeqMismatch):
        err.actual_seq = out.actual_seq
    if hasattr(err, "event_id"):
        err.event_id = out.id or None
    return err


def _no_outcome(event: Event, js_seq: int, cause: JetledgerError | None) -> LedgerTimeout:
    why = f" ({cause.message})" if cause is not None else ""
    return LedgerTimeout(
        f"no outcome for event {event.id!r} (in JetStream at seq {js_seq}) and it is not "
        f"stored yet{why}: the worker is behind or not running, or it rejected the event "
        "(see `jetledger rejections`)")


def _same_content(event: Event, stored: StoredEvent) -> bool:
    """Compared in the worker's canonical form, as its dedupe does."""
    as_sent = Event(**{f: getattr(stored, f) for f in Event.__struct_fields__})
    return canonical_bytes(normalize_event(event)) == canonical_bytes(normalize_event(as_sent))
