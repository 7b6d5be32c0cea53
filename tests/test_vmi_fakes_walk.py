"""Walkers over the synthetic guest: what was built is what is read back; corruption is bounded."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.vmi_fakes import FakeGuest, standard_guest, worker_profile
from xfgate.inet import IPProto
from xfgate.vmi.introspect import ps_document
from xfgate.vmi.kaslr import from_vmcoreinfo
from xfgate.vmi.linux import KernelLayout, WalkBounds, walk_guest, walk_once
from xfgate.vmi.paging import AddressSpace
from xfgate.vmi.qmp import PauseRecord
from xfgate.vmi.walk import WalkIssue, WalkReason


def _walk(g: FakeGuest, bounds: WalkBounds | None = None):  # type: ignore[no-untyped-def]
    space = AddressSpace(g.memory, g.root, g.levels)
    return walk_guest(space, KernelLayout.from_profile(g.profile), g.virt_shift, bounds)


@pytest.mark.parametrize("levels", [4, 5])
def test_walk_reads_back_every_task_and_socket(levels: int) -> None:
    g = standard_guest(levels)
    result = _walk(g)
    assert result.errors == []
    doc = ps_document(result)
    want = [
        {"pid": t.pid, "tgid": t.pid, "ppid": t.ppid, "uid": t.uid, "euid": t.euid, "comm": t.comm}
        for t in sorted(g.tasks, key=lambda t: t.pid)
    ]
    assert doc["processes"] == want
    got = {(s["pid"], s["fd"]): s for s in doc["sockets"]}
    # bob's fd 8 is a file whose f_op is not socket_file_ops: not a socket.
    assert sorted(got) == [(100, 3), (100, 4), (100, 5), (200, 3), (300, 7)]
    assert got[(100, 4)] == {
        "pid": 100,
        "fd": 4,
        "proto": "tcp",
        "family": 6,
        "local": "::",
        "lport": 8080,
        "remote": "::",
        "rport": 0,
        "state": "LISTEN",
    }
    assert got[(200, 3)]["remote"] == "2001:2::1" and got[(200, 3)]["rport"] == 443
    assert got[(300, 7)]["proto"] == "udp" and got[(300, 7)]["state"] == "CLOSE"
    assert got[(100, 5)]["state"] == "ESTABLISHED" and got[(100, 5)]["local"] == "198.18.1.1"


def test_uids_come_from_real_cred_and_sk_uid_from_the_sock() -> None:
    g = standard_guest()
    result = _walk(g)
    bob = next(t for t in result.tasks if t.pid == 300)
    assert (bob.uid, bob.euid) == (1001, 0)
    alice_sock = next(s for s in result.sockets if s.pid == 200)
    assert alice_sock.sock.sk_uid == 1000


def _list_order(g: FakeGuest) -> list[int]:
    """pids in task-list order (the walk reads them in this order)."""
    return [t.pid for t in _walk(g).tasks]


def test_cyclic_task_list_stops_at_the_cycle_check() -> None:
    g = standard_guest()
    order = _list_order(g)
    assert order == [1, 2, 100, 200, 300]
    t100 = next(t for t in g.tasks if t.pid == 100).address
    t300 = next(t for t in g.tasks if t.pid == 300).address
    tasks = g.off("task_struct", "tasks")
    # 300.next -> 100 (a cycle that skips the head). Every prev pointer is left as built, so the
    # walk meets 100 again before reading it: the cycle check, not next->prev, must stop it.
    g.w(t300 + tasks, "<Q", t100 + tasks)
    result = _walk(g, WalkBounds(retries=1))
    assert result.errors == [WalkIssue("task list", WalkReason.CYCLE, t100 + tasks, step=5)]
    assert result.attempts == 1
    assert [t.pid for t in result.tasks] == order  # what it read before the cycle


def test_self_loop_with_valid_prev_is_a_cycle() -> None:
    g = standard_guest()
    t = next(t for t in g.tasks if t.pid == 200).address
    node = t + g.off("task_struct", "tasks")
    g.w(node, "<Q", node)  # next = itself; prev still the task before it (consistent)
    result = _walk(g, WalkBounds(retries=1))
    assert result.errors == [WalkIssue("task list", WalkReason.CYCLE, node, step=4)]
    assert [t.pid for t in result.tasks] == [1, 2, 100, 200]  # read before the loop


def test_bad_prev_is_reported_as_such() -> None:
    g = standard_guest()
    t = next(t for t in g.tasks if t.pid == 200).address
    node = t + g.off("task_struct", "tasks")
    g.w(node + 8, "<Q", 0xFFFF888000001000)  # prev of 200 points elsewhere
    result = _walk(g, WalkBounds(retries=1))
    [issue] = result.errors
    assert (issue.what, issue.reason, issue.address, issue.step) == (
        "task list",
        WalkReason.BAD_PREV,
        node,
        3,
    )


def test_wild_next_pointer_is_out_of_range() -> None:
    g = standard_guest()
    t = next(t for t in g.tasks if t.pid == 100).address
    g.w(t + g.off("task_struct", "tasks"), "<Q", 0x4141414141414141)
    result = _walk(g, WalkBounds(retries=1))
    [issue] = result.errors
    assert (issue.reason, issue.address, issue.step) == (
        WalkReason.POINTER_OUT_OF_RANGE,
        0x4141414141414141,
        3,
    )


def test_unmapped_next_is_unreadable() -> None:
    g = standard_guest()
    t = next(t for t in g.tasks if t.pid == 100).address
    g.w(t + g.off("task_struct", "tasks"), "<Q", 0xFFFF999999999000)  # kernel half, unmapped
    result = _walk(g, WalkBounds(retries=1))
    [issue] = result.errors
    assert (issue.reason, issue.address, issue.step) == (
        WalkReason.UNREADABLE,
        0xFFFF999999999000,
        3,
    )


def test_wild_pointers_are_reported_not_followed() -> None:
    g = standard_guest()
    alice = next(t for t in g.tasks if t.pid == 200)
    g.w(alice.fd_array + 3 * 8, "<Q", 0x4141414141414141)  # user-space garbage as a file
    web = next(t for t in g.tasks if t.pid == 100)
    g.w(web.address + g.off("task_struct", "real_cred"), "<Q", 0xFFFF999999999000)  # unmapped
    result = _walk(g, WalkBounds(retries=1))
    assert WalkIssue(
        "file of pid 200 fd 3", WalkReason.POINTER_OUT_OF_RANGE, 0x4141414141414141
    ) in (result.errors)
    unread = [e for e in result.errors if e.what == "cred of pid 100"]
    assert [(e.reason, e.address) for e in unread] == [(WalkReason.UNREADABLE, 0xFFFF999999999000)]
    assert {t.pid for t in result.tasks} == {1, 2, 100, 200, 300}  # the rest still read


def test_absurd_max_fds_is_capped() -> None:
    g = standard_guest()
    web = next(t for t in g.tasks if t.pid == 100)
    fdt = struct.unpack_from("<Q", g.buf, g.pa(web.files + g.off("files_struct", "fdt")))[0]
    g.w(fdt + g.off("fdtable", "max_fds"), "<I", 0xFFFFFFFF)
    result = _walk(g, WalkBounds(max_fds=128, retries=1))
    issue, *rest = result.errors
    # The 128 slots read run past the fake's real array: other data there is no file pointer.
    assert {e.reason for e in rest} <= {WalkReason.POINTER_OUT_OF_RANGE}
    assert all(int(e.what.rsplit(" ", 1)[1]) < 128 for e in rest)  # nothing past the cap
    assert (issue.what, issue.reason, issue.address) == (
        "fd table of pid 100",
        WalkReason.STEP_BOUND,
        fdt,
    )
    assert "claims 4294967295 fds" in str(issue)
    assert {(s.pid, s.fd) for s in result.sockets} >= {(100, 3), (100, 4), (100, 5)}


def test_task_count_bound() -> None:
    g = standard_guest()
    result = _walk(g, WalkBounds(max_tasks=3, retries=1))
    [issue] = result.errors
    assert (issue.what, issue.reason, issue.step) == ("task list", WalkReason.STEP_BOUND, 3)
    assert [t.pid for t in result.tasks] == [1, 2, 100]  # exactly the bound, no more


def test_time_bound_stops_a_long_walk() -> None:
    g = FakeGuest()
    for pid in range(1, 200):
        g.add_task(pid, f"t{pid}")
    result = _walk(g, WalkBounds(seconds=0.0, retries=1))
    [issue] = result.errors
    assert (issue.what, issue.reason, issue.step) == ("task list", WalkReason.TIME_BOUND, 0)


def test_persistent_errors_retry_then_pause_once() -> None:
    g = standard_guest()
    t = next(t for t in g.tasks if t.pid == 200)
    g.w(t.address + g.off("task_struct", "tasks") + 8, "<Q", 0xFFFF888000001000)  # bad prev
    pauses: list[int] = []

    @contextmanager
    def fake_pause() -> Iterator[PauseRecord]:
        pauses.append(1)
        yield PauseRecord(seconds=0.001)

    space = AddressSpace(g.memory, g.root, g.levels)
    result = walk_guest(
        space, KernelLayout.from_profile(g.profile), g.virt_shift, WalkBounds(retries=2), fake_pause
    )
    assert result.attempts == 3 and pauses == [1]
    assert result.paused_seconds == 0.001
    assert [e.reason for e in result.errors] == [WalkReason.BAD_PREV]


def test_clean_walk_never_pauses() -> None:
    g = standard_guest()
    called: list[int] = []

    @contextmanager
    def fake_pause() -> Iterator[PauseRecord]:
        called.append(1)
        yield PauseRecord()

    space = AddressSpace(g.memory, g.root, g.levels)
    result = walk_guest(space, KernelLayout.from_profile(g.profile), g.virt_shift, None, fake_pause)
    assert result.complete and called == [] and result.attempts == 1


def test_walk_once_with_wrong_shift_reports_instead_of_raising() -> None:
    g = standard_guest()
    space = AddressSpace(g.memory, g.root, g.levels)
    result = walk_once(
        space, KernelLayout.from_profile(g.profile), g.virt_shift + (2 << 20), WalkBounds()
    )
    [issue] = result.errors
    assert result.tasks == [] and (issue.what, issue.reason) == ("task list", WalkReason.UNREADABLE)
    assert "init_task" in str(issue)


def test_kaslr_of_the_fake_matches_its_construction() -> None:
    g = standard_guest()
    loc = from_vmcoreinfo(g.memory, g.profile)
    assert loc is not None
    assert (loc.virt_shift, loc.phys_base, loc.root) == (g.virt_shift, g.phys_base, g.root)


# -- issue 9: every thread's files, dup()s, merged index ---------------------------------------


def test_a_thread_with_its_own_files_is_walked_and_attributed_to_the_group() -> None:
    g = standard_guest()
    leader = g.add_task(500, "evil", uid=1001)
    g.add_thread(leader, 501)  # shares the leader's table
    files, fd_array = g.new_files()
    g.add_thread(leader, 502, files=files)  # unshare(CLONE_FILES)
    sk = g.new_sock(IPProto.TCP, 2, "198.18.1.1", 40000, "198.18.0.1", 443, sk_uid=1001)
    file = g.add_fd(g.tasks[0].address, 9, sk)  # any file pointer will do: put it in 502's table
    g.put_fd(fd_array, 3, file)
    g.put_fd(g.task_at(g.tasks[0].address).fd_array, 9, 0)
    result = _walk(g)
    assert result.errors == []
    evil = next(t for t in result.tasks if t.pid == 500)
    assert evil.threads == 3 and evil.thread_files == (files,)
    assert [(s.pid, s.fd) for s in result.sockets if s.sock.address == sk] == [(500, 3)]
    assert [t.pid for t in result.tasks].count(500) == 1  # threads are no tasks of their own


def test_dups_of_one_socket_are_resolved_once_and_folded() -> None:
    g = FakeGuest()
    sk = g.new_sock(IPProto.UDP, 7, "0.0.0.0", 9999, "0.0.0.0", 0, sk_uid=1001)
    file = 0
    for pid in range(10, 15):
        t = g.add_task(pid, "bomb", uid=1001, max_fds=512)
        if not file:
            file = g.add_fd(t, 3, sk)
        for fd in range(3, 500):
            g.put_fd(g.task_at(t).fd_array, fd, file)
    result = _walk(g, WalkBounds(fds_per_file=4, retries=1))
    assert result.errors == [] and result.files == 1
    assert result.folded_fds == 5 * (497 - 4) and result.fd_slots == 5 * 512
    assert sorted({s.pid for s in result.sockets}) == [10, 11, 12, 13, 14]
    assert [s.fd for s in result.sockets if s.pid == 12] == [3, 4, 5, 6]
    # A walk-wide bound on fd slots: what was read is kept, the bound is reported.
    result = _walk(g, WalkBounds(max_fd_slots=1200, retries=1))
    assert {s.pid for s in result.sockets} == {10, 11, 12}  # 12: its first 176 slots
    assert result.fd_slots == 1200
    assert [e.reason for e in result.errors] == [WalkReason.STEP_BOUND] * 3


@pytest.mark.parametrize("full_worker_id", [True, False])
def test_rescuer_names_as_proc_shows_them(full_worker_id: bool) -> None:
    """6.10+ /proc: "kworker/R-" + the workqueue's full name (longer than comm); before
    format_worker_id existed, the comm."""
    g = standard_guest(profile=worker_profile(full_worker_id))
    g.add_rescuer(40, "kvfree_rcu_reclaim")
    g.add_rescuer(41, "mm_percpu_wq")  # fits in comm: the same either way
    g.add_rescuer(42, "writeback_long_name", desc="flush-8:0", busy=True)
    g.add_rescuer(43, "ipv6_addrconf_wq", desc="addrconf")
    names = {t.pid: t.name for t in _walk(g).tasks if t.pid in (40, 41, 42, 43)}
    if full_worker_id:
        assert names == {
            40: "kworker/R-kvfree_rcu_reclaim",
            41: "kworker/R-mm_percpu_wq",
            42: "kworker/R-writeback_long_name+flush-8:0",
            43: "kworker/R-ipv6_addrconf_wq-addrconf",
        }
    else:
        assert names == {
            40: "kworker/R-kvfre",
            41: "kworker/R-mm_pe",
            42: "kworker/R-write+flush-8:0",
            43: "kworker/R-ipv6_-addrconf",
        }


def test_a_rescuer_with_a_wild_workqueue_keeps_its_comm() -> None:
    g = standard_guest(profile=worker_profile())
    t = g.add_rescuer(40, "kvfree_rcu_reclaim")
    kthread = struct.unpack_from("<Q", g.buf, g.pa(t + g.off("task_struct", "worker_private")))[0]
    worker = struct.unpack_from("<Q", g.buf, g.pa(kthread + g.off("kthread", "data")))[0]
    g.w(worker + g.off("worker", "rescue_wq"), "<Q", 0x1234)  # not a kernel pointer
    result = _walk(g)
    assert {t.pid: t.name for t in result.tasks}[40] == "kworker/R-kvfre"
