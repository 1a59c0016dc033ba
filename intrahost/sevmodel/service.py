"""The model platform service: the stand-in for the kernel that VMM processes talk to.

It owns everything a VMM must not be able to touch (the :class:`KvmModel` and the firmware
model) and serves requests over a unix socket (``protocol.py``), one reader thread per client
connection and one worker thread per request, so that a request can wait for a modelled
mutex while others go on.

**VM identity.** For every VM (and every model ``/dev/sev`` opened) the service creates a
``socketpair``, hands one end to the client and keeps the other. A fd that comes back in a
request (SCM_RIGHTS) is recognised by ``fstat`` (st_dev, st_ino) of the ends handed out;
anything else is ``EBADF``. When every copy of the client's end is closed the service's end
reads EOF and the VM loses that reference (like closing the last KVM VM fd). When a VM dies
(its context was moved away) the service shuts down the write side of its end, so a client
sees its identity fd readable at EOF: :meth:`ModelVm.is_dead` is a zero-timeout poll.

**Caller identity.** SO_PEERCRED gives the pid of each connection; (pid, process start time)
stands for ``current->mm``. ``/dev/sev`` fd numbers, memory ranges and RLIMIT_MEMLOCK are
looked up in ``/proc/<pid>``, so the service must run as the same user as its VMMs (it does
when a client starts it on demand).

**Killable.** A connection that goes away (its VMM was killed) kills the tasks it has in
flight: their killable waits end with EINTR and unwind exactly what they took; the vCPU
mutexes it held through ``vcpu_enter`` are released.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import secrets
import signal
import socket
import struct
import sys
import threading
import traceback
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from intrahost.sev.interface import VmType
from intrahost.sevmodel import protocol
from intrahost.sevmodel.firmware import FirmwareVersion, SecureProcessor
from intrahost.sevmodel.kvm_sev import IoctlFailure, KvmModel, ModelConfig, StructKvm
from intrahost.sevmodel.protocol import ServiceSocketError, recv_message
from intrahost.sevmodel.sync import Task
from intrahost.wire import ConnectionClosed, PayloadError, ProtocolError

log = logging.getLogger("intrahost.sevmodel")

_CAP_IPC_LOCK = 14


# ------------------------------------------------------------------------------------------
# identities


@dataclass(eq=False)
class Identity:
    """One handed-out socketpair end: a VM, or a model ``/dev/sev``."""

    kind: str
    key: tuple[int, int]
    end: socket.socket
    vm: StructKvm | None = None


# ------------------------------------------------------------------------------------------
# callers


def _read_proc(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/{name}", encoding="utf-8", errors="replace") as f:
        return f.read()


def process_start_time(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat: tells a pid's successive owners apart."""
    try:
        stat = _read_proc(pid, "stat")
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[19])


def misc_cgroup_of(pid: int) -> str:
    """The caller's misc cgroup (the v1 "misc" hierarchy, else the v2 one, else "/")."""
    try:
        lines = _read_proc(pid, "cgroup").splitlines()
    except OSError:
        return "/"
    unified = "/"
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if "misc" in parts[1].split(","):
            return parts[2] or "/"
        if parts[0] == "0" and parts[1] == "":
            unified = parts[2] or "/"
    return unified


@dataclass(eq=False)
class Connection:
    """One client connection; also the :class:`~kvm_sev.Caller` for its requests."""

    service: Service
    sock: socket.socket
    conn_id: int
    pid: int
    start_time: int
    alive: bool = True
    workers: int = 0
    tasks: set[Task] = field(default_factory=set)
    holders: set[Hashable] = field(default_factory=set)
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    # -- Caller -----------------------------------------------------------------------------
    @property
    def identity(self) -> tuple[int, int]:
        return (self.pid, self.start_time)

    def cgroup(self) -> str:
        return misc_cgroup_of(self.pid)

    def fd_is_sev_device(self, fd: int) -> bool:
        if fd < 0:
            return False
        try:
            st = os.stat(f"/proc/{self.pid}/fd/{fd}")
        except OSError:
            return False
        ident = self.service.identities.get((st.st_dev, st.st_ino))
        return ident is not None and ident.kind == "sev"

    def range_mapped_writable(self, addr: int, size: int) -> bool:
        try:
            maps = _read_proc(self.pid, "maps")
        except OSError:
            return False
        want, end = addr, addr + size
        spans = []
        for line in maps.splitlines():
            fields = line.split(maxsplit=2)
            if len(fields) < 2:
                continue
            lo_text, hi_text = fields[0].split("-")
            if "w" in fields[1]:
                spans.append((int(lo_text, 16), int(hi_text, 16)))
        for lo, hi in sorted(spans):
            if lo <= want < hi:
                want = hi
                if want >= end:
                    return True
        return want >= end

    def memlock_limit_pages(self) -> int | None:
        try:
            status = _read_proc(self.pid, "status")
            limits = _read_proc(self.pid, "limits")
        except OSError:
            return 0
        for line in status.splitlines():
            if line.startswith("CapEff:") and int(line.split()[1], 16) >> _CAP_IPC_LOCK & 1:
                return None
        for line in limits.splitlines():
            if line.startswith("Max locked memory"):
                soft = line[len("Max locked memory") :].split()[0]
                return None if soft == "unlimited" else int(soft) >> 12
        return None

    # -- replies ------------------------------------------------------------------------------
    def send(self, body: dict[str, Any], fds: list[int] | None = None) -> None:
        with self.send_lock:
            if self.sock.fileno() < 0:
                return
            with contextlib.suppress(ProtocolError):
                protocol.send_message(self.sock, body, fds or ())


# ------------------------------------------------------------------------------------------
# the service


Handler = Callable[[Connection, Task, dict[str, Any], list[int]], tuple[Any, list[int]]]


class Service:
    """Serves one :class:`KvmModel` on a unix socket."""

    def __init__(
        self,
        socket_path: str,
        config: ModelConfig | None = None,
        platform_key: bytes | None = None,
        test_hooks: bool = False,
    ) -> None:
        self.socket_path = socket_path
        self.config = config or ModelConfig()
        self.platform_key = platform_key or secrets.token_bytes(32)
        self.test_hooks = test_hooks
        self.firmware = SecureProcessor(
            self.platform_key,
            self.config.max_sev_asid,
            self.config.min_sev_asid,
            self.config.firmware,
        )
        self.model = KvmModel(self.config, self.firmware, self._vm_dead, self._vm_destroyed)
        self.identities: dict[tuple[int, int], Identity] = {}
        self._vm_identity: dict[int, Identity] = {}
        self._next_conn = 1
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._handlers: dict[str, Handler] = {
            "hello": self._op_hello,
            "open_sev": self._op_open_sev,
            "create_vm": self._op_create_vm,
            "create_vcpu": self._op_create_vcpu,
            "mem_enc_op": self._op_mem_enc_op,
            "register_region": self._op_register_region,
            "unregister_region": self._op_unregister_region,
            "move": self._op_move,
            "copy": self._op_copy,
            "vcpu_enter": self._op_vcpu_enter,
            "vcpu_exit": self._op_vcpu_exit,
            "vcpu_protected": self._op_vcpu_protected,
            "inspect": self._op_inspect,
            "platform_state": self._op_platform_state,
            "stop": self._op_stop,
        }
        if test_hooks:
            self._handlers["debug_hold_vcpu_creation"] = self._op_hold_vcpu_creation

    # -- lifetime -----------------------------------------------------------------------------
    def bind(self) -> None:
        """Create the listening socket (0600 in a 0700 directory), replacing a stale one."""
        directory = os.path.dirname(os.path.abspath(self.socket_path))
        protocol.ensure_private_dir(directory)
        if os.path.exists(self.socket_path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.socket_path)
            except OSError:
                os.unlink(self.socket_path)
            else:
                raise ServiceSocketError(
                    f"a platform service already listens on {self.socket_path}; stop it "
                    "first or choose another --socket"
                )
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(self.socket_path)
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        listener.listen(64)
        self._listener = listener

    def serve_forever(self) -> None:
        """Accept connections until :meth:`stop`."""
        if self._listener is None:
            self.bind()
        listener = self._listener
        assert listener is not None
        log.info("serving the SEV model platform on %s (pid %d)", self.socket_path, os.getpid())
        while not self._stopping.is_set():
            try:
                sock, _ = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    break
                raise
            self._start_connection(sock)
        self._cleanup()

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)

    def _cleanup(self) -> None:
        if self._listener is not None:
            self._listener.close()
        try:
            if os.path.exists(self.socket_path):
                os.unlink(self.socket_path)
        except OSError:
            pass

    # -- identities -----------------------------------------------------------------------------
    def _new_identity(self, kind: str, vm: StructKvm | None) -> tuple[Identity, socket.socket]:
        kept, given = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        st = os.fstat(given.fileno())
        ident = Identity(kind=kind, key=(st.st_dev, st.st_ino), end=kept, vm=vm)
        with self.model.cond:
            self.identities[ident.key] = ident
            if vm is not None:
                self._vm_identity[vm.vm_id] = ident
        threading.Thread(
            target=self._watch_identity, args=(ident,), name=f"watch-{kind}", daemon=True
        ).start()
        return ident, given

    def _watch_identity(self, ident: Identity) -> None:
        """EOF on our end: every copy of the client's end is closed."""
        while True:
            try:
                data = ident.end.recv(4096)
            except OSError:
                data = b""
            if not data:
                break
        with self.model.cond:
            self.identities.pop(ident.key, None)
            if ident.vm is not None:
                self._vm_identity.pop(ident.vm.vm_id, None)
        ident.end.close()
        if ident.vm is not None:
            # The fd's reference: the last one destroys the VM (frees its ASID if it still
            # has one, i.e. unless the context was moved away).
            self.model.kvm_put_kvm(ident.vm)

    def _vm_dead(self, vm: StructKvm) -> None:
        ident = self._vm_identity.get(vm.vm_id)
        if ident is not None:
            with contextlib.suppress(OSError):
                ident.end.shutdown(socket.SHUT_WR)

    def _vm_destroyed(self, vm: StructKvm) -> None:
        log.debug("destroyed %r", vm)

    def _vm_from_fd(self, fd: int) -> StructKvm | None:
        """The VM whose identity ``fd`` is, with a reference held (``fdget``); else None."""
        try:
            st = os.fstat(fd)
        except OSError:
            return None
        with self.model.cond:
            ident = self.identities.get((st.st_dev, st.st_ino))
            if ident is None or ident.vm is None or ident.vm.destroyed:
                return None
            self.model.kvm_get_kvm(ident.vm)
            return ident.vm

    # -- connections ----------------------------------------------------------------------------
    def _start_connection(self, sock: socket.socket) -> None:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, _uid, _gid = struct.unpack("3i", creds)
        conn = Connection(
            service=self,
            sock=sock,
            conn_id=self._next_conn,
            pid=pid,
            start_time=process_start_time(pid),
        )
        self._next_conn += 1
        threading.Thread(
            target=self._read_loop, args=(conn,), name=f"conn-{pid}", daemon=True
        ).start()

    def _read_loop(self, conn: Connection) -> None:
        while True:
            try:
                msg = recv_message(conn.sock)
            except ConnectionClosed:
                break
            except PayloadError as err:
                conn.send(_error_body(None, errno.EPROTO, f"malformed request: {err}"))
                continue
            except ProtocolError as err:
                log.warning("dropping connection of pid %d: %s", conn.pid, err)
                break
            with self.model.cond:
                conn.workers += 1
            threading.Thread(
                target=self._serve_request, args=(conn, msg), name="request", daemon=True
            ).start()
        self._connection_gone(conn)

    def _connection_gone(self, conn: Connection) -> None:
        """The client went away: kill what it waits for, release what it holds."""
        with self.model.cond:
            conn.alive = False
            for task in conn.tasks:
                task.killed = True
            self.model.cond.notify_all()
        released = self.model.release_holders(conn.holders)
        if released:
            log.info("pid %d went away holding vCPUs %s", conn.pid, released)
        self._maybe_close(conn)

    def _maybe_close(self, conn: Connection) -> None:
        with self.model.cond:
            if conn.alive or conn.workers:
                return
        with conn.send_lock:
            conn.sock.close()

    def _serve_request(self, conn: Connection, msg: protocol.Message) -> None:
        body = msg.body
        req_id = body.get("id")
        op = body.get("op")
        args = body.get("args", {})
        task = Task(name=f"pid {conn.pid} {op} #{req_id}")
        try:
            with self.model.cond:
                task.killed = not conn.alive
                conn.tasks.add(task)
            try:
                if not isinstance(op, str) or op not in self._handlers:
                    raise IoctlFailure(errno.EPROTO, f"unknown operation {op!r}")
                if not isinstance(args, dict):
                    raise IoctlFailure(errno.EPROTO, "args must be an object")
                task.cgroup = conn.cgroup()
                result, out_fds = self._handlers[op](conn, task, args, msg.fds)
            except IoctlFailure as err:
                conn.send(
                    _error_body(req_id, err.errno, err.detail, err.firmware_error, err.result)
                )
            except (KeyError, TypeError, ValueError, IndexError) as err:
                conn.send(_error_body(req_id, errno.EINVAL, f"malformed request: {err!r}"))
            except Exception as err:
                log.error("internal error serving %s: %s", op, traceback.format_exc())
                conn.send(
                    _error_body(req_id, errno.ENOTRECOVERABLE, f"internal model error: {err!r}")
                )
            else:
                try:
                    conn.send({"id": req_id, "ok": True, "result": result}, out_fds)
                finally:
                    for fd in out_fds:
                        os.close(fd)
                if op == "stop":
                    # Only after the reply, so that the client learns the stop was accepted.
                    self.stop()
        finally:
            for fd in msg.fds:
                os.close(fd)
            with self.model.cond:
                conn.tasks.discard(task)
                conn.workers -= 1
            self._maybe_close(conn)

    # -- operations -------------------------------------------------------------------------
    def _with_vm(self, fds: list[int], index: int = 0) -> StructKvm:
        if len(fds) <= index:
            raise IoctlFailure(errno.EBADF, "no VM fd was passed")
        vm = self._vm_from_fd(fds[index])
        if vm is None:
            raise IoctlFailure(errno.EBADF, "the fd is not a VM of this platform")
        return vm

    def info(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "name": "model",
            "sev_enabled": cfg.sev_enabled,
            "sev_es_enabled": cfg.sev_es_supported,
            "max_sev_asid": cfg.max_sev_asid,
            "min_sev_asid": cfg.min_sev_asid,
            "cbit_position": cfg.cbit_position,
            "api_major": cfg.firmware.api_major,
            "api_minor": cfg.firmware.api_minor,
            "build": cfg.firmware.build,
            "supported_vmsa_features": cfg.supported_vmsa_features,
            "supported_vm_types": [int(t) for t in self.model.supported_vm_types()],
            "sev_nr_max": cfg.sev_nr_max,
            "service_pid": os.getpid(),
            "test_hooks": self.test_hooks,
        }

    def _op_hello(
        self, conn: Connection, task: Task, args: dict[str, Any], fds: list[int]
    ) -> tuple[Any, list[int]]:
        return {"version": protocol.PROTOCOL_VERSION, "info": self.info(), "pid": conn.pid}, []

    def _op_open_sev(
        self, conn: Connection, task: Task, args: dict[str, Any], fds: list[int]
    ) -> tuple[Any, list[int]]:
        _ident, given = self._new_identity("sev", None)
        return {}, [given.detach()]

    def _op_create_vm(
        self, conn: Connection, task: Task, args: dict[str, Any], fds: list[int]
    ) -> tuple[Any, list[int]]:
        vm = self.model.create_vm(conn, int(args.get("type", 0)))
        _ident, given = self._new_identity("vm", vm)
        return {"vm": vm.vm_id, "type": int(vm.vm_type)}, [given.detach()]

    def _op_create_vcpu(
        self, conn: Connection, task: Task, args: dict[str, Any], fds: list[int]
    ) -> tuple[Any, list[int]]:
        vm = self._with_vm(fds)
        try:
            vcpu_id = args.get("vcpu_id")
            index = self.model.create_vcpu(
                task, conn, vm, None if vcpu_id is None else int(vcpu_id)
            )
        finally:
            self.model.kvm_put_kvm(vm)
        return {"index": index}, []

    def _op_mem_enc_op(
        self, conn: Connection, task: Task, args: dict[str, Any], fds: list[int]
    ) -> tuple[Any, list[int]]:
        vm = self._with_vm(fds)
        data = args.get("data")
        if data is not None and not isinstance(data, dict):
            raise IoctlFailure(errno.EINVAL, "data must be an object or null")
        try:
            result = self.model.sev_mem_enc_ioctl(
                task, conn, vm, int(args["cmd"]), data, int(args.get("sev_fd", -1))
            )
        finally:
            self.model.kvm_put_kvm(vm)
        return result, []

    def _op_register_region(
        self, conn: Connection, task: Task, args: dict[str, Any], fds: list[int]
    ) -> tuple[Any, list[int]]:
        vm = self._with_vm(fds)
        try:
            self.model.sev_mem_enc_register_region(
                task, conn, vm, int(args["addr"]), int(args["size"])
            )
        finally:
            self.model.kvm_put_kvm(vm)
        return {}, []

    def _op_unregister_region(
        self, conn: Connection, task: Task, args: dict[str, Any], fds: list[int]
    ) -> tuple[Any, list[int]]:
        vm = self._with_vm(fds)
        try:
            self.model.sev_mem_enc_unregister_region(
                task, conn, vm, int(args["addr"]), int(args["size"])
            )
        finally:
            self.model.kvm_put_kvm(vm)
        return {}, []

    def _move_or_copy(self, conn: Connection, task: Task, fds: list[int], move: bool) -> list[bool]:
        """MOVE or COPY into the VM of ``fds[0]``; returns which of its vCPUs are protected
        afterwards (the client's KVM vCPUs follow)."""
        dst = self._with_vm(fds)
        src = self._vm_from_fd(fds[1]) if len(fds) > 1 else None
        try:
            if move:
                self.model.sev_vm_move_enc_context_from(task, conn, dst, src)
            else:
                self.model.sev_vm_copy_enc_context_from(task, conn, dst, src)
            with self.model.cond:
                return [vcpu.guest_state_protected for vcpu in dst.vcpus]
        finally:
            if src is not None:
                self.model.kvm_put_kvm(src)
            self.model.kvm_put_kvm(dst)

    def _op_move(
        self, conn: Connection, task: Task, args: dict[str, Any], fds: list[int]
    ) -> tuple[Any, list[int]]:
        return {"protected": self._move_or_copy(conn, task, fds, move=True)}, []

    def _op_copy(
        self, conn: Connection, task: Task, args: dict[str, Any], fds: list[int]
    ) -> tuple[Any, list[int]]:
        self._move_or_copy(conn, task, fds, move=False)
        return {}, []

    def _holder(self, conn: Connection, args: dict[str, Any]) -> Hashable:
        return ("pid", conn.pid, "conn", conn.conn_id, "thread", int(args["thread"]))

    def _op_vcpu_enter(
        self, conn: Connection, task: Task, args: dict[str, Any], fds: list[int]
    ) -> tuple[Any, list[int]]:
        vm = self._with_vm(fds)
        holder = self._holder(conn, args)
        with self.model.cond:
            conn.holders.add(holder)
        try:
            vmsa = self.model.vcpu_enter(task, conn, vm, int(args["index"]), holder)
        finally:
            self.model.kvm_put_kvm(vm)
        return {"vmsa": vmsa}, []

    def _op_vcpu_exit(
        self, conn: Connection, task: Task, args: dict[str, Any], fds: list[int]
    ) -> tuple[Any, list[int]]:
        vm = self._with_vm(fds)
        vmsa = args.get("vmsa")
        if vmsa is not None and not isinstance(vmsa, bytes):
            raise IoctlFailure(errno.EINVAL, "vmsa must be bytes or null")
        try:
            self.model.vcpu_exit(vm, int(args["index"]), self._holder(conn, args), vmsa)
        finally:
            self.model.kvm_put_kvm(vm)
        return {}, []

    def _op_vcpu_protected(
        self, conn: Connection, task: Task, args: dict[str, Any], fds: list[int]
    ) -> tuple[Any, list[int]]:
        vm = self._with_vm(fds)
        try:
            protected = self.model.vcpu_protected(conn, vm, int(args["index"]))
        finally:
            self.model.kvm_put_kvm(vm)
        return {"protected": protected}, []

    def _op_inspect(
        self, conn: Connection, task: Task, args: dict[str, Any], fds: list[int]
    ) -> tuple[Any, list[int]]:
        vm = self._with_vm(fds)
        try:
            return self.model.inspect(vm), []
        finally:
            self.model.kvm_put_kvm(vm)

    def _op_platform_state(
        self, conn: Connection, task: Task, args: dict[str, Any], fds: list[int]
    ) -> tuple[Any, list[int]]:
        state = self.model.platform_state()
        state["identities"] = len(self.identities)
        return state, []

    def _op_stop(
        self, conn: Connection, task: Task, args: dict[str, Any], fds: list[int]
    ) -> tuple[Any, list[int]]:
        return {}, []

    def _op_hold_vcpu_creation(
        self, conn: Connection, task: Task, args: dict[str, Any], fds: list[int]
    ) -> tuple[Any, list[int]]:
        vm = self._with_vm(fds)
        try:
            with self.model.cond:
                vm.hold_vcpu_creation = bool(args["hold"])
                self.model.cond.notify_all()
        finally:
            self.model.kvm_put_kvm(vm)
        return {}, []


def _error_body(
    req_id: Any,
    err: int,
    detail: str,
    firmware_error: int | None = None,
    result: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": req_id,
        "ok": False,
        "errno": err,
        "firmware_error": None if firmware_error is None else int(firmware_error),
        "detail": detail,
        "result": result or {},
    }


# ------------------------------------------------------------------------------------------
# entry points


def load_platform_key(path: str) -> bytes:
    """The per-platform secret (the firmware's key), created on first use (mode 0600)."""
    try:
        with open(path, "rb") as f:
            key = f.read()
        if len(key) >= 16:
            return key
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="intrahost platform serve",
        description="Run the SEV model platform service (the software stand-in for KVM's SEV "
        "code and the AMD secure processor).",
    )
    parser.add_argument("--socket", default=protocol.default_socket_path(), help="socket path")
    parser.add_argument("--max-sev-asid", type=int, default=509, help="CPUID 0x8000001F ECX")
    parser.add_argument("--min-sev-asid", type=int, default=100, help="CPUID 0x8000001F EDX")
    parser.add_argument("--no-sev-es", action="store_true", help="disable SEV-ES")
    parser.add_argument("--no-snp", action="store_true", help="disable SEV-SNP (the VM type)")
    parser.add_argument(
        "--key-file", help="platform key file (default: sev-model.key next to the socket)"
    )
    parser.add_argument("--log-file", help="log here instead of stderr")
    parser.add_argument(
        "--test-hooks", action="store_true", help="enable the debug operations tests use"
    )
    return parser


def serve(
    socket_path: str,
    config: ModelConfig | None = None,
    key_file: str | None = None,
    test_hooks: bool = False,
) -> None:
    """Run the service in this process until SIGTERM/SIGINT or a ``stop`` request."""
    protocol.ensure_private_dir(os.path.dirname(os.path.abspath(socket_path)))
    key_path = key_file or os.path.join(os.path.dirname(socket_path), "sev-model.key")
    service = Service(socket_path, config, load_platform_key(key_path), test_hooks)
    service.bind()
    pid_path = socket_path + ".pid"
    with open(pid_path, "w", encoding="utf-8") as f:
        f.write(f"{os.getpid()}\n")

    def on_signal(signum: int, frame: object) -> None:
        service.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        service.serve_forever()
    finally:
        with contextlib.suppress(OSError):
            os.unlink(pid_path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        filename=args.log_file,
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    config = ModelConfig(
        max_sev_asid=args.max_sev_asid,
        min_sev_asid=args.min_sev_asid,
        sev_es_enabled=not args.no_sev_es,
        sev_snp_enabled=not args.no_snp,
        firmware=FirmwareVersion(),
    )
    try:
        serve(args.socket, config, args.key_file, args.test_hooks)
    except ServiceSocketError as err:
        print(f"intrahost platform serve: {err}", file=sys.stderr)
        return 1
    return 0


__all__ = ["Service", "VmType", "main", "serve"]

if __name__ == "__main__":
    sys.exit(main())
