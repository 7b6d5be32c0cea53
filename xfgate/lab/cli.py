"""Subcommands of the lab subsystem (placeholder until its issue lands)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add this subsystem's subcommands to the top-level parser's subparsers."""
    _ = sub
    _ = argparse
