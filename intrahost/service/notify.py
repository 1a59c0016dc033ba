"""systemd's readiness protocol (sd_notify), spoken directly: one datagram per notification.

When systemd starts a ``Type=notify`` service it sets ``NOTIFY_SOCKET`` to a unix datagram
socket: a path, or an abstract address written with a leading ``@``. The service sends
newline-separated ``KEY=VALUE`` lines to it: ``READY=1`` once it serves, ``STATUS=`` free
text, ``MAINPID=`` to name another process as the service's main process, ``STOPPING=1``
when it begins to shut down. Without ``NOTIFY_SOCKET`` every call here does nothing.

A VMM sends (see :mod:`intrahost.service.runner`):

- ``READY=1`` with ``MAINPID=`` its own pid and a ``STATUS=`` line once its control socket
  serves its guest: after the boot, or, for a VMM that waited with ``--incoming``, when it
  has taken the guest. During an upgrade that is how the new VMM becomes the unit's main
  process: it sends its MAINPID before it takes over the control socket path, and the old VMM
  exits only after that take-over, so systemd never sees the main process gone (the unit
  needs ``NotifyAccess=all``, and the new VMM must run in the unit's cgroup).
- ``STOPPING=1`` when it shuts its guest down (``quit``, SIGTERM, the guest's own shutdown);
  never when it exits after handing its guest to another VMM.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

ENV = "NOTIFY_SOCKET"


class Notifier:
    """Sends notifications to the socket named by ``NOTIFY_SOCKET`` (read once, at creation;
    the variable is left in the environment so that a VMM started by this one during an
    upgrade can notify too)."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        value = (os.environ if environ is None else environ).get(ENV, "")
        self.address: str | bytes | None = None
        if value.startswith("@"):
            self.address = b"\0" + os.fsencode(value[1:])  # Linux's abstract namespace
        elif value.startswith("/"):
            self.address = value
        elif value:
            log.warning("%s=%r is neither a path nor an @abstract address; ignored", ENV, value)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines (keys as given, e.g. ``READY=1``). False if there is no
        socket or the datagram could not be sent (logged: systemd's state is then stale, but
        the VMM goes on)."""
        if self.address is None:
            return False
        lines = [f"{key}={value}" for key, value in fields.items()]
        if any("\n" in line for line in lines):
            raise ValueError("notification values must be single lines")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.sendto("\n".join(lines).encode(), self.address)
            except OSError as e:
                log.warning("cannot notify systemd at %s: %s", os.environ.get(ENV), e.strerror)
                return False
        log.debug("notified systemd: %s", ", ".join(lines))
        return True

    def ready(self, status: str) -> bool:
        """This process serves (and is the unit's main process)."""
        return self.send(READY=1, MAINPID=os.getpid(), STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def stopping(self, status: str) -> bool:
        return self.send(STOPPING=1, STATUS=status)
