"""The `pha` command: one command line over the method (pha_core) and the service (service)."""

from .app import main, parse

__all__ = ["main", "parse"]
