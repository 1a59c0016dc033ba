"""An I/O thread: an epoll loop that runs a device's work off the vCPU threads.

A device watches file descriptors (the ioeventfds the guest's queue notifications signal)
with :meth:`IoThread.watch`, and hands over other work with :meth:`IoThread.call`. The loop
runs one callback at a time, so a device's processing is serialised by the thread.

Draining (:meth:`IoThread.drain`) is how a hand-off stops a device's I/O at a request
boundary: the callback running now finishes (and a device's batch loop checks
:attr:`IoThread.draining` between requests, so it stops after the request it is on), then the
loop parks without reading any fd, so every notification that arrives meanwhile stays counted
in its eventfd. :meth:`IoThread.resume` un-parks it. Callbacks must not raise: the loop logs
anything that escapes and goes on (a device turns its own failures into device state).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)


class IoThread:
    """One epoll loop on its own thread (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._handlers: dict[int, Callable[[], None]] = {}
        self._calls: deque[Callable[[], None]] = deque()
        self._cond = threading.Condition()
        self._drain = False
        self._parked = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- configuration -----------------------------------------------------------------------

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Run ``callback`` on this thread whenever ``fd`` is readable (level-triggered: the
        callback must consume what made it readable)."""
        self._handlers[fd] = callback
        self._epoll.register(fd, select.EPOLLIN)

    def unwatch(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on this thread soon (after a drain: once resumed)."""
        self._calls.append(fn)
        os.eventfd_write(self._wake, 1)

    # --- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def draining(self) -> bool:
        """True once a drain was asked for: a callback stops at its next request boundary."""
        return self._drain

    def drain(self, timeout: float = 5.0) -> bool:
        """Let the running callback finish, then park the loop; True once it is parked (or
        when the thread is not running at all)."""
        with self._cond:
            self._drain = True
            os.eventfd_write(self._wake, 1)
            if not self.running:
                return True
            return self._cond.wait_for(lambda: self._parked or not self.running, timeout)

    def resume(self) -> None:
        """Un-park after :meth:`drain`; queued calls and pending fds are served again."""
        with self._cond:
            self._drain = False
            self._cond.notify_all()
        os.eventfd_write(self._wake, 1)

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the running callback and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        os.eventfd_write(self._wake, 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("I/O thread %s did not stop within %.1f s", self.name, timeout)

    def close(self) -> None:
        self.stop()
        if not self.running and self._wake >= 0:
            self._epoll.close()
            os.close(self._wake)
            self._wake = -1

    # --- the loop --------------------------------------------------------------------------------

    def _hold(self) -> bool:
        """Park while a drain is asked for; False when the thread must end."""
        with self._cond:
            if self._drain and not self._stopping:
                self._parked = True
                self._cond.notify_all()
                self._cond.wait_for(lambda: not self._drain or self._stopping)
                self._parked = False
            return not self._stopping

    def _loop(self) -> None:
        while self._hold():
            try:
                events = self._epoll.poll()
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                continue
            for fd, _mask in events:
                if fd == self._wake:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake)
                    continue
                if self._drain or self._stopping:
                    break  # the fd stays readable: served after resume
                handler = self._handlers.get(fd)
                if handler is not None:
                    self._run(handler)
            while self._calls and not (self._drain or self._stopping):
                self._run(self._calls.popleft())

    def _run(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("I/O thread %s: a callback failed", self.name)
