"""Fault injection at the hand-off's steps, for the exactly-one-runner tests.

The sender, the receiver and the channel between them are given a :class:`Faults` object and
call its hooks at each step; the default, :data:`NO_FAULTS`, injects nothing. A VMM process
builds its plan once, at start-up, with :func:`from_environment`: started with
``INTRAHOST_TEST_FAULT=SIDE:POINT:FAULT`` it injects FAULT when its side (``source`` or
``destination``) reaches POINT.

Points are the protocol's steps (see :data:`SOURCE_POINTS`, :data:`DESTINATION_POINTS`,
:data:`SEV_DESTINATION_POINTS`, :data:`DEVICE_SOURCE_POINTS`, :data:`DEVICE_DESTINATION_POINTS`).
Faults:

``kill``      the process kills itself with SIGKILL (a crash at that instant)
``close``     the process closes its migration socket (the peer sees EOF)
``stall``     the process stops answering for longer than the peer's timeout
``truncate``  the next frame it sends is cut short, then the socket is closed
``corrupt``   the next frame it sends has one payload byte flipped
``badstate``  (source, at ``state``) the saved state lacks a vCPU's LAPIC: valid framing, but
              the destination can't import it
``fail``      (destination, at ``before-move``) MOVE fails, as when the kernel refuses it
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from intrahost.errors import IntrahostError
from intrahost.migration import envelope

log = logging.getLogger(__name__)

ENV = "INTRAHOST_TEST_FAULT"
FAULTS = ("kill", "close", "stall", "truncate", "corrupt", "badstate", "fail")

#: Where the source can fail: before each request it sends, and around the pause. With a
#: destination that commits with the state (STATE_COMMIT), "after-state" and "commit" do not
#: exist (nothing happens between the state and the commit); a fault planned there makes the
#: faulty VMM speak the two-step sequence (STATE, then COMMIT) so that it is reached, as with
#: an intrahost 0.1 peer. Likewise "recv-commit" on the destination.
SOURCE_POINTS = (
    "start",
    "memory",
    "config",
    "ready",
    "before-pause",
    "after-pause",
    "state",
    "after-state",
    "commit",
    "after-commit",
)
#: Where the destination can fail: on receiving each message, and around the import/commit.
DESTINATION_POINTS = (
    "recv-start",
    "recv-memory",
    "recv-config",
    "recv-ready",
    "recv-state",
    "after-import",
    "recv-commit",
    "at-commit",
    "after-commit",
)
#: The points only the two-step sequence has (see SOURCE_POINTS).
TWO_STEP_POINTS = {"source": ("after-state", "commit"), "destination": ("recv-commit",)}
#: SEV guests only, on the destination: around KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM.
SEV_DESTINATION_POINTS = ("before-move", "after-move")
#: Guests with virtio devices only: before the source sends the devices' fds, and on their
#: arrival at the destination.
DEVICE_SOURCE_POINTS = ("devices",)
DEVICE_DESTINATION_POINTS = ("recv-device-fds",)

#: Every point each side calls a hook at (the source also at ``export``, between the pause
#: and the state, where it holds no channel).
_POINTS = {
    "source": (*SOURCE_POINTS, *DEVICE_SOURCE_POINTS, "export"),
    "destination": (*DESTINATION_POINTS, *SEV_DESTINATION_POINTS, *DEVICE_DESTINATION_POINTS),
}
#: Faults that only make sense at one point.
_ONLY_AT = {"badstate": ("source", "state"), "fail": ("destination", "before-move")}


class FaultPlanError(IntrahostError):
    """``INTRAHOST_TEST_FAULT`` does not name a fault this VMM can inject."""


class InjectedFailure(IntrahostError):
    """The ``fail`` fault: the step fails as the kernel's refusal would."""


class Faults:
    """The hooks a hand-off calls; this one injects nothing."""

    def hit(self, side: str, point: str, close: Callable[[], None] | None = None) -> None:
        """Called by the sender and the receiver at each point; ``close`` closes the side's
        migration socket."""

    def frame_fault(self) -> str | None:
        """Called by the channel before each frame it sends: ``"truncate"``, ``"corrupt"``
        (once), or None."""
        return None

    def state(self, data: bytes) -> bytes:
        """Called by the sender on the saved state before it sends it."""
        return data

    def two_step_commit(self) -> bool:
        """Whether this side must not offer to commit with the state (the planned fault is
        at a point only the two-step sequence has)."""
        return False


NO_FAULTS = Faults()


@dataclass(frozen=True)
class Fault:
    side: str
    point: str
    kind: str


class FaultPlan(Faults):
    """Injects one :class:`Fault`."""

    def __init__(self, fault: Fault, stall_seconds: float) -> None:
        self.fault = fault
        self.stall_seconds = stall_seconds
        #: Set at the point by ``truncate``, ``corrupt`` and ``badstate``; consumed by the
        #: channel's next send (the first two) or by the sender's state (the last).
        self._pending: str | None = None

    def hit(self, side: str, point: str, close: Callable[[], None] | None = None) -> None:
        fault = self.fault
        if fault.side != side or fault.point != point:
            return
        log.warning("injecting fault %s at %s:%s", fault.kind, side, point)
        if fault.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault.kind == "close" and close is not None:
            close()
        elif fault.kind == "stall":
            time.sleep(self.stall_seconds)
        elif fault.kind in ("truncate", "corrupt", "badstate"):
            self._pending = fault.kind
        elif fault.kind == "fail":
            raise InjectedFailure(f"fault injected at {side}:{point}")

    def frame_fault(self) -> str | None:
        return self._take(("truncate", "corrupt"))

    def two_step_commit(self) -> bool:
        return self.fault.point in TWO_STEP_POINTS[self.fault.side]

    def state(self, data: bytes) -> bytes:
        return _without_a_lapic(data) if self._take(("badstate",)) else data

    def _take(self, kinds: tuple[str, ...]) -> str | None:
        if self._pending not in kinds:
            return None
        kind, self._pending = self._pending, None
        return kind


def from_environment(environ: Mapping[str, str] = os.environ) -> Faults:
    """The plan ``INTRAHOST_TEST_FAULT`` asks for; :data:`NO_FAULTS` without it. ``stall``
    sleeps 2.5 times ``INTRAHOST_MIGRATION_TIMEOUT``: past both sides' timeouts."""
    spec = environ.get(ENV)
    if not spec:
        return NO_FAULTS
    side, _, rest = spec.partition(":")
    point, _, kind = rest.partition(":")
    if side not in _POINTS or point not in _POINTS[side] or kind not in FAULTS:
        raise FaultPlanError(
            f"{ENV}={spec!r} is not SIDE:POINT:FAULT with SIDE source or destination, POINT "
            f"one of that side's ({', '.join(_POINTS.get(side, _POINTS['source']))}) and "
            f"FAULT one of {', '.join(FAULTS)}"
        )
    only = _ONLY_AT.get(kind)
    if only is not None and only != (side, point):
        raise FaultPlanError(f"{ENV}: the {kind} fault applies only at {only[0]}:{only[1]}")
    timeout = float(environ.get("INTRAHOST_MIGRATION_TIMEOUT", "10"))
    return FaultPlan(Fault(side, point, kind), stall_seconds=2.5 * timeout)


def _without_a_lapic(data: bytes) -> bytes:
    """The ``badstate`` fault: a well-formed state the destination cannot import."""
    state = envelope.decode(data)
    kept = [c for n, c in state.components.items() if n != "vcpu/0/lapic"]
    return envelope.encode(kept)
