"""Start-up and end-to-end upgrade: how long until a new VMM listens, and until it runs the guest.

Measured, ``-n`` times each, medians (and the largest) printed:

- **CLI start-up**: ``intrahost --version``, process start to exit;
- **spawn -> listening**: ``intrahost run --incoming`` started until its migration socket
  exists (inside each two-process hand-off below);
- **two-process hand-off, end to end**: the new VMM started (``run --incoming``), then
  ``migrate`` on the old VMM's control socket, until the old VMM has exited; split into
  start -> listening, the ``migrate`` command, completed -> old gone;
- **``intrahost upgrade``, end to end**: the command's wall time (its own start-up included);
  it must return with the old VMM gone.

The guest is the built-in counter guest (256 MiB, 1 vCPU, memory under /dev/shm), handed along
one chain of VMMs, alternately in both forms; after each hand-off the bench checks that its
counter still moves.

**A/B**: ``--ab OTHER_TREE`` runs the intrahost command from two source trees, interleaved
(A = OTHER_TREE, B = the tree this bench is in): each round measures A then B, and the first
hand-off after a switch (whose old VMM is the other tree's) is not counted.

**QEMU**: with qemu-system-x86_64 installed, the same end-to-end figure is taken for QEMU 7.2
with bench/peers.py's own QEMU set-up (local migration with x-ignore-shared on a shared memory
backend, then ``quit`` on the old one), so that the ratio compares like with like. ``--no-qemu``
skips it.

    python bench/startup.py                     # 10 of each: about a minute
    python bench/startup.py -n 20 --ab /path/to/other/checkout

The children run with their modules compiled and cached (as an installed intrahost has them;
the cache is under /var/tmp/intrahost-bench-pycache, not in the tree), even where
PYTHONDONTWRITEBYTECODE is set: compiling the sources on every start would double the figures.

Writes bench/out/startup.json and bench/out/startup.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import BenchError, GuestCounters, Workspace, exit_on_sigterm, median, wait_until

from intrahost.service.qmp_client import QmpClient, QmpConnectionError

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MEMORY = "256M"
#: Where the children's compiled modules are cached (PYTHONPYCACHEPREFIX).
PYCACHE = Path("/var/tmp/intrahost-bench-pycache")
#: No progress line from the guest during the bench.
NO_LINES = 1 << 40


def pid_alive(pid: int) -> bool:
    """Running (a zombie has exited: its parent may just be slow to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@dataclass
class Variant:
    """One source tree of intrahost: its commands run with PYTHONPATH pointing at it."""

    label: str
    tree: Path

    def env(self) -> dict[str, str]:
        """PYTHONPATH at the tree; compiled modules cached (as an installed package has them),
        under a directory of the bench's own so that the tree stays clean."""
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        return env | {"PYTHONPATH": str(self.tree), "PYTHONPYCACHEPREFIX": str(PYCACHE)}

    def compile(self) -> None:
        """Fill the bytecode cache before anything is timed."""
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", str(self.tree / "intrahost")],
            check=True,
            env=self.env(),
        )

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "intrahost", *args]


@dataclass
class Figures:
    cli_ms: list[float] = field(default_factory=list)
    listen_ms: list[float] = field(default_factory=list)
    migrate_cmd_ms: list[float] = field(default_factory=list)
    old_gone_ms: list[float] = field(default_factory=list)
    two_process_ms: list[float] = field(default_factory=list)
    upgrade_ms: list[float] = field(default_factory=list)


class Chain:
    """The counter guest and the VMM that runs it now (our child, or a pid `upgrade` started)."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.shm = ws.shm_file(MEMORY)
        self.generation = 0
        self.api = ws.path("api-0.sock")
        self.current: subprocess.Popen[str] | int | None = None
        self.adopted: list[int] = []
        self.counters: GuestCounters | None = None

    def alive(self, vmm: subprocess.Popen[str] | int | None = None) -> bool:
        vmm = self.current if vmm is None else vmm
        if isinstance(vmm, subprocess.Popen):
            return vmm.poll() is None
        return vmm is not None and pid_alive(vmm)

    def start(self, variant: Variant) -> None:
        argv = variant.argv(
            "run", "--memory", MEMORY, "--guest", "counter", "--guest-args", f"progress={NO_LINES}"
        )
        argv += ["--memory-path", str(self.shm), "--api-socket", str(self.api)]
        argv += ["--serial", f"file:{self.ws.path('serial.log')}"]
        self.current = self._spawn(argv, "vmm-0", variant)
        wait_until(self.shm.exists, 60, "the memory file", self.current)
        self.counters = GuestCounters(self.shm, 1)
        wait_until(lambda: self.counters is not None and self.counters.running() == 1, 60,
                   "the guest to count", self.current)  # fmt: skip

    def _spawn(self, argv: list[str], name: str, variant: Variant) -> subprocess.Popen[str]:
        return self.ws.spawn(argv, name, env=variant.env())

    def check_counting(self) -> None:
        assert self.counters is not None
        before = self.counters.counter()
        wait_until(lambda: self.counters is not None and self.counters.counter() != before, 10,
                   "the guest to count after the hand-off")  # fmt: skip

    def two_process(self, variant: Variant) -> tuple[float, float, float, float]:
        """start -> listening, the migrate command, completed -> old gone, and their sum (ms)."""
        self.generation += 1
        gen = self.generation
        mig, api = self.ws.path(f"mig-{gen}.sock"), self.ws.path(f"api-{gen}.sock")
        old = self.current
        t_spawn = time.monotonic_ns()
        argv = variant.argv("run", "--incoming", f"unix:{mig}", "--api-socket", str(api))
        new = self._spawn(argv, f"vmm-{gen}", variant)
        wait_until(mig.exists, 60, "the new VMM to listen", new, interval=0.0005)
        t_listen = time.monotonic_ns()
        with QmpClient(self.api, timeout=30.0) as qmp:
            qmp.execute("migrate", uri=f"unix:{mig}")
            while (status := qmp.execute("query-migrate").get("status")) not in (
                "completed",
                "failed",
            ):
                time.sleep(0.0005)
            t_done = time.monotonic_ns()
        if status != "completed":
            raise BenchError(f"migration {status}\n{self.ws.log_tail(f'vmm-{gen}')}")
        wait_until(lambda: not self.alive(old), 30, "the old VMM to exit", interval=0.0005)
        t_end = time.monotonic_ns()
        if isinstance(old, subprocess.Popen):
            self.ws.stop(old)
        self.current, self.api = new, api
        self.check_counting()
        ms = [(b - a) / 1e6 for a, b in ((t_spawn, t_listen), (t_listen, t_done), (t_done, t_end))]
        return ms[0], ms[1], ms[2], (t_end - t_spawn) / 1e6

    def upgrade(self, variant: Variant) -> float:
        """`intrahost upgrade`'s wall time (ms); the old VMM must be gone when it returns."""
        old = self.current
        t0 = time.monotonic_ns()
        done = subprocess.run(
            variant.argv("upgrade", "--api-socket", str(self.api)),
            capture_output=True,
            text=True,
            timeout=120,
            start_new_session=True,
            env=variant.env(),
        )
        elapsed = (time.monotonic_ns() - t0) / 1e6
        out = done.stdout + done.stderr
        m = re.search(r"new VMM pid (\d+) serves", out)
        if m is not None:
            self.adopted.append(int(m.group(1)))
        if done.returncode != 0 or m is None:
            raise BenchError(f"intrahost upgrade failed ({done.returncode}): {out.strip()}")
        if self.alive(old):
            raise BenchError("intrahost upgrade returned while the old VMM still runs")
        if isinstance(old, subprocess.Popen):
            self.ws.stop(old)
        self.current = int(m.group(1))
        self.check_counting()
        return elapsed

    def close(self) -> None:
        if self.counters is not None:
            self.counters.close()
        if self.alive():
            with (
                contextlib.suppress(QmpConnectionError, OSError),
                QmpClient(self.api, timeout=10) as q,
            ):
                q.execute("quit")
            vmm = self.current
            with contextlib.suppress(BenchError):
                wait_until(lambda: not self.alive(vmm), 10, "the VMM to quit")
        for pid in self.adopted:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def cli_startup(variant: Variant) -> float:
    t0 = time.monotonic_ns()
    subprocess.run(variant.argv("--version"), check=True, capture_output=True, env=variant.env())
    return (time.monotonic_ns() - t0) / 1e6


def measure_intrahost(variants: list[Variant], n: int) -> dict[str, Figures]:
    figures = {v.label: Figures() for v in variants}
    with Workspace("startup") as ws:
        chain = Chain(ws)
        try:
            chain.start(variants[0])
            running = variants[0]
            for k in range(n):
                for v in variants:
                    if v is not running:
                        chain.two_process(v)  # the old VMM becomes this variant's: not counted
                        running = v
                    f = figures[v.label]
                    f.cli_ms.append(cli_startup(v))
                    listen, cmd, gone, total = chain.two_process(v)
                    f.listen_ms.append(listen)
                    f.migrate_cmd_ms.append(cmd)
                    f.old_gone_ms.append(gone)
                    f.two_process_ms.append(total)
                    f.upgrade_ms.append(chain.upgrade(v))
                print(f"  round {k + 1}/{n}", file=sys.stderr, flush=True)
        finally:
            chain.close()
    return figures


def measure_qemu(n: int) -> list[float] | None:
    """QEMU's end-to-end (new process started -> old one gone), with bench/peers.py's set-up."""
    import peers

    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return None
    from intrahost.vmm.guests.build import build_guest

    res = peers.Resources()
    point = peers.Point(MEMORY, 1)
    shm = res.file(Path(f"/dev/shm/{res.workdir.name}-qemu"))
    guest = peers.QemuGuest(res, point, NO_LINES, shm, qemu, build_guest("counter"))
    try:
        guest.start()
        peers.wait_until("the memory file", shm.exists, 30)
        counters = peers.Counters(shm, 1)
        try:
            counters.wait_counting(60, guest.alive)
            e2e = []
            for k in range(n):
                before = counters.read()
                e2e.append(guest.handoff(k).e2e_ms)
                counters.check_continued(before)
        finally:
            counters.close()
        guest.stop()
        return e2e
    finally:
        res.close()


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "median": round(median(values), 2),
        "max": round(max(values), 2),
        "values": [round(v, 2) for v in values],
    }


MEASURES: tuple[tuple[str, str], ...] = (
    ("cli_ms", "CLI start-up (--version)"),
    ("listen_ms", "spawn -> listening"),
    ("migrate_cmd_ms", "migrate command"),
    ("old_gone_ms", "completed -> old gone"),
    ("two_process_ms", "two-process, end to end"),
    ("upgrade_ms", "intrahost upgrade, end to end"),
)


def plot(rows: list[dict[str, Any]], series: list[str], path: Path) -> None:
    import plot as plots

    colours = ["#9aa5b1", "#1f6fb4", "#d1495b"]
    plots.grouped_bars(
        rows,
        [(s, s, colours[i % len(colours)]) for i, s in enumerate(series)],
        path,
        "Start-up and end-to-end upgrade (medians, 256 MiB x 1 vCPU)",
        "ms",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10, help="runs of each (default 10)")
    parser.add_argument("--ab", type=Path, help="another source tree to compare with (A)")
    parser.add_argument("--no-qemu", action="store_true", help="do not measure QEMU")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="output directory")
    args = parser.parse_args()
    exit_on_sigterm()

    variants = [Variant("B (this tree)" if args.ab else "intrahost", REPO)]
    if args.ab:
        variants.insert(0, Variant(f"A ({args.ab})", args.ab.resolve()))
    for v in variants:
        v.compile()
    load_before = os.getloadavg()
    figures = measure_intrahost(variants, args.n)
    qemu = None if args.no_qemu else measure_qemu(args.n)

    result: dict[str, Any] = {
        "host": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },
        "memory": MEMORY,
        "vcpus": 1,
        "runs": args.n,
        "variants": {
            v.label: {key: summary(getattr(figures[v.label], key)) for key, _ in MEASURES}
            for v in variants
        },
        "qemu_end_to_end_ms": summary(qemu) if qemu else None,
    }
    print(f"\n{'median (max), ms':<32}" + "".join(f"{v.label[:24]:>26}" for v in variants))
    rows = []
    for key, title in MEASURES:
        cells = [result["variants"][v.label][key] for v in variants]
        print(f"{title:<32}" + "".join(f"{c['median']:>16.1f} ({c['max']:>6.1f}) " for c in cells))
        medians = {v.label: c["median"] for v, c in zip(variants, cells, strict=True)}
        rows.append({"label": title} | medians)
    series = [v.label for v in variants]
    if qemu:
        q = result["qemu_end_to_end_ms"]["median"]
        print(f"{'QEMU 7.2, end to end':<32}{q:>16.1f}")
        for v in variants:
            cells = result["variants"][v.label]
            print(
                f"  {v.label}: two-process / QEMU {cells['two_process_ms']['median'] / q:.2f}, "
                f"upgrade / QEMU {cells['upgrade_ms']['median'] / q:.2f}"
            )
        rows.append({"label": "QEMU 7.2, end to end", "QEMU": q})
        series.append("QEMU")
    print(f"load average before/after: {load_before} / {result['host']['load_after']}")

    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "startup.json"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {json_path}")
    plot(rows, series, args.out / "startup.png")
    print(f"wrote {args.out / 'startup.png'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"startup.py: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
