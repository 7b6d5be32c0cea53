"""Attribution that cannot be dodged, on the real lab guest (issue 9): sockets of every protocol,
every thread's file table, the fd bomb, exe paths and ancestors. Probes run as mallory (uid
1001): busybox where it can (ping), else the red team's probe program built into the lab guest
(`xfprobe hold-*`, xfgate_lab/guest/xfprobe.c): one program for the red team and these tests."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from ipaddress import ip_address

import pytest

from xfgate.config import DomainConfig
from xfgate.flow import Flow
from xfgate.inet import IPProto
from xfgate.vmi.cli import load_domain_profile
from xfgate.vmi.introspect import GuestIntrospector
from xfgate.vmi.kernel_constants import IPPROTO_MPTCP, SockType
from xfgate.vmi.linux import WalkResult
from xfgate.vmi.profile import Profile
from xfgate_lab.cli import guest_exec
from xfgate_lab.layout import LabLayout
from xfgate_lab.redteam import PROBE

pytestmark = pytest.mark.lab

CLIENT = "198.18.0.1"
GUEST4 = "198.18.1.1"


@pytest.fixture(scope="module")
def guest_profile(lab_domain: DomainConfig) -> Profile:
    return load_domain_profile(lab_domain, os.environ.get("XFGATE_PROFILE"))


@pytest.fixture(scope="module")
def probe() -> str:
    """The red team's probe program, built into the lab guest: its hold-* subcommands."""
    return PROBE


def as_mallory(layout: LabLayout, command: str) -> None:
    guest_exec(layout, 1, f"su -s /bin/sh mallory -c '{command} >/dev/null 2>&1 &'")


def _walk_until(
    guest: GuestIntrospector, pred: Callable[[WalkResult], bool], seconds: float = 10
) -> WalkResult:
    deadline = time.monotonic() + seconds
    while True:
        result = guest.walk()
        if pred(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.3)


def test_udplite_ping_raw_packet_sockets(
    lab_domain: DomainConfig, lab_layout: LabLayout, guest_profile: Profile, probe: str
) -> None:
    guest_exec(lab_layout, 1, "echo 0 2147483647 > /proc/sys/net/ipv4/ping_group_range")
    as_mallory(lab_layout, f"{probe} hold-udplite {CLIENT} 7777 20")
    as_mallory(lab_layout, f"{probe} hold-ping {CLIENT} 20")  # busybox ping here has no ping socket
    guest_exec(
        lab_layout,
        1,
        f"(ping -c 20 {CLIENT} >/dev/null 2>&1 &); ({probe} hold-packet 20 >/dev/null 2>&1 &)",
    )
    with GuestIntrospector(lab_domain, guest_profile) as guest:

        def ready(r: WalkResult) -> bool:
            protos = {(s.sock.proto, s.sock.sk_type) for s in r.sockets}
            return {
                (IPProto.UDPLITE, SockType.SOCK_DGRAM),
                (IPProto.ICMP, SockType.SOCK_DGRAM),
                (IPProto.ICMP, SockType.SOCK_RAW),
            } <= protos and bool(r.packets)

        result = _walk_until(guest, ready)
        assert ready(result), result.sockets
        lite = next(s.sock for s in result.sockets if s.sock.proto == IPProto.UDPLITE)
        own = guest.lookup(Flow(IPProto.UDPLITE, lite.local, lite.lport, ip_address(CLIENT), 7777))
        assert own is not None and own.via == "udplite" and own.sk_uid == 1001, own
        assert {o.uid for o in own.owners} == {1001} and own.holders_known
        ping = next(
            s.sock
            for s in result.sockets
            if s.sock.proto == IPProto.ICMP and s.sock.sk_type == SockType.SOCK_DGRAM
        )
        own = guest.lookup(
            Flow(IPProto.ICMP, ip_address(GUEST4), ping.lport, ip_address(CLIENT), 0)
        )
        assert own is not None and own.via == "ping" and own.sk_uid == 1001, own
        assert {o.uid for o in own.owners} == {1001}
        raw_pids = {s.pid for s in result.sockets if s.sock.sk_type == SockType.SOCK_RAW}
        # An echo identifier no ping socket has: the root ping's raw ICMP socket.
        idents = {s.sock.lport for s in result.sockets if s.sock.proto == IPProto.ICMP}
        ident = next(i for i in range(1, 70000) if i not in idents)
        own = guest.lookup(Flow(IPProto.ICMP, ip_address(GUEST4), ident, ip_address(CLIENT), 0))
        assert own is not None and own.via == "raw" and {o.pid for o in own.owners} <= raw_pids, own
        view = guest.view()
        holders = {o.pid for o in view.raw_holders}
        assert raw_pids <= holders and {p.pid for p in result.packets} <= holders
        assert all(o.uid == 0 for o in view.raw_holders)


def test_mptcp_subflow_and_private_thread_files(
    lab_domain: DomainConfig, lab_layout: LabLayout, guest_profile: Profile, probe: str
) -> None:
    as_mallory(lab_layout, f"{probe} hold-mptcp {GUEST4} 8000 20")
    as_mallory(lab_layout, f"{probe} hold-thread {GUEST4} 8000 20")
    with GuestIntrospector(lab_domain, guest_profile) as guest:

        def ready(r: WalkResult) -> bool:
            mine = [s for s in r.sockets if s.sock.sk_uid == 1001 and s.sock.rport == 8000]
            return {s.sock.proto for s in mine} >= {IPPROTO_MPTCP, IPProto.TCP}

        result = _walk_until(guest, ready)
        assert ready(result), result.sockets
        by_pid = {t.tgid: t for t in result.tasks}
        msk = next(
            s for s in result.sockets if s.sock.proto == IPPROTO_MPTCP and s.sock.rport == 8000
        )
        k = msk.sock
        own = guest.lookup(Flow(IPProto.TCP, k.local, k.lport, k.remote, k.rport))
        assert own is not None and own.via == "mptcp-subflow->msk", own
        assert [o.pid for o in own.owners] == [msk.pid] and own.owners[0].uid == 1001
        thr = next(
            s
            for s in result.sockets
            if s.sock.proto == IPProto.TCP and s.sock.sk_uid == 1001 and s.sock.rport == 8000
        )
        task = by_pid[thr.pid]
        assert task.threads >= 2 and task.thread_files, task  # held by the thread's own table
        k = thr.sock
        own = guest.lookup(Flow(IPProto.TCP, k.local, k.lport, k.remote, k.rport))
        assert own is not None and own.via == "established"
        assert [(o.pid, o.uid, o.exe) for o in own.owners] == [(thr.pid, 1001, PROBE)]


def test_exe_ancestors_and_v6only(
    lab_domain: DomainConfig, lab_layout: LabLayout, guest_profile: Profile
) -> None:
    as_mallory(lab_layout, "busybox nc -l -p 8081")  # [::]:8081, dual stack
    with GuestIntrospector(lab_domain, guest_profile) as guest:
        _walk_until(guest, lambda r: any(s.sock.lport == 8081 for s in r.sockets))
        view = guest.view()
    assert view.complete, view.problems
    tasks = {t.pid: t for t in view.tasks}
    assert tasks[1].exe == "/bin/busybox" and tasks[1].ancestors == ()
    fastweb = next(t for t in view.tasks if t.comm == "fastweb")
    assert fastweb.exe == "/bin/fastweb" and fastweb.ancestors[-1] == 1
    kthreads = [t for t in view.tasks if t.pid == 2 or 2 in t.ancestors]
    assert kthreads and all(t.exe == "" for t in kthreads)
    nc = next(s for s in view.sockets if s.lport == 8081)
    assert nc.local.version == 6 and not nc.v6only
    assert {o.uid for o in nc.owners} == {1001} and nc.owners[0].exe == "/bin/busybox"


def test_a_socket_passed_to_a_task_that_became_blocked_is_never_settled_without_it(
    lab_domain: DomainConfig, lab_layout: LabLayout, guest_profile: Profile, probe: str
) -> None:
    """The reference count shortcut (xfgate.vmi.holders) on the real kernel: a root process
    and its child, both root at the walk; then the child drops to uid 1001 (the watch, from
    the walk, does not name it) and the parent creates a UDP socket and passes it to the child
    (SCM_RIGHTS). The parent is its creator (f_cred) and holds one of its two references: the
    search goes on until the child's slot accounts for the other, and the child is named as
    it is now (uid 1001: the policy drops it)."""
    port = 29000
    pids: set[int] = set()
    guest_exec(
        lab_layout, 1, f"{probe} hold-passfd {port} 3000 60 > /tmp/passfd.log 2>&1 < /dev/null &"
    )
    try:
        with GuestIntrospector(lab_domain, guest_profile, allow_pause=False) as guest:
            walked = guest.walk()
            assert walked.complete
            root_probes = {t.pid for t in walked.tasks if t.exe == probe and t.uid == 0}
            guest.watch = lambda o: 1001 in (o.uid, o.euid)
            for _ in range(40):
                log = guest_exec(lab_layout, 1, "cat /tmp/passfd.log").output.decode()
                if "ready" in log:
                    break
                time.sleep(0.25)
            parent, child = (int(w) for w in log.split("ready", 1)[1].split()[:2])
            pids.update((parent, child))
            assert {parent, child} <= root_probes  # both root at the walk
            flow = Flow(IPProto.UDP, ip_address("127.0.0.1"), port, ip_address("127.0.0.1"), 29001)
            own = guest.lookup(flow)
            assert own is not None and own.holders_known
            assert {(o.pid, o.uid) for o in own.owners} >= {(parent, 0), (child, 1001)}
            assert guest.crosscheck.by_count == 1  # settled once both slots were found
    finally:
        if pids:
            guest_exec(lab_layout, 1, f"kill {' '.join(map(str, sorted(pids)))} 2>/dev/null")


def test_fd_bomb_does_not_make_the_walk_give_up(
    lab_domain: DomainConfig, lab_layout: LabLayout, guest_profile: Profile, probe: str
) -> None:
    """70 processes x 4,090 dup()s of one socket: the walk stays complete and quick."""
    bombers: set[int] = set()
    try:
        _bomb(lab_domain, lab_layout, guest_profile, probe, bombers)
    finally:
        if bombers:
            guest_exec(lab_layout, 1, f"kill {' '.join(map(str, sorted(bombers)))} 2>/dev/null")


def _bomb(
    lab_domain: DomainConfig,
    lab_layout: LabLayout,
    guest_profile: Profile,
    probe: str,
    bombers: set[int],
) -> None:
    with GuestIntrospector(lab_domain, guest_profile, allow_pause=False) as guest:
        before = [guest.walk().seconds for _ in range(20)]
        as_mallory(lab_layout, f"ulimit -n 4096; {probe} hold-bomb 70 4090 60")

        def ready(r: WalkResult) -> bool:
            return r.folded_fds >= 70 * (4090 - 16)

        result = _walk_until(guest, ready, seconds=40)
        bombers.update(t.tgid for t in result.tasks if t.exe == probe)
        assert ready(result), (result.folded_fds, result.errors)
        times = []
        for _ in range(20):
            r = guest.walk()
            times.append(r.seconds)
            assert r.complete, r.errors[:3]
        print(
            f"\nwalk p50 before {statistics.median(before) * 1000:.2f} ms, with the bomb "
            f"{statistics.median(times) * 1000:.2f} ms (max {max(times) * 1000:.2f} ms), "
            f"{r.fd_slots} fd slots, {r.files} files, {r.folded_fds} folded"
        )
        assert statistics.median(times) < 0.5
        bomb = [s for s in r.sockets if s.sock.sk_uid == 1001 and s.sock.proto == IPProto.UDP]
        holders = {s.pid for s in bomb}
        assert len(holders) >= 71
