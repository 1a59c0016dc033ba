"""The vCPU group: the kick signal's handler, and a pause that cannot complete."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import PATIENCE, needs_kvm, wait_until

from intrahost.kvm import ExitReason, PortOut, Vcpu
from intrahost.vmm.guests import layout
from intrahost.vmm.machine import Machine, MachineConfig
from intrahost.vmm.memory import GuestMemory, MiB
from intrahost.vmm.vcpu import PauseTimeout, RunStub, VcpuGroup


def _python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (its main thread, its own signal dispositions)."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_importing_the_vcpu_module_leaves_sigusr1_alone() -> None:
    result = _python(
        "import signal\n"
        "import intrahost.vmm.vcpu\n"
        "print(signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_starting_vcpus_off_the_main_thread_without_the_handler_fails_clearly() -> None:
    result = _python(
        "import threading\n"
        "from intrahost.vmm.vcpu import VcpuGroup\n"
        "box = []\n"
        "def start():\n"
        "    try:\n"
        "        VcpuGroup([], lambda vcpu, reason: True).start()\n"
        "    except Exception as e:\n"
        "        box.append(e)\n"
        "t = threading.Thread(target=start)\n"
        "t.start()\n"
        "t.join()\n"
        "print(type(box[0]).__name__ if box else 'started')\n"
        "print(box[0] if box else '')\n"
    )
    assert result.returncode == 0, result.stderr
    kind, message = result.stdout.splitlines()
    assert kind == "KickHandlerMissing"
    assert "install_kick_handler()" in message and "main thread" in message


def test_the_entry_point_installs_the_handler_on_the_main_thread() -> None:
    result = _python(
        "import signal, threading\n"
        "from intrahost.vmm.vcpu import VcpuGroup, install_kick_handler\n"
        "install_kick_handler()\n"
        "assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN)\n"
        "t = threading.Thread(target=VcpuGroup([], lambda vcpu, reason: True).start)\n"
        "t.start()\n"
        "t.join()\n"
        "print('ok')\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --- a pause that cannot complete -----------------------------------------------------------


class Gate:
    """Holds vCPU 0 inside its exit handler (outside KVM_RUN, where no kick reaches it) from
    its next exit after :meth:`close` until :meth:`open`."""

    def __init__(self, handle_exit: Callable[[Vcpu, ExitReason | int], bool]) -> None:
        self._handle_exit = handle_exit
        self._closed = threading.Event()
        self._open = threading.Event()
        self.holding = threading.Event()

    def __call__(self, vcpu: Vcpu, reason: ExitReason | int) -> bool:
        if vcpu.vcpu_id == 0 and self._closed.is_set() and not self._open.is_set():
            self.holding.set()
            self._open.wait()
        return self._handle_exit(vcpu, reason)

    def close(self) -> None:
        self._closed.set()
        assert self.holding.wait(10), "vCPU 0 made no exit"

    def open(self) -> None:
        self._open.set()


@pytest.fixture
def gated(sockdir: Path) -> Iterator[tuple[Machine, Gate]]:
    """A two-vCPU counter guest whose vCPU 0 can be held in its exit handler."""
    config = MachineConfig(
        memory=32 * MiB,
        vcpus=2,
        guest="counter",
        guest_args="progress=65536",
        serial=f"file:{sockdir / 'serial.log'}",
    )
    machine = Machine.create(config)
    gate = Gate(machine._handle_exit)
    machine.group = VcpuGroup(machine.vcpus, gate)
    machine.start()
    try:
        yield machine, gate
    finally:
        gate.open()
        machine.close()


def _counters(machine: Machine) -> list[int]:
    try:
        return [s.counter for s in layout.read_status(machine.memory.buffer).slots]
    except layout.GuestStatusMissing:
        return [0] * machine.config.vcpus


def _wait_progress(machine: Machine, vcpus: list[int], timeout: float = 10.0) -> None:
    """Wait until each of ``vcpus`` counted on from now."""
    before = _counters(machine)
    deadline = time.monotonic() + timeout
    while True:
        now = _counters(machine)
        if all(now[i] > before[i] for i in vcpus):
            return
        assert time.monotonic() < deadline, f"vCPUs {vcpus} did not count on: {before} {now}"
        time.sleep(0.01)


def _wait_running(thread_name: str, timeout: float = 10.0) -> None:
    """Wait until the thread burns CPU time (a vCPU in KVM_RUN; a parked one sleeps). While
    vCPU 0 is held mid-line, the others spin on the guest's print lock: no counting then."""
    thread = next(t for t in threading.enumerate() if t.name == thread_name)
    assert thread.ident is not None
    clock = time.pthread_getcpuclockid(thread.ident)
    before = time.clock_gettime(clock)
    deadline = time.monotonic() + timeout
    while time.clock_gettime(clock) < before + 0.02:
        assert time.monotonic() < deadline, f"{thread_name} does not run"
        time.sleep(0.01)


@needs_kvm
def test_a_pause_that_times_out_leaves_the_group_running(gated: tuple[Machine, Gate]) -> None:
    machine, gate = gated
    _wait_progress(machine, [0, 1])
    gate.close()
    t0 = time.monotonic()
    with pytest.raises(PauseTimeout, match=r"vCPU 0 did not park"):
        machine.group.pause(timeout=0.3)
    assert time.monotonic() - t0 < 5
    # Rolled back: no pause request, no immediate_exit, and vCPU 1 (which parked) released.
    assert not machine.group.paused and machine.status == "running"
    assert [v.kvm_run.immediate_exit for v in machine.vcpus] == [0, 0]
    _wait_running("vcpu1")
    # The machine's pause fails the same way and leaves the UART draining too.
    with pytest.raises(PauseTimeout):
        machine.pause(timeout=0.3)
    assert machine.status == "running" and not machine.uart.paused
    gate.open()
    _wait_progress(machine, [0, 1])
    # Nothing left over: a pause now parks both vCPUs and a resume lets both go on.
    machine.pause()
    assert machine.status == "paused"
    frozen = _counters(machine)
    time.sleep(0.1)
    assert _counters(machine) == frozen
    machine.resume()
    _wait_progress(machine, [0, 1])


def _prerun_once(memory: GuestMemory) -> None:
    config = MachineConfig(memory=16 * MiB, vcpus=3, serial="none")
    machine = Machine(config, GuestMemory(os.dup(memory.fd), memory.size), incoming=True)
    runs: list[tuple[str, str, bool]] = []
    done: list[int] = []
    original = Vcpu.run
    try:
        stub = RunStub(machine.vm)

        def run(vcpu: Vcpu) -> object:
            exit_ = original(vcpu)
            if vcpu.kvm_run.immediate_exit == 0:
                stubbed = isinstance(exit_, PortOut) and exit_.port == stub.PORT
                runs.append((threading.current_thread().name, type(exit_).__name__, stubbed))
            return exit_

        def first_run(index: int, vcpu: Vcpu) -> None:
            stub.run(index, vcpu)
            time.sleep(0.05)  # a slow first run: start() must wait for it
            done.append(index)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Vcpu, "run", run)
            with stub:
                machine.start(paused=True, first_run=first_run)
                assert sorted(done) == [0, 1, 2]
        assert sorted(runs) == [(f"vcpu{i}", "PortOut", True) for i in range(3)]
        assert machine.status == "paused"
        assert not any(memory.buffer[: 16 * MiB : 4096])
    finally:
        machine.close()


@needs_kvm
def test_the_run_stub_runs_each_vcpu_once_on_its_own_thread_before_start_returns() -> None:
    """The pre-run of a hand-off's destination: every vCPU thread runs its vCPU on the stub
    (one OUT to the stub's port) and parks; start() returns only then (the stub's slot goes
    away right after: a vCPU still on it would fault). Guest memory is not written."""
    memory = GuestMemory.create(16 * MiB)
    try:
        for _ in range(5):
            _prerun_once(memory)
    finally:
        memory.close()


@needs_kvm
def test_two_pauses_at_once_both_return_when_the_last_vcpu_parks(
    gated: tuple[Machine, Gate],
) -> None:
    """Each pauser waits on a lock of its own; the vCPU that parks last releases every one."""
    machine, gate = gated
    _wait_progress(machine, [0, 1])
    gate.close()  # vCPU 0 cannot park until the gate opens
    returned: list[float] = []
    errors: list[BaseException] = []

    def pause() -> None:
        try:
            machine.group.pause(timeout=PATIENCE)
            returned.append(time.monotonic())
        except BaseException as e:  # reported below
            errors.append(e)

    pausers = [threading.Thread(target=pause) for _ in range(2)]
    for t in pausers:
        t.start()
    wait_until(lambda: machine.vcpus[1].kvm_run.immediate_exit == 1, "a pause request")
    assert not returned and not machine.group.paused
    opened = time.monotonic()
    gate.open()
    for t in pausers:
        t.join(PATIENCE + 5)
    assert not errors and len(returned) == 2
    assert all(r >= opened for r in returned)
    assert machine.group.paused
    assert [v.kvm_run.immediate_exit for v in machine.vcpus] == [1, 1]
    machine.group.resume()
    _wait_progress(machine, [0, 1])
