"""intrahost and QEMU side by side: the same counter guest, the same machine, the same stopwatch.

For each point (guest memory x vCPUs) the built-in ``counter`` guest runs first under intrahost,
then under QEMU with ``-kernel``, each on a memory file under /dev/shm, and is handed to a new
VMM process again and again:

- intrahost, ``--repeat`` times each of, alternately, the two-process form (``intrahost run
  --incoming`` started first, then ``migrate`` on the control socket) and the one-step
  ``intrahost upgrade``;
- QEMU 7.2, ``--repeat`` times, local migration with shared memory: a new QEMU with the same
  ``memory-backend-file,share=on``, ``-incoming defer``, capability ``x-ignore-shared`` on both,
  ``migrate``, then ``quit`` on the old one.

The stopwatch is bench/observer.py: a process that maps the memory file and samples the guest's
per-vCPU counters about every 70 µs. A hand-off's **progress blackout** is the longest time
any vCPU's counter stood still across the moment when all of them stood still during the
migrate command (see :func:`pick_handoff_stall` for the exact rule). Beside it: each VMM's own
figures (QEMU's ``downtime``/``total-time``; intrahost's pause/export/transfer/import/resume),
the **end-to-end** time (new process started -> old process gone), and a **noise floor**: the
same rule applied to an equally long window without a hand-off, after each one.

    python bench/peers.py            # 256 MiB, 4 GiB, 16 GiB x 1, 4 vCPUs, 10 hand-offs each
    python bench/peers.py --quick    # 256 MiB and 16 GiB, 3 hand-offs each: a few minutes
    python bench/peers.py --docs     # also rewrite the tables of docs/results.md and its PNGs
    python bench/peers.py --nice -10 # on a host busy with other work (root)

Writes to bench/out/: peers.json (every hand-off and the summaries), peers-stalls.json (every
stall the observer saw, with the hand-offs' timestamps), peers-blackout.png, peers-breakdown.png
and peers-upgrade.png. QEMU is installed with apt-get if it is missing (the bench says so);
where that is impossible, only intrahost is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import mmap
import os
import platform
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plot
from floor import floor_blackout_us, run_floors
from observer import Observer, Stall
from prose import findings, ratio

from intrahost.service.qmp_client import QmpClient, QmpConnectionError
from intrahost.vmm.guests import layout
from intrahost.vmm.guests.build import build_guest
from intrahost.vmm.guests.probe import CounterProbe, GapNotFound, GuestNotCounting

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

FULL_MEMORY = ("256M", "4G", "16G")
QUICK_MEMORY = ("256M", "16G")
VCPUS = (1, 4)
FULL_REPEAT = 10
QUICK_REPEAT = 3
#: The guest's own default: a progress line (~2 ms of UART exits) every 2^26 iterations,
#: ~0.6 s at 1 vCPU; rarely in a hand-off's window.
DEFAULT_PROGRESS = 1 << 26
#: How often the bench polls ``query-migrate`` (both VMMs).
POLL_S = 0.001
#: The observer sleeps between samples (one every ~70 µs): spinning, it would take one of
#: this host's two CPUs from the guest and double the noise floor (measured: 8 -> 4 ms).
OBSERVER_INTERVAL_US = 20.0
INTRAHOST_PHASES = ("pause", "export", "transfer", "import", "resume")

_U64 = struct.Struct("<Q")


class BenchError(Exception):
    """A point could not be measured (the message says why)."""


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- points and statistics -----------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    memory: str  # "256M", "4G", ...
    vcpus: int

    @property
    def mib(self) -> int:
        number, unit = int(self.memory[:-1]), self.memory[-1].upper()
        return number * {"M": 1, "G": 1024}[unit]

    @property
    def label(self) -> str:
        return f"{self.memory}/{self.vcpus}"


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def p99(values: Sequence[float | None]) -> float | None:
    """Nearest-rank 99th percentile: with fewer than 100 samples, the largest."""
    present = sorted(v for v in values if v is not None)
    if not present:
        return None
    return present[max(0, math.ceil(0.99 * len(present)) - 1)]


# --- what we started, and its cleanup ------------------------------------------------------------


class Resources:
    """Every process, file and directory the bench creates, removed again by :meth:`close`
    (also after an error or Ctrl-C). Processes are ended one by one by their pid; a VMM started
    by ``intrahost upgrade`` is not our child, so a final sweep also ends any process whose
    command line names this run's private work directory (and nothing else)."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="intrahost-peers-"))
        self._children: list[subprocess.Popen[bytes]] = []
        self._pids: list[int] = []
        self._files: list[Path] = []
        self._dirs: list[Path] = []

    def spawn(self, argv: Sequence[str], output: Path) -> subprocess.Popen[bytes]:
        """Start a VMM in its own session (Ctrl-C reaches only the bench, which then stops it
        in order), its output to ``output``."""
        with open(output, "ab") as out:
            child = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._children.append(child)
        return child

    def adopt_pid(self, pid: int) -> None:
        self._pids.append(pid)

    def file(self, path: Path) -> Path:
        self._files.append(path)
        return path

    def directory(self, path: Path) -> Path:
        self._dirs.append(path)
        return path

    def end_processes(self) -> None:
        for child in self._children:
            if child.poll() is None:
                _terminate(child.pid, _exited(child))
        self._children.clear()
        for pid in [*self._pids, *self._marked_pids()]:
            if _pid_alive(pid) and self._is_ours(pid):
                _terminate(pid, _exited(pid))
        self._pids.clear()

    def remove_files(self) -> None:
        for path in self._files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._files.clear()
        for path in self._dirs:
            shutil.rmtree(path, ignore_errors=True)
        self._dirs.clear()

    def close(self) -> None:
        self.end_processes()
        self.remove_files()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _is_ours(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return str(self.workdir).encode() in cmdline

    def _marked_pids(self) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if (
                entry.name.isdigit()
                and int(entry.name) != os.getpid()
                and self._is_ours(int(entry.name))
            ):
                pids.append(int(entry.name))
        return pids


def _pid_alive(pid: int) -> bool:
    """Running (a zombie has exited: its parent may just be slow to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _exited(process: subprocess.Popen[bytes] | int) -> Callable[[], bool]:
    if isinstance(process, subprocess.Popen):
        return lambda: process.poll() is not None
    return lambda: not _pid_alive(process)


def _terminate(pid: int, gone: Callable[[], bool]) -> None:
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if gone():
                return
            time.sleep(0.02)


def flatten(pairs: Iterable[tuple[str, str]]) -> list[str]:
    return [word for pair in pairs for word in pair]


def wait_until(what: str, ready: Callable[[], bool], timeout: float, step: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


def tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


# --- the guest's counters, read directly ---------------------------------------------------------


class Counters:
    """The counter guest's per-vCPU counters, read through the memory file (for start-up and
    continuity checks; the stopwatch is the observer)."""

    def __init__(self, path: Path, vcpus: int) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self._map = mmap.mmap(fd, layout.STATUS_END, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self._offsets = [layout.slot_addr(i) + layout.SLOT_COUNTER for i in range(vcpus)]

    def read(self) -> list[int]:
        return [_U64.unpack_from(self._map, off)[0] for off in self._offsets]

    def wait_counting(self, timeout: float, alive: Callable[[], bool]) -> None:
        """Until every vCPU's counter has moved twice (the guest is in its loop)."""
        deadline = time.monotonic() + timeout
        first = self.read()
        while True:
            now = self.read()
            if all(n > f > 0 for n, f in zip(now, first, strict=True)):
                return
            if not all(f > 0 for f in first):
                first = now
            if not alive():
                raise BenchError("the VMM exited before the guest started counting")
            if time.monotonic() > deadline:
                raise BenchError(f"the guest did not start counting within {timeout:g} s")
            time.sleep(0.02)

    def check_continued(self, before: list[int], timeout: float = 10.0) -> None:
        """Every counter went on from where it was before the hand-off (no reset, no stop)."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.read()
            if all(n > b for n, b in zip(now, before, strict=True)):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"the guest stopped counting after a hand-off: {before} -> {now}")
            time.sleep(0.005)

    def close(self) -> None:
        self._map.close()


# --- which stall is the hand-off's ---------------------------------------------------------------


@dataclass(frozen=True)
class StallPick:
    #: The longest stall of any vCPU that overlaps the all-vCPU stall below (µs).
    blackout_us: float | None
    #: The all-vCPU stall: no counter moved at all (µs).
    all_stopped_us: float | None
    #: Only progress-line stalls were found (a hand-off that landed on a line; the figure then
    #: includes the line's printing, ~2-4 ms of UART exits).
    with_line: bool
    #: How long the observer itself was away when the chosen stall ended: the true stall may
    #: be up to this much longer (µs).
    observer_gap_us: float


def is_line_stall(stall: Stall, progress: int) -> bool:
    """The guest stands still at a multiple of ``progress`` while it prints a progress line
    (or waits for another vCPU's line): its own I/O, not a pause."""
    return stall.counter != 0 and stall.counter % progress == 0


def all_stopped_spans(
    stalls: Sequence[Stall], vcpus: int, t0: int, t1: int
) -> list[tuple[int, int, list[Stall]]]:
    """The intervals overlapping [t0, t1] during which every vCPU's counter stood still, each
    with the per-vCPU stalls that make it up."""
    per_vcpu = [
        [s for s in stalls if s.vcpu == v and s.end_ns >= t0 and s.start_ns <= t1]
        for v in range(vcpus)
    ]
    spans = [(s.start_ns, s.end_ns, [s]) for s in per_vcpu[0]]
    for mine in per_vcpu[1:]:
        spans = [
            (max(a, s.start_ns), min(b, s.end_ns), [*members, s])
            for a, b, members in spans
            for s in mine
            if max(a, s.start_ns) < min(b, s.end_ns)
        ]
    return spans


def pick_handoff_stall(
    stalls: Sequence[Stall],
    vcpus: int,
    progress: int,
    t0: int,
    t1: int,
    accept_lines: bool = True,
) -> StallPick:
    """The hand-off's stall among those overlapping the window [t0, t1] (the migrate command).

    A hand-off pauses every vCPU, so it shows as an interval in which no counter moves. The rule:
    take the longest such interval that is not made of progress-line stalls alone; the progress
    blackout is the longest stall of any vCPU overlapping it (a vCPU that waited for a host CPU
    before or after the pause stood still longer than the pause itself, and the guest saw that).
    If only line stalls are there and ``accept_lines`` is set, the longest of them is taken and
    flagged (for a noise-floor window, ``accept_lines`` is off: a line is not noise).
    """
    spans = all_stopped_spans(stalls, vcpus, t0, t1)
    candidates = [sp for sp in spans if not all(is_line_stall(s, progress) for s in sp[2])]
    with_line = False
    if not candidates and accept_lines:
        candidates, with_line = spans, bool(spans)
    if not candidates:
        return StallPick(None, None, False, 0.0)
    a, b, _ = max(candidates, key=lambda sp: sp[1] - sp[0])
    overlapping = [s for s in stalls if s.end_ns >= a and s.start_ns <= b]
    longest = max(overlapping, key=lambda s: s.us)
    return StallPick(
        blackout_us=round(longest.us, 1),
        all_stopped_us=round((b - a) / 1000, 1),
        with_line=with_line,
        observer_gap_us=round(max(0, longest.moved_ns - longest.end_ns) / 1000, 1),
    )


# --- one hand-off's record -----------------------------------------------------------------------


@dataclass
class Handoff:
    vmm: str  # "intrahost" or "qemu"
    form: str  # "migrate" (two processes), "upgrade" (intrahost upgrade), "migrate" for QEMU
    #: CLOCK_MONOTONIC ns: new process started, migrate issued, migrate completed, old gone.
    t_spawn: int = 0
    t_cmd: int = 0
    t_done: int = 0
    t_end: int = 0
    #: The earliest moment the VMM can have paused the guest (see :func:`earliest_pause`).
    t_watch: int = 0
    #: Time reserved after the hand-off, as long as [t_cmd, t_done]; its first
    #: t_done - t_watch are the noise-floor window.
    control: tuple[int, int] = (0, 0)
    #: The VMM's own figures (intrahost: its breakdown in µs; QEMU: query-migrate, ms).
    vmm_figures: dict[str, Any] = field(default_factory=dict)
    stall: StallPick | None = None
    noise: StallPick | None = None
    #: The guest's own RDTSC gap across the hand-off (the exact stopwatch), µs, and how it
    #: was picked: "exact" (from the VMM's pause and resume times) or "window" (the largest
    #: gap between the earliest pause and `completed`: QEMU gives no such times).
    guest_gap_us: float | None = None
    guest_gap_method: str | None = None

    @property
    def window_ms(self) -> float:
        """Where the hand-off's stall is looked for: from t_watch to t_done."""
        return (self.t_done - self.t_watch) / 1e6

    @property
    def command_ms(self) -> float:
        return (self.t_done - self.t_cmd) / 1e6

    @property
    def noise_us(self) -> float | None:
        """The noise floor; 0 when no stall reached the observer's threshold."""
        if self.noise is None:
            return None
        return self.noise.blackout_us or 0.0

    @property
    def e2e_ms(self) -> float:
        return (self.t_end - self.t_spawn) / 1e6

    def timestamps(self) -> dict[str, Any]:
        """CLOCK_MONOTONIC ns, to match against the raw stalls."""
        names = ("t_spawn", "t_cmd", "t_watch", "t_done", "t_end", "control")
        return {name: getattr(self, name) for name in names}

    def to_dict(self) -> dict[str, Any]:
        return {
            "vmm": self.vmm,
            "form": self.form,
            "progress_blackout_us": self.stall.blackout_us if self.stall else None,
            "all_vcpus_stopped_us": self.stall.all_stopped_us if self.stall else None,
            "landed_on_progress_line": self.stall.with_line if self.stall else None,
            "observer_gap_us": self.stall.observer_gap_us if self.stall else None,
            "noise_floor_us": self.noise_us,
            "guest_gap_us": self.guest_gap_us,
            "guest_gap_method": self.guest_gap_method,
            "window_ms": round(self.window_ms, 3),
            "end_to_end_ms": round(self.e2e_ms, 3),
            "spawn_to_command_ms": round((self.t_cmd - self.t_spawn) / 1e6, 3),
            "command_to_done_ms": round(self.command_ms, 3),
            "done_to_old_gone_ms": round((self.t_end - self.t_done) / 1e6, 3),
            "vmm_figures": self.vmm_figures,
        }


def earliest_pause(h: Handoff) -> int:
    """The earliest moment the VMM can have paused the guest, by its own account: each does its
    set-up after the `migrate` command and before the pause — intrahost connects, passes the
    memory fd and the config and waits for the destination to build its VM (``prepare_us``);
    QEMU sets up (``setup-time``, whole ms, so 1 ms less). The window for the hand-off's stall
    starts there, so that both VMMs are watched only from where their pause can begin."""
    if h.vmm == "intrahost":
        before_ns = int(h.vmm_figures.get("prepare_us") or 0) * 1000
    else:
        before_ns = max(0, int(h.vmm_figures.get("setup-time") or 0) - 1) * 1_000_000
    return min(h.t_cmd + before_ns, h.t_done)


def poll_migration(qmp: QmpClient, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        result: dict[str, Any] = qmp.execute("query-migrate")
        if result.get("status") == "completed":
            return result
        if result.get("status") in ("failed", "cancelled"):
            raise BenchError(f"migration {result.get('status')}: {result.get('error-desc')}")
        if time.monotonic() > deadline:
            raise BenchError(f"migration not completed after {timeout:g} s: {result}")
        time.sleep(POLL_S)


def connect_qmp(path: Path, alive: Callable[[], bool], timeout: float = 60.0) -> QmpClient:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return QmpClient(path, timeout=30.0)
        except QmpConnectionError:
            if not alive():
                raise BenchError(f"the process serving {path} exited") from None
            if time.monotonic() > deadline:
                raise BenchError(f"no QMP server at {path} after {timeout:g} s") from None
            time.sleep(0.005)


# --- intrahost -----------------------------------------------------------------------------------


class IntrahostGuest:
    """The counter guest under intrahost, and its hand-offs."""

    name = "intrahost"

    def __init__(self, res: Resources, point: Point, progress: int, shm: Path) -> None:
        self.res, self.point, self.progress, self.shm = res, point, progress, shm
        self.dir = res.directory(res.workdir / f"intrahost-{point.memory}-{point.vcpus}")
        self.dir.mkdir()
        self._generation = 0
        self.api = self.dir / "api-0.sock"
        #: The VMM that runs the guest now: our child, or a pid that `upgrade` started.
        self.current: subprocess.Popen[bytes] | int | None = None

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "intrahost", *args]

    def _alive(self, vmm: subprocess.Popen[bytes] | int | None) -> bool:
        if isinstance(vmm, subprocess.Popen):
            return vmm.poll() is None
        return vmm is not None and _pid_alive(vmm)

    def start(self) -> None:
        flags = {
            "--memory": f"{self.point.mib}M",
            "--vcpus": str(self.point.vcpus),
            "--guest": "counter",
            "--guest-args": f"progress={self.progress}",
            "--memory-path": str(self.shm),
            "--api-socket": str(self.api),
            "--serial": f"file:{self.dir / 'serial.log'}",
        }
        argv = self._cli("run", *flatten(flags.items()))
        output = self.dir / "vmm-0.log"
        self.current = self.res.spawn(argv, output)
        try:
            # The memory file exists before the control socket does.
            connect_qmp(self.api, lambda: self._alive(self.current)).close()
        except BenchError as e:
            raise BenchError(f"intrahost did not start: {e}\n{tail(output)}") from None

    def alive(self) -> bool:
        return self._alive(self.current)

    def handoff(self, k: int) -> Handoff:
        return self._migrate() if k % 2 == 0 else self._upgrade()

    def _migrate(self) -> Handoff:
        """The two-process form: a destination waiting with --incoming, then `migrate`."""
        self._generation += 1
        gen = self._generation
        mig = self.dir / f"mig-{gen}.sock"
        api = self.dir / f"api-{gen}.sock"
        output = self.dir / f"vmm-{gen}.log"
        h = Handoff("intrahost", "migrate")
        h.t_spawn = time.monotonic_ns()
        new = self.res.spawn(
            self._cli("run", "--incoming", f"unix:{mig}", "--api-socket", str(api)), output
        )
        try:
            wait_until("the destination's migration socket", lambda: mig.exists(), 60)
        except BenchError:
            raise BenchError(f"intrahost --incoming did not listen\n{tail(output)}") from None
        with QmpClient(self.api, timeout=30.0) as qmp:
            h.t_cmd = time.monotonic_ns()
            qmp.execute("migrate", uri=f"unix:{mig}")
            result = poll_migration(qmp)
            h.t_done = time.monotonic_ns()
        old = self.current
        wait_until("the old VMM to exit", lambda: not self._alive(old), 30)
        h.t_end = time.monotonic_ns()
        if isinstance(old, subprocess.Popen):
            old.wait(5)
        h.vmm_figures = dict(result.get("blackout", {}))
        self.current, self.api = new, api
        return h

    def _upgrade(self) -> Handoff:
        """`intrahost upgrade`: starts the new VMM itself; its wall time is the end-to-end."""
        h = Handoff("intrahost", "upgrade")
        old = self.current
        # The old VMM's MIGRATION event carries the whole breakdown (with the pause and
        # resume times the stopwatch needs); the command prints only the durations.
        events = QmpClient(self.api, timeout=30.0)
        try:
            h.t_spawn = h.t_cmd = time.monotonic_ns()
            done = subprocess.run(
                self._cli("upgrade", "--api-socket", str(self.api)),
                capture_output=True,
                text=True,
                timeout=180,
                start_new_session=True,
            )
            h.t_done = h.t_end = time.monotonic_ns()
            breakdown = _completed_breakdown(events)
        finally:
            events.close()
        out = done.stdout + done.stderr
        if (m := re.search(r"new VMM pid (\d+) serves", out)) is not None:
            self.res.adopt_pid(int(m.group(1)))
        if done.returncode != 0 or m is None:
            raise BenchError(f"intrahost upgrade failed (status {done.returncode}): {out.strip()}")
        # upgrade returns once the old VMM is gone, or after 10 s without saying so.
        if self._alive(old):
            raise BenchError("intrahost upgrade returned while the old VMM still runs")
        if isinstance(old, subprocess.Popen):
            old.wait(5)
        h.vmm_figures = parse_breakdown(out) | breakdown
        self.current = int(m.group(1))
        return h

    def stop(self) -> None:
        if not self.alive():
            return
        with contextlib.suppress(QmpConnectionError), QmpClient(self.api, timeout=10) as qmp:
            qmp.execute("quit")
        vmm = self.current
        with contextlib.suppress(BenchError):
            wait_until("intrahost to quit", lambda: not self._alive(vmm), 10)
        if isinstance(vmm, subprocess.Popen):
            vmm.wait(5)


def _completed_breakdown(qmp: QmpClient) -> dict[str, Any]:
    """The breakdown in the MIGRATION completed event ``qmp`` received ({} if none)."""
    with contextlib.suppress(QmpConnectionError):
        while True:
            event = qmp.wait_event("MIGRATION", timeout=5.0)
            data = event.get("data", {})
            if data.get("status") == "completed":
                return dict(data.get("blackout", {}))
            if data.get("status") == "failed":
                return {}
    return {}


def parse_breakdown(text: str) -> dict[str, Any]:
    """intrahost upgrade's "blackout: pause 152 µs, ..., total 1717 µs" as
    {"pause_us": 152, ..., "total_us": 1717}."""
    line = next((x for x in text.splitlines() if x.startswith("blackout:")), "")
    return {f"{name}_us": int(value) for name, value in re.findall(r"(\w+) (\d+) µs", line)}


# --- QEMU ----------------------------------------------------------------------------------------


def find_qemu(install: bool) -> str | None:
    """The qemu-system-x86_64 binary; installed with apt-get if missing and ``install``."""
    binary = shutil.which("qemu-system-x86_64")
    if binary is not None or not install:
        return binary
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        log("QEMU is not installed, and apt-get is unavailable (or not root): skipping QEMU")
        return None
    log("QEMU is not installed: installing it (apt-get install qemu-system-x86) ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", "qemu-system-x86"],
    ):
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            log(f"'{' '.join(argv)}' failed, skipping QEMU:\n{done.stderr.strip()[-800:]}")
            return None
    return shutil.which("qemu-system-x86_64")


def qemu_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0].strip() if out else "unknown"


class QemuGuest:
    """The counter guest under QEMU (q35, KVM, memory-backend-file share=on), and its local
    migrations with x-ignore-shared."""

    name = "qemu"

    def __init__(
        self, res: Resources, point: Point, progress: int, shm: Path, binary: str, elf: Path
    ) -> None:
        self.res, self.point, self.progress, self.shm = res, point, progress, shm
        self.binary, self.elf = binary, elf
        self.dir = res.directory(res.workdir / f"qemu-{point.memory}-{point.vcpus}")
        self.dir.mkdir()
        self._generation = 0
        self.current: subprocess.Popen[bytes] | None = None
        self.qmp: QmpClient | None = None

    def _argv(self, gen: int, incoming: bool) -> list[str]:
        """The same machine for every generation; a destination also gets -incoming defer."""
        size, v = f"{self.point.mib}M", self.point.vcpus
        options = [
            ("-machine", "q35,memory-backend=mem"),
            ("-accel", "kvm"),
            ("-m", size),
            ("-smp", str(v)),
            ("-display", "none"),
            ("-nodefaults", "-no-user-config"),
            ("-object", f"memory-backend-file,id=mem,size={size},mem-path={self.shm},share=on"),
            ("-kernel", str(self.elf)),
            ("-append", f"cpus={v} progress={self.progress}"),
            ("-serial", f"file:{self.dir / f'serial-{gen}.log'}"),
            ("-device", "isa-debug-exit,iobase=0x50c,iosize=1"),
            ("-qmp", f"unix:{self.dir / f'qmp-{gen}.sock'},server=on,wait=off"),
        ]
        if incoming:
            options.append(("-incoming", "defer"))
        return [self.binary, *flatten(options)]

    def _spawn(self, gen: int, incoming: bool) -> tuple[subprocess.Popen[bytes], QmpClient]:
        output = self.dir / f"qemu-{gen}.log"
        proc = self.res.spawn(self._argv(gen, incoming), output)
        try:
            qmp = connect_qmp(self.dir / f"qmp-{gen}.sock", lambda: proc.poll() is None)
        except BenchError as e:
            raise BenchError(f"QEMU did not start: {e}\n{tail(output)}") from None
        qmp.execute(
            "migrate-set-capabilities",
            capabilities=[{"capability": "x-ignore-shared", "state": True}],
        )
        return proc, qmp

    def start(self) -> None:
        self.current, self.qmp = self._spawn(0, incoming=False)

    def alive(self) -> bool:
        return self.current is not None and self.current.poll() is None

    def handoff(self, k: int) -> Handoff:
        assert self.current is not None and self.qmp is not None
        self._generation += 1
        gen = self._generation
        mig = self.dir / f"mig-{gen}.sock"
        h = Handoff("qemu", "migrate")
        h.t_spawn = time.monotonic_ns()
        new, new_qmp = self._spawn(gen, incoming=True)
        try:
            new_qmp.execute("migrate-incoming", uri=f"unix:{mig}")
            h.t_cmd = time.monotonic_ns()
            self.qmp.execute("migrate", uri=f"unix:{mig}")
            result = poll_migration(self.qmp)
            h.t_done = time.monotonic_ns()
            wait_until(
                "the new QEMU to run the guest",
                lambda: new_qmp.execute("query-status").get("status") == "running",
                30,
                POLL_S,
            )
            with contextlib.suppress(QmpConnectionError):
                self.qmp.execute("quit")
            self.qmp.close()
            self.current.wait(30)
            h.t_end = time.monotonic_ns()
        except BaseException:
            new_qmp.close()
            raise
        h.vmm_figures = {
            key: result.get(key) for key in ("downtime", "total-time", "setup-time", "status")
        }
        h.vmm_figures["ram-transferred"] = result.get("ram", {}).get("transferred")
        self.current, self.qmp = new, new_qmp
        return h

    def stop(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(QmpConnectionError):
                self.qmp.execute("quit")
            self.qmp.close()
            self.qmp = None
        if self.current is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.current.wait(10)


# --- one point -----------------------------------------------------------------------------------


Guest = IntrahostGuest | QemuGuest


def measure(
    guest: Guest, point: Point, progress: int, repeat: int
) -> tuple[list[Handoff], list[Stall]]:
    """Start the guest, hand it off ``repeat`` times (intrahost: ``repeat`` of each form), stop
    it; every hand-off with its progress blackout and noise floor, and all the stalls seen."""
    log(f"  {guest.name}: starting {point.memory}, {point.vcpus} vCPU(s)")
    guest.start()
    wait_until("the memory file", lambda: guest.shm.exists(), 30)
    counters = Counters(guest.shm, point.vcpus)
    observer: Observer | None = None
    probe: CounterProbe | None = None
    try:
        counters.wait_counting(120, guest.alive)
        probe = CounterProbe.open(guest.shm)
        observer = Observer(str(guest.shm), point.vcpus, interval_us=OBSERVER_INTERVAL_US)
        observer.start()
        time.sleep(0.5)  # the observer settles; the guest runs undisturbed for a while
        count = repeat * 2 if isinstance(guest, IntrahostGuest) else repeat
        handoffs = []
        for k in range(count):
            before = counters.read()
            probe.calibrate()
            h = guest.handoff(k)
            counters.check_continued(before)
            guest_stopwatch(probe, h)
            # The noise floor: a window as long as the migrate command's, without a hand-off.
            start = time.monotonic_ns() + 50_000_000
            h.control = (start, start + (h.t_done - h.t_cmd))
            time.sleep((h.control[1] - time.monotonic_ns()) / 1e9 + 0.05)
            handoffs.append(h)
            log(
                f"    {h.form:8s} {k + 1:2d}/{count}: command {h.command_ms:7.1f} ms, "
                f"end-to-end {h.e2e_ms:7.1f} ms"
            )
        time.sleep(0.1)
        stalls = observer.collect()
        for h in handoffs:
            h.t_watch = earliest_pause(h)
            h.stall = pick_handoff_stall(stalls, point.vcpus, progress, h.t_watch, h.t_done)
            control = (h.control[0], h.control[0] + h.t_done - h.t_watch)
            h.noise = pick_handoff_stall(
                stalls, point.vcpus, progress, *control, accept_lines=False
            )
        return handoffs, stalls
    finally:
        if observer is not None:
            observer.stop()
        if probe is not None:
            probe.close()
        counters.close()
        guest.stop()


def guest_stopwatch(probe: CounterProbe, h: Handoff) -> None:
    """The guest's own gap across the hand-off (the exact stopwatch of the issue): picked
    from intrahost's pause and resume times; for QEMU, which gives none, the largest gap
    from the earliest moment it can have paused the guest to `completed`."""
    figures = h.vmm_figures
    try:
        if figures.get("paused_at_ns") and figures.get("resumed_at_ns"):
            parked = int(figures["paused_at_ns"]) + int(figures["pause_us"]) * 1000
            h.guest_gap_us = probe.handoff_gap_us(parked, int(figures["resumed_at_ns"]))
            h.guest_gap_method = "exact"
        else:
            h.guest_gap_us = probe.largest_gap_us(earliest_pause(h), h.t_done)
            h.guest_gap_method = "window"
    except (GapNotFound, GuestNotCounting) as e:
        log(f"    the guest's stopwatch: {e}")


def summarize(handoffs: Sequence[Handoff], vmm: str) -> dict[str, Any]:
    """Medians and p99 (ms) of one VMM's hand-offs at one point."""

    def ms(values: Sequence[float | None]) -> list[float | None]:
        return [None if v is None else v / 1000 for v in values]

    def stats(values: Sequence[float | None]) -> dict[str, float | None]:
        med, top = median(values), p99(values)
        return {
            "median": None if med is None else round(med, 3),
            "p99": None if top is None else round(top, 3),
            "n": len([v for v in values if v is not None]),
        }

    def blackout(hs: Sequence[Handoff]) -> dict[str, Any]:
        return {
            "progress_blackout_ms": stats(
                ms([h.stall.blackout_us if h.stall else None for h in hs])
            ),
            "all_vcpus_stopped_ms": stats(
                ms([h.stall.all_stopped_us if h.stall else None for h in hs])
            ),
            "noise_floor_ms": stats(ms([h.noise_us for h in hs])),
            "guest_gap_ms": stats(ms([h.guest_gap_us for h in hs])),
            "window_ms": stats([h.window_ms for h in hs]),
            "end_to_end_ms": stats([h.e2e_ms for h in hs]),
            "spawn_to_command_ms": stats([(h.t_cmd - h.t_spawn) / 1e6 for h in hs]),
            "command_ms": stats([h.command_ms for h in hs]),
            "done_to_old_gone_ms": stats([(h.t_end - h.t_done) / 1e6 for h in hs]),
            "landed_on_progress_line": sum(1 for h in hs if h.stall and h.stall.with_line),
        }

    if vmm == "qemu":
        out = blackout(handoffs)
        for key in ("downtime", "total-time", "setup-time"):
            out[f"{key}_ms"] = stats([h.vmm_figures.get(key) for h in handoffs])
        return out
    forms = {form: [h for h in handoffs if h.form == form] for form in ("migrate", "upgrade")}
    out = {form: blackout(hs) for form, hs in forms.items()}
    phases = {}
    for phase in (*INTRAHOST_PHASES, "total", "prepare"):
        phases[f"{phase}_ms"] = stats(ms([h.vmm_figures.get(f"{phase}_us") for h in handoffs]))
    out["breakdown"] = phases
    return out


# --- the host ------------------------------------------------------------------------------------


def host_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem_kib = next((int(ln.split()[1]) for ln in f if ln.startswith("MemTotal")), 0)
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "ram_gib": round(mem_kib / (1 << 20), 1),
        "python": platform.python_version(),
    }


# --- tables, JSON, plots, docs -------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _pair(stats: dict[str, Any], digits: int = 2) -> str:
    return f"{_fmt(stats.get('median'), digits)} / {_fmt(stats.get('p99'), digits)}"


def _exact_ratio(ours: float | None, theirs: float | None) -> float | None:
    """``ours / theirs`` unrounded (the floor's figures are shown with 3 decimals)."""
    return None if ours is None or theirs is None or theirs == 0 else ours / theirs


def stopwatch_table(
    points: Sequence[dict[str, Any]], floors: Sequence[dict[str, Any]]
) -> list[str]:
    """The goals' table: the guest's own gap across each hand-off, both VMMs and the C floor
    measured in the same run, with the ratios the issue sets goals on."""
    lines = [
        "**The guest's own stopwatch** (the counter guest's RDTSC gap across the hand-off; ms, "
        "median / p99). intrahost: the gap that spans its pause and resume times (exact); "
        "QEMU: the largest gap from its earliest possible pause to `completed`. The C floor "
        "(bench/floor.c, same run): the same blackout done by a minimal C program, destination "
        "vCPUs never run / run once on a stub before the pause. Ratios of the intrahost "
        "`migrate` median to QEMU's and to the floor's.",
        "",
        "| point | intrahost migrate | intrahost upgrade | QEMU | C floor / pre-run "
        "| ÷ QEMU | ÷ floor | ÷ pre-run floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        ih, q = p.get("intrahost"), p.get("qemu") or {}
        mig = ih["migrate"].get("guest_gap_ms", {}) if ih else {}
        upg = ih["upgrade"].get("guest_gap_ms", {}) if ih else {}
        qg = q.get("guest_gap_ms", {})
        plain = floor_blackout_us(floors, p["vcpus"], False)
        prerun = floor_blackout_us(floors, p["vcpus"], True)
        ours = mig.get("median")
        floor_ms = [None if v is None else v / 1000 for v in (plain, prerun)]
        lines.append(
            f"| {p['label']} | {_pair(mig)} | {_pair(upg)} | {_pair(qg)} "
            f"| {_fmt(floor_ms[0], 3)} / {_fmt(floor_ms[1], 3)} "
            f"| {_fmt(ratio(ours, qg.get('median')))} "
            f"| {_fmt(_exact_ratio(ours, floor_ms[0]))} "
            f"| {_fmt(_exact_ratio(ours, floor_ms[1]))} |"
        )
    if floors:
        lines += [
            "",
            "The C floor step by step (ms, median): "
            + "; ".join(
                f"{f['vcpus']} vCPU(s){' pre-run' if f['prerun'] else ''}: "
                + ", ".join(
                    f"{step} {f['median_us'][step] / 1000:.3f}"
                    for step in ("pause", "export", "transfer", "import", "resume", "blackout")
                )
                for f in floors
            )
            + ".",
        ]
    return [*lines, ""]


def tables(points: Sequence[dict[str, Any]], floors: Sequence[dict[str, Any]] = ()) -> str:
    """The results as markdown tables (also what the bench prints)."""
    lines = [
        *stopwatch_table(points, floors),
        "**Progress blackout** (observer; ms, median / p99): intrahost two-process `migrate`, "
        "intrahost `upgrade`, QEMU; ratio = intrahost `migrate` median / QEMU median. "
        "Window: where the stall is looked for, from the earliest moment the VMM can have paused "
        "the guest (after its own set-up) to `completed` (median). Noise floor: the same rule "
        "on an equally long window without a hand-off (median).",
        "",
        "| point | intrahost migrate | intrahost upgrade | QEMU | ratio | all vCPUs stopped, "
        "intrahost / QEMU (median) | noise floor, intrahost / QEMU | window, intrahost / QEMU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        ih, qm = p.get("intrahost"), p.get("qemu")
        mig = ih["migrate"] if ih else {}
        upg = ih["upgrade"] if ih else {}
        q = qm or {}

        def get(d: dict[str, Any], key: str) -> dict[str, Any]:
            return d.get(key, {}) if d else {}

        r = ratio(
            get(mig, "progress_blackout_ms").get("median"),
            q.get("progress_blackout_ms", {}).get("median"),
        )
        lines.append(
            f"| {p['label']} | {_pair(get(mig, 'progress_blackout_ms'))} "
            f"| {_pair(get(upg, 'progress_blackout_ms'))} "
            f"| {_pair(get(q, 'progress_blackout_ms'))} | {_fmt(r)} "
            f"| {_fmt(get(mig, 'all_vcpus_stopped_ms').get('median'))} / "
            f"{_fmt(get(q, 'all_vcpus_stopped_ms').get('median'))} "
            f"| {_fmt(get(mig, 'noise_floor_ms').get('median'))} / "
            f"{_fmt(get(q, 'noise_floor_ms').get('median'))} "
            f"| {_fmt(get(mig, 'window_ms').get('median'), 1)} / "
            f"{_fmt(get(q, 'window_ms').get('median'), 1)} |"
        )
    lines += [
        "",
        "**The VMMs' own figures** (ms, median / p99). intrahost: its breakdown of the blackout "
        "(pause → resume, both forms); QEMU: `downtime` (source side) and `total-time` from "
        "`query-migrate`.",
        "",
        "| point | pause | export | transfer | import | resume | intrahost total "
        "| QEMU downtime | QEMU total-time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        b = p["intrahost"]["breakdown"] if p.get("intrahost") else {}
        q = p.get("qemu") or {}
        cells = [_pair(b.get(f"{ph}_ms", {})) for ph in (*INTRAHOST_PHASES, "total")]
        lines.append(
            f"| {p['label']} | {' | '.join(cells)} "
            f"| {_pair(q.get('downtime_ms', {}), 0)} | {_pair(q.get('total-time_ms', {}), 0)} |"
        )
    lines += [
        "",
        "**End-to-end upgrade** (ms, median / p99): from starting the new VMM process to the old "
        "one gone. intrahost `upgrade`: the command's wall time; intrahost two-process and QEMU: "
        "the bench starts the new process, migrates, and waits for the old one to exit (QEMU: "
        "after `quit`).",
        "",
        "| point | intrahost upgrade | intrahost two-process | QEMU "
        "| two-process: start → listening, migrate, old gone | QEMU: the same |",
        "|---|---|---|---|---|---|",
    ]

    def steps(d: dict[str, Any]) -> str:
        keys = ("spawn_to_command_ms", "command_ms", "done_to_old_gone_ms")
        return " + ".join(_fmt(d.get(k, {}).get("median"), 0) for k in keys)

    for p in points:
        ih, q = p.get("intrahost"), p.get("qemu") or {}
        upg = ih["upgrade"] if ih else {}
        mig = ih["migrate"] if ih else {}
        lines.append(
            f"| {p['label']} | {_pair(upg.get('end_to_end_ms', {}), 0)} "
            f"| {_pair(mig.get('end_to_end_ms', {}), 0)} "
            f"| {_pair(q.get('end_to_end_ms', {}), 0)} | {steps(mig)} | {steps(q)} |"
        )
    return "\n".join(lines)


def draw(
    points: Sequence[dict[str, Any]],
    out: Path,
    title_suffix: str,
    floors: Sequence[dict[str, Any]] = (),
) -> list[Path]:
    rows = []
    for p in points:
        for vmm, key in (("intrahost", "migrate"), ("qemu", None)):
            summary = p.get(vmm)
            if not summary:
                continue
            stats = (summary[key] if key else summary)["progress_blackout_ms"]
            rows.append(
                {
                    "vmm": vmm,
                    "memory_mib": p["memory_mib"],
                    "vcpus": p["vcpus"],
                    "median_ms": stats["median"],
                    "p99_ms": stats["p99"],
                    "noise_ms": (summary[key] if key else summary)["noise_floor_ms"]["median"],
                }
            )
    paths = []
    if rows:
        path = out / "peers-blackout.png"
        plot.blackout_vs_memory(rows, path, f"Progress blackout of a hand-off{title_suffix}")
        paths.append(path)
    bars = [
        {
            "label": p["label"],
            "phases": {
                ph: p["intrahost"]["breakdown"][f"{ph}_ms"]["median"] for ph in INTRAHOST_PHASES
            },
            "progress_ms": p["intrahost"]["migrate"]["progress_blackout_ms"]["median"],
            "guest_ms": p["intrahost"]["migrate"].get("guest_gap_ms", {}).get("median"),
        }
        for p in points
        if p.get("intrahost")
    ]
    bars += [
        {
            "label": f"C floor {f['vcpus']}v{' pre-run' if f['prerun'] else ''}",
            "phases": {ph: f["median_us"][ph] / 1000 for ph in INTRAHOST_PHASES},
            "progress_ms": None,
            "guest_ms": f["median_us"]["blackout"] / 1000,
        }
        for f in floors
    ]
    if bars:
        path = out / "peers-breakdown.png"
        plot.breakdown_bars(
            bars, path, f"The blackout phase by phase: intrahost and the C floor{title_suffix}"
        )
        paths.append(path)
    e2e = [
        {
            "label": p["label"],
            "upgrade": p["intrahost"]["upgrade"]["end_to_end_ms"]["median"]
            if p.get("intrahost")
            else None,
            "two": p["intrahost"]["migrate"]["end_to_end_ms"]["median"]
            if p.get("intrahost")
            else None,
            "qemu": p["qemu"]["end_to_end_ms"]["median"] if p.get("qemu") else None,
        }
        for p in points
    ]
    if e2e:
        path = out / "peers-upgrade.png"
        plot.grouped_bars(
            e2e,
            [
                ("upgrade", "intrahost upgrade", plot.VMM_STYLE["intrahost"]["color"]),
                ("two", "intrahost two-process", "#7fb3e0"),
                ("qemu", "QEMU", plot.VMM_STYLE["qemu"]["color"]),
            ],
            path,
            f"End-to-end upgrade: new process started → old process gone{title_suffix}",
            "ms (median)",
            "point: guest memory / vCPUs",
        )
        paths.append(path)
    return paths


DOCS_BEGIN = "<!-- peers.py:begin (generated by bench/peers.py --docs; edit outside) -->"
DOCS_END = "<!-- peers.py:end -->"


def update_docs(report: dict[str, Any], pngs: Sequence[Path]) -> Path:
    """Rewrite the generated part of docs/results.md (the run's figures: tables and the
    findings derived from them) and copy the plots to docs/results-*.png."""
    docs = REPO / "docs"
    for png in pngs:
        shutil.copyfile(png, docs / f"results-{png.name.removeprefix('peers-')}")
    host, cfg = report["host"], report["config"]
    generated = "\n".join(
        [
            DOCS_BEGIN,
            "",
            f"Measured {report['date']} on: Linux {host['kernel']}, {host['cpu']}, "
            f"{host['cpus']} CPUs, {host['ram_gib']} GiB RAM; {report.get('qemu') or 'no QEMU'}; "
            f"Python {host['python']}. Load average before / after the run: "
            f"{report['loadavg_before']} / {report['loadavg_after']}. "
            f"{cfg['repeat']} hand-offs per point and VMM (intrahost: {cfg['repeat']} of each "
            f"form); the run took {report['duration_s'] / 60:.1f} min.",
            "",
            "```",
            report["command"],
            "```",
            "",
            tables(report["points"], report.get("floor", [])),
            "",
            findings(report["points"]),
            "",
            *[f"![{png.stem}](results-{png.name.removeprefix('peers-')})" for png in pngs],
            "",
            DOCS_END,
        ]
    )
    page = docs / "results.md"
    text = page.read_text() if page.exists() else "# Results\n\n" + DOCS_BEGIN + "\n" + DOCS_END
    head, _, rest = text.partition(DOCS_BEGIN)
    _, _, foot = rest.partition(DOCS_END)
    page.write_text(head + generated + foot)
    return page


# --- main ----------------------------------------------------------------------------------------


def _sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _resources() -> Iterator[Resources]:
    res = Resources()
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        yield res
    finally:
        # A second Ctrl-C must not cut the cleanup short.
        with _ignoring_interrupts():
            res.close()
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _ignoring_interrupts() -> Iterator[None]:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_point(
    res: Resources,
    point: Point,
    args: argparse.Namespace,
    qemu: str | None,
    elf: Path,
    raw: list[dict[str, Any]],
) -> dict[str, Any]:
    """Measure both VMMs at ``point``: their summaries (and, appended to ``raw``, every stall
    the observer saw with the hand-offs' timestamps)."""
    log(f"point {point.label}")
    result: dict[str, Any] = {
        "label": point.label,
        "memory": point.memory,
        "memory_mib": point.mib,
        "vcpus": point.vcpus,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "handoffs": [],
    }
    guests: list[Callable[[Path], Guest]] = [
        lambda shm: IntrahostGuest(res, point, args.progress, shm)
    ]
    if qemu is not None:
        guests.append(lambda shm: QemuGuest(res, point, args.progress, shm, qemu, elf))
    for make in guests:
        shm = res.file(Path(f"/dev/shm/{res.workdir.name}-{point.memory}-{point.vcpus}"))
        guest = make(shm)
        try:
            handoffs, stalls = measure(guest, point, args.progress, args.repeat)
        except BenchError as e:
            log(f"  {guest.name}: FAILED: {e}")
            result[f"{guest.name}_error"] = str(e)
            continue
        finally:
            res.end_processes()  # nothing of this point may outlive it
            res.remove_files()
        result[guest.name] = summarize(handoffs, guest.name)
        result["handoffs"] += [h.to_dict() for h in handoffs]
        raw.append(
            {
                "point": point.label,
                "vmm": guest.name,
                "progress": args.progress,
                "handoffs": [h.timestamps() for h in handoffs],
                "stalls": [dataclasses.astuple(s) for s in stalls],
            }
        )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256M and 16G, 3 hand-offs each")
    parser.add_argument("--repeat", type=int, help="hand-offs per point and VMM (default 10)")
    parser.add_argument("--memory", help="comma-separated sizes (default 256M,4G,16G)")
    parser.add_argument("--vcpus", help="comma-separated vCPU counts (default 1,4)")
    parser.add_argument("--progress", type=int, default=DEFAULT_PROGRESS, help="guest progress=")
    parser.add_argument("--no-qemu", action="store_true", help="measure intrahost only")
    parser.add_argument("--no-install", action="store_true", help="don't apt-get install QEMU")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="output directory")
    parser.add_argument("--docs", action="store_true", help="update docs/results.md and PNGs")
    parser.add_argument(
        "--floor-count",
        type=int,
        help="hand-offs of the C floor per vCPU count and mode, in the same run (default 100, "
        "--quick 30; 0 = none)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the bench, both VMMs and the observer at this niceness, e.g. -10 on a host "
        "busy with other work (lowering it needs root)",
    )
    args = parser.parse_args(argv)
    if args.nice:
        # Inherited by every process the bench starts: both VMMs alike, and the observer.
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    if args.progress <= 0 or args.progress & (args.progress - 1):
        parser.error("--progress must be a power of two")
    memory = (
        args.memory.split(",") if args.memory else list(QUICK_MEMORY if args.quick else FULL_MEMORY)
    )
    vcpus = [int(v) for v in args.vcpus.split(",")] if args.vcpus else list(VCPUS)
    args.repeat = args.repeat or (QUICK_REPEAT if args.quick else FULL_REPEAT)
    points = [Point(m, v) for m in memory for v in vcpus]

    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        sys.exit("peers.py needs read and write access to /dev/kvm")
    qemu = None if args.no_qemu else find_qemu(install=not args.no_install)
    version = qemu_version(qemu) if qemu else None
    elf = build_guest("counter")
    args.out.mkdir(parents=True, exist_ok=True)
    started, t_start = time.strftime("%Y-%m-%d %H:%M %Z"), time.monotonic()
    loadavg_before = [round(x, 2) for x in os.getloadavg()]
    log(f"peers: {len(points)} points x {args.repeat} hand-offs; QEMU: {version or 'skipped'}")

    results: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    try:
        with _resources() as res:
            for point in points:
                results.append(run_point(res, point, args, qemu, elf, raw))
        floor_count = args.floor_count
        if floor_count is None:
            floor_count = 30 if args.quick else 100
        floors = run_floors(vcpus, floor_count, log=log)
    except KeyboardInterrupt:
        log("interrupted: every VMM and memory file of this run has been removed")
        return 130

    report: dict[str, Any] = {
        "date": started,
        "command": "python bench/peers.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "host": host_info(),
        "qemu": version,
        "config": {
            "repeat": args.repeat,
            "progress": args.progress,
            "poll_ms": POLL_S * 1000,
            "observer_threshold_us": 200.0,
            "observer_interval_us": OBSERVER_INTERVAL_US,
            "nice": args.nice,
        },
        "loadavg_before": loadavg_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "duration_s": round(time.monotonic() - t_start, 1),
        "points": results,
        "floor": floors,
    }
    json_path = args.out / "peers.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "peers-stalls.json").write_text(json.dumps(raw) + "\n")
    suffix = f" ({report['host']['cpus']} host CPUs, n={args.repeat})"
    pngs = draw(results, args.out, suffix, floors)
    print(tables(results, floors))
    print()
    print(f"wrote {json_path} and {', '.join(str(p) for p in pngs)}")
    print(
        f"run took {report['duration_s'] / 60:.1f} min; load average {report['loadavg_before']}"
        f" -> {report['loadavg_after']}"
    )
    if args.docs:
        print(f"updated {update_docs(report, pngs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
