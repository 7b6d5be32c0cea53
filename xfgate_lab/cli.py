"""`xfgate-lab ...`: the test harness's command line, apart from the product's `xfgate`.

The demo lab (a QEMU guest behind a bridge in network namespaces): up, down, status, log, exec,
truth; and `gate`, xfgate's own gate fed a static owner table instead of guest introspection."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from xfgate.errors import ConfigError, GuestNotRunning, XfgateError
from xfgate_lab import gate, lab
from xfgate_lab.crowd import parse_crowd
from xfgate_lab.guest_channel import GuestResult, run_in_guest
from xfgate_lab.layout import LabLayout, layout_from_env, vif_name
from xfgate_lab.qemu import DEFAULT_CPU, MEMORY_MODES
from xfgate_lab.truth import TRUTH_SCRIPT, Truth, parse_truth


def guest_exec(
    layout: LabLayout, domain: int, command: str, timeout: float = 30.0, wait: float = 0.0
) -> GuestResult:
    """Runs a shell command as root in a lab guest (tests and operators only)."""
    state = lab.read_state(layout)
    if state is None or domain not in state.domains:
        raise GuestNotRunning(domain, f"lab {layout.prefix} has no such guest: `xfgate-lab up`")
    return run_in_guest(
        layout.ctl_socket(domain), layout.ctl_lock(domain), command, timeout, domain, wait
    )


TRUTH_WAIT_SECONDS = 300.0  # a crowded guest's /proc (20,000 sockets) takes ~1 min under TCG


def guest_truth(layout: LabLayout, domain: int) -> Truth:
    """What the guest's own /proc says about its processes and inet sockets."""
    # timeout 0: no `timeout` wrapper in the guest, whose process would show up in the truth.
    result = guest_exec(layout, domain, TRUTH_SCRIPT, timeout=0, wait=TRUTH_WAIT_SECONDS)
    return parse_truth(result.output.decode(errors="replace"))


def _layout(args: argparse.Namespace) -> LabLayout:
    return layout_from_env(args.prefix)


def _up(args: argparse.Namespace) -> int:
    result = lab.lab_up(
        _layout(args),
        domains=args.domains,
        kernel_package=args.kernel_package,
        boot_timeout=args.timeout,
        force=args.force,
        cpu=args.cpu,
        memory=args.memory,
        crowd=parse_crowd(args.crowd) if args.crowd else None,
        ram_mb=args.ram_mb,
        hypervisor=args.hypervisor,
    )
    for dom in result.domains:
        vif = dom.vifs[0] if dom.vifs else f"{vif_name(dom.id)} (from QEMU)"
        how = f" (libvirt {dom.libvirt.uuid})" if dom.libvirt else ""
        print(f"domain {dom.id}: {dom.name} vif {vif} {' '.join(dom.addresses)}{how}")
    return 0


def _down(args: argparse.Namespace) -> int:
    lab.lab_down(_layout(args), force=args.force)
    return 0


def _status(args: argparse.Namespace) -> int:
    status = lab.lab_status(_layout(args))
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return 0 if status["status"] == "up" else 1


def format_status(status: dict[str, Any]) -> str:
    lines = [f"lab {status['prefix']}: {status['status']}"]
    if status["status"] == "foreign":
        lines.append("  namespaces exist without lab state: `xfgate-lab down --force`")
    if "kernel_package" in status:
        lines.append(f"  kernel {status['kernel_package']} ({status['kernel_release']})")
        lines.append(f"  CPU model {status['cpu']}, hypervisor {status['hypervisor']}")
        if status["libvirt_uri"]:
            lines.append(f"  libvirt {status['libvirt_uri']} daemons {status['daemon_pids']}")
        peers = "running" if status["peers_running"] else "NOT running"
        lines.append(f"  client peers pid {status['peers_pid']} {peers}")
    for ns, present in status["netns"].items():
        lines.append(f"  netns {ns}: {'present' if present else 'absent'}")
    for d in status["domains"]:
        run = "running" if d["running"] else "NOT running"
        lines.append(
            f"  domain {d['id']} {d['name']}: qemu {d['qemu_pid']} {run}, {d['vif']}, "
            f"{' '.join(d['addresses'])}, ram {d['ram']}"
        )
    return "\n".join(lines)


def _exec(args: argparse.Namespace) -> int:
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise ConfigError("nothing to run: xfgate-lab exec --domain D -- CMD ...")
    text = command[0] if len(command) == 1 else shlex.join(command)
    result = guest_exec(_layout(args), args.domain, text, args.timeout)
    sys.stdout.buffer.write(result.output)
    sys.stdout.flush()
    return result.returncode


def _truth(args: argparse.Namespace) -> int:
    truth = guest_truth(_layout(args), args.domain)
    if args.json:
        print(json.dumps(truth.to_json(), indent=2))
        return 0
    print(f"{'PID':>6} {'PPID':>6} {'UID':>5} {'EUID':>5} COMM")
    for p in truth.processes:
        print(f"{p.pid:>6} {p.ppid:>6} {p.uid:>5} {p.euid:>5} {p.comm}")
    print(f"\n{'PID':>6} {'FD':>4} PROTO LOCAL -> REMOTE STATE")
    for s in truth.sockets:
        print(
            f"{s.pid:>6} {s.fd:>4} {s.proto}{s.family} {s.local}:{s.lport} -> "
            f"{s.remote}:{s.rport} {s.state}"
        )
    return 0


def _log(args: argparse.Namespace) -> int:
    layout = _layout(args)
    path = layout.serial_log(args.domain)
    if not path.exists():
        raise GuestNotRunning(args.domain, f"no console log {path}: `xfgate-lab up`")
    print(lab.serial_tail(path, args.lines))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xfgate-lab",
        description="xfgate's test harness: the demo lab (a QEMU guest behind a bridge, in "
        "network namespaces). For tests, benchmarks and the demo; never needed to enforce.",
    )
    p.add_argument(
        "--prefix",
        help="lab instance name prefix (default $XFGATE_LAB_PREFIX or 'xfgate'): "
        "a second, private lab uses other namespace and file names",
    )
    lsub = p.add_subparsers(dest="lab_command", required=True, metavar="ACTION")

    up = lsub.add_parser("up", help="build assets if needed, boot the guest(s), start the peers")
    up.add_argument("--domains", type=int, default=1, help="number of guests (1..N)")
    up.add_argument(
        "--kernel-package",
        help="Debian 12 kernel image package (default: what linux-image-amd64 depends on), "
        "e.g. linux-image-cloud-amd64",
    )
    up.add_argument(
        "--cpu",
        default=DEFAULT_CPU,
        help=f"QEMU CPU model of the guests (default {DEFAULT_CPU}: 4-level paging; "
        "max: 5-level paging, LA57)",
    )
    up.add_argument(
        "--memory",
        choices=MEMORY_MODES,
        default="shared",
        help="guest RAM: shared (a /dev/shm file, the qemu-shm backend; default) or anonymous "
        "(QEMU's own memory as stock QEMU runs guests, read by the qemu-process backend)",
    )
    up.add_argument(
        "--crowd",
        metavar="TASKS,SOCKETS",
        help="start a crowd in each guest (forked and threaded servers holding TCP/UDP "
        "listeners and loopback pairs, IPv4 and IPv6), e.g. 2000,20000; RAM sized to fit",
    )
    up.add_argument(
        "--ram-mb",
        type=int,
        help="guest RAM in MiB (default: 256, or what the crowd needs; less is refused)",
    )
    up.add_argument(
        "--hypervisor",
        choices=lab.HYPERVISORS,
        default="qemu",
        help="qemu: the lab starts QEMU itself (RAM in a shared file, domains file written); "
        "libvirt: its own libvirtd runs the guests as domains guest1.. (found through libvirt)",
    )
    up.add_argument("--timeout", type=float, default=lab.DEFAULT_BOOT_TIMEOUT, help="boot bound, s")
    up.add_argument("--force", action="store_true", help="remove unrecorded leftovers first")
    up.set_defaults(handler=_up)

    down = lsub.add_parser("down", help="stop and remove everything the lab created")
    down.add_argument("--force", action="store_true", help="also remove unrecorded namespaces")
    down.set_defaults(handler=_down)

    status = lsub.add_parser("status", help="what is up (exit 0 only if fully up)")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_status)

    ex = lsub.add_parser("exec", help="run a shell command as root in a guest (lab only)")
    ex.add_argument("--domain", type=int, default=1)
    ex.add_argument("--timeout", type=float, default=30.0)
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ...")
    ex.set_defaults(handler=_exec)

    lg = lsub.add_parser("log", help="the tail of a guest's console (serial.log)")
    lg.add_argument("--domain", type=int, default=1)
    lg.add_argument("--lines", type=int, default=50)
    lg.set_defaults(handler=_log)

    tr = lsub.add_parser("truth", help="the guest's own view of processes and sockets (tests)")
    tr.add_argument("--domain", type=int, default=1)
    tr.add_argument("--json", action="store_true")
    tr.set_defaults(handler=_truth)

    gt = lsub.add_parser(
        "gate",
        help="xfgate's gate with a static owner table instead of introspection (tests, bench)",
        description="Runs the product's gate (every flag of `xfgate run` follows) with the "
        "owners of a JSON table instead of the guest's memory.",
    )
    gate.add_arguments(gt)
    gt.set_defaults(handler=_gate)
    return p


def _gate(args: argparse.Namespace) -> int:
    return gate.run_static_gate(Path(args.owners_json), args.run_flags)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # `gate` passes every flag it does not know on to `xfgate run`'s parser.
    args, rest = parser.parse_known_args(argv)
    if rest and args.handler is not _gate:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.run_flags = rest
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except XfgateError as e:
        print(f"xfgate-lab: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
