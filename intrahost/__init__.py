"""intrahost: hand a running KVM guest from one VMM process to a new one on the same host."""

#: The one place of the version (pyproject.toml reads it); RELEASES lists the released ones.
__version__ = "0.2.0"
