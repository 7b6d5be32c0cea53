"""`xfgate serve`: its command line (paths and the systemd environment come from xfgate/cli.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from xfgate.config import DEFAULT_AUDIT_LOG, DEFAULT_POLICY_FILE
from xfgate.errors import ConfigError
from xfgate.verdict.policy import Policy, Verdict

DEFAULT_LOG_MAX_BYTES = 64 << 20


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="gate every domain of the host, with a persistent policy file (a service)",
        description="One process for the host: gates every domain of the domains file as it"
        " appears, lets go of those that stop, enforces the policy file (reloaded on SIGHUP or"
        " change; `xfgate block|unblock` write to it). SIGTERM leaves the enforcement in the"
        " kernel: a restart leaves no gap.",
    )
    p.add_argument("--policy", type=Path, default=DEFAULT_POLICY_FILE, metavar="FILE")
    p.add_argument("--audit-log", type=Path, default=DEFAULT_AUDIT_LOG, metavar="FILE")
    p.add_argument("--metrics", metavar="ADDR:PORT", help="serve Prometheus metrics over HTTP")
    p.add_argument(
        "--discover-interval", type=float, default=2.0, help="seconds between domain list polls"
    )
    p.add_argument(
        "--queue-bypass",
        action="store_true",
        help="fail open: while no gate is bound, queued packets pass (default: dropped)",
    )
    p.add_argument(
        "--on-error", choices=[v.value for v in Verdict], help="verdict on an internal error"
    )
    p.add_argument("--refresh", type=float, default=2.0, help="seconds between port-set walks")
    p.add_argument("--log", metavar="FILE|-", help="per-packet verdict log (JSON lines)")
    p.add_argument("--log-sample", type=int, default=1, metavar="N", help="log 1 accept in N")
    p.add_argument(
        "--log-max-bytes",
        type=int,
        default=DEFAULT_LOG_MAX_BYTES,
        metavar="N",
        help="rotate the verdict log past N bytes (0: never)",
    )
    p.add_argument("--log-backups", type=int, default=3, metavar="N", help="rotated logs kept")
    p.add_argument("--cache-ttl", type=float, default=10.0)
    p.add_argument("--negative-ttl", type=float, default=1.0)
    p.set_defaults(handler=cmd_serve)


def serve_options(args: argparse.Namespace) -> Any:
    from xfgate.service.serve import ServeOptions
    from xfgate.verdict.options import GateOptions

    if args.log_sample < 1 or args.log_backups < 1 or args.log_max_bytes < 0:
        raise ConfigError("--log-sample and --log-backups must be >= 1, --log-max-bytes >= 0")
    if args.refresh <= 0 or args.discover_interval <= 0:
        raise ConfigError("--refresh and --discover-interval must be > 0")
    gate = GateOptions(
        domains=(),
        policy=Policy(),
        queue_bypass=args.queue_bypass,
        on_error=Verdict(args.on_error) if args.on_error else None,
        log_target=args.log,
        log_sample=args.log_sample,
        log_max_bytes=args.log_max_bytes,
        log_backups=args.log_backups,
        refresh_interval=args.refresh,
        cache_ttl=args.cache_ttl,
        negative_ttl=args.negative_ttl,
        domains_file=args.domains_file,
        run_dir=args.run_dir,
        cache_dir=args.cache_dir,
    )
    try:
        watchdog = int(args.watchdog_usec or 0)
    except ValueError:
        watchdog = 0
    return ServeOptions(
        gate=gate,
        policy_path=args.policy,
        audit_path=args.audit_log,
        metrics=args.metrics,
        discover_interval=args.discover_interval,
        notify_socket=args.notify_socket,
        watchdog_usec=watchdog,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from xfgate.hypervisor.resolve import gateable_domains_source
    from xfgate.service.serve import run_service

    source = gateable_domains_source(args.domains_file, args.libvirt_uri)
    return run_service(serve_options(args), source)
