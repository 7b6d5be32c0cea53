"""Policy rules that name a domain by name or UUID (stable across a libvirt domain's restarts,
when its runtime id changes), and a libvirt domain that goes away: released, said in status.
The gate is test_service.py's fake; the real thing is in test_libvirt_lab.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from tests.test_service import T0, FakeGate, Rig, cfg
from xfgate.config import DomainConfig, LibvirtConfig, MemoryConfig
from xfgate.errors import ConfigError
from xfgate.service.policyfile import parse_policy, render_policy
from xfgate.service.serve import domain_keys
from xfgate.verdict.cli import _status_named, render_service, service_domain

U = "0E993895-844D-5309-8397-81D3C1864020"


def virt(runtime_id: int, name: str = "web", uuid: str = U, pid: int = 4242) -> DomainConfig:
    return DomainConfig(
        runtime_id,
        name,
        (f"vnet{runtime_id}",),
        MemoryConfig("qemu-process", ""),
        netns="ns",
        libvirt=LibvirtConfig("qemu:///x", uuid, name, pid),
    )


def test_domain_may_be_an_id_a_name_or_a_uuid() -> None:
    text = f"""
[[rule]]
domain = "web"
uid = 1001

[[rule]]
domain = "{U}"
port = "tcp/23"

[[rule]]
domain = 3
uid = 5
"""
    p = parse_policy(text, "p.toml")
    assert {r.domain for r in p.rules} == {"web", U.lower(), 3}  # UUIDs in lower case
    assert parse_policy(render_policy(p)) == p  # ids and names sort and render together
    assert p.policy_for(domain_keys(virt(9)), T0).block_uids == {1001}
    assert len(p.policy_for(domain_keys(virt(9)), T0).block_ports) == 1
    assert p.policy_for(domain_keys(virt(3, "other", "1" * 8 + U[8:])), T0).block_uids == {5}
    for bad, why in (
        ('domain = "7"', "as an integer"),
        ('domain = ""', "printable"),
        ("domain = true", "an integer id, or a name"),
        ("domain = -1", ">= 0"),
        ("domain = 1.5", "an integer id, or a name"),
    ):
        with pytest.raises(ConfigError, match=why):
            parse_policy(f"[[rule]]\n{bad}\nuid = 1\n", "p.toml")


def test_a_rule_by_name_waits_then_follows_the_domain_across_restarts(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    gone: dict[int, bool] = {}
    rig.service._gone = lambda c: gone.get(c.id, False)
    rig.service.start()
    reply = rig.block("web", "uid", "1001")  # type: ignore[arg-type]
    assert reply["rule"]["domain"] == "web" and reply["gated"] == []
    assert "web is not in the domain list" in reply["waiting"]
    rig.listed = [cfg(1), virt(5)]  # libvirt starts it: runtime id 5
    rig.service.tick()
    assert rig.policy(5).block_uids == {1001} and rig.policy(1).block_uids == frozenset()
    st = rig.service.status()
    assert st["waiting"] == [] and st["domains"][1]["uuid"] == U.lower()
    # Destroyed: it leaves the list and its QEMU is gone: let go, its kernel rules released.
    gone[5] = True
    rig.listed = [cfg(1)]
    rig.service.tick()
    assert set(rig.gate.domains) == {1} and rig.gate.released == [5]
    let_go = rig.service.status()["service"]["let_go"]["5"]
    assert (
        let_go["name"] == "web" and let_go["released"] and "left the domain list" in (let_go["why"])
    )
    assert [w["domain"] for w in rig.service.status()["waiting"]] == ["web"]
    # Started again: a new runtime id, the same rule.
    rig.listed = [cfg(1), virt(6, pid=4343)]
    rig.service.tick()
    assert rig.policy(6).block_uids == {1001}
    assert rig.service.status()["service"]["let_go"] == {"5": let_go}
    # A domains-file domain that leaves the list keeps its kernel rules (its id comes back).
    gone[1] = True  # even if asked: only what is not listed and gone is released
    rig.listed = [virt(6, pid=4343)]
    rig.service._gone = lambda c: c.libvirt is not None and gone.get(c.id, False)
    rig.service.tick()
    assert rig.gate.removed[-1] == 1 and rig.gate.released == [5]


def test_block_by_runtime_id_is_written_by_uuid_and_unblock_finds_it_by_name(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path)
    rig.listed = [cfg(1), virt(5)]
    rig.service.start()
    reply = rig.block(5, "uid", "1002")
    assert reply["rule"]["domain"] == U.lower() and reply["gated"] == [5]
    assert rig.block(1, "uid", "7")["rule"]["domain"] == 1  # a file's id stays an id
    assert rig.policy(5).block_uids == {1002}
    reply = rig.service.handle({"op": "unblock", "domain": "web", "kind": "uid", "value": "1002"})
    assert rig.policy(5).block_uids == frozenset() and reply["rule"]["domain"] == U.lower()
    with pytest.raises(ConfigError, match="no rule blocks uid 1002 in domain web"):
        rig.service.handle({"op": "unblock", "domain": "web", "kind": "uid", "value": "1002"})
    assert isinstance(rig.gate, FakeGate)


def test_the_cli_sends_names_to_the_service_and_status_filters_by_them(tmp_path: Path) -> None:
    domains_file = tmp_path / "domains.toml"
    domains_file.write_text(
        '[[domain]]\nid = 3\nname = "filed"\nvifs = ["vif3.0"]\n'
        '[domain.memory]\nbackend = "raw"\npath = "/m3"\n'
    )

    def spec(s: str) -> int | str:
        return service_domain(argparse.Namespace(domain=s, domains_file=domains_file))

    assert (spec("7"), spec("filed"), spec("guest2"), spec(U)) == (7, 3, "guest2", U)
    status: dict[str, Any] = {"domain": 5, "name": "web", "uuid": U.lower()}
    assert all(_status_named(status, s) for s in (None, "5", "web", U))
    assert not any(_status_named(status, s) for s in ("6", "we", "", "1" * 8 + U[8:]))
    service = {
        "service": {
            "pid": 9,
            "policy_file": "p",
            "let_go": {"5": {"name": "web", "why": "it left the domain list", "released": True}},
        },
        "waiting": [],
    }
    text = render_service(service, [])
    assert "domain 5 (web): let go: it left the domain list; kernel rules released" in text
    json.dumps(service)
