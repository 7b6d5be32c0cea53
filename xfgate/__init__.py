"""xfgate: per-process, per-user packet filtering of virtual machines from the host."""

__version__ = "0.1.0"
