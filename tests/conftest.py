"""Shared fixtures: short socket directories, VMM processes; the fault matrix summary."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import VmmProcess, wait_for_path


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short private directory (unix socket paths must fit in 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ih-", dir="/tmp"))
    path.chmod(0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def vmm_factory(sockdir: Path) -> Iterator[Any]:
    started: list[VmmProcess] = []

    def start(*args: str, name: str = "vmm", wait_path: Path | None = None) -> VmmProcess:
        proc = VmmProcess(list(args), sockdir, name)
        started.append(proc)
        if wait_path is not None:
            wait_for_path(wait_path, proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the hand-off fault matrix that tests/migration/test_faults.py filled."""
    import sys

    module = sys.modules.get("test_faults")
    matrix = getattr(module, "MATRIX", None)
    if not matrix:
        return
    points = module.faults
    kinds = ("kill", "close", "stall", "truncate", "corrupt", "badstate", "fail")
    write = terminalreporter.write_line
    write("")
    write("hand-off fault matrix: who runs the guest afterwards (every cell checked)")
    write(f"{'step':<26}" + "".join(f"{k:<21}" for k in kinds))
    write("(before-move / after-move: an SEV-ES guest on the model platform)")
    for side, names in (
        ("source", points.SOURCE_POINTS),
        ("destination", points.DESTINATION_POINTS),
        ("destination", points.SEV_DESTINATION_POINTS),
    ):
        for point in names:
            cells = [matrix.get((side, point, k), "-") for k in kinds]
            write(f"{side + ':' + point:<26}" + "".join(f"{c:<21}" for c in cells))
