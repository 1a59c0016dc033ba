"""Every VMM on a host: the runtime directory of control sockets, and what each VMM says.

A VMM started without ``--api-socket`` serves its control socket at ``DIR/NAME.sock``, where
DIR is ``$XDG_RUNTIME_DIR/intrahost`` when XDG_RUNTIME_DIR is set (a user's session), else
``/run/intrahost`` (root, system services), and NAME its ``--name`` (default ``vm-PID``).
The directory is created mode 0700. Listing the directory finds every such VMM; a socket
file nobody listens on (its VMM was killed) is *stale*: listed apart, and removed on request.

Only ``*.sock`` files count: a new VMM binds ``NAME.sock.new-PID`` beside the path and renames
it over the path during an upgrade, and an old one moves ``NAME.sock`` aside to
``NAME.sock.closing-PID`` for a moment as it exits (see :mod:`intrahost.service.api`).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Any

from intrahost.errors import IntrahostError
from intrahost.service.api import socket_state

#: A VMM's name: a letter or digit, then letters, digits, '.', '_' or '-'; at most 64.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

SUFFIX = ".sock"

#: How long one VMM may take to answer while listing (seconds): a stuck VMM is reported as
#: such, and does not hold up the list.
QUERY_TIMEOUT = 2.0


class RegistryError(IntrahostError):
    """The runtime directory or a VMM name cannot be used."""


def runtime_dir() -> str:
    """Where VMMs without ``--api-socket`` put their control sockets (module docstring)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return os.path.join(base, "intrahost")
    return "/run/intrahost"


def check_name(name: str) -> str:
    """``name`` if it can name a VMM (:data:`NAME_PATTERN`), else :class:`RegistryError`."""
    if not NAME_PATTERN.fullmatch(name):
        raise RegistryError(
            f"invalid VMM name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def default_name(pid: int | None = None) -> str:
    return f"vm-{os.getpid() if pid is None else pid}"


def socket_path(name: str) -> str:
    """The control socket of the VMM called ``name`` in the runtime directory."""
    return os.path.join(runtime_dir(), check_name(name) + SUFFIX)


def prepare_runtime_dir() -> str:
    """Create the runtime directory (mode 0700) if needed; its path."""
    path = runtime_dir()
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        hint = "" if os.environ.get("XDG_RUNTIME_DIR") else "; set XDG_RUNTIME_DIR or run as root"
        raise RegistryError(
            f"cannot create the runtime directory {path}: {e.strerror}{hint}, or give "
            "--api-socket PATH"
        ) from None
    return path


@dataclass(frozen=True)
class Entry:
    """A control socket in the runtime directory: ``state`` is "live" or "stale"."""

    name: str
    path: str
    state: str


def entries() -> list[Entry]:
    """The control sockets in the runtime directory, by name (none if it does not exist)."""
    directory = runtime_dir()
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise RegistryError(
            f"cannot read the runtime directory {directory}: {e.strerror}"
        ) from None
    found = []
    for filename in names:
        name = filename[: -len(SUFFIX)]
        if not filename.endswith(SUFFIX) or not NAME_PATTERN.fullmatch(name):
            continue
        path = os.path.join(directory, filename)
        try:
            state = socket_state(path)
        except OSError:
            continue
        if state in ("live", "stale"):
            found.append(Entry(name, path, state))
    return found


def remove_stale(entry: Entry) -> bool:
    """Remove a stale socket file, if it is still stale; whether it was removed."""
    with contextlib.suppress(OSError):
        if socket_state(entry.path) == "stale":
            os.unlink(entry.path)
            return True
    return False


def describe(entry: Entry) -> dict[str, Any]:
    """What the VMM at ``entry`` says of itself, for ``intrahost list``: name, socket, pid,
    version ("?" from a VMM without ``query-version``), guest, memory, vcpus, status, the
    guest's uptime (kept across upgrades; None from a VMM that does not know it) and this
    VMM process's uptime. A VMM that does not answer is "unreachable", with the reason."""
    from intrahost.service.qmp_client import QmpClient, QmpError

    info: dict[str, Any] = {"name": entry.name, "api-socket": entry.path}
    try:
        with QmpClient(entry.path, timeout=QUERY_TIMEOUT) as qmp:
            try:
                package = str(qmp.execute("query-version").get("package", ""))
                info["version"] = package.removeprefix("intrahost ") or "?"
            except QmpError:
                info["version"] = "?"
            status = qmp.execute("query-status")["status"]
            vm = qmp.execute("query-vm")
    except IntrahostError as e:
        return info | {"status": "unreachable", "error": str(e)}
    pid = vm.get("pid")
    info |= {
        "pid": pid,
        "guest": vm.get("guest"),
        "memory": vm.get("memory"),
        "vcpus": vm.get("vcpus"),
        "status": status,
        "guest-uptime": vm.get("guest-uptime"),
        "vmm-uptime": process_uptime(pid) if isinstance(pid, int) else None,
    }
    if "console" in vm:
        info["console"] = vm["console"]
    return info


def process_uptime(pid: int) -> float | None:
    """Seconds since process ``pid`` started (from /proc), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    # Field 22 (starttime), in clock ticks since boot; fields[0] is field 3 (state).
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return round(max(0.0, uptime - started), 1)
