"""The gate on the real QEMU guest, with real introspection: the issue's "done when".

Runs on a private lab instance (prefix ``xfvlab``; $XFGATE_VERDICT_LAB_PREFIX overrides) so that
blocking the guest's services never disturbs tests using the shared lab. Counts are taken on the
client side: the lab's peer statistics and iptables counters in the client namespace.

Guest workload (xfgate/lab/guest/init): uid 0 httpd :80; uid 1000 httpd :8080 and fastweb :8000;
uid 1001 `spray` -> client :2222/tcp and :5353/udp every 0.5 s; uid 1002 httpd [v6]:9000 and
`keeper` holding a TCP connection to client :7000.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from xfgate.config import load_domains, save_domains
from xfgate_lab import lab as labmod
from xfgate_lab.gate_process import GateProcess, start_gate
from xfgate_lab.layout import LabLayout

pytestmark = [pytest.mark.lab]

XFGATE = [sys.executable, "-m", "xfgate.cli"]
XFGATE_LAB = [sys.executable, "-m", "xfgate_lab.cli"]
GUEST4, GUEST6, CLIENT4 = "198.18.1.1", "2001:2::1:1", "198.18.0.1"
SPRAY_PERIOD = 0.5  # the attacker's interval between attempts (init: spray ... 500)


@dataclass(frozen=True)
class Lab:
    layout: LabLayout
    env: dict[str, str]
    workdir: Path

    def client(self, argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.layout.client_netns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def xfgate(self, args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*XFGATE, *args], capture_output=True, text=True, env=self.env, timeout=timeout
        )

    def http(self, host: str, port: int) -> bool:
        return labmod.client_http_get(self.layout, host, port, timeout=3.0) is not None

    def peers(self) -> dict[str, Any]:
        stats: dict[str, Any] = json.loads(self.layout.peers_stats_path.read_text())
        return stats

    def truth(self) -> dict[str, Any]:
        p = subprocess.run(
            [*XFGATE_LAB, "truth", "--domain", "1", "--json"],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
        )
        assert p.returncode == 0, p.stderr
        doc: dict[str, Any] = json.loads(p.stdout)
        return doc

    def pid_of(self, comm: str, uid: int, port: int = 0) -> int:
        doc = self.truth()
        pids = {p["pid"] for p in doc["processes"] if p["comm"] == comm and p["uid"] == uid}
        if port:
            pids &= {s["pid"] for s in doc["sockets"] if s["lport"] == port}
        assert len(pids) >= 1, f"no {comm} of uid {uid} on port {port}"
        return int(min(pids))


@contextlib.contextmanager
def private_lab(
    workdir: Path, prefix: str, counted: Sequence[tuple[str, int]], **up: Any
) -> Iterator[Lab]:
    """A lab of its own (prefix, domains file and run dir under `workdir`), with client-side
    counters of what the guest sends the peers on `counted` (proto, port), first SYN included;
    `up`: lab_up's options (e.g. memory="anonymous")."""
    from tests.conftest import require_lab_prerequisites

    require_lab_prerequisites()
    env = {
        **os.environ,
        "XFGATE_LAB_PREFIX": prefix,
        "XFGATE_DOMAINS": str(workdir / "domains.toml"),
        "XFGATE_RUN_DIR": str(workdir / "run"),
    }
    layout = LabLayout(prefix, domains_file=workdir / "domains.toml")
    result = labmod.lab_up(layout, domains=1, **up)
    # Our own domains file, also when the lab was already up (written elsewhere then).
    domains = {d.id: d for d in result.domains}
    if not domains and result.state.domains_file:  # up already, recorded in another file
        domains = load_domains(Path(result.state.domains_file))
    save_domains(domains, workdir / "domains.toml")
    lab = Lab(layout, env, workdir)
    for prog, src in (("iptables-legacy", GUEST4), ("ip6tables-legacy", GUEST6)):
        for proto, port in counted:
            lab.client([prog, "-A", "INPUT", "-s", src, "-p", proto, "--dport", str(port)])
    try:
        yield lab
    finally:
        for prog in ("iptables-legacy", "ip6tables-legacy"):
            lab.client([prog, "-F", "INPUT"])
        if not result.already_up and os.environ.get("XFGATE_LAB_KEEP") != "1":
            labmod.lab_down(layout)


@pytest.fixture(scope="module")
def vlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    prefix = os.environ.get("XFGATE_VERDICT_LAB_PREFIX", "xfvlab")
    counted = (("tcp", 2222), ("udp", 5353), ("tcp", 7000))
    with private_lab(tmp_path_factory.mktemp("xfvlab"), prefix, counted) as lab:
        yield lab


def arrived(lab: Lab, proto: str, port: int) -> int:
    total = 0
    for prog in ("iptables-legacy", "ip6tables-legacy"):
        out = lab.client([prog, "-nvxL", "INPUT"]).stdout
        for line in out.splitlines():
            if f"dpt:{port}" in line and f" {proto} " in line:
                total += int(line.split()[0])
    return total


@dataclass
class Gate:
    lab: Lab
    process: GateProcess
    log: Path

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.process.proc

    def status(self) -> dict[str, Any]:
        p = self.lab.xfgate(["status", "--domain", "1", "--json"])
        result: dict[str, Any] = json.loads(p.stdout)[0]
        return result

    def stop(self, sig: int = signal.SIGTERM) -> int:
        return self.process.stop(sig, timeout=30)

    def records(self) -> list[dict[str, Any]]:
        text = self.log.read_text() if self.log.exists() else ""
        return [json.loads(line) for line in text.splitlines()]

    def wait_port(self, port: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port in self.status().get("blocked_ports", []):
                return
            time.sleep(0.25)
        raise AssertionError(f"{port} not in the gate's blocked ports: {self.status()}")


@pytest.fixture
def gate(vlab: Lab) -> Iterator[Any]:
    started: list[Gate] = []

    def start(*args: str) -> Gate:
        n = len(started)
        log, out = vlab.workdir / f"verdicts-{n}.log", vlab.workdir / f"gate-{n}.out"
        process = start_gate(["--domain", "1", "--log", str(log), *args], out, env=vlab.env)
        g = Gate(vlab, process, log)
        started.append(g)
        process.wait_ready(90)
        return g

    yield start
    for g in started:
        g.stop()
    vlab.xfgate(["cleanup", "--domain", "1"])
    for prog in ("iptables-legacy", "ip6tables-legacy"):
        vlab.client([prog, "-Z", "INPUT"])


def leftovers(lab: Lab) -> list[str]:
    ns = lab.layout.dom0_netns
    found: list[str] = []
    for prog in ("iptables-legacy", "ip6tables-legacy"):
        for table in ("filter", "mangle"):
            out = subprocess.run(
                ["ip", "netns", "exec", ns, prog, "-t", table, "-S"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout
            found += [f"{table} {line}" for line in out.splitlines() if "XFGATE" in line]
    sets = subprocess.run(
        ["ip", "netns", "exec", ns, "ipset", "list", "-n"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    found += [n for n in sets.split() if n.startswith("xfgate-")]
    return found


def spray_quiet(lab: Lab, seconds: float) -> tuple[int, int]:
    """Client-side arrivals of the attacker's TCP and UDP over `seconds` (it tries ~2/s)."""
    time.sleep(1.5)  # the peers write their statistics once a second: let them catch up
    for prog in ("iptables-legacy", "ip6tables-legacy"):
        lab.client([prog, "-Z", "INPUT"])
    before = lab.peers()
    time.sleep(seconds)
    after = lab.peers()
    assert after["updated"] > before["updated"], "peer statistics are not updating"
    tcp = arrived(lab, "tcp", 2222) + after["tcp2222_accepted"] - before["tcp2222_accepted"]
    udp = arrived(lab, "udp", 5353) + after["udp5353_datagrams"] - before["udp5353_datagrams"]
    return tcp, udp


# --- the "done when" -----------------------------------------------------------------


def test_block_uid_1001_not_one_attacker_packet_reaches_the_client(vlab: Lab, gate: Any) -> None:
    g = gate("--block-uid", "1001")
    assert spray_quiet(vlab, 6 * SPRAY_PERIOD * 2) == (0, 0)  # ~12 attempts, first SYNs incl.
    assert vlab.http(GUEST4, 80) and vlab.http(GUEST4, 8080) and vlab.http(GUEST4, 8000)
    # The attacker's long-lived UDP socket was found by the first walk: its port is in the
    # kernel-side set, so its datagrams are dropped there without reaching the engine.
    truth = vlab.truth()
    spray_pid = vlab.pid_of("spray", 1001)
    udp_ports = {
        s["lport"] for s in truth["sockets"] if s["pid"] == spray_pid and s["proto"] == "udp"
    }
    status = g.status()
    assert {f"udp/{p}" for p in udp_ports} <= set(status["blocked_ports"])
    # uid 1000's :8080 is a good listener: its new connections are accepted in the kernel.
    assert "tcp/8080" in status["granted_listeners"] and "tcp/80" in status["granted_listeners"]
    assert g.stop() == 0
    records = g.records()
    attack = [r for r in records if r["direction"] == "out" and r["dport"] in (2222, 5353)]
    assert len(attack) >= 4
    for r in attack:
        if r["pid"] is None:
            # Judged by its creator (a blocked uid's new socket needs no walk), or while its
            # holder was out of sight (closed before a walk looked, a lookup starved on a loaded
            # machine): dropped, never accepted.
            assert r["verdict"] == "drop", f"{r}"
            continue
        assert (r["verdict"], r["pid"], r["uid"], r["comm"]) == ("drop", spray_pid, 1001, "spray")
    # Named: by its holder, or (a socket of a uid the policy blocks, answered without a walk)
    # by its creator, or (a lookup that did not answer in time on a loaded machine) dropped
    # unsettled as a flow the last view does not show while a block is in force.
    unnamed = [
        r
        for r in attack
        if r["pid"] != spray_pid
        and "sk_uid 1001" not in r["reason"]
        and not (r["settled"] is False and "while a block is in force" in r["reason"])
    ]
    assert not unnamed, [(r["dport"], r["verdict"], r["reason"]) for r in unnamed]
    assert "tcp" in {r["proto"] for r in attack}  # each new connection: a new port
    # Whatever of :8080 still reached the engine (a connection before the first grant) is
    # uid 1000's and accepted.
    web = [r for r in records if 8080 in (r["sport"], r["dport"]) and r["pid"] is not None]
    assert all(r["uid"] == 1000 and r["verdict"] == "accept" for r in web)
    assert all(r["comm"] in ("httpd", "exe") for r in web)  # forked children briefly show exe


def test_block_uid_0_kills_port_80_only(vlab: Lab, gate: Any) -> None:
    gate("--block-uid", "0")
    assert not vlab.http(GUEST4, 80)
    assert vlab.http(GUEST4, 8080) and vlab.http(GUEST4, 8000)
    tcp, udp = spray_quiet(vlab, 2.0)
    assert tcp > 0 and udp > 0  # the attacker is not uid 0: it passes


def test_block_pid_of_the_8080_server(vlab: Lab, gate: Any) -> None:
    pid = vlab.pid_of("httpd", 1000, port=8080)
    gate("--block-pid", str(pid))
    assert not vlab.http(GUEST4, 8080)
    assert vlab.http(GUEST4, 8000) and vlab.http(GUEST4, 80)  # same uid, other process


def test_block_comm_spray(vlab: Lab, gate: Any) -> None:
    gate("--block-comm", "spray")
    assert spray_quiet(vlab, 4.0) == (0, 0)
    assert vlab.http(GUEST4, 8080)


def test_ipv6_listener_of_uid_1002(vlab: Lab, gate: Any) -> None:
    g = gate("--block-uid", "1002")
    assert not vlab.http(GUEST6, 9000)
    assert vlab.http(GUEST4, 8080)
    in_set = "tcp/9000" in g.status()["blocked_ports"]
    g.stop()
    # Dropped by the engine (logged) or, once the refresher has seen the port, by the ipset.
    v6 = [r for r in g.records() if 9000 in (r["sport"], r["dport"]) and r["proto"] == "tcp"]
    assert v6 or in_set  # one of the two dropped it: not an empty all()
    assert all(r["uid"] == 1002 and r["verdict"] == "drop" for r in v6)


def test_live_block_and_unblock_on_new_and_established_flows(vlab: Lab, gate: Any) -> None:
    g = gate()
    netns = ["ip", "netns", "exec", vlab.layout.client_netns, sys.executable, "-m"]
    hold = subprocess.Popen(
        [*netns, "xfgate_lab.peers", "hold", GUEST4, "8080", "--timeout", "5"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert hold.stdin is not None and hold.stdout is not None

    def say() -> str:
        assert hold.stdin is not None and hold.stdout is not None
        hold.stdin.write("GET / HTTP/1.0\\n\\n\n")  # one complete request per line
        hold.stdin.flush()
        return hold.stdout.readline().strip()

    try:
        assert hold.stdout.readline().strip() == "connected"  # settled as accepted
        assert vlab.http(GUEST4, 8080)
        p = vlab.xfgate(["block", "--domain", "1", "--uid", "1000"])
        assert p.returncode == 0, p.stderr
        assert say().startswith("fail")  # the established connection's request is dropped
        assert not vlab.http(GUEST4, 8080)  # and new connections too
        p = vlab.xfgate(["unblock", "--domain", "1", "--uid", "1000"])
        assert p.returncode == 0, p.stderr
        assert vlab.http(GUEST4, 8080)
        # The request dropped while blocked is retransmitted with exponential backoff (the
        # next try may be ~12 s after the first): the answer arrives on one of the next reads.
        answers = [say() for _ in range(3)]
        assert "ok" in answers, answers
    finally:
        hold.kill()
        hold.wait(5)
    assert g.status()["policy"]["block_uids"] == []


def test_kill_9_keeps_known_ports_blocked_clean_exit_leaves_nothing(vlab: Lab, gate: Any) -> None:
    g = gate("--block-uid", "0", "--queue-bypass")
    g.wait_port("tcp/80")
    assert g.stop(signal.SIGKILL) == -signal.SIGKILL
    assert not vlab.http(GUEST4, 80)  # the ipset still drops uid 0's known port
    assert vlab.http(GUEST4, 8080)  # bypass: the rest passes while no gate runs
    g2 = gate("--block-uid", "1001", "--release-on-exit")  # adopts and replaces the leftovers
    assert vlab.http(GUEST4, 80)
    assert g2.stop() == 0
    assert leftovers(vlab) == []


def test_poll_mode_leaks_between_walks_queue_mode_does_not(vlab: Lab, gate: Any) -> None:
    """The thesis's weakness, measured: each new attacker connection uses a new port, unknown
    until the next walk, so in poll mode it passes; the queue engine stops every one."""
    g = gate("--mode", "poll", "--interval", "3", "--block-uid", "1001", "--release-on-exit")
    time.sleep(1.0)
    leaked_tcp, _ = spray_quiet(vlab, 6.0)
    # Its UDP socket is long-lived, so its port gets a rule at the first walk; each TCP
    # attempt comes from a fresh port: the leak window.
    assert leaked_tcp > 0
    rules = vlab.xfgate(["rules", "--domain", "1"]).stdout
    assert "XFGATE-1-POLL" in rules and "--sport" in rules  # the thesis's per-port rules
    ipv4 = rules.split("# ipv4 XFGATE-1-POLL", 1)[1].split("#", 1)[0]
    lines = [ln.split(" -c ")[0] for ln in ipv4.splitlines() if ln.startswith("-A")]
    assert lines and len(lines) == len(set(lines))  # never a duplicate rule
    assert g.stop() == 0
    assert leftovers(vlab) == []
    gate("--block-uid", "1001")
    assert spray_quiet(vlab, 6.0) == (0, 0)
