"""Subcommands of the verdict subsystem: run, block, unblock, status, rules, cleanup."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from xfgate.errors import ConfigError


def register(sub: Any) -> None:
    """Add this subsystem's subcommands to the top-level parser's subparsers."""
    run = sub.add_parser(
        "run",
        help="filter a domain's packets by guest process/user (NFQUEUE verdict engine)",
        description="Start a gate: every new flow of the domain is decided by who owns its"
        " socket inside the guest. SIGINT/SIGTERM remove everything it installed.",
    )
    run.add_argument(
        "--domain", type=int, action="append", required=True, help="domain id (repeatable)"
    )
    run.add_argument("--block-uid", type=int, action="append", default=[], metavar="UID")
    run.add_argument("--block-pid", type=int, action="append", default=[], metavar="PID")
    run.add_argument("--block-comm", action="append", default=[], metavar="NAME")
    run.add_argument(
        "--block-sk-uid",
        type=int,
        action="append",
        default=[],
        metavar="UID",
        help="block sockets created by UID (sock.sk_uid), whoever holds them now",
    )
    run.add_argument(
        "--block-port",
        action="append",
        default=[],
        metavar="PROTO/PORT",
        help="block a guest-local port outright, e.g. tcp/23",
    )
    run.add_argument("--mode", choices=("queue", "poll"), default="queue")
    run.add_argument("--interval", type=float, default=5.0, help="poll mode: seconds between walks")
    run.add_argument("--queue-num", type=int, help="NFQUEUE number (default 100 + domain id)")
    run.add_argument(
        "--queue-bypass",
        action="store_true",
        help="fail open: while no gate is bound, queued packets pass (default: they are dropped)",
    )
    run.add_argument(
        "--unknown",
        choices=("accept", "drop"),
        default="accept",
        help="verdict when the owner cannot be known (kernel RST, ICMP, TIME_WAIT, malformed)",
    )
    run.add_argument(
        "--on-error",
        choices=("accept", "drop"),
        help="verdict on an internal error (default: same as --unknown)",
    )
    run.add_argument("--log", metavar="FILE|-", help="per-packet verdict log (JSON lines)")
    run.add_argument("--log-sample", type=int, default=1, metavar="N", help="log 1 accept in N")
    run.add_argument(
        "--persist-blocks",
        action="store_true",
        help="on exit keep dropping the known ports of blocked owners (ipset)",
    )
    run.add_argument(
        "--no-fastpath",
        action="store_true",
        help="do not settle flows in conntrack: every packet goes through Python",
    )
    run.add_argument("--refresh", type=float, default=2.0, help="seconds between port-set walks")
    run.add_argument("--cache-ttl", type=float, default=10.0)
    run.add_argument("--negative-ttl", type=float, default=1.0)
    run.add_argument(
        "--owners-json", metavar="FILE", help="static owner table instead of introspection"
    )
    run.add_argument("--profile", metavar="FILE", help="kernel profile (default: the domain's)")
    run.set_defaults(handler=cmd_run)

    for name, helptext in (
        ("block", "block an owner in a running gate"),
        ("unblock", "undo a block"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--domain", type=int, required=True)
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("--uid")
        g.add_argument("--pid")
        g.add_argument("--comm")
        g.add_argument("--sk-uid", dest="sk_uid")
        g.add_argument("--port", metavar="PROTO/PORT")
        p.set_defaults(handler=cmd_block, op=name)

    st = sub.add_parser("status", help="running gates, their policy and counters")
    st.add_argument("--domain", type=int)
    st.add_argument("--json", action="store_true")
    st.set_defaults(handler=cmd_status)

    rl = sub.add_parser("rules", help="xfgate's rules and blocked-port sets of a domain")
    rl.add_argument("--domain", type=int, required=True)
    rl.set_defaults(handler=cmd_rules)

    cl = sub.add_parser("cleanup", help="remove every chain, set and mark xfgate left for a domain")
    cl.add_argument("--domain", type=int, required=True)
    cl.set_defaults(handler=cmd_cleanup)


def cmd_run(args: argparse.Namespace) -> int:
    from xfgate.verdict.policy import Verdict, compile_policy
    from xfgate.verdict.runner import GateOptions, run_gate

    if args.log_sample < 1:
        raise ConfigError("--log-sample must be >= 1")
    if args.interval <= 0 or args.refresh <= 0:
        raise ConfigError("--interval and --refresh must be > 0")
    policy = compile_policy(
        args.block_pid,
        args.block_uid,
        args.block_comm,
        args.block_sk_uid,
        args.block_port,
        args.unknown,
    )
    options = GateOptions(
        domains=tuple(dict.fromkeys(args.domain)),
        policy=policy,
        mode=args.mode,
        interval=args.interval,
        queue_num=args.queue_num,
        queue_bypass=args.queue_bypass,
        on_error=Verdict(args.on_error) if args.on_error else None,
        log_target=args.log,
        log_sample=args.log_sample,
        persist_blocks=args.persist_blocks,
        fastpath=not args.no_fastpath,
        owners_json=args.owners_json,
        refresh_interval=args.refresh,
        cache_ttl=args.cache_ttl,
        negative_ttl=args.negative_ttl,
        profile=args.profile,
    )
    return run_gate(options)


def cmd_block(args: argparse.Namespace) -> int:
    from xfgate.verdict import control

    for kind in ("uid", "pid", "comm", "sk_uid", "port"):
        value = getattr(args, kind)
        if value is not None:
            reply = control.request(args.domain, {"op": args.op, "kind": kind, "value": value})
            print(json.dumps(reply["policy"]))
            return 0
    raise ConfigError("give one of --uid, --pid, --comm, --sk-uid, --port")


def cmd_status(args: argparse.Namespace) -> int:
    from xfgate.verdict import control

    domains = [args.domain] if args.domain is not None else control.running_domains()
    out = []
    for d in domains:
        try:
            out.append(control.request(d, {"op": "status"}, timeout=3.0))
        except control.ControlError as e:
            stale = control.socket_path(d).exists()
            hint = (
                " (stale socket: the gate died; its kernel rules stay until the next start or"
                f" `xfgate cleanup --domain {d}`)"
                if stale
                else ""
            )
            out.append({"domain": d, "error": f"{e}{hint}"})
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if not out:
        print("no gate is running")
    for s in out:
        if "error" in s:
            print(f"domain {s['domain']}: {s['error']}")
            continue
        st = s["stats"]
        print(
            f"domain {s['domain']} ({s['name']}, {', '.join(s['vifs'])}): pid {s['pid']},"
            f" mode {s['mode']}, queue {s['queue_num']}, policy {json.dumps(s['policy'])}"
        )
        print(
            f"  packets {st['packets']} accepted {st['accepted']} dropped {st['dropped']}"
            f" settled {st['settled']} errors {st['errors']} avg {st['latency_us_avg']} us;"
            f" blocked ports {', '.join(s['blocked_ports']) or '-'}"
        )
        if s.get("kernel"):
            k = s["kernel"]
            print(
                f"  kernel fast path: accepted {k['fastpath_accept']} dropped"
                f" {k['fastpath_drop']} set-dropped {k['set_drop']} queued {k['queued']}"
            )
    return 0


def _enter_domain_netns(domain: int) -> None:
    from xfgate.config import get_domain
    from xfgate.verdict.netns import enter_netns

    enter_netns(get_domain(domain).netns)


def cmd_rules(args: argparse.Namespace) -> int:
    from xfgate.verdict.fastpath import Firewall, make_backend
    from xfgate.verdict.runner import rule_log_path

    _enter_domain_netns(args.domain)
    fw = Firewall(make_backend())
    for chain, lines in fw.dump(args.domain).items():
        print(f"# {chain}")
        for line in lines:
            print(line)
    ports = fw.blocked_ports(args.domain)
    names = {6: "tcp", 17: "udp"}
    print("# blocked-port sets: " + (", ".join(f"{names[p]}/{n}" for p, n in ports) or "-"))
    log = rule_log_path(args.domain)
    if log.exists():
        print(f"# rule log {log}")
        sys.stdout.write(log.read_text())
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from xfgate.verdict import control
    from xfgate.verdict.fastpath import Firewall, make_backend

    if control.answers(control.socket_path(args.domain)):
        raise ConfigError(f"a gate for domain {args.domain} is running: stop it (SIGTERM) instead")
    _enter_domain_netns(args.domain)
    Firewall(make_backend()).remove(args.domain, persist_blocks=False)
    control.socket_path(args.domain).unlink(missing_ok=True)
    return 0
