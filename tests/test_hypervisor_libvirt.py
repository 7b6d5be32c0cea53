"""libvirt discovery, monitor and the --domain resolver, on fakes (the real libvirt is in
tests/test_libvirt_lab.py)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.libvirt_fakes import (
    VIR_ERR_OPERATION_INVALID,
    VIR_ERR_OPERATION_TIMEOUT,
    FakeDomain,
    FakeLibvirtError,
    fake_api,
    live_xml,
)
from xfgate.cli import main
from xfgate.config import DomainConfig, LibvirtConfig, MemoryConfig, QmpConfig, save_domains
from xfgate.errors import (
    ConfigError,
    DomainNotFound,
    GuestNotRunning,
    PrerequisiteError,
    QmpError,
)
from xfgate.hypervisor import libvirt as lv
from xfgate.hypervisor.libvirt_xml import KernelMetadata, metadata_xml, parse_domain_xml
from xfgate.hypervisor.resolve import resolve_domain, resolve_id, visible_domains

U1 = "6f1c0c2e-8f51-4d33-9a52-0c5d0c6b1a01"
U2 = "6f1c0c2e-8f51-4d33-9a52-0c5d0c6b1a02"


def host_factory(
    domains: list[FakeDomain], pid: int = 4242, netns: str = "lab-dom0", refuse: str = ""
) -> Callable[[str], lv.LibvirtHost]:
    def open_host(uri: str) -> lv.LibvirtHost:
        return lv.LibvirtHost(uri, fake_api(domains, refuse), lambda u, n: pid, lambda p: netns)

    return open_host


def never(uri: str) -> lv.LibvirtHost:
    raise AssertionError("libvirt must not be asked when the domains file answers")


# ---- the live XML --------------------------------------------------------------------------------


def test_live_xml_gives_taps_uuid_id_memory_and_metadata() -> None:
    x = parse_domain_xml(live_xml("web", U1.upper(), 7, ("vnet3", "tap101i1")))
    assert (x.name, x.uuid, x.runtime_id) == ("web", U1, 7)
    assert x.taps == ("vnet3", "tap101i1")
    assert x.interfaces[0].mac == "52:54:00:aa:00:00" and x.interfaces[0].bridge == "br0"
    assert x.memory_kib == 262144
    assert x.kernel.package == "linux-image-6.1.0-57-amd64" and x.addresses == ("198.18.1.1",)


def test_shut_off_xml_has_no_id_and_no_tap() -> None:
    text = f"<domain type='kvm'><name>a</name><uuid>{U1}</uuid><devices>"
    text += "<interface type='network'><source network='default'/></interface></devices></domain>"
    x = parse_domain_xml(text)
    assert x.runtime_id == -1 and x.taps == () and len(x.interfaces) == 1
    assert x.kernel == KernelMetadata() and x.memory_kib == 0


@pytest.mark.parametrize(
    "text", ["<domain><name>a</name>", "<network><name>a</name></network>", "<domain/>"]
)
def test_bad_xml_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_domain_xml(text)


def test_metadata_round_trips_through_a_domain() -> None:
    meta = metadata_xml(KernelMetadata("pkg", "rel", "/a"), ("198.18.1.2", "2001:2::1:2"))
    x = parse_domain_xml(
        f"<domain><name>a</name><uuid>{U1}</uuid><metadata>{meta}</metadata></domain>"
    )
    assert x.kernel == KernelMetadata("pkg", "rel", "/a")
    assert x.addresses == ("198.18.1.2", "2001:2::1:2")


# ---- the QEMU process and its netns --------------------------------------------------------------


def _proc(tmp: Path, pid: int, argv: list[str]) -> None:
    (tmp / str(pid)).mkdir(parents=True, exist_ok=True)
    (tmp / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def test_qemu_pid_from_pid_file_checked_and_by_scan(tmp_path: Path) -> None:
    proc, run = tmp_path / "proc", tmp_path / "run"
    run.mkdir()
    qemu = ["/usr/bin/qemu-system-x86_64", "-name", "guest=web", "-uuid", U1]
    _proc(proc, 10, ["/bin/sleep", "-uuid", U1])  # not a qemu
    _proc(proc, 11, [*qemu[:-1], U2])  # another domain's qemu
    _proc(proc, 12, qemu)
    (run / "web.pid").write_text("12\n")
    assert lv.find_qemu_pid(U1, "web", (run,), proc) == 12
    (run / "web.pid").write_text("11\n")  # stale pid file naming another QEMU: scan instead
    assert lv.find_qemu_pid(U1, "web", (run,), proc) == 12
    assert lv.find_qemu_pid(U1.upper(), "web", (), proc) == 12
    assert lv.find_qemu_pid("00000000-0000-0000-0000-000000000000", "x", (run,), proc) == 0


def test_netns_by_inode(tmp_path: Path) -> None:
    proc, netns = tmp_path / "proc", tmp_path / "netns"
    (proc / "5" / "ns").mkdir(parents=True)
    (proc / "self" / "ns").mkdir(parents=True)
    netns.mkdir()
    (proc / "5" / "ns" / "net").write_text("x")
    (proc / "self" / "ns" / "net").write_text("y")
    os.link(proc / "5" / "ns" / "net", netns / "lab-dom0")
    assert lv.netns_of(5, netns, proc) == "lab-dom0"
    # A caller that entered that namespace (the service, to reach the bridge) still gets its
    # name: the domain's configuration must not look changed to the next discovery.
    (proc / "self" / "ns" / "net").unlink()
    os.link(proc / "5" / "ns" / "net", proc / "self" / "ns" / "net")
    assert lv.netns_of(5, netns, proc) == "lab-dom0"
    (proc / "self" / "ns" / "net").unlink()
    (proc / "self" / "ns" / "net").write_text("y")
    os.link(proc / "self" / "ns" / "net", proc / "6")
    (netns / "lab-dom0").unlink()
    with pytest.raises(ConfigError, match="ip netns attach"):
        lv.netns_of(5, netns, proc)
    with pytest.raises(GuestNotRunning):
        lv.netns_of(99, netns, proc)


def test_own_netns_is_the_empty_name() -> None:
    assert lv.netns_of(os.getpid()) == ""


# ---- domain configs ------------------------------------------------------------------------------


def test_domain_config_of_a_running_domain() -> None:
    with host_factory([FakeDomain("web", U1, 7, taps=("vnet3",))])("qemu:///x") as host:
        cfg = host.domain_config(host.lookup("web"))
    assert cfg.id == 7 and cfg.vifs == ("vnet3",) and cfg.netns == "lab-dom0"
    assert cfg.memory.backend == "qemu-process" and cfg.qmp is None
    assert cfg.libvirt == LibvirtConfig("qemu:///x", U1, "web", 4242)
    assert cfg.kernel.package == "linux-image-6.1.0-57-amd64"


def test_shut_off_domain_and_vanished_qemu_are_not_running() -> None:
    cases: list[tuple[FakeDomain, int, type[Exception], str]] = [
        (FakeDomain("off", U1, state=5), 4242, GuestNotRunning, r"shutoff.*virsh start off"),
        (FakeDomain("web", U1), 0, GuestNotRunning, "no QEMU"),
        (FakeDomain("web", U1, taps=()), 4242, ConfigError, "nothing to gate"),
    ]
    for dom, pid, error, match in cases:
        with host_factory([dom], pid=pid)("u") as host, pytest.raises(error, match=match):
            host.domain_config(host.lookup(dom.name))


def test_lookup_by_uuid_name_and_id() -> None:
    doms = [FakeDomain("web", U1, 3), FakeDomain("db", U2, 4)]
    with host_factory(doms)("u") as host:
        names = [getattr(host.lookup(spec), "name", None) for spec in (U2.upper(), "web", "4")]
        assert names == ["db", "web", "db"]
        assert host.lookup("nosuch") is None


def test_libvirt_not_running_or_not_installed_is_a_sentence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(PrerequisiteError, match=r"qemu:///system.*daemon"):
        host_factory([], refuse="Failed to connect socket")("qemu:///system")
    monkeypatch.setitem(sys.modules, "libvirt", None)
    with pytest.raises(PrerequisiteError, match="python3-libvirt"):
        lv.load_api()


# ---- the monitor ---------------------------------------------------------------------------------


def monitor(dom: FakeDomain) -> lv.LibvirtMonitor:
    return lv.LibvirtMonitor("u", dom.uuid, fake_api([dom]))


def test_monitor_passes_qmp_and_hmp_through_and_pauses_through_the_api() -> None:
    dom = FakeDomain("web", U1, replies={"query-status": {"return": {"status": "running"}}})
    with monitor(dom) as m:
        assert m.execute("query-status") == {"status": "running"}
        assert m.is_running() and m.status() == "running"
        m.stop()
        assert m.status() == "paused" and not m.is_running()
        m.cont()
        dom.state = 2  # VIR_DOMAIN_BLOCKED: running, vCPUs waiting on a resource
        assert m.is_running() and m.status() == "blocked"
        assert m.control_registers().cr3 == 0x2BD8000
        assert "CR4=000006f0" in m.human("info registers")
    assert "suspend" in dom.calls and "resume" in dom.calls
    assert not any(c.startswith("qmp") and '"stop"' in c for c in dom.calls)
    assert dom.calls[0] == 'qmp {"execute": "query-status"}'


def test_monitor_errors() -> None:
    dom = FakeDomain("web", U1)
    with monitor(dom) as m:
        with pytest.raises(QmpError, match="refused: no nosuch"):
            m.execute("nosuch")
        dom.monitor_error = FakeLibvirtError(
            "Timed out during operation: cannot acquire state change lock",
            VIR_ERR_OPERATION_TIMEOUT,
        )
        with pytest.raises(QmpError, match="busy"):
            m.human("info registers")
        dom.monitor_error = FakeLibvirtError("domain is not running", VIR_ERR_OPERATION_INVALID)
        with pytest.raises(GuestNotRunning):
            m.execute("query-status")
    with pytest.raises(GuestNotRunning, match="no domain with this UUID"):
        lv.LibvirtMonitor("u", U2, fake_api([dom]))


# ---- the resolver --------------------------------------------------------------------------------


def file_domain(i: int, name: str, uuid: str = "") -> DomainConfig:
    return DomainConfig(
        id=i,
        name=name,
        vifs=(f"vif{i}.0",),
        memory=MemoryConfig("qemu-shm", f"/dev/shm/x-guest{i}.mem"),
        qmp=QmpConfig("/run/q.sock", 0),
        libvirt=LibvirtConfig("qemu:///system", uuid, name) if uuid else None,
    )


@pytest.fixture
def domains_file(tmp_path: Path) -> Path:
    path = tmp_path / "domains.toml"
    save_domains({1: file_domain(1, "guest1"), 2: file_domain(2, "mail", U2)}, path)
    return path


def test_the_file_answers_ids_names_and_uuids_without_libvirt(domains_file: Path) -> None:
    assert resolve_domain("1", domains_file, "qemu:///system", never).name == "guest1"
    assert resolve_domain(1, domains_file, "qemu:///system", never).name == "guest1"
    assert resolve_domain("mail", domains_file, "qemu:///system", never).id == 2
    assert resolve_domain(U2.upper(), domains_file, "qemu:///system", never).id == 2
    assert resolve_id("2", domains_file, "qemu:///system") == 2


def test_libvirt_answers_what_the_file_does_not(domains_file: Path) -> None:
    open_host = host_factory([FakeDomain("web", U1, 7)])
    assert resolve_domain("web", domains_file, "u", open_host).id == 7
    assert resolve_domain(U1, domains_file, "u", open_host).vifs == ("vnet0",)
    assert resolve_domain("7", domains_file, "u", open_host).name == "web"


def test_unknown_and_unreachable(domains_file: Path) -> None:
    with pytest.raises(DomainNotFound, match=r"known domains: 1, 2\)$"):
        resolve_domain("web", domains_file, "none", never)
    with pytest.raises(DomainNotFound, match="libvirt at u has no such name"):
        resolve_domain("web", domains_file, "u", host_factory([]))
    with pytest.raises(DomainNotFound, match="libvirt: libvirt at u does not answer"):
        resolve_domain("web", domains_file, "u", host_factory([], refuse="no socket"))
    with pytest.raises(ConfigError):
        resolve_domain(" ", domains_file, "u", never)


def test_a_libvirt_id_taken_by_the_file_is_refused(domains_file: Path) -> None:
    # Two gated domains with one id would share chains and control sockets.
    with pytest.raises(ConfigError, match=r"id 2.*mail"):
        resolve_domain("web", domains_file, "u", host_factory([FakeDomain("web", U1, 2)]))


def test_two_file_domains_with_one_name_are_ambiguous(tmp_path: Path) -> None:
    path = tmp_path / "d.toml"
    save_domains({1: file_domain(1, "x"), 2: file_domain(2, "x")}, path)
    with pytest.raises(ConfigError, match="several"):
        resolve_domain("x", path, "none", never)


def test_visible_domains_lists_both_sources(domains_file: Path) -> None:
    doms = [FakeDomain("web", U1, 7), FakeDomain("off", U2.replace("2", "3"), state=5)]
    found, notes = visible_domains(domains_file, "u", host_factory(doms))
    assert [(d.source, d.name, d.state, d.pid) for d in found] == [
        ("file", "guest1", "unknown", 0),
        ("file", "mail", "unknown", 0),
        ("libvirt", "web", "running", 4242),
        ("libvirt", "off", "shutoff", 0),
    ]
    assert found[2].vifs == ("vnet0",) and found[2].netns == "lab-dom0" and notes == []
    found, notes = visible_domains(domains_file, "u", host_factory([], refuse="no socket"))
    assert len(found) == 2 and "libvirt not looked at" in notes[0]


def test_cli_domains_and_unknown_domain(
    domains_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--domains-file", str(domains_file), "--libvirt-uri", "none"]
    assert main([*base, "domains", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(d["id"], d["source"], d["vifs"]) for d in doc] == [
        (1, "file", ["vif1.0"]),
        (2, "file", ["vif2.0"]),
    ]
    assert main([*base, "domains"]) == 0
    assert "guest1" in capsys.readouterr().out
    assert main([*base, "ps", "--domain", "nosuch"]) == 2
    assert "unknown domain nosuch" in capsys.readouterr().err


def test_libvirt_uri_option_defaults_to_the_environment_then_system() -> None:
    from xfgate.cli import build_parser

    assert build_parser({}).parse_args(["domains"]).libvirt_uri == "qemu:///system"
    env = {"XFGATE_LIBVIRT_URI": "qemu:///session"}
    assert build_parser(env).parse_args(["domains"]).libvirt_uri == "qemu:///session"
    args = build_parser(env).parse_args(["--libvirt-uri", "none", "status", "--domain", "web"])
    assert args.libvirt_uri == "none" and args.domain == "web"


def test_gate_options_take_a_name_from_the_file(domains_file: Path) -> None:
    from xfgate.cli import build_parser
    from xfgate.verdict.cli import gate_options

    argv = ["--domains-file", str(domains_file), "--libvirt-uri", "none", "run"]
    opts = gate_options(build_parser({}).parse_args([*argv, "--domain", "mail", "--domain", "1"]))
    assert opts.domains == (2, 1) and opts.libvirt_uri == "none"


def test_monitor_has_the_monitor_contract() -> None:
    """xfgate/vmi/monitor.py's Monitor (the qemu-process branch): checked by name here, by
    the Protocol once both branches are in."""
    contract = ["execute", "human", "stop", "cont", "status", "is_running"]
    contract += ["control_registers", "close", "__enter__", "__exit__"]
    assert [n for n in contract if not callable(getattr(lv.LibvirtMonitor, n, None))] == []
