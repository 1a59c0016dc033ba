"""The baton's compare-and-swap: exclusive between threads of one process (the tests run the
source and the destination in one process) and between processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from intrahost.migration.protocol import Baton, ProtocolError

ATTEMPTS = 20000

#: A second process: increments the baton it was given by CAS and prints the values it won.
CHILD = """
import json, sys
from intrahost.migration.protocol import Baton
baton = Baton(int(sys.argv[1]))
print("ready", flush=True)
sys.stdin.read(1)
won = []
for _ in range(int(sys.argv[2])):
    found = baton.read()
    if baton.swap(found, found + 1) == found:
        won.append(found)
baton.close()
print(json.dumps(won))
"""


def _increment(baton: Baton, attempts: int, won: list[int], start: threading.Barrier) -> None:
    """Try ``attempts`` increments by CAS; note each value this side swapped away."""
    start.wait()
    for _ in range(attempts):
        found = baton.read()
        if baton.swap(found, found + 1) == found:
            won.append(found)


def _peer(baton: Baton) -> Baton:
    """The destination's baton: the same open file description, as SCM_RIGHTS delivers it."""
    return Baton(os.dup(baton.fd))


def _assert_each_value_won_once(baton: Baton, *wins: list[int]) -> None:
    merged = sorted(v for won in wins for v in won)
    assert len(merged) == len(set(merged)), "two swaps of the same value both succeeded"
    assert merged == list(range(baton.read())), "a successful swap was lost"


def test_swap_is_exclusive_between_threads_of_one_process() -> None:
    source = Baton.create()
    destination = _peer(source)
    try:
        start = threading.Barrier(2)
        wins: tuple[list[int], list[int]] = ([], [])
        threads = [
            threading.Thread(target=_increment, args=(b, ATTEMPTS, w, start))
            for b, w in zip((source, destination), wins, strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        _assert_each_value_won_once(source, *wins)
    finally:
        source.close()
        destination.close()


def test_exactly_one_side_wins_each_round_between_threads() -> None:
    source = Baton.create()
    destination = _peer(source)
    rounds = 2000
    results: dict[str, list[int]] = {"source": [], "destination": []}
    ready = threading.Barrier(3)
    done = threading.Barrier(3)

    def side(baton: Baton, name: str, new: int) -> None:
        for _ in range(rounds):
            ready.wait()
            results[name].append(baton.swap(Baton.PENDING, new))
            done.wait()

    threads = [
        threading.Thread(target=side, args=(source, "source", Baton.ABANDONED)),
        threading.Thread(target=side, args=(destination, "destination", Baton.COMMITTED)),
    ]
    try:
        for t in threads:
            t.start()
        for _ in range(rounds):
            os.pwrite(source.fd, Baton._WORD.pack(Baton.PENDING), 0)
            ready.wait()
            done.wait()
        for t in threads:
            t.join(30)
    finally:
        source.close()
        destination.close()
    for i, (a, b) in enumerate(zip(results["source"], results["destination"], strict=True)):
        winners = [a, b].count(Baton.PENDING)
        assert winners == 1, f"round {i}: {winners} sides swapped PENDING away"
        # The loser saw the winner's value, never a half-done swap.
        assert {a, b} in ({Baton.PENDING, Baton.COMMITTED}, {Baton.PENDING, Baton.ABANDONED})


def test_swap_is_exclusive_between_processes() -> None:
    baton = Baton.create()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(baton.fd), str(ATTEMPTS)],
        pass_fds=[baton.fd],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        mine: list[int] = []
        assert child.stdin is not None and child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        child.stdin.write("go")
        child.stdin.close()
        _increment(baton, ATTEMPTS, mine, threading.Barrier(1))
        theirs = json.loads(child.stdout.read())
        assert child.wait(60) == 0
        _assert_each_value_won_once(baton, mine, theirs)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        baton.close()


def test_a_held_lock_times_out_and_a_released_one_is_taken() -> None:
    """A peer that holds the lock past the timeout makes the swap fail; one that lets go
    within it does not."""
    source = Baton.create()
    destination = _peer(source)
    try:
        with destination.locked(timeout=1.0):
            t0 = time.monotonic()
            with pytest.raises(ProtocolError, match="stayed locked"):
                source.swap(Baton.PENDING, Baton.ABANDONED, timeout=0.2)
            assert 0.2 <= time.monotonic() - t0 < 2.0
        assert source.swap(Baton.PENDING, Baton.ABANDONED, timeout=0.2) == Baton.PENDING
        assert destination.read() == Baton.ABANDONED
    finally:
        source.close()
        destination.close()
