"""`xfgate` command line: wiring only. Each subsystem registers its own subcommands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from xfgate.errors import XfgateError

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    # Imported here so that `xfgate --help` works even if one subsystem's optional
    # dependency is broken: the error then names that subsystem.
    from xfgate.verdict import cli as verdict_cli
    from xfgate.vmi import cli as vmi_cli

    parser = argparse.ArgumentParser(
        prog="xfgate",
        description="Filter a virtual machine's packets per guest process and user, from the host.",
    )
    parser.add_argument(
        "--domains-file",
        help="domains file (default: $XFGATE_DOMAINS or /run/xfgate/domains.toml)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    vmi_cli.register(sub)
    verdict_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.domains_file:
        import os

        os.environ["XFGATE_DOMAINS"] = args.domains_file
    handler: Handler = args.handler
    try:
        return handler(args)
    except XfgateError as e:
        print(f"xfgate: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
