"""This release's version: the installed package's metadata, when it describes this code.

The metadata of the ``intrahost`` distribution is used only if that distribution is the one
this module was imported from (an ordinary install, or an editable install of this very
directory). Code run from another checkout (``PYTHONPATH``) next to an installed release
reports its own ``intrahost.__version__`` instead of the installed release's number.
"""

from __future__ import annotations

import functools
import json
import os
from importlib import metadata
from urllib.parse import unquote, urlparse

import intrahost

DISTRIBUTION = "intrahost"


@functools.cache
def version() -> str:
    """``X.Y.Z``: this code's release."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return intrahost.__version__
    if _ships_this_code(dist):
        return dist.version
    return intrahost.__version__


def version_numbers() -> tuple[int, int, int]:
    """(major, minor, micro) of :func:`version`; a part that is not a number counts as 0."""
    parts = [int(p) if p.isdigit() else 0 for p in version().split(".")[:3]]
    major, minor, micro = [*parts, 0, 0, 0][:3]
    return major, minor, micro


def _ships_this_code(dist: metadata.Distribution) -> bool:
    here = os.path.realpath(os.path.dirname(intrahost.__file__))
    installed = os.path.realpath(str(dist.locate_file("intrahost")))
    if installed == here:
        return True
    # An editable install points at its source tree (PEP 610's direct_url.json).
    text = dist.read_text("direct_url.json")
    if not text:
        return False
    try:
        info = json.loads(text)
    except ValueError:
        return False
    url = urlparse(str(info.get("url", "")))
    if url.scheme != "file" or not info.get("dir_info", {}).get("editable"):
        return False
    source = os.path.realpath(unquote(url.path))
    return here == os.path.join(source, "intrahost")
