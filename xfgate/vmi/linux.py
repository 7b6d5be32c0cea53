"""Walkers over Linux kernel structures in guest memory, named like the kernel's own helpers.

`for_each_task` follows init_task.tasks (thread-group leaders), `task_files` reads a task's fd
table, `socket_from_file` recognises socket files (f_op == &socket_file_ops), `inet_sock` decodes a
struct sock. Every offset comes from the profile (KernelLayout), never from a kernel version.

Guest memory is live and attacker-controlled: every walk is bounded in steps and time, lists are
checked (`next->prev == pos`, a visited set against cycles), every pointer is checked before it is
followed, and nothing but a WalkResult with `errors` comes out. `walk_guest` retries a walk that
met inconsistent data (a torn read of memory the guest was changing) and, if that keeps happening
and it may, pauses the guest for one last walk and reports how long.
"""

from __future__ import annotations

import struct
import sys
import time
from array import array
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from itertools import compress
from operator import attrgetter, itemgetter, not_
from typing import TypeVar

from xfgate.errors import MemoryReadError, ProfileError
from xfgate.flow import IPAddress
from xfgate.inet import AddressFamily, IPProto
from xfgate.vmi.kernel_constants import (
    AF_PACKET,
    NAME_MAX,
    PATH_MAX,
    PF_KTHREAD,
    PF_WQ_WORKER,
    PID_MAX_LIMIT,
    PROC_NAME_LEN,
    TASK_COMM_LEN,
    SockType,
    tcp_state_name,
)
from xfgate.vmi.paging import AddressSpace
from xfgate.vmi.profile import Profile
from xfgate.vmi.qmp import PauseRecord
from xfgate.vmi.walk import Deadline, Links, ListSpec, WalkIssue, WalkReason, walk_list

KERNEL_SPACE_START = 0xFFFF800000000000  # lowest kernel address (4-level; 5-level is lower)
KERNEL_SPACE_START_LA57 = 0xFF00000000000000


def is_kernel_pointer(value: int, levels: int = 4) -> bool:
    """True if `value` may point into the kernel half of a 4- or 5-level address space."""
    low = KERNEL_SPACE_START_LA57 if levels == 5 else KERNEL_SPACE_START
    return low <= value <= 0xFFFFFFFFFFFFF000


_UNPACK = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


@dataclass(frozen=True, slots=True)
class Field:
    """One integer member: where it is inside a read span, and how to decode it."""

    offset: int
    fmt: str
    # The format compiled once (struct.unpack_from(fmt, ...) looks it up in a cache each call).
    _unpack: Callable[[bytes, int], tuple[int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_unpack", struct.Struct(self.fmt).unpack_from)

    def get(self, blob: bytes, base: int = 0) -> int:
        return self._unpack(blob, self.offset - base)[0]


def _int_field(profile: Profile, struct_name: str, path: str, default_size: int) -> Field:
    offset = profile.offset(struct_name, path)
    size = profile.member(struct_name, path.rsplit(".", 1)[-1]).size if "." not in path else 0
    fmt = _UNPACK.get(size or default_size)
    if fmt is None:
        raise ProfileError(f"{struct_name}.{path}: unexpected size {size}", symbol=path)
    return Field(offset, fmt)


@dataclass(frozen=True)
class KernelLayout:
    """Every offset the walkers use, taken from the profile once (not per object)."""

    task_tasks: int
    task_pid: Field
    task_tgid: Field
    task_real_parent: int
    task_real_cred: int
    task_comm: int
    task_files: int
    task_span: tuple[int, int]  # [start, end) of task_struct holding all of the above
    cred_uid: Field
    cred_euid: Field
    cred_span: tuple[int, int]
    files_fdt: int
    fdt_max_fds: Field
    fdt_fd: int
    file_f_op: int
    file_private_data: int
    file_span: tuple[int, int]
    socket_sk: int
    skc_daddr: int
    skc_rcv_saddr: int
    skc_dport: int
    skc_num: int
    skc_family: Field
    skc_state: int
    skc_v6_daddr: int
    skc_v6_rcv_saddr: int
    sk_type: Field
    sk_protocol: Field
    sk_uid: Field
    sock_span: int  # bytes of struct sock read once: up to sk_uid
    init_task: int  # link-time addresses (add the KASLR shift)
    socket_file_ops: int
    # /proc's name of kernel threads (optional: plain comm without them).
    task_flags: Field | None = None
    task_kthread: int = -1  # task_struct.worker_private (5.17+) or set_child_tid (before)
    kthread_full_name: int = -1
    kthread_data: int = -1
    worker_desc: int = -1
    worker_desc_len: int = 0
    worker_current_work: int = -1
    worker_pool: int = -1
    # Rescuer workers' full name "kworker/R-<workqueue>" (optional: their comm without them).
    worker_rescue_wq: int = -1
    wq_name: int = -1
    wq_name_len: int = 0
    # Every thread's file table (optional: the group leader's only without them).
    task_thread_node: int = -1  # task_struct.thread_node, on signal_struct.thread_head
    task_signal: int = -1
    signal_thread_head: int = -1
    # The executable's path (optional: "" without them): task->mm->exe_file->f_path.dentry,
    # then d_parent/d_name up to the root.
    task_mm: int = -1
    mm_exe_file: int = -1
    file_dentry: int = -1  # file.f_path.dentry
    dentry_parent: int = -1
    dentry_name: int = -1  # dentry.d_name, a struct qstr
    qstr_len: Field | None = None
    qstr_name: int = -1
    # Crossing mounts (optional: paths relative to the file's own mount without them):
    # path.mnt is &mount.mnt; mount.mnt_parent / mnt_mountpoint lead to where it is mounted.
    file_mnt: int = -1  # file.f_path.mnt
    mount_mnt: int = -1
    mount_parent: int = -1
    mount_mountpoint: int = -1
    # sock_common.skc_ipv6only: a bitfield, (byte offset in struct sock, bit in that byte).
    skc_ipv6only: tuple[int, int] | None = None

    @property
    def has_threads(self) -> bool:
        return self.task_thread_node >= 0

    @property
    def has_exe(self) -> bool:
        return self.task_mm >= 0 and self.qstr_len is not None

    @classmethod
    def from_profile(cls, p: Profile) -> KernelLayout:
        t = {
            name: p.offset("task_struct", name)
            for name in ("tasks", "pid", "tgid", "real_parent", "real_cred", "comm", "files")
        }
        names = _proc_name_layout(p)
        if names.get("task_flags") is not None:
            t["flags"] = p.offset("task_struct", "flags")
            t["kthread"] = int(str(names["task_kthread"]))
        extra = {**_thread_layout(p), **_exe_layout(p)}
        for name in ("task_thread_node", "task_signal", "task_mm"):
            if name in extra:
                t[name] = int(str(extra[name]))
        task_span = (min(t.values()), max(t.values()) + TASK_COMM_LEN)
        cred_uid = _int_field(p, "cred", "uid", 4)
        cred_euid = _int_field(p, "cred", "euid", 4)
        f_op = p.offset("file", "f_op")
        private_data = p.offset("file", "private_data")
        sk = "sock_common"
        common = p.offset("sock", "__sk_common") if p.has_member("sock", "__sk_common") else 0
        sk_uid = _int_field(p, "sock", "sk_uid", 4)
        v6only = None
        if p.has_member(sk, "skc_ipv6only"):
            m = p.member(sk, "skc_ipv6only")
            v6only = (common + m.offset + m.bit_offset // 8, m.bit_offset % 8)
        return cls(
            task_tasks=t["tasks"],
            task_pid=_int_field(p, "task_struct", "pid", 4),
            task_tgid=_int_field(p, "task_struct", "tgid", 4),
            task_real_parent=t["real_parent"],
            task_real_cred=t["real_cred"],
            task_comm=t["comm"],
            task_files=t["files"],
            task_span=task_span,
            cred_uid=cred_uid,
            cred_euid=cred_euid,
            cred_span=(0, max(cred_uid.offset, cred_euid.offset) + 4),
            files_fdt=p.offset("files_struct", "fdt"),
            fdt_max_fds=_int_field(p, "fdtable", "max_fds", 4),
            fdt_fd=p.offset("fdtable", "fd"),
            file_f_op=f_op,
            file_private_data=private_data,
            file_span=(min(f_op, private_data), max(f_op, private_data) + 8),
            socket_sk=p.offset("socket", "sk"),
            skc_daddr=common + p.offset(sk, "skc_daddr"),
            skc_rcv_saddr=common + p.offset(sk, "skc_rcv_saddr"),
            skc_dport=common + p.offset(sk, "skc_dport"),
            skc_num=common + p.offset(sk, "skc_num"),
            skc_family=Field(common + p.offset(sk, "skc_family"), "<H"),
            skc_state=common + p.offset(sk, "skc_state"),
            skc_v6_daddr=common + p.offset(sk, "skc_v6_daddr"),
            skc_v6_rcv_saddr=common + p.offset(sk, "skc_v6_rcv_saddr"),
            sk_type=_int_field(p, "sock", "sk_type", 2),
            sk_protocol=_int_field(p, "sock", "sk_protocol", 2),
            sk_uid=sk_uid,
            sock_span=max(sk_uid.offset + 4, p.offset("sock", "sk_protocol") + 2),
            init_task=p.symbol("init_task"),
            socket_file_ops=p.symbol("socket_file_ops"),
            skc_ipv6only=v6only,
            **names,  # type: ignore[arg-type]
            **extra,  # type: ignore[arg-type]
        )


def _proc_name_layout(p: Profile) -> dict[str, Field | int | None]:
    """Members behind /proc's names of kernel threads, or {} if the profile lacks one."""
    # 5.17 moved the kthread pointer from set_child_tid to worker_private (commit e32cf5dfbe22).
    kthread_ptr = next(
        (m for m in ("worker_private", "set_child_tid") if p.has_member("task_struct", m)), ""
    )
    needed = [("task_struct", "flags"), ("kthread", "full_name"), ("kthread", "data")]
    needed += [("worker", "desc"), ("worker", "current_work"), ("worker", "pool")]
    if not kthread_ptr or not all(p.has_member(s, m) for s, m in needed):
        return {}
    return {
        **_rescuer_layout(p),
        "task_flags": _int_field(p, "task_struct", "flags", 4),
        "task_kthread": p.offset("task_struct", kthread_ptr),
        "kthread_full_name": p.offset("kthread", "full_name"),
        "kthread_data": p.offset("kthread", "data"),
        "worker_desc": p.offset("worker", "desc"),
        "worker_desc_len": p.member("worker", "desc").size,
        "worker_current_work": p.offset("worker", "current_work"),
        "worker_pool": p.offset("worker", "pool"),
    }


def _rescuer_layout(p: Profile) -> dict[str, Field | int | None]:
    """worker->rescue_wq->name, where /proc builds a rescuer's name from them, else {}.

    Since v6.10 (commit 2a1b02bcba78, "workqueue: Refactor worker ID formatting and make
    wq_worker_comm() use full ID string") wq_worker_comm() starts from format_worker_id(), which
    for a rescuer prints "kworker/R-%s" with the workqueue's full name, longer than the
    15-character comm it was created with ("kworker/R-kvfre"). Tested by that function's
    symbol: before it, /proc showed the comm."""
    needed = [("worker", "rescue_wq"), ("workqueue_struct", "name")]
    if not p.has_symbol("format_worker_id") or not all(p.has_member(s, m) for s, m in needed):
        return {}
    return {
        "worker_rescue_wq": p.offset("worker", "rescue_wq"),
        "wq_name": p.offset("workqueue_struct", "name"),
        "wq_name_len": p.member("workqueue_struct", "name").size,
    }


def _thread_layout(p: Profile) -> dict[str, int]:
    """signal->thread_head / task_struct.thread_node (3.14+, still on 6.12 where the older
    thread_group list is gone), or {} if the profile lacks one."""
    needed = [("task_struct", "thread_node"), ("task_struct", "signal")]
    if not all(p.has_member(s, m) for s, m in [*needed, ("signal_struct", "thread_head")]):
        return {}
    return {
        "task_thread_node": p.offset("task_struct", "thread_node"),
        "task_signal": p.offset("task_struct", "signal"),
        "signal_thread_head": p.offset("signal_struct", "thread_head"),
    }


def _exe_layout(p: Profile) -> dict[str, int | Field]:
    """Members behind mm->exe_file's path, or {} if the profile lacks one."""
    needed = [
        ("task_struct", "mm"),
        ("mm_struct", "exe_file"),
        ("file", "f_path"),
        ("path", "dentry"),
        ("dentry", "d_parent"),
        ("dentry", "d_name"),
        ("qstr", "len"),
        ("qstr", "name"),
    ]
    if not all(p.has_member(s, m) for s, m in needed):
        return {}
    return {
        "task_mm": p.offset("task_struct", "mm"),
        "mm_exe_file": p.offset("mm_struct", "exe_file"),
        "file_dentry": p.offset("file", "f_path.dentry"),
        "dentry_parent": p.offset("dentry", "d_parent"),
        "dentry_name": p.offset("dentry", "d_name"),
        "qstr_len": _int_field(p, "qstr", "len", 4),
        "qstr_name": p.offset("qstr", "name"),
        **_mount_layout(p),
    }


def _mount_layout(p: Profile) -> dict[str, int]:
    needed = [("path", "mnt"), ("mount", "mnt"), ("mount", "mnt_parent")]
    if not all(p.has_member(s, m) for s, m in [*needed, ("mount", "mnt_mountpoint")]):
        return {}
    return {
        "file_mnt": p.offset("file", "f_path.mnt"),
        "mount_mnt": p.offset("mount", "mnt"),
        "mount_parent": p.offset("mount", "mnt_parent"),
        "mount_mountpoint": p.offset("mount", "mnt_mountpoint"),
    }


@dataclass(frozen=True)
class WalkBounds:
    """Limits no guest can push a walk past. The counts fit a 2,000-task guest holding
    20,000 sockets, and the fd bomb (70 processes x 4,090 dup()s of one socket) many times;
    the time bound does not (that guest walks in 2-4 s): `xfgate ps` gives its walk more."""

    max_tasks: int = 32768  # thread-group leaders
    max_threads: int = 65536  # threads over all groups (beyond the leaders)
    max_fds: int = 1 << 20  # per fd table, whatever fdtable.max_fds claims (fs.nr_open's max)
    max_fd_slots: int = 1 << 22  # fd slots read over the whole walk (32 MiB of fd arrays)
    max_files: int = 1 << 18  # distinct struct file resolved per walk (each read once)
    max_sockets: int = 1 << 18  # (process, fd, socket) entries kept
    fds_per_file: int = 16  # fds kept per (fd table, file): dup()s beyond that are counted
    max_depth: int = 64  # dentry names up an exe path
    seconds: float = 2.0  # per attempt
    retries: int = 3  # unpaused attempts before pausing (or giving up)


@dataclass(frozen=True, slots=True)
class Task:
    address: int
    pid: int
    tgid: int
    ppid: int
    uid: int
    euid: int
    comm: str  # task_struct.comm
    files: int  # struct files_struct *, 0 for none
    name: str = ""  # what /proc/PID/status shows as Name (kernel threads: longer)
    exe: str = ""  # mm->exe_file's path ("" for kernel threads or when unreadable)
    # The other files_structs of the group's threads (unshare(CLONE_FILES)), distinct.
    thread_files: tuple[int, ...] = ()
    threads: int = 1
    # task_struct.real_cred: a hint only (file.f_cred is the creator's cred, see holders.py).
    cred: int = 0

    @property
    def file_tables(self) -> tuple[int, ...]:
        """Every distinct files_struct of the thread group, the leader's first."""
        if not self.thread_files:  # the usual case, asked per task per refresh
            return (self.files,) if self.files else ()
        return tuple(dict.fromkeys(f for f in (self.files, *self.thread_files) if f))


@dataclass(frozen=True, slots=True)
class InetSock:
    """A struct sock of family AF_INET/AF_INET6, any protocol and type (the shared struct
    sock_common also heads inet_timewait_sock and request_sock, TCP by construction)."""

    address: int
    family: int  # 4 or 6
    proto: int  # sock.sk_protocol: IPProto (TCP, UDP, UDPLITE, ICMP, ...) or IPPROTO_MPTCP
    state: int
    local: IPAddress
    lport: int  # skc_num: the port, the echo id of a ping socket, the protocol of a raw one
    remote: IPAddress
    rport: int
    sk_uid: int
    sk_type: int = SockType.SOCK_STREAM
    v6only: bool = False

    @property
    def state_name(self) -> str:
        return tcp_state_name(self.state)

    @property
    def is_port_socket(self) -> bool:
        """A TCP or UDP socket as /proc/net/{tcp,udp}{,6} lists it (the ps/truth contract)."""
        return (self.proto, self.sk_type) in (
            (IPProto.TCP, SockType.SOCK_STREAM),
            (IPProto.UDP, SockType.SOCK_DGRAM),
        )

    @property
    def is_raw(self) -> bool:
        return self.sk_type == SockType.SOCK_RAW


@dataclass(frozen=True, slots=True)
class PacketSock:
    """A struct sock of family AF_PACKET: it can send any frame."""

    address: int
    sk_type: int
    sk_uid: int


@dataclass(frozen=True, slots=True)
class FdSocket:
    """A socket held by a process's fd."""

    pid: int  # tgid
    fd: int
    sock: InetSock


@dataclass(frozen=True, slots=True)
class FdPacket:
    """An AF_PACKET socket held by a process's fd."""

    pid: int  # tgid
    fd: int
    sock: PacketSock


@dataclass
class WalkResult:
    tasks: list[Task] = field(default_factory=list)
    sockets: list[FdSocket] = field(default_factory=list)  # inet sockets, every protocol
    packets: list[FdPacket] = field(default_factory=list)
    errors: list[WalkIssue] = field(default_factory=list)
    attempts: int = 0
    paused_seconds: float = 0.0
    seconds: float = 0.0
    fd_slots: int = 0  # fd-array slots read
    files: int = 0  # distinct struct file resolved
    folded_fds: int = 0  # fds beyond fds_per_file of one file in one table (not listed)
    state: RefreshState | None = None  # what the next incremental walk starts from
    counts: RefreshCounts | None = None
    # tgids whose entries are not the prior walk's objects (None: a walk without a prior)
    changed_pids: set[int] | None = None
    # The entries of each of those thread groups (its part of `sockets`, `packets`).
    changed_entries: dict[int, tuple[list[FdSocket], list[FdPacket]]] | None = None

    @property
    def complete(self) -> bool:
        return not self.errors


# What one fd table was when a walk read it: (fdtable pointer, max_fds, fd array pointer, the
# fd array's bytes). Equal fingerprints: the same files in the same slots (the file objects
# themselves may have been freed and reused: the periodic full walk cross-checks that).
TableFingerprint = tuple[int, int, int, bytes]


@dataclass
class RefreshState:
    """What a walk decoded, kept so the next refresh re-decodes only what changed: each task
    with the fields that decide it (its fingerprint), each fd table with its fingerprint, each
    file's sock. Built by every walk (full or incremental), read by the next one (`prior`)."""

    tasks: dict[int, tuple[bytes, Task]] = field(default_factory=dict)
    tables: dict[int, tuple[TableFingerprint, dict[int, list[int]]]] = field(default_factory=dict)
    socks: dict[int, InetSock | PacketSock | None] = field(default_factory=dict)
    # fd tables read afresh for a watched task: never reused, so not cross-checked (they may
    # have changed since, which is no disagreement).
    fresh: set[int] = field(default_factory=set)
    # (tgid, files_struct) of a single-table thread group -> the entries its table gave.
    held: dict[tuple[int, int], tuple[list[FdSocket], list[FdPacket]]] = field(default_factory=dict)
    # A quiet walk (`QuietPlan`): the tasks decoded afresh to be compared with the prior state
    # (task addresses) and their fd tables (files_struct addresses).
    rechecked_tasks: set[int] = field(default_factory=set)
    rechecked_tables: set[int] = field(default_factory=set)
    # The walk's entries (WalkResult.sockets, .packets): a quiet walk keeps those of the
    # thread groups it trusts.
    entries: tuple[list[FdSocket], list[FdPacket]] = field(default_factory=lambda: ([], []))
    # A quiet walk's watched tasks (addresses) and the watch token they were asked under
    # (QuietPlan.watch_token; None: not recorded). A Task object's watch answer is fixed for a
    # token, and a task not read keeps its prior Task object: with the same token the next
    # quiet walk takes its watched tasks from here instead of asking of each of the
    # thousands of tasks (a crowd's 2,000 calls per refresh).
    watched: frozenset[int] = frozenset()
    watched_for: object = None
    # `entries`' thread-group ids, packed (linux.pid_column of each list): the next quiet walk
    # drops the redone groups' entries by searching these instead of passing over all.
    entry_pids: tuple[bytes, bytes] | None = None
    # A watched task's socket files as this walk read them (file, sk pointer and struct sock
    # bytes) with their decode: the next walk gives the decode again while the same reads
    # give the same bytes (Walk._replayed_file).
    file_bytes: dict[int, tuple[bytes, bytes, bytes, InetSock | PacketSock]] = field(
        default_factory=dict
    )


@dataclass(frozen=True)
class QuietPlan:
    """How an incremental refresh spends its reads: only on what may have changed.

    `tasks`: the prior walk's thread-group leaders, in list order, when the task list is known
    not to have changed (no fork, no exit since the prior walk: see introspect's kernel
    counters): the list is not walked; None: it is walked (every task_struct read, an
    unchanged one's fd tables trusted all the same). `read`: those whose
    task_struct is read again (fingerprint compared: a setuid, an exec show there); their fd
    tables are read again only if the task changed. `recheck`: those decoded afresh, fd tables
    and files included, and compared with the prior state (the sliced cross-check). Every
    other task, and its fd tables and sockets, is the prior walk's, with no read at all.
    Watched tasks are always read afresh. `watch_token`: what the walk's watch answers
    depend on besides the Task object (the caller's watch function), or None when they may
    change with each walk: with the prior state's token, the prior's watched tasks are the
    only watched ones among those not read (`RefreshState.watched`)."""

    tasks: tuple[int, ...] | None  # None: the task list changed, walk it
    read: frozenset[int]
    recheck: frozenset[int]
    watch_token: object = None


@dataclass
class RefreshCounts:
    """How much of an incremental walk was decoded again (the rest reused)."""

    tasks_decoded: int = 0
    tasks_reused: int = 0
    tables_decoded: int = 0
    tables_reused: int = 0
    files_resolved: int = 0
    files_reused: int = 0
    changes: int = 0  # anything that differs from the prior state
    tasks_trusted: int = 0  # quiet walk: task_structs not read (nor their fd tables)
    tasks_rechecked: int = 0  # quiet walk: tasks decoded afresh for the sliced cross-check
    files_replayed: int = 0  # watched tasks' files read again, the same bytes: not decoded


# Decides whether a task is watched: its fd tables and sockets are decoded afresh on every
# refresh, nothing reused (the gate watches the owners its policy blocks).
WatchFn = Callable[[Task], bool]


class WalkAborted(Exception):
    """Internal: this attempt met a bound or a broken list; the walk stops here."""

    def __init__(self, issue: WalkIssue) -> None:
        super().__init__(str(issue))
        self.issue = issue


class _PriorTgids(Mapping[int, int]):
    """A quiet walk's task address -> tgid: init_task's 0 and the prior walk's tasks among
    this walk's, looked up when asked (~250 times a refresh on the crowd) instead of a dict
    built over every task each refresh."""

    def __init__(
        self, init_task: int, known: Mapping[int, tuple[bytes, Task]], members: set[int]
    ) -> None:
        self._init = init_task
        self._known = known
        self._members = members

    def __getitem__(self, address: int) -> int:
        if address == self._init:
            return 0
        if address not in self._members:
            raise KeyError(address)
        return self._known[address][1].tgid

    def __iter__(self) -> Iterator[int]:
        yield self._init
        yield from (a for a in self._members if a in self._known and a != self._init)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class Walk:
    """One bounded walk over a consistent-looking snapshot of guest memory."""

    def __init__(
        self,
        space: AddressSpace,
        layout: KernelLayout,
        virt_shift: int,
        bounds: WalkBounds,
    ) -> None:
        self.space = space
        self.layout = layout
        self.shift = virt_shift
        self.addresses: dict[bytes, IPAddress] = {}  # decode_inet_sock's, this walk's only
        self.bounds = bounds
        self.deadline = Deadline.after(bounds.seconds)
        self.errors: list[WalkIssue] = []
        self._creds: dict[int, tuple[int, int]] = {}
        self._tables: dict[int, dict[int, list[int]]] = {}  # files_struct -> {file: [fd]}
        self._socks: dict[int, InetSock | PacketSock | None] = {}  # file -> sock (None: other)
        self._paths: dict[tuple[int, int], str] = {}  # (dentry, vfsmount) -> path
        self._threads = 0
        self._files_bound_hit = False
        self.fd_slots = 0
        self.folded_fds = 0
        # Incremental refresh: what the previous walk decoded (None: decode everything) and
        # which tasks are never served from it; `state` records this walk for the next one.
        self.prior: RefreshState | None = None
        self.watch: WatchFn | None = None
        self.state = RefreshState()
        self.counts = RefreshCounts()
        self._watching = False
        self._replay = False  # the current task's files may be replayed (_replayed_file)
        self._fresh = False  # the current task's tables and files are read afresh
        self._reused_table = False  # the last fd_table came unchanged from the prior state
        # A quiet walk (QuietPlan): the task addresses decoded afresh and compared, and those
        # served whole from the prior state with no read.
        self.recheck: frozenset[int] = frozenset()
        self.trusted: set[int] = set()
        self.trust_unchanged = False  # an unchanged task's tables are trusted (not read)
        self._watched: dict[int, bool] = {}  # id(Task) -> watch(Task), once per walk
        self.watch_token: object = None  # QuietPlan.watch_token of a quiet walk
        self._fields: Callable[[bytes], tuple[bytes, ...]] | None = None  # _fingerprint_fields
        # A quiet walk's pid columns of the prior entries it kept (see RefreshState.entry_pids).
        self.kept_columns: tuple[bytes, bytes] | None = None
        # Thread groups whose socket entries are not the prior walk's objects (decoded,
        # read afresh, or a task that changed): what a view built from the prior one redoes.
        self.changed_pids: set[int] = set()
        self.changed_entries: dict[int, tuple[list[FdSocket], list[FdPacket]]] = {}

    def watched(self, task: Task) -> bool:
        """`watch(task)`, asked once per Task object per walk (a Task is immutable)."""
        if self.watch is None:
            return False
        hit = self._watched.get(id(task))
        if hit is None:
            hit = self._watched[id(task)] = self.watch(task)
        return hit

    def check_time(self, what: str) -> None:
        if self.deadline.expired():
            detail = f"{self.bounds.seconds} s reached"
            raise WalkAborted(WalkIssue(what, WalkReason.TIME_BOUND, detail=detail))

    def is_kernel_pointer(self, value: int) -> bool:
        return is_kernel_pointer(value, self.space.levels)

    def issue(self, what: str, reason: WalkReason, address: int = 0, detail: str = "") -> None:
        if len(self.errors) < MAX_ISSUES:  # garbage memory must not make a walk slow itself
            self.errors.append(WalkIssue(what, reason, address, detail=detail))

    def wild(self, what: str, address: int) -> None:
        self.issue(what, WalkReason.POINTER_OUT_OF_RANGE, address)

    def read(self, vaddr: int, length: int, what: str) -> bytes | None:
        try:
            return self.space.read(vaddr, length)
        except MemoryReadError as e:
            self.issue(what, WalkReason.UNREADABLE, e.address, f"{length} bytes at {vaddr:#x}")
            return None

    # -- tasks ------------------------------------------------------------------------------

    def for_each_task(self) -> list[Task]:
        """Thread-group leaders on init_task.tasks, init_task itself (pid 0) excluded; a broken
        list gives the tasks before the break (and an issue)."""
        lay = self.layout
        init_task = lay.init_task + self.shift
        head = init_task + lay.task_tasks
        lo, hi = lay.task_span
        try:
            init_blob = self.space.read(init_task + lo, hi - lo)
        except MemoryReadError:
            detail = "init_task is unreadable: wrong profile or KASLR shift?"
            raise WalkAborted(
                WalkIssue("task list", WalkReason.UNREADABLE, init_task, detail=detail)
            ) from None

        def read_task(node: int) -> Links[bytes]:
            blob = self.space.read(node - lay.task_tasks + lo, hi - lo)
            nxt, prev = struct.unpack_from("<QQ", blob, lay.task_tasks - lo)
            return Links(nxt, prev, blob)

        spec = ListSpec(
            "task list", head, head.__eq__, self.is_kernel_pointer, self.bounds.max_tasks
        )
        first = self._u64(init_blob, lay.task_tasks - lo)
        walked = walk_list(spec, first, read_task, self.deadline)
        if walked.issue is not None:  # keep what was read before it
            self.errors.append(walked.issue)
        raw = [(node - lay.task_tasks, blob) for node, blob in walked.nodes]
        tgids: dict[int, int] = {init_task: 0}
        tgids.update((task, lay.task_tgid.get(blob, lo)) for task, blob in raw)
        return [t for t in (self._task(addr, blob, tgids) for addr, blob in raw) if t is not None]

    def quiet_walk(self, tasks: tuple[int, ...], read: frozenset[int], result: WalkResult) -> None:
        """A walk over the prior walk's thread groups without walking the task list (see
        QuietPlan), at the cost of the tasks it reads: the `read` and `recheck` ones and the
        watched ones are read again at their address (a task that no longer looks like itself,
        another pid, is an issue: the walk is incomplete and the next refresh walks the list);
        those that changed, are watched or rechecked have their fd tables read; every other
        task, its tables and its entries are the prior walk's, copied whole."""
        prior = self.prior
        assert prior is not None
        lay = self.layout
        lo, hi = lay.task_span
        self.state.tasks = dict(prior.tasks)
        self.state.tables = dict(prior.tables)
        self.state.held = dict(prior.held)
        look = read | self.recheck
        known = prior.tasks
        token = self.watch_token
        if token is not None and prior.watched_for is token:
            # The prior's watched tasks are the watched ones among those not read: a task
            # not read keeps its prior Task object, whose answer is fixed for the token.
            pick = look | prior.watched
            todo = [a for a in tasks if a in pick or a not in known]
        else:
            todo = [a for a in tasks if a in look or a not in known or self.watched(known[a][1])]
        members = set(tasks)
        self.trusted = members.difference(todo)
        self.counts.tasks_trusted = len(self.trusted)
        tgids = _PriorTgids(lay.init_task + self.shift, known, members)
        for n, addr in enumerate(todo):
            if not n & 0x3F:
                self.check_time("task list")
            seen = known.get(addr)
            blob = self.read(addr + lo, hi - lo, "task")
            if blob is None:
                raise WalkAborted(WalkIssue("task list", WalkReason.UNREADABLE, addr))
            if seen is not None and lay.task_pid.get(blob, lo) != seen[1].pid:
                detail = f"pid {seen[1].pid} is now {lay.task_pid.get(blob, lo)}"
                raise WalkAborted(
                    WalkIssue("task list", WalkReason.IMPLAUSIBLE, addr, detail=detail)
                )
            if self._task(addr, blob, tgids) is None:
                self.state.tasks.pop(addr, None)
        state_tasks = self.state.tasks  # (at C speed: ~1,200 thread groups on the crowd)
        result.tasks = list(
            map(_SECOND, map(state_tasks.__getitem__, filter(state_tasks.__contains__, tasks)))
        )
        # The tasks not trusted are among those read (todo), in the same (list) order.
        redo = [state_tasks[a][1] for a in todo if a in state_tasks and a not in self.trusted]
        pids = {t.tgid for t in redo}
        old_sockets, old_packets = prior.entries
        # Every entry but the redone thread groups' (a crowd's 20,000): through the prior's
        # pid columns when they are the prior's entries' (same lengths: the lists are only
        # ever appended to while a walk builds them), else a pass at C speed.
        columns = prior.entry_pids
        if (
            columns is not None
            and len(columns[0]) == 4 * len(old_sockets)
            and len(columns[1]) == 4 * len(old_packets)
        ):
            result.sockets, kept_sockets = _not_held_by_column(old_sockets, columns[0], pids)
            result.packets, kept_packets = _not_held_by_column(old_packets, columns[1], pids)
            self.kept_columns = (kept_sockets, kept_packets)
        else:
            result.sockets = _not_held_by(old_sockets, pids)
            result.packets = _not_held_by(old_packets, pids)
        self.counts.files_reused += len(result.sockets) + len(result.packets)
        self.sockets(redo, result)
        if token is not None:
            # Every task not redone is the prior's Task and not watched (asked above, or
            # not in the prior's watched set, or read unchanged and asked in _task).
            self.state.watched = frozenset(t.address for t in redo if self.watched(t))
            self.state.watched_for = token

    def _fingerprint_fields(self) -> Callable[[bytes], tuple[bytes, ...]]:
        """The fingerprint's task_struct fields as one C-speed getter over the task span
        (made once per walk: a quiet refresh fingerprints ~250 tasks on the crowd)."""
        lay = self.layout
        lo = lay.task_span[0]
        spans = [
            (lay.task_pid.offset, 4),
            (lay.task_tgid.offset, 4),
            (lay.task_real_parent, 8),
            (lay.task_real_cred, 8),
            (lay.task_comm, TASK_COMM_LEN),
            (lay.task_files, 8),
        ]
        if lay.has_exe:
            spans.append((lay.task_mm, 8))
        if lay.has_threads:
            spans += [(lay.task_signal, 8), (lay.task_thread_node, 8)]
        return itemgetter(*(slice(o - lo, o - lo + n) for o, n in spans))

    def _task_fingerprint(self, blob: bytes, tgids: Mapping[int, int]) -> bytes:
        """The task_struct fields a Task is decoded from (pid, tgid, parent, cred, comm, files,
        mm, signal, thread list head) and its parent's tgid: equal, the Task is the same."""
        if self._fields is None:
            self._fields = self._fingerprint_fields()
        lay = self.layout
        parent = self._u64(blob, lay.task_real_parent - lay.task_span[0])
        tail = struct.pack("<q", tgids.get(parent, -1))
        return b"".join(self._fields(blob)) + tail

    def _task(self, address: int, blob: bytes, tgids: Mapping[int, int]) -> Task | None:
        """One thread group's Task; with a `prior` state, the prior Task when its fingerprint
        is unchanged (not for a watched task, nor a rechecked one: decoded afresh, its threads
        walked again)."""
        key = self._task_fingerprint(blob, tgids)
        fresh = address in self.recheck
        if fresh:
            self.state.rechecked_tasks.add(address)
            self.counts.tasks_rechecked += 1
        prior = self.prior
        seen = prior.tasks.get(address) if prior is not None else None
        if seen is None:
            watched = False
        elif (
            prior is not None
            and self.watch_token is not None
            and prior.watched_for is self.watch_token
        ):
            watched = address in prior.watched  # the prior's Task, asked under this token
        else:
            watched = self.watched(seen[1])
        if seen is not None and seen[0] == key and not watched and not fresh:
            if self.trust_unchanged:  # read, unchanged: its tables are trusted too
                self.trusted.add(address)
            self.counts.tasks_reused += 1
            self.state.tasks[address] = seen
            return seen[1]
        task = self._decode_task(address, blob, tgids)
        self.counts.tasks_decoded += 1
        if task is not None:
            if seen is None or seen[1] != task:
                self.counts.changes += 1
            elif seen[0] == key:
                task = seen[1]  # the same: keep the prior object (its entries stay the same)
            self.state.tasks[address] = (key, task)
        return task

    def _decode_task(self, address: int, blob: bytes, tgids: Mapping[int, int]) -> Task | None:
        lay = self.layout
        lo = lay.task_span[0]
        pid, tgid = lay.task_pid.get(blob, lo), lay.task_tgid.get(blob, lo)
        if not (0 < pid < PID_MAX_LIMIT and 0 < tgid < PID_MAX_LIMIT):
            self.issue("task", WalkReason.IMPLAUSIBLE, address, f"pid {pid}/tgid {tgid}")
            return None
        parent = self._u64(blob, lay.task_real_parent - lo)
        ppid = tgids.get(parent)
        if ppid is None:
            ppid = self._read_int(parent, lay.task_tgid, f"parent of pid {pid}")
        cred = self._u64(blob, lay.task_real_cred - lo)
        uid, euid = self._cred(cred, pid)
        comm_raw = blob[lay.task_comm - lo : lay.task_comm - lo + TASK_COMM_LEN]
        comm = comm_raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")
        files = self._u64(blob, lay.task_files - lo)
        thread_files, threads = self._thread_files(address, blob, files, pid)
        return Task(
            address,
            pid,
            tgid,
            ppid,
            uid,
            euid,
            comm,
            files,
            self._proc_name(blob, comm),
            self._exe(blob, pid),
            thread_files,
            threads,
            cred,
        )

    def _thread_files(
        self, leader: int, blob: bytes, files: int, pid: int
    ) -> tuple[tuple[int, ...], int]:
        """The distinct files_structs of the leader's other threads (on signal->thread_head,
        linked by task_struct.thread_node), and the thread count; bounded, never raises."""
        lay = self.layout
        if not lay.has_threads:
            return (), 1
        lo = lay.task_span[0]
        node = leader + lay.task_thread_node
        nxt = self._u64(blob, lay.task_thread_node - lo)
        signal = self._u64(blob, lay.task_signal - lo)
        head = signal + lay.signal_thread_head
        if nxt == head:  # the usual case: a single-threaded process, nothing more to read
            return (), 1
        if not self.is_kernel_pointer(signal):
            self.wild(f"signal of pid {pid}", signal)
            return (), 1
        span_lo = min(lay.task_thread_node, lay.task_files, lay.task_pid.offset)
        span_hi = max(lay.task_thread_node + 16, lay.task_files + 8, lay.task_pid.offset + 4)

        def read_thread(n: int) -> Links[tuple[int, int]]:
            t = self.space.read(n - lay.task_thread_node + span_lo, span_hi - span_lo)
            nxt, prev = struct.unpack_from("<QQ", t, lay.task_thread_node - span_lo)
            f = self._u64(t, lay.task_files - span_lo)
            return Links(nxt, prev, (lay.task_pid.get(t, span_lo), f))

        remaining = max(0, self.bounds.max_threads - self._threads)
        spec = ListSpec(
            f"threads of pid {pid}", head, head.__eq__, self.is_kernel_pointer, remaining
        )
        first = self.read(head, 8, f"threads of pid {pid}")
        if first is None:
            return (), 1
        walked = walk_list(spec, self._u64(first, 0), read_thread, self.deadline)
        if walked.issue is not None:
            self.errors.append(walked.issue)
        self._threads += len(walked.nodes)
        found = [f for n, (_tid, f) in walked.nodes if n != node and f and f != files]
        return tuple(dict.fromkeys(found)), max(1, len(walked.nodes))

    def _exe(self, blob: bytes, pid: int) -> str:
        """mm->exe_file's path from its dentry chain; "" for a kernel thread or unreadable."""
        lay = self.layout
        if not lay.has_exe:
            return ""
        mm = self._u64(blob, lay.task_mm - lay.task_span[0])
        if mm == 0:
            return ""
        what = f"exe of pid {pid}"
        if not self.is_kernel_pointer(mm):
            self.wild(what, mm)
            return ""
        raw = self.read(mm + lay.mm_exe_file, 8, what)
        exe_file = 0 if raw is None else self._u64(raw, 0)
        if not self.is_kernel_pointer(exe_file):
            return ""
        lo = min(lay.file_dentry, lay.file_mnt) if lay.file_mnt >= 0 else lay.file_dentry
        raw = self.read(exe_file + lo, lay.file_dentry + 8 - lo, what)
        if raw is None:
            return ""
        mnt = self._u64(raw, lay.file_mnt - lo) if lay.file_mnt >= 0 else 0
        return self.dentry_path(self._u64(raw, lay.file_dentry - lo), what, mnt)

    def dentry_path(self, dentry: int, what: str, vfsmount: int = 0) -> str:
        """The path of `dentry` (in the mount whose struct vfsmount is `vfsmount`) by d_name up
        to each filesystem's root (d_parent == itself), then on from the mount's mountpoint in
        its parent mount (mount.mnt_parent == itself at the namespace's root), bounded in depth
        and length; cached per walk; "" when a link is unreadable."""
        key = (dentry, vfsmount)
        cached = self._paths.get(key)
        if cached is not None:
            return cached
        start = dentry
        lay = self.layout
        assert lay.qstr_len is not None
        names: list[bytes] = []
        pos, total = dentry, 0
        span_lo = min(lay.dentry_parent, lay.dentry_name)
        span_hi = max(lay.dentry_parent + 8, lay.dentry_name + lay.qstr_name + 8)
        name_len = lay.dentry_name - span_lo
        for _ in range(self.bounds.max_depth):
            if not self.is_kernel_pointer(pos):
                self.wild(what, pos)
                return ""
            d = self.read(pos + span_lo, span_hi - span_lo, what)
            if d is None:
                return ""
            parent = self._u64(d, lay.dentry_parent - span_lo)
            if parent == pos:  # the root of its filesystem: of the mount namespace too?
                up = self._mountpoint(vfsmount, what)
                if up is not None:
                    pos, vfsmount = up
                    continue
                path = "/" + "/".join(n.decode(errors="replace") for n in reversed(names))
                self._paths[key] = path
                return path
            length = lay.qstr_len.get(d, -name_len)
            name = self._u64(d, name_len + lay.qstr_name)
            total += length + 1
            if not 0 < length <= NAME_MAX or total > PATH_MAX or not self.is_kernel_pointer(name):
                self.issue(what, WalkReason.IMPLAUSIBLE, pos, f"name length {length}")
                return ""
            raw = self.read(name, length, what)
            if raw is None:
                return ""
            names.append(raw)
            pos = parent
        self.issue(what, WalkReason.STEP_BOUND, start, f"deeper than {self.bounds.max_depth}")
        return ""

    def _mountpoint(self, vfsmount: int, what: str) -> tuple[int, int] | None:
        """(mountpoint dentry, parent's vfsmount) of a mount that is not the namespace's
        root, else None."""
        lay = self.layout
        if vfsmount == 0 or lay.mount_mnt < 0 or not self.is_kernel_pointer(vfsmount):
            return None
        mount = vfsmount - lay.mount_mnt
        lo = min(lay.mount_parent, lay.mount_mountpoint)
        raw = self.read(mount + lo, max(lay.mount_parent, lay.mount_mountpoint) + 8 - lo, what)
        if raw is None:
            return None
        parent = self._u64(raw, lay.mount_parent - lo)
        point = self._u64(raw, lay.mount_mountpoint - lo)
        if parent == mount or not self.is_kernel_pointer(parent):
            return None
        return point, parent + lay.mount_mnt

    def _proc_name(self, blob: bytes, comm: str) -> str:
        """proc_task_name(): workqueue workers get "-desc"/"+desc" appended, other kernel
        threads their full name (kthread->full_name, 6.1+)."""
        lay = self.layout
        if lay.task_flags is None:
            return comm
        lo = lay.task_span[0]
        flags = lay.task_flags.get(blob, lo)
        if not flags & (PF_KTHREAD | PF_WQ_WORKER):
            return comm
        kthread = self._u64(blob, lay.task_kthread - lo)
        if not self.is_kernel_pointer(kthread):
            return comm
        try:
            if flags & PF_WQ_WORKER:
                worker = self.space.read_u64(kthread + lay.kthread_data)
                if not self.is_kernel_pointer(worker):
                    return comm
                end = max(
                    lay.worker_desc + lay.worker_desc_len,
                    lay.worker_pool + 8,
                    lay.worker_current_work + 8,
                    lay.worker_rescue_wq + 8,
                )
                w = self.space.read(worker, end)
                pool, current = (
                    self._u64(w, lay.worker_pool),
                    self._u64(w, lay.worker_current_work),
                )
                desc = w[lay.worker_desc :].split(b"\0", 1)[0].decode(errors="replace")
                if lay.worker_rescue_wq >= 0:
                    comm = self._rescuer_name(self._u64(w, lay.worker_rescue_wq), comm)
                if pool and desc:
                    comm = f"{comm}{'+' if current else '-'}{desc}"
                return comm[: PROC_NAME_LEN - 1]
            full = self.space.read_u64(kthread + lay.kthread_full_name)
            if full == 0:
                return comm
            if not self.is_kernel_pointer(full):
                return comm
            raw = self.space.read_cstring(full, PROC_NAME_LEN - 1)
            return raw.decode(errors="replace")
        except MemoryReadError as e:
            self.issue(f"name of {comm}", WalkReason.UNREADABLE, e.address, e.reason)
            return comm

    def _rescuer_name(self, wq: int, comm: str) -> str:
        """format_worker_id() for a rescuer: "kworker/R-" and its workqueue's full name (the
        comm unchanged for other workers, rescue_wq NULL, or a name that does not extend it)."""
        if wq == 0 or not self.is_kernel_pointer(wq):
            return comm
        lay = self.layout
        raw = self.space.read(wq + lay.wq_name, lay.wq_name_len).split(b"\0", 1)[0]
        name = f"kworker/R-{raw.decode(errors='replace')}"
        # The comm was cut from the same string: anything else is not this rescuer's name.
        return name if raw and name.startswith(comm) else comm

    def _cred(self, cred: int, pid: int) -> tuple[int, int]:
        cached = self._creds.get(cred)
        if cached is not None:
            return cached
        lay = self.layout
        if not self.is_kernel_pointer(cred):
            self.wild(f"cred of pid {pid}", cred)
            return (-1, -1)
        blob = self.read(cred, lay.cred_span[1], f"cred of pid {pid}")
        if blob is None:
            return (-1, -1)
        ids = (lay.cred_uid.get(blob), lay.cred_euid.get(blob))
        self._creds[cred] = ids
        return ids

    def _read_int(self, base: int, f: Field, what: str) -> int:
        if not self.is_kernel_pointer(base):
            self.wild(what, base)
            return -1
        size = struct.calcsize(f.fmt)
        blob = self.read(base + f.offset, size, what)
        return -1 if blob is None else f.get(blob, f.offset)

    @staticmethod
    def _u64(blob: bytes, offset: int) -> int:
        value: int = struct.unpack_from("<Q", blob, offset)[0]
        return value

    # -- files and sockets ------------------------------------------------------------------

    def fd_table(self, files: int, pid: int) -> dict[int, list[int]]:
        """{struct file *: [fd, ...]} of one files_struct, read once per walk: the fd array in
        one read, each distinct file once; at most `fds_per_file` fds kept per file (dup()s
        beyond are counted in `folded_fds`). Bounded by max_fds and the walk's max_fd_slots."""
        cached = self._tables.get(files)
        if cached is not None:
            return cached
        out: dict[int, list[int]] = {}
        self._tables[files] = out
        lay = self.layout
        if not self.is_kernel_pointer(files):
            self.wild(f"files of pid {pid}", files)
            return out
        blob = self.read(files + lay.files_fdt, 8, f"files of pid {pid}")
        if blob is None:
            return out
        fdt = self._u64(blob, 0)
        if not self.is_kernel_pointer(fdt):
            self.wild(f"fdtable of pid {pid}", fdt)
            return out
        head = self.read(
            fdt, max(lay.fdt_fd + 8, lay.fdt_max_fds.offset + 4), f"fdtable of pid {pid}"
        )
        if head is None:
            return out
        max_fds = lay.fdt_max_fds.get(head)
        fd_array = self._u64(head, lay.fdt_fd)
        count = min(max_fds, self.bounds.max_fds)
        if max_fds > self.bounds.max_fds:
            detail = f"fdtable claims {max_fds} fds, read only {self.bounds.max_fds}"
            self.issue(f"fd table of pid {pid}", WalkReason.STEP_BOUND, fdt, detail)
        left = self.bounds.max_fd_slots - self.fd_slots
        if count > left:
            detail = f"more than {self.bounds.max_fd_slots} fd slots in this walk"
            self.issue(f"fd table of pid {pid}", WalkReason.STEP_BOUND, fdt, detail)
            count = max(0, left)
        if count == 0:
            return out
        if not self.is_kernel_pointer(fd_array):
            self.wild(f"fd array of pid {pid}", fd_array)
            return out
        arr = self.read(fd_array, count * 8, f"fd array of pid {pid}")
        if arr is None:
            return out
        self.fd_slots += count
        fingerprint = (fdt, max_fds, fd_array, arr)
        seen = self.prior.tables.get(files) if self.prior is not None else None
        if seen is not None and seen[0] == fingerprint and not self._fresh:
            self.counts.tables_reused += 1
            self.state.tables[files] = seen
            self._tables[files] = seen[1]
            self._reused_table = True
            return seen[1]
        self._reused_table = False
        if self._watching:
            self.state.fresh.add(files)
        elif self._fresh:
            self.state.rechecked_tables.add(files)
        self.counts.tables_decoded += 1
        if self.prior is not None and (seen is None or seen[0] != fingerprint):
            self.counts.changes += 1
        self.state.tables[files] = (fingerprint, out)
        slots = array("Q")
        slots.frombytes(arr)
        if sys.byteorder != "little":  # pragma: no cover - x86 guests on a big-endian host
            slots.byteswap()
        distinct = set(slots)
        distinct.discard(0)
        per_file = self.bounds.fds_per_file
        if len(distinct) > _FEW_FILES:  # one pass in Python: O(slots)
            for fd, file in enumerate(slots):
                if not fd & 0xFFFF:
                    self.check_time(f"fd table of pid {pid}")
                if file:
                    fds = out.setdefault(file, [])
                    if len(fds) < per_file:
                        fds.append(fd)
                    else:
                        self.folded_fds += 1
            return out
        # Few distinct files (the fd bomb: thousands of dup()s of one socket): search the
        # array at C speed, O(distinct x slots).
        for file in sorted(distinct, key=slots.index):  # in fd order
            fds = []
            start = 0
            while len(fds) < per_file:
                try:
                    fd = slots.index(file, start)
                except ValueError:
                    break
                fds.append(fd)
                start = fd + 1
            else:
                self.folded_fds += slots.count(file) - per_file
            out[file] = fds
        return out

    def socket_from_file(self, file: int, pid: int, fd: int) -> InetSock | PacketSock | None:
        """The sock behind a socket file (f_op == &socket_file_ops): an inet sock of any
        protocol or a packet sock; None for any other file. Each file is resolved once per
        walk, at most `max_files` of them."""
        if file in self._socks:
            return self._socks[file]
        prior = self.prior.socks if self.prior is not None else None
        if prior is not None and file in prior and not self._fresh:
            self.counts.files_reused += 1
            sock = self._socks[file] = self.state.socks[file] = prior[file]
            return sock
        if self._replay and prior is not None and file in prior:
            again = self._replayed_file(file)
            if again is not None:
                self.counts.files_replayed += 1
                self._socks[file] = self.state.socks[file] = again
                return again
        sock = self._resolve_file(file, pid, fd)
        self.counts.files_resolved += 1
        if prior is not None and (file not in prior or prior[file] != sock):
            self.counts.changes += 1
        elif prior is not None and sock is not None:
            # Decoded afresh and equal: the prior object, so that a thread group whose
            # files all decode the same keeps its entries (see `sockets`).
            known = prior[file]
            if known is not None:
                sock = self._socks[file] = known
                replay = self.state.file_bytes.get(file)
                if replay is not None:
                    self.state.file_bytes[file] = (replay[0], replay[1], replay[2], known)
        self.state.socks[file] = sock
        return sock

    def _resolve_file(self, file: int, pid: int, fd: int) -> InetSock | PacketSock | None:
        self._socks[file] = None
        if len(self._socks) > self.bounds.max_files:
            if not self._files_bound_hit:
                detail = f"more than {self.bounds.max_files} distinct files"
                self.issue("fd tables", WalkReason.STEP_BOUND, file, detail)
                self._files_bound_hit = True
            return None
        if not self.is_kernel_pointer(file):
            self.wild(f"file of pid {pid} fd {fd}", file)
            return None
        lay = self.layout
        lo, hi = lay.file_span
        blob = self.read(file + lo, hi - lo, f"file of pid {pid} fd {fd}")
        if blob is None:
            return None
        if self._u64(blob, lay.file_f_op - lo) != lay.socket_file_ops + self.shift:
            return None
        socket = self._u64(blob, lay.file_private_data - lo)
        if not self.is_kernel_pointer(socket):
            self.wild(f"socket of pid {pid} fd {fd}", socket)
            return None
        sk_blob = self.read(socket + lay.socket_sk, 8, f"socket of pid {pid} fd {fd}")
        if sk_blob is None:
            return None
        sk = self._u64(sk_blob, 0)
        if sk == 0:  # a socket being set up or torn down
            return None
        if not self.is_kernel_pointer(sk):
            self.wild(f"sock of pid {pid} fd {fd}", sk)
            return None
        sk_blob2 = self.read(sk, self.layout.sock_span, "struct sock")
        result = None if sk_blob2 is None else decode_any_sock(lay, sk, sk_blob2, self.addresses)
        self._socks[file] = result
        if self._replay and result is not None and sk_blob2 is not None:
            self.state.file_bytes[file] = (blob, sk_blob, sk_blob2, result)
        return result

    def _replayed_file(self, file: int) -> InetSock | PacketSock | None:
        """A watched task's socket file decoded at the last refresh from the same three reads
        (the file, its socket's sk pointer, the struct sock) that give the same bytes now:
        that decode, with no decode again (what a fresh read would decode from the same
        bytes at the same addresses: the addresses follow from the bytes). None when anything
        differs or is unreadable, or past the walk's file bound: then the file is resolved
        afresh (`_resolve_file`). A crowd's blocked owner holds ~100 sockets, read every 2 s."""
        prior = self.prior
        seen = prior.file_bytes.get(file) if prior is not None else None
        if seen is None or len(self._socks) >= self.bounds.max_files:
            return None
        file_blob, sk_ptr, sock_blob, result = seen
        lay = self.layout
        lo = lay.file_span[0]
        try:
            if self.space.read(file + lo, len(file_blob)) != file_blob:
                return None
            socket = self._u64(file_blob, lay.file_private_data - lo)
            if self.space.read(socket + lay.socket_sk, 8) != sk_ptr:
                return None
            if self.space.read(self._u64(sk_ptr, 0), len(sock_blob)) != sock_blob:
                return None
        except MemoryReadError:
            return None
        self.state.file_bytes[file] = seen
        return result

    def any_sock(self, sk: int) -> InetSock | PacketSock | None:
        blob = self.read(sk, self.layout.sock_span, "struct sock")
        return None if blob is None else decode_any_sock(self.layout, sk, blob, self.addresses)

    def inet_sock(self, sk: int) -> InetSock | None:
        blob = self.read(sk, self.layout.sock_span, "struct sock")
        return None if blob is None else decode_inet_sock(self.layout, sk, blob, self.addresses)

    def sockets(self, tasks: list[Task], result: WalkResult) -> None:
        """Every socket held by each thread group's fds (all its threads' file tables) into
        `result`, (tgid, fd, sock) once each; a bound stops adding, keeps what was read."""
        watched = {id(t) for t in tasks if self.watched(t)} if self.prior is not None else set()
        ordered = sorted(tasks, key=lambda t: id(t) not in watched) if watched else tasks
        trusted = self.trusted
        for n, task in enumerate(ordered):
            if task.address in trusted and id(task) not in watched and self._served(task, result):
                continue  # a quiet walk's trusted task: no read (see _trusted_again)
            if not n & 0x3F:
                self.check_time("fd tables")
            self._watching = id(task) in watched
            self._fresh = self._watching or task.address in self.recheck
            # A watched task's files may be given again by their bytes (_replayed_file); a
            # rechecked one's are decoded afresh: the cross-check compares real decodes.
            self._replay = self._watching and task.address not in self.recheck
            if self._fresh:  # its tables and files read again, whoever read them before
                for files in task.file_tables:
                    self._tables.pop(files, None)
                self._socks.clear()
            if self._held_again(task, result):
                continue
            self.changed_pids.add(task.tgid)
            seen: set[tuple[int, int]] = set()
            mark = (len(result.sockets), len(result.packets))
            for files in task.file_tables:
                for n, (file, fds) in enumerate(self.fd_table(files, task.tgid).items()):
                    if not n & 0xFF:
                        self.check_time("fd tables")
                    sock = self.socket_from_file(file, task.tgid, fds[0] if fds else -1)
                    if sock is None:
                        continue
                    for fd in fds:
                        if (fd, sock.address) in seen:
                            continue
                        seen.add((fd, sock.address))
                        if len(result.sockets) + len(result.packets) >= self.bounds.max_sockets:
                            detail = f"more than {self.bounds.max_sockets} sockets"
                            issue = WalkIssue("fd tables", WalkReason.STEP_BOUND, detail=detail)
                            raise WalkAborted(issue)
                        if isinstance(sock, PacketSock):
                            result.packets.append(FdPacket(task.tgid, fd, sock))
                        else:
                            result.sockets.append(FdSocket(task.tgid, fd, sock))
            held = (result.sockets[mark[0] :], result.packets[mark[1] :])
            if len(task.file_tables) == 1:
                key = (task.tgid, task.file_tables[0])
                before = self.prior.held.get(key) if self._fresh and self.prior else None
                if before is not None and _same_entries(before, held):
                    # A task read afresh (watched, or in the cross-check slice) that holds
                    # what it held: the prior's entry objects again, and not a changed thread
                    # group (nothing to redo for the view, the index and the refresher).
                    result.sockets[mark[0] :] = before[0]
                    result.packets[mark[1] :] = before[1]
                    self.state.held[key] = before
                    self.changed_pids.discard(task.tgid)
                    continue
                self.state.held[key] = held
            was = self.changed_entries.get(task.tgid)  # a thread group is walked once
            self.changed_entries[task.tgid] = (
                held
                if was is None
                else (
                    was[0] + held[0],
                    was[1] + held[1],
                )
            )

    def _served(self, task: Task, result: WalkResult) -> bool:
        """A quiet walk's fast path: a trusted task (QuietPlan: not read, or read and
        unchanged; neither watched nor rechecked) gives the entries, fd tables and socks the
        prior walk found, with no read of guest memory. False: the usual path (a task with
        several tables has its prior tables put in place for it: still no read)."""
        prior = self.prior
        if prior is None or task.address in self.recheck:
            return False
        self._watching = self._fresh = False
        tables = task.file_tables
        if len(tables) == 1 and (task.tgid, tables[0]) in prior.held:
            if tables[0] not in prior.tables:
                return False
            key = (task.tgid, tables[0])
            socks, packets = prior.held[key]
            room = self.bounds.max_sockets - len(result.sockets) - len(result.packets)
            if len(socks) + len(packets) > room:
                return False
            self.state.tables[tables[0]] = prior.tables[tables[0]]
            self._tables[tables[0]] = prior.tables[tables[0]][1]
            self.counts.tables_reused += 1
            self.counts.files_reused += len(socks) + len(packets)
            result.sockets += socks
            result.packets += packets
            self.state.held[key] = prior.held[key]
            return True
        if tables and all(f in prior.tables for f in tables):  # several tables: the prior
            for f in tables:  # tables and socks serve the usual loop (no read)
                self.state.tables[f] = prior.tables[f]
                self._tables[f] = prior.tables[f][1]
                self.counts.tables_reused += 1
        return False

    def _held_again(self, task: Task, result: WalkResult) -> bool:
        """An incremental walk's fast path: a single-table task (not watched) whose fd table is
        unchanged gives the entries it gave last time, without a look at each fd."""
        tables = task.file_tables
        if self.prior is None or self._fresh or len(tables) != 1:
            return False
        key = (task.tgid, tables[0])
        cached = self.prior.held.get(key)
        if cached is None:
            return False
        self.fd_table(tables[0], task.tgid)
        socks, packets = cached
        room = self.bounds.max_sockets - len(result.sockets) - len(result.packets)
        if not self._reused_table or len(socks) + len(packets) > room:
            return False
        self.counts.files_reused += len(socks) + len(packets)
        result.sockets += socks
        result.packets += packets
        self.state.held[key] = cached
        return True


_E = TypeVar("_E", FdSocket, FdPacket)
_I32 = struct.Struct("=i")  # array("i")'s item (a tgid < PID_MAX_LIMIT, 2^22, fits)
_PID = attrgetter("pid")
_SECOND = itemgetter(1)


def _same_entries(
    a: tuple[list[FdSocket], list[FdPacket]], b: tuple[list[FdSocket], list[FdPacket]]
) -> bool:
    """The same (pid, fd) holding the very same sock object, in the same order."""
    return _same_list(a[0], b[0]) and _same_list(a[1], b[1])


def _same_list(x: list[_E], y: list[_E]) -> bool:
    return len(x) == len(y) and all(
        e.sock is f.sock and e.fd == f.fd and e.pid == f.pid for e, f in zip(x, y, strict=True)
    )


def _not_held_by(entries: list[_E], pids: set[int]) -> list[_E]:
    """The entries whose thread group is not in `pids`, in order (at C speed)."""
    if not pids:
        return list(entries)
    return list(compress(entries, map(not_, map(pids.__contains__, map(_PID, entries)))))


def pid_column(entries: list[_E]) -> bytes:
    """The entries' thread-group ids packed as 4-byte integers, in order: what
    `_not_held_by_column` searches instead of passing over every entry."""
    return array("i", map(_PID, entries)).tobytes()


def _not_held_by_column(entries: list[_E], column: bytes, pids: set[int]) -> tuple[list[_E], bytes]:
    """`_not_held_by` through the entries' `pid_column`, and the kept entries' column: the
    redone thread groups' entries found by searching the packed column (memchr speed, one
    search per entry removed), the rest copied as slices. The same list as `_not_held_by`
    (tested against it); a crowd's 20,000 entries: ~0.1 ms instead of ~2 ms per refresh."""
    gone: list[int] = []
    for pid in pids:
        needle = _I32.pack(pid)
        at = column.find(needle)
        while at != -1:  # bounded: each turn moves past one position of the column
            if at % 4 == 0:
                gone.append(at // 4)
            at = column.find(needle, at + 1)
    if not gone:
        return list(entries), column
    gone.sort()
    kept: list[_E] = []
    parts: list[bytes] = []
    start = 0
    for i in gone:
        kept += entries[start:i]
        parts.append(column[4 * start : 4 * i])
        start = i + 1
    kept += entries[start:]
    parts.append(column[4 * start :])
    return kept, b"".join(parts)


def _entry_pids(kept: tuple[bytes, bytes] | None, result: WalkResult) -> tuple[bytes, bytes]:
    """The pid columns of a walk's entries: the kept prefix's (a quiet walk's) and the
    appended entries' packed now."""
    if kept is None:
        return pid_column(result.sockets), pid_column(result.packets)
    n_sockets, n_packets = len(kept[0]) // 4, len(kept[1]) // 4
    return (
        kept[0] + pid_column(result.sockets[n_sockets:]),
        kept[1] + pid_column(result.packets[n_packets:]),
    )


MAX_INTERNED = 4096  # distinct addresses one interning dict keeps (hostile memory: bounded)


def _address(raw: bytes, interned: dict[bytes, IPAddress] | None) -> IPAddress:
    """The address object of 4 or 16 raw bytes; the same object again for the same bytes
    when `interned` is given (a crowd's 20,000 sockets share a handful of addresses, and an
    ipaddress object costs ~1 us to build)."""
    if interned is None:
        return IPv4Address(raw) if len(raw) == 4 else IPv6Address(raw)
    known = interned.get(raw)
    if known is None:
        known = IPv4Address(raw) if len(raw) == 4 else IPv6Address(raw)
        if len(interned) < MAX_INTERNED:
            interned[raw] = known
    return known


def decode_any_sock(
    layout: KernelLayout,
    address: int,
    blob: bytes,
    interned: dict[bytes, IPAddress] | None = None,
) -> InetSock | PacketSock | None:
    """A struct sock's first `layout.sock_span` bytes decoded: a packet sock, an inet sock of
    any protocol, or None for any other family."""
    if layout.skc_family.get(blob) == AF_PACKET:
        return PacketSock(address, layout.sk_type.get(blob), layout.sk_uid.get(blob))
    return decode_inet_sock(layout, address, blob, interned)


def decode_inet_sock(
    layout: KernelLayout,
    address: int,
    blob: bytes,
    interned: dict[bytes, IPAddress] | None = None,
) -> InetSock | None:
    """A struct sock (or its sock_common head) decoded; None unless AF_INET/AF_INET6.
    `interned`: the caller's address objects by their bytes (see _address)."""
    lay = layout
    family = lay.skc_family.get(blob)
    if family not in (AddressFamily.INET, AddressFamily.INET6):
        return None
    if len(blob) >= lay.sock_span:
        proto = lay.sk_protocol.get(blob)
        sk_type = lay.sk_type.get(blob)
        sk_uid = lay.sk_uid.get(blob)
    else:  # only the sock_common head (time-wait or request sock): TCP by construction
        proto, sk_type, sk_uid = IPProto.TCP, SockType.SOCK_STREAM, 0
    v6only = False
    if lay.skc_ipv6only is not None and family == AddressFamily.INET6:
        byte, bit = lay.skc_ipv6only
        v6only = bool(blob[byte] >> bit & 1)
    local: IPAddress
    remote: IPAddress
    if family == AddressFamily.INET:
        local = _address(blob[lay.skc_rcv_saddr : lay.skc_rcv_saddr + 4], interned)
        remote = _address(blob[lay.skc_daddr : lay.skc_daddr + 4], interned)
    else:
        local = _address(blob[lay.skc_v6_rcv_saddr : lay.skc_v6_rcv_saddr + 16], interned)
        remote = _address(blob[lay.skc_v6_daddr : lay.skc_v6_daddr + 16], interned)
    return InetSock(
        address,
        4 if family == AddressFamily.INET else 6,
        proto,
        blob[lay.skc_state],
        local,
        _U16.unpack_from(blob, lay.skc_num)[0],
        remote,
        _U16_BE.unpack_from(blob, lay.skc_dport)[0],
        sk_uid,
        sk_type,
        v6only,
    )


_U16, _U16_BE = struct.Struct("<H"), struct.Struct(">H")


MAX_ISSUES = 256  # issues recorded per walk attempt (the first ones; the walk is incomplete)
_FEW_FILES = 64  # distinct files in one table below which fd_table searches the array in C


PauseFactory = Callable[[], AbstractContextManager[PauseRecord]]


def walk_once(
    space: AddressSpace,
    layout: KernelLayout,
    virt_shift: int,
    bounds: WalkBounds,
    prior: RefreshState | None = None,
    watch: WatchFn | None = None,
    quiet: QuietPlan | None = None,
) -> WalkResult:
    """One attempt: every task and its inet sockets. Never raises on guest data. With a
    `prior` state (incremental): tasks, fd tables and files unchanged since are reused,
    except the `watch`ed tasks'; with a `quiet` plan too, the task list is not walked (see
    QuietPlan)."""
    space.new_snapshot()
    walk = Walk(space, layout, virt_shift, bounds)
    walk.prior, walk.watch = prior, watch
    if quiet is not None and prior is None:
        quiet = None
    if quiet is not None:
        walk.recheck, walk.trust_unchanged = quiet.recheck, True
        walk.watch_token = quiet.watch_token if watch is not None else None
    if prior is not None:  # files of tables served whole (_held_again) stay known; a full
        walk.state.socks = dict(prior.socks)  # walk starts afresh (no stale files kept)
    result = WalkResult(attempts=1, state=walk.state, counts=walk.counts)
    try:
        if quiet is not None and quiet.tasks is not None:
            walk.quiet_walk(quiet.tasks, quiet.read, result)
        else:
            result.tasks = walk.for_each_task()
            walk.sockets(result.tasks, result)
        walk.state.entries = (result.sockets, result.packets)
        walk.state.entry_pids = _entry_pids(walk.kept_columns, result)
    except WalkAborted as e:  # what was read before the bound is kept
        walk.errors.append(e.issue)
    except (MemoryReadError, struct.error, ValueError, OverflowError) as e:  # belt and braces
        walk.errors.append(WalkIssue("walk", WalkReason.IMPLAUSIBLE, detail=f"bad data: {e}"))
    result.errors = walk.errors
    result.fd_slots, result.files, result.folded_fds = (
        walk.fd_slots,
        len(walk._socks),
        walk.folded_fds,
    )
    result.changed_pids = walk.changed_pids
    result.changed_entries = walk.changed_entries
    return result


def walk_guest(
    space: AddressSpace,
    layout: KernelLayout,
    virt_shift: int,
    bounds: WalkBounds | None = None,
    pause: PauseFactory | None = None,
    prior: RefreshState | None = None,
    watch: WatchFn | None = None,
    quiet: QuietPlan | None = None,
) -> WalkResult:
    """A full walk (incremental with a `prior` state, quiet with a plan: see walk_once),
    retried while it meets inconsistent data; paused as a last resort."""
    bounds = bounds or WalkBounds()
    start = time.perf_counter()
    result = WalkResult()
    attempts = 0
    for _ in range(max(1, bounds.retries)):
        attempts += 1
        result = walk_once(space, layout, virt_shift, bounds, prior, watch, quiet)
        if result.complete:
            break
    else:
        if pause is not None:
            attempts += 1
            with pause() as record:
                result = walk_once(space, layout, virt_shift, bounds, prior, watch, quiet)
            result.paused_seconds = record.seconds
    result.attempts = attempts
    result.seconds = time.perf_counter() - start
    return result
