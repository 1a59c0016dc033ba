"""intrahost: hand a running KVM guest from one VMM process to a new one on the same host."""

__version__ = "0.1.0"
