"""The host side of a serial line: where a UART's output goes and its input comes from.

A console's :meth:`Console.write` runs on a vCPU thread that holds the UART's lock, so it
must never block: a vCPU blocked outside KVM_RUN cannot be kicked, and a pause would wait
for it. Each console keeps that rule in its own way:

* ``stdout`` is inherited, and its open file description is shared with whoever started the
  VMM (a shell, a supervisor): setting O_NONBLOCK on it would change it for them too. Its
  output goes to a bounded buffer that a writer thread drains; that thread may block on a
  full pipe, the vCPUs never do.
* ``file:PATH`` is opened by the VMM, so the description is its own and is made
  non-blocking (a FIFO, a terminal; writes to a regular file only touch the page cache).
* ``pty`` owns its master side, non-blocking; a slow reader pushes back (the bytes stay in
  the UART's FIFO, as with QEMU's pty backend).
* ``none`` discards everything; ``BufferConsole`` (tests, embedding) is memory.

Output that a full target cannot take is dropped and counted in :attr:`Console.dropped`.
"""

from __future__ import annotations

import abc
import errno
import logging
import os
import select
import sys
import threading
import time
import tty

from intrahost.errors import IntrahostError

log = logging.getLogger(__name__)

#: Bytes of stdout output held for its writer thread; more is dropped.
STDOUT_BUFFER = 64 * 1024

#: How long closing a console waits for its writer thread to write what it holds.
CLOSE_TIMEOUT = 1.0

#: How long the stdout writer waits for room on a descriptor that someone made non-blocking.
RETRY_WAIT = 0.1


class ConsoleError(IntrahostError):
    """A console target could not be opened or is misspelled."""


class Console(abc.ABC):
    """Where a UART's output goes and, for some consoles, where its input comes from."""

    #: A short human description ("stdout", "file:/tmp/x", "pty:/dev/pts/3").
    description: str = "console"

    #: Whether :meth:`read_input` can ever return data (the UART starts a reader if so).
    has_input: bool = False

    #: Output bytes taken by :meth:`write` but thrown away because the target was full (or,
    #: for a pty, because nobody had it open).
    dropped: int = 0

    @abc.abstractmethod
    def write(self, data: bytes) -> int:
        """Take some prefix of ``data``; return how many bytes were taken (0 = push back).

        Must not block (see the module docstring): bytes a full target cannot take are
        pushed back or dropped (and counted in :attr:`dropped`). Raises OSError if the
        target is broken.
        """

    def read_input(self, max_bytes: int, timeout: float) -> bytes:
        """Up to ``max_bytes`` of input, waiting at most ``timeout`` seconds; b"" if none."""
        time.sleep(timeout)
        return b""

    def close(self) -> None:  # noqa: B027 - most consoles hold nothing to release
        """Release the target. Idempotent."""


class StdoutConsole(Console):
    """The VMM process's standard output (looked up at each write, so capture works).

    :meth:`write` only appends to a buffer of ``capacity`` bytes; a writer thread, started
    at the first write, writes it out and is the only thread that can block on a full pipe.
    What does not fit in the buffer is dropped. A write error ends the thread; the next
    :meth:`write` raises it (the UART then discards the console's output).
    """

    description = "stdout"

    def __init__(self, capacity: int = STDOUT_BUFFER) -> None:
        self.capacity = capacity
        self._pending = bytearray()
        self._writing = 0  # bytes the writer thread took from _pending and is writing
        self._closing = False
        self._error: OSError | ValueError | None = None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def write(self, data: bytes) -> int:
        with self._cond:
            if self._error is not None:
                raise self._error
            taken = max(0, min(len(data), self.capacity - len(self._pending)))
            self._pending += data[:taken]
            self.dropped += len(data) - taken
            if self._thread is None and not self._closing:
                self._thread = threading.Thread(
                    target=self._writer_loop, name="console-stdout", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
        return len(data)

    @property
    def pending(self) -> int:
        """Bytes taken but not yet written out."""
        with self._cond:
            return len(self._pending) + self._writing

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the writer thread to write everything taken;
        True if it did (or failed, dropping the rest)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._pending or self._writing) and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self) -> None:
        """Write what is buffered (for up to CLOSE_TIMEOUT seconds), then stop the thread.
        A thread still blocked on a pipe nobody reads is left behind (it is a daemon)."""
        if not self.flush(CLOSE_TIMEOUT):
            log.warning("console stdout: %d bytes not written at close", self.pending)
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def _writer_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                data = bytes(self._pending)
                self._pending.clear()
                self._writing = len(data)
            try:
                _write_stdout(data)
            except (OSError, ValueError) as error:  # ValueError: a closed Python stream
                with self._cond:
                    self._error = error
                    self.dropped += len(data) + len(self._pending)
                    self._pending.clear()
                    self._writing = 0
                    self._cond.notify_all()
                return
            with self._cond:
                self._writing = 0
                self._cond.notify_all()


def _write_stdout(data: bytes) -> None:
    """Write ``data`` to sys.stdout's descriptor, or to the stream if it has none (a capture).

    The descriptor is written directly, holding no lock of the Python stream: a writer
    thread blocked on a full pipe at interpreter exit would otherwise hold that lock while
    the interpreter flushes stdout, and abort it.
    """
    stream = sys.stdout
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: no descriptor
        buffer = getattr(stream, "buffer", None)
        if buffer is not None:
            buffer.write(data)
        else:
            stream.write(data.decode("utf-8", errors="replace"))
        stream.flush()
        return
    stream.flush()  # what the process printed comes first
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:  # someone made the shared description non-blocking
            select.select([], [fd], [], RETRY_WAIT)


class NullConsole(Console):
    """Discards output."""

    description = "null"

    def write(self, data: bytes) -> int:
        return len(data)


class FileConsole(Console):
    """A file, opened for appending (created if missing), non-blocking: a FIFO or terminal
    that cannot take more drops the rest of the write."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.description = f"file:{self.path}"
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            self._fd: int | None = os.open(self.path, flags, 0o644)
        except OSError as error:
            if error.errno == errno.ENXIO:  # a FIFO: its reader must come first
                raise ConsoleError(
                    f"console file {self.path!r} is a FIFO that nobody reads: start its "
                    f"reader first"
                ) from error
            raise ConsoleError(
                f"cannot open console file {self.path!r}: {error.strerror}; "
                f"check the directory exists and is writable"
            ) from error

    def write(self, data: bytes) -> int:
        if self._fd is None:
            raise OSError(errno.EBADF, "console file is closed")
        try:
            written = os.write(self._fd, data)
        except BlockingIOError:
            written = 0
        self.dropped += len(data) - written
        return len(data)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class PtyConsole(Console):
    """A new pseudo-terminal; the guest's console is at :attr:`slave_path`.

    Like QEMU's pty backend, output is dropped while no program has the slave open (so an
    unattended guest never stalls), and pushed back (left in the UART FIFO) when the program
    attached to it reads slower than the guest writes. The terminal is put in raw mode.
    """

    has_input = True

    def __init__(self, master: int | None = None, slave_path: str | None = None) -> None:
        """A new pseudo-terminal; or, with ``master`` (an fd this console then owns) and
        ``slave_path``, the one another VMM opened (a hand-off keeps the guest's terminal)."""
        if master is None or slave_path is None:
            master, slave_path = self._open()
        self.slave_path = slave_path
        os.set_blocking(master, False)
        self._master: int | None = master
        self.description = f"pty:{self.slave_path}"
        log.info(
            "serial console on pseudo-terminal %s (attach with e.g. `screen %s`)",
            self.slave_path,
            self.slave_path,
        )

    @staticmethod
    def _open() -> tuple[int, str]:
        try:
            master, slave = os.openpty()
        except OSError as error:
            raise ConsoleError(
                f"cannot open a pseudo-terminal: {error.strerror}; is /dev/ptmx available? "
                f"use --console stdout or file:PATH instead"
            ) from error
        try:
            path = os.ttyname(slave)
            tty.setraw(slave)
        finally:
            os.close(slave)
        return master, path

    @property
    def master_fd(self) -> int:
        """The terminal's master side (what a hand-off passes to the new VMM)."""
        if self._master is None:
            raise OSError(errno.EBADF, "pty console is closed")
        return self._master

    def _poll(self, events: int, timeout: float) -> int:
        if self._master is None:
            raise OSError(errno.EBADF, "pty console is closed")
        poller = select.poll()
        poller.register(self._master, events)
        ready = poller.poll(int(timeout * 1000))
        return ready[0][1] if ready else 0

    @property
    def connected(self) -> bool:
        """Whether some program has the slave side open."""
        return not self._poll(select.POLLOUT, 0) & select.POLLHUP

    def write(self, data: bytes) -> int:
        if not self.connected:
            self.dropped += len(data)
            return len(data)
        assert self._master is not None
        try:
            return os.write(self._master, data)
        except BlockingIOError:
            return 0
        except OSError as error:
            if error.errno == errno.EIO:  # the slave went away between poll and write
                self.dropped += len(data)
                return len(data)
            raise

    def read_input(self, max_bytes: int, timeout: float) -> bytes:
        events = self._poll(select.POLLIN, timeout)
        if events & select.POLLHUP and not events & select.POLLIN:
            time.sleep(timeout)  # nobody attached: nothing to read, don't spin
            return b""
        if not events & select.POLLIN:
            return b""
        assert self._master is not None
        try:
            return os.read(self._master, max_bytes)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError as error:
            if error.errno == errno.EIO:
                return b""
            raise

    def close(self) -> None:
        if self._master is not None:
            os.close(self._master)
            self._master = None


class BufferConsole(Console):
    """An in-memory console, for tests and embedding.

    Output accumulates in :attr:`data`; with ``capacity`` it holds at most that many bytes
    and pushes back until :meth:`take` empties it (a slow reader). :meth:`push_input` makes
    bytes available to the UART's reader thread.
    """

    has_input = True

    def __init__(self, capacity: int | None = None, description: str = "buffer") -> None:
        self.description = description
        self.capacity = capacity
        self._output = bytearray()
        self._input = bytearray()
        self._cond = threading.Condition()

    @property
    def data(self) -> bytes:
        """Everything written and not yet taken."""
        with self._cond:
            return bytes(self._output)

    def take(self) -> bytes:
        """Return and forget the output so far (makes room when ``capacity`` is set)."""
        with self._cond:
            out = bytes(self._output)
            self._output.clear()
            return out

    def write(self, data: bytes) -> int:
        with self._cond:
            room = len(data) if self.capacity is None else self.capacity - len(self._output)
            taken = data[: max(room, 0)]
            self._output += taken
            return len(taken)

    def push_input(self, data: bytes) -> None:
        """Queue ``data`` as if typed on the console."""
        with self._cond:
            self._input += data
            self._cond.notify_all()

    @property
    def pending_input(self) -> int:
        """Bytes pushed but not yet read by the UART."""
        with self._cond:
            return len(self._input)

    def read_input(self, max_bytes: int, timeout: float) -> bytes:
        with self._cond:
            if not self._input:
                self._cond.wait(timeout)
            out = bytes(self._input[:max_bytes])
            del self._input[:max_bytes]
            return out


def open_console(spec: str) -> Console:
    """Open the console named by ``spec``: ``stdio`` (or ``stdout``), ``file:PATH``, ``pty``
    or ``none`` (or ``null``) -- the words of the CLI's --serial."""
    if spec in ("stdio", "stdout"):
        return StdoutConsole()
    if spec in ("none", "null"):
        return NullConsole()
    if spec == "pty":
        return PtyConsole()
    if spec.startswith("file:"):
        path = spec[len("file:") :]
        if not path:
            raise ConsoleError("console 'file:' needs a path, e.g. file:/tmp/guest.log")
        return FileConsole(path)
    raise ConsoleError(f"unknown console {spec!r}: use 'stdio', 'file:PATH', 'pty' or 'none'")
