"""The documentation against the repository: links and named paths stay inside it and exist,
quoted error messages are the code's, and docs/results.md's findings follow its tables."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Any

import pytest

import intrahost

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Directories the repository ignores (.gitignore): paths under them are written by its tools
#: (bench/out/ by the benches), so a doc may name them although they are not checked in.
GENERATED = tuple(
    line.strip()
    for line in (ROOT / ".gitignore").read_text().splitlines()
    if line.strip().endswith("/") and "/" in line.strip()[:-1]
)

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
PATHISH = re.compile(r"[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]*)+")


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def _top_level() -> set[str]:
    return {p.name for p in ROOT.iterdir() if not p.name.startswith(".")} - {"build"}


def repository_paths(text: str) -> list[str]:
    """The code spans of ``text`` that name a path in the repository (they start with one of
    its top-level entries, e.g. ``intrahost/cli.py``, ``tests/``, ``docs/api.md``)."""
    top = _top_level()
    names = []
    for span in CODE_SPAN.findall(text):
        if PATHISH.fullmatch(span) and span.split("/")[0] in top:
            names.append(span)
    return names


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_links_stay_inside_the_repository_and_exist(doc: Path) -> None:
    text = doc.read_text()
    assert "/work/" not in text, f"{doc.name} names a path outside the repository (/work/...)"
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor on the page
        path = target.split("#")[0]
        assert not path.startswith("/"), f"{doc.name}: absolute link {target!r}"
        resolved = (doc.parent / path).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc.name}: {target!r} leaves the repository"
        assert resolved.exists(), f"{doc.name}: {target!r} does not exist"


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_named_repository_paths_exist(doc: Path) -> None:
    for name in repository_paths(doc.read_text()):
        if name.startswith(GENERATED):
            continue
        assert (ROOT / name).exists(), f"{doc.name} names {name!r}, which does not exist"


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    text = "See `intrahost/nope.py`, `tests/`, `/dev/kvm` and `arch/x86/kvm/x86.c`."
    assert repository_paths(text) == ["intrahost/nope.py", "tests/"]
    assert LINK.findall("[a](../x.md) ![b](p.png) [c](https://e.org)") == [
        "../x.md",
        "p.png",
        "https://e.org",
    ]
    assert "bench/out/" in GENERATED


# --- docs/results.md: the findings follow the tables ---------------------------------------------


def _median(cell: str) -> dict[str, float | None]:
    first = cell.split("/")[0].strip()
    return {"median": None if first in ("—", "") else float(first)}


def _tables(text: str) -> list[list[list[str]]]:
    """Every markdown table of ``text`` whose first column is ``point``: rows of cells."""
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("| point |"):
            current = []
            tables.append(current)
        elif current is not None and line.startswith("|"):
            if not line.startswith("|---"):
                current.append([c.strip() for c in line.strip("|").split("|")])
        else:
            current = None
    return tables


def points_from_tables(text: str) -> list[dict[str, Any]]:
    """The medians bench/prose.py reads, recovered from the generated tables (the last
    three; the guest's stopwatch table, when the run has it, comes first)."""
    *_, blackout, own, e2e = _tables(text)
    points = []
    for b, o, e in zip(blackout, own, e2e, strict=True):
        assert b[0] == o[0] == e[0]
        noise_ih, noise_q = b[6].split("/")
        points.append(
            {
                "label": b[0],
                "vcpus": int(b[0].split("/")[1]),
                "intrahost": {
                    "migrate": {
                        "progress_blackout_ms": _median(b[1]),
                        "noise_floor_ms": _median(noise_ih),
                        "end_to_end_ms": _median(e[2]),
                    },
                    "upgrade": {
                        "progress_blackout_ms": _median(b[2]),
                        "end_to_end_ms": _median(e[1]),
                    },
                    "breakdown": {"total_ms": _median(o[6])},
                },
                "qemu": {
                    "progress_blackout_ms": _median(b[3]),
                    "noise_floor_ms": _median(noise_q),
                    "downtime_ms": _median(o[7]),
                    "end_to_end_ms": _median(e[3]),
                },
            }
        )
    return points


def test_results_findings_are_derived_from_the_tables() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from prose import findings
    finally:
        sys.path.remove(str(ROOT / "bench"))
    text = (ROOT / "docs" / "results.md").read_text()
    begin, end = text.index("<!-- peers.py:begin"), text.index("<!-- peers.py:end")
    generated = text[begin:end]
    assert findings(points_from_tables(generated)) in generated
    for row in _tables(generated)[-3]:
        ours, theirs = _median(row[1])["median"], _median(row[3])["median"]
        assert ours is not None and theirs is not None
        assert row[4] == f"{ours / theirs:.2f}", row


# --- docs/api.md: quoted error messages are the code's --------------------------------------------

#: The words docs/api.md writes for the variable parts of a message (a quoted one stands for
#: a repr), and "..." for the rest of one.
PLACEHOLDER = re.compile(r"'?\b(?:NAME|URI|PATH|TYPE|X)\b'?|\b\d+\b|\.\.\.")


def source_literals() -> list[str]:
    """Every string literal of the package, whitespace collapsed; an f-string's replacement
    fields become NUL (no doc text matches across them)."""
    literals = []
    for path in sorted((ROOT / "intrahost").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                text = "".join(
                    v.value if isinstance(v, ast.Constant) else "\0" for v in node.values
                )
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
            else:
                continue
            literals.append(" ".join(text.split()))
    return literals


def quoted_messages(text: str) -> list[str]:
    """The messages a doc quotes: *"italic quotes"* and inline code of three words or more
    that is not a command line, JSON or a call (fenced code blocks are skipped)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    messages = [" ".join(m.split()) for m in re.findall(r'\*"(.+?)"\*', text, re.S)]
    for span in re.findall(r"`([^`]+)`", text):
        span = " ".join(span.split())
        if len(span.split()) < 3 or span[0] in "{[(-" or "=" in span or "(" in span:
            continue
        if span.split()[0] in ("intrahost", "socat", "mkdir", "python"):
            continue
        messages.append(span)
    return messages


def in_source(message: str, literals: list[str]) -> bool:
    """Whether some literal reads as ``message``, its placeholders standing for anything."""
    pattern = ".*".join(re.escape(piece) for piece in PLACEHOLDER.split(message))
    return any(re.search(pattern, literal) for literal in literals)


def test_api_doc_error_messages_are_the_codes() -> None:
    literals = source_literals()
    quoted = quoted_messages((ROOT / "docs" / "api.md").read_text())
    assert len(quoted) >= 15, quoted
    wrong = [m for m in quoted if not in_source(m, literals)]
    assert not wrong, f"docs/api.md quotes messages the code does not have: {wrong}"


def test_the_message_check_catches_a_reworded_message() -> None:
    literals = ["the guest has shut down", "a migration to \0 is already in progress; wait"]
    assert in_source("a migration to URI is already in progress; ...", literals)
    assert not in_source("a migration to URI is in progress; ...", literals)
    assert in_source("the guest has shut down", literals)
    assert not in_source("the guest shut down", literals)
    text = '`the guest has shut down` and *"a b\n c"* but `--api-socket PATH`'
    assert quoted_messages(text) == ["a b c", "the guest has shut down"]


def test_the_api_doc_shows_this_version() -> None:
    text = (ROOT / "docs" / "api.md").read_text()
    major, minor, micro = (int(p) for p in intrahost.__version__.split("."))
    assert set(re.findall(r'"package": "intrahost ([^"]+)"', text)) == {intrahost.__version__}
    for found in re.findall(r'"major": (\d+), "minor": (\d+), "micro": (\d+)', text):
        assert tuple(map(int, found)) == (major, minor, micro)
