"""This release's version: ``intrahost.__version__``, the one place it is written (the
package metadata reads it from there too, so an install and its source never disagree)."""

from __future__ import annotations

import intrahost


def version() -> str:
    """``X.Y.Z``: this code's release."""
    return intrahost.__version__


def version_numbers() -> tuple[int, int, int]:
    """(major, minor, micro) of :func:`version`; a part that is not a number counts as 0."""
    parts = [int(p) if p.isdigit() else 0 for p in version().split(".")[:3]]
    major, minor, micro = [*parts, 0, 0, 0][:3]
    return major, minor, micro
