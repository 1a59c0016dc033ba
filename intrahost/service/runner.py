"""A VMM process: one machine, its control socket, and its hand-offs in and out.

:class:`Vmm` serves a running machine until the guest stops, a client sends ``quit``, the
process gets SIGTERM or SIGINT, or the guest is handed to another VMM (then this process ends
with status 0). :class:`Incoming` is the destination's start (QEMU's ``inmigrate``): it waits
at ``unix:PATH`` until a hand-off succeeds, serving its own control socket meanwhile; junk
connections, refused peers and failed attempts leave it waiting. :func:`receive` is the same
wait for exactly one attempt, for tests and embedders.

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
import select
import selectors
import signal
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Collection
from types import FrameType
from typing import Any

from intrahost.errors import IntrahostError
from intrahost.kvm import KvmError
from intrahost.migration.faults import NO_FAULTS, Faults
from intrahost.migration.protocol import FRAME, Channel, ProtocolError, parse_url
from intrahost.migration.receiver import ReceiveOptions, Receiver
from intrahost.migration.sender import MigrationFailed, Sender
from intrahost.service.api import (
    MAX_SOCKET_PATH,
    ApiServer,
    CommandError,
    Handler,
    Schema,
    check_socket_directory,
    socket_state,
)
from intrahost.service.notify import Notifier
from intrahost.service.settings import RunSettings
from intrahost.service.spawn import NewVmm as NewVmm
from intrahost.service.spawn import SpawnError as SpawnError
from intrahost.service.spawn import spawn_vmm as spawn_vmm
from intrahost.vmm.guests.probe import CounterProbe, DiskProbe, NetProbe
from intrahost.vmm.machine import Machine

log = logging.getLogger(__name__)

#: How long a source keeps its control socket after handing off, so the client that asked
#: for the migration can read the result.
LINGER_AFTER_HANDOFF = 2.0

#: Under systemd, how long a source waits, after handing off, for the new VMM to take its
#: control socket path (which the new VMM does right after it named itself the main pid).
TAKE_OVER_WAIT = 10.0

#: Connections a waiting VMM holds that have not sent a complete first frame yet.
MAX_PENDING = 16


class IncomingError(IntrahostError):
    """The destination could not receive a guest."""


class Latch:
    """A flag set once, from any thread or from a signal handler, that the main thread waits
    for. Setting it takes no lock (a signal handler may interrupt a thread that holds one):
    it writes a byte to a pipe, which also wakes a ``select`` on :attr:`fd`."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._set = False

    @property
    def fd(self) -> int:
        return self._read

    def set(self) -> None:
        self._set = True
        fd = self._write
        if fd < 0:
            return  # closed: nobody waits (and the fd number may be another file's now)
        with contextlib.suppress(OSError):  # full: already awake
            os.write(fd, b"\0")

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        if not self._set:
            select.select([self._read], [], [], timeout)
        return self._set

    def close(self) -> None:
        """Close the pipe. Only once no other thread may still call :meth:`set` (a signal
        handler runs in the closing thread, between two of its steps: it sees -1)."""
        fds, self._read, self._write = (self._read, self._write), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)


class StopSignals:
    """Routes SIGTERM and SIGINT (``systemctl stop``, Ctrl-C) to whatever the process is
    doing: waiting for a guest, then serving it. A signal that arrives before there is a
    target is kept and delivered by :meth:`route_to`. The handler only calls the target's
    ``request_stop``, which sets flags and a :class:`Latch`: no logging, no locks."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self._target: Callable[[str], None] | None = None
        self._pending: str | None = None

    def install(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def route_to(self, target: Callable[[str], None]) -> None:
        self._target = target
        if self._pending is not None:
            target(self._pending)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._target is None:
            self._pending = name
        else:
            self._target(name)


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
        *,
        arrival: dict[str, Any] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.machine = machine
        self.api_path = api_path
        self.faults = faults
        self.settings = settings or RunSettings(f"vm-{os.getpid()}", api_path)
        self.notifier = notifier or Notifier({})
        self.api: ApiServer | None = None
        self._done = Latch()
        #: Why the VMM stops on request: "host-qmp-quit" or "host-signal" (QEMU's reasons).
        self._stop_reason: str | None = None
        self._stop_detail = ""
        self._ready_sent = False
        self._handed_off = False
        #: query-migrate: "none", or how the guest arrived (``arrival``), until a migration out.
        self._migration: dict[str, Any] = dict(arrival) if arrival else {"status": "none"}
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

    def adopt_api(self, api: ApiServer) -> None:
        """Serve on the control socket the waiting VMM (:class:`Incoming`) opened, with this
        VMM's commands (swapped in at once: no request finds a command missing). If it was
        opened beside ``api_path`` (an old VMM still served that path), it is renamed over
        the path now, as :meth:`open_api` does with ``take_over``.

        Ordering: with ``NOTIFY_SOCKET``, READY and MAINPID go to systemd *before* the
        rename, and the old VMM exits only after it saw the rename (:meth:`shutdown`), so
        the unit's main pid moves to this process before the old one is gone."""
        api.replace_commands(self._commands())
        self.api = api
        self._notify_ready()
        if self.api_path is not None and api.path != self.api_path:
            os.rename(api.path, self.api_path)
            api.path = self.api_path
            log.info("took over the control socket %s", self.api_path)

    def _commands(self) -> dict[str, tuple[Handler, Schema]]:
        return {
            "query-status": (lambda _a: self._query_status(), {}),
            "stop": (lambda _a: self._stop(), {}),
            "cont": (lambda _a: self._cont(), {}),
            "quit": (lambda _a: self.request_stop("quit"), {}),
            "query-vm": (lambda _a: self._query_vm(), {}),
            "migrate": (self._migrate, {"uri": (str, True)}),
            "query-migrate": (lambda _a: self._query_migrate(), {}),
            "query-block": (lambda _a: self.machine.query_block(), {}),
            "query-net": (lambda _a: self.machine.query_net(), {}),
            "query-settings": (lambda _a: self._query_settings(), {}),
        }

    def _register(self, api: ApiServer) -> None:
        for name, (handler, schema) in self._commands().items():
            api.register(name, handler, schema)

    def _emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        if self.api is not None:
            self.api.emit(event, data)

    def _query_status(self) -> dict[str, Any]:
        status = "postmigrate" if self._handed_off else self.machine.status
        return {"status": status, "running": status == "running"}

    def _query_vm(self) -> dict[str, Any]:
        """The machine's own description, plus a built-in guest's view of itself (read from
        guest memory): the counter guest's status slots, the disk guest's progress, the net
        guest's counters."""
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
        elif self.machine.config.guest == "net":
            net = NetProbe(self.machine.memory.buffer).progress()
            if net is not None:
                info["net"] = net
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

    def request_stop(self, why: str) -> None:
        """Shut the guest down and exit: ``why`` is "quit" (the control command) or a
        signal's name. Safe in a signal handler (see :class:`StopSignals`)."""
        if self._stop_reason is None:
            self._stop_reason = "host-qmp-quit" if why == "quit" else "host-signal"
            self._stop_detail = why
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

    def _notify_ready(self) -> None:
        if self._ready_sent:
            return
        self._ready_sent = True
        config = self.machine.config
        where = f", control socket {self.api_path}" if self.api_path else ""
        self.notifier.ready(
            f"running guest {config.guest} ({config.memory >> 20} MiB, {config.vcpus} vCPUs){where}"
        )

    def serve(self) -> int:
        """Run until the guest stops, ``quit``, SIGTERM/SIGINT, or a completed hand-off;
        the exit status. Tells systemd it is ready first (if it was not told already)."""
        self._notify_ready()
        try:
            self._done.wait()
        except KeyboardInterrupt:  # no StopSignals installed (an embedder): same as SIGINT
            self.request_stop("SIGINT")
        return self.shutdown()

    def shutdown(self) -> int:
        """Release or stop the machine, close the control socket; the exit status.

        After a hand-off the guest is not touched (the destination runs it); under systemd
        this process then waits for the new VMM to take the control socket path over, so
        that the new VMM has named itself the unit's main pid before this one exits."""
        if self._handed_off:
            # The destination runs the guest: release this VM without touching the guest.
            log.info("handed off; releasing the VM")
            self._release_after_handoff()
            log.info("released; waiting for the migration's client")
            self._status_read_after_handoff.wait(LINGER_AFTER_HANDOFF)
            if self.notifier.enabled and self.api is not None:
                self._wait_taken_over(self.api, TAKE_OVER_WAIT)
            self._close_api()
            self._done.close()
            log.info("control socket closed")
            return 0
        reason = self._stop_reason or "guest-shutdown"
        if self._stop_reason is not None:
            log.info("shutting the guest down (%s)", self._stop_detail)
        else:
            log.info("the guest shut down")
        self.notifier.stopping(f"shutting down ({self._stop_detail or reason})")
        self._emit("SHUTDOWN", {"guest": False, "reason": reason})
        self._close_api()
        self.machine.close()
        self._done.close()
        code = self.machine.exit_code
        log.info("stopped")
        return 0 if code in (None, 0) else 1

    @staticmethod
    def _wait_taken_over(api: ApiServer, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while api.serves_path():
            if time.monotonic() > deadline:
                log.warning(
                    "no new VMM took over %s within %.0f s; exiting anyway", api.path, timeout
                )
                return
            time.sleep(0.01)

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
    sock.listen(MAX_PENDING)
    os.rename(staging, path)
    return sock


class Incoming:
    """A VMM waiting at ``url`` for its guest (QEMU's ``inmigrate`` state).

    :meth:`wait` accepts connections until one hand-off succeeds, :meth:`request_stop` is
    called (``quit``, SIGTERM), or ``timeout`` seconds pass (then :class:`IncomingError`).
    What arrives on the socket is sorted before any of it can hold the wait up:

    - a peer whose uid may not hand a guest in (see the module docstring) is told why,
      logged and closed at once;
    - other connections wait, without blocking anything, until their first frame header has
      arrived; one that closes first (a port scan, the live-socket probe of a second
      ``run --incoming``) is dropped, and one that sends nothing for ``options.timeout``
      seconds (a QMP client that waits for a greeting) is closed;
    - a connection with a frame becomes a hand-off attempt, run by a fresh
      :class:`~intrahost.migration.receiver.Receiver`. An attempt that fails (garbage, a
      refusal, a source that gives up) has discarded everything it built (its VM, the
      memory and baton fds) and left the baton ABANDONED; the wait then goes on.

    With ``retry=False`` (:func:`receive`) the first attempt decides: a connection that
    closes or stays silent counts as a failed attempt, and a failed attempt raises.

    Meanwhile the control socket (:meth:`serve_api`) answers ``query-status``
    (``inmigrate``), ``query-migrate`` (:meth:`progress`), and ``quit``.
    """

    def __init__(
        self,
        url: str,
        options: ReceiveOptions | None = None,
        *,
        listener: socket.socket | None = None,
        allow_uids: Collection[int] = (),
        faults: Faults = NO_FAULTS,
        timeout: float | None = None,
        retry: bool = True,
    ) -> None:
        self.url = url
        self.path = parse_url(url)
        self.options = options or ReceiveOptions()
        self.allow_uids = tuple(allow_uids)
        self.faults = faults
        self.timeout = timeout
        self.retry = retry
        self._listener = listener or listen(url)
        self._stop = Latch()
        self._stop_why: str | None = None
        self._receiver: Receiver | None = None
        self._peer_pid = 0
        self._attempts = 0
        self._dropped = 0
        self._last_error: str | None = None
        self._started = time.monotonic()
        #: After a successful hand-off: how the guest arrived (the new VMM's query-migrate).
        self.arrival: dict[str, Any] | None = None
        self.api: ApiServer | None = None

    # --- control -------------------------------------------------------------------------------

    def serve_api(self, api_path: str | None) -> ApiServer | None:
        """Serve the control socket while waiting. At ``api_path`` itself, unless a live
        VMM serves that path (an upgrade: the old VMM keeps it until the hand-off): then
        beside it, at ``PATH.new-PID``; :meth:`Vmm.adopt_api` renames it over the path once
        this VMM has the guest."""
        if api_path is None:
            return None
        try:
            live = socket_state(api_path) == "live"
        except OSError:
            live = False
        path = f"{api_path}.new-{os.getpid()}" if live else api_path
        api = ApiServer(path)
        api.replace_commands(
            {
                # (QEMU's state until the incoming migration is over: here, until the
                # running VMM's commands replace these, in Vmm.adopt_api.)
                "query-status": (lambda _a: {"status": "inmigrate", "running": False}, {}),
                "query-migrate": (lambda _a: self.progress(), {}),
                "query-vm": (lambda _a: self._no_guest(), {}),
                "stop": (lambda _a: self._no_guest(), {}),
                "cont": (lambda _a: self._no_guest(), {}),
                "migrate": (lambda _a: self._no_guest(), {"uri": (str, True)}),
                "quit": (lambda _a: self.request_stop("quit"), {}),
            }
        )
        api.start()
        if live:
            log.info("%s is served by the running VMM; until the hand-off, this one answers "
                     "at %s", api_path, path)  # fmt: skip
        self.api = api
        return api

    def _no_guest(self) -> None:
        raise CommandError(
            f"no guest yet: this VMM waits for a hand-off at {self.path} (query-migrate shows "
            "its progress; quit gives up)"
        )

    def progress(self) -> dict[str, Any]:
        """``query-migrate`` while waiting: ``status`` "waiting" (or "active" during an
        attempt, with the receiver's ``state``, the source's pid and release, and this
        side's ``timings`` so far), ``attempts`` that failed, and the ``last-error``."""
        info: dict[str, Any] = {
            "status": "waiting",
            "direction": "incoming",
            "uri": self.url,
            "waiting-s": round(time.monotonic() - self._started, 3),
            "failed-attempts": self._attempts,
            "dropped-connections": self._dropped,
        }
        if self._last_error is not None:
            info["last-error"] = self._last_error
        if self.arrival is not None:  # the guest is here; the running VMM takes over now
            return info | {"status": "active", "state": "committed"}
        receiver = self._receiver
        if receiver is not None:
            info |= {
                "status": "active",
                "state": receiver.state.value,
                "source-pid": self._peer_pid,
                "timings": dict(receiver.timings),
            }
            if receiver.peer_release is not None:
                info["source-release"] = receiver.peer_release
        return info

    def request_stop(self, why: str) -> None:
        """Stop waiting: ``why`` is "quit" or a signal's name. An attempt in progress is
        aborted (the source keeps its guest) unless it is past the commit point. Safe in a
        signal handler (see :class:`StopSignals`)."""
        if self._stop_why is None:
            self._stop_why = why
        self._stop.set()
        receiver = self._receiver
        if receiver is not None:
            receiver.abort()

    def close(self) -> None:
        """Release the stop latch, once nothing may call :meth:`request_stop` any more (a
        VMM process keeps it for its lifetime: its signal handler may call it until exit)."""
        self._stop.close()

    @property
    def stop_requested(self) -> str | None:
        """Why the wait was told to stop ("quit", "SIGTERM", ...), or None."""
        return self._stop_why

    def close_api(self, reason: str) -> None:
        """The wait ended without a guest: a SHUTDOWN event (as QEMU's quit in ``inmigrate``
        sends), then the control socket is closed and removed."""
        if self.api is not None:
            self.api.emit("SHUTDOWN", {"guest": False, "reason": reason})
            self.api.close()
            self.api = None

    # --- the wait ------------------------------------------------------------------------------

    def wait(self) -> Machine | None:
        """The machine of the first successful hand-off (running, or paused if the guest
        was paused on the source); None if told to stop first. The incoming socket is
        closed and removed when this returns or raises."""
        selector = selectors.DefaultSelector()
        pending: dict[socket.socket, tuple[float, int, int]] = {}  # deadline, pid, uid
        deadline = None if self.timeout is None else self._started + self.timeout
        self._listener.setblocking(False)
        selector.register(self._listener, selectors.EVENT_READ)
        selector.register(self._stop.fd, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise IncomingError(
                        f"no hand-off arrived at {self.path} within {self.timeout} s"
                    )
                wake = [d for d, _pid, _uid in pending.values()]
                if deadline is not None:
                    wake.append(deadline)
                ready = selector.select(max(0.0, min(wake) - now) if wake else None)
                for key, _mask in ready:
                    if key.fileobj is self._listener:
                        self._accept(selector, pending)
                    elif isinstance(key.fileobj, socket.socket) and key.fileobj in pending:
                        conn = key.fileobj
                        first = _first_frame(conn)
                        if first is None:
                            continue  # part of a header: wait for the rest
                        _deadline, pid, uid = pending.pop(conn)
                        selector.unregister(conn)
                        machine = self._attempt(conn, pid, uid, first)
                        if machine is not None:
                            return machine
                self._expire(selector, pending)
            return None
        finally:
            for conn in pending:
                conn.close()
            selector.close()
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _accept(
        self, selector: selectors.BaseSelector, pending: dict[socket.socket, tuple[float, int, int]]
    ) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        pid, uid = peer_credentials(conn)
        reason = refusal(uid, self.allow_uids)
        if reason is not None:
            log.warning("refused a hand-off connection from pid %d: %s", pid, reason)
            with contextlib.suppress(ProtocolError, OSError):
                Channel(conn, 1.0).error(f"this VMM refuses the hand-off: {reason}")
            conn.close()
            return
        if uid != os.getuid():
            log.info("accepted a hand-off connection from pid %d, uid %d (allowed)", pid, uid)
        if len(pending) >= MAX_PENDING:
            oldest = min(pending, key=lambda c: pending[c][0])
            log.info("too many silent connections; closing the oldest (pid %d)", pending[oldest][1])
            selector.unregister(oldest)
            del pending[oldest]
            oldest.close()
        conn.setblocking(False)
        pending[conn] = (time.monotonic() + self.options.timeout, pid, uid)
        selector.register(conn, selectors.EVENT_READ)

    def _expire(
        self, selector: selectors.BaseSelector, pending: dict[socket.socket, tuple[float, int, int]]
    ) -> None:
        now = time.monotonic()
        for conn, (deadline, pid, _uid) in list(pending.items()):
            if deadline <= now:
                del pending[conn]
                selector.unregister(conn)
                conn.close()
                self._dropped_connection(
                    f"the connection from pid {pid} sent nothing within {self.options.timeout} s"
                )

    def _failed(self, error: str) -> None:
        """Record a failed attempt; raise unless this wait retries."""
        self._attempts += 1
        self._last_error = error
        if not self.retry:
            raise IncomingError(f"incoming hand-off failed: {error}")
        log.warning("incoming hand-off failed: %s; still waiting at %s", error, self.path)

    def _dropped_connection(self, why: str) -> None:
        """A connection that never started a hand-off (it closed, or stayed silent). With
        ``retry=False`` it was the one attempt, and it failed."""
        if not self.retry:
            self._failed(why)
        self._dropped += 1
        log.info("incoming hand-off failed: %s; still waiting at %s", why, self.path)

    def _attempt(self, conn: socket.socket, pid: int, uid: int, first: bytes) -> Machine | None:
        """Run one hand-off on ``conn``; the machine, or None after a failure (recorded)."""
        if not first:
            conn.close()
            self._dropped_connection(
                f"the connection from pid {pid} closed before sending anything"
            )
            return None
        options = self.options
        if uid != os.getuid():
            # An allowed sender of another uid: the console is this VMM's choice, not its.
            overrides = {**options.overrides, "serial": options.overrides.get("serial", "stdio")}
            options = dataclasses.replace(options, overrides=overrides)
        conn.setblocking(True)
        channel = Channel(conn, options.timeout, self.faults)
        receiver = Receiver(channel, options, faults=self.faults)
        self._peer_pid = pid
        self._receiver = receiver
        if self._stop.is_set():
            receiver.abort()  # told to stop between the accept and here
        started = time.monotonic()
        try:
            machine = receiver.run()
            if machine is not None:
                self.arrival = self._arrival(receiver, pid, started)
        finally:
            self._receiver = None
            with contextlib.suppress(OSError):
                channel.close()
        if machine is None:
            self._failed(receiver.error or "abandoned by the source")
            return None
        log.info("hand-off from pid %d completed: %s", pid, (self.arrival or {}).get("blackout"))
        return machine

    def _arrival(self, receiver: Receiver, pid: int, started: float) -> dict[str, Any]:
        """The running VMM's query-migrate: how its guest arrived."""
        arrival: dict[str, Any] = {
            "status": "completed",
            "direction": "incoming",
            "uri": self.url,
            "source-pid": pid,
            "blackout": {
                **receiver.timings,
                "state_bytes": receiver.state_bytes,
                "attempt_us": int((time.monotonic() - started) * 1e6),
            },
            "failed-attempts": self._attempts,
        }
        if receiver.peer_release is not None:
            arrival["source-release"] = receiver.peer_release
        return arrival


def _first_frame(conn: socket.socket) -> bytes | None:
    """What a pending connection has sent so far, if it is enough to start an attempt: a
    whole frame header (peeked, left in place), or b"" if it closed; None if only part of
    a header has arrived."""
    try:
        data = conn.recv(FRAME.size, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""
    if data and len(data) < FRAME.size:
        return None
    return data


def receive(
    url: str,
    options: ReceiveOptions | None = None,
    timeout: float | None = None,
    listener: socket.socket | None = None,
    allow_uids: Collection[int] = (),
    faults: Faults = NO_FAULTS,
) -> Machine:
    """Wait for one hand-off at ``url`` and return the machine it brought (running, or
    paused if the guest was paused on the source): an :class:`Incoming` wait whose first
    attempt decides (a failed one raises :class:`IncomingError`). Connections from a uid
    other than this process's and not in ``allow_uids`` are refused (see the module
    docstring) and do not count. ``faults``: the fault tests' hooks (see :class:`Vmm`)."""
    incoming = Incoming(
        url,
        options,
        listener=listener,
        allow_uids=allow_uids,
        faults=faults,
        timeout=timeout,
        retry=False,
    )
    try:
        machine = incoming.wait()
    finally:
        incoming.close()
    assert machine is not None  # nothing calls request_stop on this wait
    return machine


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
