"""The built-in test guests: their sources, their reproducible build, and a multiboot loader.

* :mod:`~intrahost.vmm.guests.build` builds ``hello`` and ``counter`` with GNU as/ld, and
  ``disk`` (C behind an assembly boot path) with gcc too;
* :mod:`~intrahost.vmm.guests.loader` loads a multiboot ELF32 (or raw) image into guest RAM;
* :mod:`~intrahost.vmm.guests.layout` holds the guests' fixed ABI (addresses, ports, report
  tags) and reads the counter and disk guests' status and memory back;
* :mod:`~intrahost.vmm.guests.probe` is those guests seen from the host (``query-vm``);
* :mod:`~intrahost.vmm.guests.diskcheck` checks a disk image the disk guest wrote;
* :mod:`~intrahost.vmm.guests.netcheck` is the host's side of the net guest: a network
  namespace with a tap, an echo stream that measures loss and the network blackout, ping.

docs/guests.md describes the guests and their ABI.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from intrahost.vmm.guests.build import GuestBuildError, build_guest, list_guests
    from intrahost.vmm.guests.layout import (
        CounterStatus,
        ExitCode,
        GuestMemoryCorrupt,
        GuestStatusMissing,
        ReportTag,
        VcpuSlot,
        read_status,
        verify_region,
    )
    from intrahost.vmm.guests.loader import (
        BootCpuState,
        BootInfo,
        GuestLoadError,
        boot_cpu_state,
        load_guest,
        read_guest_image,
    )

#: Where each name below lives. The submodules are imported on first use of a name
#: (PEP 562), not with the package: a reader of guest memory (``probe``, ``layout``) must
#: not pull in the build and the loader, and ``query-vm`` runs in every VMM.
_HOMES = {
    "build": ("GuestBuildError", "build_guest", "list_guests"),
    "layout": (
        "CounterStatus",
        "ExitCode",
        "GuestMemoryCorrupt",
        "GuestStatusMissing",
        "ReportTag",
        "VcpuSlot",
        "read_status",
        "verify_region",
    ),
    "loader": (
        "BootCpuState",
        "BootInfo",
        "GuestLoadError",
        "boot_cpu_state",
        "load_guest",
        "read_guest_image",
    ),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    home = _HOME_OF.get(name)
    if home == "build":
        from intrahost.vmm.guests import build

        return getattr(build, name)
    if home == "layout":
        from intrahost.vmm.guests import layout

        return getattr(layout, name)
    if home == "loader":
        from intrahost.vmm.guests import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BootCpuState",
    "BootInfo",
    "CounterStatus",
    "ExitCode",
    "GuestBuildError",
    "GuestLoadError",
    "GuestMemoryCorrupt",
    "GuestStatusMissing",
    "ReportTag",
    "VcpuSlot",
    "boot_cpu_state",
    "build_guest",
    "list_guests",
    "load_guest",
    "read_guest_image",
    "read_status",
    "verify_region",
]
