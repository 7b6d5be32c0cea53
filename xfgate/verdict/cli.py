"""Subcommands of the verdict subsystem: run, block, unblock, status, rules, cleanup.

Paths (domains file, run directory, cache) come from the top-level options of xfgate/cli.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from xfgate.errors import ConfigError, XfgateError
from xfgate.verdict.options import GateMode, GateOptions
from xfgate.verdict.policy import Verdict

BLOCK_KINDS = ("uid", "pid", "comm", "exe", "sk_uid", "port")
log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    """Add this subsystem's subcommands to the top-level parser's subparsers."""
    _register_run(sub)
    for name, helptext in (
        ("block", "block an owner in a running gate"),
        ("unblock", "undo a block"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument(
            "--domain", required=True, help="domain id, name or UUID (see `xfgate domains`)"
        )
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("--uid")
        g.add_argument("--pid")
        g.add_argument("--comm", help="the task name (a task can rename itself: prefer exe or uid)")
        g.add_argument("--exe", metavar="PATH", help="the task's executable, exact guest path")
        g.add_argument("--sk-uid", dest="sk_uid")
        g.add_argument("--port", metavar="PROTO/PORT")
        if name == "block":
            p.add_argument(
                "--for",
                dest="duration",
                metavar="DURATION",
                help="xfgate serve: the rule ends after this long (90s, 30m, 2h, 1d)",
            )
            p.add_argument("--reason", default="", help="xfgate serve: why (kept in the policy)")
        p.add_argument("--by", default="", help="xfgate serve: who (default: your user name)")
        p.set_defaults(handler=cmd_block, op=name)

    st = sub.add_parser("status", help="running gates, their policy and counters")
    st.add_argument("--domain", help="domain id, name or UUID (see `xfgate domains`)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(handler=cmd_status)

    rl = sub.add_parser("rules", help="xfgate's rules and blocked-port sets of a domain")
    rl.add_argument(
        "--domain", required=True, help="domain id, name or UUID (see `xfgate domains`)"
    )
    rl.set_defaults(handler=cmd_rules)

    cl = sub.add_parser("cleanup", help="remove every chain, set and mark xfgate left for a domain")
    cl.add_argument(
        "--domain", required=True, help="domain id, name or UUID (see `xfgate domains`)"
    )
    cl.set_defaults(handler=cmd_cleanup)


def _register_run(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="filter a domain's packets by guest process/user (NFQUEUE verdict engine)",
        description="Start a gate: every new flow of the domain is decided by who owns its"
        " socket inside the guest. SIGINT/SIGTERM leave its enforcement in the kernel until a"
        " gate binds again or `xfgate cleanup` (--release-on-exit removes it instead).",
    )
    run.add_argument(
        "--domain",
        action="append",
        required=True,
        help="domain id, name or UUID (see `xfgate domains`; repeatable)",
    )
    _add_policy_arguments(run)
    _add_queue_arguments(run)
    _add_log_arguments(run)
    _add_lookup_arguments(run)
    run.set_defaults(handler=cmd_run)


def _add_policy_arguments(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("policy")
    g.add_argument("--block-uid", type=int, action="append", default=[], metavar="UID")
    g.add_argument(
        "--block-pid",
        type=int,
        action="append",
        default=[],
        metavar="PID",
        help="block a process and its descendants (also those forked later)",
    )
    g.add_argument(
        "--block-exe",
        action="append",
        default=[],
        metavar="PATH",
        help="block tasks running this executable (exact guest path)",
    )
    g.add_argument(
        "--block-comm",
        action="append",
        default=[],
        metavar="NAME",
        help="block by task name (a task can rename itself: prefer --block-exe or --block-uid)",
    )
    g.add_argument(
        "--block-sk-uid",
        type=int,
        action="append",
        default=[],
        metavar="UID",
        help="block sockets created by UID (sock.sk_uid), whoever holds them now",
    )
    g.add_argument(
        "--block-port",
        action="append",
        default=[],
        metavar="PROTO/PORT",
        help="block a guest-local port outright, e.g. tcp/23",
    )
    g.add_argument(
        "--unknown",
        choices=[v.value for v in Verdict],
        default=Verdict.ACCEPT.value,
        help="verdict when the owner cannot be known (kernel RST, ICMP, TIME_WAIT, malformed)",
    )
    g.add_argument(
        "--on-error",
        choices=[v.value for v in Verdict],
        help="verdict on an internal error (default: same as --unknown)",
    )


def _core_share(text: str) -> float:
    """A share of one core, 0..1 (`--flood-cpu`)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 0.05)") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: a share of one core, between 0 and 1")
    return value


def _add_queue_arguments(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("interception")
    g.add_argument("--mode", choices=[m.value for m in GateMode], default=GateMode.QUEUE.value)
    g.add_argument("--interval", type=float, default=5.0, help="poll mode: seconds between walks")
    g.add_argument("--queue-num", type=int, help="NFQUEUE number (default 100 + domain id)")
    g.add_argument(
        "--queue-bypass",
        action="store_true",
        help="fail open: while no gate is bound, queued packets pass (default: they are dropped)",
    )
    g.add_argument(
        "--flood-nice",
        type=int,
        default=10,
        choices=range(20),
        metavar="N",
        help="a domain's packet thread that uses over 25 %% of a core, most of it on drops (a"
        " blocked owner's flood), runs at nice N until it calms down, so the guests' vCPUs are"
        " served first (0: off; default 10)",
    )
    g.add_argument(
        "--flood-cpu",
        type=_core_share,
        default=0.05,
        metavar="SHARE",
        help="... and uses at most SHARE of one core while it floods; the rest of the flood"
        " waits in the domain's own queue, a full queue drops (0: no cap; default 0.05)",
    )
    g.add_argument(
        "--persist-blocks",
        action="store_true",
        help="with --release-on-exit: keep dropping the known ports of blocked owners (ipset)",
    )
    g.add_argument(
        "--release-on-exit",
        action="store_true",
        help="on SIGTERM/SIGINT remove the domain's chains, sets and queue rules (default: leave"
        " them, so the domain stays filtered until a gate binds again or `xfgate cleanup`)",
    )
    g.add_argument(
        "--no-fastpath",
        action="store_true",
        help="do not settle flows in conntrack: every packet goes through Python",
    )
    g.add_argument("--refresh", type=float, default=2.0, help="seconds between port-set walks")


def _add_log_arguments(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("verdict log")
    g.add_argument("--log", metavar="FILE|-", help="per-packet verdict log (JSON lines)")
    g.add_argument("--log-sample", type=int, default=1, metavar="N", help="log 1 accept in N")


def _add_lookup_arguments(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("owner lookup")
    g.add_argument("--cache-ttl", type=float, default=10.0)
    g.add_argument("--negative-ttl", type=float, default=1.0)
    g.add_argument("--profile", metavar="FILE", help="kernel profile (default: the domain's)")


def gate_options(args: argparse.Namespace) -> GateOptions:
    """The gate's options from the parsed command line, validated."""
    from xfgate.verdict.policy import compile_policy

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
        args.block_exe,
    )
    return GateOptions(
        domains=tuple(dict.fromkeys(domain_ids(args, args.domain))),
        policy=policy,
        mode=GateMode(args.mode),
        interval=args.interval,
        queue_num=args.queue_num,
        queue_bypass=args.queue_bypass,
        on_error=Verdict(args.on_error) if args.on_error else None,
        log_target=args.log,
        log_sample=args.log_sample,
        persist_blocks=args.persist_blocks,
        release_on_exit=args.release_on_exit,
        fastpath=not args.no_fastpath,
        flood_nice=args.flood_nice,
        flood_cpu=args.flood_cpu,
        refresh_interval=args.refresh,
        cache_ttl=args.cache_ttl,
        negative_ttl=args.negative_ttl,
        domains_file=args.domains_file,
        libvirt_uri=args.libvirt_uri,
        profile=args.profile,
        run_dir=args.run_dir,
        cache_dir=args.cache_dir,
    )


def domain_ids(args: argparse.Namespace, specs: Sequence[str]) -> list[int]:
    """The ids that --domain specs (id, name or UUID) name."""
    from xfgate.hypervisor.resolve import resolve_id

    return [resolve_id(s, args.domains_file, args.libvirt_uri) for s in specs]


def _resolve_arg(args: argparse.Namespace) -> None:
    """args.domain: the spec given -> the domain's id (commands that talk to a gate by id)."""
    if args.domain is not None:
        args.domain = domain_ids(args, [args.domain])[0]


def service_domain(args: argparse.Namespace) -> int | str:
    """--domain as `xfgate serve` takes it: a domains-file entry's id (ids of the file are
    stable), an id as given, or the name/UUID itself: the service resolves it against the
    domains it lists, and a rule by name or UUID follows a libvirt domain across restarts and
    waits for one that does not run. No libvirt round trip here."""
    from xfgate.config import load_domains
    from xfgate.hypervisor.resolve import match_file

    spec = str(args.domain).strip()
    if spec.isdigit():
        return int(spec)
    found = match_file(spec, load_domains(args.domains_file))
    return found.id if found is not None else spec


def cmd_run(args: argparse.Namespace) -> int:
    from xfgate.verdict.runner import run_gate

    return run_gate(gate_options(args))


def cmd_block(args: argparse.Namespace) -> int:
    """To `xfgate serve` when it runs (the change is written to its policy file, and may have
    an end), else to the domain's `xfgate run` gate (in its memory only)."""
    import pwd

    from xfgate.verdict import control

    served = control.answers(control.service_socket(args.run_dir))
    if served and args.domain is not None:
        args.domain = service_domain(args)
    else:
        _resolve_arg(args)
    for kind in BLOCK_KINDS:
        value = getattr(args, kind)
        if value is None:
            continue
        request: dict[str, Any] = {"op": args.op, "kind": kind, "value": value}
        duration, reason = getattr(args, "duration", None), getattr(args, "reason", "")
        if served:
            by = args.by or pwd.getpwuid(os.getuid()).pw_name
            request.update(domain=args.domain, reason=reason, by=by)
            if duration:
                request["for"] = duration
            reply = control.request(
                args.run_dir, -1, request, path=control.service_socket(args.run_dir)
            )
            keys = ("rule", "policy", "waiting", "gated")
            print(json.dumps({k: reply[k] for k in keys if k in reply}))
            if reply.get("waiting"):
                log.warning("%s", reply["waiting"])
            return 0
        if duration or reason:
            raise ConfigError("--for and --reason need `xfgate serve` (the policy file)")
        reply = control.request(args.run_dir, args.domain, request)
        print(json.dumps(reply["policy"]))
        return 0
    raise ConfigError("give one of --uid, --pid, --comm, --exe, --sk-uid, --port")


def cmd_status(args: argparse.Namespace) -> int:
    """Every gate's status: the service's domains (and its waiting rules), then any domain's
    `xfgate run` gate the service does not hold."""
    from xfgate.verdict import control

    run_dir = args.run_dir
    service: dict[str, Any] | None = None
    out: list[dict[str, Any]] = []
    served: set[int] = set()
    path = control.service_socket(run_dir)
    if control.answers(path):
        reply = control.request(run_dir, -1, {"op": "status"}, timeout=5.0, path=path)
        service = {"service": reply["service"], "waiting": reply["waiting"]}
        served = {s["domain"] for s in reply["domains"]}
        out = [s for s in reply["domains"] if _status_named(s, args.domain)]
        if args.domain is not None and out:
            args.domain = out[0]["domain"]  # named by the service: no libvirt round trip
    domains: list[int] = []
    if args.domain is None:
        domains = control.running_domains(run_dir)
    elif isinstance(args.domain, int):
        domains = [args.domain]
    else:
        try:
            domains = domain_ids(args, [args.domain])
        except XfgateError:
            if service is None:
                raise  # under the service: a domain it does not gate shows as none

    domains = [d for d in domains if d not in served]
    for d in domains:
        try:
            out.append(control.request(run_dir, d, {"op": "status"}, timeout=3.0))
        except control.ControlError as e:
            stale = control.socket_path(run_dir, d).exists()
            out.append({"domain": d, "error": status_error(d, str(e), stale)})
    if args.json:
        print(json.dumps({**service, "domains": out} if service else out, indent=2))
    elif service is not None:
        print(render_service(service, out))
    else:
        print(render_status(out))
    return 0


def _status_named(status: dict[str, Any], spec: str | int | None) -> bool:
    """Whether a service's domain status is the one --domain names (id, name or UUID)."""
    if spec is None:
        return True
    text = str(spec).strip()
    if text.isdigit():
        return bool(status["domain"] == int(text))
    uuid = str(status.get("uuid") or "")
    return text == str(status.get("name")) or (bool(uuid) and text.lower() == uuid)


def render_service(service: dict[str, Any], statuses: Sequence[dict[str, Any]]) -> str:
    """`xfgate status` under `xfgate serve`: the service, its domains, rules that wait."""
    sv = service["service"]
    lines = [f"xfgate serve: pid {sv['pid']}, policy {sv['policy_file']}"]
    if sv.get("metrics"):
        lines[0] += f", metrics {sv['metrics']}"
    if sv.get("policy_error"):
        lines.append(f"  policy file REJECTED (the last good policy stays): {sv['policy_error']}")
    for d, why in sv.get("pending", {}).items():
        lines.append(f"domain {d}: not gated: {why}")
    for d, gone in sv.get("let_go", {}).items():
        kept = "kernel rules released" if gone.get("released") else "its rules stay in the kernel"
        lines.append(f"domain {d} ({gone.get('name', '?')}): let go: {gone.get('why')}; {kept}")
    for s in statuses:
        lines += _status_lines(s)
        for r in s.get("rules", []):
            lines.append("  rule " + _rule_text(r))
    for r in service.get("waiting", []):
        lines.append(f"waiting rule {_rule_text(r)}: {r['why']}")
    if not statuses and not sv.get("pending"):
        lines.append("no domain gated")
    return "\n".join(lines)


def _rule_text(r: dict[str, Any]) -> str:
    text = f"domain {r['domain']} {r['kind']} {r['value']}"
    if r.get("until"):
        text += f" until {r['until']}"
    if r.get("reason"):
        text += f" ({r['reason']})"
    if r.get("by"):
        text += f" by {r['by']}"
    return text


def status_error(domain: int, error: str, stale_socket: bool) -> str:
    if not stale_socket:
        return error
    return (
        f"{error} (stale socket: the gate died; its kernel rules stay until the next start or"
        f" `xfgate cleanup --domain {domain}`)"
    )


def render_status(statuses: Sequence[dict[str, Any]]) -> str:
    """`xfgate status` as text: a pure function of the gates' status replies."""
    if not statuses:
        return "no gate is running"
    return "\n".join(line for s in statuses for line in _status_lines(s))


def _status_lines(s: dict[str, Any]) -> list[str]:
    if "error" in s:
        return [f"domain {s['domain']}: {s['error']}"]
    st = s["stats"]
    lines = [
        f"domain {s['domain']} ({s['name']}, {', '.join(s['vifs'])}): pid {s['pid']},"
        f" mode {s['mode']}, queue {s['queue_num']}, policy {json.dumps(s['policy'])}",
        f"  packets {st['packets']} accepted {st['accepted']} dropped {st['dropped']}"
        f" settled {st['settled']} errors {st['errors']} avg {st['latency_us_avg']} us;"
        f" blocked ports {', '.join(s['blocked_ports']) or '-'}",
    ]
    if s.get("degraded"):
        lines.append(f"  degraded: {s['degraded']}")
    k = s.get("kernel")
    if k:
        lines.append(
            f"  kernel fast path: accepted {k['fastpath_accept']} dropped"
            f" {k['fastpath_drop']} set-dropped {k['set_drop']} queued {k['queued']}"
        )
    return lines


def _enter_domain_netns(args: argparse.Namespace) -> None:
    from xfgate.hypervisor.resolve import resolve_domain
    from xfgate.verdict.netns import enter_netns

    enter_netns(resolve_domain(args.domain, args.domains_file, args.libvirt_uri).netns)


def cmd_rules(args: argparse.Namespace) -> int:
    from xfgate.verdict.fastpath import Firewall, make_backend
    from xfgate.verdict.runner import rule_log_path

    _enter_domain_netns(args)
    _resolve_arg(args)
    fw = Firewall(make_backend())
    for chain, lines in fw.dump(args.domain).items():
        print(f"# {chain}")
        for line in lines:
            print(line)
    print("# blocked-socket sets: " + (", ".join(fw.blocked(args.domain)) or "-"))
    log = rule_log_path(args.run_dir, args.domain)
    if log.exists():
        print(f"# rule log {log}")
        sys.stdout.write(log.read_text())
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from xfgate.verdict import control
    from xfgate.verdict.fastpath import Firewall, make_backend

    _enter_domain_netns(args)
    _resolve_arg(args)
    path = control.socket_path(args.run_dir, args.domain)
    if control.answers(path):
        raise ConfigError(f"a gate for domain {args.domain} is running: stop it (SIGTERM) instead")
    Firewall(make_backend()).remove(args.domain, persist_blocks=False)
    from xfgate.verdict import bridge

    bridge.remove(args.domain)
    path.unlink(missing_ok=True)
    return 0
