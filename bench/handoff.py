"""Hand-off blackout and brownout of intrahost, with a copy-based baseline, in one run.

1. **Blackout.** For each point (guest memory x vCPUs) the counter guest boots under
   ``intrahost run`` on a memory file under /dev/shm and is handed ``-n`` times along a chain
   of new VMM processes (``intrahost run --incoming``, then ``migrate`` on the control socket).
   Each hand-off is measured three ways:

   - the VMM's own breakdown (pause, export, transfer, import, resume; ``query-migrate``);
   - the guest-observed pause, the exact stopwatch: the counter guest's own gap between two
     RDTSC reads across the hand-off, picked with its probe (``intrahost.vmm.guests.probe``)
     from the breakdown's pause and resume times (``paused_at_ns``, ``resumed_at_ns``);
   - the **progress blackout**: bench/observer.py, a separate process, samples the guest's
     counters through the memory file. The hand-off shows as an interval in which no vCPU's
     counter moved; the progress blackout is the longest stall of any vCPU overlapping it.

   Beside it, the **noise floor**: the longest stall of any vCPU in a window as long as the
   hand-off's, right after it, with no hand-off going on.
2. **Copy baseline.** The same guest, but its memory goes through the socket during the pause
   (``SendOptions(copy_memory=True)``, all-zero 8 MiB chunks skipped), from a source process
   this bench runs (``--copy-source``) to ``intrahost run --incoming``. The guest first writes
   every page above 16 MiB (``sweep=`` over all of it), so nearly all memory is copied; the
   fd hand-off is measured on the very same guest for comparison.
3. **Brownout.** A guest sweeping a working set of W MiB (one page per iteration) runs slower
   after a hand-off while the destination rebuilds its page tables: the time from the resume
   until its iteration rate is back to 95% of the rate before, with and without ``--prefault``.

    python bench/handoff.py             # everything: 5-10 minutes on 2 CPUs (more when busy)
    python bench/handoff.py --quick     # a few points, 3 hand-offs each: ~2 minutes
    python bench/handoff.py --points 64M:1,16G:8 --copy-sizes '' --brownout-sets ''

Writes bench/out/handoff.json, bench/out/handoff-blackout.png, bench/out/handoff-brownout.png.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import json
import os
import platform
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    BenchError,
    GuestCounters,
    Workspace,
    exit_on_sigterm,
    median,
    percentile,
    wait_until,
)
from floor import floor_blackout_us, run_floors
from observer import Observer, Stall

from intrahost.service.qmp_client import QmpClient
from intrahost.vmm.guests import layout
from intrahost.vmm.guests.probe import CounterProbe, GapNotFound, GuestNotCounting, host_tsc_khz

HERE = Path(__file__).resolve().parent
INTRAHOST = [sys.executable, "-m", "intrahost"]
MiB, GiB = 1 << 20, 1 << 30
PAGES_PER_MIB = MiB // layout.SWEEP_PAGE
#: progress= for every guest here: no progress line during the bench. A line is ~2 ms of UART
#: exits during which that vCPU's counter stands still: the observer would take it for a stall.
NO_LINES = 1 << 40

DEFAULT_MEMORY = (64 * MiB, 1 * GiB, 16 * GiB)
DEFAULT_VCPUS = (1, 2, 4, 8)
QUICK_POINTS = "64M:1,1G:2,16G:1,16G:8"
#: The issue's targets for the median progress blackout.
TARGET_1_VCPU_MS = 1.5
TARGET_8_VCPU_MS = 4.0
TARGET_16G_RATIO = 1.2
#: Brownout: the rate before the hand-off is measured over PRE_WINDOW_S; after the resume, in
#: bins of BIN_MS. The rate is back when the mean over SMOOTH_BINS bins (25 ms) starting there
#: reaches RECOVERED x the rate before: single 5 ms bins swing from 0 to 130% on a busy 2-CPU
#: host as the vCPU thread gets a CPU or not.
PRE_WINDOW_S = 0.6
BIN_MS = 5.0
SMOOTH_BINS = 5
RECOVERED = 0.95

#: The observer's pause between samples. 0 makes it spin on a CPU of its own, which on a
#: 2-CPU host takes a CPU from the guest and the VMMs and doubles the noise floor (measured:
#: 64 MiB x 1 vCPU, noise 22-24 ms spinning, 5-11 ms at 50 µs). --observer-interval-us.
OBSERVER_INTERVAL_US = 50.0

BREAKDOWN = ("pause_us", "copy_us", "export_us", "transfer_us", "import_us", "resume_us")


# --- sizes and points ----------------------------------------------------------------------------


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def size_label(size: int) -> str:
    return f"{size // GiB} GiB" if size >= GiB and size % GiB == 0 else f"{size // MiB} MiB"


@dataclass(frozen=True)
class Point:
    memory: int
    vcpus: int

    @property
    def label(self) -> str:
        return f"{size_label(self.memory)} x {self.vcpus}"

    @property
    def tag(self) -> str:
        return f"{self.memory // MiB}m{self.vcpus}"


def parse_points(text: str) -> list[Point]:
    """'64M:1,16G:8' -> points; '' -> none."""
    points = []
    for word in filter(None, (w.strip() for w in text.split(","))):
        size, _, vcpus = word.partition(":")
        points.append(Point(parse_size(size), int(vcpus or 1)))
    return points


# --- VMM processes -------------------------------------------------------------------------------


@dataclass
class Vmm:
    """One intrahost process of a chain and its control socket."""

    proc: subprocess.Popen[str]
    api: Path
    name: str


def start_source(ws: Workspace, name: str, point: Point, guest_args: str, shm: Path) -> Vmm:
    api = ws.path(f"{name}.api")
    argv = [
        *INTRAHOST,
        "run",
        "--memory",
        str(point.memory),
        "--vcpus",
        str(point.vcpus),
        "--guest",
        "counter",
        "--guest-args",
        guest_args,
        "--memory-path",
        str(shm),
        "--api-socket",
        str(api),
        "--serial",
        f"file:{ws.path(name + '.serial')}",
    ]
    return Vmm(ws.spawn(argv, name), api, name)


def start_destination(ws: Workspace, name: str, prefault: bool = False) -> tuple[Vmm, Path]:
    """A new VMM waiting for a hand-off; returns once it listens. Logs at info level: the
    destination then reports its prefault time."""
    mig, api = ws.path(f"{name}.mig"), ws.path(f"{name}.api")
    argv = [*INTRAHOST, "--log-level", "info", "run", "--incoming", f"unix:{mig}"]
    argv += ["--api-socket", str(api), "--serial", f"file:{ws.path(name + '.serial')}"]
    if prefault:
        argv.append("--prefault")
    vmm = Vmm(ws.spawn(argv, name), api, name)
    wait_until(mig.exists, 60, f"{name} to listen", vmm.proc)
    return vmm, mig


def hand_off(
    src: Vmm, mig: Path, probe: CounterProbe | None = None, timeout: float = 300.0
) -> tuple[dict[str, Any], int, int]:
    """``migrate`` on ``src``; returns its blackout breakdown and CLOCK_MONOTONIC ns of the
    command and of its MIGRATION completed event. With ``probe``, the breakdown also gets the
    guest-observed pause (``guest_pause_us``): the guest's own RDTSC gap across the hand-off
    (see :func:`guest_pause_us`)."""
    with QmpClient(src.api, timeout=timeout) as qmp:
        if probe is not None:
            probe.calibrate()
        t_cmd = time.monotonic_ns()
        qmp.execute("migrate", uri=f"unix:{mig}")
        while True:
            event = qmp.wait_event("MIGRATION", timeout)
            if event.get("data", {}).get("status") in ("completed", "failed"):
                break
        t_done = time.monotonic_ns()
        # Read it now: the old VMM lingers (2 s at most) until someone has.
        result: dict[str, Any] = qmp.execute("query-migrate")
    if result.get("status") != "completed":
        raise BenchError(f"hand-off from {src.name} failed: {result.get('error-desc', result)}")
    blackout: dict[str, Any] = dict(result["blackout"])
    if probe is not None:
        blackout["guest_pause_us"] = guest_pause_us(probe, blackout, src.name, t_cmd, t_done)
    return blackout, t_cmd, t_done


def guest_pause_us(
    probe: CounterProbe, blackout: dict[str, Any], src: str, t_cmd: int, t_done: int
) -> float:
    """The pause as the guest saw it, with the exact stopwatch: its RDTSC gap that spans the
    hand-off, from the breakdown's pause and resume times (``probe`` calibrated before the
    command); a VMM without them: the largest gap in the command's window."""
    try:
        if "paused_at_ns" in blackout and blackout.get("resumed_at_ns"):
            parked = blackout["paused_at_ns"] + int(blackout["pause_us"]) * 1000
            gap = probe.handoff_gap(parked, blackout["resumed_at_ns"])
            # Split: how long before the pause began the guest last ran (negative: it ran
            # on into the pause), and from the destination's release to its first RDTSC.
            blackout["guest_stopped_before_pause_us"] = (
                blackout["paused_at_ns"] - gap.start_ns
            ) // 1000
            blackout["guest_first_run_after_resume_us"] = (
                gap.end_ns - blackout["resumed_at_ns"]
            ) // 1000
            return gap.us
        return probe.largest_gap_us(t_cmd, t_done)
    except (GuestNotCounting, GapNotFound) as e:
        raise BenchError(f"after the hand-off from {src}: {e}") from None


def quit_vmm(ws: Workspace, vmm: Vmm) -> None:
    """Stop a VMM through its control socket, or by signal if that fails."""
    with contextlib.suppress(Exception):
        with QmpClient(vmm.api, timeout=5) as qmp:
            qmp.execute("quit")
        vmm.proc.wait(15)
    ws.stop(vmm.proc)


def wait_old_gone(ws: Workspace, vmm: Vmm, timeout: float = 60.0) -> float:
    """Wait for a source that handed its guest off to exit; ms it took."""
    start = time.monotonic()
    try:
        vmm.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{vmm.name} still runs {timeout:g} s after its hand-off") from None
    if vmm.proc.returncode != 0:
        raise BenchError(f"{vmm.name} exited with {vmm.proc.returncode}:\n{ws.log_tail(vmm.name)}")
    ws.stop(vmm.proc)
    return (time.monotonic() - start) * 1000


def wait_counting(counters: GuestCounters, proc: subprocess.Popen[str] | None, what: str) -> None:
    """Until every vCPU reached the loop and has counted."""
    wait_until(
        lambda: counters.running() == counters.vcpus and all(c > 0 for c in counters.counters()),
        120,
        f"the guest to count ({what})",
        proc,
        interval=0.02,
    )


def wait_moved(counters: GuestCounters, before: Sequence[int], proc: subprocess.Popen[str]) -> None:
    """Until every vCPU's counter went past ``before`` (the guest runs on the new VMM)."""
    wait_until(
        lambda: all(a > b for a, b in zip(counters.counters(), before, strict=True)),
        30,
        "the guest to count on the new VMM",
        proc,
        interval=0.001,
    )


def wait_sweeps(
    counters: GuestCounters, sweep_mib: int, sweeps: int, proc: subprocess.Popen[str]
) -> None:
    """Until vCPU 0 did ``sweeps`` full passes over its working set from now (one page per
    iteration), so that every page of it is touched and mapped again."""
    if sweep_mib <= 0 or sweeps <= 0:
        return
    target = counters.counter() + sweeps * sweep_mib * PAGES_PER_MIB
    wait_until(
        lambda: counters.counter() >= target,
        600,
        f"{sweeps} sweep(s) of {sweep_mib} MiB",
        proc,
        interval=0.02,
    )


def preallocate(path: Path, size: int, length: int) -> None:
    """Create the memory file at its final size and allocate its first ``length`` bytes, so a
    sweeping guest's first pass does not also allocate every page (it still maps them)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, min(length, size))
    finally:
        os.close(fd)


def guest_args(sweep_mib: int = 0) -> str:
    return f"progress={NO_LINES}" + (f" sweep={sweep_mib}" if sweep_mib else "")


# --- which stall is the hand-off's ---------------------------------------------------------------


@dataclass(frozen=True)
class StallPick:
    #: The longest stall of any vCPU overlapping the span below (µs): the progress blackout.
    blackout_us: float
    #: The longest span in [t0, t1] in which no vCPU's counter moved (µs).
    all_still_us: float


def pick_handoff_stall(stalls: Sequence[Stall], vcpus: int, t0: int, t1: int) -> StallPick | None:
    """The hand-off pauses every vCPU: find the longest span within [t0, t1] in which all
    vCPUs' counters stood still (the intersection of one stall per vCPU); the progress
    blackout is the longest single-vCPU stall overlapping that span. A vCPU that waited for
    a host CPU just before the pause or after the resume stood still longer than the pause
    itself, and the guest saw that."""
    overlapping = [s for s in stalls if s.end_ns >= t0 and s.start_ns <= t1]
    spans: list[tuple[int, int]] = [(s.start_ns, s.end_ns) for s in overlapping if s.vcpu == 0]
    for vcpu in range(1, vcpus):
        mine = [s for s in overlapping if s.vcpu == vcpu]
        spans = [
            (max(a, s.start_ns), min(b, s.end_ns))
            for a, b in spans
            for s in mine
            if max(a, s.start_ns) < min(b, s.end_ns)
        ]
    if not spans:
        return None
    a, b = max(spans, key=lambda span: span[1] - span[0])
    longest = max(s.us for s in overlapping if s.end_ns >= a and s.start_ns <= b)
    return StallPick(round(longest, 1), round((b - a) / 1000, 1))


def longest_stall(stalls: Sequence[Stall], t0: int, t1: int) -> float:
    """The longest stall of any vCPU overlapping [t0, t1] (µs); 0 if none reached the
    observer's threshold."""
    return round(max((s.us for s in stalls if s.end_ns >= t0 and s.start_ns <= t1), default=0), 1)


# --- 1. fd hand-offs along a chain of VMMs ------------------------------------------------------


def _sized(path: Path, size: int) -> bool:
    """Whether the VMM created the memory file ``path`` and gave it its size (it creates the
    file, then sizes it: a map of the status page fails in between)."""
    try:
        return path.stat().st_size >= size
    except FileNotFoundError:
        return False


def run_chain(
    ws: Workspace,
    point: Point,
    n: int,
    tag: str,
    sweep_mib: int = 0,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Boot the counter guest at ``point`` and hand it ``n`` times to a new VMM, with the
    observer watching; one record per hand-off. A sweeping guest completes a pass over its
    working set before each hand-off."""
    shm = ws.shm_file(tag)
    if sweep_mib:
        preallocate(shm, point.memory, (16 + sweep_mib) * MiB)
    src = start_source(ws, f"{tag}-0", point, guest_args(sweep_mib), shm)
    counters: GuestCounters | None = None
    probe: CounterProbe | None = None
    observer: Observer | None = None
    records: list[dict[str, Any]] = []
    try:
        wait_until(lambda: _sized(shm, point.memory), 30, "the memory file", src.proc)
        counters = GuestCounters(shm, point.vcpus)
        probe = CounterProbe.open(shm, host_tsc_khz())
        wait_counting(counters, src.proc, point.label)
        wait_sweeps(counters, sweep_mib, 2, src.proc)
        observer = Observer(str(shm), point.vcpus, interval_us=OBSERVER_INTERVAL_US)
        observer.start()
        time.sleep(0.3)  # the guest runs undisturbed for a while under the observer
        for i in range(1, n + 1):
            t_spawn = time.monotonic_ns()
            dst, mig = start_destination(ws, f"{tag}-{i}")
            t_listen = time.monotonic_ns()
            before = counters.counters()
            blackout, t0, t1 = hand_off(src, mig, probe)
            wait_moved(counters, before, dst.proc)
            time.sleep(0.02)  # the observer has sampled the move
            pick = pick_handoff_stall(observer.collect(), point.vcpus, t0, t1)
            old_exit_ms = wait_old_gone(ws, src)
            src = dst
            # The noise floor: a window as long as the hand-off's, with nothing going on.
            q0 = time.monotonic_ns()
            time.sleep((t1 - t0) / 1e9)
            q1 = time.monotonic_ns()
            time.sleep(0.02)
            noise = longest_stall(observer.collect(), q0, q1)
            record = {
                "i": i,
                **{k: blackout.get(k) for k in (*BREAKDOWN, "total_us", "prepare_us")},
                "state_bytes": blackout.get("state_bytes"),
                "guest_pause_us": blackout.get("guest_pause_us"),
                "guest_stopped_before_pause_us": blackout.get("guest_stopped_before_pause_us"),
                "guest_first_run_after_resume_us": blackout.get("guest_first_run_after_resume_us"),
                "progress_blackout_us": pick.blackout_us if pick else None,
                "all_still_us": pick.all_still_us if pick else None,
                "noise_us": noise,
                "window_ms": round((t1 - t0) / 1e6, 2),
                "spawn_ms": round((t_listen - t_spawn) / 1e6, 1),
                "old_exit_ms": round(old_exit_ms, 1),
            }
            records.append(record)
            log(
                f"    {i:2d}: progress {fmt_ms(record['progress_blackout_us'])} ms, guest "
                f"{fmt_ms(record['guest_pause_us'])} ms, VMM {fmt_ms(record['total_us'])} ms "
                f"(pause {fmt_ms(record['pause_us'])}, import {fmt_ms(record['import_us'])}, "
                f"resume {fmt_ms(record['resume_us'])}), noise {fmt_ms(noise)} ms"
            )
            wait_sweeps(counters, sweep_mib, 1, src.proc)
    except BenchError as e:
        raise BenchError(f"{e}\n{recent_logs(ws, tag)}") from None
    finally:
        if observer is not None:
            observer.stop()
        if counters is not None:
            counters.close()
        if probe is not None:
            probe.close()
        quit_vmm(ws, src)
    return records


def recent_logs(ws: Workspace, tag: str, count: int = 2) -> str:
    """The ends of the logs of the last ``count`` VMMs of chain ``tag``."""
    logs = sorted(ws.dir.glob(f"{tag}-*.log"), key=lambda path: path.stat().st_mtime)
    return "\n".join(f"--- {path.name}:\n{ws.log_tail(path.stem)}" for path in logs[-count:])


# --- 2. the copy-based baseline -----------------------------------------------------------------


class LineChannel:
    """JSON lines to and from a child's stdin/stdout, with timeouts (a reader thread)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise BenchError(f"the copy source sent no {event!r} within {timeout:g} s") from None
        if line is None:
            raise BenchError(f"the copy source exited before {event!r}")
        message: dict[str, Any] = json.loads(line)
        if message.get("event") != event:
            raise BenchError(f"the copy source sent {message}, expected {event!r}")
        return message


def find_memfd(pid: int, name: str = "intrahost-ram") -> str:
    """/proc/PID/fd/N of process ``pid``'s guest-memory memfd."""
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(entry).startswith(f"/memfd:{name}"):
                return str(entry)
    raise BenchError(f"process {pid} holds no memfd named {name}")


def run_copy(
    ws: Workspace, memory: int, runs: int, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """``runs`` copy-based hand-offs of a 1-vCPU guest that wrote every page above 16 MiB,
    each from a fresh source process of this bench (``--copy-source``)."""
    sweep_mib = memory // MiB - 16
    tag = f"copy{memory // MiB}m"
    shm = ws.shm_file(tag)
    preallocate(shm, memory, memory)  # reused by every run: the pages stay allocated
    records = []
    for i in range(1, runs + 1):
        name = f"{tag}-{i}"
        spec = {
            "memory": memory,
            "sweep_mib": sweep_mib,
            "shm": str(shm),
            "serial": f"file:{ws.path(name + '.serial')}",
        }
        argv = [sys.executable, __file__, "--copy-source", json.dumps(spec)]
        src = ws.spawn(argv, name, pipes=True)
        channel = LineChannel(src)
        counters: GuestCounters | None = None
        dst_counters: GuestCounters | None = None
        observer: Observer | None = None
        dst: Vmm | None = None
        try:
            tsc_khz = int(channel.expect("started", 120)["tsc_khz"])
            counters = GuestCounters(shm, 1)
            wait_counting(counters, src, f"copy source {name}")
            wait_sweeps(counters, sweep_mib, 2, src)
            dst, mig = start_destination(ws, f"{name}-dst")
            channel.send({"cmd": "handoff", "url": f"unix:{mig}"})
            channel.expect("ready", 300)  # the destination is READY; the guest still runs
            memfd = find_memfd(dst.proc.pid)
            dst_counters = GuestCounters(memfd, 1)
            observer = Observer(str(shm), 1, also_paths=[memfd], interval_us=OBSERVER_INTERVAL_US)
            observer.start()
            time.sleep(0.2)
            t0 = time.monotonic_ns()
            channel.send({"cmd": "go"})
            blackout: dict[str, Any] = channel.expect("done", 600)["blackout"]
            t1 = time.monotonic_ns()
            wait_moved(dst_counters, [counters.counter()], dst.proc)
            time.sleep(0.02)
            pick = pick_handoff_stall(observer.collect(), 1, t0, t1)
            # The guest's own gap, read from the destination's copy of its status page.
            guest_pause_us = round(max(dst_counters.max_gaps()) * 1000 / tsc_khz, 1)
            src.wait(60)
            record = {
                "i": i,
                **{k: blackout.get(k) for k in (*BREAKDOWN, "total_us", "prepare_us")},
                "state_bytes": blackout.get("state_bytes"),
                "guest_pause_us": guest_pause_us,
                "progress_blackout_us": pick.blackout_us if pick else None,
                "all_still_us": pick.all_still_us if pick else None,
                "window_ms": round((t1 - t0) / 1e6, 2),
            }
            records.append(record)
            log(
                f"    {i:2d}: progress {fmt_ms(record['progress_blackout_us'])} ms, guest "
                f"{fmt_ms(guest_pause_us)} ms, VMM {fmt_ms(record['total_us'])} ms "
                f"(copy {fmt_ms(record['copy_us'])})"
            )
        except BenchError as e:
            raise BenchError(f"{e}\n--- {name} log:\n{ws.log_tail(name)}") from None
        finally:
            if observer is not None:
                observer.stop()
            for c in (counters, dst_counters):
                if c is not None:
                    c.close()
            ws.stop(src)
            if dst is not None:
                quit_vmm(ws, dst)
    return records


def copy_source_main(spec_json: str) -> int:
    """The copy baseline's source VMM (a child of the bench): boots the sweeping guest, then
    hands it off with ``copy_memory=True`` when told, stopping once more just before the pause
    so that the bench can start its observer on the destination's memfd (which exists only
    once the destination is READY). Talks JSON lines on stdin/stdout."""
    from intrahost.migration.sender import Sender, SendOptions
    from intrahost.vmm.machine import Machine, MachineConfig

    spec = json.loads(spec_json)

    def tell(event: str, **data: Any) -> None:
        print(json.dumps({"event": event, **data}), flush=True)

    def told() -> dict[str, Any]:
        line = sys.stdin.readline()
        if not line:
            raise SystemExit("the bench went away")
        message: dict[str, Any] = json.loads(line)
        return message

    class StopBeforePause(Sender):
        def _checkpoint(self, phase: str, *args: Any, **kwargs: Any) -> None:
            if phase == "before-pause":
                tell("ready")
                told()
                # Forget the gaps of the wait above: the next one is the pause.
                CounterProbe(self.machine.memory.buffer).reset_gaps()
            super()._checkpoint(phase, *args, **kwargs)

    config = MachineConfig(
        memory=spec["memory"],
        vcpus=1,
        guest="counter",
        guest_args=guest_args(spec["sweep_mib"]),
        memory_path=spec["shm"],
        serial=spec["serial"],
    )
    machine = Machine.create(config)
    try:
        tsc_khz = machine.vcpus[0].get_tsc_khz()  # now: no vCPU runs yet
        machine.start()
        tell("started", tsc_khz=tsc_khz)
        url = told()["url"]
        breakdown = StopBeforePause(machine, url, SendOptions(copy_memory=True)).run()
        tell("done", blackout=breakdown.to_dict())
    finally:
        machine.close()
    return 0


# --- 3. brownout ---------------------------------------------------------------------------------


class RateSampler:
    """Samples vCPU 0's counter every ``interval`` s in a thread: (CLOCK_MONOTONIC ns, counter)."""

    def __init__(self, counters: GuestCounters, interval: float = 0.0005) -> None:
        self.counters = counters
        self.interval = interval
        self.times: list[int] = []
        self.values: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.times.append(time.monotonic_ns())
            self.values.append(self.counters.counter())
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, t: float) -> float:
        """The counter at time ``t``, interpolated linearly between samples."""
        i = bisect.bisect_left(self.times, t)
        if i <= 0:
            return float(self.values[0])
        if i >= len(self.times):
            return float(self.values[-1])
        t_a, t_b = self.times[i - 1], self.times[i]
        v_a, v_b = self.values[i - 1], self.values[i]
        return v_a + (v_b - v_a) * (t - t_a) / (t_b - t_a)


def analyse_brownout(
    sampler: RateSampler,
    t0: int,
    t1: int,
    total_us: int,
    pages: int,
    old_gone_ns: int,
    bin_ms: float,
) -> dict[str, Any]:
    """Rate before the hand-off, the resume, the rate in bins after it, the time until the
    first bin at >= 95% of the rate before, and the time the first pass over the working set
    (``pages`` iterations) took after the resume.

    ``t0``..``t1``: the migrate command and its completion; ``total_us``: the VMM's blackout.
    The resume is the end of the last stall at least half as long as ``total_us`` that ends
    before ``t1`` (the completion comes a few ms after the resume). Not the longest stall: on
    a busy host the guest may wait longer for a CPU on the source just before the pause."""
    bin_ns = bin_ms * 1e6
    pre_ns = PRE_WINDOW_S * 1e9
    pre_rate = (sampler.at(t0) - sampler.at(t0 - pre_ns)) / pre_ns  # iterations per ns
    pre_bins = [
        (sampler.at(t0 - pre_ns + (k + 1) * bin_ns) - sampler.at(t0 - pre_ns + k * bin_ns)) / bin_ns
        for k in range(int(pre_ns // bin_ns))
    ]
    # Runs of one counter value in [t0, t1]: (first sample, last sample, first moved sample).
    first = bisect.bisect_left(sampler.times, t0)
    last = bisect.bisect_right(sampler.times, t1)
    stalls: list[tuple[int, int, int]] = []
    run_start = first
    for i in range(first + 1, min(last + 1, len(sampler.times))):
        if sampler.values[i] != sampler.values[i - 1]:
            stalls.append((sampler.times[run_start], sampler.times[i - 1], sampler.times[i]))
            run_start = i
    if not stalls:
        raise BenchError("the rate sampler saw no hand-off")
    long_enough = [st for st in stalls if st[2] - st[0] >= max(500_000, total_us * 500)]
    start, stop, t_resume = (
        long_enough[-1] if long_enough else max(stalls, key=lambda st: st[2] - st[0])
    )
    stall_ns = stop - start
    end = sampler.times[-1]
    resumed = bisect.bisect_left(sampler.times, t_resume)
    passed = bisect.bisect_left(sampler.values, sampler.values[resumed] + pages, lo=resumed)
    first_pass_ms = None
    if passed < len(sampler.times):
        first_pass_ms = round((sampler.times[passed] - t_resume) / 1e6, 1)
    per_page = None if first_pass_ms is None else round(first_pass_ms * 1000 / pages, 2)
    rates = []
    k = 0
    while t_resume + (k + 1) * bin_ns <= end:
        a = sampler.at(t_resume + k * bin_ns)
        b = sampler.at(t_resume + (k + 1) * bin_ns)
        rates.append((b - a) / bin_ns)
        k += 1
    smooth = smoothed(rates, SMOOTH_BINS)
    recovered = next((k for k, r in enumerate(smooth) if r >= RECOVERED * pre_rate), None)
    t95_ms = None if recovered is None else recovered * bin_ms
    lost_ms = None
    if t95_ms is not None:
        done = sampler.at(t_resume + t95_ms * 1e6) - sampler.at(t_resume)
        lost_ms = round(t95_ms - done / pre_rate / 1e6, 1)
    mean_pre = sum(pre_bins) / len(pre_bins)
    spread = (sum((r - mean_pre) ** 2 for r in pre_bins) / len(pre_bins)) ** 0.5
    return {
        "pre_rate_per_s": round(pre_rate * 1e9),
        "pre_bin_cv": round(spread / mean_pre, 3) if mean_pre else None,
        "t95_ms": t95_ms,
        "lost_ms": lost_ms,
        "first_pass_ms": first_pass_ms,
        "first_pass_us_per_page": per_page,
        "old_vmm_gone_ms": round((old_gone_ns - t_resume) / 1e6, 1),
        "sampled_stall_ms": round(stall_ns / 1e6, 2),
        "horizon_ms": round((end - t_resume) / 1e6),
        "bin_ms": bin_ms,
        "smooth_bins": SMOOTH_BINS,
        "relative_rate": [round(r / pre_rate, 3) for r in rates],
    }


def smoothed(values: Sequence[float], width: int) -> list[float]:
    """The mean of each run of ``width`` values, by its first index."""
    return [sum(values[k : k + width]) / width for k in range(max(0, len(values) - width + 1))]


class ExitClock:
    """When a child process exited (CLOCK_MONOTONIC ns), noted by a waiting thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._proc = proc
        self._ns = 0
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        self._proc.wait()
        self._ns = time.monotonic_ns()

    def at_ns(self, timeout: float = 60.0) -> int:
        self._thread.join(timeout)
        return self._ns


PREFAULT_LINE = re.compile(r"prefaulted (\d+) MiB in (\d+)")


def run_brownout(
    ws: Workspace,
    sweep_mib: int,
    memory: int,
    runs: int,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """``2 runs`` hand-offs of a 1-vCPU guest sweeping ``sweep_mib`` MiB, alternately
    without and with ``--prefault`` on the destination."""
    point = Point(memory, 1)
    tag = f"brown{sweep_mib}"
    shm = ws.shm_file(tag)
    preallocate(shm, memory, (16 + sweep_mib) * MiB)
    src = start_source(ws, f"{tag}-0", point, guest_args(sweep_mib), shm)
    opened: list[GuestCounters | CounterProbe] = []
    records: list[dict[str, Any]] = []
    try:
        wait_until(lambda: _sized(shm, point.memory), 30, "the memory file", src.proc)
        counters = GuestCounters(shm, 1)
        opened.append(counters)
        probe = CounterProbe.open(shm, host_tsc_khz())
        opened.append(probe)
        wait_counting(counters, src.proc, f"brownout W={sweep_mib}")
        wait_sweeps(counters, sweep_mib, 2, src.proc)
        for i in range(1, 2 * runs + 1):
            prefault = i % 2 == 0
            name = f"{tag}-{i}"
            dst, mig = start_destination(ws, name, prefault)
            sampler = RateSampler(counters)
            sampler.start()
            try:
                time.sleep(PRE_WINDOW_S + 0.05)
                blackout, t0, t1 = hand_off(src, mig, probe)
                old_gone = ExitClock(src.proc)
                # Two passes after the resume (the slow one, then one at full speed), then
                # 0.3 s more of the rate after the recovery.
                wait_sweeps(counters, sweep_mib, 2, dst.proc)
                time.sleep(0.3)
            finally:
                sampler.stop()
            wait_old_gone(ws, src)
            src = dst
            pages = sweep_mib * PAGES_PER_MIB
            total_us = int(blackout.get("total_us") or 0)
            analysis = analyse_brownout(sampler, t0, t1, total_us, pages, old_gone.at_ns(), BIN_MS)
            found = PREFAULT_LINE.search(ws.log_tail(name, 200))
            record = {
                "i": i,
                "prefault": prefault,
                "prefault_mib": int(found.group(1)) if found else None,
                "prefault_us": int(found.group(2)) if found else None,
                "total_us": blackout.get("total_us"),
                "prepare_us": blackout.get("prepare_us"),
                "guest_pause_us": blackout.get("guest_pause_us"),
                **analysis,
            }
            records.append(record)
            log(
                f"    {i:2d} {'prefault' if prefault else 'lazy    '}: back to 95% after "
                f"{num(analysis['t95_ms'])} ms (lost {num(analysis['lost_ms'])} ms), "
                f"rate before {analysis['pre_rate_per_s'] / 1e6:.1f} M/s "
                f"(bin CV {analysis['pre_bin_cv']}), prepare {fmt_ms(record['prepare_us'])} ms"
            )
    except BenchError as e:
        raise BenchError(f"{e}\n{recent_logs(ws, tag)}") from None
    finally:
        for c in opened:
            c.close()
        quit_vmm(ws, src)
    return records


# --- 4. where export, import and pause spend their time (in-process) ---------------------------


def profile_state(vcpus: int, reps: int) -> dict[str, Any]:
    """Times, in this process, what the blackout is made of: pausing ``vcpus`` running vCPUs,
    exporting the paused machine, decoding the state and importing it into a second machine
    on the same memory, each KVM getter/setter separately (wrapped for the measurement)."""
    from intrahost.kvm import objects
    from intrahost.migration.state import decode_state, restore_machine, save_machine
    from intrahost.vmm.machine import Machine, MachineConfig
    from intrahost.vmm.memory import GuestMemory

    phase: list[str] = [""]
    spent: dict[str, dict[str, int]] = {}

    def timed(cls_name: str, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter_ns()
            try:
                return original(*args, **kwargs)
            finally:
                if phase[0]:
                    ops = spent.setdefault(phase[0], {})
                    key = f"{cls_name}.{name}"
                    ops[key] = ops.get(key, 0) + time.perf_counter_ns() - start

        return wrapper

    originals: list[tuple[type, str, Any]] = []
    for cls in (objects.Vcpu, objects.Vm):
        for name, value in list(vars(cls).items()):
            if name.startswith(("get_", "set_")) and callable(value):
                originals.append((cls, name, value))
                setattr(cls, name, timed(cls.__name__, name, value))
    per_rep: list[dict[str, dict[str, int]]] = []
    config = MachineConfig(
        memory=64 * MiB, vcpus=vcpus, guest="counter", guest_args=guest_args(), serial="none"
    )
    src = Machine.create(config)
    try:
        src.start()
        counters = GuestCounters(f"/proc/self/fd/{src.memory.fd}", vcpus)
        try:
            wait_counting(counters, None, f"the profiled guest, {vcpus} vCPUs")
        finally:
            counters.close()
        for _ in range(reps):
            time.sleep(0.05)
            spent.clear()
            t = time.perf_counter_ns()
            src.pause()
            pause_ns = time.perf_counter_ns() - t
            phase[0] = "export"
            t = time.perf_counter_ns()
            data = save_machine(src, True)
            export_ns = time.perf_counter_ns() - t
            phase[0] = ""
            t = time.perf_counter_ns()
            state = decode_state(data)
            decode_ns = time.perf_counter_ns() - t
            memory = GuestMemory(os.dup(src.memory.fd), src.memory.size)
            dst = Machine(config, memory, incoming=True)
            try:
                phase[0] = "import"
                t = time.perf_counter_ns()
                restore_machine(dst, state)
                import_ns = time.perf_counter_ns() - t
                phase[0] = ""
            finally:
                dst.close()
            t = time.perf_counter_ns()
            src.resume()
            resume_ns = time.perf_counter_ns() - t
            totals = {
                "pause": pause_ns,
                "export": export_ns,
                "decode": decode_ns,
                "import": import_ns,
                "resume": resume_ns,
            }
            per_rep.append({"total": totals, **{k: dict(v) for k, v in spent.items()}})
    finally:
        phase[0] = ""
        for owner, name, value in originals:
            setattr(owner, name, value)
        src.close()

    def med_us(values: Sequence[int]) -> float:
        return round(median([v / 1000 for v in values]), 1)

    result: dict[str, Any] = {"vcpus": vcpus, "reps": reps, "state_bytes": len(data)}
    result["total_us"] = {k: med_us([r["total"][k] for r in per_rep]) for k in per_rep[0]["total"]}
    for part in ("export", "import"):
        names = sorted({n for r in per_rep for n in r.get(part, {})})
        ops = {n: med_us([r.get(part, {}).get(n, 0) for r in per_rep]) for n in names}
        ops = dict(sorted(ops.items(), key=lambda item: -item[1]))
        ops["(rest: Python, envelope)"] = round(result["total_us"][part] - sum(ops.values()), 1)
        result[f"{part}_ops_us"] = ops
    return result


def run_profile(ws: Workspace, vcpus: int, reps: int) -> dict[str, Any]:
    """:func:`profile_state` in a child process (it runs the frozen intrahost)."""
    name = f"profile{vcpus}"
    argv = [sys.executable, __file__, "--profile-child", f"{vcpus},{reps}"]
    proc = ws.spawn(argv, name, pipes=True)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        raise BenchError(f"the profile did not finish:\n{ws.log_tail(name)}") from None
    finally:
        ws.stop(proc)
    if proc.returncode != 0:
        raise BenchError(f"the profile failed:\n{ws.log_tail(name)}")
    result: dict[str, Any] = json.loads(out)
    return result


def profile_table(profiles: Sequence[dict[str, Any]]) -> str:
    lines = []
    for prof in profiles:
        t = prof["total_us"]
        lines.append(
            f"{prof['vcpus']} vCPU(s), {prof['reps']} reps, state {prof['state_bytes']} B "
            f"(medians, µs): pause {t['pause']}, export {t['export']}, decode {t['decode']}, "
            f"import {t['import']}, resume {t['resume']}"
        )
        for part in ("export", "import"):
            ops = prof[f"{part}_ops_us"]
            shown = [*list(ops.items())[:6], list(ops.items())[-1]]
            top = ", ".join(f"{name.split('.')[-1]} {us}" for name, us in shown)
            lines.append(f"    {part}: {top}")
    return "\n".join(lines)


# --- summaries, table, plots ---------------------------------------------------------------------


def fmt_ms(us: float | None) -> str:
    """µs -> ms text."""
    if us is None:
        return "-"
    ms = us / 1000
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def stats(records: Sequence[dict[str, Any]], key: str) -> dict[str, float | int | None]:
    values = [float(r[key]) for r in records if r.get(key) is not None]
    if not values:
        return {"median": None, "p99": None, "n": 0}
    return {
        "median": round(median(values), 1),
        "p99": round(percentile(values, 99), 1),
        "n": len(values),
    }


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | int | None]]:
    keys = (
        *("progress_blackout_us", "all_still_us", "guest_pause_us", "total_us", "noise_us"),
        *(*BREAKDOWN, "prepare_us", "window_ms", "spawn_ms", "old_exit_ms"),
        *("guest_stopped_before_pause_us", "guest_first_run_after_resume_us"),
    )
    return {k: stats(records, k) for k in keys if any(r.get(k) is not None for r in records)}


def blackout_table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        f"{'point':<18}{'mode':<6}{'n':>3}  {'progress':>15}  {'guest-observed':>15}  "
        f"{'VMM total':>15}  {'pause':>6}{'copy':>7}{'export':>7}{'xfer':>6}{'import':>7}"
        f"{'resume':>7}  {'noise':>6}"
    )
    sub = (
        f"{'':<18}{'':<6}{'':>3}  {'med     p99':>15}  {'med     p99':>15}  "
        f"{'med     p99':>15}  {'(medians, ms)':>40}  {'med':>6}"
    )
    lines = [head, sub, "-" * len(head)]
    for row in rows:
        s = row["summary"]

        def pair(key: str, s: dict[str, Any] = s) -> str:
            st = s.get(key, {})
            return f"{fmt_ms(st.get('median')):>7} {fmt_ms(st.get('p99')):>7}"

        def med(key: str, width: int, s: dict[str, Any] = s) -> str:
            return f"{fmt_ms(s.get(key, {}).get('median')):>{width}}"

        lines.append(
            f"{row['label']:<18}{row['mode']:<6}{row['n']:>3}  {pair('progress_blackout_us')}  "
            f"{pair('guest_pause_us')}  {pair('total_us')}  {med('pause_us', 6)}"
            f"{med('copy_us', 7)}{med('export_us', 7)}{med('transfer_us', 6)}"
            f"{med('import_us', 7)}{med('resume_us', 7)}  {med('noise_us', 6)}"
        )
    return "\n".join(lines)


def brownout_table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        f"{'working set':<13}{'destination':<12}{'n':>3}  {'to 95%':>15}  {'lost':>7}  "
        f"{'1st pass':>8}  {'old VMM':>8}  {'rate before':>12}  {'prepare':>8}  {'prefault':>8}"
    )
    sub = (
        f"{'':<28}{'med     p99':>15}  {'med':>7}  {'med':>8}  {'gone':>8}  "
        f"{'M it/s (CV)':>12}  {'med':>8}  {'med':>8}"
    )
    lines = [head, sub + "   (ms unless noted)", "-" * len(head)]
    for row in rows:
        s = row["summary"]
        t95 = s["t95_ms"]
        never = sum(1 for r in row["runs"] if r["t95_ms"] is None)
        note = f"  ({never} never back to 95%)" if never else ""
        rate, cv = s["pre_rate_per_s"]["median"], s["pre_bin_cv"]["median"]
        rate_text = f"{num(rate and rate / 1e6)} ({num(cv)})"
        lines.append(
            f"{row['sweep_mib']:>5} MiB    {'--prefault' if row['prefault'] else 'lazy':<12}"
            f"{row['n']:>3}  {num(t95['median']):>7} {num(t95['p99']):>7}  "
            f"{num(s['lost_ms']['median']):>7}  {num(s['first_pass_ms']['median']):>8}  "
            f"{num(s['old_vmm_gone_ms']['median']):>8}  {rate_text:>12}  "
            f"{fmt_ms(s['prepare_us']['median']):>8}  {fmt_ms(s['prefault_us']['median']):>8}"
            f"{note}"
        )
    return "\n".join(lines)


def num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 1 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def check_targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets against the median progress blackout of the fd points."""
    fd = {
        (r["memory"], r["vcpus"]): r["summary"]
        for r in rows
        if r["mode"] == "fd" and not r["sweep_mib"]
    }

    def med(memory: int, vcpus: int) -> float | None:
        s = fd.get((memory, vcpus))
        value = s and s.get("progress_blackout_us", {}).get("median")
        return None if value is None else float(value)

    checks: list[dict[str, Any]] = []
    for memory, vcpus in sorted(fd):
        limit = {1: TARGET_1_VCPU_MS, 8: TARGET_8_VCPU_MS}.get(vcpus)
        value = med(memory, vcpus)
        if limit is not None and value is not None:
            checks.append(
                {
                    "target": f"{size_label(memory)} x {vcpus} vCPU: median <= {limit} ms",
                    "measured_ms": round(value / 1000, 2),
                    "met": value / 1000 <= limit,
                }
            )
    for vcpus in sorted({v for _, v in fd}):
        small, big = med(64 * MiB, vcpus), med(16 * GiB, vcpus)
        if small and big is not None:
            checks.append(
                {
                    "target": f"{vcpus} vCPU: 16 GiB <= {TARGET_16G_RATIO} x 64 MiB",
                    "measured_ratio": round(big / small, 2),
                    "met": big / small <= TARGET_16G_RATIO,
                }
            )
    return checks


def plot_blackout(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.5), dpi=120)
    colours = {1: "#1f77b4", 2: "#2ca02c", 4: "#ff7f0e", 8: "#d62728"}
    series: dict[tuple[str, int], list[tuple[int, float, float]]] = {}
    for row in rows:
        s = row["summary"].get("progress_blackout_us", {})
        if s.get("median") is None:
            continue
        key = (
            row["mode"] if row["mode"] != "fd" or not row["sweep_mib"] else "fd-swept",
            row["vcpus"],
        )
        series.setdefault(key, []).append((row["memory"], s["median"] / 1000, s["p99"] / 1000))
    for (mode, vcpus), values in sorted(series.items()):
        values.sort()
        xs = [v[0] / GiB for v in values]
        meds = [v[1] for v in values]
        p99s = [v[2] for v in values]
        if mode == "fd":
            style: dict[str, Any] = {"color": colours.get(vcpus, "grey"), "marker": "o"}
            label = f"fd hand-off, {vcpus} vCPU{'s' if vcpus > 1 else ''}"
        elif mode == "fd-swept":
            style = {"color": "#555555", "marker": "s", "linestyle": ":"}
            label = "fd hand-off, same guest as the copy baseline (1 vCPU)"
        else:
            style = {"color": "black", "marker": "X", "linestyle": "--"}
            label = "copy baseline: memory through the socket (1 vCPU)"
        ax.plot(xs, meds, label=label, linewidth=2, markersize=7, **style)
        ax.vlines(xs, meds, p99s, color=style["color"], alpha=0.45, linewidth=1.5)
        ax.scatter(xs, p99s, color=style["color"], marker="_", s=120, alpha=0.7)
    noise = [
        (row["memory"] / GiB, row["summary"]["noise_us"]["median"] / 1000, row["vcpus"])
        for row in rows
        if row["mode"] == "fd" and not row["sweep_mib"] and row["summary"].get("noise_us")
    ]
    for x, y, vcpus in noise:
        ax.scatter(x * 1.12, max(y, 0.05), color=colours.get(vcpus, "grey"), marker="x", s=30)
    if noise:
        ax.scatter(
            [],
            [],
            color="grey",
            marker="x",
            s=30,
            label="noise floor (median): same window length, no hand-off",
        )
    ax.axhline(TARGET_1_VCPU_MS, color=colours[1], linestyle=(0, (2, 3)), linewidth=1)
    ax.axhline(TARGET_8_VCPU_MS, color=colours[8], linestyle=(0, (2, 3)), linewidth=1)
    ax.text(0.06, TARGET_1_VCPU_MS * 1.05, "target 1 vCPU", color=colours[1], fontsize=8)
    ax.text(0.06, TARGET_8_VCPU_MS * 1.05, "target 8 vCPUs", color=colours[8], fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    sizes = sorted({row["memory"] for row in rows})
    ax.set_xticks([m / GiB for m in sizes], [size_label(m) for m in sizes])
    ax.minorticks_off()
    ax.set_xlabel("guest memory")
    ax.set_ylabel("progress blackout, ms (median; bar to p99)")
    ax.set_title("Hand-off blackout as the guest sees it (observer process, counter guest)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right", framealpha=0.95)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_brownout(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({row["sweep_mib"] for row in rows})
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.8), dpi=120, squeeze=False)
    colours = {False: "#d62728", True: "#1f77b4"}
    for ax, sweep in zip(axes[0], sets, strict=True):
        longest = 0.0
        for row in (r for r in rows if r["sweep_mib"] == sweep):
            runs = [r for r in row["runs"] if r["relative_rate"]]
            if not runs:
                continue
            # The run with the median time to 95% drawn bold, the others thin.
            ranked = sorted(runs, key=lambda r: r["t95_ms"] if r["t95_ms"] is not None else 1e12)
            typical = ranked[(len(ranked) - 1) // 2]
            for run in runs:
                ys = smoothed(run["relative_rate"], run["smooth_bins"])
                xs = [k * run["bin_ms"] for k in range(len(ys))]
                bold = run is typical
                t95 = row["summary"]["t95_ms"]["median"]
                first = row["summary"]["first_pass_ms"]["median"]
                name = "with --prefault" if row["prefault"] else "without --prefault"
                ax.plot(
                    xs,
                    ys,
                    color=colours[row["prefault"]],
                    linewidth=1.6 if bold else 0.6,
                    alpha=1.0 if bold else 0.35,
                    label=f"{name}: 95% after {num(t95)} ms, first pass {num(first)} ms"
                    if bold
                    else None,
                )
            longest = max(longest, *((r["t95_ms"] or 0) for r in runs))
            longest = max(longest, *((r["first_pass_ms"] or 0) for r in runs))
        ax.axhline(RECOVERED, color="black", linestyle=":", linewidth=1)
        ax.text(0, RECOVERED + 0.02, "95%", fontsize=8)
        ax.set_xlim(0, max(50.0, longest * 1.4 + 20))
        ax.set_ylim(0, 1.35)
        ax.set_xlabel(f"time after the resume, ms (rate over the next {BIN_MS * SMOOTH_BINS:g} ms)")
        ax.set_ylabel("iteration rate / rate before the hand-off")
        ax.set_title(f"working set {sweep} MiB (one page per iteration)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Brownout: the guest's rate after a hand-off while page tables are rebuilt")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------------------


def freeze_intrahost(ws: Workspace) -> dict[str, Any]:
    """Copy the intrahost package into the workspace and make every child process (VMMs,
    the copy source, the profile) import that copy: other engineers edit the tree while the
    bench runs, and a VMM started in the middle of an edit would fail or measure other code.
    Retries for a while if the tree does not import (an edit in progress)."""
    import intrahost

    source = Path(intrahost.__file__).resolve().parent
    frozen = ws.path("code")
    env = {**os.environ, "PYTHONPATH": str(frozen)}
    check = "import intrahost.cli, intrahost.migration.sender; intrahost.cli.build_parser()"
    for _ in range(20):
        shutil.rmtree(frozen, ignore_errors=True)
        shutil.copytree(source, frozen / "intrahost", ignore=shutil.ignore_patterns("__pycache__"))
        test = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True)
        if test.returncode == 0:
            break
        time.sleep(15)
    else:
        raise BenchError(f"intrahost in {source} does not import:\n{test.stderr.decode()[-2000:]}")
    os.environ["PYTHONPATH"] = str(frozen)
    digest = hashlib.sha256()
    for path in sorted((frozen / "intrahost").rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(frozen).as_posix().encode() + path.read_bytes())
    return {"frozen_from": str(source), "sha256": digest.hexdigest()[:16]}


def host_info() -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "-C", str(HERE), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.count("\n")
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "commit": commit,
        "modified_files": dirty,
    }


def main() -> int:
    global OBSERVER_INTERVAL_US
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"points {QUICK_POINTS}, 3 each")
    parser.add_argument("--points", help="MEM:VCPUS,... (default: 64M,1G,16G x 1,2,4,8)")
    parser.add_argument("-n", "--handoffs", type=int, help="hand-offs per point (default 10)")
    parser.add_argument("--copy-sizes", help="copy baseline sizes (default 64M,1G; '' = none)")
    parser.add_argument("--copy-runs", type=int, help="copy hand-offs per size (default: -n)")
    parser.add_argument("--brownout-sets", help="working sets, MiB (default 64,1024; '' = none)")
    parser.add_argument("--brownout-runs", type=int, help="runs per set and mode (default 5)")
    parser.add_argument("--brownout-memory", default="2G", help="guest memory (default 2G)")
    parser.add_argument(
        "--observer-interval-us",
        type=float,
        default=OBSERVER_INTERVAL_US,
        help="the observer sleeps this long between samples (default 0: it spins)",
    )
    parser.add_argument(
        "--profile-vcpus",
        help="vCPU counts for the in-process export/import profile (default 1,8; '' = none)",
    )
    parser.add_argument("--profile-reps", type=int, help="repetitions (default 20)")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the bench, its VMMs and the observer at this niceness (e.g. -10 on a busy host)",
    )
    parser.add_argument(
        "--floor-count",
        type=int,
        help="hand-offs of the C floor (bench/floor.c) per vCPU count and mode, in the same run "
        "(default 100; --quick 30; 0 = none)",
    )
    parser.add_argument("--out", default=str(HERE / "out"), help="output directory")
    parser.add_argument("--copy-source", help=argparse.SUPPRESS)
    parser.add_argument("--profile-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.copy_source:
        return copy_source_main(args.copy_source)
    if args.profile_child:
        vcpus, reps = (int(v) for v in args.profile_child.split(","))
        print(json.dumps(profile_state(vcpus, reps)))
        return 0

    OBSERVER_INTERVAL_US = args.observer_interval_us
    quick = args.quick
    n = args.handoffs or (3 if quick else 10)
    if args.points is not None:
        points = parse_points(args.points)
    elif quick:
        points = parse_points(QUICK_POINTS)
    else:
        points = [Point(m, v) for m in DEFAULT_MEMORY for v in DEFAULT_VCPUS]
    if args.copy_sizes is None:
        copy_sizes = [64 * MiB, 1 * GiB]
    else:
        copy_sizes = [p.memory for p in parse_points(args.copy_sizes)]
    copy_runs = args.copy_runs or (2 if quick else n)
    if args.brownout_sets is None:
        brown_sets = [64, 1024]
    else:
        brown_sets = [int(w) for w in args.brownout_sets.split(",") if w.strip()]
    brown_runs = args.brownout_runs or (1 if quick else 5)
    brown_memory = parse_size(args.brownout_memory)
    if args.profile_vcpus is None:
        profile_vcpus = [1, 8]
    else:
        profile_vcpus = [int(v) for v in args.profile_vcpus.split(",") if v.strip()]
    profile_reps = args.profile_reps or (5 if quick else 20)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by every child
    exit_on_sigterm()
    started = time.time()
    t_start = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - t_start:6.0f} s] {text}", flush=True)

    result: dict[str, Any] = {
        "host": host_info(),
        "args": vars(args),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "loadavg": {"start": os.getloadavg()},
        "method": {
            "guest": f"counter, progress={NO_LINES} (no progress lines), memory on /dev/shm",
            "observer_threshold_us": 200.0,
            "observer_interval_us": OBSERVER_INTERVAL_US,
            "niceness": os.getpriority(os.PRIO_PROCESS, 0),
            "p99": "linear interpolation between order statistics (n=10: ~ the maximum)",
            "noise": "longest stall of any vCPU in a window as long as the hand-off's, "
            "right after it",
            "brownout": f"rate before over {PRE_WINDOW_S} s; after the resume in {BIN_MS} ms "
            f"bins; t95 = start of the first {BIN_MS * SMOOTH_BINS:g} ms window whose mean rate "
            f"is >= {RECOVERED:.0%} of the rate before; first_pass = time to touch the whole "
            "working set once after the resume",
        },
        "blackout": [],
        "brownout": [],
        "profile": [],
        "floor": [],
        "errors": [],
    }

    def note_error(what: str, error: Exception) -> None:
        result["errors"].append(f"{what}: {error}")
        print(f"handoff.py: {what} failed, going on: {error}", file=sys.stderr, flush=True)

    rows: list[dict[str, Any]] = result["blackout"]
    brown_rows: list[dict[str, Any]] = result["brownout"]
    failure: str | None = None
    try:
        with Workspace("handoff") as ws:
            result["host"]["code"] = freeze_intrahost(ws)
            for point in points:
                say(f"fd hand-offs at {point.label}: {n}")
                try:
                    records = run_chain(ws, point, n, f"fd{point.tag}", log=print)
                except BenchError as e:
                    note_error(f"fd hand-offs at {point.label}", e)
                    continue
                rows.append(row_of(point, "fd", 0, records))
            result["loadavg"]["after_blackout"] = os.getloadavg()
            floor_count = (
                args.floor_count if args.floor_count is not None else (30 if quick else 100)
            )
            result["floor"] = run_floors([p.vcpus for p in points], floor_count, log=say)
            for memory in copy_sizes:
                sweep = memory // MiB - 16
                say(f"copy baseline at {size_label(memory)}, guest wrote {sweep} MiB: {copy_runs}")
                try:
                    records = run_copy(ws, memory, copy_runs, log=print)
                    rows.append(row_of(Point(memory, 1), "copy", sweep, records))
                except BenchError as e:
                    note_error(f"copy baseline at {size_label(memory)}", e)
                say(f"fd hand-offs of the same guest: {copy_runs}")
                try:
                    records = run_chain(
                        ws, Point(memory, 1), copy_runs, f"sw{memory // MiB}m", sweep, log=print
                    )
                    rows.append(row_of(Point(memory, 1), "fd", sweep, records))
                except BenchError as e:
                    note_error(f"fd hand-offs of the copy guest at {size_label(memory)}", e)
            result["loadavg"]["after_copy"] = os.getloadavg()
            for sweep in brown_sets:
                say(f"brownout, working set {sweep} MiB: {brown_runs} lazy + {brown_runs} prefault")
                try:
                    records = run_brownout(ws, sweep, brown_memory, brown_runs, log=print)
                except BenchError as e:
                    note_error(f"brownout, working set {sweep} MiB", e)
                    continue
                for prefault in (False, True):
                    runs = [r for r in records if r["prefault"] is prefault]
                    keys = (
                        *("t95_ms", "lost_ms", "first_pass_ms", "old_vmm_gone_ms"),
                        *("pre_rate_per_s", "pre_bin_cv", "prepare_us"),
                    )
                    brown_rows.append(
                        {
                            "sweep_mib": sweep,
                            "memory": brown_memory,
                            "prefault": prefault,
                            "n": len(runs),
                            "summary": {
                                k: stats(runs, k) for k in (*keys, "prefault_us", "total_us")
                            },
                            "runs": runs,
                        }
                    )
            for vcpus in profile_vcpus:
                say(f"in-process profile of pause, export and import, {vcpus} vCPU(s)")
                try:
                    result["profile"].append(run_profile(ws, vcpus, profile_reps))
                except BenchError as e:
                    note_error(f"profile, {vcpus} vCPU(s)", e)
    except BenchError as e:
        failure = str(e)
        print(f"handoff.py: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        failure = "interrupted"
        print("handoff.py: interrupted; partial results follow", file=sys.stderr)
    result["loadavg"]["end"] = os.getloadavg()
    result["duration_s"] = round(time.monotonic() - t_start)
    result["failure"] = failure
    result["host"]["commit_at_end"] = host_info()["commit"]
    result["targets"] = check_targets(rows)
    result["floor_ratios"] = floor_ratios(rows, result["floor"])
    report(result, out)
    return 1 if failure or result["errors"] else 0


def floor_ratios(
    rows: Sequence[dict[str, Any]], floors: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each fd hand-off point beside the C floor at its vCPU count: the guest-observed pause
    (the exact stopwatch) median over the floor's median blackout, plain and pre-run."""
    out = []
    for row in rows:
        if row["mode"] != "fd" or row["sweep_mib"]:
            continue
        guest = row["summary"].get("guest_pause_us", {}).get("median")
        plain = floor_blackout_us(floors, row["vcpus"], False)
        prerun = floor_blackout_us(floors, row["vcpus"], True)
        out.append(
            {
                "label": row["label"],
                "guest_pause_us": guest,
                "floor_us": plain,
                "floor_prerun_us": prerun,
                "ratio": None if not guest or not plain else round(guest / plain, 2),
                "ratio_prerun": None if not guest or not prerun else round(guest / prerun, 2),
            }
        )
    return out


def row_of(
    point: Point, mode: str, sweep_mib: int, records: list[dict[str, Any]]
) -> dict[str, Any]:
    label = point.label + (f" w{sweep_mib}" if sweep_mib else "")
    return {
        "label": label,
        "memory": point.memory,
        "vcpus": point.vcpus,
        "mode": mode,
        "sweep_mib": sweep_mib,
        "n": len(records),
        "summary": summarise(records),
        "handoffs": records,
    }


def report(result: dict[str, Any], out: Path) -> None:
    rows, brown = result["blackout"], result["brownout"]
    print()
    load, cpus = result["loadavg"]["start"][0], result["host"]["cpus"]
    print(
        f"Hand-off blackout, ms (observer threshold 200 µs); the run took {result['duration_s']} s"
    )
    print(f"with a load average of {load:.1f} at its start on {cpus} CPUs.")
    print("'w<M>': the guest first wrote every page of its M MiB above 16 MiB (copy comparison)")
    if rows:
        print(blackout_table(rows))
    if result["targets"]:
        print("\nTargets (median progress blackout):")
        for check in result["targets"]:
            value = check.get("measured_ms", check.get("measured_ratio"))
            print(f"  {'met ' if check['met'] else 'MISS'}  {check['target']}: {value}")
    if brown:
        print("\nBrownout: time from the resume until the rate is back to 95%")
        print(brownout_table(brown))
    if result["floor"]:
        print("\nThe C floor (bench/floor.c), same run, medians in ms:")
        for f in result["floor"]:
            m = f["median_us"]
            print(
                f"  {f['vcpus']} vCPU(s), prerun={f['prerun']!s:5}: blackout "
                f"{m['blackout'] / 1000:.3f} (pause {m['pause'] / 1000:.3f}, export "
                f"{m['export'] / 1000:.3f}, transfer {m['transfer'] / 1000:.3f}, import "
                f"{m['import'] / 1000:.3f}, resume {m['resume'] / 1000:.3f}); n={f['n']}"
            )
        for r in result["floor_ratios"]:
            if r["ratio"] is None and r["ratio_prerun"] is None:
                continue  # (the floor runs at 1 and 4 vCPUs only)
            print(
                f"  {r['label']}: guest-observed pause {fmt_ms(r['guest_pause_us'])} ms = "
                f"{r['ratio']}x the floor, {r['ratio_prerun']}x the pre-run floor"
            )
    if result["profile"]:
        print("\nWhere pause, export and import go (in-process, no observer, 64 MiB guest):")
        print(profile_table(result["profile"]))
    for error in result["errors"]:
        print(f"\nFAILED: {error}")
    json_path = out / "handoff.json"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {json_path}")
    if rows:
        plot_blackout(rows, out / "handoff-blackout.png")
        print(f"wrote {out / 'handoff-blackout.png'}")
    if brown:
        plot_brownout(brown, out / "handoff-brownout.png")
        print(f"wrote {out / 'handoff-brownout.png'}")


if __name__ == "__main__":
    sys.exit(main())
