"""`xfgate` command line: wiring only. Each subsystem registers its own subcommands.

This is the one place that reads the environment: ``$XFGATE_DOMAINS``, ``$XFGATE_RUN_DIR``,
``$XFGATE_CACHE`` and ``$XFGATE_LIBVIRT_URI`` are the defaults of --domains-file, --run-dir,
--cache-dir and --libvirt-uri, and they are handed down as arguments from here; so are systemd's
``$NOTIFY_SOCKET`` and ``$WATCHDOG_USEC`` (for `xfgate serve`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from xfgate.config import (
    DEFAULT_CACHE_DIR,
    DEFAULT_DOMAINS_FILE,
    DEFAULT_LIBVIRT_URI,
    DEFAULT_RUN_DIR,
)
from xfgate.errors import XfgateError

Handler = Callable[[argparse.Namespace], int]
log = logging.getLogger("xfgate")


def _add_path_options(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    for flag, var, default, what in (
        ("--domains-file", "XFGATE_DOMAINS", DEFAULT_DOMAINS_FILE, "domains file"),
        ("--run-dir", "XFGATE_RUN_DIR", DEFAULT_RUN_DIR, "control sockets and rule logs"),
        ("--cache-dir", "XFGATE_CACHE", DEFAULT_CACHE_DIR, "kernel assets and profiles"),
    ):
        parser.add_argument(
            flag,
            type=Path,
            default=Path(env.get(var, str(default))),
            metavar="PATH",
            help=f"{what} (default: ${var} or {default})",
        )
    parser.add_argument(
        "--libvirt-uri",
        default=env.get("XFGATE_LIBVIRT_URI", DEFAULT_LIBVIRT_URI),
        metavar="URI",
        help="libvirt to look domains up in when the domains file does not name them; "
        f"'none': never (default: $XFGATE_LIBVIRT_URI or {DEFAULT_LIBVIRT_URI})",
    )


_VALUED = ("--domains-file", "--run-dir", "--cache-dir", "--libvirt-uri")


def command_word(argv: Sequence[str]) -> str | None:
    """The subcommand `argv` names (its first word that is no top-level option or value)."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in _VALUED:
            skip = True
        elif not word.startswith("-"):
            return word
        elif word == "--":
            return None
    return None


def build_parser(
    env: Mapping[str, str] | None = None, command: str | None = None
) -> argparse.ArgumentParser:
    """The whole command line; with `command` "ps", that subcommand alone (an operator's
    `xfgate ps` answered by a gate: 0.1 s of other subsystems' imports saved)."""
    # Imported here so that `xfgate --help` works even if one subsystem's optional
    # dependency is broken: the error then names that subsystem.
    from xfgate.vmi import cli as vmi_cli

    parser = argparse.ArgumentParser(
        prog="xfgate",
        description="Filter a virtual machine's packets per guest process and user, from the host.",
    )
    _add_path_options(parser, os.environ if env is None else env)
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument(
        "-v", "--verbose", action="store_true", help="also print debugging diagnostics"
    )
    noise.add_argument("-q", "--quiet", action="store_true", help="print only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command == "ps":
        vmi_cli.register(sub, with_profile=False)
        return _with_systemd_defaults(parser, env)
    from xfgate.hypervisor import cli as hypervisor_cli
    from xfgate.service import cli as service_cli
    from xfgate.verdict import cli as verdict_cli

    vmi_cli.register(sub)
    verdict_cli.register(sub)
    hypervisor_cli.register(sub)
    service_cli.register(sub)
    return _with_systemd_defaults(parser, env)


def _with_systemd_defaults(
    parser: argparse.ArgumentParser, env: Mapping[str, str] | None
) -> argparse.ArgumentParser:
    # systemd's notify socket and watchdog period (sd_notify(3)); empty outside systemd.
    environ = os.environ if env is None else env
    parser.set_defaults(
        notify_socket=environ.get("NOTIFY_SOCKET", ""),
        watchdog_usec=environ.get("WATCHDOG_USEC", ""),
    )
    return parser


class _Formatter(logging.Formatter):
    """``xfgate: message``, and ``xfgate: warning: message`` from warnings up."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"xfgate: {record.levelname.lower()}: {text}"
        return f"xfgate: {text}"


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Diagnostics go to stderr through the "xfgate" logger; results stay on stdout."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(command=command_word(words))
    args = parser.parse_args(words)
    configure_logging(args.verbose, args.quiet)
    handler: Handler = args.handler
    try:
        return handler(args)
    except XfgateError as e:
        log.error("%s", e)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
