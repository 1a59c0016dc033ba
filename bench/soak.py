"""Soak: many consecutive hand-offs of one running guest, each to a new VMM process.

A 4-vCPU counter guest boots under ``intrahost run`` with its memory in a file under
/dev/shm, then ``intrahost upgrade`` hands it on ``--count`` times (default 1000), each time to
a freshly started VMM. Measured for every hand-off:

- the blackout the VMM reports (pause to resume; ``query-migrate``), the guest-observed pause
  (its largest RDTSC gap over the upgrade command, read with the counter guest's probe: the
  gap record is reset before the command and read once every vCPU counted again after it),
  the wall time of the upgrade command;
- the **progress blackout**: bench/observer.py samples the counters through the memory file;
  the longest interval inside the upgrade in which *no* vCPU's counter moved;
- the new VMM at the same point of its life as every other one (the upgrade returned, plus
  ``--settle`` seconds, before anything else talks to it): its open fds (/proc/PID/fd), its
  VmRSS and RssAnon (/proc/PID/status).

Checked: the counters, read through the memory file around every hand-off, never go back and
all advance across it; at the end the guest is paused and every vCPU's region verifies
(``layout.verify_region``: its checksum matches its counter); every VMM but the last has exited.

Pass criteria (printed, and in the JSON): those checks; the last VMM's fd count and VmRSS
within 5% of the first VMM's — the first of the chain, the one the first hand-off started;
the VMM that booted the guest (the "origin") is reported too, measured the same time after
the guest started counting, but it is not comparable: it loaded the guest through its own
mapping of guest memory, so more of that memory counts in its RSS (about 4 MiB here); the
blackout p99 of the last 10% of hand-offs at most 1.5 x that of the first 10%, with 1 ms of
slack for a busy 2-CPU host (``--drift-factor``, ``--drift-slack-ms``).

    python bench/soak.py                # 1000 hand-offs: about 15 minutes on an idle host
    python bench/soak.py --count 200    # about 3 minutes

Every VMM of the chain is a new process that imports intrahost afresh: run it on a tree nobody
edits meanwhile (or on a copy, with PYTHONPATH pointing at it), or an edit half-way through
the run becomes a failed upgrade.

Writes bench/out/soak.json and bench/out/soak.png (blackout per hand-off; fds and RSS per VMM).
Not part of ``make test``; tests/migration/test_soak.py runs a short version.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
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
from observer import Observer, Stall

from intrahost.service.qmp_client import QmpClient
from intrahost.vmm.guests import layout
from intrahost.vmm.guests.probe import CounterProbe, GuestNotCounting

HERE = Path(__file__).resolve().parent
INTRAHOST = [sys.executable, "-m", "intrahost"]
#: No progress lines on the UART: a line is ~2 ms of exits during which that vCPU stands still.
NO_LINES = 1 << 40
#: The observer sleeps this long between samples: spinning would take a CPU from the guest.
OBSERVER_INTERVAL_US = 50.0
#: Stalls shorter than this are not recorded by the observer.
OBSERVER_THRESHOLD_US = 1000.0
#: fds and RSS may differ by this fraction between the first and the last VMM.
RESOURCE_TOLERANCE = 0.05


# --- measurements --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Footprint:
    """A VMM process's resources at one point of its life."""

    pid: int
    fds: int
    rss_kib: int
    rss_anon_kib: int
    threads: int

    @classmethod
    def of(cls, pid: int) -> Footprint:
        fields: dict[str, int] = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "Threads"):
                    fields[key] = int(value.split()[0])
        return cls(
            pid=pid,
            fds=len(os.listdir(f"/proc/{pid}/fd")),
            rss_kib=fields["VmRSS"],
            rss_anon_kib=fields["RssAnon"],
            threads=fields["Threads"],
        )


@dataclass(frozen=True)
class Handoff:
    index: int
    pid: int
    blackout_us: int
    guest_pause_us: float | None
    progress_us: float | None
    wall_s: float
    footprint: Footprint

    def row(self) -> dict[str, Any]:
        row = asdict(self)
        row.update(row.pop("footprint"))
        row["pid"] = self.pid
        return row


def all_stalled_us(stalls: Sequence[Stall], vcpus: int, t0: int, t1: int) -> float | None:
    """The longest interval inside [t0, t1] during which every vCPU stood still (µs), from the
    observer's per-vCPU stalls; None if there was none above the observer's threshold."""
    events: list[tuple[int, int]] = []
    for s in stalls:
        start, end = max(s.start_ns, t0), min(s.end_ns, t1)
        if start < end:
            events += [(start, 1), (end, -1)]
    events.sort(key=lambda e: (e[0], e[1]))  # ends before starts at the same instant
    stalled, since, longest = 0, 0, 0
    for at, step in events:
        if stalled == vcpus:
            longest = max(longest, at - since)
        stalled += step
        if stalled == vcpus:
            since = at
    return longest / 1000 if longest else None


# --- the chain -----------------------------------------------------------------------------------


class Chain:
    """The guest and the VMM that holds it now."""

    def __init__(self, ws: Workspace, args: argparse.Namespace) -> None:
        self.ws = ws
        self.args = args
        self.api = ws.path("api.sock")
        self.shm = ws.shm_file(f"{args.memory}-soak")
        self.log = ws.path("vmms.log")
        self.counters: GuestCounters | None = None
        self.probe: CounterProbe | None = None
        self.pids: list[int] = []

    def boot(self) -> Footprint:
        a = self.args
        proc = self.ws.spawn(
            [*INTRAHOST, "run", "--memory", a.memory, "--vcpus", str(a.vcpus),
             "--memory-path", str(self.shm), "--guest-args", f"progress={NO_LINES}",
             "--serial", "none", "--api-socket", str(self.api)],
            "vmm-0",
        )  # fmt: skip
        wait_until(self.api.exists, 30, "the first VMM's control socket", proc)
        self.counters = GuestCounters(self.shm, a.vcpus)
        self.probe = CounterProbe.open(self.shm)
        counters = self.counters
        wait_until(lambda: counters.running() == a.vcpus, 30, "the guest's vCPUs to count", proc)
        self.pids.append(proc.pid)
        time.sleep(a.settle)
        return Footprint.of(proc.pid)

    def upgrade(self) -> tuple[int, dict[str, Any], float]:
        """Hand the guest to a new VMM; (its pid, the breakdown with the guest-observed pause,
        wall seconds)."""
        assert self.probe is not None
        env = os.environ | {"TMPDIR": str(self.ws.dir)}  # its temporary directories
        self.probe.reset_gaps()
        before = self.probe.status()
        t0 = time.monotonic()
        result = subprocess.run(
            [*INTRAHOST, "upgrade", "--api-socket", str(self.api), "--output", str(self.log)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        wall = time.monotonic() - t0
        if result.returncode != 0:
            raise BenchError(f"upgrade {len(self.pids)} failed: {result.stderr.strip()}")
        match = re.search(r"new VMM pid (\d+)", result.stdout)
        if match is None:
            raise BenchError(f"upgrade printed no pid: {result.stdout!r}")
        pid = int(match.group(1))
        self.pids.append(pid)
        breakdown = parse_breakdown(result.stdout)
        try:
            breakdown["guest_pause_us"] = (
                self.probe.observed_pause_us(before) if before is not None else None
            )
        except GuestNotCounting as e:
            raise BenchError(f"after upgrade {len(self.pids) - 1}: {e}") from None
        return pid, breakdown, wall

    def verify(self) -> list[str]:
        """Pause the guest, check every vCPU's region, resume; the problems found."""
        assert self.counters is not None
        problems = []
        mem = _map(self.shm)
        try:
            with QmpClient(self.api) as qmp:
                qmp.execute("stop")
                try:
                    for vcpu in range(self.args.vcpus):
                        try:
                            layout.verify_region(mem, vcpu)
                        except (layout.GuestMemoryCorrupt, layout.GuestLayoutError) as e:
                            problems.append(f"vCPU {vcpu}: {e}")
                finally:
                    qmp.execute("cont")
        finally:
            mem.close()
        return problems

    def leftovers(self) -> list[int]:
        """VMMs of the chain, other than the last, that still run."""
        return [pid for pid in self.pids[:-1] if _alive(pid)]

    def stop(self) -> None:
        """Quit the VMM that holds the guest; kill any VMM of this run still left (a failed
        upgrade can leave its new VMM waiting)."""
        if self.pids and _alive(self.pids[-1]):
            with contextlib.suppress(Exception), QmpClient(self.api, timeout=5) as qmp:
                qmp.execute("quit")
            deadline = time.monotonic() + 10
            while _alive(self.pids[-1]) and time.monotonic() < deadline:
                time.sleep(0.05)
        for pid in self.strays():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        if self.probe is not None:
            self.probe.close()
            self.probe = None

    def strays(self) -> list[int]:
        """Live VMM processes of this run: their command lines name its directory."""
        mark = str(self.ws.dir).encode()
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                with contextlib.suppress(OSError):
                    cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                    if mark in cmdline and b"intrahost" in cmdline and _alive(int(entry)):
                        found.append(int(entry))
        return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _map(path: Path) -> Any:
    import mmap

    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)


def parse_breakdown(text: str) -> dict[str, Any]:
    """The numbers of ``intrahost upgrade``'s "blackout: pause 1 µs, ..., total 9 µs" line."""
    line = next((li for li in text.splitlines() if li.startswith("blackout:")), "")
    values: dict[str, Any] = {f"{k}_us": int(v) for k, v in re.findall(r"(\w+) (\d+) µs", line)}
    if "total_us" not in values:
        raise BenchError(f"no blackout in the upgrade's output: {text!r}")
    return values


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Findings:
    """What went wrong, by check."""

    counters: list[str]
    regions: list[str]
    leftovers: list[int]

    def all(self) -> list[str]:
        left = [f"VMMs of the chain still running: {self.leftovers}"] if self.leftovers else []
        return [*self.counters, *self.regions, *left]


def run(args: argparse.Namespace) -> dict[str, Any]:
    handoffs: list[Handoff] = []
    found = Findings([], [], [])
    with Workspace("soak") as ws:
        chain = Chain(ws, args)
        try:
            origin = chain.boot()
            counters = chain.counters
            assert counters is not None
            observer = Observer(
                str(chain.shm), args.vcpus, OBSERVER_THRESHOLD_US, interval_us=args.observer_us
            )
            observer.start()
            stalls: list[Stall] = []
            try:
                started = time.monotonic()
                for i in range(1, args.count + 1):
                    before = counters.counters()
                    t0 = time.monotonic_ns()
                    pid, breakdown, wall = chain.upgrade()
                    t1 = time.monotonic_ns()
                    footprint_at = time.monotonic() + args.settle
                    after = counters.counters()
                    back = [v for v, (a, b) in enumerate(zip(before, after, strict=True)) if b < a]
                    still = [
                        v for v, (a, b) in enumerate(zip(before, after, strict=True)) if b == a
                    ]
                    if back:
                        found.counters.append(f"hand-off {i}: counters of vCPUs {back} went back")
                    if still:
                        # The upgrade takes hundreds of ms: every vCPU must have moved.
                        found.counters.append(f"hand-off {i}: vCPUs {still} did not advance")
                    stalls = observer.collect()
                    progress = all_stalled_us(stalls, args.vcpus, t0, t1)
                    time.sleep(max(0.0, footprint_at - time.monotonic()))
                    footprint = Footprint.of(pid)
                    handoffs.append(
                        Handoff(i, pid, breakdown["total_us"], breakdown["guest_pause_us"],
                                progress, round(wall, 3), footprint)
                    )  # fmt: skip
                    if i % args.report_every == 0 or i == args.count:
                        _progress_line(i, args.count, started, handoffs)
                    if found.counters and args.stop_on_problem:
                        break
            finally:
                observer.stop()
            found.regions = chain.verify()
            found.leftovers = chain.leftovers()
        except BenchError:
            # Keep the VMMs' output: the workspace goes away with its directory.
            args.out.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                (args.out / "soak-vmms.log").write_bytes(chain.log.read_bytes())
                print(f"the VMMs' output is in {args.out / 'soak-vmms.log'}", file=sys.stderr)
            raise
        finally:
            chain.stop()
    return summarise(args, origin, handoffs, found)


def _progress_line(i: int, count: int, started: float, handoffs: Sequence[Handoff]) -> None:
    first, last = handoffs[0].footprint, handoffs[-1].footprint
    recent = [h.blackout_us / 1000 for h in handoffs[-50:]]
    print(
        f"  {i:>5}/{count}  {time.monotonic() - started:7.1f} s  blackout median "
        f"{median(recent):6.2f} ms (last 50)  fds {last.fds} (first {first.fds})  "
        f"RSS {last.rss_kib} KiB (first {first.rss_kib})",
        flush=True,
    )


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else float("inf")


def summarise(
    args: argparse.Namespace, origin: Footprint, handoffs: Sequence[Handoff], found: Findings
) -> dict[str, Any]:
    n = len(handoffs)
    tenth = max(1, n // 10)
    head = [h.blackout_us / 1000 for h in handoffs[:tenth]]
    tail = [h.blackout_us / 1000 for h in handoffs[-tenth:]]
    p99_head, p99_tail = percentile(head, 99), percentile(tail, 99)
    drift_limit = args.drift_factor * p99_head + args.drift_slack_ms
    first = handoffs[0].footprint if handoffs else origin
    last = handoffs[-1].footprint if handoffs else origin
    resources = {
        "origin": asdict(origin),
        "first": asdict(first),
        "last": asdict(last),
        "fds_ratio": _ratio(last.fds, first.fds),
        "rss_ratio": _ratio(last.rss_kib, first.rss_kib),
        "rss_anon_ratio": _ratio(last.rss_anon_kib, first.rss_anon_kib),
        "fds_ratio_vs_origin": _ratio(last.fds, origin.fds),
        "rss_ratio_vs_origin": _ratio(last.rss_kib, origin.rss_kib),
    }
    within = [
        abs(resources[k] - 1) <= RESOURCE_TOLERANCE
        for k in ("fds_ratio", "rss_ratio")
    ]  # fmt: skip
    checks = {
        "counters_advance_never_back": not found.counters,
        "regions_verify": not found.regions,
        "only_the_last_vmm_left": not found.leftovers,
        "fds_within_5pct": within[0],
        "rss_within_5pct": within[1],
        "blackout_p99_no_drift": p99_tail <= drift_limit,
        "all_handoffs_done": n == args.count,
    }

    def series(key: str) -> list[float]:
        return [v for h in handoffs if (v := getattr(h, key)) is not None]

    blackout = [h.blackout_us / 1000 for h in handoffs]
    return {
        "bench": "soak",
        "host": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
        },
        "config": {
            "count": args.count,
            "vcpus": args.vcpus,
            "memory": args.memory,
            "settle_s": args.settle,
            "drift_factor": args.drift_factor,
            "drift_slack_ms": args.drift_slack_ms,
            "observer_interval_us": args.observer_us,
        },
        "handoffs": n,
        "blackout_ms": {
            "median": median(blackout) if blackout else None,
            "p99": percentile(blackout, 99) if blackout else None,
            "max": max(blackout, default=None),
            "first_10pct_median": median(head) if head else None,
            "last_10pct_median": median(tail) if tail else None,
            "first_10pct_p99": p99_head,
            "last_10pct_p99": p99_tail,
            "drift_limit_p99": drift_limit,
        },
        "guest_pause_ms_median": _median_ms(series("guest_pause_us")),
        "progress_blackout_ms_median": _median_ms(series("progress_us")),
        "progress_blackout_ms_p99": _p99_ms(series("progress_us")),
        "upgrade_wall_s_median": median(series("wall_s")) if handoffs else None,
        "resources": resources,
        "problems": found.all(),
        "checks": checks,
        "passed": all(checks.values()),
        "rows": [h.row() for h in handoffs],
    }


def _median_ms(values: Sequence[float]) -> float | None:
    return round(median(values) / 1000, 3) if values else None


def _p99_ms(values: Sequence[float]) -> float | None:
    return round(percentile(values, 99) / 1000, 3) if values else None


# --- output --------------------------------------------------------------------------------------


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    index = [r["index"] for r in rows]
    fig, (ax, ax2) = plt.subplots(
        2, 1, figsize=(10, 7.5), dpi=110, sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    blackout = [r["blackout_us"] / 1000 for r in rows]
    ax.scatter(index, blackout, s=6, color="#1f6fb4", label="VMM blackout (pause → resume)")
    progress = [(r["index"], r["progress_us"] / 1000) for r in rows if r["progress_us"]]
    if progress:
        xs, ys = zip(*progress, strict=True)
        ax.scatter(xs, ys, s=6, color="#e15759", alpha=0.6,
                   label="progress blackout (no vCPU moved; observer)")  # fmt: skip
    window = 50
    if len(blackout) >= window:
        rolling = [median(blackout[i - window : i]) for i in range(window, len(blackout) + 1)]
        ax.plot(index[window - 1 :], rolling, color="#0b3c66", linewidth=1.5,
                label=f"VMM blackout, median of the last {window}")  # fmt: skip
    b = result["blackout_ms"]
    n = len(rows)
    tenth = max(1, n // 10)
    ax.hlines(b["first_10pct_p99"], 1, tenth, colors="#333", linestyles="--",
              label=f"p99 first 10%: {b['first_10pct_p99']:.2f} ms")  # fmt: skip
    ax.hlines(b["last_10pct_p99"], n - tenth + 1, n, colors="#333", linestyles=":",
              label=f"p99 last 10%: {b['last_10pct_p99']:.2f} ms")  # fmt: skip
    ax.set_ylabel("blackout (ms)")
    ax.set_ylim(bottom=0)
    cfg = result["config"]
    verdict = "passed" if result["passed"] else "FAILED"
    ax.set_title(
        f"{n} consecutive hand-offs of a {cfg['vcpus']}-vCPU counter guest "
        f"({cfg['memory']}) — {verdict}"
    )
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fds = [r["fds"] for r in rows]
    rss = [r["rss_kib"] / 1024 for r in rows]
    first = result["resources"]["first"]
    ax2.plot(index, rss, color="#59a14f", label="VmRSS of each new VMM (MiB)")
    ax2.axhspan(first["rss_kib"] / 1024 * 0.95, first["rss_kib"] / 1024 * 1.05,
                color="#59a14f", alpha=0.12, label="VmRSS of the first VMM ± 5%")  # fmt: skip
    ax2.set_ylabel("VmRSS (MiB)")
    ax2.set_xlabel("hand-off")
    ax3 = ax2.twinx()
    ax3.plot(index, fds, color="#b07aa1", label="open fds of each new VMM")
    ax3.axhline(first["fds"], color="#b07aa1", linestyle="--", linewidth=0.8,
                label="open fds of the first VMM")  # fmt: skip
    ax3.set_ylabel("open fds")
    lo = min([*fds, first["fds"]])
    hi = max([*fds, first["fds"]])
    ax3.set_ylim(lo - 5, hi + 5)
    handles = ax2.get_legend_handles_labels()[0] + ax3.get_legend_handles_labels()[0]
    ax2.legend(handles=handles, loc="lower right", fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(result: dict[str, Any]) -> str:
    b = result["blackout_ms"]
    r = result["resources"]
    lines = [
        f"hand-offs: {result['handoffs']} / {result['config']['count']}",
        f"blackout (VMM): median {b['median']:.2f} ms, p99 {b['p99']:.2f} ms, max "
        f"{b['max']:.2f} ms; p99 first 10% {b['first_10pct_p99']:.2f} ms, last 10% "
        f"{b['last_10pct_p99']:.2f} ms (limit {b['drift_limit_p99']:.2f})",
        f"guest-observed pause: median {result['guest_pause_ms_median']} ms; progress "
        f"blackout: median {result['progress_blackout_ms_median']} ms, p99 "
        f"{result['progress_blackout_ms_p99']} ms; upgrade command: median "
        f"{result['upgrade_wall_s_median']} s",
        f"first VMM: {r['first']['fds']} fds, VmRSS {r['first']['rss_kib']} KiB; last: "
        f"{r['last']['fds']} fds, {r['last']['rss_kib']} KiB (ratios: fds {r['fds_ratio']}, "
        f"RSS {r['rss_ratio']}, RssAnon {r['rss_anon_ratio']}); the VMM that booted the guest: "
        f"{r['origin']['fds']} fds, {r['origin']['rss_kib']} KiB",
        "checks: "
        + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in result["checks"].items()),
    ]
    lines += [f"problem: {p}" for p in result["problems"][:20]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=1000, help="hand-offs (default 1000)")
    p.add_argument("--vcpus", type=int, default=4)
    p.add_argument("--memory", default="64M")
    p.add_argument(
        "--settle",
        type=float,
        default=0.3,
        help="seconds after a VMM took the guest before its fds and RSS are read",
    )
    p.add_argument("--drift-factor", type=float, default=1.5)
    p.add_argument("--drift-slack-ms", type=float, default=1.0)
    p.add_argument("--observer-us", type=float, default=OBSERVER_INTERVAL_US)
    p.add_argument("--report-every", type=int, default=50)
    p.add_argument("--stop-on-problem", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "out")
    p.add_argument(
        "--replot", action="store_true", help="only redraw soak.png from the soak.json in --out"
    )
    args = p.parse_args(argv)  # fmt: skip
    if args.replot:
        plot(json.loads((args.out / "soak.json").read_text()), args.out / "soak.png")
        return 0
    exit_on_sigterm()
    print(f"soak: {args.count} hand-offs of a {args.vcpus}-vCPU counter guest ({args.memory})")
    try:
        result = run(args)
    except BenchError as e:
        print(f"soak: {e}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "soak.png")
    print(report(result))
    print(f"wrote {args.out / 'soak.json'} and {args.out / 'soak.png'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
