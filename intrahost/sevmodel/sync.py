"""Kernel-style mutexes for the model, killable like ``mutex_lock_killable``.

All model state is guarded by one :class:`threading.Condition` (the service's "big lock"). A
:class:`ModelMutex` is then only an owner field, and waiting for it is ``Condition.wait``. This
keeps the modelled locks (``kvm->lock``, ``vcpu->mutex``) exactly as blocking as the
kernel's, including the ability to wait for a long time, while the model's own bookkeeping can
never deadlock.

A :class:`Task` is the model's ``current``: the request being served. When the client that
sent it goes away (its VMM was killed), the task is killed: a killable wait then ends with
``EINTR`` semantics, while a non-killable wait goes on, as in the kernel.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass(eq=False)
class Task:
    """A requester. ``owner`` is who holds the locks the task takes (often the task itself)."""

    name: str
    killed: bool = False
    cgroup: str = "/"
    owner: Hashable | None = None

    def __post_init__(self) -> None:
        if self.owner is None:
            self.owner = self

    @property
    def holder(self) -> Hashable:
        assert self.owner is not None
        return self.owner


class LockOwnershipError(AssertionError):
    """A model bug: a mutex was released by someone who does not hold it."""


@dataclass(eq=False)
class ModelMutex:
    """A ``struct mutex``: one owner at a time, waiters sleep on the shared condition."""

    cond: threading.Condition
    name: str
    owner: Hashable | None = None
    waiters: int = field(default=0)

    def lock(self, task: Task, *, killable: bool, owner: Hashable | None = None) -> bool:
        """Take the mutex for ``owner`` (default: the task's holder).

        Returns ``False`` if the task was killed while it had to wait (``-EINTR``). Like
        ``mutex_lock_killable``, an uncontended mutex is taken even by a killed task.
        """
        holder = task.holder if owner is None else owner
        with self.cond:
            if self.owner is None:
                self.owner = holder
                return True
            self.waiters += 1
            try:
                while self.owner is not None:
                    if killable and task.killed:
                        return False
                    self.cond.wait()
                self.owner = holder
                return True
            finally:
                self.waiters -= 1

    def unlock(self, owner: Hashable) -> None:
        """Release the mutex; only its owner may (a model bug otherwise)."""
        with self.cond:
            if self.owner is not owner and self.owner != owner:
                raise LockOwnershipError(
                    f"{self.name} released by {owner!r} but held by {self.owner!r}"
                )
            self.owner = None
            self.cond.notify_all()

    @property
    def locked(self) -> bool:
        return self.owner is not None
