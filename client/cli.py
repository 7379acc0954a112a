"""The `jetledger` command."""

from __future__ import annotations

import argparse
import json
import sys

from jetledger.schemas import wire_schema

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jetledger",
        description="Append-only, multi-tenant event ledger on NATS JetStream and SQLite.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="run the ledger worker (embedded NATS by default)")
    try:
        from jetledger.worker.cli import add_arguments
    except ImportError:
        worker.set_defaults(missing_extra=True)
    else:
        add_arguments(worker)
    sub.add_parser("schema", help="print the JSON Schema of every wire type")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "schema":
        json.dump(wire_schema(), sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
    if args.command == "worker":
        if getattr(args, "missing_extra", False):
            print("jetledger: the worker needs its extra: pip install 'jetledger[worker]'",
                  file=sys.stderr)
            return 2
        from jetledger.worker.cli import run_worker

        return run_worker(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
