"""Fault injection at the hand-off's steps, for the exactly-one-runner tests.

A VMM started with ``INTRAHOST_TEST_FAULT=SIDE:POINT:FAULT`` injects FAULT when its side
(``source`` or ``destination``) reaches POINT. Without the variable every hook is a no-op.

Points are the protocol's steps (see :data:`SOURCE_POINTS`, :data:`DESTINATION_POINTS`).
Faults:

``kill``      the process kills itself with SIGKILL (a crash at that instant)
``close``     the process closes its migration socket (the peer sees EOF)
``stall``     the process stops answering for longer than the peer's timeout
``truncate``  the next frame it sends is cut short, then the socket is closed
``corrupt``   the next frame it sends has one payload byte flipped
``badstate``  (source, at ``state``) the saved state lacks a vCPU's LAPIC: valid framing, but
              the destination can't import it
``fail``      (destination, at ``before-move`` / ``after-move``) the step fails with an error,
              as if the kernel refused
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

ENV = "INTRAHOST_TEST_FAULT"
FAULTS = ("kill", "close", "stall", "truncate", "corrupt", "badstate", "fail")

#: Where the source can fail: before each request it sends, and around the pause.
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
#: SEV guests only, on the destination: around KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM.
SEV_DESTINATION_POINTS = ("before-move", "after-move")

#: How long ``stall`` sleeps: past both sides' timeouts.
STALL_SECONDS = 2.5 * float(os.environ.get("INTRAHOST_MIGRATION_TIMEOUT", "10"))


@dataclass(frozen=True)
class Fault:
    side: str
    point: str
    kind: str


def planned() -> Fault | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    side, _, rest = spec.partition(":")
    point, _, kind = rest.partition(":")
    return Fault(side, point, kind)


_fault = planned()
#: Set by ``truncate`` / ``corrupt``: applied by the channel to its next send.
pending_frame_fault: str | None = None


def hit(side: str, point: str, close: object = None) -> None:
    """The hook: called by the sender and receiver at each point."""
    global pending_frame_fault
    fault = _fault
    if fault is None or fault.side != side or fault.point != point:
        return
    log.warning("injecting fault %s at %s:%s", fault.kind, side, point)
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.kind == "close" and callable(close):
        close()
    elif fault.kind == "stall":
        time.sleep(STALL_SECONDS)
    elif fault.kind in ("truncate", "corrupt", "badstate"):
        pending_frame_fault = fault.kind
    elif fault.kind == "fail":
        raise InjectedFailure(f"fault injected at {side}:{point}")


class InjectedFailure(Exception):
    """The ``fail`` fault: the step raises as if the operation had failed."""


def take_frame_fault(kinds: tuple[str, ...]) -> str | None:
    """The pending frame fault if it is one of ``kinds`` (it is then consumed)."""
    global pending_frame_fault
    if pending_frame_fault not in kinds:
        return None
    kind, pending_frame_fault = pending_frame_fault, None
    return kind
