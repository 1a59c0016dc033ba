"""Exactly one runner, no data loss: every fault at every step of the hand-off, on real
processes. The matrix (steps x faults) with each outcome is printed at the end of the run.

For each case a source VMM runs the counter guest (memory in /dev/shm, so the test watches
the counter from outside) and a destination waits with --incoming; the faulty side is started
with INTRAHOST_TEST_FAULT=SIDE:POINT:FAULT (see intrahost.migration.faults). After the
hand-off settles, the invariants are checked:

- the guest runs on exactly one VMM — never both; never none unless the process killed was
  the one holding the guest at that moment (the outcome then says "lost: holder killed");
- its counter still advances and its memory region matches counter and checksum;
- the surviving VMM's control socket answers;
- nothing is left behind: the old VMM has exited after a hand-off; after a failed one the
  destination holds no guest (it is back to waiting, as a waiting VMM does after any failed
  attempt, or it was killed), and once told to ``quit`` it exits and its migration socket is
  gone; the source holds no more fds than before the attempt.
"""

from __future__ import annotations

import mmap
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from support import PATIENCE, needs_kvm, wait_until

from intrahost.migration import faults
from intrahost.service.qmp_client import QmpClient, QmpConnectionError
from intrahost.vmm.guests import layout
from intrahost.vmm.guests.diskcheck import GuestView, check_image
from intrahost.vmm.guests.layout import NetState
from intrahost.vmm.guests.netcheck import EchoReport, EchoStream, NetNamespace, parse_ping
from intrahost.vmm.guests.probe import NetProbe

pytestmark = needs_kvm

TIMEOUT = 2.0  # each side's per-message timeout in these tests
SETTLE = 6 * TIMEOUT + 2.5 * TIMEOUT + PATIENCE  # worst case: a stall past every timeout
#: How long the test waits for a VMM's control socket to answer: a VMM that is alive answers
#: (a slow answer must not pass for a VMM that runs nothing).
QMP_TIMEOUT = 10.0

CASES = [
    ("source", point, kind)
    for point in faults.SOURCE_POINTS
    for kind in ("kill", "close", "stall", "truncate", "corrupt")
] + [("source", "state", "badstate")]
CASES += [
    ("destination", point, kind)
    for point in faults.DESTINATION_POINTS
    for kind in ("kill", "close", "stall", "truncate", "corrupt")
]
#: SEV-ES guests (model platform): just before and just after MOVE on the destination, and
#: MOVE refused (as a real kernel can: EBUSY, EINVAL, ...).
CASES += [
    ("destination", point, kind)
    for point in faults.SEV_DESTINATION_POINTS
    for kind in ("kill", "close", "stall")
] + [("destination", "before-move", "fail")]

#: The disk guest (writing to a real image through virtio-blk): a subset of steps x faults
#: that covers each device step — the fds sent and received, the pause that drains the device
#: and releases its irqfds, the import, the commit that hands the irqfds over — with kills at
#: every phase. After every cell the image is checked against what the guest saw complete.
DISK_CASES = [
    ("source", "devices", "kill"),
    ("source", "devices", "close"),
    ("source", "before-pause", "kill"),
    ("source", "after-pause", "kill"),
    ("source", "after-pause", "stall"),
    ("source", "state", "kill"),
    ("source", "state", "corrupt"),
    ("source", "after-state", "kill"),
    ("source", "commit", "close"),
    ("source", "after-commit", "kill"),
    ("destination", "recv-device-fds", "kill"),
    ("destination", "recv-device-fds", "close"),
    ("destination", "recv-ready", "kill"),
    ("destination", "recv-state", "kill"),
    ("destination", "recv-state", "stall"),
    ("destination", "after-import", "kill"),
    ("destination", "after-import", "close"),
    ("destination", "at-commit", "kill"),
    ("destination", "after-commit", "kill"),
]

#: The net guest (ARP, ping, UDP echo through virtio-net on a tap in a namespace of the cell's
#: own) with an echo stream running through the whole cell: the same device steps, a kill in
#: every phase (the source before and after the drain, during the export; the destination on
#: the fds, at READY, during and after the import, at and after the commit), closed sockets
#: where the other side must notice, and stalls inside the pause and the import.
NET_CASES = [
    ("source", "devices", "kill"),
    ("source", "devices", "close"),
    ("source", "before-pause", "kill"),
    ("source", "after-pause", "stall"),
    ("source", "export", "kill"),
    ("source", "state", "corrupt"),
    ("source", "after-state", "kill"),
    ("source", "commit", "close"),
    ("source", "after-commit", "kill"),
    ("destination", "recv-device-fds", "kill"),
    ("destination", "recv-device-fds", "close"),
    ("destination", "recv-ready", "kill"),
    ("destination", "recv-state", "kill"),
    ("destination", "recv-state", "stall"),
    ("destination", "after-import", "kill"),
    ("destination", "after-import", "close"),
    ("destination", "at-commit", "kill"),
    ("destination", "after-commit", "kill"),
]

#: (side, point, fault) -> outcome, printed by conftest's terminal summary.
MATRIX: dict[tuple[str, str, str], str] = {}
#: The same for DISK_CASES and NET_CASES.
DISK_MATRIX: dict[tuple[str, str, str], str] = {}
NET_MATRIX: dict[tuple[str, str, str], str] = {}


class Vmm:
    def __init__(
        self, args: list[str], log: Path, fault: str | None, prefix: Sequence[str] = ()
    ) -> None:
        """``prefix``: a command that execs the VMM (``ip netns exec NS``)."""
        env = os.environ | {"INTRAHOST_MIGRATION_TIMEOUT": str(TIMEOUT)}
        env.pop(faults.ENV, None)
        if fault:
            env[faults.ENV] = fault
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "intrahost", "--log-level", "info", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait(PATIENCE)


def _status(api: Path) -> str | None:
    try:
        with QmpClient(api, timeout=QMP_TIMEOUT) as qmp:
            return str(qmp.execute("query-status")["status"])
    except (QmpConnectionError, OSError):
        return None


@pytest.fixture
def shm() -> Iterator[Path]:
    path = Path(f"/dev/shm/ih-fault-{uuid.uuid4().hex[:10]}")
    yield path
    path.unlink(missing_ok=True)


@pytest.mark.parametrize(("side", "point", "kind"), CASES, ids=lambda v: str(v))
def test_fault(side: str, point: str, kind: str, sockdir: Path, shm: Path) -> None:
    fault = f"{side}:{point}:{kind}"
    api_src, api_dst, mig = sockdir / "a.sock", sockdir / "b.sock", sockdir / "m.sock"
    sev = ["--sev-es", "--platform", "model"] if point in faults.SEV_DESTINATION_POINTS else []
    source = Vmm(
        [
            "run", "--memory", "32M", "--guest-args", "progress=1073741824",
            "--memory-path", str(shm), "--serial", "none", "--api-socket", str(api_src), *sev,
        ],
        sockdir / "source.log",
        fault if side == "source" else None,
    )  # fmt: skip
    dest = Vmm(
        ["run", "--incoming", f"unix:{mig}", "--api-socket", str(api_dst)],
        sockdir / "dest.log",
        fault if side == "destination" else None,
    )
    try:
        wait_until(
            lambda: (
                (api_src.exists() and mig.exists() and shm.exists())
                or not (source.alive() and dest.alive())
            ),
            "both VMMs to start",
            interval=0.01,
        )
        assert source.alive() and dest.alive(), "a VMM failed to start"
        fd = os.open(shm, os.O_RDONLY)
        mem = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
        os.close(fd)
        wait_until(
            lambda: _has_status(mem) and layout.read_slot(mem, 0).counter > 0,
            "the guest to count",
            interval=0.01,
        )
        fds_before = source.fds()
        src_runs, dst_runs = _hand_off(source, dest, api_src, api_dst, mig, side, kind)
        killed = kind == "kill"
        if src_runs or dst_runs:
            outcome = "source" if src_runs else "destination"
            survivor_api = api_src if src_runs else api_dst
            a = layout.read_slot(mem, 0).counter
            wait_until(
                lambda: layout.read_slot(mem, 0).counter > a, "the survivor's guest to advance"
            )
            with QmpClient(survivor_api) as q:
                q.execute("stop")
                layout.verify_region(mem, 0)
                q.execute("cont")
            other = dest if src_runs else source
            deadline = time.monotonic() + 3 * TIMEOUT + PATIENCE
            while other.alive() and time.monotonic() < deadline:
                if src_runs and _waits_again(api_dst):
                    break
                time.sleep(0.05)
            if src_runs:
                # The failed destination holds no guest: it waits again (or it was killed);
                # told to quit, it exits and leaves nothing behind.
                if dest.alive():
                    assert _waits_again(api_dst), "the failed destination is not waiting"
                    with QmpClient(api_dst) as q:
                        q.execute("quit")
                    assert dest.proc.wait(10) == 0, "the waiting destination did not quit"
                    assert not api_dst.exists(), "the destination's control socket remains"
                assert not dest.alive(), "the failed destination is still running"
                if kind == "kill" and side == "destination":
                    # A process killed with SIGKILL cannot unlink its socket: it must at
                    # least be stale, so that the next --incoming replaces it.
                    assert not mig.exists() or _stale(mig), "a live migration socket remains"
                else:
                    assert not mig.exists(), "the migration socket was left behind"
                # (control connections the test opened close asynchronously)
                deadline = time.monotonic() + PATIENCE
                while source.fds() > fds_before and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert source.fds() <= fds_before, "the source leaked fds"
            else:
                assert not source.alive(), "the old VMM did not exit after the hand-off"
        else:
            # Nobody runs the guest: only allowed when the killed process held it.
            assert killed, f"the guest runs nowhere: {_logs(source, dest)}"
            outcome = "lost: holder killed"
        MATRIX[(side, point, kind)] = outcome
        mem.close()
    except BaseException:
        print(_logs(source, dest))
        raise
    finally:
        source.kill()
        dest.kill()


@pytest.mark.parametrize(("side", "point", "kind"), DISK_CASES, ids=lambda v: str(v))
def test_fault_with_a_disk(
    side: str, point: str, kind: str, sockdir: Path, shm: Path, tmp_path: Path
) -> None:
    """As test_fault, with the disk guest writing to an image: exactly one VMM runs it (none
    only if the holder was killed), it goes on writing there, the survivor's device counters
    agree with the guest's, a failed hand-off leaves the source with the fds it had, and the
    image holds every write the guest saw complete — also when nobody survived."""
    fault = f"{side}:{point}:{kind}"
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(32 << 20)
    api_src, api_dst, mig = sockdir / "a.sock", sockdir / "b.sock", sockdir / "m.sock"
    source = Vmm(
        [
            "run", "--memory", "32M", "--guest", "disk", "--guest-args", "progress=1000000000",
            "--disk", f"path={image}", "--memory-path", str(shm), "--serial", "none",
            "--api-socket", str(api_src),
        ],
        sockdir / "source.log",
        fault if side == "source" else None,
    )  # fmt: skip
    dest = Vmm(
        ["run", "--incoming", f"unix:{mig}", "--api-socket", str(api_dst)],
        sockdir / "dest.log",
        fault if side == "destination" else None,
    )
    mem: mmap.mmap | None = None
    try:
        deadline = time.monotonic() + 60
        while not (api_src.exists() and mig.exists() and shm.exists()):
            assert source.alive() and dest.alive(), "a VMM failed to start"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        fd = os.open(shm, os.O_RDONLY)
        mem = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
        os.close(fd)
        while _disk_writes(mem) < 200:
            assert time.monotonic() < deadline, "the disk guest does not write"
            time.sleep(0.01)
        fds_before = source.fds()
        src_runs, dst_runs = _hand_off(source, dest, api_src, api_dst, mig, side, kind)
        if src_runs or dst_runs:
            outcome = "source" if src_runs else "destination"
            survivor_api = api_src if src_runs else api_dst
            a = _disk_writes(mem)
            deadline = time.monotonic() + 30
            while _disk_writes(mem) < a + 100:
                assert time.monotonic() < deadline, "the survivor's guest does not write"
                time.sleep(0.01)
            with QmpClient(survivor_api) as q:
                q.execute("stop")
                (disk,) = q.execute("query-block")
                _check_disk(image, mem, disk["stats"])
                q.execute("cont")
            other = dest if src_runs else source
            deadline = time.monotonic() + 3 * TIMEOUT + PATIENCE
            while other.alive() and time.monotonic() < deadline:
                if src_runs and _waits_again(api_dst):
                    break
                time.sleep(0.05)
            if src_runs:
                # The failed destination holds no guest: it waits again (or it was killed);
                # told to quit, it exits and leaves nothing behind.
                if dest.alive():
                    assert _waits_again(api_dst), "the failed destination is not waiting"
                    with QmpClient(api_dst) as q:
                        q.execute("quit")
                    assert dest.proc.wait(10) == 0, "the waiting destination did not quit"
                    assert not api_dst.exists(), "the destination's control socket remains"
                assert not dest.alive(), "the failed destination is still running"
                deadline = time.monotonic() + 3
                while source.fds() > fds_before and time.monotonic() < deadline:
                    time.sleep(0.05)
                # The image and every eventfd are still the source's, and no more fds.
                assert source.fds() == fds_before, "the source's fds changed"
            else:
                assert not source.alive(), "the old VMM did not exit after the hand-off"
        else:
            assert kind == "kill", f"the guest runs nowhere: {_logs(source, dest)}"
            outcome = "lost: holder killed"
            _check_disk(image, mem, None)
        DISK_MATRIX[(side, point, kind)] = outcome
    except BaseException:
        print(_logs(source, dest))
        raise
    finally:
        if mem is not None:
            mem.close()
        source.kill()
        dest.kill()


GUEST_IP = "192.0.2.2"
#: The echo stream's rate, and the tap's queue length: while nobody reads the tap (the pause,
#: a stall, a VMM waiting on the other's timeout) the frames wait in the tap's queue, whose
#: kernel default (1000 frames) a 5 s stall at this rate overflows — the kernel then drops
#: frames before any VMM sees them (counted in ``tap-dropped``), a host setting, not the
#: device's doing. 10000 frames hold 20 s of the stream.
NET_RATE = 500.0
TAP_QUEUE = 10_000


@pytest.mark.parametrize(("side", "point", "kind"), NET_CASES, ids=lambda v: str(v))
def test_fault_with_a_net(
    side: str, point: str, kind: str, sockdir: Path, shm: Path, netns: NetNamespace
) -> None:
    """As test_fault, with the net guest answering an echo stream that runs through the whole
    cell, in a network namespace of the cell's own. Afterwards exactly one VMM runs the guest
    (none only if the holder was killed) and only that VMM holds the tap; the guest echoes new
    datagrams through it (its device counters advance) and answers ping; a failed hand-off
    leaves the source with the fds it had, its tap reads resumed.

    No datagram is lost and none echoed twice, in every cell where the guest survives: the
    device never holds a frame of its own (it reads the tap only into a receive buffer the
    guest made available, and publishes each frame in the same batch; the drain stops between
    frames), so whatever arrives while nobody reads waits in the tap's queue, and whichever
    VMM runs the guest next reads it — the guest's own count of echoes equals the datagrams
    sent. Where the holder was killed, the datagrams lost are the stream's tail: each one
    sent before the guest stopped was echoed once, in order, and none after it."""
    fault = f"{side}:{point}:{kind}"
    netns.ip("link", "set", "tap0", "txqueuelen", str(TAP_QUEUE))
    prefix = netns.command([])
    api_src, api_dst, mig = sockdir / "a.sock", sockdir / "b.sock", sockdir / "m.sock"
    source = Vmm(
        [
            "run", "--memory", "32M", "--guest", "net", "--guest-args", f"ip={GUEST_IP}/24",
            "--net", "tap=tap0", "--memory-path", str(shm), "--serial", "none",
            "--api-socket", str(api_src),
        ],
        sockdir / "source.log",
        fault if side == "source" else None,
        prefix,
    )  # fmt: skip
    dest = Vmm(
        ["run", "--incoming", f"unix:{mig}", "--api-socket", str(api_dst)],
        sockdir / "dest.log",
        fault if side == "destination" else None,
        prefix,
    )
    probe: NetProbe | None = None
    stream = EchoStream(netns, GUEST_IP, rate=NET_RATE, grace=0.5)
    try:
        wait_until(
            lambda: (
                (api_src.exists() and mig.exists() and _sized(shm, 32 << 20))
                or not (source.alive() and dest.alive())
            ),
            "both VMMs to start",
            interval=0.01,
        )
        assert source.alive() and dest.alive(), "a VMM failed to start"
        probe = NetProbe.open(shm)
        running = probe
        wait_until(
            lambda: (s := running.status()) is not None and s.state == NetState.RUNNING,
            "the net guest to run",
        )
        (net,) = _query_net(api_src)
        tap_dropped = net["tap-dropped"]
        stream.start()
        stream.wait_replies(200, timeout=PATIENCE)
        fds_before = source.fds()
        src_runs, dst_runs = _hand_off(source, dest, api_src, api_dst, mig, side, kind)
        if src_runs or dst_runs:
            outcome = "source" if src_runs else "destination"
            survivor, survivor_api = (source, api_src) if src_runs else (dest, api_dst)
            # New datagrams (sent from now on) are echoed, through the survivor's device.
            (before,) = _query_net(survivor_api)
            sent = _sent_after(stream, time.monotonic_ns())
            wait_until(
                lambda: _progress(stream)["received"] >= sent + 200,
                "the survivor's guest to echo new datagrams",
            )
            (after,) = _query_net(survivor_api)
            assert after["rx-packets"] - before["rx-packets"] >= 200, (before, after)
            assert after["tx-packets"] - before["tx-packets"] >= 200, (before, after)
            assert not after["rx-stopped"] and after["tx-errors"] == 0, after
            pings = _ping(netns)
            other = dest if src_runs else source
            deadline = time.monotonic() + 3 * TIMEOUT + PATIENCE
            while other.alive() and time.monotonic() < deadline:
                if src_runs and _waits_again(api_dst):
                    break
                time.sleep(0.05)
            if src_runs:
                # The failed destination holds no guest and no tap: it waits again (or it
                # was killed); told to quit, it exits.
                if dest.alive():
                    assert _waits_again(api_dst), "the failed destination is not waiting"
                    assert not _holds_tap(dest), "the waiting destination holds the tap"
                    with QmpClient(api_dst) as q:
                        q.execute("quit")
                    assert dest.proc.wait(10) == 0, "the waiting destination did not quit"
                assert not dest.alive(), "the failed destination is still running"
                deadline = time.monotonic() + PATIENCE
                while source.fds() > fds_before and time.monotonic() < deadline:
                    time.sleep(0.05)
                # The tap and every eventfd are still the source's, and no more fds.
                assert source.fds() == fds_before, "the source's fds changed"
            else:
                assert not source.alive(), "the old VMM did not exit after the hand-off"
            assert _holds_tap(survivor), "the VMM running the guest does not hold the tap"
            stream.stop()
            report = stream.report()
            status = probe.status()
            assert status is not None
            (last,) = _query_net(survivor_api)
            _check_stream(report, status.udp_echoes, status.duplicates)
            assert report.lost == 0, f"datagrams lost: {report.summary()}"
            assert status.udp_echoes == report.sent, (status, report.summary())
            assert status.icmp_echoes == pings, status  # every ping request answered once
            assert last["tap-dropped"] == tap_dropped, last
        else:
            assert kind == "kill", f"the guest runs nowhere: {_logs(source, dest)}"
            outcome = "lost: holder killed"
            assert not any(_holds_tap(v) for v in (source, dest) if v.alive())
            stream.stop()
            report = stream.report()
            status = probe.status()
            assert status is not None
            _check_stream(report, status.udp_echoes, status.duplicates)
            # Lost: only the tail, from the first datagram that came after the guest stopped.
            assert report.lost_ranges[:1] == [[report.received + 1, report.sent]], report.summary()
        NET_MATRIX[(side, point, kind)] = outcome
    except BaseException:
        print(_logs(source, dest))
        raise
    finally:
        stream.close()
        if probe is not None:
            probe.close()
        source.kill()
        dest.kill()


def _sized(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size >= size
    except FileNotFoundError:
        return False


def _query_net(api: Path) -> list[dict[str, Any]]:
    with QmpClient(api, timeout=QMP_TIMEOUT) as qmp:
        nets: list[dict[str, Any]] = qmp.execute("query-net")
    return nets


def _progress(stream: EchoStream) -> dict[str, Any]:
    progress = stream.progress()
    assert progress is not None, "the echo stream reports no progress"
    return progress


def _sent_after(stream: EchoStream, when_ns: int) -> int:
    """A count of datagrams the stream had sent by a moment after ``when_ns``
    (CLOCK_MONOTONIC): every datagram beyond it was sent after ``when_ns``."""
    return int(
        wait_until(
            lambda: (p := _progress(stream))["now_ns"] >= when_ns and p,
            "the echo stream's progress",
        )["sent"]
    )


def _ping(netns: NetNamespace, count: int = 5) -> int:
    """Ping the guest until ``count`` replies came (or more), none twice; return how many
    requests were sent. (With ``-w``, ping waits for the replies until its deadline — by
    default it gives up on one after twice the slowest round trip so far, which a busy host
    exceeds — and goes on sending meanwhile, so it may send a request or two more, whose
    replies it does not wait for: the guest's own count of echoes tells that it answered
    them.)"""
    result = netns.run(
        ["ping", "-q", "-n", "-c", str(count), "-i", "0.01", "-w", str(int(PATIENCE)), GUEST_IP],
        check=False,
        timeout=PATIENCE + 10,
    )
    pinged = parse_ping(result.stdout)
    assert pinged.received >= count and pinged.duplicates == 0, pinged
    return pinged.transmitted


def _holds_tap(vmm: Vmm) -> bool:
    """Whether the VMM process holds an fd attached to tap0 (a tun fd's fdinfo names its
    interface)."""
    fdinfo = Path(f"/proc/{vmm.proc.pid}/fdinfo")
    for entry in fdinfo.iterdir():
        try:
            if "iff:\ttap0\n" in entry.read_text():
                return True
        except OSError:
            continue  # closed meanwhile
    return False


def _check_stream(report: EchoReport, echoes: int, duplicates: int) -> None:
    """Nothing echoed twice or out of order, nothing but the stream's replies, nothing lost
    on the host's side of the tap (the stream's socket, its sends); the guest echoed every
    datagram that came back (more if the holder died with replies not yet sent), and took no
    used-ring entry twice."""
    assert (report.duplicated, report.reordered, report.foreign) == (0, 0, 0), report.summary()
    assert (report.send_errors, report.socket_drops) == (0, 0), report.summary()
    assert echoes >= report.received, (echoes, report.summary())
    assert duplicates == 0, f"the guest took {duplicates} used-ring entries twice"


def _hand_off(
    source: Vmm, dest: Vmm, api_src: Path, api_dst: Path, mig: Path, side: str, kind: str
) -> tuple[bool, bool]:
    """Ask the source to migrate to ``mig``, wait until the source finishes (completed or
    failed) or dies and the destination runs, waits again or dies; then whether each runs
    the guest (never both)."""
    qmp = QmpClient(api_src, timeout=QMP_TIMEOUT)
    try:
        qmp.execute("migrate", uri=f"unix:{mig}")
    except QmpConnectionError:
        # The source may kill itself before its reply to `migrate` goes out.
        assert side == "source" and kind == "kill", "the source dropped the control socket"
    qmp.close()
    deadline = time.monotonic() + SETTLE
    while time.monotonic() < deadline:
        src_done = not source.alive() or _migration_status(api_src) in ("completed", "failed")
        dst_done = not dest.alive() or _dest_settled(api_dst)
        if (
            src_done
            and dst_done
            and not (dest.alive() and source.alive() and _both_undecided(api_src, api_dst))
        ):
            break
        time.sleep(0.05)
    time.sleep(0.3)
    src_runs = source.alive() and _status(api_src) == "running"
    dst_runs = dest.alive() and _status(api_dst) == "running"
    assert not (src_runs and dst_runs), "the guest runs on two VMMs"
    return src_runs, dst_runs


def _disk_writes(mem: mmap.mmap) -> int:
    try:
        return layout.read_disk_status(mem).writes_completed
    except layout.GuestStatusMissing:
        return 0


def _check_disk(image: Path, mem: mmap.mmap, stats: dict[str, int] | None) -> None:
    """Every write the guest saw complete is on the image; no verify failure, I/O error or
    duplicate completion; the device's counters (if it lives) cover the guest's."""
    status = layout.read_disk_status(mem)
    assert (status.verify_failures, status.io_errors, status.duplicates) == (0, 0, 0), status
    if stats is not None:
        assert status.writes_completed <= stats["wr_operations"] <= status.writes_submitted
        assert stats["wr_operations"] - status.writes_completed <= status.inflight
    report = check_image(image, GuestView.from_memory(mem))
    assert report.ok, report.summary()


def _stale(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        return True
    finally:
        probe.close()
    return False


def _has_status(mem: mmap.mmap) -> bool:
    try:
        layout.read_status(mem)
        return True
    except layout.GuestStatusMissing:
        return False


def _migration_status(api: Path) -> str | None:
    try:
        with QmpClient(api, timeout=QMP_TIMEOUT) as qmp:
            return str(qmp.execute("query-migrate")["status"])
    except (QmpConnectionError, OSError):
        return None


def _dest_settled(api: Path) -> bool:
    """The destination runs the guest, or it is back to waiting after a failed attempt."""
    return _status(api) in ("running", "paused") or _waits_again(api)


def _waits_again(api: Path) -> bool:
    try:
        with QmpClient(api, timeout=2) as qmp:
            if qmp.execute("query-status")["status"] != "inmigrate":
                return False
            progress = qmp.execute("query-migrate")
    except (QmpConnectionError, OSError):
        return False
    return progress["status"] == "waiting"


def _both_undecided(api_src: Path, api_dst: Path) -> bool:
    return _migration_status(api_src) == "active"


def _logs(*vmms: Vmm) -> str:
    return "\n".join(f"--- {v.log.name}\n{v.log.read_text(errors='replace')}" for v in vmms)


# --- the plan itself (no processes) ------------------------------------------------------------


def test_without_the_variable_nothing_is_injected() -> None:
    assert faults.from_environment({}) is faults.NO_FAULTS
    assert faults.from_environment({faults.ENV: ""}) is faults.NO_FAULTS
    faults.NO_FAULTS.hit("source", "state", close=lambda: pytest.fail("closed"))
    assert faults.NO_FAULTS.frame_fault() is None
    assert faults.NO_FAULTS.state(b"state") == b"state"


@pytest.mark.parametrize(
    "spec",
    [
        "source",
        "sideways:start:kill",
        "source:nowhere:kill",
        "source:recv-start:kill",
        "source:start:explode",
        "source:start:badstate",
        "destination:after-move:fail",
    ],
)
def test_a_fault_this_vmm_cannot_inject_is_refused(spec: str) -> None:
    with pytest.raises(faults.FaultPlanError, match=faults.ENV):
        faults.from_environment({faults.ENV: spec})


def test_frame_faults_apply_once_to_the_next_frame() -> None:
    plan = faults.from_environment({faults.ENV: "destination:recv-state:truncate"})
    plan.hit("destination", "recv-ready")
    assert plan.frame_fault() is None
    plan.hit("destination", "recv-state")
    assert plan.state(b"state") == b"state"  # not a state fault
    assert plan.frame_fault() == "truncate"
    assert plan.frame_fault() is None


def test_badstate_drops_the_lapic_and_nothing_else() -> None:
    from intrahost.migration import envelope

    data = envelope.encode(
        [envelope.Component("vcpu/0/lapic", b"x" * 1024), envelope.Component("vm/clock", b"y")]
    )
    plan = faults.from_environment({faults.ENV: "source:state:badstate"})
    assert plan.state(data) == data  # the point not reached yet
    plan.hit("source", "state")
    assert plan.frame_fault() is None
    assert envelope.decode(plan.state(data)).names() == ["vm/clock"]
    assert plan.state(data) == data


def test_fail_raises_an_error_the_receiver_handles_as_a_refused_move() -> None:
    from intrahost.errors import IntrahostError

    plan = faults.from_environment({faults.ENV: "destination:before-move:fail"})
    plan.hit("destination", "after-import")
    with pytest.raises(IntrahostError, match="before-move"):
        plan.hit("destination", "before-move")


def test_close_closes_the_socket() -> None:
    closed: list[bool] = []
    plan = faults.from_environment({faults.ENV: "source:commit:close"})
    plan.hit("source", "commit", close=lambda: closed.append(True))
    assert closed == [True]
