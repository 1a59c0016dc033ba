"""The network across hand-offs: intrahost's virtio-net and QEMU 7.2's, side by side in one run.

The built-in ``net`` guest (ARP, ICMP echo, UDP echo on port 7, at 192.0.2.2) runs on a tap in
a network namespace the bench creates (192.0.2.1 on the host's side; nothing leaves it), first
under intrahost (``intrahost run --net tap=tap0``), then under QEMU's ``microvm`` with a
``virtio-net-device`` (guest RAM in a ``memory-backend-file,share=on`` under /dev/shm). Each is
handed to a new VMM process ``--handoffs`` times: intrahost with ``intrahost run --incoming``
and ``migrate`` (the tap's fd travels in DEVICE_FDS); QEMU with a second QEMU started with
``-incoming defer``, ``x-ignore-shared`` on both, ``migrate``, then ``quit`` on the old one.
Both QEMUs get the *same* tap file (``-netdev tap,fd=N``, the fd the bench opened inherited by
both): a single-queue tap takes one attachment, and its fd is what a hand-off must pass on.

Measured, per VMM, with the host tools of ``intrahost.vmm.guests.netcheck``:

- **echo rate** before and after the hand-offs: a flood of 64-byte UDP datagrams with
  ``--window`` outstanding, for ``--seconds``: echoes per second;
- **round-trip time** p50/p99 before and after: a stream at ``--rate`` for ``--seconds``;
- per hand-off, a stream at ``--rate`` from 0.1 s before ``migrate`` to 0.1 s of replies after
  it completed: the **network blackout** (the longest gap between two replies, and whether it
  overlaps the hand-off), datagrams **lost**, **duplicated**, reordered. Next to it the
  **vCPU blackout** of the same hand-off: the longest stall of the guest's heartbeat (its loop
  counter on the status page, sampled every ~0.1 ms by a thread of the bench through the
  memory file: the same stopwatch for both VMMs) overlapping the ``migrate`` command, the
  VMM's own figure (intrahost: pause to resume, from ``query-migrate``; QEMU: ``downtime``,
  whole ms, source side) and, for intrahost, the guest's own largest loop gap (its TSC; QEMU
  restores the saved TSC, so the guest can't see QEMU's pause);
- the **noise floor**: the longest reply gap of an equally long stream without a hand-off,
  right after each one.

Goals (printed PASS/MISS per VMM): 0 datagrams lost across the hand-offs; network blackout
at most 1.2 x vCPU blackout + one inter-packet interval (medians); at least 20 000 echoes/s.

    python bench/net.py                    # 10 hand-offs per VMM, ~2-3 minutes
    python bench/net.py --handoffs 3 --seconds 1 --no-qemu
    python bench/net.py --docs             # also rewrite docs/results.md's Network section

Writes bench/out/net.json (every hand-off and the summaries) and bench/out/net-blackout.png.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import peers
from common import BenchError, Workspace, exit_on_sigterm, wait_until
from prose import ratio

from intrahost.errors import IntrahostError
from intrahost.service.qmp_client import QmpClient, QmpConnectionError
from intrahost.vmm.devices.virtio.tap import Tap
from intrahost.vmm.guests import layout
from intrahost.vmm.guests.build import build_guest
from intrahost.vmm.guests.layout import NetState, NetStatus
from intrahost.vmm.guests.netcheck import EchoReport, EchoStream, NetNamespace, list_namespaces
from intrahost.vmm.guests.probe import NetProbe, host_tsc_khz

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GUEST_IP = "192.0.2.2"
GUEST_ARGS = f"ip={GUEST_IP}/24"
MEMORY_MIB = 64
NS_PREFIX = "intrahost-netbench"
#: Replies wanted before ``migrate`` and after it completed, in seconds of the stream's rate.
LEAD_S = 0.1
TAIL_S = 0.1
#: How long a stream waits for late replies once it stopped sending.
GRACE_S = 0.5
#: The heartbeat watcher: a sample every ~interval; stalls from the threshold up are kept.
WATCH_INTERVAL_S = 50e-6
WATCH_THRESHOLD_NS = 100_000
#: The goals.
GOAL_RATE = 20_000
GOAL_FACTOR = 1.2
#: QEMU's microvm: the first virtio-mmio transport, which the guest learns from its command
#: line; the virtio-net features the guest does not take, off (as in the guest's tests).
MICROVM_DEVICE = "virtio_mmio.device=512@0xfeb00e00:12"
QEMU_MAC = "52:54:00:12:34:56"
QEMU_NET_OPTIONS = ",".join(
    f"{option}=off"
    for option in (
        "mrg_rxbuf", "csum", "guest_csum", "gso", "guest_tso4", "guest_tso6", "guest_ecn",
        "guest_ufo", "host_tso4", "host_tso6", "host_ecn", "host_ufo", "ctrl_vq",
    )
)  # fmt: skip

_U64 = struct.Struct("<Q")
_HEARTBEAT = layout.NET_STATUS_ADDR + 8 * layout.NET_STATUS_FIELDS.index("heartbeat")
_MAX_LOOP_GAP = layout.NET_STATUS_ADDR + 8 * layout.NET_STATUS_FIELDS.index("max_loop_gap")
_CLONE_NEWNET = 0x40000000
T = TypeVar("T")
#: Failures that end one VMM's part of the run (the other VMM is still measured).
FAILURES = (BenchError, peers.BenchError, IntrahostError, QmpConnectionError, OSError)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- the namespace -------------------------------------------------------------------------------


def in_namespace(ns: NetNamespace, fn: Callable[[], T]) -> T:
    """``fn()`` run on a thread that joined ``ns`` (setns changes only the calling thread's
    namespace; a file it opens, such as a tap, stays usable from anywhere)."""
    libc = ctypes.CDLL(None, use_errno=True)
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {ns.name}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:  # handed to the caller
            error.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def remove_stale_namespaces() -> None:
    """Namespaces left by an earlier run of this bench that was killed outright (SIGKILL):
    ``NS_PREFIX-PID-N`` whose PID is gone."""
    for name in list_namespaces():
        if not name.startswith(NS_PREFIX + "-"):
            continue
        pid = name[len(NS_PREFIX) + 1 :].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


# --- the guest, seen through its memory file ------------------------------------------------------


class GuestWatch:
    """The net guest's status page through its memory file (mapped read-write: the bench
    zeroes ``max_loop_gap`` before a hand-off, as the guest allows), and a thread that samples
    its heartbeat and records every stall of at least 0.1 ms with CLOCK_MONOTONIC times.

    A stall runs from the first sample that saw a heartbeat value to the last one that still
    saw it: if the watcher itself was descheduled, that time is not counted as the guest's.
    """

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, layout.NET_STATUS_ADDR + layout.NET_STATUS_SIZE)
        finally:
            os.close(fd)
        self._probe = NetProbe(self._map)
        self._stalls: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def status(self) -> NetStatus | None:
        return self._probe.status()

    def reset_loop_gap(self) -> None:
        _U64.pack_into(self._map, _MAX_LOOP_GAP, 0)

    def loop_gap_us(self, khz: int) -> float:
        status = self.status()
        return 0.0 if status is None else round(status.max_loop_gap * 1000 / khz, 1)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def longest_stall_us(self, t0: int, t1: int) -> float:
        """The longest heartbeat stall overlapping [t0, t1] (µs); 0 if none reached 0.1 ms."""
        spans = [(a, b) for a, b in list(self._stalls) if b >= t0 and a <= t1]
        return round(max(((b - a) / 1000 for a, b in spans), default=0.0), 1)

    def close(self) -> None:
        self.stop()
        self._map.close()

    def _sample(self) -> None:
        unpack, clock, sleep, mem = _U64.unpack_from, time.monotonic_ns, time.sleep, self._map
        last = unpack(mem, _HEARTBEAT)[0]
        changed = previous = clock()
        while not self._stop.is_set():
            now = clock()
            value = unpack(mem, _HEARTBEAT)[0]
            if value != last:
                if previous - changed >= WATCH_THRESHOLD_NS:
                    self._stalls.append((changed, previous))
                last, changed = value, now
            previous = now
            sleep(WATCH_INTERVAL_S)


# --- the VMMs ------------------------------------------------------------------------------------


@dataclass
class Migration:
    """One hand-off's times (CLOCK_MONOTONIC ns: ``migrate`` issued, ``completed`` seen) and
    the VMM's own figures."""

    t_cmd: int
    t_done: int
    vmm_figures: dict[str, Any] = field(default_factory=dict)
    #: The VMM's own vCPU blackout (µs): intrahost pause -> resume; QEMU ``downtime``.
    own_us: float | None = None


class NetVmm(Protocol):
    name: str
    shm: Path

    def start(self) -> None: ...

    def alive(self) -> bool: ...

    def prepare(self) -> None: ...

    def migrate(self) -> Migration: ...

    def finish(self) -> None: ...

    def stop(self) -> None: ...


class IntrahostNet:
    """The net guest under ``intrahost run --net tap=tap0`` in the namespace, and its
    two-process hand-offs (the new VMM adopts the tap's fd from the old one)."""

    name = "intrahost"

    def __init__(self, ws: Workspace, ns: NetNamespace) -> None:
        self.ws, self.ns = ws, ns
        self.shm = ws.shm_file("intrahost")
        self.gen = 0
        self.api = ws.path("ih-api-0.sock")
        self.current: subprocess.Popen[str] | None = None
        self.next: tuple[subprocess.Popen[str], Path, Path] | None = None
        self.old: subprocess.Popen[str] | None = None

    def _intrahost(self, *args: str) -> list[str]:
        return self.ns.command([sys.executable, "-m", "intrahost", *args])

    def start(self) -> None:
        argv = self._intrahost(
            "run", "--guest", "net", "--guest-args", GUEST_ARGS, "--net", "tap=tap0",
            "--memory", f"{MEMORY_MIB}M", "--memory-path", str(self.shm),
            "--serial", f"file:{self.ws.path('ih-serial.log')}", "--api-socket", str(self.api),
        )  # fmt: skip
        self.current = self.ws.spawn(argv, "ih-0")
        wait_until(self.api.exists, 60, "intrahost's control socket", self.current)

    def alive(self) -> bool:
        return self.current is not None and self.current.poll() is None

    def prepare(self) -> None:
        self.gen += 1
        mig, api = self.ws.path(f"ih-mig-{self.gen}.sock"), self.ws.path(f"ih-api-{self.gen}.sock")
        argv = self._intrahost(
            "run", "--incoming", f"unix:{mig}", "--api-socket", str(api), "--serial", "none",
            "--net", "tap=tap0",
        )  # fmt: skip
        dest = self.ws.spawn(argv, f"ih-{self.gen}")
        wait_until(mig.exists, 60, "the new intrahost VMM to listen", dest)
        self.next = (dest, mig, api)

    def migrate(self) -> Migration:
        assert self.next is not None and self.current is not None
        dest, mig, api = self.next
        with QmpClient(self.api, timeout=30.0) as qmp:
            t_cmd = time.monotonic_ns()
            qmp.execute("migrate", uri=f"unix:{mig}")
            result = peers.poll_migration(qmp)
            t_done = time.monotonic_ns()
        blackout = dict(result.get("blackout", {}))
        self.old, self.current, self.api, self.next = self.current, dest, api, None
        return Migration(t_cmd, t_done, blackout, blackout.get("total_us"))

    def finish(self) -> None:
        """The old VMM exits by itself after a hand-off: reap it."""
        if self.old is not None:
            old = self.old
            wait_until(lambda: old.poll() is not None, 30, "the old intrahost VMM to exit")
            self.ws.stop(old)
            self.old = None

    def stop(self) -> None:
        if self.current is not None and self.current.poll() is None:
            with contextlib.suppress(*FAILURES), QmpClient(self.api, timeout=10.0) as qmp:
                qmp.execute("quit")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.current.wait(10)
        for proc in (self.current, self.old, self.next[0] if self.next else None):
            if proc is not None:
                self.ws.stop(proc)


class QemuNet:
    """The net guest under QEMU 7.2's microvm with a virtio-net-device on the namespace's tap,
    guest RAM shared (memory-backend-file, share=on), and its local migrations to a second
    QEMU with x-ignore-shared. Every QEMU gets the same tap file, opened once by the bench
    (``-netdev tap,fd=N``): the destination takes over the very attachment of the source,
    frames queued in the tap during the pause included."""

    name = "qemu"

    def __init__(self, ws: Workspace, ns: NetNamespace, binary: str, elf: Path) -> None:
        self.ws, self.ns, self.binary, self.elf = ws, ns, binary, elf
        self.shm = ws.shm_file("qemu")
        self.gen = 0
        self.tap: Tap | None = None
        self.current: tuple[subprocess.Popen[str], QmpClient] | None = None
        self.next: tuple[subprocess.Popen[str], QmpClient, Path] | None = None
        self.old: subprocess.Popen[str] | None = None

    def _argv(self, gen: int, fd: int, incoming: bool) -> list[str]:
        argv = [
            self.binary, "-M", "microvm,acpi=off,memory-backend=mem", "-accel", "kvm",
            "-cpu", "host,-arch-capabilities", "-m", f"{MEMORY_MIB}M",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-global", "virtio-mmio.force-legacy=false",
            "-object",
            f"memory-backend-file,id=mem,size={MEMORY_MIB}M,mem-path={self.shm},share=on",
            "-serial", f"file:{self.ws.path(f'qemu-serial-{gen}.log')}",
            "-kernel", str(self.elf), "-append", f"{MICROVM_DEVICE} {GUEST_ARGS}",
            "-netdev", f"tap,id=n0,fd={fd}",
            "-device", f"virtio-net-device,netdev=n0,mac={QEMU_MAC},{QEMU_NET_OPTIONS}",
            "-qmp", f"unix:{self.ws.path(f'qemu-qmp-{gen}.sock')},server=on,wait=off",
        ]  # fmt: skip
        return [*argv, "-incoming", "defer"] if incoming else argv

    def _spawn(self, gen: int, incoming: bool) -> tuple[subprocess.Popen[str], QmpClient]:
        assert self.tap is not None
        proc = self.ws.spawn(
            self.ns.command(self._argv(gen, self.tap.fd, incoming)),
            f"qemu-{gen}",
            pass_fds=[self.tap.fd],
        )
        try:
            qmp = peers.connect_qmp(
                self.ws.path(f"qemu-qmp-{gen}.sock"), lambda: proc.poll() is None
            )
        except peers.BenchError as e:
            raise BenchError(
                f"QEMU did not start: {e}\n{self.ws.log_tail(f'qemu-{gen}')}"
            ) from None
        qmp.execute(
            "migrate-set-capabilities",
            capabilities=[{"capability": "x-ignore-shared", "state": True}],
        )
        return proc, qmp

    def start(self) -> None:
        self.tap = in_namespace(self.ns, lambda: Tap.open("tap0"))
        self.current = self._spawn(0, incoming=False)

    def alive(self) -> bool:
        return self.current is not None and self.current[0].poll() is None

    def prepare(self) -> None:
        self.gen += 1
        mig = self.ws.path(f"qemu-mig-{self.gen}.sock")
        proc, qmp = self._spawn(self.gen, incoming=True)
        qmp.execute("migrate-incoming", uri=f"unix:{mig}")
        self.next = (proc, qmp, mig)

    def migrate(self) -> Migration:
        assert self.next is not None and self.current is not None
        dest, dest_qmp, mig = self.next
        old, qmp = self.current
        t_cmd = time.monotonic_ns()
        qmp.execute("migrate", uri=f"unix:{mig}")
        result = peers.poll_migration(qmp)
        t_done = time.monotonic_ns()
        wait_until(
            lambda: dest_qmp.execute("query-status").get("status") == "running",
            30,
            "the new QEMU to run the guest",
            dest,
        )
        with contextlib.suppress(QmpConnectionError):
            qmp.execute("quit")
        qmp.close()
        figures = {key: result.get(key) for key in ("downtime", "total-time", "setup-time")}
        downtime = result.get("downtime")
        self.old, self.current, self.next = old, (dest, dest_qmp), None
        return Migration(
            t_cmd, t_done, figures, None if downtime is None else float(downtime) * 1000
        )

    def finish(self) -> None:
        if self.old is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.old.wait(30)
            self.ws.stop(self.old)
            self.old = None

    def stop(self) -> None:
        for pair in (self.current, self.next):
            if pair is not None:
                with contextlib.suppress(*FAILURES):
                    pair[1].execute("quit")
                pair[1].close()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    pair[0].wait(10)
                self.ws.stop(pair[0])
        self.current = self.next = None
        self.finish()
        if self.tap is not None:
            self.tap.close()
            self.tap = None


# --- traffic -------------------------------------------------------------------------------------


def stream(ns: NetNamespace, **options: Any) -> EchoStream:
    return EchoStream(ns, GUEST_IP, size=64, grace=GRACE_S, **options)


def traffic(ns: NetNamespace, args: argparse.Namespace) -> dict[str, Any]:
    """The echo rate (a flood) and the round-trip times (a stream at ``--rate``)."""
    with stream(ns, mode="flood", window=args.window, duration=args.seconds) as flood:
        f = flood.report(timeout=args.seconds + 60)
    with stream(ns, rate=args.rate, duration=args.seconds) as paced:
        s = paced.report(timeout=args.seconds + 60)
    return {
        "echo_per_s": round(f.received_per_s),
        "flood_lost": f.lost,
        "rtt_p50_ms": round(s.rtt_ms.get("p50", 0.0), 3),
        "rtt_p99_ms": round(s.rtt_ms.get("p99", 0.0), 3),
        "rtt_max_ms": round(s.rtt_ms.get("max", 0.0), 3),
        "stream_lost": s.lost,
        "socket_drops": f.socket_drops + s.socket_drops,
        "send_errors": f.send_errors + s.send_errors,
        "send_lag_ms": round(s.send_lag_ms, 2),
        "host_load": round(os.getloadavg()[0], 2),
    }


def gap_around(report: EchoReport, t0: int, t1: int) -> tuple[float, bool]:
    """The longest gap between two replies that overlaps [t0, t1] (ms), and whether it was
    found among the stream's longest gaps; if not, every gap there is shorter than the
    shortest one listed, which is returned as a bound."""
    around = [g for g in report.gaps if g[2] >= t0 and g[1] <= t1]
    if around:
        return max(g[0] for g in around) / 1e6, True
    return (report.gaps[-1][0] / 1e6 if report.gaps else 0.0), False


def one_handoff(
    vmm: NetVmm, ns: NetNamespace, watch: GuestWatch, args: argparse.Namespace, khz: int
) -> dict[str, Any]:
    """Hand the guest over once under a stream at ``--rate``; then an equally long stream
    without a hand-off (the noise floor)."""
    vmm.prepare()
    lead, tail = max(1, round(args.rate * LEAD_S)), max(1, round(args.rate * TAIL_S))
    with stream(ns, rate=args.rate) as during:
        during.wait_replies(lead, timeout=60)
        watch.reset_loop_gap()
        m = vmm.migrate()
        so_far = during.progress()
        got = so_far["received"] if so_far else 0
        try:
            during.wait_replies(got + tail, timeout=30)
        except IntrahostError as e:
            raise BenchError(f"no echo after the hand-off: {e}") from None
        during.stop()
        report = during.report()
    vmm.finish()
    guest_gap = watch.loop_gap_us(khz) if vmm.name == "intrahost" else None
    length = (report.stop_ns - report.start_ns) / 1e9
    with stream(ns, rate=args.rate, duration=max(length, 0.05)) as quiet:
        floor = quiet.report(timeout=length + 60)
    # The floor: the same rules, over a window as long as the command's, at the same place
    # in a stream as long, without a hand-off.
    q0 = floor.start_ns + (m.t_cmd - report.start_ns)
    q1 = q0 + (m.t_done - m.t_cmd)
    net_ms, found = gap_around(report, m.t_cmd, m.t_done)
    b = report.blackout
    vcpu_us = watch.longest_stall_us(m.t_cmd, m.t_done)
    return {
        "network_blackout_ms": round(net_ms, 3),
        "gap_found": found,
        "stream_longest_gap_ms": round(b.ms, 3),
        "vcpu_blackout_ms": round(vcpu_us / 1000, 3),
        "vmm_own_ms": None if m.own_us is None else round(m.own_us / 1000, 3),
        "guest_loop_gap_ms": None if guest_gap is None else round(guest_gap / 1000, 3),
        "lost": report.lost,
        "duplicated": report.duplicated,
        "reordered": report.reordered,
        "sent": report.sent,
        # When each lost datagram was due, relative to the migrate command (ms): where the
        # hand-off lost it (datagram k is due at start + (k - 1) / rate).
        "lost_due_ms": [
            round((report.start_ns + (seq - 1) * 1e9 / args.rate - m.t_cmd) / 1e6, 1)
            for first, last in report.lost_ranges
            for seq in range(first, last + 1)
        ][:16],
        "rtt_max_ms": round(report.rtt_ms.get("max", 0.0), 3),
        "send_lag_ms": round(report.send_lag_ms, 2),
        "command_ms": round((m.t_done - m.t_cmd) / 1e6, 3),
        "floor_ms": round(gap_around(floor, q0, q1)[0], 3),
        "vcpu_floor_ms": round(watch.longest_stall_us(q0, q1) / 1000, 3),
        "floor_lost": floor.lost,
        "vmm_figures": m.vmm_figures,
        "times_ns": {
            "migrate": m.t_cmd,
            "completed": m.t_done,
            "floor_window": [q0, q1],
        },
    }


def wait_running(watch: GuestWatch, alive: Callable[[], bool]) -> None:
    def running() -> bool:
        status = watch.status()
        if status is not None and status.state == NetState.FAILED:
            raise BenchError(f"the net guest failed to start (exit code {status.exit_code})")
        if not alive():
            raise BenchError("the VMM exited before the net guest ran")
        return status is not None and status.state == NetState.RUNNING

    wait_until(running, 60, "the net guest's loop")


def run_vmm(vmm: NetVmm, ns: NetNamespace, args: argparse.Namespace, khz: int) -> dict[str, Any]:
    log(f"{vmm.name}: starting the net guest")
    vmm.start()
    wait_until(vmm.shm.exists, 30, f"{vmm.name}: the guest's memory file")
    watch = GuestWatch(vmm.shm)
    try:
        wait_running(watch, vmm.alive)
        with stream(ns, rate=1000) as warm:  # ARP resolved, everything paged in
            warm.wait_replies(200, timeout=60)
            warm.stop()
            warm.report()
        before = traffic(ns, args)
        log(f"  before: {before}")
        rows = []
        watch.start()
        try:
            for i in range(args.handoffs):
                row = one_handoff(vmm, ns, watch, args, khz)
                rows.append(row)
                log(
                    f"  hand-off {i + 1}/{args.handoffs}: network blackout "
                    f"{row['network_blackout_ms']:.2f} ms"
                    f"{'' if row['gap_found'] else ' (bound)'}, "
                    f"vCPU (heartbeat) {row['vcpu_blackout_ms']:.2f} ms, VMM's own "
                    f"{row['vmm_own_ms']} ms, lost {row['lost']}, duplicated "
                    f"{row['duplicated']} {row['lost_due_ms'] or ''}, "
                    f"floor {row['floor_ms']:.2f} / "
                    f"{row['vcpu_floor_ms']:.2f} ms"
                )
        finally:
            watch.stop()
        after = traffic(ns, args)
        log(f"  after: {after}")
        status = watch.status()
        guest = {
            "errors": status.errors if status else None,
            "duplicates": status.duplicates if status else None,
            "udp_echoes": status.udp_echoes if status else None,
        }
        return {"before": before, "after": after, "handoffs": rows, "guest": guest}
    finally:
        watch.close()
        vmm.stop()


# --- summaries and goals -------------------------------------------------------------------------


def stats(values: Sequence[float | None]) -> dict[str, float | None]:
    present = [v for v in values if v is not None]
    return {
        "median": round(statistics.median(present), 3) if present else None,
        "max": round(max(present), 3) if present else None,
    }


def summarize(result: dict[str, Any], rate: float) -> dict[str, Any]:
    rows = result["handoffs"]
    keys = (
        "network_blackout_ms", "vcpu_blackout_ms", "vmm_own_ms", "guest_loop_gap_ms",
        "floor_ms", "vcpu_floor_ms", "stream_longest_gap_ms", "command_ms",
    )  # fmt: skip
    out: dict[str, Any] = {key: stats([r[key] for r in rows]) for key in keys}
    interval_ms = 1000 / rate
    for key in ("lost", "duplicated", "reordered", "floor_lost"):
        out[key] = sum(r[key] for r in rows)
    out["gap_found"] = sum(1 for r in rows if r["gap_found"])
    out["n"] = len(rows)
    out["within_bound"] = sum(
        1
        for r in rows
        if r["network_blackout_ms"] <= GOAL_FACTOR * r["vcpu_blackout_ms"] + interval_ms
    )
    net, vcpu = out["network_blackout_ms"]["median"], out["vcpu_blackout_ms"]["median"]
    bound = None if vcpu is None else round(GOAL_FACTOR * vcpu + interval_ms, 3)
    rates = [result["before"]["echo_per_s"], result["after"]["echo_per_s"]]
    out["goals"] = {
        "lost": out["lost"] == 0 and bool(rows),
        "blackout": net is not None and bound is not None and net <= bound,
        "rate": min(rates) >= GOAL_RATE,
    }
    out["bound_ms"] = bound
    return out


def _f(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _mm(s: dict[str, float | None] | None, digits: int = 2) -> str:
    if not s or s.get("median") is None:
        return "—"
    return f"{_f(s['median'], digits)} / {_f(s['max'], digits)}"


def goal_lines(vmms: dict[str, dict[str, Any]], rate: float) -> list[str]:
    """One line per goal and VMM, PASS or MISS with the figures that decide it."""
    lines = []
    for name, r in vmms.items():
        if "summary" not in r:
            lines.append(f"{name}: not measured ({r.get('error', 'skipped')})")
            continue
        s, g = r["summary"], r["summary"]["goals"]
        rates = (r["before"]["echo_per_s"], r["after"]["echo_per_s"])
        lines += [
            f"{name}: {'PASS' if g['lost'] else 'MISS'} 0 lost: {s['lost']} lost, "
            f"{s['duplicated']} duplicated in {s['n']} hand-offs",
            f"{name}: {'PASS' if g['blackout'] else 'MISS'} network blackout <= "
            f"{GOAL_FACTOR} x vCPU blackout + {1000 / rate:g} ms: median "
            f"{_f(s['network_blackout_ms']['median'])} ms vs bound {_f(s['bound_ms'])} ms "
            f"({s['within_bound']} of {s['n']} hand-offs within their own bound)",
            f"{name}: {'PASS' if g['rate'] else 'MISS'} >= {GOAL_RATE} echoes/s: "
            f"{rates[0]} before, {rates[1]} after",
        ]
    return lines


def table(vmms: dict[str, dict[str, Any]], rate: float) -> str:
    """The results as a markdown table, one column per VMM."""
    names = [n for n in ("intrahost", "qemu") if n in vmms]
    heads = {"intrahost": "intrahost", "qemu": "QEMU 7.2"}
    lines = [
        "| measure | " + " | ".join(heads[n] for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]

    def row(label: str, cell: Callable[[dict[str, Any]], str]) -> None:
        cells = [cell(vmms[n]) if "summary" in vmms[n] else "—" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row(
        "echoes/s before / after",
        lambda r: f"{r['before']['echo_per_s']:,} / {r['after']['echo_per_s']:,}",
    )
    row(
        "RTT p50 / p99 before (ms)",
        lambda r: f"{_f(r['before']['rtt_p50_ms'], 3)} / {_f(r['before']['rtt_p99_ms'], 3)}",
    )
    row(
        "RTT p50 / p99 after (ms)",
        lambda r: f"{_f(r['after']['rtt_p50_ms'], 3)} / {_f(r['after']['rtt_p99_ms'], 3)}",
    )
    row("network blackout (ms, median / max)", lambda r: _mm(r["summary"]["network_blackout_ms"]))
    row("vCPU blackout, heartbeat (ms)", lambda r: _mm(r["summary"]["vcpu_blackout_ms"]))
    row("vCPU blackout, VMM's own (ms)", lambda r: _mm(r["summary"]["vmm_own_ms"]))
    row("vCPU blackout, guest's loop gap (ms)", lambda r: _mm(r["summary"]["guest_loop_gap_ms"]))
    row(
        "network / heartbeat blackout (medians)",
        lambda r: _f(
            ratio(
                r["summary"]["network_blackout_ms"]["median"],
                r["summary"]["vcpu_blackout_ms"]["median"],
            )
        ),
    )
    row(
        f"lost / duplicated / reordered ({'sum'})",
        lambda r: (
            f"{r['summary']['lost']} / {r['summary']['duplicated']} / {r['summary']['reordered']}"
        ),
    )
    row(
        "noise floor, no hand-off: reply gap / heartbeat (ms, medians)",
        lambda r: (
            f"{_f(r['summary']['floor_ms']['median'])} / "
            f"{_f(r['summary']['vcpu_floor_ms']['median'])}"
        ),
    )
    row(
        "the stream's longest reply gap, anywhere (ms)",
        lambda r: _mm(r["summary"]["stream_longest_gap_ms"]),
    )
    row("`migrate` → `completed` (ms)", lambda r: _mm(r["summary"]["command_ms"], 1))
    return "\n".join(lines)


def draw(vmms: dict[str, dict[str, Any]], path: Path, rate: float, title: str) -> Path | None:
    """Every hand-off: network blackout against vCPU (heartbeat) blackout, one colour per VMM,
    with the goal's bound as a line."""
    try:
        import matplotlib.pyplot as plt  # the bench's extra
        import plot  # chooses matplotlib's file-only backend
    except ImportError:
        log("matplotlib is not installed: no plot")
        return None
    fig, ax = plt.subplots(figsize=(7.0, 5.2), dpi=120)
    top = 1.0
    for name, r in vmms.items():
        rows = r.get("handoffs") or []
        if not rows:
            continue
        xs = [h["vcpu_blackout_ms"] for h in rows]
        ys = [h["network_blackout_ms"] for h in rows]
        style = plot.VMM_STYLE[name]
        ax.scatter(xs, ys, color=style["color"], label=style["label"], s=28, alpha=0.8)
        top = max(top, *xs, *ys)
    xs = [0.0, top * 1.05]
    ax.plot(xs, [GOAL_FACTOR * x + 1000 / rate for x in xs], "k--", lw=1, label="goal bound")
    ax.plot(xs, xs, color="grey", lw=0.6, label="network = vCPU")
    ax.set_xlim(0, top * 1.05)
    ax.set_ylim(0, top * 1.05)
    ax.set_xlabel("vCPU blackout: the guest's heartbeat stall (ms)")
    ax.set_ylabel("network blackout: longest gap between echo replies (ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def findings(vmms: dict[str, dict[str, Any]], rate: float) -> str:
    """What the table shows, as a markdown list (derived from the same summaries)."""
    lines = ["**Goals** (as `bench/net.py` prints them):", ""]
    lines += [f"- {line}" for line in goal_lines(vmms, rate)]
    return "\n".join(lines)


DOCS_BEGIN = "<!-- net.py:begin (generated by bench/net.py --docs; edit outside) -->"
DOCS_END = "<!-- net.py:end -->"


def update_docs(report: dict[str, Any], png: Path | None) -> Path:
    """Rewrite the generated block of docs/results.md's Network section (and its plot)."""
    docs = REPO / "docs"
    image = []
    if png is not None:
        shutil.copyfile(png, docs / "results-net-blackout.png")
        image = ["![net-blackout](results-net-blackout.png)", ""]
    host, cfg = report["host"], report["config"]
    block = "\n".join(
        [
            DOCS_BEGIN,
            "",
            f"Measured {report['date']} on: Linux {host['kernel']}, {host['cpu']}, "
            f"{host['cpus']} CPUs; {report.get('qemu') or 'no QEMU'}; Python {host['python']}. "
            f"Load average before / after the run: {report['loadavg_before']} / "
            f"{report['loadavg_after']}. {cfg['handoffs']} hand-offs per VMM, streams at "
            f"{cfg['rate']:g} datagrams/s, floods with {cfg['window']} in flight, "
            f"{cfg['seconds']:g} s windows; the run took {report['duration_s'] / 60:.1f} min.",
            "",
            "```",
            report["command"],
            "```",
            "",
            table(report["vmms"], cfg["rate"]),
            "",
            findings(report["vmms"], cfg["rate"]),
            "",
            *image,
            DOCS_END,
        ]
    )
    page = docs / "results.md"
    text = page.read_text()
    if DOCS_BEGIN in text:
        head, _, rest = text.partition(DOCS_BEGIN)
        _, _, foot = rest.partition(DOCS_END)
    else:
        head, sep, foot = text.partition("## Reproduce")
        head, foot = head + block + "\n\n", sep + foot
        page.write_text(head + foot)
        return page
    page.write_text(head + block + foot)
    return page


# --- main ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """A second Ctrl-C must not cut the cleanup short."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: Sequence[str] | None = None) -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--handoffs", "-n", type=int, default=10, help="per VMM (default 10)")
    parser.add_argument("--rate", type=float, default=2000.0, help="stream datagrams/s")
    parser.add_argument("--window", type=int, default=64, help="flood datagrams in flight")
    parser.add_argument("--seconds", type=float, default=3.0, help="each rate and RTT window")
    parser.add_argument("--no-qemu", action="store_true", help="measure intrahost only")
    parser.add_argument("--no-install", action="store_true", help="don't apt-get install QEMU")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="output directory")
    parser.add_argument("--docs", action="store_true", help="update docs/results.md")
    args = parser.parse_args(argv)
    if args.handoffs < 1 or args.seconds <= 0 or not 0 < args.rate <= 100_000:
        parser.error("--handoffs >= 1, --seconds > 0 and 0 < --rate <= 100000")
    if os.geteuid() != 0 or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        sys.exit("net.py needs root (network namespaces, taps) and /dev/kvm")
    qemu = None if args.no_qemu else peers.find_qemu(install=not args.no_install)
    version = peers.qemu_version(qemu) if qemu else None
    elf = build_guest("net")
    khz = host_tsc_khz()
    started, t_start = time.strftime("%Y-%m-%d %H:%M %Z"), time.monotonic()
    loadavg_before = [round(x, 2) for x in os.getloadavg()]
    remove_stale_namespaces()
    vmms: dict[str, dict[str, Any]] = {}
    try:
        for name in ("intrahost", "qemu"):
            if name == "qemu" and qemu is None:
                vmms[name] = {"error": "skipped (--no-qemu or QEMU not installed)"}
                continue
            ns = NetNamespace("tap0", prefix=NS_PREFIX)
            ws = Workspace(f"net-{name}")
            try:
                ns.create()
                vmm: NetVmm
                if name == "intrahost":
                    vmm = IntrahostNet(ws, ns)
                else:
                    assert qemu is not None
                    vmm = QemuNet(ws, ns, qemu, elf)
                result = run_vmm(vmm, ns, args, khz)
                result["summary"] = summarize(result, args.rate)
                vmms[name] = result
            except FAILURES as e:
                log(f"{name}: FAILED: {e}")
                vmms[name] = {"error": str(e).splitlines()[0]}
            finally:
                with _no_interrupts():
                    ws.close()
                    ns.remove()
    except KeyboardInterrupt:
        log("interrupted: every VMM, memory file and namespace of this run has been removed")
        return 130

    report: dict[str, Any] = {
        "date": started,
        "command": "python bench/net.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "host": peers.host_info(),
        "qemu": version,
        "config": {
            "handoffs": args.handoffs,
            "rate": args.rate,
            "window": args.window,
            "seconds": args.seconds,
            "size": 64,
            "tsc_khz": khz,
        },
        "loadavg_before": loadavg_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "duration_s": round(time.monotonic() - t_start, 1),
        "vmms": vmms,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "net.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    png = draw(
        vmms,
        args.out / "net-blackout.png",
        args.rate,
        f"Network vs vCPU blackout of a hand-off ({report['host']['cpus']} host CPUs, "
        f"n={args.handoffs}, {args.rate:g} datagrams/s)",
    )
    print(table(vmms, args.rate))
    print()
    for line in goal_lines(vmms, args.rate):
        print(line)
    print(f"\nwrote {json_path}{f' and {png}' if png else ''}")
    print(
        f"run took {report['duration_s'] / 60:.1f} min; load average {loadavg_before}"
        f" -> {report['loadavg_after']}"
    )
    if args.docs:
        print(f"updated {update_docs(report, png)}")
    return (
        0 if all("summary" in r or r["error"].startswith("skipped") for r in vmms.values()) else 1
    )


if __name__ == "__main__":
    sys.exit(main())
