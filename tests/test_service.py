"""`xfgate serve` without a lab: discovery, waiting rules, expiry, reload, the lock, metrics,
sd_notify, verdict log rotation. The gate is a fake here (the real one: test_service_lab.py)."""

from __future__ import annotations

import io
import json
import socket
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from scapy.layers.inet import IP, TCP

from tests.verdict_fakes import VIF, FakePacket
from xfgate.config import DomainConfig, MemoryConfig
from xfgate.errors import ConfigError
from xfgate.flow import GuestSocket, GuestView, Owner, Ownership, Via
from xfgate.service.metrics import MetricsServer, ServiceInfo
from xfgate.service.policyfile import parse_policy
from xfgate.service.sdnotify import Notifier
from xfgate.service.serve import ServeOptions, Service, ServiceLock
from xfgate.verdict.cache import OwnerCache
from xfgate.verdict.engine import Engine, LockedOwnerSource
from xfgate.verdict.fastpath import GateLayout
from xfgate.verdict.log import VerdictLog
from xfgate.verdict.options import GateOptions
from xfgate.verdict.policy import Policy
from xfgate.verdict.runner import DomainGate, Gate

T0 = 1_800_000_000.0


def cfg(d: int, netns: str = "ns") -> DomainConfig:
    return DomainConfig(d, f"g{d}", (f"vif{d}.0",), MemoryConfig("raw", f"/m{d}"), netns=netns)


@dataclass
class FakeDomain:
    cfg: DomainConfig
    engine: Any
    threads: list[Any] = field(default_factory=list)


class FakeGate:
    """The Gate's surface the service uses, recording what it is asked."""

    def __init__(self) -> None:
        self.domains: dict[int, FakeDomain] = {}
        self.firewall: object | None = None
        self.readers: dict[int, Any] = {}
        self.tick_hooks: list[Any] = []
        self.policy_hook: Any = None
        self.netns: list[str] = []
        self.fail: dict[int, str] = {}
        self.removed: list[int] = []
        self.released: list[int] = []
        self.kept: set[int] = set()

    def open(self, netns: str) -> None:
        self.netns.append(netns)
        self.firewall = object()

    def clean_leftovers(self, keep: set[int] | None = None) -> None:
        self.kept = keep or set()

    def add_domain(self, c: DomainConfig, policy: Policy) -> None:
        if c.id in self.fail:
            raise ConfigError(self.fail[c.id])
        self.domains[c.id] = FakeDomain(c, SimpleNamespace(policy=policy))

    def remove_domain(self, d: int, release: bool = False) -> None:
        self.removed.append(d)
        if release:
            self.released.append(d)
        self.domains.pop(d, None)

    def set_policy(self, d: int, policy: Policy) -> None:
        self.domains[d].engine.policy = policy

    def status(self, dg: FakeDomain) -> dict[str, Any]:
        return {"domain": dg.cfg.id}

    def stop(self) -> None:
        pass


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.now = T0
        self.listed: list[DomainConfig] = [cfg(1)]
        self.dead: dict[int, str] = {}
        self.source_fails = False
        self.gate = FakeGate()
        opts = ServeOptions(
            GateOptions(domains=(), policy=Policy(), run_dir=tmp / "run"),
            tmp / "policy.toml",
            tmp / "audit.jsonl",
            discover_interval=0.0,
        )
        self.service = Service(
            opts,
            self.source,
            liveness=lambda c: self.dead.get(c.id, ""),
            clock=lambda: self.now,
        )
        self.service.gate = cast(Gate, self.gate)
        self.audit = tmp / "audit.jsonl"
        self.policy_path = tmp / "policy.toml"

    def source(self) -> Sequence[DomainConfig]:
        if self.source_fails:
            raise ConfigError("domains file half written")
        return self.listed

    def policy(self, d: int) -> Policy:
        p: Policy = self.gate.domains[d].engine.policy
        return p

    def block(self, d: int, kind: str, value: str, **kw: Any) -> dict[str, Any]:
        return self.service.handle({"op": "block", "domain": d, "kind": kind, "value": value, **kw})


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    r = Rig(tmp_path)
    r.service.start()
    return r


def test_domains_come_and_go(rig: Rig) -> None:
    assert set(rig.gate.domains) == {1} and rig.gate.netns == ["ns"]
    assert rig.gate.kept == {1}  # leftovers of listed domains are never removed
    rig.listed = [cfg(1), cfg(2)]  # a guest starts after the service
    rig.service.tick()
    assert set(rig.gate.domains) == {1, 2}
    rig.source_fails = True  # a broken list lets go of nobody
    rig.service.tick()
    assert set(rig.gate.domains) == {1, 2}
    rig.source_fails = False
    rig.dead[1] = "QEMU pid 4 is gone"  # its VM stopped
    rig.service.tick()
    assert set(rig.gate.domains) == {1, 2}  # once could be a slow monitor
    rig.service.tick()
    assert set(rig.gate.domains) == {2} and rig.gate.removed == [1]
    assert "QEMU pid 4" in rig.service.status()["service"]["pending"]["1"]
    rig.listed = [cfg(1)]  # domain 2 left the list; 1 still dead
    rig.service.tick()
    assert rig.gate.domains == {} and rig.gate.removed == [1, 2]
    del rig.dead[1]
    rig.service.tick()
    assert set(rig.gate.domains) == {1}
    rig.listed = [cfg(1, netns="ns")]
    rig.listed[0] = DomainConfig(1, "g1", ("vif1.1",), MemoryConfig("raw", "/m1"), netns="ns")
    rig.service.tick()  # changed configuration: let go and taken on again, with the new one
    assert rig.gate.domains[1].cfg.vifs == ("vif1.1",)


def test_a_domain_that_fails_to_start_is_retried_and_reported(rig: Rig) -> None:
    rig.gate.fail[2] = "NFQUEUE 102 is already bound by another process"
    rig.listed = [cfg(1), cfg(2)]
    rig.service.tick()
    assert set(rig.gate.domains) == {1}
    assert "already bound" in rig.service.status()["service"]["pending"]["2"]
    del rig.gate.fail[2]
    rig.service.tick()
    assert set(rig.gate.domains) == {1, 2} and rig.service.pending == {}


def test_block_with_expiry_is_written_applied_and_lifted_at_its_time(rig: Rig) -> None:
    reply = rig.block(1, "uid", "1001", **{"for": "30s", "reason": "spray", "by": "alice"})
    assert reply["waiting"] == "" and reply["policy"]["block_uids"] == [1001]
    assert rig.policy(1).block_uids == {1001}
    on_disk = parse_policy(rig.policy_path.read_text())
    assert [(r.kind, r.value, r.until, r.by) for r in on_disk.rules] == [
        ("uid", "1001", T0 + 30, "alice")
    ]
    rig.now = T0 + 29.9
    rig.service.tick()
    assert rig.policy(1).block_uids == {1001}
    rig.now = T0 + 30
    rig.service.tick()
    assert rig.policy(1).block_uids == frozenset()
    assert parse_policy(rig.policy_path.read_text()).rules == ()
    ops = [json.loads(line)["op"] for line in rig.audit.read_text().splitlines()]
    assert ops == ["block", "expire"]


def test_a_rule_for_a_domain_not_running_waits_for_it(rig: Rig) -> None:
    reply = rig.block(3, "exe", "/tmp/spray")
    assert "not in the domain list" in reply["waiting"]
    st = rig.service.status()
    assert [(w["domain"], w["value"]) for w in st["waiting"]] == [(3, "/tmp/spray")]
    rig.listed = [cfg(1), cfg(3)]
    rig.service.tick()
    assert rig.policy(3).block_exes == {"/tmp/spray"}  # in force from its first packet
    assert rig.service.status()["waiting"] == []


def test_unblock_and_domain_socket_requests_go_to_the_file(rig: Rig) -> None:
    hook = rig.gate.policy_hook
    assert hook is not None  # `xfgate block` to a domain's own socket is persisted too
    hook(1, {"op": "block", "kind": "pid", "value": "412"})
    assert rig.policy(1).block_pids == {412}
    assert len(parse_policy(rig.policy_path.read_text()).rules) == 1
    with pytest.raises(ConfigError, match="no rule blocks"):
        rig.service.handle({"op": "unblock", "domain": 1, "kind": "pid", "value": "413"})
    rig.service.handle({"op": "unblock", "domain": 1, "kind": "pid", "value": "0412"})
    assert rig.policy(1).block_pids == frozenset()
    with pytest.raises(ConfigError):
        rig.block(1, "uid", "-1")
    with pytest.raises(ConfigError):
        rig.block(1, "uid", "5", **{"for": "soon"})


def test_policy_file_edits_reload_and_bad_ones_keep_the_last_good(rig: Rig) -> None:
    rig.block(1, "uid", "1001")
    text = rig.policy_path.read_text()
    rig.policy_path.write_text(text + '[[rule]]\ndomain = 1\nuid = "x"\n')
    rig.service.tick()
    assert rig.policy(1).block_uids == {1001}  # kept
    err = rig.service.status()["service"]["policy_error"]
    assert "policy.toml:" in err and "rule 2" in err
    with pytest.raises(ConfigError, match="does not parse"):
        rig.block(1, "uid", "1002")
    rig.policy_path.write_text(text + '[[rule]]\ndomain = 1\ncomm = "spray"\n')
    rig.service._on_hup()
    rig.service.tick()
    assert rig.policy(1).block_comms == {"spray"} and rig.policy(1).block_uids == {1001}
    assert rig.service.status()["service"]["policy_error"] == ""


def test_policy_survives_a_restart(tmp_path: Path) -> None:
    first = Rig(tmp_path)
    first.service.start()
    first.block(1, "uid", "1001", **{"for": "1h"})
    first.service.stop()
    second = Rig(tmp_path)
    second.now = T0 + 60
    second.service.start()
    assert second.policy(1).block_uids == {1001}
    second.service.stop()


def test_a_bad_policy_file_at_start_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "policy.toml").write_text("[[rule]]\ndomain = 1\n")
    with pytest.raises(ConfigError, match=r"policy\.toml:1"):
        Rig(tmp_path).service.start()
    ServiceLock(tmp_path / "run").release()  # the failed start let go of the lock


def test_a_second_service_is_refused(tmp_path: Path) -> None:
    lock = ServiceLock(tmp_path)
    with pytest.raises(ConfigError, match=r"another `xfgate serve` runs on this host \(pid \d+"):
        ServiceLock(tmp_path)
    lock.release()
    ServiceLock(tmp_path).release()


def test_metrics_port_taken_is_a_clear_error(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    gate = cast(Gate, FakeGate())
    with pytest.raises(ConfigError, match=f"127.0.0.1:{port}: cannot listen"):
        MetricsServer(f"127.0.0.1:{port}", gate, lambda: ServiceInfo({}, 0, False))
    taken.close()
    with pytest.raises(ConfigError, match="ADDR:PORT"):
        MetricsServer("localhost", gate, lambda: ServiceInfo({}, 0, False))


class OneOwner:
    def lookup(self, flow: Any) -> Ownership | None:
        return Ownership((Owner(77, 1001, 1001, "spray", 3),), 1001, "ESTABLISHED", Via.ESTABLISHED)

    def sockets(self) -> Sequence[GuestSocket]:
        return []

    def view(self) -> GuestView:
        return GuestView((), (), (), complete=True)

    def generation(self) -> int:
        return 1


def test_metrics_over_http_follow_the_engine(tmp_path: Path) -> None:
    src = OneOwner()
    policy = Policy().changed("block", "uid", "1001")
    e = Engine(9, {VIF: "vif9.0"}, src, policy, OwnerCache(), VerdictLog(io.StringIO()))
    dg = DomainGate(cfg(9), GateLayout(9, ("vif9.0",), 109), LockedOwnerSource(src), e)
    gate = FakeGate()
    gate.domains[9] = cast(Any, dg)
    server = MetricsServer("127.0.0.1:0", cast(Gate, gate), lambda: ServiceInfo({9: 1}, 2, False))
    try:

        def scrape() -> str:
            url = f"http://127.0.0.1:{server.port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as r:
                return str(r.read().decode())

        before = scrape()
        assert 'xfgate_decision_latency_seconds_count{domain="9"} 0.0' in before
        for sport in range(40000, 40005):
            pkt = IP(src="198.18.1.1", dst="198.18.0.1") / TCP(sport=sport, dport=2222)
            e.handle(FakePacket(bytes(pkt)))
        text = scrape()
        line = 'xfgate_decisions_total{domain="9",source="introspection",verdict="drop"} 5.0'
        assert line in text
        assert 'xfgate_decision_latency_seconds_count{domain="9"} 5.0' in text
        assert 'xfgate_decision_latency_seconds_bucket{domain="9",le="+Inf"} 5.0' in text
        assert 'xfgate_policy_rules{domain="9"} 1.0' in text
        assert "xfgate_rules_waiting 2.0" in text
        assert 'xfgate_queue_drops_total{domain="9",where="kernel"}' in text
    finally:
        server.close()


def test_sd_notify_ready_and_watchdog(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(path))
    sink.settimeout(2)
    try:
        n = Notifier(str(path), watchdog_usec=2_000_000)
        n.ready("gating 1")
        assert sink.recv(256) == b"READY=1\nSTATUS=gating 1"
        n.watchdog(healthy=True, now=100.0)
        assert sink.recv(256) == b"WATCHDOG=1"
        n.watchdog(healthy=True, now=100.5)  # not due (every 1 s)
        n.watchdog(healthy=False, now=200.0)  # a stuck gate is not vouched for
        n.watchdog(healthy=True, now=201.0)
        assert sink.recv(256) == b"WATCHDOG=1"
        assert Notifier("").notify("READY=1") is False
    finally:
        sink.close()


def test_verdict_log_rotates_by_size_and_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "v.jsonl"
    log = VerdictLog.open(str(path), max_bytes=2000, backups=2)
    for i in range(400):
        log.record({"i": i, "pad": "x" * 40}, always=True)
        if i % 10 == 9:
            log.flush()
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["v.jsonl", "v.jsonl.1", "v.jsonl.2"]
    assert all((tmp_path / f).stat().st_size <= 2000 for f in files)
    last = json.loads(path.read_text().splitlines()[-1])
    assert last["i"] == 399 and log.rotations > 2


def test_status_text_names_waiting_rules_pending_domains_and_a_rejected_file() -> None:
    from xfgate.verdict.cli import render_service

    service = {
        "service": {
            "pid": 7,
            "policy_file": "/etc/xfgate/policy.toml",
            "metrics": "127.0.0.1:9469",
            "policy_error": "/etc/xfgate/policy.toml:12: rule 3: uid must be >= 0, got -1",
            "pending": {"2": "domain 2 is not running: QEMU pid 9 is gone"},
        },
        "waiting": [
            {
                "domain": 3,
                "kind": "uid",
                "value": "1001",
                "until": "2026-11-30T05:30:00Z",
                "why": "domain 3 is not in the domain list: the rule waits for it",
            }
        ],
    }
    text = render_service(service, [])
    assert "policy file REJECTED" in text and "policy.toml:12" in text
    assert "domain 2: not gated: domain 2 is not running" in text
    assert "waiting rule domain 3 uid 1001 until 2026-11-30T05:30:00Z: domain 3 is not in" in text
