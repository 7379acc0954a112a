"""Reader subcommands of `jetledger`: look at the ledger as a person would.

    jetledger events --tenant acme --stream run-1        a table; --json for JSON lines
    jetledger get --tenant acme 01J...                   one event
    jetledger streams --tenant acme --last-kind escalation_recorded
    jetledger tail --tenant acme --kind step_failed      follow new events
    jetledger stats --tenant acme                        counts of events, streams, rejections
    jetledger rejections --tenant acme                   what was refused, and why
    jetledger export --tenant acme [--stream S] -o out.jsonl

Exit codes: 0 ok, 1 the ledger or the bus failed (message says why), 2 bad usage,
3 not found.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TextIO

import msgspec

from jetledger.schemas import DEFAULT_PREFIX, StoredEvent, StreamHead
from jetledger.schemas.errors import InvalidInput, JetledgerError, NotFound

from .client import LedgerClient

__all__ = ["register"]

Command = Callable[[LedgerClient, argparse.Namespace], Awaitable[int]]
_json = msgspec.json.Encoder()


def _common(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--nats-url", default=env("JETLEDGER_NATS_URL", "nats://127.0.0.1:4222"),
                   help="NATS server (env JETLEDGER_NATS_URL)")
    p.add_argument("--tenant", default=env("JETLEDGER_TENANT"),
                   help="tenant to read (env JETLEDGER_TENANT)")
    p.add_argument("--prefix", default=env("JETLEDGER_PREFIX", DEFAULT_PREFIX))
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream")
    p.add_argument("--kind", action="append", default=[], dest="kinds",
                   help="repeat for several kinds")
    p.add_argument("--correlation-id")
    p.add_argument("--causation-id")
    p.add_argument("--since", type=datetime.fromisoformat, dest="time_from",
                   help="occurred at or after (ISO 8601 with offset)")
    p.add_argument("--until", type=datetime.fromisoformat, dest="time_to",
                   help="occurred at or before (ISO 8601 with offset)")


def _filter_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ("stream", "kinds", "correlation_id",
                                          "causation_id", "time_from", "time_to")}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the reader subcommands to the `jetledger` command."""
    p = sub.add_parser("events", help="list events (filters combine)")
    _common(p)
    _filters(p)
    p.add_argument("--limit", type=int, default=50, help="events to show (all pages)")
    p.add_argument("--desc", action="store_true", help="newest first")
    p.add_argument("--by-occurrence", action="store_true",
                   help="order by occurred_at instead of commit position")
    p.set_defaults(func=_runner(_events))

    p = sub.add_parser("get", help="show one event by id")
    _common(p)
    p.add_argument("id")
    p.set_defaults(func=_runner(_get))

    p = sub.add_parser("streams", help="list streams, newest first")
    _common(p)
    p.add_argument("--last-kind", action="append", default=[], dest="last_kinds",
                   help="only streams whose latest event is of this kind (repeatable)")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=_runner(_streams))

    p = sub.add_parser("tail", help="follow new events as they are committed (Ctrl-C ends)")
    _common(p)
    _filters(p)
    p.add_argument("--from-position", type=int, default=None,
                   help="replay from after this position first (default: only new events)")
    p.add_argument("--count", type=int, default=None, help="stop after this many events")
    p.set_defaults(func=_runner(_tail))

    p = sub.add_parser("stats", help="how many events, streams and rejections a tenant has")
    _common(p)
    p.set_defaults(func=_runner(_stats))

    p = sub.add_parser("rejections", help="what the worker refused for a tenant, and why")
    _common(p)
    p.add_argument("--code", action="append", default=[], dest="codes")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=_runner(_rejections))

    p = sub.add_parser("export", help="write a tenant's (or one stream's) events as JSONL")
    _common(p)
    _filters(p)
    p.add_argument("-o", "--output", help="file to write (default: stdout)")
    p.set_defaults(func=_runner(_export))


def _runner(command: Command) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(_with_client(command, args))
        except KeyboardInterrupt:
            return 0
        except NotFound as exc:
            print(f"jetledger: {exc}", file=sys.stderr)
            return 3
        except InvalidInput as exc:
            print(f"jetledger: {exc}", file=sys.stderr)
            return 2
        except JetledgerError as exc:
            print(f"jetledger: {exc}", file=sys.stderr)
            return 1

    return run


async def _with_client(command: Command, args: argparse.Namespace) -> int:
    if not args.tenant:
        raise InvalidInput("--tenant is required (or set JETLEDGER_TENANT)")
    client = await LedgerClient.connect(args.nats_url, tenant=args.tenant, prefix=args.prefix,
                                        timeout=args.timeout, connect_timeout=args.timeout)
    async with client:
        return await command(client, args)


# --- output ------------------------------------------------------------------------------

EVENT_COLUMNS = ("POSITION", "SEQ", "STREAM", "KIND", "OCCURRED_AT", "ID", "DATA")


def _event_row(e: StoredEvent) -> list[str]:
    data = _json.encode(e.data).decode()
    return [str(e.position), str(e.seq), e.stream, e.kind,
            e.occurred_at.isoformat(timespec="seconds"), e.id,
            data if len(data) <= 60 else data[:57] + "..."]


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(),
              file=out)


def _print_json(obj: Any, out: TextIO) -> None:
    out.write(_json.encode(obj).decode() + "\n")


# --- commands ----------------------------------------------------------------------------


async def _events(client: LedgerClient, args: argparse.Namespace) -> int:
    events: list[StoredEvent] = []
    async for event in client.iter_events(
        **_filter_kwargs(args), order="desc" if args.desc else "asc",
        order_by="occurred_at" if args.by_occurrence else "position",
        limit=min(max(args.limit, 1), 1000),
    ):
        events.append(event)
        if len(events) >= args.limit:
            break
    if args.json:
        for event in events:
            _print_json(event, sys.stdout)
    else:
        print_table(EVENT_COLUMNS, [_event_row(e) for e in events], sys.stdout)
    return 0


async def _get(client: LedgerClient, args: argparse.Namespace) -> int:
    event = await client.get(args.id)
    if args.json:
        _print_json(event, sys.stdout)
    else:
        for field in event.__struct_fields__:
            value = getattr(event, field)
            if value is not None:
                shown = _json.encode(value).decode() if field == "data" else str(value)
                print(f"{field:>15}: {shown}")
    return 0


async def _streams(client: LedgerClient, args: argparse.Namespace) -> int:
    heads: list[StreamHead] = []
    cursor = None
    while len(heads) < args.limit:
        page = await client.streams(last_kinds=args.last_kinds, cursor=cursor,
                                    limit=min(max(args.limit, 1), 1000))
        heads += page.streams
        cursor = page.next_cursor
        if cursor is None:
            break
    heads = heads[: args.limit]
    if args.json:
        for head in heads:
            _print_json(head, sys.stdout)
    else:
        print_table(("STREAM", "EVENTS", "LAST_KIND", "FIRST_POS", "LAST_POS", "UPDATED_AT"),
                    [[h.stream, str(h.seq), h.last_kind, str(h.first_position),
                      str(h.last_position), h.updated_at.isoformat(timespec="seconds")]
                     for h in heads], sys.stdout)
    return 0


async def _tail(client: LedgerClient, args: argparse.Namespace) -> int:
    seen = 0
    if not args.json:
        print("  ".join(EVENT_COLUMNS), flush=True)
    async for event in client.tail(after_position=args.from_position,
                                   **_filter_kwargs(args)):
        if args.json:
            _print_json(event, sys.stdout)
        else:
            print("  ".join(_event_row(event)))
        sys.stdout.flush()
        seen += 1
        if args.count is not None and seen >= args.count:
            break
    return 0


async def _stats(client: LedgerClient, args: argparse.Namespace) -> int:
    stats = await client.stats()
    if args.json:
        _print_json(stats, sys.stdout)
    else:
        last = stats.last_recorded_at.isoformat(timespec="seconds") if stats.last_recorded_at \
            else "-"
        print_table(("TENANT", "EVENTS", "STREAMS", "REJECTIONS", "LAST_POSITION",
                     "LAST_RECORDED_AT"),
                    [[args.tenant, str(stats.events), str(stats.streams),
                      str(stats.rejections), str(stats.last_position or "-"), last]],
                    sys.stdout)
    return 0


async def _rejections(client: LedgerClient, args: argparse.Namespace) -> int:
    page = await client.rejections(codes=args.codes, limit=min(max(args.limit, 1), 1000))
    if args.json:
        for item in page.rejections:
            _print_json(item, sys.stdout)
    else:
        print_table(("RID", "JS_SEQ", "CODE", "EVENT_ID", "SUBJECT", "REASON"),
                    [[str(r.rid), str(r.js_seq), r.code, r.event_id or "-", r.subject,
                      r.reason if len(r.reason) <= 80 else r.reason[:77] + "..."]
                     for r in page.rejections], sys.stdout)
    return 0


async def _export(client: LedgerClient, args: argparse.Namespace) -> int:
    out: TextIO = open(args.output, "w") if args.output else sys.stdout  # noqa: SIM115
    count = 0
    try:
        async for event in client.iter_events(**_filter_kwargs(args), limit=1000):
            _print_json(event, out)
            count += 1
            if count % 10000 == 0:
                print(f"\rexported {count} events", end="", file=sys.stderr, flush=True)
    finally:
        if out is not sys.stdout:
            out.close()
    where = args.output or "stdout"
    print(f"\rexported {count} events of tenant {args.tenant!r} to {where}", file=sys.stderr)
    return 0
