"""Which SEV platforms exist here, and how to open one.

Each platform registers a factory and an availability check (``None`` when usable, else the
reason it is not). ``"auto"`` is the kernel where it is available, else the model.

The kernel platform lives in ``intrahost.sev.kernel`` (written separately): that module must
define ``KernelPlatform`` (a :class:`~intrahost.sev.interface.SevPlatform` whose constructor
takes no arguments) and may define ``unavailable_reason() -> str | None`` for checks beyond
the presence of ``/dev/sev`` (e.g. ``KVM_CHECK_EXTENSION`` and supported VM types).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

from intrahost.errors import IntrahostError
from intrahost.sev.interface import SevPlatform

KERNEL_MODULE = "intrahost.sev.kernel"


class PlatformNotAvailableError(IntrahostError):
    """The requested SEV platform cannot be used on this host."""


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
        return f"unknown SEV platform {name!r} (known: {', '.join(_REGISTRY)})"
    return entry.unavailable_reason()


def open_platform(name: str = "auto") -> SevPlatform:
    """Open platform ``name`` ("kernel", "model", or "auto": the kernel if usable)."""
    if name == "auto":
        name = "kernel" if unavailable_reason("kernel") is None else "model"
    reason = unavailable_reason(name)
    if reason is not None:
        raise PlatformNotAvailableError(
            f"the {name} SEV platform is not available: {reason}; use --platform model"
        )
    return _REGISTRY[name].factory()


def _kernel_unavailable() -> str | None:
    if not os.path.exists("/dev/sev"):
        return "this host has no /dev/sev (no AMD SEV firmware)"
    try:
        module = importlib.import_module(KERNEL_MODULE)
    except ImportError as err:
        return f"{KERNEL_MODULE} cannot be imported: {err}"
    check = getattr(module, "unavailable_reason", None)
    if callable(check):
        reason = check()
        return None if reason is None else str(reason)
    return None


def _kernel_factory() -> SevPlatform:
    module = importlib.import_module(KERNEL_MODULE)
    platform = module.KernelPlatform()
    if not isinstance(platform, SevPlatform):
        raise PlatformNotAvailableError(f"{KERNEL_MODULE}.KernelPlatform is not a SevPlatform")
    return platform


def _model_factory() -> SevPlatform:
    from intrahost.sevmodel.client import ModelPlatform

    return ModelPlatform()


register_platform("kernel", _kernel_factory, _kernel_unavailable)
register_platform("model", _model_factory)
