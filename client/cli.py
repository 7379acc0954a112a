"""The `jetledger` command. Subcommands live with the part they belong to: the worker's in
`jetledger.worker.cli` (installed with the `worker` extra), the readers' in
`jetledger.client.commands`."""

from __future__ import annotations

import argparse
import json
import sys

from jetledger.schemas import wire_schema

__all__ = ["build_parser", "main"]


def _schema(args: argparse.Namespace) -> int:
    json.dump(wire_schema(), sys.stdout, indent=2, sort_keys=True)
    print()
    return 0


def _missing_worker_extra(args: argparse.Namespace) -> int:
    print(f"jetledger {args.command}: needs the worker extra: pip install 'jetledger[worker]'",
          file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jetledger",
        description="Append-only, multi-tenant event ledger on NATS JetStream and SQLite.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    try:
        from jetledger.worker.cli import register as register_worker
    except ImportError:
        for name in ("worker", "admin", "rebuild"):
            sub.add_parser(name, help="(needs the worker extra)").set_defaults(
                func=_missing_worker_extra)
    else:
        register_worker(sub)
    try:
        from .commands import register as register_readers
    except ImportError:  # pragma: no cover - only while the reader commands are absent
        pass
    else:
        register_readers(sub)
    schema = sub.add_parser("schema", help="print the JSON Schema of every wire type")
    schema.set_defaults(func=_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
