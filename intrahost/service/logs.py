"""Where a VMM's log lines go and what they look like: stderr, in one of three forms.

``text``     ``TIME intrahost[PID] LEVEL LOGGER: MESSAGE`` for a terminal or a file; when
             stderr is connected to the journal (systemd sets ``JOURNAL_STREAM`` to the
             device and inode of that stream), ``<N>LOGGER: MESSAGE`` instead: journald reads
             the ``<N>`` syslog priority prefix, and adds the time and pid itself.
``json``     one JSON object per line, for log shippers: ``time`` (ISO 8601, UTC), ``level``,
             ``logger``, ``pid``, ``message``, then the record's extra fields (those given
             with ``extra=``), and ``exception`` with the traceback when there is one.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Any, TextIO

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("text", "json")

#: syslog priorities (sd-daemon(3)) for logging's levels.
_SYSLOG = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)

TEXT_FORMAT = "%(asctime)s intrahost[%(process)d] %(levelname)s %(name)s: %(message)s"


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (levels between two take the lower's)."""
    for level in sorted(_SYSLOG, reverse=True):
        if levelno >= level:
            return _SYSLOG[level]
    return _SYSLOG[logging.DEBUG]


class JournalFormatter(logging.Formatter):
    """``<N>LOGGER: MESSAGE``; continuation lines of a traceback get the same prefix, so
    journald keeps them at the record's priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        text = super().format(record)
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="microseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def stderr_is_journal(stream: TextIO | None = None, environ: dict[str, str] | None = None) -> bool:
    """Whether ``stream`` (stderr) is the journal stream systemd named in ``JOURNAL_STREAM``
    (``DEVICE:INODE``); a child that inherited the variable but not the stream is not."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def configure(level: str, form: str = "text", stream: TextIO | None = None) -> None:
    """Send the log at ``level`` and above to ``stream`` (stderr) in ``form``. ``level`` is
    one of :data:`LEVELS` and ``form`` one of :data:`FORMATS` (the CLI validates both)."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    formatter: logging.Formatter
    if form == "json":
        formatter = JsonFormatter()
    elif stderr_is_journal(stream):
        formatter = JournalFormatter("%(name)s: %(message)s")
    else:
        formatter = logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
