"""The model platform as a VMM sees it: :class:`ModelPlatform` and :class:`ModelVm`.

Every operation is a request to the platform service (``service.py``) on one connection per
platform object; requests from different threads are in flight at the same time (a MOVE that
waits for a vCPU does not stop the vCPU thread from calling :meth:`ModelVm.vcpu_exit`).

The service is found at :func:`~intrahost.sevmodel.protocol.default_socket_path` (or the
path given) and started on demand, like an agent: under an exclusive lock on
``<socket>.lock`` so that two VMMs starting at once start one service, detached from the
caller, logging to ``<socket>.log``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import intrahost
from intrahost.errors import IntrahostError
from intrahost.kvm import Vm
from intrahost.sev.interface import (
    LAUNCH_MEASURE_BLOB_LEN,
    Attachment,
    GuestState,
    GuestStatus,
    PlatformInfo,
    SevCommand,
    SevError,
    SevPlatform,
    SevVm,
    VmType,
    firmware_error_from_code,
)
from intrahost.sev.platforms import PlatformUnavailableError
from intrahost.sevmodel import protocol
from intrahost.sevmodel.attached import AttachedVm
from intrahost.sevmodel.protocol import ServiceSocketError, recv_message, send_message
from intrahost.wire import ProtocolError

# ------------------------------------------------------------------------------------------
# the connection


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    body: dict[str, Any] | None = None
    fds: list[int] = field(default_factory=list)


class _Channel:
    """One connection to the service, shared by the threads of one process."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.sock = sock
        self.path = path
        self.pid = os.getpid()
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._broken: str | None = None
        self._reader = threading.Thread(target=self._read_loop, name="sev-model", daemon=True)
        self._reader.start()

    def _read_loop(self) -> None:
        reason = "the platform service closed the connection"
        while True:
            try:
                msg = recv_message(self.sock)
            except ProtocolError as err:
                reason = f"lost the platform service: {err}"
                break
            req_id = msg.body.get("id")
            with self._lock:
                pending = self._pending.pop(req_id, None) if isinstance(req_id, int) else None
            if pending is None:
                for fd in msg.fds:
                    os.close(fd)
                continue
            pending.body, pending.fds = msg.body, msg.fds
            pending.done.set()
        with self._lock:
            self._broken = reason
            waiting, self._pending = self._pending, {}
        for pending in waiting.values():
            pending.done.set()

    def call(
        self, op: str, args: dict[str, Any], fds: Sequence[int] = ()
    ) -> tuple[dict[str, Any], list[int]]:
        """Send a request and wait for its reply: (reply body, received fds)."""
        pending = _Pending()
        with self._lock:
            if self._broken is not None:
                raise PlatformUnavailableError(f"{self._broken} ({self.path})")
            req_id = self._next_id
            self._next_id += 1
            self._pending[req_id] = pending
        try:
            with self._send_lock:
                send_message(self.sock, {"id": req_id, "op": op, "args": args}, list(fds))
        except ProtocolError as err:
            with self._lock:
                self._pending.pop(req_id, None)
            raise PlatformUnavailableError(
                f"could not talk to the SEV model platform service at {self.path}: {err}"
            ) from err
        pending.done.wait()
        if pending.body is None:
            raise PlatformUnavailableError(
                f"{self._broken} while waiting for {op} ({self.path}); see {self.path}.log"
            )
        return pending.body, pending.fds

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._reader.join(timeout=5)
        self.sock.close()


def _try_connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError as err:
        sock.close()
        raise PlatformUnavailableError(
            f"cannot connect to the SEV model platform service at {path}: {err}"
        ) from err
    return sock


_LAUNCHER = (
    "import subprocess, sys\n"
    "subprocess.Popen(sys.argv[1:], start_new_session=True, stdin=subprocess.DEVNULL,"
    " stdout=subprocess.DEVNULL, stderr=open(sys.argv[-1] + '.stderr', 'ab'), close_fds=True)\n"
)


def start_service(path: str, extra_args: Sequence[str] = ()) -> None:
    """Start ``python -m intrahost.sevmodel.service`` detached (reparented away from us)."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(intrahost.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    command = [
        sys.executable,
        "-m",
        "intrahost.sevmodel.service",
        *extra_args,
        "--log-file",
        path + ".log",
        "--socket",
        path,
    ]
    subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *command], env=env, check=True, cwd="/", timeout=30
    )


def connect(path: str, autostart: bool = True, timeout: float = 15.0) -> socket.socket:
    """A connection to the service at ``path``, starting the service if nobody listens."""
    sock = _try_connect(path)
    if sock is not None:
        return sock
    if not autostart:
        raise PlatformUnavailableError(
            f"no SEV model platform service listens on {path}; start one with "
            f"`intrahost platform serve --socket {path}`"
        )
    directory = os.path.dirname(os.path.abspath(path))
    try:
        protocol.ensure_private_dir(directory)
    except (OSError, ServiceSocketError) as err:
        raise PlatformUnavailableError(f"cannot use {directory} for the service: {err}") from err
    with open(path + ".lock", "a+b") as lock:
        os.fchmod(lock.fileno(), 0o600)
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        sock = _try_connect(path)
        if sock is not None:
            return sock
        try:
            start_service(path)
        except (OSError, subprocess.SubprocessError) as err:
            raise PlatformUnavailableError(
                f"could not start the SEV model platform service: {err}"
            ) from err
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sock = _try_connect(path)
            if sock is not None:
                return sock
            time.sleep(0.02)
    raise PlatformUnavailableError(
        f"started the SEV model platform service but it does not answer on {path} after "
        f"{timeout:.0f} s; see {path}.log and {path}.stderr"
    )


# ------------------------------------------------------------------------------------------
# memory of this process


def _readable(addr: int, size: int) -> bool:
    """Whether [addr, addr+size) is mapped readable in this process (no fault on copy)."""
    want, end = addr, addr + size
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            spans = []
            for line in f:
                fields = line.split(maxsplit=2)
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if "r" in fields[1]:
                    spans.append((lo, hi))
    except OSError:
        return False
    for lo, hi in sorted(spans):
        if lo <= want < hi:
            want = hi
            if want >= end:
                return True
    return size > 0 and want >= end


# ------------------------------------------------------------------------------------------
# platform and VM


_OP_NAMES = {
    "create_vm": "KVM_CREATE_VM",
    "create_vcpu": "KVM_CREATE_VCPU",
    "register_region": "KVM_MEMORY_ENCRYPT_REG_REGION",
    "unregister_region": "KVM_MEMORY_ENCRYPT_UNREG_REGION",
    "move": "KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM",
    "copy": "KVM_CAP_VM_COPY_ENC_CONTEXT_FROM",
    "vcpu_enter": "KVM_RUN (vcpu_enter)",
    "vcpu_exit": "KVM_RUN (vcpu_exit)",
    "vcpu_protected": "vcpu_protected",
}


def _command_name(cmd: int) -> str:
    try:
        return f"KVM_SEV_{SevCommand(cmd).name}"
    except ValueError:
        return f"KVM_MEMORY_ENCRYPT_OP({cmd})"


class ModelPlatform(SevPlatform):
    """The model platform, reached through its service."""

    def __init__(self, socket_path: str | None = None, *, autostart: bool = True) -> None:
        self.socket_path = socket_path or protocol.default_socket_path()
        self._autostart = autostart
        self._channel_lock = threading.Lock()
        self._channel = _Channel(connect(self.socket_path, autostart), self.socket_path)
        hello, _ = self._channel.call("hello", {})
        result = self._result("hello", hello)
        if result.get("version") != protocol.PROTOCOL_VERSION:
            raise PlatformUnavailableError(
                f"the service at {self.socket_path} speaks protocol {result.get('version')}, "
                f"this client {protocol.PROTOCOL_VERSION}; restart the service"
            )
        raw = result["info"]
        self._info = PlatformInfo(
            name="model",
            sev_enabled=raw["sev_enabled"],
            sev_es_enabled=raw["sev_es_enabled"],
            max_sev_asid=raw["max_sev_asid"],
            min_sev_asid=raw["min_sev_asid"],
            cbit_position=raw["cbit_position"],
            api_major=raw["api_major"],
            api_minor=raw["api_minor"],
            build=raw["build"],
            supported_vmsa_features=raw["supported_vmsa_features"],
            supported_vm_types=tuple(VmType(t) for t in raw["supported_vm_types"]),
            sev_nr_max=raw["sev_nr_max"],
        )
        self.service_pid: int = raw["service_pid"]
        _, fds = self.call("open_sev", {})
        #: This process's model ``/dev/sev`` (passed by number with every SEV command).
        self.sev_fd = fds[0]

    # -- plumbing -----------------------------------------------------------------------------
    def _live_channel(self) -> _Channel:
        with self._channel_lock:
            if self._channel.pid != os.getpid():
                # After fork: the child needs its own connection (its own SO_PEERCRED pid).
                self._channel = _Channel(
                    connect(self.socket_path, self._autostart), self.socket_path
                )
            return self._channel

    @staticmethod
    def _result(operation: str, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("ok"):
            result = body.get("result")
            return result if isinstance(result, dict) else {}
        code = body.get("firmware_error")
        raise SevError(
            operation,
            int(body.get("errno", errno.EPROTO)),
            None if code is None else firmware_error_from_code(int(code)),
            str(body.get("detail", "")),
        )

    def call(
        self, op: str, args: dict[str, Any], fds: Sequence[int] = (), operation: str = ""
    ) -> tuple[dict[str, Any], list[int]]:
        """One request; raises :class:`SevError` with ``operation`` as its name on failure."""
        body, got = self._live_channel().call(op, args, fds)
        try:
            return self._result(operation or _OP_NAMES.get(op, op), body), got
        except SevError:
            for fd in got:
                os.close(fd)
            raise

    # -- SevPlatform ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return "model"

    @property
    def info(self) -> PlatformInfo:
        return self._info

    def create_vm(self, vm_type: VmType = VmType.DEFAULT) -> ModelVm:
        result, fds = self.call("create_vm", {"type": int(vm_type)})
        return ModelVm(self, fds[0], VmType(result["type"]), result["vm"])

    def adopt_vm(self, fd: int) -> ModelVm:
        result, _ = self.call("inspect", {}, [fd], "adopt_vm")
        return ModelVm(self, fd, VmType[result["type"]], result["vm"])

    def attach(self, vm: Vm, vm_type: VmType = VmType.DEFAULT) -> Attachment:
        """A new model VM of ``vm_type`` bound to ``vm``, a real KVM VM the VMM built, with no
        vCPUs yet.

        The KVM VM comes back as an :class:`~intrahost.sevmodel.attached.AttachedVm` that took
        over ``vm``'s fd (``vm`` is closed): the VMM owns and uses that one, which answers as
        the kernel's SEV VM of that type does (dead after a MOVE away, protected vCPU state).
        The real KVM VM stays of the default type (this host's KVM has no SEV types): the
        model VM's type is the one that counts.
        """
        model_vm = self.create_vm(vm_type)
        kvm_vm = AttachedVm(vm.detach(), vm.kvm, model_vm)
        model_vm.kvm_vm = kvm_vm
        return Attachment(model_vm, kvm_vm)

    def platform_state(self) -> dict[str, Any]:
        """ASIDs in use and to reclaim, firmware guests, cgroup usage (model only)."""
        result, _ = self.call("platform_state", {})
        return result

    def stop_service(self) -> None:
        """Ask the service to exit (every VM of every client goes with it)."""
        self.call("stop", {})

    def close(self) -> None:
        if self.sev_fd >= 0:
            os.close(self.sev_fd)
            self.sev_fd = -1
        self._channel.close()


class ModelVm(SevVm):
    """A VM of the model platform; ``fd`` is its identity (one end of a socketpair)."""

    def __init__(self, platform: ModelPlatform, fd: int, vm_type: VmType, vm_id: int) -> None:
        self.platform = platform
        self._fd = fd
        self._vm_type = vm_type
        #: The service's number for this VM (diagnostics only).
        self.vm_id = vm_id
        #: The VMM's KVM VM, for a VM made by :meth:`ModelPlatform.attach`.
        self.kvm_vm: AttachedVm | None = None

    def __repr__(self) -> str:
        return f"<ModelVm {self.vm_id} fd={self._fd} {self._vm_type.name}>"

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def vm_type(self) -> VmType:
        return self._vm_type

    def _call(
        self,
        op: str,
        args: dict[str, Any],
        extra_fds: Sequence[int] = (),
        operation: str = "",
    ) -> dict[str, Any]:
        name = operation or _OP_NAMES.get(op, op)
        if self._fd < 0:
            raise SevError(name, errno.EBADF, detail="the VM fd is closed")
        result, _ = self.platform.call(op, args, [self._fd, *extra_fds], name)
        return result

    def _enc(self, cmd: SevCommand | int, data: dict[str, Any] | None) -> dict[str, Any]:
        return self._call(
            "mem_enc_op",
            {"cmd": int(cmd), "sev_fd": self.platform.sev_fd, "data": data},
            operation=_command_name(cmd),
        )

    # -- SevVm ------------------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int | None = None) -> int:
        return int(self._call("create_vcpu", {"vcpu_id": vcpu_id})["index"])

    def sev_init(self) -> None:
        self._enc(SevCommand.INIT, None)

    def sev_es_init(self) -> None:
        self._enc(SevCommand.ES_INIT, None)

    def sev_init2(self, vmsa_features: int = 0, ghcb_version: int = 0, flags: int = 0) -> None:
        self._enc(
            SevCommand.INIT2,
            {"vmsa_features": vmsa_features, "ghcb_version": ghcb_version, "flags": flags},
        )

    def launch_start(
        self, policy: int, dh_cert: bytes = b"", session: bytes = b"", handle: int = 0
    ) -> int:
        data = {"handle": handle, "policy": policy, "dh_cert": dh_cert, "session": session}
        return int(self._enc(SevCommand.LAUNCH_START, data)["handle"])

    def launch_update_data(self, uaddr: int, length: int) -> None:
        # The firmware measures the plaintext; in the model that is read here, in the VMM's own
        # process (the service checks the range is pinnable before it uses the bytes).
        content = (
            ctypes.string_at(uaddr, length) if length > 0 and _readable(uaddr, length) else b""
        )
        self._enc(SevCommand.LAUNCH_UPDATE_DATA, {"uaddr": uaddr, "len": length, "bytes": content})

    def launch_update_vmsa(self, vmsas: Sequence[bytes] | None = None) -> None:
        """On an attached VM, ``None`` stands for the register state of its KVM vCPUs, which
        is protected afterwards (and their FPU state confidential, as the kernel marks it)."""
        if vmsas is None and self.kvm_vm is not None:
            vmsas = [vcpu.capture_vmsa() for vcpu in self.kvm_vm.vcpus]
        data = None if vmsas is None else {"vmsas": [bytes(v) for v in vmsas]}
        self._enc(SevCommand.LAUNCH_UPDATE_VMSA, data)
        if self.kvm_vm is not None:
            for vcpu in self.kvm_vm.vcpus:
                vcpu.protected = True
                vcpu.fpu_confidential = True

    def launch_measure(self) -> bytes:
        result = self._enc(SevCommand.LAUNCH_MEASURE, {"len": LAUNCH_MEASURE_BLOB_LEN})
        return bytes(result["blob"])

    def launch_secret(self, header: bytes, data: bytes, guest_uaddr: int) -> None:
        self._enc(
            SevCommand.LAUNCH_SECRET,
            {"hdr": header, "trans": data, "guest_uaddr": guest_uaddr, "guest_len": len(data)},
        )
        # The model's transport is plaintext: the firmware's write into guest memory is done
        # here, into the range the service has just checked is mapped writable.
        ctypes.memmove(guest_uaddr, data, len(data))

    def launch_finish(self) -> None:
        self._enc(SevCommand.LAUNCH_FINISH, None)

    def guest_status(self) -> GuestStatus:
        result = self._enc(SevCommand.GUEST_STATUS, {})
        return GuestStatus(result["handle"], result["policy"], GuestState(result["state"]))

    def raw_command(self, command: int) -> None:
        self._enc(command, None)

    def register_region(self, addr: int, size: int) -> None:
        self._call("register_region", {"addr": addr, "size": size})

    def unregister_region(self, addr: int, size: int) -> None:
        self._call("unregister_region", {"addr": addr, "size": size})

    def _source(self, src_fd: int) -> list[int]:
        # args[0] is an fd number of this process: if it is not open, the kernel's fdget fails
        # (EBADF), but only after the checks on the destination; the service does them all.
        try:
            os.fstat(src_fd)
        except (OSError, OverflowError):
            return []
        return [src_fd]

    def move_enc_context_from(self, src_fd: int) -> None:
        """On an attached VM, the KVM vCPUs' state is protected afterwards if the context
        that moved in is SEV-ES (the service answers which vCPUs are protected)."""
        result = self._call("move", {}, self._source(src_fd))
        if self.kvm_vm is not None:
            protected = result.get("protected", [])
            for vcpu in self.kvm_vm.vcpus:
                vcpu.protected = vcpu.index < len(protected) and bool(protected[vcpu.index])

    def copy_enc_context_from(self, src_fd: int) -> None:
        self._call("copy", {}, self._source(src_fd))

    def vcpu_enter(self, index: int) -> bytes | None:
        result = self._call("vcpu_enter", {"index": index, "thread": threading.get_ident()})
        vmsa = result.get("vmsa")
        return None if vmsa is None else bytes(vmsa)

    def vcpu_exit(self, index: int, vmsa: bytes | None = None) -> None:
        self._call(
            "vcpu_exit",
            {"index": index, "thread": threading.get_ident(), "vmsa": vmsa},
        )

    def vcpu_protected(self, index: int) -> bool:
        return bool(self._call("vcpu_protected", {"index": index})["protected"])

    def is_dead(self) -> bool:
        # The service shuts down its end's write side when the VM dies: our end reads EOF.
        if self._fd < 0:
            raise SevError("is_dead", errno.EBADF, detail="the VM fd is closed")
        poller = select.poll()
        poller.register(self._fd, select.POLLIN | select.POLLRDHUP)
        return bool(poller.poll(0))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- model only ---------------------------------------------------------------------------
    def inspect(self) -> dict[str, Any]:
        """The service's view of this VM (works on dead VMs and from any process)."""
        return self._call("inspect", {})

    def hold_vcpu_creation(self, hold: bool) -> None:
        """Test hook: keep vCPU creation between its two ``kvm->lock`` sections."""
        self._call("debug_hold_vcpu_creation", {"hold": hold})


# ------------------------------------------------------------------------------------------
# stopping the service


class ServiceInUse(IntrahostError):
    """The model platform service still holds VMs of running guests: it is not stopped."""


def _pid_running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie, exited but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def stop_service(path: str, timeout: float = 10.0) -> int | None:
    """Ask the service at ``path`` to exit, and wait until it has; its pid, or None if no
    service listens there (none is started).

    Refused with :class:`ServiceInUse` while the service holds a VM: the VMMs of those
    guests use it for every SEV command and every vCPU entry, so they must stop (or hand
    their guests off and stop) first. The check and the stop are two requests; a VM created
    between them goes down with the service, as with SIGTERM.
    """
    try:
        platform = ModelPlatform(path, autostart=False)
    except PlatformUnavailableError:
        return None
    try:
        pid = platform.service_pid
        vms = platform.platform_state()["vms"]
        if vms:
            raise ServiceInUse(
                f"the SEV model platform service at {path} (pid {pid}) still holds "
                f"{len(vms)} VM{'s' if len(vms) > 1 else ''} of running SEV guests: stop their "
                "VMMs first (`intrahost stop --api-socket ...`); stopping it would leave those "
                "guests without their platform"
            )
        platform.stop_service()
    finally:
        platform.close()
    deadline = time.monotonic() + timeout
    while _pid_running(pid):
        if time.monotonic() > deadline:
            raise PlatformUnavailableError(
                f"the SEV model platform service (pid {pid}) accepted the stop but has not "
                f"exited after {timeout:.0f} s"
            )
        time.sleep(0.01)
    return pid


def stop_main(argv: Sequence[str]) -> int:
    """``intrahost platform stop [--socket PATH]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="intrahost platform stop",
        description="Ask the running SEV model platform service to exit (refused while SEV "
        "guests use it).",
    )
    parser.add_argument("--socket", default=protocol.default_socket_path(), help="socket path")
    args = parser.parse_args(list(argv))
    pid = stop_service(args.socket)
    if pid is None:
        print(f"no SEV model platform service listens on {args.socket}: nothing to stop")
    else:
        print(f"stopped the SEV model platform service (pid {pid}) at {args.socket}")
    return 0
