"""The model platform as processes see it: VM identity fds, callers, killable requests,
on-demand start, robustness. These tests use real processes where the semantics are about
processes."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import mmap
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sev_testlib import CHILD, ServiceHandle, expect, wait_for
from support import PATIENCE

from intrahost import wire
from intrahost.sev import (
    SEV_POLICY_ES,
    FirmwareError,
    GuestState,
    SevError,
    VmType,
    open_platform,
    unavailable_reason,
)
from intrahost.sev.platforms import PlatformUnavailableError
from intrahost.sevmodel import protocol
from intrahost.sevmodel.client import ModelPlatform, ModelVm
from intrahost.sevmodel.firmware import (
    SECRET_HEADER,
    FirmwareVersion,
    derive_tik,
    expected_measurement,
    secret_mac,
)


def child(
    mode: str, path: str, *args: str, pass_fds: tuple[int, ...] = ()
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, CHILD, mode, path, *args],
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=pass_fds,
    )


def read_json(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"child exited with {proc.wait()} without answering"
    result: dict[str, Any] = json.loads(line)
    return result


def launched(platform: ModelPlatform, es: bool = False, vcpus: int = 1) -> ModelVm:
    vm = platform.create_vm()
    if es:
        vm.sev_es_init()
    else:
        vm.sev_init()
    for i in range(vcpus):
        vm.create_vcpu(i)
    vm.launch_start(SEV_POLICY_ES if es else 0)
    if es:
        vm.launch_update_vmsa([b"vmsa-%d" % i for i in range(vcpus)])
    return vm


@pytest.fixture
def page() -> Iterator[tuple[mmap.mmap, int]]:
    buf = mmap.mmap(-1, 2 * mmap.PAGESIZE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    yield buf, addr
    # (the mmap stays referenced by ctypes objects until collected; it is not closed here)


# ------------------------------------------------------------------------------------------
# identity and callers


def test_another_process_gets_eio(model: ModelPlatform) -> None:
    vm = launched(model)
    proc = child("ops-on-inherited", model.socket_path, str(vm.fd), pass_fds=(vm.fd,))
    seen = read_json(proc)
    proc.wait()
    assert seen == {
        "guest_status": errno.EIO,
        "create_vcpu": errno.EIO,
        "vcpu_enter": errno.EIO,
        "register_region": errno.EIO,
    }
    assert vm.guest_status().state == GuestState.LUPDATE  # still fine for its creator
    vm.close()


def test_fd_passed_with_scm_rights_is_recognised_and_moved(model: ModelPlatform) -> None:
    src = launched(model, es=True, vcpus=2)
    ours, theirs = socket.socketpair()
    proc = child(
        "recv-and-move", model.socket_path, str(theirs.fileno()), "2", pass_fds=(theirs.fileno(),)
    )
    theirs.close()
    socket.send_fds(ours, [b"vm"], [src.fd])
    seen = read_json(proc)
    assert ours.recv(4) == b"done"
    assert seen["move"] == 0
    assert seen["src_dead"] is True and seen["dst_dead"] is False
    assert seen["dst_protected"] == [True, True]
    # The new VMM cannot reach the firmware through its moved-in VM: KVM does not move the
    # recorded /dev/sev fd number (see test_sev_quirks.py).
    assert seen["dst_status"] == errno.EBADF
    assert src.is_dead()
    expect(src.guest_status, errno.EIO)
    expect(lambda: src.vcpu_enter(0), errno.EIO)
    ours.sendall(b"x")
    proc.wait()
    src.close()


def test_fds_that_are_not_vms_are_ebadf(
    model: ModelPlatform, model_service: ServiceHandle, tmp_path_factory: pytest.TempPathFactory
) -> None:
    dst = model.create_vm()
    r, w = os.pipe()
    expect(lambda: dst.move_enc_context_from(r), errno.EBADF)
    expect(lambda: dst.copy_enc_context_from(r), errno.EBADF)
    os.close(r)
    os.close(w)
    expect(lambda: dst.move_enc_context_from(r), errno.EBADF)  # closed number
    expect(lambda: dst.move_enc_context_from(model.sev_fd), errno.EBADF)  # /dev/sev, not a VM
    expect(lambda: dst.move_enc_context_from(-1), errno.EBADF)
    closed = model.create_vm()
    closed.close()
    expect(closed.guest_status, errno.EBADF)
    with pytest.raises(SevError):
        closed.is_dead()
    dst.close()


def test_vm_of_another_service_is_ebadf(model: ModelPlatform, service_factory: Any) -> None:
    other = service_factory().platform()
    foreign = launched(other)
    dst = model.create_vm()
    expect(lambda: dst.move_enc_context_from(foreign.fd), errno.EBADF)
    dst.close()
    foreign.close()
    other.close()


def test_the_last_fd_releases_the_vm(model: ModelPlatform) -> None:
    vm = launched(model)
    asid = vm.inspect()["sev"]["asid"]
    copy = os.dup(vm.fd)
    vm.close()
    time.sleep(0.1)
    assert asid in model.platform_state()["asids_in_use"]
    assert asid not in model.platform_state()["asids_to_reclaim"]
    still = model.adopt_vm(copy)
    assert still.guest_status().handle > 0
    still.close()
    wait_for(lambda: asid in model.platform_state()["asids_to_reclaim"], what="ASID reclaim")


def test_is_dead_is_a_local_poll(model: ModelPlatform) -> None:
    src = launched(model)
    dst = model.create_vm()
    assert not src.is_dead() and not dst.is_dead()
    dst.move_enc_context_from(src.fd)
    assert src.is_dead() and not dst.is_dead()
    t = time.perf_counter()
    for _ in range(1000):
        src.is_dead()
    assert time.perf_counter() - t < 1.0
    src.close()
    dst.close()


# ------------------------------------------------------------------------------------------
# killable


def test_killed_requester_releases_exactly_its_locks(model: ModelPlatform) -> None:
    src = launched(model, es=True, vcpus=2)
    assert src.vcpu_enter(1) == b"vmsa-1"  # our vCPU 1 is "in KVM_RUN"
    proc = child("move-from", model.socket_path, str(src.fd), "2", pass_fds=(src.fd,))
    ready = read_json(proc)
    assert ready["ready"]

    def blocked() -> dict[str, Any] | None:
        info = src.inspect()
        mover = info["vcpus"][0]["mutex_owner"]
        return info if mover and "move" in mover else None

    info = wait_for(blocked, what="the child's MOVE to block on source vCPU 1")
    assert info["sev"]["migration_in_progress"] and info["lock_owner"]
    ours = info["vcpus"][1]["mutex_owner"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    def released() -> dict[str, Any] | None:
        info = src.inspect()
        return info if not info["sev"]["migration_in_progress"] else None

    info = wait_for(released, what="the killed MOVE to unwind")
    assert info["lock_owner"] is None
    assert info["vcpus"][0]["mutex_owner"] is None
    assert info["vcpus"][1]["mutex_owner"] == ours  # not released by the killed MOVE
    wait_for(lambda: ready["dst_vm"] not in model.platform_state()["vms"], what="child's VM")
    src.vcpu_exit(1, b"vmsa-1-after")
    dst = model.create_vm()
    dst.create_vcpu(0)
    dst.create_vcpu(1)
    dst.move_enc_context_from(src.fd)
    assert dst.vcpu_enter(1) == b"vmsa-1-after"
    dst.vcpu_exit(1, b"x")
    src.close()
    dst.close()


def test_vanished_client_releases_its_vcpu(model: ModelPlatform) -> None:
    ours, theirs = socket.socketpair()
    proc = child("hold-vcpu", model.socket_path, str(theirs.fileno()), pass_fds=(theirs.fileno(),))
    theirs.close()
    _msg, fds, _flags, _addr = socket.recv_fds(ours, 16, 1)
    seen = read_json(proc)
    assert seen == {"entered": True, "vmsa": "initial"}
    vm = model.adopt_vm(fds[0])
    assert vm.inspect()["vcpus"][0]["mutex_owner"] is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_for(lambda: vm.inspect()["vcpus"][0]["mutex_owner"] is None, what="vCPU release")
    expect(lambda: vm.vcpu_enter(0), errno.EIO)  # not ours: we did not create it
    vm.close()


# ------------------------------------------------------------------------------------------
# robustness


def _raw(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


def _frame(text: bytes, blobs: bytes = b"") -> bytes:
    return protocol.HEADER.pack(protocol.MAGIC, len(text), len(blobs), 0) + text + blobs


@pytest.mark.parametrize("ref", [b"5", b"[1]", b'"x"', b"[0, 1, 2]", b"null"])
def test_a_malformed_blob_reference_gets_an_error_reply(
    model_service: ServiceHandle, ref: bytes
) -> None:
    sock = _raw(model_service.path)
    try:
        sock.sendall(_frame(b'{"id": 1, "op": "hello", "args": {"b": {"$blob": ' + ref + b"}}}"))
        assert protocol.recv_message(sock).body["errno"] == errno.EPROTO
        protocol.send_message(sock, {"id": 2, "op": "hello", "args": {}})
        assert protocol.recv_message(sock).body["ok"] is True
    finally:
        sock.close()


def test_malformed_requests_get_error_replies(model_service: ServiceHandle) -> None:
    sock = _raw(model_service.path)
    try:
        sock.sendall(_frame(b"{not json"))
        assert protocol.recv_message(sock).body["errno"] == errno.EPROTO
        sock.sendall(_frame(b"[1, 2]"))
        assert protocol.recv_message(sock).body["errno"] == errno.EPROTO
        sock.sendall(_frame(b'{"id": 1, "op": "x", "args": {"b": {"$blob": [0, 99]}}}', b"ab"))
        assert protocol.recv_message(sock).body["errno"] == errno.EPROTO
        protocol.send_message(sock, {"id": 2, "op": "no_such_op", "args": {}})
        reply = protocol.recv_message(sock).body
        assert (reply["id"], reply["ok"], reply["errno"]) == (2, False, errno.EPROTO)
        protocol.send_message(sock, {"id": 3, "op": "create_vm", "args": {"type": "x"}})
        assert protocol.recv_message(sock).body["errno"] == errno.EINVAL
        protocol.send_message(sock, {"id": 4, "op": "create_vm", "args": {"type": 7}})
        assert protocol.recv_message(sock).body["errno"] == errno.EINVAL
        protocol.send_message(sock, {"id": 5, "op": "mem_enc_op", "args": {"cmd": 0}})
        assert protocol.recv_message(sock).body["errno"] == errno.EBADF  # no VM fd
        protocol.send_message(sock, {"id": 6, "op": "hello", "args": []})
        assert protocol.recv_message(sock).body["errno"] == errno.EPROTO
        protocol.send_message(sock, {"id": 7, "op": "hello", "args": {}})
        assert protocol.recv_message(sock).body["ok"] is True
        # An unframeable stream: the service drops this connection, and only this one.
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        with pytest.raises(wire.ConnectionBroken):
            protocol.recv_message(sock)
    finally:
        sock.close()
    half = _raw(model_service.path)
    half.sendall(protocol.HEADER.pack(protocol.MAGIC, 100, 0, 0) + b"{")
    half.close()
    platform = model_service.platform()
    assert platform.create_vm(VmType.SEV).vm_type == VmType.SEV
    platform.close()


def test_on_demand_start_starts_one_service(tmp_path_factory: pytest.TempPathFactory) -> None:
    directory = tmp_path_factory.mktemp("ondemand") / "run"
    path = str(directory / "sev-model.sock")
    procs = [child("start-platform", path) for _ in range(3)]
    pids = {read_json(p)["service_pid"] for p in procs}
    for p in procs:
        p.wait()
    try:
        assert len(pids) == 1
        (pid,) = pids
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert Path(path + ".pid").read_text().strip() == str(pid)
        # Detached: its own session, not a child of the processes that started it.
        assert os.getsid(pid) == pid
        platform = ModelPlatform(path, autostart=False)
        assert platform.service_pid == pid
        platform.stop_service()
        platform.close()
        wait_for(lambda: not os.path.exists(path), what="the service to stop")
    finally:
        for service_pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(service_pid, signal.SIGKILL)


def test_no_autostart_and_no_service(tmp_path: Path) -> None:
    with pytest.raises(PlatformUnavailableError, match="intrahost platform serve"):
        ModelPlatform(str(tmp_path / "none.sock"), autostart=False)


def test_second_service_on_the_same_socket_refuses(model_service: ServiceHandle) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "intrahost.sevmodel.service", "--socket", model_service.path],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1 and "already listens" in proc.stderr


def test_stale_socket_file_is_replaced(tmp_path: Path, service_factory: Any) -> None:
    handle = service_factory()
    handle.proc.send_signal(signal.SIGKILL)
    handle.proc.wait()
    assert os.path.exists(handle.path)  # left behind
    platform = ModelPlatform(handle.path)  # starts a new service over the stale file
    try:
        assert platform.service_pid != handle.proc.pid
    finally:
        platform.stop_service()
        platform.close()


# ------------------------------------------------------------------------------------------
# memory, measurement, secrets


def test_launch_update_data_measures_this_process_memory(
    model: ModelPlatform, model_service: ServiceHandle, page: tuple[mmap.mmap, int]
) -> None:
    buf, addr = page
    image = bytes(range(256)) * 16
    buf[: len(image)] = image
    vm = launched(model, es=True, vcpus=2)  # LAUNCH_UPDATE_VMSA already measured 2 VMSAs
    vm2 = launched(model)
    vm2.launch_update_data(addr, len(image))
    blob = vm2.launch_measure()
    key = Path(os.path.dirname(model_service.path), "sev-model.key").read_bytes()
    info = model.info
    version = FirmwareVersion(info.api_major, info.api_minor, info.build)
    assert blob[:32] == expected_measurement(key, version, 0, [image], blob[32:])
    assert vm2.guest_status().state == GuestState.LSECRET
    # LAUNCH_SECRET: a packet MAC'd with the TIK; the model writes the secret in clear.
    secret = b"0123456789abcdef"
    iv = b"\x01" * 16
    mac = secret_mac(derive_tik(key, b"", b""), 0, iv, len(secret), secret, blob[:32])
    vm2.launch_secret(SECRET_HEADER.pack(0, iv, mac), secret, addr + 4096)
    assert bytes(buf[4096 : 4096 + 16]) == secret
    bad = SECRET_HEADER.pack(0, iv, b"\0" * 32)
    err = expect(lambda: vm2.launch_secret(bad, secret, addr + 4096), errno.EIO)
    assert err.firmware_error == FirmwareError.BAD_MEASUREMENT
    assert "BAD_MEASUREMENT" in str(err)
    vm2.launch_finish()
    assert vm2.guest_status().state == GuestState.RUNNING
    err = expect(vm2.launch_measure, errno.EIO)
    assert err.firmware_error == FirmwareError.INVALID_GUEST_STATE
    # Unmapped memory cannot be pinned.
    expect(lambda: vm.launch_update_data(8, 4096), errno.ENOMEM)
    vm.close()
    vm2.close()


def test_register_region_uses_this_process_mapping(
    model: ModelPlatform, page: tuple[mmap.mmap, int]
) -> None:
    _buf, addr = page
    vm = launched(model)
    vm.register_region(addr, 2 * mmap.PAGESIZE)
    assert vm.inspect()["sev"]["pages_locked"] == 2
    expect(lambda: vm.register_region(4096, 4096), errno.ENOMEM)
    expect(lambda: vm.unregister_region(addr, 4096), errno.EINVAL)
    vm.unregister_region(addr, 2 * mmap.PAGESIZE)
    assert vm.inspect()["sev"]["pages_locked"] == 0
    vm.close()


def test_vcpu_state_follows_the_move(model: ModelPlatform) -> None:
    src = launched(model, es=True, vcpus=2)
    assert src.vcpu_protected(0) and src.vcpu_enter(0) == b"vmsa-0"
    src.vcpu_exit(0, b"regs-after-run")
    dst = model.create_vm()
    dst.create_vcpu(0)
    dst.create_vcpu(1)
    assert not dst.vcpu_protected(0)
    dst.move_enc_context_from(src.fd)
    assert dst.vcpu_protected(0) and dst.vcpu_protected(1)
    assert dst.vcpu_enter(0) == b"regs-after-run"
    dst.vcpu_exit(0, b"later")
    expect(lambda: src.vcpu_protected(0), errno.EIO)
    expect(lambda: src.vcpu_enter(0), errno.EIO)
    # Moving back into the dead source: EIO; into a fresh VM: fine (recovery path).
    expect(lambda: src.move_enc_context_from(dst.fd), errno.EIO)
    back = model.create_vm()
    back.create_vcpu(0)
    back.create_vcpu(1)
    back.move_enc_context_from(dst.fd)
    assert back.vcpu_enter(0) == b"later"
    back.vcpu_exit(0, b"x")
    for vm in (src, dst, back):
        vm.close()


def test_concurrent_requests_on_one_connection(model: ModelPlatform) -> None:
    """A MOVE waiting for a vCPU does not block the vCPU thread's own vcpu_exit."""
    import threading

    src = launched(model, vcpus=1)
    assert src.vcpu_enter(0) is None
    dst = model.create_vm()
    done: list[int] = []
    mover = threading.Thread(target=lambda: (dst.move_enc_context_from(src.fd), done.append(1)))
    mover.start()
    wait_for(lambda: src.inspect()["sev"]["migration_in_progress"], what="MOVE to wait")
    assert not done
    src.vcpu_exit(0)
    mover.join(PATIENCE)
    assert done == [1] and src.is_dead()
    src.close()
    dst.close()


# ------------------------------------------------------------------------------------------
# platforms and errors


def test_platform_registry(model_service: ServiceHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTRAHOST_SEV_MODEL_SOCKET", model_service.path)
    assert protocol.default_socket_path() == model_service.path
    reason = unavailable_reason("kernel")
    if not os.path.exists("/dev/sev"):
        assert reason is not None and "/dev/sev" in reason
        with pytest.raises(PlatformUnavailableError, match="--platform model"):
            open_platform("kernel")
    platform = open_platform("auto" if reason else "model")
    assert platform.name == "model"
    platform.close()
    assert unavailable_reason("nope") is not None


def test_default_socket_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INTRAHOST_SEV_MODEL_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert protocol.default_socket_path() == "/run/user/1000/intrahost/sev-model.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    expected = (
        "/run/intrahost/sev-model.sock"
        if os.geteuid() == 0
        else f"/tmp/intrahost-{os.geteuid()}/sev-model.sock"
    )
    assert protocol.default_socket_path() == expected


def test_sev_error_messages(model: ModelPlatform) -> None:
    vm = model.create_vm()
    err = expect(vm.launch_finish, errno.ENOTTY)
    text = str(err)
    assert text.startswith("KVM_SEV_LAUNCH_FINISH failed: ENOTTY")
    assert "not an SEV guest" in text and "sev_init" in text
    vm.sev_init()
    vm.launch_start(0)
    vm.launch_finish()
    err = expect(vm.launch_finish, errno.EIO)
    assert err.firmware_error_name == "INVALID_GUEST_STATE"
    assert "firmware error INVALID_GUEST_STATE" in str(err)
    vm.close()


def test_protocol_blobs_roundtrip() -> None:
    a, b = socket.socketpair()
    body = {"x": b"\x00\x01", "nested": [{"y": b"z" * 100}, 3, "s"], "n": None}
    protocol.send_message(a, body)
    assert protocol.recv_message(b).body == body
    r, w = os.pipe()
    protocol.send_message(a, {"fd": True}, [r])
    msg = protocol.recv_message(b)
    assert len(msg.fds) == 1 and os.fstat(msg.fds[0]).st_ino == os.fstat(r).st_ino
    for fd in (r, w, *msg.fds):
        os.close(fd)
    a.close()
    with pytest.raises(wire.ConnectionClosed):
        protocol.recv_message(b)
    b.close()
    assert struct.calcsize("<4sIII") == protocol.HEADER.size
