"""The real lab: QEMU guest(s), bridge and namespaces, workload, ground truth, up/down.

Uses the shared lab (``lab_domain``) for read-only checks; anything that tears a lab down or
boots another kernel runs in a private lab (its own prefix and domains file), so parallel
sessions that share the default lab are not disturbed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ClientNetns, require_lab_prerequisites
from xfgate.config import DomainConfig, load_domains
from xfgate_lab import lab
from xfgate_lab.assets import assets_dir, resolve_kernel_package
from xfgate_lab.cli import guest_exec, guest_truth
from xfgate_lab.errors import LabError
from xfgate_lab.layout import LabLayout, domains_file_from_env, guest_v4, guest_v6
from xfgate_lab.namespaces import netns_exists
from xfgate_lab.qemu import is_our_qemu
from xfgate_lab.truth import Truth

pytestmark = pytest.mark.lab

# (comm, uid, proto, family, local, lport, state) the workload must show; "*" = any local port.
WORKLOAD = [
    ("httpd", 0, "tcp", 4, "0.0.0.0", 80, "LISTEN"),
    ("httpd", 1000, "tcp", 4, "0.0.0.0", 8080, "LISTEN"),
    ("fastweb", 1000, "tcp", 4, "0.0.0.0", 8000, "LISTEN"),
    ("spray", 1001, "udp", 4, "0.0.0.0", "*", "CLOSE"),
    ("httpd", 1002, "tcp", 6, "{v6}", 9000, "LISTEN"),
    ("keeper", 1002, "tcp", 4, "{v4}", "*", "ESTABLISHED"),
]


def ip_out(netns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "-n", netns, *args], capture_output=True, text=True, check=True, timeout=20
    ).stdout


def check_workload(truth: Truth, domain: int) -> None:
    procs = {p.pid: p for p in truth.processes}
    for comm, uid, proto, family, local, lport, state in WORKLOAD:
        want_local = local.format(v4=guest_v4(domain), v6=guest_v6(domain))
        matches = [
            s
            for s in truth.sockets
            if s.pid in procs
            and procs[s.pid].comm == comm
            and procs[s.pid].uid == uid
            and (s.proto, s.family, s.local, s.state) == (proto, family, want_local, state)
            and lport in ("*", s.lport)
        ]
        assert matches, f"no {comm} uid {uid} {proto}{family} {want_local}:{lport} {state}"
    keeper = next(s for s in truth.sockets if procs[s.pid].comm == "keeper")
    assert (keeper.remote, keeper.rport) == ("198.18.0.1", 7000)
    assert all(p.pid == p.tgid and p.pid > 0 for p in truth.processes)
    assert procs[1].comm == "init" and procs[2].comm == "kthreadd"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# ---- the shared lab --------------------------------------------------------------------------


def test_up_records_domain_1(lab_domain: DomainConfig, lab_layout: LabLayout) -> None:
    dom = lab_domain
    assert (dom.id, dom.name, dom.vifs) == (1, "guest1", ("vif1.0",))
    assert dom.netns == lab_layout.dom0_netns  # "xfgate-dom0" unless $XFGATE_LAB_PREFIX
    assert dom.addresses == ("198.18.1.1", "2001:2::1:1")
    assert dom.memory.backend == "qemu-shm"
    ram = Path(dom.memory.path)
    assert ram == lab_layout.ram_path(1) and ram.stat().st_size == 256 * 1024 * 1024
    assert dom.qmp is not None and Path(dom.qmp.socket).is_socket()
    assert is_our_qemu(dom.qmp.pid, ram)
    assets = Path(dom.kernel.assets)
    assert assets == assets_dir(dom.kernel.package)
    for name in ("vmlinuz", "config", "System.map", "initramfs.cpio.gz"):
        assert (assets / name).exists(), name
    assert load_domains(domains_file_from_env())[1] == dom


def test_network_shape(lab_domain: DomainConfig, lab_layout: LabLayout) -> None:
    dom0, client = lab_layout.dom0_netns, lab_layout.client_netns
    assert "master xenbr0" in ip_out(dom0, "-o", "link", "show", "dev", "vif1.0")
    assert ip_out(dom0, "-d", "-o", "link", "show", "dev", "xenbr0").count("stp_state 0") == 1
    for ns in (dom0, client):
        assert ip_out(ns, "route", "show", "default") == ""
        assert ip_out(ns, "-6", "route", "show", "default") == ""
    routes = ip_out(client, "route", "show")
    assert routes.split()[0] == "198.18.0.0/16" and len(routes.strip().splitlines()) == 1
    for key in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables"):
        r = subprocess.run(
            ["ip", "netns", "exec", dom0, "cat", f"/proc/sys/net/bridge/{key}"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        assert r.stdout.strip() == "1", key


@pytest.mark.parametrize(
    ("host", "port", "body"),
    [
        ("198.18.1.1", 80, "xfgate guest 1"),
        ("198.18.1.1", 8080, "xfgate guest 1"),
        ("198.18.1.1", 8000, "xfgate fastweb"),
        ("2001:2::1:1", 9000, "xfgate guest 1"),
    ],
)
def test_service_reachable_from_client(
    client: ClientNetns, host: str, port: int, body: str
) -> None:
    got = client.http_get(host, port)
    assert got is not None and body in got


def test_ipv4_only_and_ipv6_only_services(client: ClientNetns) -> None:
    assert client.http_get("2001:2::1:1", 80, timeout=2) is None  # 80 binds 0.0.0.0 only
    assert client.http_get("198.18.1.1", 9000, timeout=2) is None  # 9000 is IPv6 only


def test_attacker_and_keeper_traffic_reaches_peers(
    lab_domain: DomainConfig, lab_layout: LabLayout
) -> None:
    before = lab.read_peer_stats(lab_layout)
    assert before, "peers wrote no stats"

    def grew() -> bool:
        now = lab.read_peer_stats(lab_layout)
        return bool(
            now["tcp2222_accepted"] >= before["tcp2222_accepted"] + 3
            and now["udp5353_datagrams"] >= before["udp5353_datagrams"] + 3
        )

    wait_for(grew, 20, "spray's TCP connections and UDP datagrams at the client")
    stats = lab.read_peer_stats(lab_layout)
    assert stats["tcp7000_open"] >= 1 and stats["tcp7000_last_peer"].endswith("198.18.1.1")


def test_truth_lists_workload(lab_domain: DomainConfig, lab_layout: LabLayout) -> None:
    check_workload(guest_truth(lab_layout, 1), 1)


def test_truth_cli_json(lab_domain: DomainConfig) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "xfgate_lab.cli", "truth", "--domain", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data = json.loads(r.stdout)
    assert set(data) == {"processes", "sockets"}
    comms = {(p["comm"], p["uid"]) for p in data["processes"]}
    assert {("spray", 1001), ("keeper", 1002), ("fastweb", 1000), ("httpd", 0)} <= comms


def test_exec_output_exit_code_and_concurrency(
    lab_domain: DomainConfig, lab_layout: LabLayout
) -> None:
    r = guest_exec(lab_layout, 1, "echo out; echo err >&2; id -u mallory; exit 7")
    assert r.returncode == 7 and r.output.decode().split() == ["out", "err", "1001"]
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "xfgate_lab.cli",
            "exec",
            "--domain",
            "1",
            "--",
            "cat",
            "/etc/hostname",
            "/proc/sys/kernel/hostname",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert cli.returncode == 1 and "guest1" in cli.stdout  # /etc/hostname does not exist
    # Several callers at once are serialized, each gets its own answer.
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "xfgate_lab.cli", "exec", "--", f"echo caller{i}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert outs == [f"caller{i}" for i in range(4)]


def test_exec_timeout_kills_guest_command(lab_domain: DomainConfig, lab_layout: LabLayout) -> None:
    r = guest_exec(lab_layout, 1, "sleep 30", timeout=2)
    assert r.returncode != 0
    assert guest_exec(lab_layout, 1, "echo alive").output == b"alive\n"


def test_up_again_is_a_no_op(lab_domain: DomainConfig, lab_layout: LabLayout) -> None:
    result = lab.lab_up(lab_layout, domains=1, log=lambda _m: None)
    assert result.already_up and result.domains[0].qmp == lab_domain.qmp
    assert lab.lab_status(lab_layout)["status"] == "up"


# ---- private labs ----------------------------------------------------------------------------


@pytest.fixture
def private_lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LabLayout]:
    require_lab_prerequisites()
    layout = LabLayout(f"xfgt{os.getpid() % 100000}")
    monkeypatch.setenv("XFGATE_DOMAINS", str(tmp_path / "domains.toml"))
    try:
        yield layout
    finally:
        lab.lab_down(layout, force=True, log=lambda _m: None)


def assert_nothing_left(layout: LabLayout, pids: list[int], domains_file: Path) -> None:
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or not is_our_qemu(pid, layout.ram_path(1))
    assert not netns_exists(layout.dom0_netns) and not netns_exists(layout.client_netns)
    assert list(Path("/dev/shm").glob(f"{layout.prefix}-guest*.mem")) == []
    assert not layout.run_dir.exists()
    # No lock file or anything else of this lab's beside the run dir (/run/xfgate/lab-P*).
    assert list(layout.run_root.glob(f"{layout.run_dir.name}*")) == []
    assert load_domains(domains_file) == {}
    assert lab.find_lab_peers(layout) == [] and lab.find_lab_qemus(layout) == {}


def test_cloud_kernel_two_domains_repair_and_down(private_lab: LabLayout) -> None:
    layout = private_lab
    domains_file = Path(os.environ["XFGATE_DOMAINS"])
    up = lab.lab_up(layout, domains=2, kernel_package="linux-image-cloud-amd64")
    assert not up.already_up and [d.id for d in up.domains] == [1, 2]
    release = up.state.kernel_release
    assert release.endswith("-cloud-amd64")
    assert up.state.timings["qemu_to_ready_s"] < 60
    assert sorted(load_domains(domains_file)) == [1, 2]
    assert load_domains(domains_file)[2].vifs == ("vif2.0",)
    for d in (1, 2):
        assert guest_exec(layout, d, "uname -r").output.decode().strip() == release
        check_workload(guest_truth(layout, d), d)
        assert lab.client_http_get(layout, str(guest_v4(d)), 8000) is not None

    # A workload process gone is noticed too (over the control channel, not the network).
    assert lab.health_problems(layout, up.state, 2, up.state.kernel_package) == []
    guest_exec(layout, 1, "kill -9 $(pidof keeper)")
    problems = lab.health_problems(layout, up.state, 2, None)
    assert problems == ["guest1's workload lacks 1 keeper"]

    # Half-broken: guest 2's qemu dies. `up` notices, rebuilds, and says so.
    dead = up.state.qemu_pid(2)
    os.kill(dead, 9)
    wait_for(lambda: not is_our_qemu(dead, layout.ram_path(2)), 10, "qemu to die")
    assert lab.lab_status(layout)["status"] == "broken"
    # Its RAM file is still there, but nothing may read it as a live guest.
    for command in (["ps", "--domain", "2"], ["run", "--domain", "2", "--block-uid", "0"]):
        ps = subprocess.run(
            [sys.executable, "-m", "xfgate.cli", *command],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert ps.returncode == 2 and "domain 2 is not running" in ps.stderr, ps.stderr
    messages: list[str] = []
    again = lab.lab_up(
        layout, domains=2, kernel_package="linux-image-cloud-amd64", log=messages.append
    )
    assert not again.already_up and any("not fully up" in m for m in messages)
    assert lab.client_http_get(layout, str(guest_v4(2)), 80) is not None
    pids = [*again.state.qemu_pids.values(), again.state.peers_pid]

    removed = lab.lab_down(layout)
    assert any(r.startswith("qemu pid") for r in removed)
    assert_nothing_left(layout, pids, domains_file)
    assert lab.lab_down(layout) == []  # idempotent


@pytest.mark.netns
def test_up_refuses_a_namespace_it_did_not_create(private_lab: LabLayout) -> None:
    subprocess.run(["ip", "netns", "add", private_lab.dom0_netns], check=True, timeout=10)
    with pytest.raises(LabError, match="no lab state"):
        lab.lab_up(private_lab, log=lambda _m: None)
    with pytest.raises(LabError, match="down --force"):
        lab.lab_down(private_lab)
    assert netns_exists(private_lab.dom0_netns)  # refused: untouched
    assert lab.lab_status(private_lab)["status"] == "foreign"


def test_nonexistent_kernel_package_is_a_clear_error() -> None:
    require_lab_prerequisites()
    with pytest.raises(LabError, match="no Debian package named 'linux-image-nosuch-amd64'"):
        resolve_kernel_package("linux-image-nosuch-amd64", log=lambda _m: None)
