"""SEV and SEV-ES: one interface (``interface.py``), two platforms (``platforms.py``).

``open_platform("auto")`` gives the kernel platform where ``/dev/sev`` exists and the model
platform (``intrahost.sevmodel``) everywhere else.
"""

from intrahost.sev.interface import (
    SEV_NR_MAX,
    SEV_POLICY_ES,
    SEV_POLICY_NODBG,
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
    PlatformNotAvailableError,
    open_platform,
    platform_names,
    register_platform,
    unavailable_reason,
)

__all__ = [
    "SEV_NR_MAX",
    "SEV_POLICY_ES",
    "SEV_POLICY_NODBG",
    "FirmwareError",
    "GuestState",
    "GuestStatus",
    "PlatformInfo",
    "PlatformNotAvailableError",
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
