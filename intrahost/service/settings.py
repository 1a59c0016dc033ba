"""How a VMM was started, beyond its machine's configuration.

:class:`RunSettings` is what ``intrahost run`` records of its own flags, and what the control
API's ``query-settings`` reports with the machine's :class:`~intrahost.vmm.config.MachineConfig`
and console: ``intrahost upgrade`` starts the new VMM with these settings unless the operator
gives other flags after ``--`` (docs/api.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RunSettings:
    """``name``: the VMM's name (``--name``); ``api_socket``: its control socket;
    ``log_level``, ``log_format``: its logging; ``log_file``: the file its log (standard
    error) goes to, None for the standard error it was started with; ``allow_uids``: the
    users whose VMMs may hand it a guest (``--allow-uid``)."""

    name: str
    api_socket: str | None
    log_level: str = "warning"
    log_file: str | None = None
    log_format: str | None = None
    allow_uids: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "api-socket": self.api_socket,
            "log-level": self.log_level,
            "log-file": self.log_file,
            "log-format": self.log_format,
            "allow-uid": list(self.allow_uids),
        }
