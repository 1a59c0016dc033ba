"""Which SEV platforms exist here, and how to open one.

A platform registers itself under a name with a factory and an availability check (``None``
when usable, else the reason it is not):

* ``"kernel"``, the real ``/dev/kvm`` and ``/dev/sev`` (:mod:`intrahost.sev.kernel`), is
  registered when :mod:`intrahost.sev` is imported;
* ``"model"``, the software model (:mod:`intrahost.sevmodel`, a layer above this one), is
  registered when that package is imported: whoever offers it (the VMM) imports it.

``"auto"`` is the kernel where it is available, else the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from intrahost.errors import IntrahostError
from intrahost.sev.interface import SevPlatform


class PlatformUnavailableError(IntrahostError):
    """The requested SEV platform cannot be used here (not registered, no device, no
    service to reach)."""


@dataclass(frozen=True)
class PlatformEntry:
    name: str
    factory: Callable[[], SevPlatform]
    unavailable_reason: Callable[[], str | None]


_REGISTRY: dict[str, PlatformEntry] = {}


def register_platform(
    name: str,
    factory: Callable[[], SevPlatform],
    unavailable_reason: Callable[[], str | None] = lambda: None,
) -> None:
    """Add (or replace) a platform."""
    _REGISTRY[name] = PlatformEntry(name, factory, unavailable_reason)


def platform_names() -> list[str]:
    return list(_REGISTRY)


def unavailable_reason(name: str) -> str | None:
    """``None`` if platform ``name`` can be opened here, else why not."""
    entry = _REGISTRY.get(name)
    if entry is None:
        known = ", ".join(_REGISTRY) or "none"
        return f"unknown SEV platform {name!r} (known here: {known})"
    return entry.unavailable_reason()


def open_platform(name: str = "auto") -> SevPlatform:
    """Open platform ``name`` ("kernel", "model", or "auto": the kernel if usable)."""
    if name == "auto":
        name = "kernel" if unavailable_reason("kernel") is None else "model"
    reason = unavailable_reason(name)
    if reason is not None:
        raise PlatformUnavailableError(
            f"the {name} SEV platform is not available: {reason}; use --platform model"
        )
    return _REGISTRY[name].factory()
