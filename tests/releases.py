"""The released versions recorded in the repository (RELEASES), for the tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import intrahost

ROOT = Path(__file__).resolve().parent.parent
RELEASES = ROOT / "RELEASES"


@dataclass(frozen=True)
class Release:
    version: str
    commit: str


def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def read_releases(path: Path = RELEASES) -> list[Release]:
    """``VERSION COMMIT`` per line, oldest first; ``#`` starts a comment."""
    releases = []
    for line in path.read_text().splitlines():
        fields = line.partition("#")[0].split()
        if fields:
            version, commit = fields
            releases.append(Release(version, commit))
    return releases


def previous_release() -> Release:
    """The newest recorded release older than this tree."""
    current = parse_version(intrahost.__version__)
    older = [r for r in read_releases() if parse_version(r.version) < current]
    return max(older, key=lambda r: parse_version(r.version))
