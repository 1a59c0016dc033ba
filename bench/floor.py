"""The floor of a hand-off: the same blackout, done by a minimal C program on this host.

bench/floor.c (compiled here with ``cc -O2``) hands a running KVM guest along a chain of
processes that share its memory (a memfd) and a unix socket, with nothing else: park the
vCPU threads, export the vCPU and VM state with the KVM getters, send it in one message,
import it with the setters into a VM that a new process built beforehand, run. The guest,
a loop at CPL3 reading the TSC, measures each blackout itself: its gap between two RDTSCs
across the hand-off (on this host the guest's RDTSC is the host's TSC). Each hand-off is
split into steps, in CLOCK_MONOTONIC:

    pause     kick the vCPU threads until all are parked outside KVM_RUN
    export    KVM getters, vCPUs then VM (clock, irqchips, PIT)
    transfer  send() on the source until recv() returned on the destination
    import    KVM setters, VM then vCPUs
    resume    the last setter until the guest's first RDTSC after the hand-off
    blackout  the guest's RDTSC gap across the hand-off

``stop`` is when the guest's last RDTSC before the hand-off came, relative to the start of the
pause (negative: the vCPU was already off the CPU), so blackout = the five steps - stop.

    python bench/floor.py                        # 200 hand-offs, 1 vCPU
    python bench/floor.py --count 100 --vcpus 4  # one busy vCPU, three halted
    python bench/floor.py --prerun               # destination vCPUs ran once on a stub first

Prints the median and p90 of each step and writes bench/out/floor.json (every hand-off's
figures, the medians, the p90s). Other benches put the floor beside their own figures, in the
same run, with :func:`run_floor`::

    from floor import run_floor
    floor = run_floor(count=100, vcpus=1, prerun=False)
    ratio = my_blackout_us / floor["median_us"]["blackout"]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "floor.c"
OUT = HERE / "out" / "floor.json"
#: Reported per hand-off, in microseconds; the order of the table.
STEPS = ("pause", "export", "transfer", "import", "resume", "blackout")
EXTRA = ("stop", "max_gap")


class FloorError(Exception):
    """floor.c could not be built or did not finish."""


def build_floor(workdir: Path) -> Path:
    """Compile bench/floor.c into ``workdir``; returns the executable."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise FloorError("floor.py needs a C compiler (cc or gcc)")
    exe = workdir / "floor"
    cmd = [cc, "-O2", "-Wall", "-Wextra", "-pthread", "-o", str(exe), str(SOURCE)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise FloorError(f"compiling {SOURCE.name} failed:\n{done.stderr}")
    return exe


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), interpolating linearly between order statistics."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def run_floor(
    count: int = 200,
    vcpus: int = 1,
    prerun: bool = False,
    *,
    settle_ms: float = 10.0,
    exe: Path | None = None,
) -> dict[str, Any]:
    """Run ``count`` hand-offs of the C floor; returns the configuration, every hand-off
    (``handoffs``: dicts of ``<step>_us``), and ``median_us`` / ``p90_us`` per step.
    ``exe``: an executable from :func:`build_floor` (else it is built in a temporary
    directory). ``settle_ms``: how long the guest runs on each new source before its
    hand-off."""
    if exe is None:
        with tempfile.TemporaryDirectory(prefix="intrahost-floor-") as tmp:
            return run_floor(count, vcpus, prerun, settle_ms=settle_ms, exe=build_floor(Path(tmp)))
    cmd = [str(exe), "-n", str(count), "-v", str(vcpus), "-s", str(settle_ms)]
    if prerun:
        cmd.append("-p")
    load_before = os.getloadavg()
    timeout = 60 + count * (settle_ms / 1000 + 0.2)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise FloorError(f"floor did not finish within {timeout:.0f} s") from e
    if done.returncode != 0:
        raise FloorError(f"floor failed (exit {done.returncode}):\n{done.stderr.strip()}")
    config: dict[str, Any] = {}
    handoffs: list[dict[str, Any]] = []
    for line in done.stdout.splitlines():
        record = json.loads(line)
        if "config" in record:
            config = record["config"]
        else:
            handoffs.append(record)
    if len(handoffs) != count:
        raise FloorError(f"floor reported {len(handoffs)} hand-offs of {count}")
    names = STEPS + EXTRA
    columns = {name: [h[f"{name}_us"] for h in handoffs] for name in names}
    return {
        "config": config,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "median_us": {name: percentile(columns[name], 50) for name in names},
        "p90_us": {name: percentile(columns[name], 90) for name in names},
        "running_at_pause": sum(1 for h in handoffs if h["running_at_pause"]),
        "handoffs": handoffs,
    }


#: The vCPU counts floor.c runs (one busy vCPU, the others halted).
FLOOR_VCPUS = (1, 4)


def run_floors(
    vcpus: Sequence[int], count: int, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """The floor beside another bench's run: for each vCPU count floor.c runs (1, 4) among
    ``vcpus``, ``count`` hand-offs with never-run destination vCPUs and ``count`` with
    pre-run ones; compact results (no per-hand-off lists), in that order. A floor that fails
    is logged and left out."""
    out: list[dict[str, Any]] = []
    if count <= 0:
        return out
    with tempfile.TemporaryDirectory(prefix="intrahost-floor-") as tmp:
        try:
            exe = build_floor(Path(tmp))
        except FloorError as e:
            log(f"C floor: not measured: {e}")
            return out
        for v in sorted(set(vcpus) & set(FLOOR_VCPUS)):
            for prerun in (False, True):
                log(f"C floor: {count} hand-offs, {v} vCPU(s), prerun={prerun}")
                try:
                    result = run_floor(count, v, prerun, exe=exe)
                except FloorError as e:
                    log(f"C floor: {v} vCPU(s), prerun={prerun} failed: {e}")
                    continue
                out.append(
                    {
                        "vcpus": v,
                        "prerun": prerun,
                        "n": len(result["handoffs"]),
                        **{k: result[k] for k in ("config", "median_us", "p90_us")},
                        "loadavg": [result["loadavg_before"][0], result["loadavg_after"][0]],
                    }
                )
    return out


def floor_blackout_us(floors: Sequence[dict[str, Any]], vcpus: int, prerun: bool) -> float | None:
    """The median blackout of the floor run at ``vcpus`` and ``prerun``, if measured."""
    for f in floors:
        if f["vcpus"] == vcpus and f["prerun"] == prerun:
            value = f["median_us"]["blackout"]
            return float(value)
    return None


def describe(result: dict[str, Any]) -> str:
    config = result["config"]
    vcpus = config["vcpus"]
    who = "one busy vCPU, the others halted" if vcpus > 1 else "1 vCPU"
    dest = "ran once on a stub" if config["prerun"] else "never ran"
    lines = [
        f"C floor: {len(result['handoffs'])} hand-offs, {who}, destination vCPUs {dest}; "
        f"state message {config['message_bytes']} bytes; "
        f"load {result['loadavg_before'][0]:.2f} -> {result['loadavg_after'][0]:.2f}",
        f"{'step':<10}{'median ms':>11}{'p90 ms':>10}",
    ]
    for name in (*STEPS, "stop"):
        median, p90 = result["median_us"][name] / 1000, result["p90_us"][name] / 1000
        lines.append(f"{name:<10}{median:>11.3f}{p90:>10.3f}")
    steps = sum(result["median_us"][name] for name in STEPS[:-1]) / 1000
    lines.append(f"(sum of the step medians: {steps:.3f} ms)")
    idle = len(result["handoffs"]) - result["running_at_pause"]
    if idle:
        lines.append(
            f"({idle} of the hand-offs began with the guest's vCPU thread off the CPU: busy host)"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="hand-offs (default 200)")
    parser.add_argument("--vcpus", type=int, choices=(1, 4), default=1)
    parser.add_argument(
        "--prerun", action="store_true", help="run each destination vCPU once before the pause"
    )
    parser.add_argument("--settle-ms", type=float, default=10.0)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    try:
        result = run_floor(args.count, args.vcpus, args.prerun, settle_ms=args.settle_ms)
    except FloorError as e:
        sys.exit(str(e))
    result["host"] = os.uname().release
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    print(describe(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
