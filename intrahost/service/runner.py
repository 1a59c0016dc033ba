"""A VMM process: one machine, its control socket, and its hand-offs in and out.

:class:`Vmm` serves a running machine until the guest stops, a client sends ``quit``, or the
guest is handed to another VMM (then this process ends with status 0). :func:`receive` is the
destination's start: it waits for one incoming hand-off on ``unix:PATH``.

Who may hand a guest in: the migration socket is 0600 (only this user, and root, can connect),
and :func:`receive` checks the connecting process's credentials (SO_PEERCRED): its uid must be
this VMM's own or one allowed with ``allow_uids`` (``--allow-uid``); root is no exception
unless this VMM runs as root. Any other connection gets an error message naming the option,
is logged with its pid and uid, and closed; the destination keeps waiting for its sender. A
sender of another uid (allowed) does not choose this VMM's console: the guest's serial output
goes where this VMM's own ``--serial`` says (default stdio), never to a file the sender names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Collection
from typing import Any

from intrahost.errors import IntrahostError
from intrahost.kvm import KvmError
from intrahost.migration.faults import NO_FAULTS, Faults
from intrahost.migration.protocol import Channel, ProtocolError, parse_url
from intrahost.migration.receiver import ReceiveOptions, Receiver
from intrahost.migration.sender import MigrationFailed, Sender
from intrahost.service.api import (
    MAX_SOCKET_PATH,
    ApiServer,
    CommandError,
    check_socket_directory,
    socket_state,
)
from intrahost.service.settings import RunSettings
from intrahost.vmm.guests.probe import CounterProbe, DiskProbe
from intrahost.vmm.machine import Machine

log = logging.getLogger(__name__)

#: How long a source keeps its control socket after handing off, so the client that asked
#: for the migration can read the result.
LINGER_AFTER_HANDOFF = 2.0


class IncomingError(IntrahostError):
    """The destination could not receive a guest."""


class Vmm:
    """Serves ``machine`` on the control socket at ``api_path`` (if any). ``faults``: the
    fault tests' hooks for its hand-offs out (the process builds them from its environment
    with :func:`intrahost.migration.faults.from_environment`); none by default. ``settings``:
    how the process was started, for ``query-settings`` (an upgrade's new VMM inherits them)."""

    def __init__(
        self,
        machine: Machine,
        api_path: str | None = None,
        faults: Faults = NO_FAULTS,
        settings: RunSettings | None = None,
    ) -> None:
        self.machine = machine
        self.api_path = api_path
        self.faults = faults
        self.settings = settings or RunSettings(f"vm-{os.getpid()}", api_path)
        self.api: ApiServer | None = None
        self._done = threading.Event()
        self._quit = False
        self._handed_off = False
        self._migration: dict[str, Any] = {"status": "none"}
        self._migration_thread: threading.Thread | None = None
        self._migration_lock = threading.Lock()
        self._status_read_after_handoff = threading.Event()
        machine.on_guest_stop = self._guest_stopped

    # --- control socket ------------------------------------------------------------------------

    def open_api(self, take_over: bool = False) -> None:
        """Bind the control socket. With ``take_over``, bind beside ``api_path`` and rename
        over it: the path then reaches this VMM at once, even if an old VMM still listens
        on the inode it replaced (the upgrade's socket hand-over)."""
        if self.api_path is None:
            return
        path = f"{self.api_path}.new-{os.getpid()}" if take_over else self.api_path
        api = ApiServer(path)
        self._register(api)
        api.start()
        if take_over:
            os.rename(path, self.api_path)
            api.path = self.api_path
        self.api = api

    def _register(self, api: ApiServer) -> None:
        api.register("query-status", lambda _a: self._query_status())
        api.register("stop", lambda _a: self._stop())
        api.register("cont", lambda _a: self._cont())
        api.register("quit", lambda _a: self._request_quit())
        api.register("query-vm", lambda _a: self._query_vm())
        api.register("query-block", lambda _a: self.machine.query_block())
        api.register("migrate", self._migrate, {"uri": (str, True)})
        api.register("query-migrate", lambda _a: self._query_migrate())
        api.register("query-settings", lambda _a: self._query_settings())

    def _emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        if self.api is not None:
            self.api.emit(event, data)

    def _query_status(self) -> dict[str, Any]:
        status = "postmigrate" if self._handed_off else self.machine.status
        return {"status": status, "running": status == "running"}

    def _query_vm(self) -> dict[str, Any]:
        """The machine's own description, plus a built-in guest's view of itself (read from
        guest memory): the counter guest's status slots, the disk guest's progress."""
        info = self.machine.query()
        info["console"] = self.machine.uart.console.description
        if self.machine.config.guest == "counter":
            counters = CounterProbe(self.machine.memory.buffer).counters()
            if counters is not None:
                info["counter"] = counters
        elif self.machine.config.guest == "disk":
            progress = DiskProbe(self.machine.memory.buffer).progress()
            if progress is not None:
                info["disk"] = progress
        return info

    def _query_settings(self) -> dict[str, Any]:
        """How this VMM was started: its run settings, the machine's configuration and its
        console (what ``intrahost upgrade`` gives the new VMM by default)."""
        return self.settings.to_dict() | {
            "config": self.machine.config.to_dict(),
            "console": self.machine.uart.console.description,
        }

    def _stop(self) -> None:
        self._check_not_migrating()
        if self.machine.status == "running":
            self.machine.pause()
            self._emit("STOP")

    def _cont(self) -> None:
        self._check_not_migrating()
        if self.machine.status == "paused":
            self.machine.resume()
            self._emit("RESUME")

    def _check_not_migrating(self) -> None:
        if self._migration.get("status") == "active":
            raise CommandError(
                f"a migration to {self._migration.get('uri')} is in progress; wait for it to "
                "end (query-migrate)"
            )
        if self._handed_off:
            raise CommandError("the guest was handed to another VMM")
        if self.machine.status == "shutdown":
            raise CommandError("the guest has shut down")

    def _request_quit(self) -> None:
        self._quit = True
        self._done.set()

    def _guest_stopped(self) -> None:
        self._emit("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
        self._done.set()

    # --- migration out -------------------------------------------------------------------------

    def _migrate(self, args: dict[str, Any]) -> None:
        uri = args["uri"]
        with self._migration_lock:
            if self._migration.get("status") == "active":
                raise CommandError(
                    f"a migration to {self._migration.get('uri')} is already in progress; "
                    "wait for it to end (query-migrate) before starting another"
                )
            if self._handed_off:
                raise CommandError("the guest was already handed to another VMM")
            if self.machine.status == "shutdown":
                raise CommandError("the guest has shut down: there is nothing to migrate")
            try:
                parse_url(uri)
            except IntrahostError as e:
                raise CommandError(str(e)) from None
            self._migration = {"status": "active", "uri": uri}
            self._migration_thread = threading.Thread(
                target=self._run_migration, args=(uri,), name="migration", daemon=True
            )
            self._migration_thread.start()

    def _run_migration(self, uri: str) -> None:
        self._emit("MIGRATION", {"status": "active"})
        log.info("migration to %s started", uri)
        sender = Sender(self.machine, uri, faults=self.faults)
        try:
            breakdown = sender.run()
        except MigrationFailed as e:
            with self._migration_lock:
                self._migration = {"status": "failed", "uri": uri, "error-desc": str(e)}
            self._emit("MIGRATION", {"status": "failed", "error-desc": str(e)})
            log.warning("%s", e)
            return
        except Exception as e:
            log.exception("migration failed")
            with self._migration_lock:
                self._migration = {"status": "failed", "uri": uri, "error-desc": str(e)}
            self._emit("MIGRATION", {"status": "failed", "error-desc": str(e)})
            return
        log.info("migration to %s completed: %s", uri, breakdown)
        with self._migration_lock:
            self._handed_off = True
            self._migration = {"status": "completed", "uri": uri, "blackout": breakdown.to_dict()}
        self._emit("MIGRATION", {"status": "completed", "blackout": breakdown.to_dict()})
        self._done.set()

    def _query_migrate(self) -> dict[str, Any]:
        with self._migration_lock:
            result = dict(self._migration)
        if self._handed_off:
            self._status_read_after_handoff.set()
        return result

    @property
    def handed_off(self) -> bool:
        return self._handed_off

    # --- lifetime ------------------------------------------------------------------------------

    def serve(self) -> int:
        """Run until the guest stops, ``quit``, or a completed hand-off; the exit status."""
        try:
            while not self._done.wait(0.5):
                pass
        except KeyboardInterrupt:
            log.info("interrupted")
        return self.shutdown()

    def shutdown(self) -> int:
        if self._handed_off:
            # The destination runs the guest: release this VM without touching the guest.
            log.info("handed off; releasing the VM")
            self._release_after_handoff()
            log.info("released; waiting for the migration's client")
            self._status_read_after_handoff.wait(LINGER_AFTER_HANDOFF)
            self._close_api()
            log.info("control socket closed")
            return 0
        self._emit(
            "SHUTDOWN",
            {"guest": False, "reason": "host-qmp-quit" if self._quit else "guest-shutdown"},
        )
        self._close_api()
        self.machine.close()
        code = self.machine.exit_code
        return 0 if code in (None, 0) else 1

    def _release_after_handoff(self) -> None:
        try:
            self.machine.close()
        except KvmError as e:
            # A dead VM (its SEV context moved away) answers EIO: expected here.
            if e.errno != errno.EIO:
                raise

    def _close_api(self) -> None:
        if self.api is not None:
            self.api.close()
            self.api = None


# --- the destination ---------------------------------------------------------------------------


def listen(url: str) -> socket.socket:
    """The incoming socket at ``unix:PATH``, mode 0600: a stale socket file is replaced, a
    live one refused, and anything else at the path (a file, a symlink) left alone."""
    path = parse_url(url)
    try:
        state = socket_state(path)
    except OSError as e:
        raise IncomingError(f"{path} exists and is not a usable socket: {e.strerror}") from None
    if state == "not-a-socket":
        raise IncomingError(f"{path} exists and is not a socket: remove it or choose another path")
    check_socket_directory(path, "migration socket")
    if state == "live":
        raise IncomingError(f"another VMM already waits at {path}")
    if state == "stale":
        os.unlink(path)
    # Bind beside the path, listen, then rename into place: the path appears only once a
    # connection to it can succeed (a source that sees the file may connect at once).
    staging = f"{path}.{os.getpid()}.tmp"
    if len(os.fsencode(staging)) > MAX_SOCKET_PATH:
        extra = len(os.fsencode(staging)) - len(os.fsencode(path))
        raise IncomingError(
            f"migration socket path {path} is too long: use at most {MAX_SOCKET_PATH - extra} "
            f"bytes (a unix socket path holds {MAX_SOCKET_PATH}, and the VMM first binds a "
            f"name {extra} bytes longer beside it)"
        )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(staging)
    except OSError as e:
        sock.close()
        raise IncomingError(f"cannot create the migration socket {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    if stat.S_IMODE(os.lstat(staging).st_mode) != 0o600:
        os.chmod(staging, 0o600)
    sock.listen(1)
    os.rename(staging, path)
    return sock


def receive(
    url: str,
    options: ReceiveOptions | None = None,
    timeout: float | None = None,
    listener: socket.socket | None = None,
    allow_uids: Collection[int] = (),
    faults: Faults = NO_FAULTS,
) -> Machine:
    """Wait for one hand-off at ``url`` and return the machine it brought (running, or
    paused if the guest was paused on the source). Connections from a uid other than this
    process's and not in ``allow_uids`` are refused (see the module docstring). ``faults``:
    the fault tests' hooks (see :class:`Vmm`)."""
    options = options or ReceiveOptions()
    sock = listener or listen(url)
    path = parse_url(url)
    try:
        conn, uid = _accept_sender(sock, path, timeout, allow_uids)
        if uid != os.getuid():
            # An allowed sender of another uid: the console is this VMM's choice, not its.
            overrides = {**options.overrides, "serial": options.overrides.get("serial", "stdio")}
            options = dataclasses.replace(options, overrides=overrides)
        channel = Channel(conn, options.timeout, faults)
        receiver = Receiver(channel, options, faults=faults)
        try:
            machine = receiver.run()
        finally:
            with contextlib.suppress(OSError):
                channel.close()
        if machine is None:
            raise IncomingError(f"incoming hand-off failed: {receiver.error or 'abandoned'}")
        return machine
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _accept_sender(
    sock: socket.socket, path: str, timeout: float | None, allow_uids: Collection[int]
) -> tuple[socket.socket, int]:
    """The first connection whose peer may hand a guest in, and its uid; others are told
    why, logged and closed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        try:
            if left is not None and left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            conn, _ = sock.accept()
        except TimeoutError:
            raise IncomingError(f"no hand-off arrived at {path} within {timeout} s") from None
        pid, uid = peer_credentials(conn)
        reason = refusal(uid, allow_uids)
        if reason is None:
            if uid != os.getuid():
                log.info("accepted a hand-off connection from pid %d, uid %d (allowed)", pid, uid)
            return conn, uid
        log.warning("refused a hand-off connection from pid %d: %s", pid, reason)
        with contextlib.suppress(ProtocolError, OSError):
            Channel(conn, 1.0).error(f"this VMM refuses the hand-off: {reason}")
        conn.close()


def refusal(uid: int, allow_uids: Collection[int] = ()) -> str | None:
    """Why a sender of ``uid`` may not hand a guest to this process (None: it may)."""
    ours = os.getuid()
    if uid == ours or uid in allow_uids:
        return None
    return (
        f"uid {uid} is not this VMM's uid {ours}; to accept it, start the destination "
        f"with --allow-uid {uid}"
    )


def peer_credentials(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a unix socket, as the kernel recorded
    them when it connected (SO_PEERCRED)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return int(pid), int(uid)


def wait_for_socket(path: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise IncomingError(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)
