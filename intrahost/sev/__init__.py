"""SEV and SEV-ES: one interface (``interface.py``), two platforms (``platforms.py``).

``open_platform("auto")`` gives the kernel platform where ``/dev/sev`` works and the model
platform (``intrahost.sevmodel``, registered by importing it) everywhere else.
"""

# Imported for its registration of the "kernel" platform.
import intrahost.sev.kernel  # noqa: F401
from intrahost.sev.interface import (
    SEV_NR_MAX,
    SEV_POLICY_ES,
    SEV_POLICY_NODBG,
    Attachment,
    FirmwareError,
    GuestState,
    GuestStatus,
    PlatformInfo,
    SevCommand,
    SevError,
    SevPlatform,
    SevVm,
    VmType,
)
from intrahost.sev.platforms import (
    PlatformUnavailableError,
    open_platform,
    platform_names,
    register_platform,
    unavailable_reason,
)

__all__ = [
    "SEV_NR_MAX",
    "SEV_POLICY_ES",
    "SEV_POLICY_NODBG",
    "Attachment",
    "FirmwareError",
    "GuestState",
    "GuestStatus",
    "PlatformInfo",
    "PlatformUnavailableError",
    "SevCommand",
    "SevError",
    "SevPlatform",
    "SevVm",
    "VmType",
    "open_platform",
    "platform_names",
    "register_platform",
    "unavailable_reason",
]
