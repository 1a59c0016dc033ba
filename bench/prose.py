"""The words of docs/results.md that depend on a run, derived from the run's summaries.

``bench/peers.py --docs`` writes :func:`findings` next to the tables it generates, so the page's
account of a run cannot drift from its numbers (the hand-written prose around the generated
block explains the method and states no figures). ``tests/test_docs.py`` checks that the page's
findings are what this module derives from the page's own tables.

``points`` are the per-point summaries of ``peers.json`` (``report["points"]``); only medians
are used, rounded as the tables show them (the tables' ratio column is computed from the same
rounded medians), and a missing VMM or figure reads as "—".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: The goal: intrahost's progress blackout at most this fraction of QEMU's, at every point.
GOAL_RATIO = 0.5


def _median(d: dict[str, Any] | None, *path: str) -> float | None:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    value = d.get("median") if isinstance(d, dict) else None
    # As the tables show it (2 decimals), so that the page's words and tables agree exactly.
    return round(value, 2) if isinstance(value, int | float) else None


def _span(values: Sequence[float | None], digits: int = 2) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "—"
    low, high = f"{min(known):.{digits}f}", f"{max(known):.{digits}f}"
    return low if low == high else f"{low}\u2013{high}"


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """``ours / theirs`` of two medians as the tables show them (2 decimals): the tables'
    ratio column and the findings agree with the medians beside them."""
    if ours is None or theirs is None or round(theirs, 2) == 0:
        return None
    return round(ours, 2) / round(theirs, 2)


def findings(points: Sequence[dict[str, Any]]) -> str:
    """What the tables of one run show, as a markdown list."""
    blackout = ("migrate", "progress_blackout_ms")
    ratios = [
        ratio(
            _median(p.get("intrahost"), *blackout),
            _median(p.get("qemu"), "progress_blackout_ms"),
        )
        for p in points
    ]
    known = [r for r in ratios if r is not None]
    if not known:
        goal = "can't be judged: no point has both VMMs' figures"
    else:
        met = sum(1 for r in known if r <= GOAL_RATIO)
        verdict = "met" if met == len(points) else "not met"
        goal = (
            f"{verdict}: the ratio is at most {GOAL_RATIO} at {met} of {len(points)} points "
            f"({', '.join('—' if r is None else f'{r:.2f}' for r in ratios)})"
        )
    lines = [
        "**What this run shows** (derived from the tables above by `bench/peers.py --docs`; "
        "medians, ms):",
        "",
        f"- **The goal** — intrahost's progress blackout at most half of QEMU's at every "
        f"point — is {goal}.",
    ]
    for vcpus in sorted({p["vcpus"] for p in points}):
        row = [p for p in points if p["vcpus"] == vcpus]
        first, last = row[0]["label"].split("/")[0], row[-1]["label"].split("/")[0]
        ih = [p.get("intrahost") for p in row]
        qm = [p.get("qemu") for p in row]
        lines.append(
            f"- **{vcpus} vCPU{'s' if vcpus > 1 else ''}, {first} to {last}**: progress "
            f"blackout intrahost {_span([_median(d, *blackout) for d in ih])}, QEMU "
            f"{_span([_median(d, 'progress_blackout_ms') for d in qm])}; the VMMs' own "
            f"figures: intrahost's total {_span([_median(d, 'breakdown', 'total_ms') for d in ih])}"
            f", QEMU's `downtime` {_span([_median(d, 'downtime_ms') for d in qm], 0)}; noise "
            f"floor intrahost {_span([_median(d, 'migrate', 'noise_floor_ms') for d in ih])}, "
            f"QEMU {_span([_median(d, 'noise_floor_ms') for d in qm])}."
        )
    lines.append(
        "- **End-to-end upgrade**: `intrahost upgrade` "
        f"{_span([_median(p.get('intrahost'), 'upgrade', 'end_to_end_ms') for p in points], 0)}"
        ", intrahost two-process "
        f"{_span([_median(p.get('intrahost'), 'migrate', 'end_to_end_ms') for p in points], 0)}"
        f", QEMU {_span([_median(p.get('qemu'), 'end_to_end_ms') for p in points], 0)}."
    )
    return "\n".join(lines)
