"""What a VMM is asked to run: :class:`MachineConfig`, written once.

Its fields give its JSON form (the hand-off's ``config``, through ``JsonRecord``) and the
flags of ``intrahost run`` (through the :class:`Flag` in each field's metadata). This module
imports little, so that the command line can build its parser without loading KVM.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from intrahost.errors import IntrahostError
from intrahost.vmm.persist import JsonRecord

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


FLAGS = "intrahost.flags"


def _flags(*flags: Flag, default: Any) -> Any:
    return dataclasses.field(default=default, metadata={FLAGS: flags})


def config_flags() -> list[tuple[str, tuple[Flag, ...]]]:
    """Each MachineConfig field with its command-line flags."""
    return [(f.name, f.metadata[FLAGS]) for f in dataclasses.fields(MachineConfig)]


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

    GUEST_VISIBLE: ClassVar[tuple[str, ...]] = ("memory", "vcpus", "guest", "guest_args", "sev")

    def __post_init__(self) -> None:
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise MachineConfigError(f"--vcpus must be between 1 and {MAX_VCPUS}")
        if self.sev not in ("", "sev", "sev-es"):
            raise MachineConfigError(f"unknown SEV mode {self.sev!r}: use --sev or --sev-es")
        if self.sev_platform not in ("auto", "kernel", "model"):
            raise MachineConfigError("--platform must be auto, kernel or model")

    @property
    def cmdline(self) -> str:
        return f"cpus={self.vcpus} {self.guest_args}".strip()

    def guest_differences(self, other: MachineConfig) -> list[str]:
        """The guest-visible fields in which ``other`` differs."""
        return [f for f in self.GUEST_VISIBLE if getattr(self, f) != getattr(other, f)]
