"""Exits per second per vCPU: intrahost's Python run loop against a minimal C loop.

Both run the same guest — flat 32-bit code doing ``out dx, eax`` to port 0x500 in a loop —
on one vCPU, in alternating rounds; the C loop is compiled from bench/exits_loop.c on the
spot. Prints the medians and the ratio, and writes bench/out/exits.json and exits.png.

    python bench/exits.py [--seconds 1.0] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from intrahost.vmm.machine import Machine, MachineConfig
from intrahost.vmm.memory import MiB

HERE = Path(__file__).resolve().parent
GUEST = bytes([0xBA, 0x00, 0x05, 0x00, 0x00, 0xEF, 0xEB, 0xFD])  # mov edx,0x500; out; jmp


def build_c(workdir: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        sys.exit("exits.py needs a C compiler (cc or gcc)")
    exe = workdir / "exits_loop"
    subprocess.run([cc, "-O2", "-o", str(exe), str(HERE / "exits_loop.c")], check=True)
    return exe


def c_rate(exe: Path, seconds: float) -> float:
    out = subprocess.run([str(exe), str(seconds)], check=True, capture_output=True, text=True)
    exits, elapsed = out.stdout.split()
    return int(exits) / float(elapsed)


def python_rate(guest: Path, seconds: float) -> float:
    config = MachineConfig(memory=16 * MiB, vcpus=1, guest=str(guest), serial="none")
    machine = Machine.create(config)
    try:
        machine.start()
        time.sleep(0.05)
        start_exits, start = machine.group.exits[0], time.monotonic()
        time.sleep(seconds)
        exits, elapsed = machine.group.exits[0] - start_exits, time.monotonic() - start
        machine.pause()
    finally:
        machine.close()
    return exits / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(HERE / "out" / "exits.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        exe = build_c(workdir)
        guest = workdir / "outloop.bin"
        guest.write_bytes(GUEST)
        py, c = [], []
        for _ in range(args.rounds):
            py.append(python_rate(guest, args.seconds))
            c.append(c_rate(exe, args.seconds))
    result = {
        "python_exits_per_s": statistics.median(py),
        "c_exits_per_s": statistics.median(c),
        "ratio_python_over_c": statistics.median(py) / statistics.median(c),
        "rounds": args.rounds,
        "seconds_per_round": args.seconds,
        "python_samples": py,
        "c_samples": c,
        "host": os.uname().release,
    }
    print(f"python run loop : {result['python_exits_per_s']:10.0f} exits/s per vCPU (median)")
    print(f"C run loop      : {result['c_exits_per_s']:10.0f} exits/s per vCPU (median)")
    print(f"ratio python / C: {result['ratio_python_over_c']:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    png = Path(args.out).with_suffix(".png")
    plot(py, c, png)
    print(f"wrote {args.out} and {png}")


def plot(py: list[float], c: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    medians = [statistics.median(py) / 1000, statistics.median(c) / 1000]
    ax.bar(["intrahost (Python)", "minimal C loop"], medians, color=["tab:blue", "tab:gray"])
    for i, samples in enumerate((py, c)):
        ax.scatter([i] * len(samples), [s / 1000 for s in samples], color="black", s=8, zorder=3)
    ax.set_ylabel("exits per second per vCPU (thousands)")
    ax.set_title(f"OUT-loop exits: ratio Python / C = {medians[0] / medians[1]:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
