"""The red team's counting harness: one probe of issue 9, run in the lab guest under a gate, and
what got out counted at the client.

For one probe: a capture starts in the client namespace (tcpdump, a BPF filter naming the
guest's address and the probe's own port/protocol, written to a pcap and counted after: a
missing tcpdump raises, it never counts 0); the product's gate starts (`xfgate run --domain 1
--block-uid 1001 --log ...`, or the probe's own block); the probe (`xfprobe` in the guest's
initramfs) runs as uid 1001 (mallory) through the lab's exec channel, or as root for the
root-only probes, which then open their socket as root and drop to uid 1001 before sending
(`xfprobe --as-uid 1001`): the packets leave from a blocked user's process; while it runs a
client-side watcher GETs uid 1000's :8080 and :8000 (and, if asked, the gate's control socket is
polled for `status`). The lab workload's own attacker (spray, uid 1001) sends to the client's
:2222/:5353 all the time, so every probe uses its own port in 2300-2399 and filters on it.

Every step is bounded: the probe by `timeout` in the guest and a host deadline, the capture and
the watchers by signals sent to their pids, the gate by its GateProcess.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xfgate.errors import ControlError, PrerequisiteError
from xfgate.verdict import control
from xfgate_lab.errors import LabError
from xfgate_lab.gate_process import GateProcess, start_gate
from xfgate_lab.guest_channel import run_in_guest
from xfgate_lab.lab import python_env
from xfgate_lab.layout import CLIENT_IFACE, CLIENT_V4, LabLayout, guest_mac, guest_v4, guest_v6
from xfgate_lab.peers import SPRAY_TCP_PORT

log = logging.getLogger(__name__)

BLOCKED_UID = 1001
BLOCKED_USER = "mallory"
GOOD_PORTS = (8080, 8000)  # uid 1000's web servers
CLIENT = str(CLIENT_V4)
PROBE = "/bin/xfprobe"
GUEST_TMP = "/tmp/xfr"
CAPTURE_START_TIMEOUT = 10.0
PCAP_MAGICS = {0xA1B2C3D4, 0xA1B23C4D}  # microsecond and nanosecond pcap, native order
STATUS_SLOW_S = 1.0
# What each kind of xfprobe frame looks like to the client's capture. `vlan` and not "not ip":
# the veth strips an 802.1Q tag into the packet's metadata, so a kernel filter on the ethertype
# sees the inner IPv4 (a first "not (ip or ip6 or arp)" filter counted 0 of 10 tagged frames).
FRAME_FILTERS = {
    "vlan": "vlan",
    "qinq": "vlan",
    "pppoe": "ether proto 0x8864",
    "other": "ether proto 0x88b5",
}


@dataclass(frozen=True)
class Probe:
    """One technique: xfprobe's arguments, the client-side filter counting its packets, the
    gate's block (`{parent_pid}` is replaced by the pid of the shell that starts the probe)."""

    name: str
    args: tuple[str, ...]
    bpf: str
    as_root: bool = False
    seconds: int = 40  # the guest kills the probe after this
    gate_args: tuple[str, ...] = ("--block-uid", str(BLOCKED_UID))
    restart_gate_after: float | None = None  # SIGTERM the gate this long into the probe, restart
    poll_status: bool = False
    settle: float = 1.0  # after the probe: late packets still counted
    # A guest command another user runs this long into the probe (its output and time kept)
    during: str = ""
    during_after: float = 5.0

    def __post_init__(self) -> None:
        pairs = zip(self.gate_args, self.gate_args[1:], strict=False)
        if self.as_root and ("--block-uid", "0") in pairs:
            raise ValueError(f"{self.name}: a root probe must not be caught by blocking uid 0")

    def guest_command(self) -> str:
        """The probe's shell command in the guest: as mallory, or as root dropping to uid 1001
        after opening its socket. A `{parent_pid}` block makes the mallory shell record its pid
        and wait (bounded) for the gate before it starts the probe."""
        probe = shlex.join([PROBE, *self.args])
        if self.as_root:
            return shlex.join([PROBE, "--as-uid", str(BLOCKED_UID), *self.args])
        if self.waits_for_gate:
            d = f"{GUEST_TMP}-{self.name}"
            inner = (
                f"echo $$ > {d}.ppid; i=0; "
                f"while [ ! -e {d}.go ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done; "
                f"{probe}; echo exit $?"  # not exec'd: this shell stays the probe's parent
            )
        else:
            inner = probe
        return f"su -s /bin/sh {BLOCKED_USER} -c {shlex.quote(inner)}"

    @property
    def waits_for_gate(self) -> bool:
        return any("{parent_pid}" in a for a in self.gate_args)


def probes(domain: int = 1) -> dict[str, Probe]:
    """Issue 9's techniques and the reading's, each on its own client port (2300-2399)."""
    g4, g6, mac = str(guest_v4(domain)), str(guest_v6(domain)), guest_mac(domain)

    def tcp_to(port: int) -> str:
        return f"src host {g4} and tcp dst port {port}"

    connect_out = f"{PROBE} hold {CLIENT} {SPRAY_TCP_PORT} 0"

    table = [
        # The control: a plain TCP connection of the blocked user, which the gate has always
        # blocked. It shows the harness can count 0 (and the other probes' counts are theirs).
        Probe("tcp", ("tcp", CLIENT, "2300", "10"), tcp_to(2300)),
        Probe("mptcp", ("mptcp", CLIENT, "2301", "10"), tcp_to(2301)),
        Probe("thread-files", ("thread-files", CLIENT, "2302", "10"), tcp_to(2302)),
        Probe("udplite", ("udplite", CLIENT, "2303", "10"), f"src host {g4} and ip proto 136"),
        Probe("ping4", ("ping", CLIENT, "10"), f"src host {g4} and icmp[icmptype] == icmp-echo"),
        Probe(
            "ping6",
            ("ping", "2001:2::1", "10"),
            f"src host {g6} and icmp6 and ip6[40] == 128",
        ),
        Probe(
            "fdbomb",
            ("fdbomb", CLIENT, "2305", "70", "4090", "20"),
            tcp_to(2305),
            seconds=150,
            poll_status=True,
        ),
        Probe(
            "bind6only",
            ("bind6only", "8080", "15"),
            f"src host {g6} and tcp src port 8080",
        ),
        Probe(
            "spawn",
            ("spawn", CLIENT, "2306", "8", "1"),
            tcp_to(2306),
            gate_args=("--block-pid", "{parent_pid}"),
        ),
        Probe(
            "rename",
            ("rename", "kworker/0:1", CLIENT, "2307", "8"),
            tcp_to(2307),
            gate_args=("--block-exe", PROBE),
        ),
        Probe(
            "raw-tcp",
            ("raw-tcp", "8080", CLIENT, "2308", "10"),
            f"src host {g4} and tcp src port 8080 and tcp dst port 2308",
            as_root=True,
        ),
        *(
            Probe(
                f"frames-{kind}",
                ("frames", "eth0", kind, "10"),
                f"ether src {mac} and {f}",
                as_root=True,
            )
            for kind, f in FRAME_FILTERS.items()
        ),
        # Datagram sockets closed right after their one datagram (issue 9's flood, the UDP
        # side): the gate's lookup finds no socket by the time of its verdict.
        Probe(
            "udp-close",
            ("send-close", "udp", CLIENT, "2310", "2000"),
            f"src host {g4} and udp dst port 2310",
        ),
        Probe(
            "udplite-close",
            ("send-close", "udplite", CLIENT, "2311", "2000"),
            f"src host {g4} and ip proto 136",
        ),
        Probe(
            "ping-close",
            ("send-close", "ping", CLIENT, "0", "2000"),
            f"src host {g4} and icmp[icmptype] == icmp-echo",
        ),
        # Issue 9's flood: new connections to random client ports (1024-61023) as fast as one
        # process can, every SYN a new flow for the queue. Every SYN from the guest is counted
        # but those to the spray's port (its SYNs reach the client before the gate is up; a
        # flood SYN goes there once in 60,000).
        Probe(
            "flood",
            ("flood", CLIENT, "25", "500000"),
            f"src host {g4} and tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn"
            f" and not tcp dst port {SPRAY_TCP_PORT}",
            poll_status=True,
            # Another user of the flooded guest (ops, uid 1002) connects out meanwhile: its SYN
            # is a new flow in the same queue as the flood's (the spray's peer port, which
            # the count leaves out).
            during=f"su -s /bin/sh ops -c {shlex.quote(connect_out)}",
        ),
        Probe(
            "restart",
            ("tcp", CLIENT, "2309", "15"),
            tcp_to(2309),
            restart_gate_after=3.0,
        ),
    ]
    return {p.name: p for p in table}


# --- capture -------------------------------------------------------------------------------


def count_pcap(path: Path) -> int:
    """Packets in a pcap file (the classic format tcpdump -w writes). A missing or malformed
    file raises: a capture that did not happen is never 0 packets."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LabError(f"no capture file {path}: {e}") from e
    if len(data) < 24:
        raise LabError(f"{path}: not a pcap file ({len(data)} bytes)")
    for order in ("<", ">"):
        (magic,) = struct.unpack_from(order + "I", data, 0)
        if magic in PCAP_MAGICS:
            break
    else:
        raise LabError(f"{path}: not a pcap file (magic {data[:4].hex()})")
    count, off = 0, 24
    while off + 16 <= len(data):
        (incl_len,) = struct.unpack_from(order + "I", data, off + 8)
        off += 16 + incl_len
        if off > len(data):
            break  # a record cut by the stop: its header was written, count it
        count += 1
    return count + (1 if off > len(data) else 0)


@dataclass
class Capture:
    proc: subprocess.Popen[bytes]
    pcap: Path
    stderr: Path

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return count_pcap(self.pcap)


def start_capture(netns: str, bpf: str, pcap: Path, iface: str = CLIENT_IFACE) -> Capture:
    """tcpdump in `netns` writing `pcap`, returned once it listens (bounded)."""
    if shutil.which("tcpdump") is None:
        raise PrerequisiteError("tcpdump is not installed: run scripts/bootstrap.sh")
    pcap.unlink(missing_ok=True)
    err = pcap.with_suffix(".tcpdump.err")
    argv = ["ip", "netns", "exec", netns, "tcpdump", "-i", iface, "-n", "-U", "-Z", "root"]
    argv += ["-w", str(pcap), bpf]
    with err.open("wb") as e:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=e)
    cap = Capture(proc, pcap, err)
    deadline = time.monotonic() + CAPTURE_START_TIMEOUT
    while "listening on" not in err.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
            raise LabError(f"tcpdump did not start: {err.read_text(errors='replace')[-500:]}")
        time.sleep(0.05)
    return cap


# --- watchers ------------------------------------------------------------------------------


@dataclass
class HttpTally:
    asked: int = 0
    answered: int = 0

    @property
    def ratio(self) -> float:
        return self.answered / self.asked if self.asked else 0.0


WATCHING = "watching"  # the watcher's first line, once its first GETs are done
WATCHER_START_TIMEOUT = 30.0


def watch_http(
    host: str,
    ports: Sequence[int],
    interval: float,
    max_seconds: float,
    stop: threading.Event,
    started: Callable[[], None] = lambda: None,
) -> dict[int, HttpTally]:
    """GETs each port every `interval` s until `stop` or `max_seconds` (runs in the client
    netns: `python -m xfgate_lab.redteam watch-http`); `started` after the first round."""
    from xfgate_lab.peers import http_get

    tally = {p: HttpTally() for p in ports}
    end = time.monotonic() + max_seconds
    first = True
    while not stop.is_set() and time.monotonic() < end:
        t0 = time.monotonic()
        for p in ports:
            tally[p].asked += 1
            try:
                status, _body = http_get(host, p, 2.0)
                tally[p].answered += status == 200
            except OSError:
                pass
        if first:
            started()
            first = False
        stop.wait(max(0.0, interval - (time.monotonic() - t0)))
    return tally


@dataclass
class HttpWatcher:
    proc: subprocess.Popen[str]

    def stop(self) -> dict[int, HttpTally]:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=5)
        try:
            doc = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError) as e:
            raise LabError(f"http watcher gave no tally: {out[-300:]!r}") from e
        return {int(p): HttpTally(int(v[0]), int(v[1])) for p, v in doc.items()}


def start_http_watcher(
    netns: str, host: str, ports: Sequence[int], interval: float = 0.5, max_seconds: float = 300
) -> HttpWatcher:
    argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "xfgate_lab.redteam"]
    argv += ["watch-http", host, ",".join(map(str, ports)), "--interval", str(interval)]
    argv += ["--max-seconds", str(max_seconds)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=python_env())
    # The probe starts once the watcher is asking (its Python takes seconds to start on a
    # loaded host: a 1-2 s probe was otherwise over before the first GET, asked 0-1 times).
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], WATCHER_START_TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != WATCHING:
        log.warning("http watcher not asking after %.0f s: %r", WATCHER_START_TIMEOUT, line)
    return HttpWatcher(proc)


@dataclass
class StatusTally:
    polls: int = 0
    slow: int = 0  # no answer within STATUS_SLOW_S
    max_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    # (when, the packet thread's status) of every answer: its flood share and CPU clock
    packet_thread: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    def flooding_cpu_share(self) -> tuple[float, float]:
        """(CPU share of one core, seconds) of the packet thread between the first and the
        last answer that said it was flooding (its CPU clock as of its last 1 s window)."""
        flooding = [(t, pt) for t, pt in self.packet_thread if pt.get("flooding")]
        if len(flooding) < 2:
            return 0.0, 0.0
        (t0, a), (t1, b) = flooding[0], flooding[-1]
        seconds = t1 - t0
        return (float(b["cpu_s"]) - float(a["cpu_s"])) / seconds if seconds else 0.0, seconds


class StatusPoller:
    """Polls the gate's control socket for `status` every `interval` s, timing each answer."""

    def __init__(self, run_dir: Path, domain: int, interval: float = 0.5) -> None:
        self.tally = StatusTally()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(run_dir, domain, interval), daemon=True
        )
        self._thread.start()

    def _run(self, run_dir: Path, domain: int, interval: float) -> None:
        for _ in range(100_000):
            if self._stop.is_set():
                return
            t0 = time.monotonic()
            try:
                reply = control.request(run_dir, domain, {"op": "status"}, timeout=5.0)
                failed = False
                self.tally.packet_thread.append((time.monotonic(), reply.get("packet_thread", {})))
            except ControlError as e:
                self.tally.errors.append(str(e)[:200])
                failed = True
            took = time.monotonic() - t0
            self.tally.polls += 1
            self.tally.max_s = max(self.tally.max_s, took)
            self.tally.slow += failed or took > STATUS_SLOW_S
            self._stop.wait(max(0.0, interval - took))

    def stop(self) -> StatusTally:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.tally


# --- one probe -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RedteamLab:
    """A lab instance and the paths the product is told about (`XFGATE_DOMAINS`,
    `XFGATE_RUN_DIR`, `XFGATE_CACHE` in `env`)."""

    layout: LabLayout
    env: Mapping[str, str]
    workdir: Path
    domain: int = 1

    @property
    def run_dir(self) -> Path:
        return Path(self.env.get("XFGATE_RUN_DIR", "/run/xfgate"))

    def guest(self, command: str, timeout: float = 30.0) -> str:
        r = run_in_guest(
            self.layout.ctl_socket(self.domain),
            self.layout.ctl_lock(self.domain),
            command,
            timeout,
            self.domain,
        )
        return r.output.decode(errors="replace")


@dataclass
class ProbeResult:
    probe: str
    packets_out: int
    output: str
    http: dict[int, HttpTally]
    gate_error: str = ""
    status: StatusTally | None = None
    gate_args: tuple[str, ...] = ()
    during: tuple[float, str] | None = None  # the probe's `during` command: seconds, output

    def summary(self) -> dict[str, Any]:
        return {
            "probe": self.probe,
            "packets_out": self.packets_out,
            "during": None if self.during is None else [round(self.during[0], 2), self.during[1]],
            "http": {p: [t.asked, t.answered] for p, t in self.http.items()},
            "gate_error": self.gate_error,
            "status": None
            if self.status is None
            else {
                "polls": self.status.polls,
                "slow": self.status.slow,
                "max_s": round(self.status.max_s, 3),
                # the packet thread while it said it was flooding: share of a core, seconds
                "flooding": [round(x, 3) for x in self.status.flooding_cpu_share()],
            },
            "gate_args": list(self.gate_args),
            "output": self.output.strip()[-600:],
        }


def _start_probe_in_guest(lab: RedteamLab, probe: Probe) -> None:
    d = f"{GUEST_TMP}-{probe.name}"
    cmd = (
        f"rm -f {d}.out {d}.rc {d}.ppid {d}.go; "
        f"( timeout {probe.seconds} sh -c {shlex.quote(probe.guest_command())} > {d}.out 2>&1; "
        f"echo $? > {d}.rc ) < /dev/null > /dev/null 2>&1 &"
    )
    lab.guest(cmd, timeout=15)


def _guest_file(lab: RedteamLab, path: str) -> str | None:
    out = lab.guest(f"cat {path} 2>/dev/null && echo @@ok", timeout=15)
    return out.rsplit("@@ok", 1)[0] if "@@ok" in out else None


def _wait_probe(lab: RedteamLab, probe: Probe) -> str:
    d = f"{GUEST_TMP}-{probe.name}"
    deadline = time.monotonic() + probe.seconds + 30
    while time.monotonic() < deadline:
        if _guest_file(lab, f"{d}.rc") is not None:
            return _guest_file(lab, f"{d}.out") or ""
        time.sleep(1.0)
    raise LabError(f"probe {probe.name} did not finish within {probe.seconds + 30} s")


def _parent_pid(lab: RedteamLab, probe: Probe) -> int:
    d = f"{GUEST_TMP}-{probe.name}"
    for _ in range(60):
        text = _guest_file(lab, f"{d}.ppid")
        if text and text.strip().isdigit():
            return int(text.strip())
        time.sleep(0.5)
    raise LabError(f"probe {probe.name}: its parent shell never wrote its pid")


@contextmanager
def _gates(lab: RedteamLab) -> Iterator[list[GateProcess]]:
    """The gates a probe run starts, each stopped by its pid (SIGTERM), then the domain cleaned."""
    started: list[GateProcess] = []
    try:
        yield started
    finally:
        for g in started:
            g.stop(signal.SIGTERM, timeout=30)
        if started:  # the gates leave their enforcement: release the domain
            started[-1].cleanup()


def _start_one_gate(
    lab: RedteamLab, args: Sequence[str], tag: str, started: list[GateProcess]
) -> GateProcess:
    n = len(started)
    run_args = ["--domain", str(lab.domain), "--log", str(lab.workdir / f"{tag}-{n}.jsonl")]
    g = start_gate([*run_args, *args], lab.workdir / f"{tag}-{n}.out", env=lab.env)
    started.append(g)
    g.wait_ready(90)
    return g


def run_probe(lab: RedteamLab, probe: Probe) -> ProbeResult:
    """Capture, gate, probe, watchers; returns what got out. A gate that refuses its arguments
    (an option this xfgate lacks) is recorded in `gate_error` and the probe still runs: the
    count then says what an operator could not stop."""
    lab.workdir.mkdir(parents=True, exist_ok=True)
    tag = f"redteam-{probe.name}"
    cap = start_capture(lab.layout.client_netns, probe.bpf, lab.workdir / f"{tag}.pcap")
    watcher: HttpWatcher | None = None
    poller: StatusPoller | None = None
    gate_error, gate_args, output = "", tuple(probe.gate_args), ""
    http: dict[int, HttpTally] = {}
    status: StatusTally | None = None
    during: tuple[float, str] | None = None
    try:
        with _gates(lab) as started:
            if probe.waits_for_gate:
                _start_probe_in_guest(lab, probe)
                ppid = str(_parent_pid(lab, probe))
                gate_args = tuple(a.replace("{parent_pid}", ppid) for a in probe.gate_args)
            try:
                _start_one_gate(lab, gate_args, tag, started)
            except LabError as e:
                gate_error = str(e)[-600:]
                log.warning("%s: the gate did not start: %s", probe.name, gate_error)
            watcher = start_http_watcher(
                lab.layout.client_netns, str(guest_v4(lab.domain)), GOOD_PORTS
            )
            if probe.poll_status and not gate_error:
                poller = StatusPoller(lab.run_dir, lab.domain)
            if probe.waits_for_gate:
                lab.guest(f"touch {GUEST_TMP}-{probe.name}.go", timeout=15)
            else:
                _start_probe_in_guest(lab, probe)
            if probe.restart_gate_after is not None and started:
                time.sleep(probe.restart_gate_after)
                started[-1].stop(signal.SIGTERM, timeout=30)
                _start_one_gate(lab, gate_args, tag, started)
            if probe.during:
                time.sleep(probe.during_after)
                t0 = time.monotonic()
                said = lab.guest(probe.during, timeout=60)
                during = (time.monotonic() - t0, said.strip()[-300:])
            output = _wait_probe(lab, probe)
            time.sleep(probe.settle)
            # Before the gates stop: a stopped gate answers no status, and while it stops the
            # domain is fail-closed (a GET then would count against the gate it measures).
            if poller is not None:
                status, poller = poller.stop(), None
            if watcher is not None:
                http, watcher = watcher.stop(), None
    finally:
        if poller is not None:
            status = poller.stop()
        if watcher is not None:
            http = watcher.stop()
        out = cap.stop()
    result = ProbeResult(probe.name, out, output, http, gate_error, status, gate_args, during)
    log.info("redteam %s: %s", probe.name, json.dumps(result.summary()))
    return result


def render_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: technique -> packets out, the good servers' answers, the gate's options."""
    lines = [
        "| probe | gate options | packets out | :8080 answered | :8000 answered | notes |",
        "|---|---|---|---|---|---|",
    ]
    for s in summaries:
        http = {int(k): v for k, v in s.get("http", {}).items()}
        cells = [f"{http[p][1]}/{http[p][0]}" if p in http else "-" for p in GOOD_PORTS]
        notes = []
        if s.get("gate_error"):
            notes.append("gate did not start: " + s["gate_error"].strip().splitlines()[-1][:120])
        st = s.get("status")
        if st:
            notes.append(f"status: {st['slow']}/{st['polls']} polls over 1 s, max {st['max_s']} s")
            share, seconds = st.get("flooding") or (0.0, 0.0)
            if seconds:
                notes.append(f"flooding {seconds:.0f} s at {100 * share:.1f} % of a core")
        out = [ln for ln in s.get("output", "").splitlines() if ln.startswith("xfprobe")]
        if out:
            notes.append("probe: " + out[-1][:100])
        opts = " ".join(s.get("gate_args", []))
        lines.append(
            f"| {s['probe']} | `{opts}` | {s['packets_out']} | {cells[0]} | {cells[1]} "
            f"| {'; '.join(notes).replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


# --- command line (the client-side watcher) -------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xfgate_lab.redteam", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("watch-http", help="GET ports every interval until SIGTERM; JSON tally")
    w.add_argument("host")
    w.add_argument("ports", help="comma-separated")
    w.add_argument("--interval", type=float, default=0.5)
    w.add_argument("--max-seconds", type=float, default=300.0)
    t = sub.add_parser("table", help="markdown table of a results file (JSON lines)")
    t.add_argument("results", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "table":
        docs = [json.loads(line) for line in args.results.read_text().splitlines() if line]
        sys.stdout.write(render_table(docs))
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ports = [int(x) for x in args.ports.split(",") if x]
    tally = watch_http(
        args.host,
        ports,
        args.interval,
        args.max_seconds,
        stop,
        lambda: print(WATCHING, flush=True),
    )
    sys.stdout.write(json.dumps({p: [t.asked, t.answered] for p, t in tally.items()}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
