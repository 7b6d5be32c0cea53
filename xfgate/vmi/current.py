"""`xfgate ps` answered by a running gate (issue 10): the gate's last refresh state made current
for the request, off the packet path.

The gate's quiet refreshes trust the fd tables of task_structs that did not change (a new
socket of a task that neither forks nor exits is seen late, up to the cross-check slice).
Good enough for verdicts (the packet path resolves a new sock's holders itself), not for an
operator's listing. For a `ps` request the state is brought up to date:

1. the task list is walked and every thread group's task_struct read (fingerprinted: a setuid,
   an exec, a new thread group show), and every fd table's header and fd array read again
   (files_struct->fdt, fdtable.max_fds, fdtable.fd and the array's bytes): a table whose
   fingerprint moved is decoded again, the others reused (linux.walk_guest with the prior
   state and no quiet plan);
2. every file in those tables is read again (f_op, private_data: a file freed and reused at
   the same address and slot, as a socket or not, shows there), each socket's struct socket
   (->sk) and its struct sock's first `sock_span` bytes: a sock is decoded again only when
   its bytes changed (a connect(), a bind(), a state change in place), else the last decode
   is reused (`CurrentReader`, keyed by file, rebuilt per request: bounded by the guest's
   own tables).

Every read is bounded (time, counts: WalkBounds); what could not be read makes the answer
incomplete, said in it. The walk runs on a private address space, without the source's
lock: lookups on the packet path go on meanwhile; nothing of the gate's view is replaced.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from xfgate.errors import MemoryReadError
from xfgate.flow import IPAddress
from xfgate.vmi.linux import (
    FdPacket,
    FdSocket,
    InetSock,
    KernelLayout,
    PacketSock,
    RefreshState,
    Task,
    WalkBounds,
    WalkResult,
    decode_any_sock,
    is_kernel_pointer,
    walk_guest,
)
from xfgate.vmi.memory import PhysicalMemory
from xfgate.vmi.paging import AddressSpace
from xfgate.vmi.ps_entries import process_entry, socket_entry
from xfgate.vmi.walk import WalkIssue, WalkReason

# A request's bound (the crowd's 2,000 tasks / 20,000 sockets: ~0.2 s of it). It runs on the
# control socket's slow-op thread: `status` and `block` answer meanwhile.
CURRENT_SECONDS = 5.0
_U64 = struct.Struct("<Q")
AnySock = InetSock | PacketSock


@dataclass(frozen=True)
class CurrentPlan:
    """What a request's walk needs, taken under the source's lock (GuestIntrospector
    .current_plan); the walk itself runs without it."""

    memory: PhysicalMemory
    root: int  # the kernel's page tables (CR3)
    levels: int
    layout: KernelLayout
    shift: int
    prior: RefreshState | None
    bounds: WalkBounds
    sk_socket: int | None  # offsetof(struct sock, sk_socket); None: not in the profile
    boot: object  # the boot the plan is for (its identity keys the reader's memo and space)
    base_age: float  # seconds since the gate's last complete walk or refresh (-1: none)


@dataclass
class CurrentCounts:
    tasks: int = 0
    tables_decoded: int = 0
    tables_reused: int = 0
    files_checked: int = 0
    socks_decoded: int = 0
    socks_reused: int = 0
    walk_ms: float = 0.0
    check_ms: float = 0.0


@dataclass
class Current:
    """The guest as the request found it: `result` as a walk's (tasks, sockets, packets,
    errors: empty when complete)."""

    result: WalkResult
    counts: CurrentCounts
    walked_at: float  # time.time() when the walk started
    base_age: float
    problems: list[str] = field(default_factory=list)
    # tgid -> its entries (result.sockets by thread group; the same object while unchanged)
    groups: dict[int, _Group] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.result.errors


# file -> (its f_op, private_data (struct socket *), socket->sk, hash of the sock's bytes,
# the sock decoded; None for a file that is not a socket)
_Hit = tuple[int, int, int, int, AnySock | None]
_Memo = dict[int, _Hit]
_Table = tuple[Any, dict[int, list[int]]]  # RefreshState.tables' values: (fingerprint, table)


class CurrentReader:
    """Makes a gate's last refresh state current for `ps` requests (see the module). One
    caller at a time (the control socket's slow-op thread); the memo is rebuilt by each request."""

    def __init__(self) -> None:
        self._memo: _Memo = {}
        self._groups: dict[int, _Group] = {}
        self._boot: object = None
        self._space: AddressSpace | None = None  # private: the gate's own is the packet path's
        self._interned: dict[bytes, IPAddress] = {}
        self.requests = 0

    def read(self, plan: CurrentPlan) -> Current:
        walked_at = time.time()
        start = time.perf_counter()
        if plan.boot is not self._boot or self._space is None:  # nothing of the last one holds
            self._memo, self._groups, self._interned, self._boot = {}, {}, {}, plan.boot
            self._space = AddressSpace(plan.memory, plan.root, plan.levels, "ps")
        space = self._space
        self.requests += 1
        bounds = dataclasses.replace(plan.bounds, retries=max(1, plan.bounds.retries))
        result = walk_guest(space, plan.layout, plan.shift, bounds, None, plan.prior)
        counts = CurrentCounts(tasks=len(result.tasks))
        if result.counts is not None:
            counts.tables_decoded = result.counts.tables_decoded
            counts.tables_reused = result.counts.tables_reused
        counts.walk_ms = round((time.perf_counter() - start) * 1000, 2)
        checked = time.perf_counter()
        groups: dict[int, _Group] = {}
        if result.state is not None:
            deadline = start + bounds.seconds
            groups = self._recheck(space, plan, result, result.state, counts, deadline)
        counts.check_ms = round((time.perf_counter() - checked) * 1000, 2)
        problems = [str(e) for e in result.errors[:10]]
        return Current(result, counts, walked_at, plan.base_age, problems, groups)

    def _recheck(
        self,
        space: AddressSpace,
        plan: CurrentPlan,
        result: WalkResult,
        state: RefreshState,
        counts: CurrentCounts,
        deadline: float,
    ) -> dict[int, _Group]:
        """result.sockets and .packets again from the walk's fd tables, every file and sock
        behind them read again (see the module); per thread group, the last request's entries
        when its tables are the same objects and every file read the same."""
        old, old_groups = self._memo, self._groups
        memo: _Memo = {}
        groups: dict[int, _Group] = {}
        sockets: list[FdSocket] = []
        packets: list[FdPacket] = []
        bounds = plan.bounds
        try:
            for n, task in enumerate(result.tasks):
                if not n & 0x3F and time.perf_counter() > deadline:
                    raise _Bound(f"{bounds.seconds} s reached", WalkReason.TIME_BOUND)
                tables = tuple(state.tables.get(f) for f in task.file_tables)
                same = True
                for entry in tables:
                    if entry is None:  # not read: the walk's errors say why
                        continue
                    for file in entry[1]:
                        hit = memo.get(file)
                        if hit is None:
                            if len(memo) >= bounds.max_files:
                                raise _Bound(
                                    f"more than {bounds.max_files} distinct files",
                                    WalkReason.STEP_BOUND,
                                )
                            was = old.get(file)
                            hit = memo[file] = self._file(space, plan, file, was, counts)
                            same = same and hit is was
                        elif hit is not old.get(file):
                            same = False
                key = tuple(id(e[1]) if e is not None else 0 for e in tables)
                group = old_groups.get(task.tgid)
                if not (same and group is not None and group.key == key and group.task is task):
                    group = _Group(task, key, tables, *self._entries(task, tables, memo))
                groups[task.tgid] = group
                if len(sockets) + len(packets) + len(group.sockets) > bounds.max_sockets:
                    detail = f"more than {bounds.max_sockets} sockets"
                    raise _Bound(detail, WalkReason.STEP_BOUND)
                sockets += group.sockets
                packets += group.packets
        except _Bound as e:
            result.errors.append(WalkIssue("ps: files and socks", e.reason, detail=str(e)))
        except (MemoryReadError, struct.error, ValueError) as e:  # bad guest data
            issue = WalkIssue("ps: files and socks", WalkReason.IMPLAUSIBLE, detail=str(e))
            result.errors.append(issue)
        result.sockets, result.packets = sockets, packets
        self._memo, self._groups = memo, groups
        return groups

    @staticmethod
    def _entries(
        task: Task, tables: tuple[_Table | None, ...], memo: _Memo
    ) -> tuple[list[FdSocket], list[FdPacket]]:
        """A thread group's (tgid, fd, sock) entries, once each (as Walk.sockets)."""
        seen: set[tuple[int, int]] = set()
        sockets: list[FdSocket] = []
        packets: list[FdPacket] = []
        for entry in tables:
            if entry is None:
                continue
            for file, fds in entry[1].items():
                sock = memo[file][4]
                if sock is None:
                    continue
                for fd in fds:
                    if (fd, sock.address) in seen:
                        continue
                    seen.add((fd, sock.address))
                    if isinstance(sock, PacketSock):
                        packets.append(FdPacket(task.tgid, fd, sock))
                    else:
                        sockets.append(FdSocket(task.tgid, fd, sock))
        sockets.sort(key=lambda s: s.fd)
        packets.sort(key=lambda p: p.fd)
        return sockets, packets

    def _file(
        self,
        space: AddressSpace,
        plan: CurrentPlan,
        file: int,
        was: _Hit | None,
        counts: CurrentCounts,
    ) -> _Hit:
        """One file read again: what it is now, its sock decoded again only if its bytes
        changed. A read that fails raises MemoryReadError (the answer is incomplete)."""
        lay, levels = plan.layout, space.levels
        counts.files_checked += 1
        if not is_kernel_pointer(file, levels):
            raise ValueError(f"file pointer {file:#x} out of range")
        lo, hi = lay.file_span
        blob = _read(space, file + lo, hi - lo)
        f_op = _U64.unpack_from(blob, lay.file_f_op - lo)[0]
        socket = _U64.unpack_from(blob, lay.file_private_data - lo)[0]
        if f_op != lay.socket_file_ops + plan.shift:  # not a socket (as the last time?)
            return was if was is not None and was[:2] == (f_op, 0) else (f_op, 0, 0, 0, None)
        if not is_kernel_pointer(socket, levels):
            raise ValueError(f"socket pointer {socket:#x} of file {file:#x} out of range")
        back = plan.sk_socket
        if back is not None and was is not None and was[:2] == (f_op, socket) and was[2]:
            # The same socket as last time: its sock read with sk->sk_socket, which must
            # still name this socket (sock_graft sets both ends, sock_orphan clears it):
            # one read fewer than socket->sk first.
            sk = was[2]
            sk_blob = _read(space, sk, max(lay.sock_span, back + 8))
            if _U64.unpack_from(sk_blob, back)[0] == socket:
                digest = hash(sk_blob)
                if digest == was[3]:
                    counts.socks_reused += 1
                    return was
                counts.socks_decoded += 1
                return (f_op, socket, sk, digest, self._decode(lay, sk, sk_blob))
        sk = _U64.unpack_from(_read(space, socket + lay.socket_sk, 8))[0]
        if sk == 0:  # a socket being set up or torn down (as the walk: not listed)
            hit: _Hit = (f_op, socket, 0, 0, None)
            return was if was == hit else hit
        if not is_kernel_pointer(sk, levels):
            raise ValueError(f"sock pointer {sk:#x} of file {file:#x} out of range")
        sk_blob = _read(space, sk, lay.sock_span if back is None else max(lay.sock_span, back + 8))
        digest = hash(sk_blob)  # keyed per process (SipHash): no guest can aim a collision
        if was is not None and was[:4] == (f_op, socket, sk, digest):
            counts.socks_reused += 1
            return was
        counts.socks_decoded += 1
        return (f_op, socket, sk, digest, self._decode(lay, sk, sk_blob))

    def _decode(self, lay: KernelLayout, sk: int, blob: bytes) -> AnySock | None:
        if len(self._interned) > 4096:  # hostile memory: as many addresses as socks
            self._interned = {}
        return decode_any_sock(lay, sk, blob[: lay.sock_span], self._interned)


@dataclass(frozen=True)
class _Group:
    """A thread group's entries as one request made them (reused while nothing moved)."""

    task: Task
    key: tuple[int, ...]  # ids of its fd tables' decoded dicts (held in `tables`)
    tables: tuple[_Table | None, ...]
    sockets: list[FdSocket]
    packets: list[FdPacket]


def _read(space: AddressSpace, vaddr: int, length: int) -> bytes:
    """space.read, its common case (inside one 4 KiB page) without its checks: 40,000 reads
    a crowd's request (the lengths here are the layout's, a few hundred bytes)."""
    if (vaddr & 0xFFF) + length <= 0x1000:
        return space.memory.read(space.translate(vaddr), length)
    return space.read(vaddr, length)


class _Bound(Exception):
    def __init__(self, detail: str, reason: WalkReason) -> None:
        super().__init__(detail)
        self.reason = reason


# -- the answer -------------------------------------------------------------------------------


class PsRenderer:
    """The `xfgate-lab truth --json` document of a Current, as xfgate.vmi.cli.json_lines or
    format_table would print it: each process's and each thread group's entries rendered
    once and kept while the Task or the group (CurrentReader) is the same object (a crowd's
    20,000 entries are mostly the last request's)."""

    def __init__(self) -> None:
        self._procs: dict[int, _ProcHit] = {}
        self._groups: dict[int, _GroupHit] = {}
        self._names: dict[IPAddress, str] = {}
        # (id of a process's entry, id of its group's) -> (both, its table rows, their widths,
        # (the widths its text was padded to, the text))
        self._rows: dict[tuple[int, int], _Rows] = {}

    def table_text(self, current: Current, pid: int | None = None, uid: int | None = None) -> str:
        """format_table(document(...)), each process's lines kept while its entries and the
        table's column widths are the same."""
        from xfgate.vmi.cli import TABLE_HEADER, table_lines, table_rows, table_widths

        entries = self._entries(current, pid, uid)
        old, rows = self._rows, {}
        widths = table_widths([TABLE_HEADER])
        for hit, ghit in entries:
            key = (id(hit), id(ghit))
            got = old.get(key)
            if got is None or got.proc is not hit or got.group is not ghit:
                mine = table_rows(hit[1], ghit[1] if ghit is not None else [])
                got = _Rows(hit, ghit, mine, table_widths(mine))
            rows[key] = got
            widths = tuple(map(max, widths, got.widths))
        texts = [table_lines([TABLE_HEADER], widths)]
        for key in (((id(hit), id(ghit))) for hit, ghit in entries):
            got = rows[key]
            if got.text is None or got.text[0] != widths:
                got.text = (widths, table_lines(got.rows, widths))
            texts.append(got.text[1])
        if pid is None and uid is None:
            self._rows = rows
        return "\n".join(texts)

    def _entries(
        self, current: Current, pid: int | None, uid: int | None
    ) -> list[tuple[_ProcHit, _GroupHit | None]]:
        """Each listed process's entry (Task, dict, JSON) and its group's (group, socket
        dicts, their JSON lines), in ps_document's order, filtered to `pid` and `uid` as
        filter_document does; the caches keep those of every process."""
        procs_old, procs = self._procs, {}
        groups_old, groups = self._groups, {}
        if len(self._names) > 4096:  # hostile memory: as many addresses as socks
            self._names = {}
        names = self._names
        out: list[tuple[_ProcHit, _GroupHit | None]] = []
        for t in sorted(current.result.tasks, key=lambda t: t.tgid):
            hit = procs_old.get(id(t))
            if hit is None or hit[0] is not t:
                d = process_entry(t)
                hit = (t, d, json.dumps(d))
            procs[id(t)] = hit
            group = current.groups.get(t.tgid)
            ghit = None
            if group is not None:
                ghit = groups_old.get(id(group))
                if ghit is None or ghit[0] is not group:
                    dicts = [socket_entry(s, names) for s in group.sockets if s.sock.is_port_socket]
                    ghit = (group, dicts, ",\n  ".join(map(json.dumps, dicts)))
                groups[id(group)] = ghit
            if (pid is None or t.tgid == pid) and (uid is None or t.uid == uid):
                out.append((hit, ghit))
        self._procs, self._groups = procs, groups
        return out

    def _parts(
        self, current: Current, pid: int | None, uid: int | None
    ) -> tuple[list[tuple[dict[str, Any], str]], list[tuple[list[dict[str, Any]], str]]]:
        """(process dict, its JSON), (a thread group's socket dicts, their JSON lines)."""
        entries = self._entries(current, pid, uid)
        processes = [(hit[1], hit[2]) for hit, _ in entries]
        sockets = [(g[1], g[2]) for _, g in entries if g is not None and g[1]]
        return processes, sockets

    def document(
        self, current: Current, pid: int | None = None, uid: int | None = None
    ) -> dict[str, Any]:
        """ps_document + filter_document of the request's result (the other_sockets too)."""
        processes, sockets = self._parts(current, pid, uid)
        doc: dict[str, Any] = {
            "processes": [d for d, _ in processes],
            "sockets": [d for dicts, _ in sockets for d in dicts],
        }
        others = _other_sockets(current.result, {d["pid"] for d in doc["processes"]})
        if others:
            doc["other_sockets"] = others
        return doc

    def json_text(
        self,
        current: Current,
        meta: dict[str, Any],
        pid: int | None = None,
        uid: int | None = None,
    ) -> str:
        """json_lines(document) with `meta`'s keys after the lists, from the cached texts."""
        processes, sockets = self._parts(current, pid, uid)
        parts = [_list_text("processes", [text for _, text in processes])]
        parts.append(_list_text("sockets", [text for _, text in sockets]))
        others = _other_sockets(current.result, {d["pid"] for d, _ in processes})
        if others:
            parts.append(_list_text("other_sockets", [json.dumps(o) for o in others]))
        parts += [f" {json.dumps(key)}: {json.dumps(value)}" for key, value in meta.items()]
        return "{\n" + ",\n".join(parts) + "\n}"


_ProcHit = tuple[Task, dict[str, Any], str]
_GroupHit = tuple["_Group", list[dict[str, Any]], str]


@dataclass
class _Rows:
    proc: _ProcHit
    group: _GroupHit | None
    rows: list[tuple[str, ...]]
    widths: tuple[int, ...]
    text: tuple[tuple[int, ...], str] | None = None


def _list_text(key: str, items: list[str]) -> str:
    head = f" {json.dumps(key)}: "
    if not items:
        return head + "[]"
    return head + "[\n  " + ",\n  ".join(items) + "\n ]"


def _other_sockets(result: WalkResult, pids: Iterable[int]) -> list[dict[str, Any]]:
    """ps_document's other_sockets (raw, packet, ...: few), of the processes listed."""
    from xfgate.vmi.introspect import ps_document

    keep = set(pids)
    rest = WalkResult(
        sockets=[s for s in result.sockets if not s.sock.is_port_socket and s.pid in keep],
        packets=[p for p in result.packets if p.pid in keep],
    )
    if not rest.sockets and not rest.packets:
        return []
    others: list[dict[str, Any]] = ps_document(rest).get("other_sockets", [])
    return others
