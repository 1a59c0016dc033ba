"""SEV and SEV-ES guests handed between real VMM processes on the model platform: the
encryption context moves with KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM semantics, the source VM is
dead afterwards, and every failure leaves the guest running on exactly one VMM."""

from __future__ import annotations

import errno
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import PATIENCE, needs_kvm, wait_until

from intrahost.kvm import KvmError
from intrahost.migration.sender import MigrationFailed, Sender
from intrahost.service.qmp_client import QmpClient
from intrahost.service.runner import IncomingError, listen, receive
from intrahost.vmm.guests import layout
from intrahost.vmm.machine import Machine, MachineConfig
from intrahost.vmm.memory import MiB

pytestmark = needs_kvm


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "intrahost", *args],
        capture_output=True,
        text=True,
        timeout=3 * PATIENCE,
        stdin=subprocess.DEVNULL,
        env=(os.environ | env) if env else None,
    )


def _vm_info(api: Path) -> dict[str, Any]:
    with QmpClient(api) as qmp:
        info: dict[str, Any] = qmp.execute("query-vm")
        return info


def _wait_count_past(api: Path, count: int) -> int:
    """Wait until the guest's counter is past ``count``; its value then."""
    now: int = wait_until(
        lambda: (c := _vm_info(api)["counter"][0]["count"]) > count and c,
        "the guest to go on counting",
        interval=0.05,
    )
    return now


@pytest.mark.parametrize("mode", ["sev", "sev-es"])
def test_ten_handoffs_keep_the_guest_and_its_measurement(
    mode: str, vmm_factory: Any, sockdir: Path
) -> None:
    api = sockdir / "api.sock"
    vmm_factory(
        "run",
        "--memory",
        "32M",
        f"--{mode}",
        "--platform",
        "model",
        "--guest-args",
        "progress=1073741824",
        "--serial",
        "none",
        "--api-socket",
        str(api),
        wait_path=api,
    )
    first = _vm_info(api)
    assert first["sev"]["mode"] == mode and first["sev"]["platform"] == "model"
    measurement = first["sev"]["measurement"]
    assert len(measurement) == 96  # 32-byte measurement + 16-byte nonce, hex
    last = 0
    for i in range(10):
        result = cli("upgrade", "--api-socket", str(api))
        assert result.returncode == 0, f"hand-off {i}: {result.stderr}"
        info = _vm_info(api)
        assert info["pid"] != first["pid"]
        assert info["sev"] == first["sev"], "the launch record changed across the hand-off"
        last = _wait_count_past(api, last)
    cli("stop", "--api-socket", str(api))


@pytest.fixture
def sev_source(request: pytest.FixtureRequest) -> Iterator[Machine]:
    mode = getattr(request, "param", "sev-es")
    machine = Machine.create(
        MachineConfig(
            memory=32 * MiB,
            guest="counter",
            guest_args="progress=1073741824",
            serial="none",
            sev=mode,
            sev_platform="model",
        )
    )
    machine.start()
    wait_until(lambda: _count(machine) > 0, "the guest to count", interval=0.01)
    yield machine
    machine.close()


def _hand_off(source: Machine, sockdir: Path, env: dict[str, str] | None = None) -> Any:
    """Run a destination VMM process and hand ``source`` to it; (process, result-or-error)."""
    import os

    mig = sockdir / "mig.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "intrahost", "run", "--incoming", f"unix:{mig}",
         "--api-socket", str(sockdir / "dst.sock")],
        env=(os.environ | env) if env else None,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    wait_until(lambda: mig.exists() or proc.poll() is not None, f"{mig} to appear")
    assert proc.poll() is None, proc.communicate()[1]
    try:
        return proc, Sender(source, f"unix:{mig}").run()
    except MigrationFailed as e:
        return proc, e


def _receive_in_thread(url: str) -> tuple[threading.Thread, dict[str, Any]]:
    """An in-process destination at ``url``; ``outcome`` gets "machine" or "error"."""
    listener = listen(url)
    outcome: dict[str, Any] = {}

    def dest() -> None:
        try:
            outcome["machine"] = receive(url, listener=listener)
        except IncomingError as e:
            outcome["error"] = e

    thread = threading.Thread(target=dest)
    thread.start()
    return thread, outcome


def _count(machine: Machine) -> int:
    try:
        return layout.read_slot(machine.memory.buffer, 0).counter
    except layout.GuestStatusMissing:
        return 0


def _counting(machine: Machine) -> bool:
    """True once the guest's counter has moved (it goes on counting); fails if it does not."""
    before = _count(machine)
    return wait_until(lambda: _count(machine) > before, "the guest to go on counting")


@pytest.mark.parametrize("sev_source", ["sev", "sev-es"], indirect=True)
def test_the_source_vm_is_dead_after_the_move(sev_source: Machine, sockdir: Path) -> None:
    proc, result = _hand_off(sev_source, sockdir)
    try:
        assert not isinstance(result, Exception), result
        with pytest.raises(KvmError) as info:
            sev_source.vm.get_clock()  # a real KVM ioctl on the old VM
        assert info.value.errno == errno.EIO
        assert sev_source.confidential is not None and sev_source.confidential.vm.is_dead()

        # The new VMM serves its guest's commands once the hand-off is over.
        def served() -> bool:
            with QmpClient(sockdir / "dst.sock") as qmp:
                return bool(qmp.execute("query-status")["status"] != "inmigrate")

        wait_until((sockdir / "dst.sock").exists, "the new VMM's control socket", interval=0.01)
        wait_until(served, "the new VMM to leave inmigrate", interval=0.01)
        with QmpClient(sockdir / "dst.sock") as qmp:
            assert qmp.execute("query-status")["status"] == "running"
    finally:
        proc.kill()
        proc.wait()


def test_a_failing_move_hands_the_guest_back(sev_source: Machine, sockdir: Path) -> None:
    """MOVE refused at the destination (injected): nothing moved, the source resumes; the
    destination discarded its VM and waits for another hand-off (until told to stop)."""
    env = {"INTRAHOST_TEST_FAULT": "destination:before-move:fail"}
    proc, result = _hand_off(sev_source, sockdir, env)
    assert isinstance(result, MigrationFailed), result
    assert "MOVE failed" in str(result)

    def failed_and_waiting() -> dict[str, Any] | None:
        with QmpClient(sockdir / "dst.sock") as qmp:
            progress: dict[str, Any] = qmp.execute("query-migrate")
        ok = progress["status"] == "waiting" and progress["failed-attempts"] == 1
        return progress if ok else None

    progress = wait_until(failed_and_waiting, "the destination to wait again after MOVE failed")
    with QmpClient(sockdir / "dst.sock") as qmp:
        assert qmp.execute("query-status")["status"] == "inmigrate"
    assert "MOVE failed" in progress["last-error"]
    proc.terminate()
    assert proc.wait(PATIENCE) == 0
    assert sev_source.status == "running" and _counting(sev_source)
    sev_source.vm.get_clock()  # the source VM is alive


def test_a_source_that_is_not_sev_is_refused_by_the_move(sockdir: Path) -> None:
    """The platform's own refusal (EINVAL: source not SEV) at MOVE hands the guest back."""
    from intrahost.sev.platforms import open_platform

    machine = Machine.create(
        MachineConfig(
            memory=32 * MiB,
            guest="counter",
            guest_args="progress=1073741824",
            serial="none",
            sev="sev",
            sev_platform="model",
        )
    )
    platform = open_platform("model")
    not_sev = platform.create_vm()  # never initialised: "source not SEV"
    assert machine.confidential is not None
    real = machine.confidential.vm
    try:
        machine.start()
        wait_until(lambda: _count(machine) > 0, "the guest to count")
        url = f"unix:{sockdir / 'mig.sock'}"
        thread, outcome = _receive_in_thread(url)
        machine.pause()  # no KVM_RUN while the wrong VM is in place
        machine.confidential.vm = not_sev  # what travels in SEV_CONTEXT
        try:
            with pytest.raises(MigrationFailed, match=r"EINVAL|Invalid argument"):
                Sender(machine, url).run()
        finally:
            machine.confidential.vm = real
        thread.join(PATIENCE)
        assert "error" in outcome
        assert machine.status == "paused"
        machine.resume()
        assert _counting(machine)
    finally:
        not_sev.close()
        platform.close()
        machine.close()


def test_sev_mode_must_match(vmm_factory: Any, sockdir: Path) -> None:
    api = sockdir / "api.sock"
    vmm_factory(
        "run", "--memory", "32M", "--sev-es", "--platform", "model",
        "--guest-args", "progress=1073741824", "--serial", "none", "--api-socket", str(api),
        wait_path=api,
    )  # fmt: skip
    result = cli("upgrade", "--api-socket", str(api), "--", "--sev")
    assert result.returncode != 0 and "--sev" in result.stderr
    with QmpClient(api) as qmp:
        assert qmp.execute("query-status")["status"] == "running"
        qmp.execute("quit")


def test_a_destination_that_is_already_sev_is_refused_by_the_move(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A destination whose VM was SEV-initialised (a bug or a misconfigured VMM): the platform
    refuses MOVE (EINVAL, "dst already SEV"), the guest goes back to the source."""
    from intrahost.migration import receiver as receiver_module

    class AlreadySev(Machine):
        def __init__(
            self,
            config: MachineConfig,
            memory: Any,
            kvm: Any = None,
            incoming: bool = False,
            **kwargs: Any,
        ):
            # incoming=False inits SEV: wrong here.
            super().__init__(config, memory, kvm, incoming=False, **kwargs)

    monkeypatch.setattr(receiver_module, "Machine", AlreadySev)
    machine = Machine.create(
        MachineConfig(
            memory=32 * MiB,
            guest="counter",
            guest_args="progress=1073741824",
            serial="none",
            sev="sev",
            sev_platform="model",
        )
    )
    try:
        machine.start()
        wait_until(lambda: _count(machine) > 0, "the guest to count")
        assert _counting(machine)
        url = f"unix:{sockdir / 'mig.sock'}"
        thread, outcome = _receive_in_thread(url)
        with pytest.raises(MigrationFailed, match="MOVE failed"):
            Sender(machine, url).run()
        thread.join(PATIENCE)
        assert "error" in outcome
        assert machine.status == "running" and _counting(machine)
        machine.vm.get_clock()  # alive: nothing moved
    finally:
        machine.close()
