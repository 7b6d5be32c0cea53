"""The holder resolver's reference count shortcut (xfgate.vmi.holders): a new sock's holders
settled without reading every fd table when the slots found account for the file's
`f_count`, and every way a count can lie ending in the whole search, never in a missed holder."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable

from tests.vmi_fakes import FakeGuest, addr, fake_domain, standard_guest
from xfgate.flow import Flow, Ownership
from xfgate.inet import IPProto
from xfgate.vmi.holders import (
    MAP_ARRAY_BYTES,
    PROBE_BYTE,
    PROBE_HITS,
    RefLayout,
    TableMap,
    find_all,
)
from xfgate.vmi.introspect import GuestIntrospector
from xfgate.vmi.memory import BufferMemory
from xfgate.vmi.walk import Deadline

CROWD = 40  # other thread groups: what the shortcut does not read


def _crowded() -> FakeGuest:
    g = standard_guest()
    for i in range(CROWD):
        g.add_task(1000 + i, f"worker{i}", uid=1000)
    return g


def _udp(g: FakeGuest, port: int, sk_uid: int = 0) -> tuple[int, Flow]:
    sk = g.new_sock(IPProto.UDP, 7, "198.18.1.1", port, "198.18.0.1", 53, sk_uid=sk_uid)
    g.hash_udp(sk, port)
    return sk, Flow(IPProto.UDP, addr("198.18.1.1"), port, addr("198.18.0.1"), 53)


def _holders(own: Ownership | None) -> list[tuple[int, int]]:
    assert own is not None and own.holders_known
    return [(o.pid, o.fd) for o in own.owners]


def _lookup(gi: GuestIntrospector, flow: Flow) -> tuple[Ownership | None, int, int]:
    """The answer, whether the count settled it, and the fd tables read for it."""
    cc = gi.crosscheck
    by_count, tables = cc.by_count, cc.tables_read
    own = gi.lookup(flow)
    return own, cc.by_count - by_count, cc.tables_read - tables


def test_the_profiles_say_where_the_count_is() -> None:
    g = standard_guest()
    refs = RefLayout.from_profile(g.profile)
    assert refs is not None and refs.count_bias == 0
    assert refs.file_count == g.off("file", "f_count")


def test_a_sock_its_creator_alone_holds_is_settled_without_the_other_tables() -> None:
    g = _crowded()
    app = g.add_task(500, "app", uid=0)
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=60) as gi:
        assert gi.walk().complete
        sk, flow = _udp(g, 40001)
        g.add_fd(app, 7, sk)
        own, by_count, tables = _lookup(gi, flow)
        assert _holders(own) == [(500, 7)]
        assert by_count == 1 and tables <= 2  # its own table (read twice), not the crowd's
        assert gi.crosscheck.located == 0  # settled before the TableMap was searched
        # The full walk agrees (cross-check).
        assert gi.walk().complete and gi.crosscheck.disagreements == 0


def test_a_sock_shared_with_a_child_counts_both_before_it_stops() -> None:
    """Created by one process, inherited by a child the walk saw (fork): f_count 2, the
    creator's slot accounts for one; the search goes on until the child's is found."""
    g = _crowded()
    app = g.add_task(500, "app", uid=0)
    child = g.add_task(501, "app-child", uid=0, parent=app)
    g.add_task(502, "other", uid=0)
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=60) as gi:
        gi.walk()
        sk, flow = _udp(g, 40002)
        file = g.add_fd(app, 7, sk)
        g.put_fd(g.task_at(child).fd_array, 9, file)
        own, by_count, _ = _lookup(gi, flow)
        assert _holders(own) == [(500, 7), (501, 9)] and by_count == 1


def test_a_holder_that_became_blocked_since_the_walk_is_still_found() -> None:
    """A good process created the socket and passed it (SCM_RIGHTS) to a task the walk saw as
    root that has since dropped to uid 1001: the creator's slot is not all of the count, so the
    search reaches that task, named as it is now."""
    g = _crowded()
    app = g.add_task(500, "app", uid=0)
    shell = g.add_task(600, "sh", uid=0)
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=60) as gi:
        gi.walk()
        cred = g.alloc(0x60)
        g.w(cred + g.off("cred", "uid"), "<II", 1001, 1001)
        g.w(cred + g.off("cred", "euid"), "<I", 1001)
        g.w(shell + g.off("task_struct", "real_cred"), "<QQ", cred, cred)
        sk, flow = _udp(g, 40003)
        file = g.add_fd(app, 7, sk)
        g.put_fd(g.task_at(shell).fd_array, 4, file)
        own, _, _ = _lookup(gi, flow)
        assert _holders(own) == [(500, 7), (600, 4)]
        assert own is not None and own.owners[1].uid == 1001


def test_a_reference_no_slot_accounts_for_means_the_whole_search() -> None:
    """An SCM_RIGHTS message in flight, an fdget() of a threaded process, an mmap: a reference
    no fd slot holds. The count is never reached: every table is read, the answer complete."""
    g = _crowded()
    app = g.add_task(500, "app", uid=0)
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=60) as gi:
        gi.walk()
        sk, flow = _udp(g, 40004)
        file = g.add_fd(app, 7, sk)
        g.add_count(file + g.off("file", "f_count"), 1)
        own, by_count, tables = _lookup(gi, flow)
        assert _holders(own) == [(500, 7)] and by_count == 0 and tables > CROWD


def test_counts_out_of_range_are_no_shortcut() -> None:
    g = _crowded()
    app = g.add_task(500, "app", uid=0)
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=60) as gi:
        gi.walk()
        for port, value in ((40005, 0), (40006, -1), (40007, 1 << 63)):
            sk, flow = _udp(g, port)
            file = g.add_fd(app, port - 40000, sk)
            g.w(file + g.off("file", "f_count"), "<Q", value & ((1 << 64) - 1))
            own, by_count, tables = _lookup(gi, flow)
            assert _holders(own) == [(500, port - 40000)]
            assert by_count == 0 and tables > CROWD


def test_a_table_shared_by_two_thread_groups_names_both() -> None:
    """clone(CLONE_FILES) without CLONE_THREAD: two thread groups, one table, one slot, one
    reference. Found through the creator, the other group is a holder too."""
    g = _crowded()
    app = g.add_task(500, "app", uid=0)
    twin = g.add_task(501, "twin", uid=1001, with_files=False)
    table = g.task_at(app).files
    g.w(twin + g.off("task_struct", "files"), "<Q", table)
    g.add_count(table + g.off("files_struct", "count"), 1, 4)
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=60) as gi:
        gi.walk()
        sk, flow = _udp(g, 40008)
        g.add_fd(app, 7, sk)
        own, by_count, _ = _lookup(gi, flow)
        assert _holders(own) == [(500, 7), (501, 7)] and by_count == 1
        # A third task on that table the walk never saw (files_struct.count 3, two known):
        # not accounted for, the whole search (which still names what it can read).
        g.add_count(table + g.off("files_struct", "count"), 1, 4)
        sk, flow = _udp(g, 40009)
        g.add_fd(app, 8, sk)
        own, by_count, tables = _lookup(gi, flow)
        assert _holders(own) == [(500, 8), (501, 8)] and by_count == 0 and tables > CROWD


def test_a_thread_with_its_own_table_is_no_shortcut() -> None:
    """A threaded process one of whose threads unshare(CLONE_FILES)d: which threads use which
    table is not known, so its tables never settle a count."""
    g = _crowded()
    app = g.add_task(500, "app", uid=0)
    own_files, own_fds = g.new_files()
    g.add_thread(app, 510, files=own_files)
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=60) as gi:
        gi.walk()
        sk, flow = _udp(g, 40010)
        file = g.add_fd(app, 7, sk)
        g.put_fd(own_fds, 3, file)
        own, by_count, tables = _lookup(gi, flow)
        assert _holders(own) == [(500, 3), (500, 7)] and by_count == 0 and tables > CROWD


class HookedMemory(BufferMemory):
    """Guest memory that runs `hook(n, after)` around the n-th read of physical address `at`
    (the guest acting between the resolver's reads); of `length` bytes only, when set (the
    fd array's own read)."""

    def __init__(self, g: FakeGuest) -> None:
        super().__init__(g.buf, "hooked fake guest")
        self.at = -1
        self.length = -1
        self.hook: Callable[[int, bool], None] = lambda n, after: None
        self.hits = 0

    def read(self, paddr: int, length: int) -> bytes:
        if paddr != self.at or self.length not in (-1, length):
            return super().read(paddr, length)
        self.hits += 1
        self.hook(self.hits, False)
        data = super().read(paddr, length)
        self.hook(self.hits, True)
        return data


def test_a_dup_racing_the_search_cannot_hide_a_holder() -> None:
    """The attacker's race: the creator (good) dup()s the socket just before its table is read
    and closes the dup just after, so the slots found equal the count read before the search
    (and after it) while another holder (a shell that became uid 1001 since the walk: not
    watched yet) was not read. The holding table is read again before the count is trusted:
    the dup is gone, the count does not settle, the whole search finds the shell."""
    g = _crowded()
    app = g.add_task(500, "app", uid=0)
    shell = g.add_task(600, "sh", uid=0)
    mem = HookedMemory(g)
    with GuestIntrospector(fake_domain(), g.profile, memory=mem, min_rewalk_seconds=60) as gi:
        gi.walk()
        sk, flow = _udp(g, 40011)
        file = g.add_fd(app, 7, sk)
        # The shell's table grew since the walk: where the walk saw it (TableMap) it is not.
        g.put_fd(_grow(g, shell), 4, file)  # f_count 2
        fds = g.task_at(app).fd_array

        def race(n: int, after: bool) -> None:
            # Read 1: the resolver's read of the creator's table (searched before the TableMap),
            # 2 its read again before the count settles.
            if n == 1:
                g.put_fd(fds, 8, 0 if after else file)  # dup before the read, close after

        mem.at, mem.length, mem.hook = g.pa(fds), 64 * 8, race
        own, by_count, _ = _lookup(gi, flow)
        assert mem.hits >= 2
        # What the tables held when read (the dup included), and the shell.
        assert _holders(own) == [(500, 7), (500, 8), (600, 4)] and by_count == 0


def test_a_resolved_sock_whose_address_is_another_socket_at_the_walk_is_no_disagreement() -> None:
    """The slab reuses a closed sock's address within milliseconds (seen under the outgoing
    sweep's churn: hundreds of false "disagreements" a run). The walk's cross-check compares
    a resolution only with the same socket; another one there is counted as reused. The same
    socket with other holders is still a disagreement."""
    g = _crowded()
    app = g.add_task(500, "app", uid=0)
    other = g.add_task(600, "other", uid=1000)
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=60) as gi:
        assert gi.walk().complete
        sk, flow = _udp(g, 40011)
        g.add_fd(app, 7, sk)
        assert _holders(gi.lookup(flow)) == [(500, 7)]
        # Closed; another socket (other port, other creator) made at the same address.
        g.put_fd(g.task_at(app).fd_array, 7, 0)
        g.w(sk + g.off("sock_common", "skc_num"), "<H", 40012)
        g.w(sk + g.off("sock", "sk_uid"), "<I", 1000)
        g.add_fd(other, 9, sk)
        assert gi.walk().complete
        cc = gi.crosscheck
        assert (cc.disagreements, cc.reused) == (0, 1)
        # The same socket passed to another holder: a real disagreement.
        sk2, flow2 = _udp(g, 40013)
        g.add_fd(app, 8, sk2)
        assert _holders(gi.lookup(flow2)) == [(500, 8)]
        g.put_fd(g.task_at(app).fd_array, 8, 0)
        g.add_fd(other, 10, sk2)
        assert gi.walk().complete and cc.disagreements == 1


def test_a_child_of_a_task_forked_into_a_reused_task_struct_keeps_its_lineage() -> None:
    """Red team `spawn` (found by CI): the blocked shell forks the probe into the task_struct
    of a task that exited since the walk, and the probe forks the child that connects. The
    new task at the known address replaces the gone one: the child's ancestors reach the
    shell (before the fix they stopped at its parent, and the first SYN was a settled accept)."""
    g = _crowded()
    shell = g.add_task(133, "sh", uid=1001)
    gone = g.add_task(151, "sleep", uid=1001)
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=60) as gi:
        assert gi.walk().complete
        g.exit_task(gone)
        probe = g.add_task(171, "xfprobe", uid=1001, parent=shell, at=gone)
        child = g.add_task(174, "xfprobe", uid=1001, parent=probe)
        sk, flow = _udp(g, 40021, sk_uid=1001)
        g.add_fd(child, 3, sk)
        own = gi.lookup(flow)
        assert own is not None and [o.pid for o in own.owners] == [174]
        assert own.owners[0].ancestors[:2] == (171, 133)


# -- where the last walk saw each fd array (holders.TableMap) ----------------------------------


def _passed(g: FakeGuest, receiver: int, fd: int, port: int) -> tuple[int, Flow]:
    """A socket whose file neither f_cred nor sk_uid ties to its holder, as crowd.c makes them
    (opened as root, then setuid) and as SCM_RIGHTS hands them over (f_cred the sender's, a
    cred no task holds once it exited): only `receiver` holds it, at `fd`."""
    sk, flow = _udp(g, port, sk_uid=0)
    file = g.add_fd(receiver, fd, sk)
    gone = g.alloc(0x60)  # a cred no task holds now
    g.w(file + g.off("file", "f_cred"), "<Q", gone)
    return file, flow


def _grow(g: FakeGuest, task: int, max_fds: int = 128) -> int:
    """expand_fdtable(): a new fdtable and fd array, the old slots copied, files->fdt
    switched; the old array stays as it was (freed, not cleared). Returns the new array."""
    fake = g.task_at(task)
    fdt, new = g.alloc(0x30), g.alloc(max_fds * 8)
    old = bytes(g.buf[g.pa(fake.fd_array) : g.pa(fake.fd_array) + fake.max_fds * 8])
    g.buf[g.pa(new) : g.pa(new) + len(old)] = old
    g.w(fdt + g.off("fdtable", "max_fds"), "<I", max_fds)
    g.w(fdt + g.off("fdtable", "fd"), "<Q", new)
    g.w(fake.files + g.off("files_struct", "fdt"), "<Q", fdt)
    return new


def test_a_sock_no_cred_or_uid_names_is_found_where_the_walk_saw_its_holders_table() -> None:
    """The crowd's case: f_cred a cred no task holds, sk_uid 0 (root's groups searched for
    nothing). The fd array the last walk located holds the file: that table first, settled by
    the count; not the crowd's tables one by one (without the map: every table before it)."""
    g = _crowded()
    app = g.add_task(500, "app", uid=1000)
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=60) as gi:
        assert gi.walk().complete
        _, flow = _passed(g, app, 7, 40021)
        located = gi.crosscheck.located
        own, by_count, tables = _lookup(gi, flow)
        assert _holders(own) == [(500, 7)]
        assert by_count == 1 and tables <= 2 and gi.crosscheck.located == located + 1
        assert gi.walk().complete and gi.crosscheck.disagreements == 0


def test_a_table_that_grew_since_the_walk_is_searched_all_the_same() -> None:
    """The receiver's table grew after the walk (its file at fd 70, in an array the walk never
    saw): the map names nothing, the count is not accounted for, every table is read."""
    g = _crowded()
    app = g.add_task(500, "app", uid=1000)
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=60) as gi:
        assert gi.walk().complete
        new = _grow(g, app)
        g.task_at(app).fd_array, g.task_at(app).max_fds = new, 128
        _, flow = _passed(g, app, 70, 40022)
        own, _, tables = _lookup(gi, flow)
        assert _holders(own) == [(500, 70)] and tables > CROWD


def test_a_stale_array_holding_the_file_names_no_holder() -> None:
    """Where the walk saw a table's array, the file pointer is found, but the table moved to a
    new array since (the old one freed, its bytes still there): the named table is read
    through the page tables, holds nothing, is no holder; the real one is found and the count
    settles on it alone."""
    g = _crowded()
    app = g.add_task(500, "app", uid=1000)
    decoy = g.add_task(600, "decoy", uid=1001)
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=60) as gi:
        assert gi.walk().complete
        old = g.task_at(decoy).fd_array
        _grow(g, decoy)
        file, flow = _passed(g, app, 7, 40023)
        g.w(old + 5 * 8, "<Q", file)  # a stale copy: no reference counted
        own, by_count, _ = _lookup(gi, flow)
        assert _holders(own) == [(500, 7)] and by_count == 1


def test_the_map_over_memory_it_cannot_read_names_nothing_and_never_raises() -> None:
    """Hostile or torn: an fd array that does not translate is left out of the map, a span
    past the end of memory is skipped; the search of the rest still answers."""
    g = _crowded()
    app = g.add_task(500, "app", uid=1000)
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=60) as gi:
        assert gi.walk().complete
        file, _ = _passed(g, app, 7, 40024)
        space = gi.boot().space
        fake = g.task_at(app)
        arrays = [(fake.files, fake.fd_array, 64 * 8), (0x1234, 0xFFFF_FFFF_0000_0000, 4096)]
        tmap = TableMap.build(arrays, space)
        assert set(tmap.tables) == {fake.files}
        needle = struct.pack("<Q", file)
        assert tmap.holding(space.memory, needle, Deadline.after(1.0)) == {fake.files}
        beyond = dataclasses.replace(tmap, spans=((g.size - 8, 4096), *tmap.spans))
        assert beyond.holding(space.memory, needle, Deadline.after(1.0)) == {fake.files}
        worker = g.tasks[-2]  # the crowd's last: the pointer's bytes unaligned in its array
        g.w(worker.fd_array + 12, "<Q", file)
        unaligned = TableMap.build([(worker.files, worker.fd_array, 64 * 8)], space)
        assert unaligned.holding(space.memory, needle, Deadline.after(1.0)) == set()
        assert tmap.holding(space.memory, needle, Deadline.after(-1.0)) == set()  # time's up


def test_find_all_past_the_probe_bound_finds_every_needle() -> None:
    """The probe byte everywhere (more than PROBE_HITS of it): the rest is searched for the
    needle itself, from where the probe stopped; nothing is found twice or missed."""
    needle = struct.pack("<Q", 0xFFFF_8880_04A3_C100)
    probe = needle[PROBE_BYTE : PROBE_BYTE + 1]
    blob = probe * (PROBE_HITS * 3) + needle + probe * 5 + needle[:7] + b"\0" + needle
    hits = list(find_all(blob, needle))
    first = PROBE_HITS * 3
    assert hits == [first, first + 8 + 5 + 8]
    assert list(find_all(needle + needle, needle)) == [0, 8]
    assert list(find_all(b"\0" * 64, needle)) == []


def test_a_huge_fd_table_is_searched_only_in_its_first_part_by_the_map() -> None:
    """An fd bomb's table (or any huge one) cannot make every new flow's map search long: the
    map holds its first MAP_ARRAY_BYTES only; a holder past them is still found, by the whole
    search (the count not accounted for by the map's tables)."""
    g = _crowded()
    slots = MAP_ARRAY_BYTES // 8 + 64
    app = g.add_task(500, "app", uid=1000, max_fds=slots)
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=60) as gi:
        assert gi.walk().complete
        fake = g.task_at(app)
        tmap = TableMap.build([(fake.files, fake.fd_array, slots * 8)], gi.boot().space)
        assert max(tmap.ends) - min(tmap.starts) <= MAP_ARRAY_BYTES
        _, flow = _passed(g, app, slots - 1, 40025)
        own, _, tables = _lookup(gi, flow)
        assert _holders(own) == [(500, slots - 1)] and tables > CROWD
        _, flow = _passed(g, app, 3, 40026)
        own, by_count, tables = _lookup(gi, flow)
        assert _holders(own) == [(500, 3)] and by_count == 1 and tables <= 2
