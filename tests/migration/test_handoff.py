"""Hand-offs between real VMM processes, driven through the CLI, on real /dev/kvm."""

from __future__ import annotations

import mmap
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import PATIENCE, VmmProcess, needs_kvm, wait_advanced

from intrahost.service.qmp_client import QmpClient
from intrahost.vmm.guests import layout
from intrahost.vmm.guests.probe import CounterProbe

pytestmark = needs_kvm

PROGRESS = 1 << 24


def cli(*args: str, timeout: float = 3 * PATIENCE) -> subprocess.CompletedProcess[str]:
    """Run the intrahost command; ``timeout`` exceeds the command's own bounds (a migration
    may take 120 s before ``migrate`` and ``upgrade`` give up), so that their error shows."""
    return subprocess.run(
        [sys.executable, "-m", "intrahost", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def shm_file() -> Iterator[Path]:
    path = Path(f"/dev/shm/ih-test-{uuid.uuid4().hex[:12]}")
    yield path
    path.unlink(missing_ok=True)


class Observer:
    """Watches the guest's counters from outside, through the shared memory file, as the
    benchmarks do: checks they never go back, and records the longest stand-still.

    A stand-still is measured from the first to the last look that saw the same counters:
    the time the guest certainly stood still. (Measured up to the first look that saw them
    move, it would also count the observer's own lateness, which on a loaded host is the
    scheduler's, not the hand-off's.)"""

    def __init__(self, path: Path, vcpus: int) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self.map = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self.vcpus = vcpus
        self.backwards: list[tuple[int, int]] = []
        self.longest_stall = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def counters(self) -> list[int]:
        return [layout.read_slot(self.map, i).counter for i in range(self.vcpus)]

    def _run(self) -> None:
        last = self.counters()
        first_seen = last_seen = time.monotonic()
        while not self._stop.is_set():
            t = time.monotonic()
            now = self.counters()
            for a, b in zip(last, now, strict=True):
                if b < a:
                    self.backwards.append((a, b))
            if now != last:
                self.longest_stall = max(self.longest_stall, last_seen - first_seen)
                first_seen = time.monotonic()
                last = now
            last_seen = t
            time.sleep(0.0002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def wait_counting(api: Path, vcpus: int, timeout: float = PATIENCE) -> list[int]:
    deadline = time.monotonic() + timeout
    with QmpClient(api) as qmp:
        while time.monotonic() < deadline:
            info = qmp.execute("query-vm")
            counts = [c["count"] for c in info.get("counter", [])]
            if len(counts) == vcpus and all(counts):
                return counts
            time.sleep(0.05)
    raise AssertionError("the guest did not start counting")


def counters(api: Path) -> list[int]:
    with QmpClient(api) as qmp:
        return [c["count"] for c in qmp.execute("query-vm")["counter"]]


def progress_lines(text: str) -> dict[int, list[int]]:
    """Per vCPU, the counts printed on the UART, in order; fails on a malformed line."""
    lines: dict[int, list[int]] = {}
    for line in text.splitlines():
        if line.startswith("counter:"):
            continue
        m = re.fullmatch(r"cpu(\d+) count=([0-9a-f]{16})", line)
        assert m, f"malformed or interleaved UART line {line!r}"
        lines.setdefault(int(m.group(1)), []).append(int(m.group(2), 16))
    return lines


def assert_uart_continuous(*files: Path) -> None:
    text = "".join(f.read_text() for f in files if f.exists())
    for vcpu, counts in progress_lines(text).items():
        expected = [PROGRESS * (i + 1) for i in range(len(counts))]
        assert counts == expected, f"vCPU {vcpu}: UART lines lost or duplicated"


StartSource = Callable[..., tuple[VmmProcess, Path]]


@pytest.fixture
def start_source(vmm_factory: Any, sockdir: Path) -> StartSource:
    def start(vcpus: int = 1, *extra: str) -> tuple[VmmProcess, Path]:
        api = sockdir / "api.sock"
        proc = vmm_factory(
            "run",
            "--memory",
            "64M",
            "--vcpus",
            str(vcpus),
            "--guest-args",
            f"progress={PROGRESS}",
            "--serial",
            f"file:{sockdir / 'serial-0.log'}",
            "--api-socket",
            str(api),
            *extra,
            name="source",
            wait_path=api,
        )
        wait_counting(api, vcpus)
        return proc, api

    return start


def test_one_handoff_continues_the_guest(
    start_source: StartSource, vmm_factory: Any, sockdir: Path, shm_file: Path
) -> None:
    source, api = start_source(1, "--memory-path", str(shm_file))
    mig = sockdir / "mig.sock"
    dest = vmm_factory(
        "run",
        "--incoming",
        f"unix:{mig}",
        "--api-socket",
        str(sockdir / "api2.sock"),
        "--serial",
        f"file:{sockdir / 'serial-1.log'}",
        name="dest",
        wait_path=mig,
    )
    before = counters(api)
    with CounterProbe.open(shm_file) as probe, QmpClient(api) as events:
        probe.calibrate()
        result = cli("migrate", "--api-socket", str(api), f"unix:{mig}")
        assert result.returncode == 0, result.stderr
        done = events.wait_event("MIGRATION", timeout=10)
        while done["data"]["status"] != "completed":
            done = events.wait_event("MIGRATION", timeout=10)
        blackout = done["data"]["blackout"]
        parked_at = blackout["paused_at_ns"] + blackout["pause_us"] * 1000
        guest = probe.handoff_gap_us(parked_at, blackout["resumed_at_ns"])
    assert "blackout:" in result.stdout and "total" in result.stdout
    # The guest's own view of the pause (its RDTSC gap across the hand-off, not any stall
    # before or after it) lies between the time its state was out of any VM (export,
    # transfer, import) and the whole blackout plus the scheduling slack of this 2-core host.
    numbers = {k: float(v) for k, v in re.findall(r"(\w+) (\d+) µs", result.stdout)}
    between = numbers["export"] + numbers["transfer"] + numbers["import"]
    assert between <= guest <= numbers["total"] + 50_000, (numbers, guest)
    assert source.wait() == 0, source.output()
    api2 = sockdir / "api2.sock"
    after = wait_advanced(lambda: counters(api2), before)
    wait_advanced(lambda: counters(api2), after, "the guest to go on counting on the new VMM")
    with QmpClient(api2) as qmp:
        assert qmp.execute("query-status")["status"] == "running"
        qmp.execute("quit")
    assert dest.wait() == 0
    assert_uart_continuous(sockdir / "serial-0.log", sockdir / "serial-1.log")


def test_the_handoff_writes_nothing_to_guest_memory(
    start_source: StartSource, sockdir: Path, shm_file: Path
) -> None:
    """The VMMs leave the guest's gap record alone: a value only the guest may replace (by
    a larger gap, which 2**62 TSC ticks never is) is still there after the hand-off."""
    sentinel = 1 << 62
    source, api = start_source(1, "--memory-path", str(shm_file))
    with CounterProbe.open(shm_file) as probe:
        gap_at = layout.slot_addr(0) + layout.SLOT_MAX_GAP
        probe.memory[gap_at : gap_at + 8] = sentinel.to_bytes(8, "little")
        status = probe.status()
        assert status is not None
        result = cli("upgrade", "--api-socket", str(api))
        assert result.returncode == 0, result.stderr
        probe.observed_pause_us(status)  # the guest ran on the new VMM
        after = probe.status()
        assert after is not None and after.slots[0].max_gap == sentinel
    assert source.wait(10) == 0, source.output()
    with QmpClient(api) as qmp:
        qmp.execute("quit")


@pytest.mark.timeout(900)  # 50 upgrades: minutes on a loaded host
def test_fifty_upgrades_keep_counting_without_a_gap(
    start_source: StartSource, sockdir: Path, shm_file: Path
) -> None:
    source, api = start_source(2, "--memory-path", str(shm_file))
    observer = Observer(shm_file, 2)
    procs = [source]
    blackouts: list[float] = []  # seconds, as each upgrade reports it
    try:
        for i in range(50):
            result = cli(
                "upgrade",
                "--api-socket",
                str(api),
                "--",
                "--serial",
                f"file:{sockdir / f'serial-{i + 1}.log'}",
            )
            assert result.returncode == 0, f"upgrade {i}: {result.stderr}"
            pid = int(re.search(r"new VMM pid (\d+)", result.stdout).group(1))  # type: ignore[union-attr]
            assert pid not in [p.pid for p in procs]
            total = re.search(r"total (\d+) µs", result.stdout)
            assert total, result.stdout
            blackouts.append(int(total.group(1)) / 1e6)
        assert source.wait() == 0
        time.sleep(0.2)
    finally:
        observer.stop()
    assert not observer.backwards, observer.backwards
    # No gap beyond a hand-off's own pause: the guest may stand still for the longest blackout
    # a VMM reported (longer on a loaded host), and 1 s more, no longer.
    assert observer.longest_stall < 1.0 + max(blackouts), (
        f"the counter stood still for {observer.longest_stall} s; the longest blackout "
        f"reported was {max(blackouts)} s"
    )
    with QmpClient(api) as qmp:
        qmp.execute("stop")
        for vcpu in range(2):
            layout.verify_region(observer.map, vcpu)
        qmp.execute("quit")
    assert_uart_continuous(*(sockdir / f"serial-{i}.log" for i in range(51)))


def test_four_vcpus_all_continue(start_source: StartSource, sockdir: Path) -> None:
    _source, api = start_source(4)
    before = counters(api)
    result = cli("upgrade", "--api-socket", str(api))
    assert result.returncode == 0, result.stderr
    wait_advanced(lambda: counters(api), before)
    cli("stop", "--api-socket", str(api))


def test_a_paused_guest_stays_paused(start_source: StartSource, sockdir: Path) -> None:
    _source, api = start_source(1)
    assert cli("pause", "--api-socket", str(api)).returncode == 0
    frozen = counters(api)
    result = cli("upgrade", "--api-socket", str(api))
    assert result.returncode == 0, result.stderr
    with QmpClient(api) as qmp:
        assert qmp.execute("query-status")["status"] == "paused"
    time.sleep(0.2)
    assert counters(api) == frozen
    assert cli("resume", "--api-socket", str(api)).returncode == 0
    wait_advanced(lambda: counters(api)[:1], frozen[:1])
    cli("stop", "--api-socket", str(api))


def test_guest_visible_flag_change_is_refused_before_the_pause(
    start_source: StartSource, sockdir: Path
) -> None:
    source, api = start_source(1)
    result = cli("upgrade", "--api-socket", str(api), "--", "--vcpus", "2")
    assert result.returncode != 0
    assert "--vcpus" in result.stderr and "keeps running" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert source.alive()
    before = counters(api)
    wait_advanced(lambda: counters(api)[:1], before[:1])
    with QmpClient(api) as qmp:
        assert qmp.execute("query-status")["status"] == "running"
        # Refused by the upgrade command before it started a new VMM: no migration was
        # attempted (the destination's own check, the safety net, is tested in test_protocol.py).
        assert qmp.execute("query-migrate")["status"] == "none"
    cli("stop", "--api-socket", str(api))


def test_cli_errors_are_one_clear_line(start_source: StartSource, sockdir: Path) -> None:
    _source, api = start_source(1)
    cases = [
        (("migrate", "--api-socket", str(api), f"unix:{sockdir}/nobody.sock"), "no VMM waits"),
        (("migrate", "--api-socket", str(api), "tcp:localhost:4444"), "unix:PATH"),
        (("status", "--api-socket", str(sockdir / "missing.sock")), "no control socket"),
    ]
    for args, text in cases:
        result = cli(*args)
        assert result.returncode != 0, args
        assert text in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert counters(api)[0] > 0
    cli("stop", "--api-socket", str(api))
