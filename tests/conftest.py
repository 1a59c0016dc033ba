"""Shared fixtures: short socket directories, VMM processes; the fault matrix and fuzzing
summaries."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from netsupport import HAVE_NETNS
from sev_modelkit import make_model
from sev_testlib import ServiceHandle, start_service
from support import VmmProcess, wait_for_path

from intrahost.sevmodel.client import ModelPlatform
from intrahost.sevmodel.kvm_sev import KvmModel
from intrahost.vmm.guests.netcheck import NetNamespace, list_namespaces
from intrahost.vmm.vcpu import install_kick_handler


def pytest_configure(config: pytest.Config) -> None:
    """Tests start vCPUs on other threads (an in-process destination): install the kick
    signal's handler from the main thread, as the CLI does."""
    install_kick_handler()


@pytest.fixture(autouse=True)
def root_logging() -> Iterator[None]:
    """Give the root logger back as the test found it: a test that runs the CLI in-process
    configures logging onto that test's captured stderr, which is closed after the test (a
    thread of a later test logging there would print "Logging error")."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture(autouse=True, scope="session")
def runtime_dir() -> Iterator[Path]:
    """A private XDG_RUNTIME_DIR for the whole run: VMMs started without --api-socket put
    their control sockets in $XDG_RUNTIME_DIR/intrahost, never in the host's /run."""
    path = Path(tempfile.mkdtemp(prefix="ih-run-", dir="/tmp"))
    path.chmod(0o700)
    old = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(path)
    yield path
    if old is None:
        del os.environ["XDG_RUNTIME_DIR"]
    else:
        os.environ["XDG_RUNTIME_DIR"] = old
    kill_processes_mentioning(str(path))
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def netns() -> Iterator[NetNamespace]:
    """A network namespace with the persistent tap ``tap0`` (192.0.2.1/24, 2001:db8::1/64)
    and ``lo`` up, removed at teardown (checked)."""
    if not HAVE_NETNS:
        pytest.skip("needs root and ip (iproute2)")
    with NetNamespace("tap0", address6="2001:db8::1/64") as ns:
        yield ns
    assert ns.name not in list_namespaces()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short private directory (unix socket paths must fit in 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ih-", dir="/tmp"))
    path.chmod(0o700)
    yield path
    kill_processes_mentioning(str(path))
    shutil.rmtree(path, ignore_errors=True)


def kill_processes_mentioning(text: str) -> None:
    """SIGKILL every process whose command line contains ``text``: the VMMs a test started
    indirectly (``intrahost upgrade`` detaches the new VMM) must not outlive it."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)


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
    """Print the hand-off fault matrix that tests/migration/test_faults.py filled, and the
    fuzzing statistics of tests/migration/test_fuzz.py."""
    import sys

    _fuzz_summary(terminalreporter)
    module = sys.modules.get("test_faults")
    matrix = getattr(module, "MATRIX", None)
    if not (matrix or getattr(module, "DISK_MATRIX", None) or getattr(module, "NET_MATRIX", None)):
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
        for point in names if matrix else ():
            cells = [matrix.get((side, point, k), "-") for k in kinds]
            write(f"{side + ':' + point:<26}" + "".join(f"{c:<21}" for c in cells))
    for name, title in (
        (
            "DISK_MATRIX",
            "with the disk guest (the image checked against the guest after every cell):",
        ),
        (
            "NET_MATRIX",
            "with the net guest (an echo stream through every cell; ping afterwards):",
        ),
    ):
        rows = getattr(module, name, None)
        if not rows:
            continue
        write(title)
        for side, point in dict.fromkeys((side, point) for side, point, _ in rows):
            cells = [rows.get((side, point, k), "-") for k in kinds]
            write(f"{side + ':' + point:<25} " + "".join(f"{c:<21}" for c in cells))


def _fuzz_summary(terminalreporter: Any) -> None:
    """Examples and time per fuzz test of tests/migration/test_fuzz.py, and how often each
    known bug was met (tolerated: see fuzzkit.KNOWN_BUGS)."""
    import sys

    stats = getattr(sys.modules.get("test_fuzz"), "STATS", None)
    if not stats:
        return
    write = terminalreporter.write_line
    write("")
    write("fuzzing: examples and time per test (known bugs met, tolerated)")
    for name, (examples, seconds, known) in stats.items():
        bugs = ", ".join(f"{k} x{v}" for k, v in sorted(known.items()))
        write(f"  {name:<52} {examples:>6} examples {seconds:>6.1f} s  {bugs}")


# --- SEV: model platform services in their own processes ---------------------------------------


@pytest.fixture
def service_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., ServiceHandle]]:
    started: list[ServiceHandle] = []

    def factory(*extra: str) -> ServiceHandle:
        handle = start_service(tmp_path_factory.mktemp("sev"), *extra)
        started.append(handle)
        return handle

    yield factory
    for handle in started:
        handle.stop()


@pytest.fixture(scope="session")
def model_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceHandle]:
    handle = start_service(tmp_path_factory.mktemp("sev-session"))
    yield handle
    handle.stop()


@pytest.fixture
def model(model_service: ServiceHandle) -> Iterator[ModelPlatform]:
    platform = model_service.platform()
    yield platform
    platform.close()


@pytest.fixture
def kvm() -> KvmModel:
    """A KVM model with default settings, driven in-process (no service)."""
    return make_model()[0]
