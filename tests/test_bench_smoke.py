"""The benchmark's quick mode runs to the end, prints every row and saves every key.

Nothing here is about speed: CI machines are shared and noisy, and figures from a quick run are
dominated by start-up. Speed is judged from a full run (docs/performance.md).
"""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).with_name("bench.py")

# Kept here, not imported from bench.py: renaming a row or a key must fail this test.
ROWS = (
    "bus ceiling (fetch+ack, no storage)",
    "publish ceiling (raw publish_async)",
    "publish only (LedgerClient, one message per append)",
    "storage ceiling (raw sqlite3, worker's batch)",
    "storage, unique indexes only (raw sqlite3)",
    "LedgerWriter.commit (pre-decoded, worker's batch)",
    "eventsourcing SQLite recorder (worker's batch)",
    "FastStream pull batch + aiosqlite",
    "naive worker (fetch 1, insert, commit, ack)",
    "jetledger end to end",
    "jetledger end to end, coalescing off",
    "jetledger end to end, append_batch(100)",
    "worker drain of a backlog",
    "latency p50/p99 @ 1k/s",
    "latency p50/p99 @ 5k/s",
    "latency p50/p99 @ 80% of e2e",
    "query c=1 idle",
    "query c=32 idle",
    "query c=1 during ingest",
    "query c=32 during ingest",
    "ingest during c=1 queries",
    "ingest during c=32 queries",
    "ingest alone at N stored (end to end)",
    "growth: drain into an empty ledger",
    "growth: drain into N stored",
    "growth: drain into 10M stored",
    "worker peak RSS draining backlog",
    "decode_message per event",
)
TOP_KEYS = {"mode", "profile", "machine", "producers", "batch_size", "server_sync", "label",
            "seconds", "results", "notes"}
MACHINE_KEYS = {"cpu_model", "cores", "python", "sqlite", "nats_py", "loadavg_start",
                "loadavg_end"}
RESULT_KEYS = {
    "micro", "publish_only_eps", "publish_raw_eps", "bus_ceiling_eps", "naive_eps",
    "faststream_eps", "storage_raw_eps", "storage_raw_unique_eps", "storage_writer_eps",
    "eventsourcing_eps", "e2e_eps", "e2e_single_eps", "e2e_batch_eps", "latency",
    "ledger_build", "query_windows_s", "queries",
    "growth_n_eps", "growth_n_events", "ingest_under_queries_eps", "growth_long_eps",
    "growth_backlog", "growth_drain_0_eps", "growth_drain_n_eps", "growth_drain_n_stored",
    "memory", "query_plan", "ratios", "box", "e2e_cpu_us_per_event",
}
RATIO_KEYS = {
    "e2e_over_bus_ceiling", "e2e_batch_over_bus_ceiling", "e2e_over_coalescing_off",
    "e2e_over_naive", "storage_over_eventsourcing", "storage_unique_only_over_eventsourcing",
    "writer_over_eventsourcing", "writer_over_storage_ceiling",
    "e2e_coalescing_off_over_publish_only",
    "publish_only_over_raw", "bus_ceiling_over_publish_raw",
    "growth_n_over_0", "growth_long_over_0", "ingest_c32_queries_over_alone",
    "ingest_c1_queries_over_alone",
}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_mode_completes_and_reports_everything(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out), "--max-seconds", "240"],
        capture_output=True, text=True, timeout=280, check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    for row in ROWS:
        assert row in proc.stdout, f"row {row!r} missing from:\n{proc.stdout}"
    assert "ratios" in proc.stdout

    data = json.loads(out.read_text())
    assert TOP_KEYS <= data.keys(), TOP_KEYS - data.keys()
    assert data["mode"] == "quick"
    assert MACHINE_KEYS <= data["machine"].keys(), MACHINE_KEYS - data["machine"].keys()
    results = data["results"]
    assert RESULT_KEYS <= results.keys(), RESULT_KEYS - results.keys()
    assert RATIO_KEYS <= results["ratios"].keys(), RATIO_KEYS - results["ratios"].keys()
    if importlib.util.find_spec("faststream") is not None:  # the `bench` extra, not `test`
        # The peer's consumer lets a whole batch be in flight (JetStream's default of 1000
        # made each of its pulls of 2000 wait out the timeout: 8x slower than it can go).
        assert (results.get("faststream_max_ack_pending") or 0) >= data["batch_size"], results
    assert {"1k", "5k", "80pct"} <= results["latency"].keys()
    assert {"c1_idle", "c32_idle", "c1_ingest", "c32_ingest"} <= results["queries"].keys()
    assert {"c1", "c32"} <= results["ingest_under_queries_eps"].keys()
    assert {"worker_peak_rss_mb", "drain_eps", "backlog_events"} <= results["memory"].keys()
    # Where the CPU of each end-to-end variant went, per process (read from /proc).
    if Path("/proc/self/stat").exists():
        cpu = results["e2e_cpu_us_per_event"]
        assert cpu.keys() == {"e2e_eps", "e2e_single_eps", "e2e_batch_eps"}, cpu
        for variant in cpu.values():
            assert variant.keys() == {"worker", "producers", "nats_server"}, variant
            assert all(us > 0 for us in variant.values()), variant
        assert "CPU per event in the end-to-end runs" in proc.stdout
    # How busy the box was, and how much of it the hypervisor took, during each section
    # (read from /proc/stat: on a machine without it the shares are left out).
    sections = {"bus", "storage", "e2e", "latency", "queries", "growth", "memory"}
    shares = {"seconds", "busy_pct", "steal_pct"} if Path("/proc/stat").exists() else {"seconds"}
    assert all(shares <= results["box"][name].keys() for name in sections), results["box"]


def test_the_unique_only_layout_keeps_the_guarantees_indexes_and_drops_the_query_ones(
        tmp_path: Path) -> None:
    """The storage row "unique indexes only" is the worker's layout minus exactly the
    indexes that serve queries: dedupe and gap-free seqs keep theirs."""
    import bench  # tests/ is on sys.path, as for `conftest`

    def indexes(conn: sqlite3.Connection) -> dict[str, int]:
        return dict(conn.execute("SELECT name, \"unique\" FROM pragma_index_list('events')"))

    full = bench._open_ledger(str(tmp_path / "full.db"))
    unique_only = bench._open_ledger(str(tmp_path / "unique.db"), unique_only=True)
    try:
        assert indexes(unique_only) == {n: u for n, u in indexes(full).items() if u}
        assert set(indexes(unique_only)) == {"events_tenant_id", "events_stream_seq"}
        assert len(indexes(full)) == 7
    finally:
        full.close()
        unique_only.close()
