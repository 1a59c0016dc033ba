"""The released versions recorded in the repository (RELEASES), and installing one from the
repository's history, for the tests."""

from __future__ import annotations

import fcntl
import io
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

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


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=60, check=False
    )


def require_in_history(release: Release, root: Path = ROOT) -> None:
    """Skip if ``root`` is not a git checkout (an unpacked sdist: no history to install a
    release from); fail, saying how to fetch it, if the history lacks the release's commit
    (a shallow clone)."""
    top = _git(root, "rev-parse", "--show-toplevel")
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root.resolve():
        pytest.skip(
            f"{root} is not a git checkout: the previous release ({release.version}) is "
            "installed from the repository's history"
        )
    if _git(root, "cat-file", "-e", f"{release.commit}^{{commit}}").returncode == 0:
        return
    shallow = _git(root, "rev-parse", "--is-shallow-repository").stdout.strip() == "true"
    how = "git fetch --unshallow" if shallow else f"git fetch origin {release.commit}"
    pytest.fail(
        f"the repository's history lacks release {release.version} (commit {release.commit})"
        f"{', as this is a shallow clone' if shallow else ''}: fetch it with `{how}` "
        "(the rollback test installs it from there)",
        pytrace=False,
    )


def installed(release: Release, root: Path = ROOT) -> Path:
    """The ``intrahost`` executable of ``release``, installed from the repository's history
    into its own virtual environment, cached across runs under
    ``$XDG_CACHE_HOME/intrahost/releases/COMMIT-pyX.Y`` (built once, under a lock)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    python = f"py{sys.version_info.major}.{sys.version_info.minor}"
    home = base / "intrahost" / "releases" / f"{release.commit}-{python}"
    executable = home / "venv" / "bin" / "intrahost"
    stamp = home / "installed"
    if stamp.exists():
        return executable
    home.parent.mkdir(parents=True, exist_ok=True)
    with (home.parent / f"{home.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists():
            return executable
        shutil.rmtree(home, ignore_errors=True)
        source = home / "src"
        source.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", "--format=tar", release.commit],
            capture_output=True,
            timeout=120,
            check=True,
        )
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(source, filter="data")
        steps = [
            [sys.executable, "-m", "venv", str(home / "venv")],
            [
                str(home / "venv" / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                str(source),
            ],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=900, check=False)
            if done.returncode != 0:
                pytest.fail(
                    f"installing release {release.version} failed ({' '.join(step)}):\n"
                    f"{done.stderr[-2000:]}\n(pip builds it with the setuptools its "
                    "pyproject.toml names, from PyPI or pip's cache)",
                    pytrace=False,
                )
        stamp.write_text(f"{release.version} {release.commit}\n")
    return executable
