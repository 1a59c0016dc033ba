"""The version: one source (intrahost/__init__.py, which the package metadata reads), and the
released versions recorded in RELEASES (the rollback test installs the previous one)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from releases import ROOT, Release, parse_version, previous_release, read_releases

import intrahost


def test_the_package_metadata_reads_the_version_from_the_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"], "the version lives in intrahost/__init__.py"
    assert "version" in project["project"]["dynamic"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "intrahost.__version__"}


def test_releases_are_recorded_oldest_first_and_this_tree_is_newer() -> None:
    releases = read_releases()
    assert releases, "RELEASES lists no release"
    versions = [parse_version(r.version) for r in releases]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert all(len(r.commit) == 40 for r in releases), "record full commit ids"
    assert parse_version(intrahost.__version__) > versions[-1]


def test_v0_1_0_is_the_state_before_issue_12() -> None:
    assert Release("0.1.0", "e22a7a5aa0eced3bcf98e14a0b1204464fd40ce9") in read_releases()
    assert previous_release() == read_releases()[-1]


def test_releases_file_format(tmp_path: Path) -> None:
    text = "# comment\n\n0.1.0  " + "a" * 40 + "  # trailing comment\n"
    path = tmp_path / "RELEASES"
    path.write_text(text)
    assert read_releases(path) == [Release("0.1.0", "a" * 40)]
