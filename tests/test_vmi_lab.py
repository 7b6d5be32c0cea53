"""Introspection of the real lab guest (QEMU TCG, Debian 6.1 kernel, KASLR on), checked against
the guest's own /proc (`xfgate-lab truth`).

The workload churns (the attacker opens and closes connections all the time), so for exact
comparisons its processes are stopped with SIGSTOP through the control channel and resumed
after. init (pid 1) cannot be stopped and the control loop must keep running; whatever they
spawn during a comparison can differ, so a comparison is retried (up to 3 times) and one must
match exactly. The truth collector's own shell (a child of the control loop) exists only while
truth runs and is left out, after checking that it is one.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_lab_prerequisites
from xfgate.config import DomainConfig
from xfgate.flow import Flow
from xfgate.inet import IPProto
from xfgate.vmi.cli import load_domain_profile
from xfgate.vmi.introspect import GuestIntrospector
from xfgate.vmi.kaslr import from_banner_scan, from_cr3, from_vmcoreinfo
from xfgate.vmi.linux import KernelLayout, WalkBounds, walk_guest
from xfgate.vmi.memory import BufferMemory, ElfDumpMemory, SharedFileMemory
from xfgate.vmi.paging import AddressSpace
from xfgate.vmi.profile import Profile
from xfgate.vmi.qmp import QmpClient, paused
from xfgate.vmi.sockets import HashLayout, SocketTables
from xfgate_lab import lab
from xfgate_lab.cli import guest_exec, guest_truth
from xfgate_lab.layout import LabLayout

pytestmark = pytest.mark.lab

PEER4 = "198.18.0.1"
PEER6 = "2001:2::1"


@pytest.fixture(scope="module")
def guest_profile(lab_domain: DomainConfig) -> Profile:
    # $XFGATE_PROFILE: a profile/ISF file instead of the one built from the domain's kernel.
    return load_domain_profile(lab_domain, os.environ.get("XFGATE_PROFILE"))


def _xfgate(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xfgate.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def cli_ps_json(
    domain: int, *extra: str, env: dict[str, str] | None = None
) -> Callable[[], dict[str, Any]]:
    """`xfgate ps --domain D --json` as a reader for `ps_against_truth`."""

    def read() -> dict[str, Any]:
        run = _xfgate("ps", "--domain", str(domain), "--json", *extra, env=env)
        assert run.returncode == 0, run.stderr
        doc: dict[str, Any] = json.loads(run.stdout)
        return doc

    return read


def _control_loop_pid(layout: LabLayout) -> int:
    return int(guest_exec(layout, 1, "echo $PPID").output.split()[0])


@contextmanager
def workload_stopped(layout: LabLayout) -> Iterator[int]:
    """SIGSTOP every user process but init and the control loop; yields the loop's pid."""
    ctl = _control_loop_pid(layout)
    truth = guest_truth(layout, 1)
    kthreads = {p.pid for p in truth.processes if p.pid == 2 or p.ppid == 2}
    pids = [
        p.pid
        for p in truth.processes
        if p.pid not in (1, ctl) and p.pid not in kthreads and p.ppid != ctl
    ]
    guest_exec(layout, 1, f"kill -STOP {' '.join(map(str, pids))}")
    try:
        time.sleep(0.3)  # let in-flight syscalls of the stopped tasks settle
        yield ctl
    finally:
        guest_exec(layout, 1, f"kill -CONT {' '.join(map(str, pids))}")


def _without_collector(truth: dict[str, Any], ps: dict[str, Any], ctl: int) -> dict[str, Any]:
    ps_pids = {p["pid"] for p in ps["processes"]}
    extra = [p for p in truth["processes"] if p["pid"] not in ps_pids]
    collector = [p for p in extra if p["ppid"] == ctl]
    keep = [p for p in truth["processes"] if p not in collector]
    return {"processes": keep, "sockets": truth["sockets"]}


def _normalise_kworkers(doc: dict[str, Any]) -> dict[str, Any]:
    """A kworker's /proc name ends in the workqueue it ran last ("kworker/0:1-events"): that
    changes between two reads by design. Compare its fixed part only. A rescuer's name
    ("kworker/R-kvfree_rcu_reclaim" on 6.12, idle while the workload is stopped) is compared
    whole: its workqueue's full name is what ps must read."""
    procs = []
    for p in doc["processes"]:
        comm = p["comm"]
        if comm.startswith("kworker/") and not comm.startswith("kworker/R-"):
            comm = comm.split("-", 1)[0].split("+", 1)[0]
        procs.append({**p, "comm": comm})
    return {"processes": procs, "sockets": doc["sockets"]}


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    out = []
    pa = {p["pid"]: p for p in a["processes"]}
    pb = {p["pid"]: p for p in b["processes"]}
    out += [f"proc {pa.get(k)} != {pb.get(k)}" for k in sorted(pa | pb) if pa.get(k) != pb.get(k)]
    sa = {(s["pid"], s["fd"]): s for s in a["sockets"]}
    sb = {(s["pid"], s["fd"]): s for s in b["sockets"]}
    out += [f"sock {sa.get(k)} != {sb.get(k)}" for k in sorted(sa | sb) if sa.get(k) != sb.get(k)]
    return out


def ps_against_truth(
    layout: LabLayout, read_ps: Callable[[], dict[str, Any]], max_collector: int | None = None
) -> tuple[list[str], dict[str, Any]]:
    """Differences between xfgate's view (`read_ps`) and the guest's own /proc, with the
    workload stopped; up to three tries (a kernel thread may come or go between the reads).
    `max_collector`: at most that many truth processes may be the collector's own."""
    diffs: list[str] = []
    ps: dict[str, Any] = {}
    with workload_stopped(layout) as ctl:
        for _ in range(3):
            ps = read_ps()
            raw = guest_truth(layout, 1).to_json()
            truth = _without_collector(raw, ps, ctl)
            if max_collector is not None:
                assert len(raw["processes"]) - len(truth["processes"]) <= max_collector
            diffs = _diff(_normalise_kworkers(ps), _normalise_kworkers(truth))
            if not diffs:
                break
    return diffs, ps


def test_ps_json_equals_lab_truth(lab_domain: DomainConfig, lab_layout: LabLayout) -> None:
    profile_args = (
        ["--profile", os.environ["XFGATE_PROFILE"]] if "XFGATE_PROFILE" in os.environ else []
    )
    read_ps = cli_ps_json(lab_domain.id, *profile_args)
    diffs, ps = ps_against_truth(lab_layout, read_ps, max_collector=3)
    assert diffs == []
    # The workload is really in there: several users and both address families.
    assert len({p["uid"] for p in ps["processes"]}) >= 3
    assert {s["family"] for s in ps["sockets"]} == {4, 6}
    assert {s["proto"] for s in ps["sockets"]} == {"tcp", "udp"}


def test_table_output_and_filters(lab_domain: DomainConfig) -> None:
    profile_args = (
        ["--profile", os.environ["XFGATE_PROFILE"]] if "XFGATE_PROFILE" in os.environ else []
    )
    run = _xfgate("ps", "--domain", str(lab_domain.id), "--uid", "0", *profile_args)
    assert run.returncode in (0, 1), run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["PID", "PPID", "UID", "COMM", "PROTO", "LOCAL", "REMOTE", "STATE"]
    assert all(line.split()[2] == "0" for line in lines[1:])
    run = _xfgate("ps", "--domain", "99", *profile_args)
    assert run.returncode == 2 and "unknown domain 99" in run.stderr


def _flow_for(sock: dict[str, Any]) -> Flow:
    proto = IPProto.TCP if sock["proto"] == "tcp" else IPProto.UDP
    local = ip_address(sock["local"])
    if sock["state"] == "LISTEN" or (proto == IPProto.UDP and sock["rport"] == 0):
        peer = PEER4 if sock["family"] == 4 else PEER6
        if local.version == 6 and local.ipv4_mapped is not None:
            peer = f"::ffff:{PEER4}"
        if local.is_unspecified:  # a packet comes to a real address of the guest
            local = ip_address("198.18.1.1" if sock["family"] == 4 else "2001:2::1:1")
        return Flow(proto, local, sock["lport"], ip_address(peer), 40999)
    return Flow(proto, local, sock["lport"], ip_address(sock["remote"]), sock["rport"])


def test_targeted_lookup_finds_every_socket_owner(
    lab_domain: DomainConfig, lab_layout: LabLayout, guest_profile: Profile
) -> None:
    with workload_stopped(lab_layout), GuestIntrospector(lab_domain, guest_profile) as guest:
        truth = guest_truth(lab_layout, 1).to_json()
        guest.walk()
        checked = 0
        for sock in truth["sockets"]:
            flow = _flow_for(sock)
            own = guest.lookup(flow)
            assert own is not None, f"no socket found for {flow} ({sock})"
            want_via = {"LISTEN": "listener"}.get(
                sock["state"], "udp" if flow.proto == IPProto.UDP else "established"
            )
            assert own.via == want_via, (flow, own)
            assert (sock["pid"], sock["fd"]) in {(o.pid, o.fd) for o in own.owners}, (flow, own)
            checked += 1
        assert checked == len(truth["sockets"]) > 0


def test_kaslr_three_ways_agree_on_the_live_guest(
    lab_domain: DomainConfig, guest_profile: Profile
) -> None:
    assert lab_domain.qmp is not None
    memory = SharedFileMemory(lab_domain.memory.path)
    with QmpClient(lab_domain.qmp.socket) as qmp:
        regs = qmp.control_registers()
    a = from_vmcoreinfo(memory, guest_profile)
    b = from_cr3(memory, guest_profile, regs)
    c = from_banner_scan(memory, guest_profile)
    assert a is not None and c is not None
    # CR3 is the current task's page table, not init_top_pgt: same kernel mapping, other root.
    assert {(x.virt_shift, x.phys_base) for x in (a, b, c)} == {(b.virt_shift, b.phys_base)}
    assert a.root == c.root
    assert a.virt_shift != 0, "KASLR is expected on (Debian default)"


def test_pause_resume_round_trip(lab_domain: DomainConfig) -> None:
    assert lab_domain.qmp is not None
    with QmpClient(lab_domain.qmp.socket) as qmp:
        with paused(qmp) as record:
            assert qmp.status() == "paused"
        assert qmp.status() == "running"
        assert record.was_running and record.seconds > 0


class RecordingMemory(BufferMemory):
    """Remembers which physical ranges a walk read: the bytes worth corrupting."""

    def __init__(self, data: bytearray) -> None:
        super().__init__(data, "recorded dump")
        self.ranges: list[tuple[int, int]] = []

    def read(self, paddr: int, length: int) -> bytes:
        self.ranges.append((paddr, length))
        return super().read(paddr, length)


@pytest.fixture(scope="module")
def guest_image(lab_domain: DomainConfig, tmp_path_factory: pytest.TempPathFactory) -> bytearray:
    """The guest's physical memory, dumped once over QMP (QEMU stops the vCPUs meanwhile)."""
    assert lab_domain.qmp is not None
    path: Path = tmp_path_factory.mktemp("dump") / "guest.elf"
    with QmpClient(lab_domain.qmp.socket) as qmp:
        qmp.dump_guest_memory(str(path))
    dump = ElfDumpMemory(path)
    ram = next(s for s in dump.segments if s.paddr == 0)  # RAM; the BIOS ROM is elsewhere
    image = bytearray(dump.read(0, ram.length))
    dump.close()
    path.unlink()
    return image


def test_walker_survives_thousands_of_corruptions_of_a_real_image(
    guest_image: bytearray, guest_profile: Profile
) -> None:
    mem = RecordingMemory(guest_image)
    loc = from_vmcoreinfo(mem, guest_profile)
    assert loc is not None
    layout = KernelLayout.from_profile(guest_profile)
    space = AddressSpace(mem, loc.root, loc.levels)
    bounds = WalkBounds(seconds=0.5, retries=1)
    mem.ranges.clear()
    clean = walk_guest(space, layout, loc.virt_shift, bounds)
    assert clean.complete and len(clean.tasks) > 20
    tables = SocketTables(space, layout, HashLayout.from_profile(guest_profile), loc.virt_shift)
    flows = [
        Flow(s.sock.proto, s.sock.local, s.sock.lport, s.sock.remote, s.sock.rport)
        for s in clean.sockets
    ]
    for f in flows:
        tables.find(f)
    targets = [r for r in mem.ranges if r[1] <= 1 << 16]
    pointers = [s.sock.address for s in clean.sockets] + [t.address for t in clean.tasks]
    rng = random.Random(int(os.environ.get("XFGATE_FUZZ_SEED", "1")))
    rounds = int(os.environ.get("XFGATE_FUZZ_ROUNDS", "3000"))
    worst = 0.0
    differed = 0
    for _ in range(rounds):
        paddr, length = rng.choice(targets)
        at = paddr + rng.randrange(max(1, length - 7))
        saved = bytes(guest_image[at : at + 8])
        kind = rng.randrange(4)
        if kind == 0:
            guest_image[at] = rng.randrange(256)
        elif kind == 1:
            struct.pack_into("<Q", guest_image, at, rng.getrandbits(64))
        elif kind == 2:  # a plausible kernel pointer to somewhere else
            struct.pack_into("<Q", guest_image, at, rng.choice(pointers) + rng.choice((0, 8, -8)))
        else:
            struct.pack_into("<Q", guest_image, at, 0)
        start = time.monotonic()
        result = walk_guest(space, layout, loc.virt_shift, bounds)  # must not raise
        tables.find(rng.choice(flows))
        worst = max(worst, time.monotonic() - start)
        differed += result.tasks != clean.tasks or result.sockets != clean.sockets
        guest_image[at : at + 8] = saved
    # Bound: one attempt of <= 0.5 s, plus a lookup; generous slack for a loaded 2-core host.
    assert worst < bounds.seconds + 1.5, worst
    assert differed > 0  # the corruptions did reach data the walker uses
    assert walk_guest(space, layout, loc.virt_shift, bounds).tasks == clean.tasks


@pytest.fixture(scope="module")
def cloud_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabLayout, DomainConfig]]:
    """A private lab running the other Debian flavour (-cloud-amd64: other struct layouts)."""
    require_lab_prerequisites()
    layout = LabLayout(f"xfwk{os.getpid() % 100000}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XFGATE_DOMAINS", str(tmp_path_factory.mktemp("cloud") / "domains.toml"))
        try:
            up = lab.lab_up(
                layout, domains=1, kernel_package="linux-image-cloud-amd64", log=lambda _m: None
            )
            yield layout, up.domains[0]
        finally:
            lab.lab_down(layout, force=True, log=lambda _m: None)


def test_second_kernel_flavour_ps_equals_truth(cloud_lab: tuple[LabLayout, DomainConfig]) -> None:
    layout, domain = cloud_lab
    assert domain.kernel.release.endswith("-cloud-amd64")
    profile = load_domain_profile(domain, None)
    with GuestIntrospector(domain, profile) as guest:
        assert guest.boot().location.virt_shift != 0
        diffs, ps = ps_against_truth(layout, guest.ps_json)
    assert diffs == []
    assert {s["family"] for s in ps["sockets"]} == {4, 6}


def test_native_ipv6_established_lookup(
    lab_domain: DomainConfig, lab_layout: LabLayout, guest_profile: Profile
) -> None:
    """Both ends of a guest-local IPv6 connection are found through inet6_ehashfn's bucket
    (with secrets read from guest memory) and attributed to the processes holding them."""
    guest_exec(lab_layout, 1, "(sleep 15 | busybox nc 2001:2::1:1 9000 >/dev/null 2>&1 &)")
    time.sleep(1)
    truth = guest_truth(lab_layout, 1).to_json()
    pairs = [
        s
        for s in truth["sockets"]
        if s["family"] == 6 and s["state"] == "ESTABLISHED" and 9000 in (s["lport"], s["rport"])
    ]
    assert len(pairs) >= 2, truth["sockets"]
    with GuestIntrospector(lab_domain, guest_profile) as guest:
        for s in pairs:
            own = guest.lookup(_flow_for(s))
            assert own is not None and own.via == "established", (s, own)
            assert (s["pid"], s["fd"]) in {(o.pid, o.fd) for o in own.owners}


@pytest.fixture(scope="module")
def k612_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabLayout, DomainConfig]]:
    """A private lab running Debian 12's other kernel series (6.12, generic flavour): hash
    secrets in net_hotdata, rescuers named kworker/R-<workqueue>."""
    require_lab_prerequisites()
    layout = LabLayout(f"xfwm{os.getpid() % 100000}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XFGATE_DOMAINS", str(tmp_path_factory.mktemp("k612") / "domains.toml"))
        try:
            up = lab.lab_up(
                layout, domains=1, kernel_package="linux-image-6.12-amd64", log=lambda _m: None
            )
            yield layout, up.domains[0]
        finally:
            lab.lab_down(layout, force=True, log=lambda _m: None)


def test_6_12_series_ps_equals_truth_and_lookups_work(
    k612_lab: tuple[LabLayout, DomainConfig],
) -> None:
    layout, domain = k612_lab
    assert domain.kernel.release.startswith("6.12.")
    guest_exec(layout, 1, "(sleep 30 | busybox nc 2001:2::1:1 9000 >/dev/null 2>&1 &)")
    guest_exec(layout, 1, "(sleep 30 | busybox nc 198.18.1.1 8080 >/dev/null 2>&1 &)")
    time.sleep(1)
    profile = load_domain_profile(domain, None)
    with GuestIntrospector(domain, profile) as guest:
        assert guest.degraded() == ""  # every secret and table found (net_hotdata on 6.12)
        assert guest.boot().location.virt_shift != 0
        diffs, ps = ps_against_truth(layout, guest.ps_json)
        assert diffs == []
        rescuers = [p["comm"] for p in ps["processes"] if p["comm"].startswith("kworker/R-")]
        assert any(len(r) > 15 for r in rescuers), rescuers  # longer than task->comm
        with workload_stopped(layout):
            truth = guest_truth(layout, 1).to_json()
            guest.walk()
            vias = set()
            for sock in truth["sockets"]:
                own = guest.lookup(_flow_for(sock))
                assert own is not None, sock
                assert (sock["pid"], sock["fd"]) in {(o.pid, o.fd) for o in own.owners}, own
                vias.add((sock["family"], own.via))
    # Incoming connections find their listener; both families' established socks are found
    # through the ehash buckets (the secrets read from net_hotdata).
    assert {(4, "listener"), (4, "established"), (6, "established")} <= vias, vias
