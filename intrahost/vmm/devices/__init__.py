"""The I/O and MMIO buses, and the port-I/O devices: a 16550A UART (with its host consoles)
and the test guests' debug port."""

from intrahost.vmm.devices.bus import (
    IoBus,
    IoBusError,
    MmioBus,
    MmioBusError,
    MmioDevice,
    MmioRange,
    PioDevice,
    PortRange,
)
from intrahost.vmm.devices.console import (
    BufferConsole,
    Console,
    ConsoleError,
    FileConsole,
    NullConsole,
    PtyConsole,
    StdoutConsole,
    open_console,
)
from intrahost.vmm.devices.debugport import (
    DEBUG_PORT_BASE,
    DebugPort,
    DebugPortState,
    DebugPortStateError,
    Report,
    ReportKind,
    make_tag,
)
from intrahost.vmm.devices.uart import (
    COM1_BASE,
    COM1_IRQ,
    Uart16550,
    UartState,
    UartStateError,
)

__all__ = [
    "COM1_BASE",
    "COM1_IRQ",
    "DEBUG_PORT_BASE",
    "BufferConsole",
    "Console",
    "ConsoleError",
    "DebugPort",
    "DebugPortState",
    "DebugPortStateError",
    "FileConsole",
    "IoBus",
    "IoBusError",
    "MmioBus",
    "MmioBusError",
    "MmioDevice",
    "MmioRange",
    "NullConsole",
    "PioDevice",
    "PortRange",
    "PtyConsole",
    "Report",
    "ReportKind",
    "StdoutConsole",
    "Uart16550",
    "UartState",
    "UartStateError",
    "make_tag",
    "open_console",
]
