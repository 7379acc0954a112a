"""Storage faults under a running worker (cases 18-20): the disk fills up, the filesystem turns
read-only, another process holds the write lock past busy_timeout. Each time the batch rolls
back whole, nothing is acked beyond what is committed, the worker stays up and retries with a
growing delay while reporting itself not ready, and once the fault clears everything lands
once.

Real faults, no hooks: a small tmpfs really runs out of space (SQLITE_FULL); an ext4 image
on a loop device really goes read-only through the kernel's own error path (`errors=
remount-ro`, triggered via /sys/fs/ext4/<dev>/trigger_fs_error), where writes on the
already-open files fail (as root, chmod or chattr +i would not stop them); a second process
really holds BEGIN IMMEDIATE. Mounting needs root: without it these cases are skipped.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    CONSUMER,
    STREAM,
    ProducerLedger,
    WorkerProcess,
    admin_connect,
    count_events,
    ledger_client,
    produce,
    provision,
    query,
    read_stream,
    verify,
    wait_drained,
    wait_for_count,
)

from jetledger.worker.natsserver import NatsServer

_REFUSED = re.compile(r"database refused the batch \((.*?)\); nothing committed, retrying "
                      r"in ([\d.]+)s")


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


needs_root = pytest.mark.skipif(not _can_mount(), reason="mounting a test filesystem needs root")


def _refusals(worker: WorkerProcess) -> list[tuple[str, float]]:
    return [(m.group(1), float(m.group(2))) for m in _REFUSED.finditer(worker.log_text())]


async def _wait_refusals(worker: WorkerProcess, n: int, timeout: float = 20) -> list[
        tuple[str, float]]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = _refusals(worker)
        if len(found) >= n:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"the worker did not report {n} refused commits:\n"
                         f"{worker.log_tail()}")


async def _assert_held(worker: WorkerProcess, url: str, db: Path, committed: int) -> dict[
        str, int]:
    """While the fault lasts: no commit lands, nothing is acked beyond what is committed, the
    batch is held unacked, and the worker is alive and says storage is failing."""
    await asyncio.sleep(1.0)
    assert count_events(db) == committed, "a commit landed during the fault"
    last = query(db, "SELECT last_js_seq FROM ingest_state")[0][0]
    nc = await admin_connect(url)
    try:
        info = await nc.jetstream().consumer_info(STREAM, CONSUMER)
    finally:
        await nc.close()
    floor = info.ack_floor.stream_seq if info.ack_floor else 0
    assert floor <= last, f"acked up to {floor} but committed only up to {last}"
    assert info.num_ack_pending > 0, "the refused batch is not held"
    assert worker.alive(), worker.log_tail()
    status, body = await asyncio.to_thread(worker.readyz)
    assert status == 503 and not body["checks"]["storage"]["ok"], body
    return {"ack_floor": floor, "ledger_last_js_seq": last,
            "held_unacked": info.num_ack_pending or 0}


def _assert_growing(delays: list[float]) -> None:
    assert delays == sorted(delays) and delays[-1] > delays[0], f"delays do not grow: {delays}"


# --- case 18: disk full ------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs (room for the ledger and its WAL once the filler is gone), unmounted
    afterwards."""
    if not _can_mount():
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        _run("mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt))
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30, check=False)


def _fill(path: Path) -> int:
    """Write until the filesystem says ENOSPC; returns the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12, 1 << 9):
            block = b"\0" * chunk
            while True:
                try:
                    written += f.write(block)
                except OSError:
                    break
    return written


@needs_root
async def test_disk_full_rolls_back_holds_and_lands_everything_once_space_is_freed(
    nats_server: NatsServer, small_disk: Path, tmp_path: Path
) -> None:
    url = nats_server.url
    await provision(url)
    worker = WorkerProcess(url, small_disk / "ledger", log_path=tmp_path / "worker.log",
                           extra_args=("--batch-size", "200", "--http-port", "0",
                                       "--max-retry-delay", "1"))
    worker.start()
    db = worker.data_dir / "ledger.db"
    ledger = ProducerLedger()
    never = asyncio.Event()
    filler = small_disk / "filler"
    try:
        async with await ledger_client(url) as client:
            await produce(client, ledger, never, limit=200, tag="before", retry_for=10)
            assert await wait_for_count(db, 200) == 200
            filled = _fill(filler)
            # ~1 MB of events: more than any slack left in the WAL file.
            await produce(client, ledger, never, limit=2000, start=200, tag="full", retry_for=10)
        refusals = await _wait_refusals(worker, 4)
        committed = count_events(db)
        held = await _assert_held(worker, url, db, committed)
        assert all("full" in reason for reason, _ in refusals), refusals
        _assert_growing([d for _, d in refusals])
        filler.unlink()
        drained = await wait_drained(url, db, timeout=30)
        msgs = await read_stream(url)
        assert (await asyncio.to_thread(worker.readyz))[0] == 200
    finally:
        code = worker.stop()
        worker.close()
    assert code == 0, worker.log_tail()
    verdict = verify(db, ledger, stream_msgs=msgs).assert_clean()
    assert verdict.acked == 2200
    print(f"\ncase 18 (tmpfs 64 MiB, filler {filled} B): committed_before_fault={committed} "
          f"refusals={len(_refusals(worker))} delays={[d for _, d in refusals]} held={held} "
          f"{verdict.summary()} worker={worker.stats()} consumer={drained}")


# --- case 19: filesystem turns read-only ------------------------------------------------------


@pytest.fixture
def ext4_volume(tmp_path: Path) -> Iterator[tuple[Path, str, Path]]:
    """(mount point, loop device, image) of a fresh 32 MiB ext4 with errors=remount-ro."""
    if not _can_mount() or not shutil.which("losetup") or not shutil.which("mkfs.ext4"):
        pytest.skip("needs root, losetup and mkfs.ext4")
    image = tmp_path / "ext4.img"
    mnt = tmp_path / "vol"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    _run("mkfs.ext4", "-q", "-F", str(image))
    try:
        dev = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"no loop device: {exc.stderr.strip()}")
    try:
        _run("mount", "-o", "errors=remount-ro", dev, str(mnt))
        yield mnt, dev, image
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30, check=False)
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30, check=False)


@needs_root
async def test_filesystem_turning_read_only_holds_every_batch_unacked_and_loses_nothing(
    nats_server: NatsServer, ext4_volume: tuple[Path, str, Path], tmp_path: Path
) -> None:
    """The kernel remounts the ledger's filesystem read-only under the worker (what ext4 does
    on an I/O error). Every commit fails; the worker holds the batch unacked and stays up. A
    read-only filesystem does not come back by itself: the operator stops the worker,
    repairs (fsck) and remounts; the restarted worker lands everything once, and every event
    committed before the fault is still there."""
    mnt, dev, _ = ext4_volume
    url = nats_server.url
    await provision(url)
    args = ("--batch-size", "200", "--http-port", "0", "--max-retry-delay", "1")
    worker = WorkerProcess(url, mnt / "ledger", log_path=tmp_path / "worker.log",
                           extra_args=args)
    worker.start()
    db = worker.data_dir / "ledger.db"
    ledger = ProducerLedger()
    never = asyncio.Event()
    try:
        async with await ledger_client(url) as client:
            await produce(client, ledger, never, limit=300, tag="before")
            committed = await wait_for_count(db, 300)
            assert committed == 300
            Path(f"/sys/fs/ext4/{Path(dev).name}/trigger_fs_error").write_text(
                "jetledger fault test: read-only\n")
            await produce(client, ledger, never, limit=500, start=300, tag="ro")
        refusals = await _wait_refusals(worker, 4)
        held = await _assert_held(worker, url, db, committed)
        _assert_growing([d for _, d in refusals])
        stop_code = worker.stop()
    finally:
        worker.close()
    # Repair as an operator would: unmount, fsck, mount again.
    await asyncio.to_thread(_run, "umount", str(mnt))
    fsck = await asyncio.to_thread(subprocess.run, ["e2fsck", "-fy", dev], capture_output=True,
                                   text=True, timeout=60, check=False)
    assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr  # 1: errors corrected
    await asyncio.to_thread(_run, "mount", "-o", "errors=remount-ro", dev, str(mnt))
    assert count_events(db) == committed, "events committed before the fault were lost"
    restarted = WorkerProcess(url, mnt / "ledger", log_path=tmp_path / "worker2.log",
                              extra_args=args)
    restarted.start()
    try:
        drained = await wait_drained(url, db, timeout=30)
        msgs = await read_stream(url)
    finally:
        code = restarted.stop()
        restarted.close()
    assert code == 0, restarted.log_tail()
    verdict = verify(db, ledger, stream_msgs=msgs).assert_clean()
    assert verdict.acked == 800
    print(f"\ncase 19 (ext4 emergency read-only): committed_before_fault={committed} "
          f"refusals={len(refusals)} reasons={sorted({r for r, _ in refusals})} held={held} "
          f"stop_exit={stop_code} fsck_exit={fsck.returncode} {verdict.summary()} "
          f"restarts=1 consumer={drained}")


# --- case 20: the write lock held by another process -----------------------------------------

BUSY_TIMEOUT_MS = 1000
HOLD_FOR = 4.0  # seconds: four busy timeouts
_HOLDER = """\
import sqlite3, sys
c = sqlite3.connect({db!r}, isolation_level=None)
c.execute("PRAGMA busy_timeout=10000")
sys.stdin.readline()
c.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
c.execute("ROLLBACK")
"""


async def test_write_lock_held_past_busy_timeout_holds_the_batch_and_lands_it_after(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url = nats_server.url
    await provision(url)
    worker = WorkerProcess(url, tmp_path / "ledger",
                           extra_args=("--batch-size", "200", "--http-port", "0",
                                       "--sqlite-busy-timeout-ms", str(BUSY_TIMEOUT_MS)))
    worker.start()
    db = worker.data_dir / "ledger.db"
    ledger = ProducerLedger()
    never = asyncio.Event()
    # Another process: opens the ledger, takes the write lock when told, releases when told.
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER.format(db=str(db)),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert holder.stdin is not None and holder.stdout is not None
    try:
        async with await ledger_client(url) as client:
            await produce(client, ledger, never, limit=100, tag="before")
            committed = await wait_for_count(db, 100)
            assert committed == 100
            holder.stdin.write(b"lock\n")
            await holder.stdin.drain()
            assert (await asyncio.wait_for(holder.stdout.readline(), 15)).strip() == b"locked"
            locked_at = time.monotonic()
            await produce(client, ledger, never, limit=500, start=100, tag="locked")
        refusals = await _wait_refusals(worker, 2, timeout=HOLD_FOR + 5)
        held = await _assert_held(worker, url, db, committed)
        assert all("locked" in reason for reason, _ in refusals), refusals
        await asyncio.sleep(max(0.0, HOLD_FOR - (time.monotonic() - locked_at)))
        holder.stdin.write(b"release\n")
        await holder.stdin.drain()
        assert await asyncio.wait_for(holder.wait(), 10) == 0
        released_at = time.monotonic()
        drained = await wait_drained(url, db, timeout=30)
        landed_after = time.monotonic() - released_at
        msgs = await read_stream(url)
    finally:
        if holder.returncode is None:
            holder.kill()
        await holder.wait()
        holder.stdin.close()
        code = worker.stop()
        worker.close()
    assert code == 0, worker.log_tail()
    refusals = _refusals(worker)
    _assert_growing([d for _, d in refusals])
    verdict = verify(db, ledger, stream_msgs=msgs).assert_clean()
    assert verdict.acked == 600
    print(f"\ncase 20 (lock held {HOLD_FOR}s, busy_timeout {BUSY_TIMEOUT_MS}ms): "
          f"refusals={len(refusals)} delays={[d for _, d in refusals]} held={held} "
          f"landed_{landed_after:.1f}s_after_release {verdict.summary()} "
          f"worker={worker.stats()} consumer={drained}")
