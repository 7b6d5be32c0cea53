"""Targeted lookups in the synthetic guest's hash tables, and the introspector on top."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.vmi_fakes import (
    HOTDATA_OFFSET,
    TEXT_LINK,
    FakeGuest,
    addr,
    fake_domain,
    hotdata_profile,
    standard_guest,
    synthetic_profile,
)
from xfgate.config import DomainConfig, MemoryConfig
from xfgate.errors import ProfileError, ProfileMismatch
from xfgate.flow import Flow, Via
from xfgate.inet import IPProto
from xfgate.vmi import jhash, sockets
from xfgate.vmi.introspect import GuestIntrospector
from xfgate.vmi.kaslr import KernelLocator, from_banner_scan, from_vmcoreinfo
from xfgate.vmi.linux import KernelLayout
from xfgate.vmi.paging import AddressSpace
from xfgate.vmi.profile import Profile
from xfgate.vmi.sockets import HashLayout, SocketTables
from xfgate.vmi.walk import WalkReason


def _tables(g: FakeGuest) -> SocketTables:
    space = AddressSpace(g.memory, g.root, g.levels)
    return SocketTables(
        space,
        KernelLayout.from_profile(g.profile),
        HashLayout.from_profile(g.profile),
        g.virt_shift,
    )


def _flow(proto: int, local: str, lport: int, remote: str, rport: int) -> Flow:
    return Flow(proto, addr(local), lport, addr(remote), rport)


def test_jhash_matches_hashes_the_real_6_1_kernel_stored() -> None:
    # sk_hash values read from a 6.1.0-56-amd64 guest's sockets with its secrets
    # (inet_ehash_secret 0xe0789f83, init_net.hash_mix 0xee6cb531): an external oracle.
    secret = (0xE0789F83 + 0xEE6CB531) & jhash.M32
    lo = bytes([127, 0, 0, 1])
    assert jhash.inet_ehashfn(lo, 57954, lo, 5000, secret) == 0xF6BC8CC4
    assert jhash.inet_ehashfn(lo, 5000, lo, 57954, secret) == 0x71CE52DD
    # IPv6, from the lab guest: inet6_ehash_secret 0x170220a4, ipv6_hash_secret 0xbb80fed0,
    # hash_mix 0x0d9d55bc; both ends of [2001:2::1:1]:56618 <-> [2001:2::1:1]:9000.
    a6 = bytes.fromhex("20010002000000000000000000010001")
    e6, v6, mix = 0x170220A4, 0xBB80FED0, 0x0D9D55BC
    assert jhash.inet6_ehashfn(a6, 56618, a6, 9000, e6, v6, mix) == 0xA8BD073C
    assert jhash.inet6_ehashfn(a6, 9000, a6, 56618, e6, v6, mix) == 0x1C3427CF


def test_established_v4_v6_listener_udp() -> None:
    g = standard_guest()
    t = _tables(g)
    est = t.find(_flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.1", 40000))
    assert est is not None and est.table == "established" and est.sock.rport == 40000
    est6 = t.find(_flow(IPProto.TCP, "2001:2::1:1", 51000, "2001:2::1", 443))
    assert est6 is not None and est6.table == "established" and est6.sock.sk_uid == 1000
    lst = t.find(_flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.9", 1234))
    assert lst is not None and lst.table == "listener" and lst.sock.lport == 80
    # An IPv4 packet to a dual-stack [::]:8080 listener.
    dual = t.find(_flow(IPProto.TCP, "198.18.1.1", 8080, "198.18.0.9", 1234))
    assert dual is not None and dual.table == "listener" and dual.sock.family == 6
    udp = t.find(_flow(IPProto.UDP, "198.18.1.1", 5353, "198.18.0.1", 9999))
    assert udp is not None and udp.table == "udp" and udp.sock.sk_uid == 1001
    assert t.find(_flow(IPProto.TCP, "198.18.1.1", 81, "198.18.0.1", 1)) is None
    assert t.find(_flow(IPProto.UDP, "198.18.1.1", 53, "198.18.0.1", 1)) is None


def test_v4_mapped_flow_is_looked_up_as_ipv4() -> None:
    g = standard_guest()
    t = _tables(g)
    found = t.find(_flow(IPProto.TCP, "::ffff:198.18.1.1", 80, "::ffff:198.18.0.1", 40000))
    assert found is not None and found.table == "established"


def test_request_and_time_wait_socks() -> None:
    g = standard_guest()
    listener = g.tasks[2].address  # httpd task, to find its listener below
    lst_sock = _tables(g).find(_flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.7", 1))
    assert lst_sock is not None and listener
    req = g.new_sock(IPProto.TCP, 12, "198.18.1.1", 80, "198.18.0.7", 5555, size=0x90)
    g.set_request_listener(req, lst_sock.sock.address)
    g.hash_established(req, "198.18.1.1", 80, "198.18.0.7", 5555)
    tw = g.new_sock(IPProto.TCP, 6, "198.18.1.1", 80, "198.18.0.8", 6666, size=0x90)
    g.hash_established(tw, "198.18.1.1", 80, "198.18.0.8", 6666)
    t = _tables(g)
    r = t.find(_flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.7", 5555))
    assert r is not None and r.table == "request" and r.listener == lst_sock.sock.address
    w = t.find(_flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.8", 6666))
    assert w is not None and w.table == "time-wait"


def test_cyclic_bucket_is_bounded() -> None:
    g = standard_guest()
    est = _tables(g).find(_flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.1", 40000))
    assert est is not None
    node = est.sock.address + g.off("sock_common", "skc_nulls_node")
    g.w(node, "<Q", node)  # the sock points at itself
    mix, e4 = g.secrets[0], g.secrets[1]
    here = bytes([198, 18, 1, 1])

    def slot(rport: int) -> int:
        peer = bytes([198, 18, 0, 1])
        return jhash.inet_ehashfn(here, 80, peer, rport, (e4 + mix) & jhash.M32) & 63

    # Another flow that lands in the same bucket but matches nothing there.
    rport = next(p for p in range(1, 65536) if p != 40000 and slot(p) == slot(40000))
    t = _tables(g)
    found = t.find(_flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.1", rport))
    assert found is not None and found.table == "listener"
    [issue] = t.errors
    assert (issue.what, issue.reason, issue.address) == ("ehash", WalkReason.CYCLE, node)


def _established_node(g: FakeGuest) -> int:
    est = _tables(g).find(_flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.1", 40000))
    assert est is not None and est.table == "established"
    return est.sock.address + g.off("sock_common", "skc_nulls_node")


def test_bad_pprev_in_a_bucket_stops_the_chain() -> None:
    g = standard_guest()
    node = _established_node(g)
    g.w(node + 8, "<Q", 0xFFFF888000001000)  # pprev no longer points at the bucket or previous
    t = _tables(g)
    found = t.find(_flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.1", 40000))
    assert found is not None and found.table == "listener"  # the chain gave nothing: listener
    [issue] = t.errors
    assert (issue.what, issue.reason, issue.address) == ("ehash", WalkReason.BAD_PREV, node)


def test_wild_chain_pointer_is_not_followed() -> None:
    g = standard_guest()
    node = _established_node(g)
    bucket = struct.unpack_from("<Q", g.buf, g.pa(node + 8))[0]  # pprev of the first: the bucket
    g.w(bucket, "<Q", 0x4141414141414140)
    t = _tables(g)
    t.find(_flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.1", 40000))
    [issue] = t.errors
    assert (issue.what, issue.reason, issue.address, issue.step) == (
        "ehash",
        WalkReason.POINTER_OUT_OF_RANGE,
        0x4141414141414140,
        0,
    )


def test_chain_step_and_time_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    g = standard_guest()
    flow = _flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.1", 40000)
    monkeypatch.setattr(sockets, "MAX_CHAIN", 0)
    t = _tables(g)
    assert t.find(flow) is None
    assert [(e.what, e.reason, e.step) for e in t.errors] == [
        ("ehash", WalkReason.STEP_BOUND, 0),
        ("lhash2", WalkReason.STEP_BOUND, 0),
    ]
    monkeypatch.setattr(sockets, "MAX_CHAIN", 4096)
    monkeypatch.setattr(sockets, "LOOKUP_SECONDS", -1.0)
    t = _tables(g)
    assert t.find(flow) is None
    assert {(e.what, e.reason, e.step) for e in t.errors} == {
        ("ehash", WalkReason.TIME_BOUND, 0),
        ("lhash2", WalkReason.TIME_BOUND, 0),
    }


def test_introspector_lookup_owners_and_request_attribution() -> None:
    g = standard_guest()
    lst = _tables(g).find(_flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.7", 1))
    assert lst is not None
    req = g.new_sock(IPProto.TCP, 12, "198.18.1.1", 80, "198.18.0.7", 5555, size=0x90)
    g.set_request_listener(req, lst.sock.address)
    g.hash_established(req, "198.18.1.1", 80, "198.18.0.7", 5555)
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory) as gi:
        own = gi.lookup(_flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.7", 5555))
        assert own is not None and own.via == "request-sock->listener"
        assert [(o.pid, o.fd, o.comm) for o in own.owners] == [(100, 3, "httpd")]
        own = gi.lookup(_flow(IPProto.TCP, "2001:2::1:1", 51000, "2001:2::1", 443))
        assert own is not None and own.via == "established" and own.owners[0].uid == 1000
        own = gi.lookup(_flow(IPProto.UDP, "198.18.1.1", 5353, "198.18.0.1", 53))
        assert own is not None and (own.owners[0].pid, own.owners[0].euid) == (300, 0)
        assert gi.lookup(_flow(IPProto.TCP, "198.18.1.1", 22, "198.18.0.1", 1)) is None
        assert gi.generation() == 1


def test_new_socket_triggers_a_rewalk_and_unaccepted_goes_to_listener() -> None:
    g = standard_guest()
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=0) as gi:
        gi.walk()
        # A socket created after the walk, held by a new process.
        t = g.add_task(400, "late", uid=42)
        sk = g.new_sock(IPProto.TCP, 1, "198.18.1.1", 33000, "198.18.0.1", 22, sk_uid=42)
        g.hash_established(sk, "198.18.1.1", 33000, "198.18.0.1", 22)
        g.add_fd(t, 3, sk)
        own = gi.lookup(_flow(IPProto.TCP, "198.18.1.1", 33000, "198.18.0.1", 22))
        assert own is not None and [(o.pid, o.uid) for o in own.owners] == [(400, 42)]
        # Established by the kernel, not accepted yet: attributed to the listener's owner.
        child = g.new_sock(IPProto.TCP, 1, "198.18.1.1", 80, "198.18.0.3", 41000)
        g.hash_established(child, "198.18.1.1", 80, "198.18.0.3", 41000)
        own = gi.lookup(_flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.3", 41000))
        assert own is not None and own.via == "established->listener"
        assert [o.pid for o in own.owners] == [100]


def test_sockets_groups_owners_per_sock() -> None:
    g = standard_guest()
    web = g.tasks[2].address
    shared = g.new_sock(IPProto.UDP, 7, "0.0.0.0", 6000, "0.0.0.0", 0)
    g.add_fd(web, 9, shared)
    child = g.add_task(101, "httpd-child", parent=web)
    g.add_fd(child, 0, shared)
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory) as gi:
        socks = [s for s in gi.sockets() if s.lport == 6000]
    assert len(socks) == 1 and [(o.pid, o.fd) for o in socks[0].owners] == [(100, 9), (101, 0)]
    assert next(p for p in gi.processes() if p.pid == 101).ppid == 100


def test_kaslr_three_ways_agree_and_mismatch_is_clear() -> None:
    g = FakeGuest(levels=5)
    a = from_vmcoreinfo(g.memory, g.profile)
    b = from_banner_scan(g.memory, g.profile)
    assert a is not None and b is not None
    assert (a.virt_shift, a.phys_base, a.root, a.levels) == (b.virt_shift, b.phys_base, b.root, 5)
    other = dataclasses.replace(
        g.profile, release="6.1.0-other", banner="Linux version 6.1.0-other x\n"
    )
    with pytest.raises(ProfileMismatch, match=r"6\.1\.0-other"):
        KernelLocator(g.memory, other).locate()
    nonote = FakeGuest(vmcoreinfo=False)
    loc = KernelLocator(nonote.memory, nonote.profile).locate()
    assert loc.method == "banner-scan" and loc.virt_shift == nonote.virt_shift


def test_reboot_changes_generation(tmp_path: Path) -> None:
    g1 = FakeGuest(virt_shift=0x10000000)
    path = tmp_path / "ram.mem"
    path.write_bytes(g1.buf)
    dom = DomainConfig(1, "f", (), MemoryConfig("raw", str(path)))
    with GuestIntrospector(dom, g1.profile) as gi:
        assert gi.boot().location.virt_shift == 0x10000000
        gen = gi.generation()
        g2 = FakeGuest(virt_shift=0x20000000)
        tmp = tmp_path / "ram.new"
        tmp.write_bytes(g2.buf)
        tmp.replace(path)  # a new QEMU: a new RAM file
        assert gi.boot().location.virt_shift == 0x20000000
        assert gi.generation() > gen


def test_kaslr_from_cr3_with_a_pti_user_root() -> None:
    from xfgate.vmi.kaslr import from_cr3
    from xfgate.vmi.qmp import ControlRegisters

    g = FakeGuest()
    # CR3 as seen while user space runs under PTI: the user copy, one page above, plus a PCID.
    loc = from_cr3(g.memory, g.profile, ControlRegisters(g.root | 0x1000 | 0x5, 0x6F0))
    assert (loc.virt_shift, loc.phys_base, loc.root, loc.method) == (
        g.virt_shift,
        g.phys_base,
        g.root,
        "cr3",
    )
    other = dataclasses.replace(g.profile, banner="Linux version 9.9.9 (someone) #2\n")
    with pytest.raises(ProfileMismatch, match=r"6\.1\.0-fake"):
        from_cr3(g.memory, other, ControlRegisters(g.root, 0x6F0))


def test_lookups_trust_a_checked_boot_for_revalidate_seconds_walks_always_check(
    tmp_path: Path,
) -> None:
    g1 = standard_guest()
    path = tmp_path / "ram.mem"
    path.write_bytes(g1.buf)
    dom = DomainConfig(1, "f", (), MemoryConfig("raw", str(path)))
    flow = _flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.1", 40000)
    with (
        GuestIntrospector(dom, g1.profile, revalidate_seconds=3600) as lazy,
        GuestIntrospector(dom, g1.profile, revalidate_seconds=0) as eager,
    ):
        assert lazy.lookup(flow) is not None and eager.lookup(flow) is not None
        gen_lazy, gen_eager = lazy.generation(), eager.generation()
        g2 = FakeGuest(virt_shift=0x20000000)
        tmp = tmp_path / "ram.new"
        tmp.write_bytes(g2.buf)
        tmp.replace(path)  # a new QEMU
        assert eager.lookup(flow) is None and eager.generation() > gen_eager
        lazy.lookup(flow)  # inside its window: the boot checked a moment ago is trusted
        assert lazy.generation() == gen_lazy
        lazy.walk()  # a walk always checks
        assert lazy.generation() > gen_lazy
        assert lazy.boot().location.virt_shift == 0x20000000


def test_listener_lookup_for_a_syn_meeting_time_wait() -> None:
    g = standard_guest()
    tw = g.new_sock(IPProto.TCP, 6, "198.18.1.1", 80, "198.18.0.9", 7000, size=0x90)
    g.hash_established(tw, "198.18.1.1", 80, "198.18.0.9", 7000)
    flow = _flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.9", 7000)
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory) as gi:
        own = gi.lookup(flow)
        assert own is not None and own.via == "time-wait" and own.owners == ()
        lst = gi.lookup_listener(flow)
        assert lst is not None and (lst.via, lst.state) == ("listener", "LISTEN")
        assert [(o.pid, o.fd) for o in lst.owners] == [(100, 3)]
        assert gi.lookup_listener(_flow(IPProto.TCP, "198.18.1.1", 81, "198.18.0.9", 1)) is None
        assert gi.lookup_listener(_flow(IPProto.UDP, "198.18.1.1", 5353, "198.18.0.1", 1)) is None


def test_bucket_arrays_are_read_once_per_boot(monkeypatch: pytest.MonkeyPatch) -> None:
    g = standard_guest()
    t = _tables(g)
    first = t.tables()
    assert first.ehash and first.lhash2 and first.udp_hash
    reads: list[int] = []
    real_read = t.space.read

    def counting_read(vaddr: int, length: int) -> bytes:
        reads.append(vaddr)
        return real_read(vaddr, length)

    monkeypatch.setattr(t.space, "read", counting_read)
    h = t.h
    hashinfo = h.tcp_hashinfo + t.shift
    assert t.find(_flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.1", 40000)) is not None
    assert hashinfo + h.ehash not in reads and hashinfo + h.lhash2 not in reads


def test_an_incomplete_walk_merges_into_the_index_and_lookups_keep_their_budget() -> None:
    g = standard_guest()
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=0) as gi:
        gi.walk()
        flow = _flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.1", 40000)
        own = gi.lookup(flow)
        assert own is not None and [o.pid for o in own.owners] == [100] and own.holders_known
        # A walk that hits a bound (here: no fd slots at all) adds nothing, removes nothing.
        gi.bounds = dataclasses.replace(gi.bounds, max_fd_slots=0, retries=1)
        assert not gi.walk().complete
        own = gi.lookup(flow)
        assert own is not None and [o.pid for o in own.owners] == [100] and own.holders_known
        # A socket it could not see: without the holder resolver (a profile lacking
        # sock.sk_socket or socket.file), no owners, sk_uid set, holders not known.
        t = g.add_task(400, "late", uid=42)
        sk = g.new_sock(IPProto.TCP, 1, "198.18.1.1", 33000, "198.18.0.1", 22, sk_uid=42)
        g.hash_established(sk, "198.18.1.1", 33000, "198.18.0.1", 22)
        g.add_fd(t, 3, sk)
        resolver, gi.holder_layout = gi.holder_layout, None
        own = gi.lookup(_flow(IPProto.TCP, "198.18.1.1", 33000, "198.18.0.1", 22))
        assert own is not None and own.owners == () and own.sk_uid == 42
        assert not own.holders_known
        # With it: the new task found at the task list's tail, its table searched, no walk.
        gi.holder_layout = resolver
        own = gi.lookup(_flow(IPProto.TCP, "198.18.1.1", 33000, "198.18.0.1", 22))
        assert own is not None and [(o.pid, o.fd) for o in own.owners] == [(400, 3)]
        assert own.holders_known and gi.crosscheck.resolutions == 1
    # Right after a walk, a new socket is answered at once, without a walk.
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=60) as gi:
        gi.walk()
        sk = g.new_sock(IPProto.TCP, 1, "198.18.1.1", 33001, "198.18.0.1", 22, sk_uid=43)
        g.hash_established(sk, "198.18.1.1", 33001, "198.18.0.1", 22)
        flow = _flow(IPProto.TCP, "198.18.1.1", 33001, "198.18.0.1", 22)
        resolver, gi.holder_layout = gi.holder_layout, None
        own = gi.lookup(flow)
        assert own is not None and own.owners == () and own.sk_uid == 43
        assert not own.holders_known
        # The resolver reads that no file refers to it (sk_socket NULL: orphaned, as after
        # close()): held by no task, as a complete walk would say.
        gi.holder_layout = resolver
        own = gi.lookup(flow)
        assert own is not None and own.owners == () and own.sk_uid == 43
        assert own.holders_known


def _spray_connection() -> tuple[FakeGuest, int, int]:
    """A guest where uid 1001's spray (pid 400) holds a connection to :2222: (guest, task, sk)."""
    g = standard_guest()
    spray = g.add_task(400, "spray", uid=1001)
    sk = g.new_sock(IPProto.TCP, 2, "198.18.1.1", 33000, "198.18.0.1", 2222, sk_uid=1001)
    g.hash_established(sk, "198.18.1.1", 33000, "198.18.0.1", 2222)
    g.add_fd(spray, 3, sk)
    return g, spray, sk


def _reconnect(g: FakeGuest, sk: int) -> None:
    """The same struct sock, reallocated for a connection from :57004 to :2307."""
    g.w(sk + g.off("sock_common", "skc_num"), "<H", 57004)
    g.w(sk + g.off("sock_common", "skc_dport"), ">H", 2307)
    g.hash_established(sk, "198.18.1.1", 57004, "198.18.0.1", 2307)


def test_a_sock_reallocated_at_a_known_address_does_not_inherit_its_holders() -> None:
    """The slab hands a freed struct sock's address to the next socket within milliseconds:
    the red team saw a blocked process's new connection answered with the holders of another
    process's closed socket. The index remembers what each sock was; a different socket at
    the same address is looked up again."""
    g, spray, sk = _spray_connection()
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=0) as gi:
        gi.walk()
        own = gi.lookup(_flow(IPProto.TCP, "198.18.1.1", 33000, "198.18.0.1", 2222))
        assert own is not None and [o.comm for o in own.owners] == ["spray"]
        # spray closes it; the probe's new socket gets the same struct sock.
        g.put_fd(g.task_at(spray).fd_array, 3, 0)
        probe = g.add_task(500, "xfprobe", uid=1001)
        _reconnect(g, sk)
        g.add_fd(probe, 3, sk)
        own = gi.lookup(_flow(IPProto.TCP, "198.18.1.1", 57004, "198.18.0.1", 2307))
        assert own is not None and [(o.pid, o.comm) for o in own.owners] == [(500, "xfprobe")]
    # Within the rewalk interval the stale holders are not trusted either: holders unknown
    # without the resolver; with it, the holder memory shows now (spray, still at fd 3).
    g2, _, sk2 = _spray_connection()
    with GuestIntrospector(
        fake_domain(), g2.profile, memory=g2.memory, min_rewalk_seconds=60
    ) as gi:
        gi.walk()
        _reconnect(g2, sk2)
        resolver, gi.holder_layout = gi.holder_layout, None
        flow = _flow(IPProto.TCP, "198.18.1.1", 57004, "198.18.0.1", 2307)
        own = gi.lookup(flow)
        assert own is not None and own.owners == () and not own.holders_known
        gi.holder_layout = resolver
        own = gi.lookup(flow)
        assert own is not None and [(o.pid, o.fd) for o in own.owners] == [(400, 3)]
        assert own.holders_known


def test_the_holder_resolver_answers_new_socks_and_the_next_walk_cross_checks_it() -> None:
    """A sock created after the walk, held by an old process (fd added) and a new one (a task
    at the list's tail): found without a walk; a disagreement with the next complete walk is
    counted and repaired; hostile memory (a cyclic task list) answers "not known"."""
    g, spray, _ = _spray_connection()
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=60) as gi:
        gi.walk()
        sk = g.new_sock(IPProto.UDP, 7, "198.18.1.1", 40001, "198.18.0.1", 53, sk_uid=1001)
        g.hash_udp(sk, 40001)
        file = g.add_fd(spray, 9, sk)
        child = g.add_task(401, "child", uid=1001, parent=spray)
        g.put_fd(g.task_at(child).fd_array, 5, file)
        own = gi.lookup(_flow(IPProto.UDP, "198.18.1.1", 40001, "198.18.0.1", 53))
        assert own is not None and own.holders_known
        assert [(o.pid, o.fd) for o in own.owners] == [(400, 9), (401, 5)]
        assert [o.ancestors for o in own.owners][1][:1] == (400,)
        # The child drops it before the walk: the walk disagrees, counts, repairs.
        g.put_fd(g.task_at(child).fd_array, 5, 0)
        gi.crosscheck.disagreements = 0
        assert gi.walk().complete
        assert gi.crosscheck.checked == 1 and gi.crosscheck.disagreements == 1
        own = gi.lookup(_flow(IPProto.UDP, "198.18.1.1", 40001, "198.18.0.1", 53))
        assert own is not None and [(o.pid, o.fd) for o in own.owners] == [(400, 9)]
        # A new sock while the task list's tail loops on itself: not known, never raises.
        sk2 = g.new_sock(IPProto.UDP, 7, "198.18.1.1", 40002, "198.18.0.1", 53, sk_uid=1001)
        g.hash_udp(sk2, 40002)
        g.add_fd(spray, 10, sk2)
        late = g.add_task(402, "late", uid=1001)
        node = late + g.off("task_struct", "tasks")
        g.w(node + 8, "<Q", node)  # prev points at itself: the backward walk breaks
        own = gi.lookup(_flow(IPProto.UDP, "198.18.1.1", 40002, "198.18.0.1", 53))
        assert own is not None and not own.holders_known
        # A socket whose file does not point back at it (torn or forged): not known either.
        sk3 = g.new_sock(IPProto.UDP, 7, "198.18.1.1", 40003, "198.18.0.1", 53, sk_uid=1001)
        g.hash_udp(sk3, 40003)
        g.add_fd(spray, 11, sk3)
        g.w(sk3 + g.off("sock", "sk_socket"), "<Q", g.alloc(0x40))
        own = gi.lookup(_flow(IPProto.UDP, "198.18.1.1", 40003, "198.18.0.1", 53))
        assert own is not None and own.owners == () and not own.holders_known


def test_a_task_struct_reused_by_a_new_process_is_a_new_task() -> None:
    """spray exits and the slab hands its task_struct to the next fork (pid 600, at the task
    list's tail): the resolver must not stop at that address as if it were spray."""
    g, spray, _ = _spray_connection()
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=60) as gi:
        gi.walk()
        sk = g.new_sock(IPProto.UDP, 7, "198.18.1.1", 40004, "198.18.0.1", 53, sk_uid=1001)
        g.hash_udp(sk, 40004)
        g.w(spray + g.off("task_struct", "pid"), "<ii", 600, 600)
        g.add_fd(spray, 12, sk)
        tasks = spray + g.off("task_struct", "tasks")
        head = g.sym("init_task") + g.off("task_struct", "tasks")
        nxt, prev = g.read_q(tasks), g.read_q(tasks + 8)
        g.w(prev, "<Q", nxt)  # unlinked from its old place...
        g.w(nxt + 8, "<Q", prev)
        tail = g.read_q(head + 8)
        g.w(tasks, "<QQ", head, tail)  # ...and added at the tail, as copy_process does
        g.w(tail, "<Q", tasks)
        g.w(head + 8, "<Q", tasks)
        own = gi.lookup(_flow(IPProto.UDP, "198.18.1.1", 40004, "198.18.0.1", 53))
        assert own is not None and own.holders_known
        assert [(o.pid, o.fd) for o in own.owners] == [(600, 12)]


def test_hash_secrets_in_net_hotdata_as_6_12_keeps_them() -> None:
    """6.12 has no inet_ehash_secret symbol: the secrets are net_hotdata members."""
    p = hotdata_profile()
    assert not any("hash_secret" in name for name in p.symbols)
    hot = TEXT_LINK + HOTDATA_OFFSET
    assert sockets.hash_secret(p, "inet_ehash_secret") == hot + 0x40 + 20
    assert sockets.hash_secret(p, "inet6_ehash_secret") == hot + 0x140 + 28
    assert sockets.hash_secret(p, "ipv6_hash_secret") == hot + 0x100 + 32
    g = standard_guest(profile=p)
    t = _tables(g)
    est = t.find(_flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.1", 40000))
    assert est is not None and est.table == "established" and est.sock.rport == 40000
    est6 = t.find(_flow(IPProto.TCP, "2001:2::1:1", 51000, "2001:2::1", 443))
    assert est6 is not None and est6.table == "established"
    assert t.secrets().ehash == g.secrets[1] and t.secrets().ipv6 == g.secrets[3]


def test_hash_secrets_by_symbol_exact_or_function_local_spelling() -> None:
    p = synthetic_profile()  # 6.1's spelling: inet_ehash_secret.3, ipv6_hash_secret.2
    assert sockets.hash_secret(p, "inet_ehash_secret") == p.symbol("inet_ehash_secret.3")
    assert sockets.hash_secret(p, "ipv6_hash_secret") == p.symbol("ipv6_hash_secret.2")
    renamed = dataclasses.replace(
        p,
        symbols={
            **{k: v for k, v in p.symbols.items() if not k.startswith("ipv6_hash")},
            "tcp_ipv6_hash_secret": 0xFFFFFFFF81777000,
        },
    )
    assert sockets.hash_secret(renamed, "ipv6_hash_secret") == 0xFFFFFFFF81777000


def test_a_profile_without_a_secret_names_what_it_tried() -> None:
    p = synthetic_profile()
    bare = dataclasses.replace(
        p, symbols={k: v for k, v in p.symbols.items() if not k.startswith("inet_ehash")}
    )
    with pytest.raises(
        ProfileError,
        match=r"no inet_ehash_secret \(tried inet_ehash_secret, "
        r"net_hotdata.tcp_protocol.secret\)",
    ):
        HashLayout.from_profile(bare)


def _without_secret(name: str = "inet_ehash_secret") -> Profile:
    p = synthetic_profile()
    return dataclasses.replace(
        p, symbols={k: v for k, v in p.symbols.items() if not k.startswith(name)}
    )


def test_a_profile_without_a_secret_degrades_lookups_to_the_walk_and_says_so() -> None:
    g = standard_guest(profile=_without_secret())
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory) as gi:
        assert gi.hashes is None
        assert "socket hash lookups off" in gi.degraded()
        assert "inet_ehash_secret" in gi.degraded()
        # An incoming connection: its listener's owner, from the walk.
        own = gi.lookup(_flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.7", 5555))
        assert own is not None and own.via == "walk" and own.state == "LISTEN"
        assert [(o.pid, o.fd) for o in own.owners] == [(100, 3)] and own.holders_known
        # The exact 4-tuple wins over the listener of the same port.
        own = gi.lookup(_flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.1", 40000))
        assert own is not None and own.state == "ESTABLISHED" and own.owners[0].fd == 5
        # IPv4 to a dual-stack [::]:8080 listener; UDP by its bound port.
        own = gi.lookup(_flow(IPProto.TCP, "198.18.1.1", 8080, "198.18.0.7", 1))
        assert own is not None and own.owners[0].fd == 4
        own = gi.lookup(_flow(IPProto.UDP, "198.18.1.1", 5353, "198.18.0.1", 53))
        assert own is not None and own.owners[0].pid == 300
        # Nothing there: no owner (the engine's unknown, unsettled).
        assert gi.lookup(_flow(IPProto.TCP, "198.18.1.1", 22, "198.18.0.1", 1)) is None


def test_degraded_lookups_walk_at_most_every_min_rewalk_seconds() -> None:
    g = standard_guest(profile=_without_secret("ipv6_hash_secret"))
    with GuestIntrospector(
        fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=3600
    ) as gi:
        assert "ipv6_hash_secret" in gi.degraded()
        assert gi.lookup(_flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.7", 1)) is not None
        walks = gi._last_walk
        late = g.add_task(400, "late", uid=42)
        sk = g.new_sock(IPProto.TCP, 10, "0.0.0.0", 9000, "0.0.0.0", 0, sk_uid=42)
        g.add_fd(late, 3, sk)
        # Not walked again within min_rewalk_seconds: not seen yet (bounded cost per packet).
        assert gi.lookup(_flow(IPProto.TCP, "198.18.1.1", 9000, "198.18.0.7", 1)) is None
        assert gi._last_walk == walks
        gi.walk()
        own = gi.lookup(_flow(IPProto.TCP, "198.18.1.1", 9000, "198.18.0.7", 1))
        assert own is not None and own.owners[0].uid == 42


def test_a_complete_profile_is_not_degraded() -> None:
    g = standard_guest()
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory) as gi:
        assert gi.degraded() == ""


def test_a_queued_connection_is_the_listeners_only_as_sure_as_its_own_holders() -> None:
    """An established sock nobody holds yet (in the accept queue, sk_socket NULL) answers with
    the listener's owners, known; one whose holders could not be read must not borrow the
    listener's certainty (it may be held by a blocked process)."""
    g = standard_guest()
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=60) as gi:
        gi.walk()
        sk = g.new_sock(IPProto.TCP, 1, "198.18.1.1", 80, "198.18.0.1", 40001)
        g.hash_established(sk, "198.18.1.1", 80, "198.18.0.1", 40001)
        flow = _flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.1", 40001)
        own = gi.lookup(flow)
        assert own is not None and own.via is Via.ESTABLISHED_LISTENER
        assert [o.pid for o in own.owners] == [100] and own.holders_known
        gi.holder_layout = None  # holders not readable within the budget
        own = gi.lookup(flow)
        assert own is not None and own.via is Via.ESTABLISHED_LISTENER
        assert [o.pid for o in own.owners] == [100] and not own.holders_known


def test_a_connecting_sock_is_never_answered_with_a_listeners_owners() -> None:
    """A SYN_SENT sock nobody holds (yet) on a listener's port is a connect(), in no accept
    queue: its answer names no listener owner (and no listener lookup is spent on it: the
    flood path's blocked SYNs)."""
    g = standard_guest()
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=60) as gi:
        gi.walk()
        sk = g.new_sock(IPProto.TCP, 2, "198.18.1.1", 80, "198.18.0.1", 40002, sk_uid=1001)
        g.hash_established(sk, "198.18.1.1", 80, "198.18.0.1", 40002)
        gi.creator_decides = lambda uid: uid == 1001
        own = gi.lookup(_flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.1", 40002))
        assert own is not None and own.via is Via.ESTABLISHED and own.state == "SYN_SENT"
        assert own.owners == () and own.sk_uid == 1001 and not own.holders_known


def test_a_new_sock_of_a_creator_the_policy_names_is_answered_without_a_walk() -> None:
    """A blocked uid's flood of new connections: each new sock would make the lookup walk the
    guest (every 50 ms at most). With `creator_decides` naming its creator, no walk: holders
    unknown, sk_uid given, the policy drops it by creator. Other creators' holders are read."""
    g, spray, _ = _spray_connection()
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=0) as gi:
        gi.walk()
        gi.creator_decides = lambda uid: uid == 1001
        walks: list[int] = []
        real_walk = gi.walk

        def counting_walk(*a: Any, **kw: Any) -> Any:
            walks.append(1)
            return real_walk(*a, **kw)

        gi.walk = counting_walk  # type: ignore[method-assign]
        sk = g.new_sock(IPProto.TCP, 2, "198.18.1.1", 33002, "198.18.0.1", 2222, sk_uid=1001)
        g.hash_established(sk, "198.18.1.1", 33002, "198.18.0.1", 2222)
        g.add_fd(spray, 4, sk)
        own = gi.lookup(_flow(IPProto.TCP, "198.18.1.1", 33002, "198.18.0.1", 2222))
        assert own is not None and own.owners == () and own.sk_uid == 1001
        assert not own.holders_known and walks == []
        web = g.new_sock(IPProto.TCP, 2, "198.18.1.1", 33003, "198.18.0.1", 7000, sk_uid=1000)
        g.hash_established(web, "198.18.1.1", 33003, "198.18.0.1", 7000)
        g.add_fd(spray, 5, web)
        own = gi.lookup(_flow(IPProto.TCP, "198.18.1.1", 33003, "198.18.0.1", 7000))
        # Another creator's sock: its holders are resolved (the holder resolver finds the fd
        # without a full walk), never judged by creator.
        assert own is not None and [o.pid for o in own.owners] == [400] and own.holders_known


def test_a_new_socks_holder_is_named_by_who_it_is_now_not_at_the_last_walk() -> None:
    """Found by the red team: a root shell the walk saw forks, drops to the blocked uid and
    execs the probe (how a login or a cron job starts a user's program); the probe's new
    socket was named by the walk's picture of that pid (root, 'sh') and settled as accepted.
    The resolver reads the holder's task_struct again: uid, euid and comm as they are now."""
    g = standard_guest()
    shell = g.add_task(500, "sh", uid=0)
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=60) as gi:
        gi.walk()
        cred = g.alloc(0x60)
        g.w(cred + g.off("cred", "uid"), "<I", 1001)
        g.w(cred + g.off("cred", "euid"), "<I", 1001)
        g.w(shell + g.off("task_struct", "real_cred"), "<QQ", cred, cred)
        g._write_bytes(shell + g.off("task_struct", "comm"), b"xfprobe\0")
        sk = g.new_sock(IPProto.TCP, 1, "198.18.1.1", 41000, "198.18.0.1", 2307, sk_uid=1001)
        g.hash_established(sk, "198.18.1.1", 41000, "198.18.0.1", 2307)
        g.add_fd(shell, 3, sk)
        own = gi.lookup(_flow(IPProto.TCP, "198.18.1.1", 41000, "198.18.0.1", 2307))
        assert own is not None and own.holders_known
        assert [(o.pid, o.uid, o.euid, o.comm) for o in own.owners] == [
            (500, 1001, 1001, "xfprobe")
        ]
        # The index learnt it too: ps and later lookups see the task as it is now.
        again = gi.lookup(_flow(IPProto.TCP, "198.18.1.1", 41000, "198.18.0.1", 2307))
        assert again is not None and again.owners[0].uid == 1001


def test_udp_lookup_keeps_the_best_score_and_stops_at_an_exact_match() -> None:
    """udp4_lib_lookup2's scoring over the port's chain: a connected sock of the flow beats
    the wildcard one bound to the same port whichever comes first; the chain is followed only
    up to an exact match (a cycle behind it is never reached), and past a wildcard one."""
    g = standard_guest()
    conn = g.new_sock(IPProto.UDP, 1, "198.18.1.1", 5353, "198.18.0.1", 9999, sk_uid=1000)
    g.hash_udp(conn, 5353)  # head of the chain, before the wildcard [0.0.0.0]:5353 (uid 1001)
    t = _tables(g)
    exact = t.find(_flow(IPProto.UDP, "198.18.1.1", 5353, "198.18.0.1", 9999))
    assert exact is not None and exact.sock.address == conn and exact.sock.sk_uid == 1000
    other = t.find(_flow(IPProto.UDP, "198.18.1.1", 5353, "198.18.0.2", 9999))
    assert other is not None and other.sock.sk_uid == 1001 and not t.errors
    # The wildcard sock (second on the chain) now points back at the head: a cycle.
    node_off = g.off("sock_common", "skc_node")
    assert other.sock.address != conn
    g.w(other.sock.address + node_off, "<Q", conn + node_off)
    again = t.find(_flow(IPProto.UDP, "198.18.1.1", 5353, "198.18.0.1", 9999))
    assert again is not None and again.sock.address == conn and not t.errors
    # A flow that needs the whole chain meets the cycle and says so.
    t.find(_flow(IPProto.UDP, "198.18.1.1", 5353, "198.18.0.2", 9999))
    assert [i.reason for i in t.errors] == [WalkReason.CYCLE]


def test_flow_hash_is_computed_once_and_equal_for_equal_flows() -> None:
    a = _flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.1", 40000)
    b = _flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.1", 40000)
    c = dataclasses.replace(a, rport=40001)
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert c != a and hash(c) == hash(_flow(IPProto.TCP, "198.18.1.1", 80, "198.18.0.1", 40001))
    assert "_hash" not in repr(a)
    import copy
    import pickle

    assert pickle.loads(pickle.dumps(a)) == a and copy.copy(a) == a
    assert hash(pickle.loads(pickle.dumps(a))) == hash(a)


def test_locator_takes_the_kernel_root_from_cr3_without_a_memory_scan() -> None:
    """With the vCPU's registers, the kernel is located from CR3 (a user process's tables
    under PTI) but keeps the kernel's own init_top_pgt as its root, the same location the
    VMCOREINFO note gives, without scanning memory; registers that lead nowhere fall back
    to the note."""
    from xfgate.vmi.qmp import ControlRegisters

    g = FakeGuest()
    user = g.pa(g.alloc(0x1000, 0x2000))  # a process's top table: the kernel half copied
    g.buf[user + 0x800 : user + 0x1000] = g.buf[g.root + 0x800 : g.root + 0x1000]
    finds: list[bytes] = []
    memory = g.memory
    real_find = memory.find

    def counting_find(needle: bytes, start: int = 0) -> int:
        finds.append(needle)
        return real_find(needle, start)

    memory.find = counting_find  # type: ignore[method-assign]
    regs = ControlRegisters(user | 0x5, 0x6F0)
    loc = KernelLocator(memory, g.profile, lambda: regs).locate()
    assert finds == []  # no scan
    note = from_vmcoreinfo(memory, g.profile)
    assert note is not None
    assert (loc.virt_shift, loc.phys_base, loc.root, loc.levels, loc.method) == (
        note.virt_shift,
        note.phys_base,
        note.root,
        note.levels,
        "cr3",
    )
    assert loc.root == g.root != user
    nowhere = ControlRegisters(0x7FF000, 0x6F0)  # an empty table: nothing mapped
    assert KernelLocator(memory, g.profile, lambda: nowhere).locate().method == "vmcoreinfo"


def test_decoded_addresses_are_interned_and_bounded() -> None:
    """decode_inet_sock with an interning dict: equal addresses are one object, the dict
    never grows past MAX_INTERNED (hostile memory full of distinct addresses)."""
    from ipaddress import IPv4Address, IPv6Address

    from xfgate.vmi import linux

    interned: dict[bytes, IPv4Address | IPv6Address] = {}
    a = linux._address(b"\x7f\x00\x00\x01", interned)
    assert a is linux._address(b"\x7f\x00\x00\x01", interned) and str(a) == "127.0.0.1"
    six = linux._address(bytes(15) + b"\x01", interned)
    assert str(six) == "::1" and six is linux._address(bytes(15) + b"\x01", interned)
    for i in range(linux.MAX_INTERNED + 100):
        assert int(linux._address(i.to_bytes(4, "big"), interned)) == i
    assert len(interned) == linux.MAX_INTERNED
    assert str(linux._address(b"\x7f\x00\x00\x02", None)) == "127.0.0.2"


def test_a_listener_lookup_is_given_again_only_while_every_byte_it_read_is_the_same() -> None:
    """The grant keeper asks the same flows four times a second: find_listener answers
    from its last lookup while every read it made gives the same bytes, and looks up afresh
    on any difference: a blocked owner's listener bound beside the granted one (another
    bucket's head), a listener closed in place (its state byte), a torn chain."""
    g = standard_guest()
    t = _tables(g)
    flow = _flow(IPProto.TCP, "198.18.1.1", 80, "0.0.0.0", 0)
    first = t.find_listener(flow)
    assert first is not None and first.sock.lport == 80 and first.sock.sk_uid == 0
    assert t.find_listener(flow) is first and (t.listener_lookups, t.listener_replays) == (2, 1)
    # A specific-address listener on the same port, created by uid 1001: it wins the lookup.
    rival = g.new_sock(IPProto.TCP, 10, "198.18.1.1", 80, "0.0.0.0", 0, sk_uid=1001)
    g.hash_listener(rival, "198.18.1.1", 80)
    found = t.find_listener(flow)
    assert found is not None and found.sock.address == rival and found.sock.sk_uid == 1001
    assert t.listener_replays == 1
    assert t.find_listener(flow) is found and t.listener_replays == 2
    # Closed in place (TCP_CLOSE): no longer a listener, the wildcard one answers again.
    g.w(rival + g.off("sock_common", "skc_state"), "<B", 7)
    again = t.find_listener(flow)
    assert again is not None and again.sock.address == first.sock.address
    assert t.listener_replays == 2
    # A chain that cannot be read is an error, and such a lookup is never given again.
    g.w(rival + g.off("sock_common", "skc_state"), "<B", 10)
    g.w(rival + g.off("sock_common", "skc_nulls_node"), "<Q", 0xFFFF_FFFF_FFFF_0000)
    t.find_listener(flow)
    assert t.errors and flow not in t._listener_memo
