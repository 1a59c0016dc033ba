"""The root of every exception intrahost raises on purpose.

Each failure kind has its own subclass, defined next to the code that detects it, with a
message that tells the user what to do. The CLI prints ``str(error)`` on one line and exits
non-zero; it never shows a traceback for an ``IntrahostError``.
"""


class IntrahostError(Exception):
    """Base class of all intrahost errors."""
