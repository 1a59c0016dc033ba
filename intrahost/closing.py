"""The base of intrahost's objects that hold a resource (an fd, a mapping, a process) until
they are closed.

``with obj:`` closes ``obj`` at the end of the block, whatever ends it; ``close`` is the one
place that releases. A class that also acquires on entry (starts a thread or a process)
overrides ``__enter__`` to do that and return ``self``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self


class Closeable(ABC):
    """An object released by :meth:`close`, and closed at the end of a ``with`` block."""

    @abstractmethod
    def close(self) -> None:
        """Release what the object holds."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
