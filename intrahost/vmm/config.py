"""What a VMM is asked to run: :class:`MachineConfig`, written once.

Its fields give its JSON form (the hand-off's ``config``, through ``JsonRecord``) and the
flags of ``intrahost run`` (through the :class:`Flag` in each field's metadata). This module
imports little, so that the command line can build its parser without loading KVM.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from intrahost.errors import IntrahostError
from intrahost.vmm.persist import JsonRecord, converted

MAX_VCPUS = 64


class MachineConfigError(IntrahostError):
    """The machine's configuration is invalid."""


def _size(text: str) -> int:
    from intrahost.vmm.memory import parse_size

    return parse_size(text)


def integer(text: str) -> int:
    """An integer in C notation (5, 0x5, 0o5, 0b101). Named: a command line's error message
    names the type function ("invalid integer value: 'x'")."""
    return int(text, 0)


@dataclass(frozen=True)
class Flag:
    """How ``intrahost run`` sets a :class:`MachineConfig` field (the CLI builds its flags
    from these). ``type`` converts while parsing the command line (a usage error when it
    fails); ``parse`` after it (an IntrahostError, reported as one line); ``const`` makes a
    switch that stores this value."""

    name: str
    help: str
    type: Callable[[str], Any] | None = None
    parse: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    const: str | None = None
    #: The flag may be given several times; ``parse`` receives the list of values.
    repeat: bool = False


FLAGS = "intrahost.flags"


def _flags(*flags: Flag, default: Any) -> Any:
    return dataclasses.field(default=default, metadata={FLAGS: flags})


def _flags_converted(
    *flags: Flag,
    to_json: Callable[[Any], Any],
    from_json: Callable[[Any], Any],
    default: Any,
) -> Any:
    return converted(to_json, from_json, default=default, metadata={FLAGS: flags})


def config_flags() -> list[tuple[str, tuple[Flag, ...]]]:
    """Each MachineConfig field with its command-line flags."""
    return [(f.name, f.metadata[FLAGS]) for f in dataclasses.fields(MachineConfig)]


#: The most ``--disk`` devices (the virtio-mmio device slots, see docs/devices.md).
MAX_DISKS = 16
#: A disk id: GET_ID tells the guest at most 20 bytes.
_DISK_ID = re.compile(r"[A-Za-z0-9_.:-]{1,20}")
_ON_OFF = {"on": True, "off": False}


@dataclass(frozen=True)
class DiskConfig(JsonRecord, label="disk", error=MachineConfigError):
    """One ``--disk``: a raw image and how the guest sees it. ``path`` names the image for
    the VMM that opens it (a VMM taking over a running guest inherits the open image
    instead); ``size`` is the image's size in bytes once a VMM opened it."""

    path: str
    readonly: bool = False
    direct: bool = False
    id: str = ""
    size: int | None = None

    def guest_view(self) -> tuple[str, bool, int | None]:
        """What the guest sees of the disk: its id, read-only flag and capacity."""
        return (self.id, self.readonly, self.size)

    def flag_view(self) -> tuple[str, bool]:
        """What a ``--disk`` flag says of the guest's view: the id and read-only flag (the
        capacity is known only once the image is open)."""
        return (self.id, self.readonly)

    def check(self) -> None:
        if not self.path:
            raise MachineConfigError("--disk needs path=IMAGE")
        if not _DISK_ID.fullmatch(self.id):
            raise MachineConfigError(f"--disk id {self.id!r}: use 1 to 20 letters, digits or _.:-")


def parse_disk(text: str, index: int = 0) -> DiskConfig:
    """``path=IMAGE[,readonly=on][,direct=on][,id=NAME]`` (the id defaults to diskN)."""
    values: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MachineConfigError(
                f"--disk {text!r}: {item!r} is not KEY=VALUE (path=IMAGE[,readonly=on]"
                "[,direct=on][,id=NAME])"
            )
        if key in values:
            raise MachineConfigError(f"--disk {text!r}: {key} is given twice")
        if key in ("readonly", "direct"):
            if value not in _ON_OFF:
                raise MachineConfigError(f"--disk {text!r}: {key} must be on or off")
            values[key] = _ON_OFF[value]
        elif key in ("path", "id"):
            values[key] = value
        else:
            raise MachineConfigError(
                f"--disk {text!r}: unknown key {key!r} (known: path, readonly, direct, id)"
            )
    values.setdefault("id", f"disk{index}")
    if "path" not in values:
        raise MachineConfigError(f"--disk {text!r}: path=IMAGE is required")
    disk = DiskConfig(**values)
    disk.check()
    return disk


def parse_disks(texts: Sequence[str]) -> tuple[DiskConfig, ...]:
    return tuple(parse_disk(text, i) for i, text in enumerate(texts))


def _disks_from_json(value: Any) -> tuple[DiskConfig, ...]:
    if not isinstance(value, list):
        raise MachineConfigError("config: disks must be a list")
    return tuple(DiskConfig.from_dict(d, where=f"config: disks[{i}]") for i, d in enumerate(value))


def _disks_to_json(disks: tuple[DiskConfig, ...]) -> list[dict[str, Any]]:
    return [d.to_dict() for d in disks]


#: A network device id (the same alphabet as a disk's).
_NET_ID = _DISK_ID


@dataclass(frozen=True)
class NetConfig(JsonRecord, label="net", error=MachineConfigError):
    """One ``--net``: a tap, opened by name (``tap``) or adopted as an open fd (``fd``),
    and the MAC the guest sees. An empty ``mac`` is chosen at random when the VMM starts the
    guest (:meth:`with_mac`), and then recorded: the config travels to a new VMM with it. A
    VMM taking over a running guest inherits the tap's fd instead of opening it."""

    tap: str = ""
    fd: int | None = None
    mac: str = ""
    id: str = ""

    def guest_view(self) -> tuple[str, str]:
        """What the guest sees of the device: its id (the device order) and MAC."""
        return (self.id, self.mac)

    def flag_view(self, running: NetConfig) -> bool:
        """Whether a ``--net`` flag given to a VMM taking over the guest matches the running
        device ``running``: the same id, and the same MAC if the flag names one."""
        return self.id == running.id and self.mac in ("", running.mac)

    def with_mac(self) -> NetConfig:
        """This config with a MAC: its own, else a random locally administered one."""
        if self.mac:
            return self
        from intrahost.vmm.devices.virtio.net import random_mac

        return dataclasses.replace(self, mac=random_mac())

    def check(self) -> None:
        if bool(self.tap) == (self.fd is not None):
            raise MachineConfigError("--net needs one of tap=NAME or fd=N")
        if self.fd is not None and self.fd < 0:
            raise MachineConfigError(f"--net fd={self.fd}: not a file descriptor number")
        if not _NET_ID.fullmatch(self.id):
            raise MachineConfigError(f"--net id {self.id!r}: use 1 to 20 letters, digits or _.:-")
        if self.mac:
            from intrahost.vmm.devices.virtio.net import parse_mac

            try:
                parse_mac(self.mac)
            except ValueError as e:
                raise MachineConfigError(f"--net mac: {e}") from None


def parse_net(text: str, index: int = 0) -> NetConfig:
    """``tap=NAME[,mac=MAC][,id=NAME]`` or ``fd=N[,mac=MAC][,id=NAME]`` (the id defaults to
    netN)."""
    usage = "tap=NAME|fd=N[,mac=MAC][,id=NAME]"
    values: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MachineConfigError(f"--net {text!r}: {item!r} is not KEY=VALUE ({usage})")
        if key in values:
            raise MachineConfigError(f"--net {text!r}: {key} is given twice")
        if key == "fd":
            if not value.isdigit():
                raise MachineConfigError(f"--net {text!r}: fd must be a file descriptor number")
            values[key] = int(value)
        elif key == "mac":
            values[key] = value.lower()
        elif key in ("tap", "id"):
            values[key] = value
        else:
            raise MachineConfigError(
                f"--net {text!r}: unknown key {key!r} (known: tap, fd, mac, id)"
            )
    if ("tap" in values) == ("fd" in values):
        raise MachineConfigError(f"--net {text!r}: give one of tap=NAME or fd=N ({usage})")
    if "tap" in values and not values["tap"]:
        raise MachineConfigError(f"--net {text!r}: tap= needs a name")
    values.setdefault("id", f"net{index}")
    net = NetConfig(**values)
    net.check()
    return net


def parse_nets(texts: Sequence[str]) -> tuple[NetConfig, ...]:
    return tuple(parse_net(text, i) for i, text in enumerate(texts))


def _nets_from_json(value: Any) -> tuple[NetConfig, ...]:
    if not isinstance(value, list):
        raise MachineConfigError("config: nets must be a list")
    return tuple(NetConfig.from_dict(d, where=f"config: nets[{i}]") for i, d in enumerate(value))


def _nets_to_json(nets: tuple[NetConfig, ...]) -> list[dict[str, Any]]:
    return [n.to_dict() for n in nets]


@dataclass(frozen=True)
class MachineConfig(JsonRecord, label="config", error=MachineConfigError):
    """What a VMM was asked to run. ``GUEST_VISIBLE`` fields change what the guest sees and
    must match across a hand-off; the others may differ on the new VMM. Every field has a
    default, so a config from another VMM version without a field still reads."""

    memory: int = _flags(
        Flag("--memory", "guest memory size, e.g. 256M or 4G (default 256M)", parse=_size),
        default=256 << 20,
    )
    vcpus: int = _flags(Flag("--vcpus", "number of vCPUs (default 1)", type=int), default=1)
    guest: str = _flags(
        Flag("--guest", "counter, hello, or the path of a multiboot ELF or raw image"),
        default="counter",
    )
    guest_args: str = _flags(
        Flag("--guest-args", "the guest's command line, e.g. 'progress=1048576'"), default=""
    )
    memory_path: str | None = _flags(
        Flag("--memory-path", "back guest memory with this file instead of a memfd"),
        default=None,
    )
    serial: str = _flags(
        Flag("--serial", "console: stdio, file:PATH, pty or none (default stdio)"),
        default="stdio",
    )
    #: "" (a plain guest), "sev" or "sev-es".
    sev: str = _flags(
        Flag("--sev", "an SEV guest", const="sev"),
        Flag("--sev-es", "an SEV-ES guest", const="sev-es"),
        default="",
    )
    #: The SEV platform: "auto" (the kernel's where it has SEV, else the model), "kernel",
    #: "model". A running machine's config names the platform it resolved to.
    sev_platform: str = _flags(
        Flag(
            "--platform",
            "SEV platform: the kernel's (needs AMD SEV) or the model (default: auto)",
            choices=("auto", "kernel", "model"),
        ),
        default="auto",
    )
    sev_policy: int = _flags(Flag("--sev-policy", "SEV guest policy bits", type=integer), default=0)

    #: The virtio disks, in device order (see docs/devices.md).
    disks: tuple[DiskConfig, ...] = _flags_converted(
        Flag(
            "--disk",
            "a raw disk image: path=IMAGE[,readonly=on][,direct=on][,id=NAME] (repeatable)",
            parse=parse_disks,
            repeat=True,
        ),
        to_json=_disks_to_json,
        from_json=_disks_from_json,
        default=(),
    )

    #: The virtio network devices, in device order after the disks (see docs/devices.md).
    nets: tuple[NetConfig, ...] = _flags_converted(
        Flag(
            "--net",
            "a tap: tap=NAME|fd=N[,mac=MAC][,id=NAME] (repeatable)",
            parse=parse_nets,
            repeat=True,
        ),
        to_json=_nets_to_json,
        from_json=_nets_from_json,
        default=(),
    )

    GUEST_VISIBLE: ClassVar[tuple[str, ...]] = (
        "memory",
        "vcpus",
        "guest",
        "guest_args",
        "sev",
        "disks",
        "nets",
    )

    def __post_init__(self) -> None:
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise MachineConfigError(f"--vcpus must be between 1 and {MAX_VCPUS}")
        if self.sev not in ("", "sev", "sev-es"):
            raise MachineConfigError(f"unknown SEV mode {self.sev!r}: use --sev or --sev-es")
        if self.sev_platform not in ("auto", "kernel", "model"):
            raise MachineConfigError("--platform must be auto, kernel or model")
        if len(self.disks) > MAX_DISKS:
            raise MachineConfigError(f"at most {MAX_DISKS} --disk devices, got {len(self.disks)}")
        ids = [d.id for d in self.disks]
        if len(set(ids)) != len(ids):
            raise MachineConfigError(f"--disk ids must differ, got {ids}")
        if len(self.disks) + len(self.nets) > MAX_DISKS:
            raise MachineConfigError(
                f"at most {MAX_DISKS} virtio devices (--disk and --net together), got "
                f"{len(self.disks) + len(self.nets)}"
            )
        ids = [n.id for n in self.nets]
        if len(set(ids)) != len(ids):
            raise MachineConfigError(f"--net ids must differ, got {ids}")

    @property
    def virtio_count(self) -> int:
        """How many virtio devices the guest has: the disks, then the network devices."""
        return len(self.disks) + len(self.nets)

    @property
    def cmdline(self) -> str:
        """The guest's command line: the vCPU count, the user's arguments, then one
        ``virtio_mmio.device=`` entry per virtio device in device order."""
        parts = [f"cpus={self.vcpus}", self.guest_args]
        if self.virtio_count:
            from intrahost.vmm.devices.virtio.layout import cmdline_entry

            parts += [cmdline_entry(n) for n in range(self.virtio_count)]
        return " ".join(p for p in parts if p)

    def guest_differences(self, other: MachineConfig) -> list[str]:
        """The guest-visible fields in which ``other`` differs (for disks: their ids,
        read-only flags and sizes, not the image paths)."""
        return [f for f in self.GUEST_VISIBLE if self._guest_value(f) != other._guest_value(f)]

    def flag_differs(self, field: str, given: Any) -> bool:
        """Whether the value of a flag given to a VMM that takes this running guest over
        (``given``, as :func:`parse_disks` etc. made it) changes what the guest sees. For
        disks only the ids and read-only flags count: the new VMM inherits the open images,
        so their paths are not used and their sizes are the running guest's. For nets the ids
        count, and the MACs where the flags give one (the new VMM inherits the taps' fds)."""
        if field == "disks":
            return [d.flag_view() for d in given] != [d.flag_view() for d in self.disks]
        if field == "nets":
            return len(given) != len(self.nets) or not all(
                g.flag_view(n) for g, n in zip(given, self.nets, strict=False)
            )
        return bool(given != getattr(self, field))

    def _guest_value(self, field: str) -> Any:
        if field == "disks":
            return [d.guest_view() for d in self.disks]
        if field == "nets":
            return [n.guest_view() for n in self.nets]
        return getattr(self, field)
