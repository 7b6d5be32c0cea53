"""The harness's gate: xfgate's own runner fed a static owner table (`StaticOwnerSource`)
instead of guest introspection, for the private-namespace tests and the NFQUEUE benchmark.

    xfgate-lab gate --owners-json FILE RUN_FLAGS...   (the flags of `xfgate run`)

The product's `xfgate run` has no such hook: the owner source is injected here, through
`run_gate(..., owner_source_factory=...)`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from xfgate.config import DomainConfig
from xfgate.flow import OwnerSource
from xfgate.verdict.cli import gate_options
from xfgate.verdict.options import GateOptions
from xfgate.verdict.runner import run_gate
from xfgate_lab.static_source import StaticOwnerSource


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--owners-json",
        metavar="FILE",
        required=True,
        help="static owner table (see xfgate_lab/static_source.py) instead of introspection",
    )


def run_static_gate(owners_json: Path, run_flags: Sequence[str]) -> int:
    """Parses `run_flags` exactly as `xfgate run` does and runs the product's gate with the
    owners of `owners_json`."""
    from xfgate.cli import build_parser, configure_logging

    run_args = build_parser().parse_args(["run", *run_flags])
    configure_logging()  # as `xfgate run` does: its "gate ready" line is what starters wait for

    def static_source(domain: DomainConfig, options: GateOptions) -> OwnerSource:
        return StaticOwnerSource(owners_json)

    return run_gate(gate_options(run_args), owner_source_factory=static_source)
