"""The holders of one sock without a full walk: what a new flow's first packet needs.

A full walk reads every task's fd table and resolves every file (O(tasks + sockets), seconds on
a 2,000-task / 20,000-socket guest). A new socket needs much less: the sock the hash tables
found names its file (`sock.sk_socket` -> `socket.file`, checked back: `file.private_data` is
that socket, `socket.sk` that sock, `file.f_op` the socket file operations); its holders are
the fd tables whose fd array holds that file pointer. So the resolver reads, per known thread
group, the task (still the same pid? its `files` now?) and its fd tables' arrays, and searches
each array for the pointer at C speed; no file is resolved, no sock decoded. Tasks created
since the last walk are found at the tail of the task list (`copy_process` adds a new thread
group with `list_add_tail_rcu(&p->tasks, &init_task.tasks)`), walking back from
`init_task.tasks.prev` to the first task the last walk knew: old tasks are not re-read.

Most holders are found without reading every table: a file's reference count (`file.f_count`)
counts each fd slot that holds it, plus transient references (fdget() in a syscall of a
process whose table is shared, SCM_RIGHTS in flight, io_uring, mmap, splice...). The likely
holders are searched first — the watched (blocked) owners, tasks created since the walk, the
groups whose cred is the file's `f_cred` (the creator: sock_alloc_file() opens the file with
current_cred()), then the groups of the sock's `sk_uid` — and when the slots found equal the
count (read before the search, and twice after the holding tables are read again, unchanged;
each holding table's `files_struct.count` equal to the threads of the groups known to share
it), every holder is known and the rest is not read. A reference unaccounted for (a transient
one, a table shared with an unknown task, anything that moved meanwhile) is no shortcut: the
search goes on through every table, as before.

What it cannot see (a thread that unshared its files since the walk, a task freed and its
memory reused) is what the periodic full walk cross-checks (GuestIntrospector counts every
disagreement and repairs the index from the walk). Every read is bounded (tasks, slots, time);
a resolution that hit a bound or unreadable memory answers "holders not known", never raises.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections import ChainMap
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain

from xfgate.errors import MemoryReadError, ProfileError
from xfgate.vmi.kernel_constants import PID_MAX_LIMIT
from xfgate.vmi.linux import KernelLayout, Task, Walk, WalkBounds
from xfgate.vmi.memory import PhysicalMemory
from xfgate.vmi.paging import AddressSpace
from xfgate.vmi.profile import Profile
from xfgate.vmi.walk import Deadline, WalkReason

# file_ref_t (file.f_ref, v6.13 "fs: port files to file_ref") stores the count minus one;
# values past FILE_REF_MAXREF are saturated, released or dead: no count.
FILE_REF_MAXREF = 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class RefLayout:
    """What the reference count shortcut reads (absent: every table is searched, as before)."""

    file_count: int  # file.f_count (atomic_long_t) or, since v6.13, file.f_ref (file_ref_t)
    count_bias: int  # added to the raw value: 0 for f_count, 1 for f_ref
    file_cred: int  # file.f_cred: the opener's cred (a hint of who created the socket)
    files_count: int  # files_struct.count (atomic_t): the tasks whose `files` is this table

    @classmethod
    def from_profile(cls, p: Profile) -> RefLayout | None:
        member = next((m for m in ("f_count", "f_ref") if p.has_member("file", m)), "")
        needed = [("file", "f_cred"), ("files_struct", "count")]
        if not member or not all(p.has_member(s, m) for s, m in needed):
            return None
        return cls(
            p.offset("file", member),
            1 if member == "f_ref" else 0,
            p.offset("file", "f_cred"),
            p.offset("files_struct", "count"),
        )


@dataclass(frozen=True)
class HolderLayout:
    """The two back pointers from a sock to its file (absent: the resolver is off)."""

    sock_sk_socket: int
    socket_file: int
    refs: RefLayout | None = None

    @classmethod
    def from_profile(cls, p: Profile) -> HolderLayout | None:
        try:
            return cls(
                p.offset("sock", "sk_socket"), p.offset("socket", "file"), RefLayout.from_profile(p)
            )
        except ProfileError:
            return None


@dataclass(frozen=True)
class TaskIndex:
    """The known thread groups by what the resolver asks first: the creator's cred, the uid,
    and which groups use each fd table (built once per task list, not per lookup)."""

    by_cred: Mapping[int, Sequence[Task]]
    by_uid: Mapping[int, Sequence[Task]]
    by_table: Mapping[int, Sequence[Task]]
    by_address: Mapping[int, Task]
    tgids: dict[int, int]  # task_struct address -> tgid (a parent's pid without a read); read only

    @classmethod
    def build(cls, tasks: Sequence[Task]) -> TaskIndex:
        by_cred: dict[int, list[Task]] = {}
        by_uid: dict[int, list[Task]] = {}
        by_table: dict[int, list[Task]] = {}
        by_address = {t.address: t for t in tasks}
        tgids = {t.address: t.tgid for t in tasks}
        for t in tasks:
            by_cred.setdefault(t.cred, []).append(t)
            by_uid.setdefault(t.uid, []).append(t)
            for table in t.file_tables:
                by_table.setdefault(table, []).append(t)
        return cls(by_cred, by_uid, by_table, by_address, tgids)


# TableMap: pieces closer than this in physical memory are read as one span (the slab packs
# files_struct objects, whose fd_array[NR_OPEN_DEFAULT] is inline, a few hundred bytes apart),
# and no span is longer than MAX_SPAN (one read).
SPAN_GAP = 1024
MAX_SPAN = 1 << 18
# What one map searches at most: an fd array's first MAP_ARRAY_BYTES (8,192 fds: a new fd takes
# the lowest free slot), MAP_BYTES in all. A process that grows its table (an fd bomb, a blocked
# one's or anyone's) cannot make every other new flow's map search long: past these bounds an
# array is left out, and a holder there is found by the search through every table, as before.
MAP_ARRAY_BYTES = 1 << 16
MAP_BYTES = 1 << 23
# find_all: the byte of a file pointer memchr() looks for first (bits 16-23 of a direct-map
# address: spread over the guest's RAM, unlike the slab-aligned low byte or the constant high
# ones), and how many of its hits are checked before the rest is left to the two-way search.
PROBE_BYTE = 2
PROBE_HITS = 256
# The creator's groups (f_cred's) searched before the TableMap: a socket its creator holds
# (most) is settled by one or two tables (~0.2 ms), cheaper than the map's search (~0.4 ms on
# 1,200 tables); a cred shared by many groups (forked, never changed) is searched after it.
FIRST_CREATORS = 4


def find_all(blob: bytes, needle: bytes) -> Iterator[int]:
    """Every offset of `needle` in `blob`. bytes.find of one byte is memchr() (GB/s); of 8
    bytes in a buffer under ~30 kB it is CPython's simple loop, over it the two-way search
    (~1.6 GB/s here): a probe byte then a compare is ~6x faster on fd arrays, unless the probe
    byte is common there: after PROBE_HITS of them the rest is searched for the needle itself.
    Bounded: every find advances."""
    k = min(PROBE_BYTE, len(needle) - 1)
    probe = needle[k : k + 1]
    at = blob.find(probe, k)
    hits = 0
    while at >= 0 and hits < PROBE_HITS:
        hits += 1
        if blob.startswith(needle, at - k):
            yield at - k
        at = blob.find(probe, at + 1)
    if at < 0:
        return
    # Every needle starting before at - k had its probe byte before `at`: checked above.
    start = blob.find(needle, at - k)
    while start >= 0:
        yield start
        start = blob.find(needle, start + 1)


@dataclass(frozen=True)
class TableMap:
    """Where each fd table's fd array was in guest physical memory when the last walk (full or
    incremental) read it: the pieces (one per 4 KiB page of an array), sorted, and the spans of
    memory that cover them. Searching the spans for a file pointer (read span by span, searched
    as one buffer at C speed: ~0.8 MB for a thousand tables) names the tables that hold it now,
    *if* their arrays did not move since: an order to search in, never an answer. A table whose
    array moved (grew: expand_fdtable() allocates a new one) or whose memory was freed and
    reused is missed or named wrongly; the resolver then reads the named tables through the
    page tables as always, and a missed holder leaves the file's count unaccounted for: the
    whole search.

    `located` maps (fd array virtual address, bytes) to its pieces, so that the next map (one
    per refresh) translates only the arrays that are new."""

    starts: tuple[int, ...]  # physical start of each piece, sorted
    ends: tuple[int, ...]
    tables: tuple[int, ...]  # the files_struct each piece belongs to
    spans: tuple[tuple[int, int], ...]  # (physical start, length): the reads
    located: Mapping[tuple[int, int], tuple[tuple[int, int], ...]]

    @classmethod
    def build(
        cls,
        arrays: Iterable[tuple[int, int, int]],
        space: AddressSpace,
        prior: TableMap | None = None,
    ) -> TableMap:
        """`arrays`: (files_struct, fd array virtual address, bytes) as the walk read them.
        An array that does not translate is left out; each is cut to MAP_ARRAY_BYTES, and
        arrays past MAP_BYTES in all are left out."""
        reuse = prior.located if prior is not None else {}
        located: dict[tuple[int, int], tuple[tuple[int, int], ...]] = {}
        pieces: list[tuple[int, int, int]] = []
        total = 0
        for files, vaddr, length in arrays:
            length = min(length, MAP_ARRAY_BYTES)
            total += length
            if total > MAP_BYTES:
                break
            key = (vaddr, length)
            found = located.get(key) or reuse.get(key)
            if found is None:
                try:
                    found = tuple(cls._translate(space, vaddr, length))
                except MemoryReadError:
                    continue
            located[key] = found
            pieces.extend((pa, pa + n, files) for pa, n in found if n > 0)
        pieces.sort()
        spans: list[tuple[int, int]] = []
        lo = hi = -1
        for start, end, _ in pieces:
            if lo < 0 or start > hi + SPAN_GAP or max(hi, end) - lo > MAX_SPAN:
                if lo >= 0:
                    spans.append((lo, hi - lo))
                lo, hi = start, end
            else:
                hi = max(hi, end)
        if lo >= 0:
            spans.append((lo, hi - lo))
        return cls(
            tuple(p[0] for p in pieces),
            tuple(p[1] for p in pieces),
            tuple(p[2] for p in pieces),
            tuple(spans),
            located,
        )

    @staticmethod
    def _translate(space: AddressSpace, vaddr: int, length: int) -> list[tuple[int, int]]:
        """(physical address, bytes) per 4 KiB page of [vaddr, vaddr + length)."""
        out: list[tuple[int, int]] = []
        addr, end = vaddr, vaddr + length
        while addr < end:
            n = min(end, (addr | 0xFFF) + 1) - addr
            out.append((space.translate(addr), n))
            addr += n
        return out

    def holding(self, memory: PhysicalMemory, needle: bytes, deadline: Deadline) -> set[int]:
        """The tables whose recorded fd array holds `needle` (8-aligned) in memory now: the
        spans read (each once, the deadline checked between reads) and searched as one buffer
        (find_all). Bounded by the spans and by every find advancing; a span that cannot be
        read names nothing (the resolver's own search still reads every table it must)."""
        parts: list[bytes] = []
        bases: list[int] = []
        at_part: list[int] = []  # where each span starts in the joined buffer
        size = 0
        for base, length in self.spans:
            if deadline.expired():
                break
            try:
                data = memory.read(base, length)
            except MemoryReadError:
                continue
            parts.append(data)
            bases.append(base)
            at_part.append(size)
            size += len(data)
        blob = b"".join(parts)
        found: set[int] = set()
        starts, ends, tables = self.starts, self.ends, self.tables
        for at in find_all(blob, needle):
            j = bisect_right(at_part, at) - 1
            pa = bases[j] + at - at_part[j]
            if pa & 7 or at + len(needle) > at_part[j] + len(parts[j]):  # unaligned, or across
                continue
            i = bisect_right(starts, pa) - 1
            if i >= 0 and pa < ends[i]:
                found.add(tables[i])
        return found


@dataclass(frozen=True)
class FileRef:
    """The sock's file, its reference count (-1: unknown) and the cred it was opened with."""

    file: int
    count: int
    cred: int


@dataclass(frozen=True)
class Scan:
    """One fd table searched for one file: the fds holding it (at most fds_per_file), all
    slots holding it, and the table's files_struct.count (-1: not read)."""

    fds: tuple[int, ...]
    slots: int
    users: int


@dataclass
class Resolution:
    """The (task, fd) pairs holding one sock; `known` False when something was not read."""

    holders: list[tuple[Task, int]] = field(default_factory=list)
    new_tasks: list[Task] = field(default_factory=list)
    known: bool = False
    why: str = ""
    tables: int = 0  # fd tables searched
    slots: int = 0  # fd slots searched
    refs: int = -1  # the file's reference count before the search (-1: not read)
    by_count: bool = False  # settled by the reference count: the other tables not read
    unsettled: str = ""  # why the count did not settle it (the whole search then)
    located: set[int] = field(default_factory=set)  # tables the TableMap said hold the file


class HolderResolver:
    """Resolves socks to holders against the tasks of the last walk (plus new ones)."""

    def __init__(
        self,
        space: AddressSpace,
        layout: KernelLayout,
        holder_layout: HolderLayout,
        virt_shift: int,
        bounds: WalkBounds,
    ) -> None:
        self.space = space
        self.layout = layout
        self.hl = holder_layout
        self.shift = virt_shift
        self.bounds = bounds

    def resolve(
        self,
        sock: int,
        tasks: Sequence[Task],
        seconds: float,
        stop_at: Callable[[Task], bool] | None = None,
        sk_uid: int | None = None,
        index: TaskIndex | None = None,
        watched: Sequence[Task] | None = None,
        table_map: TableMap | None = None,
    ) -> Resolution:
        """The holders of `sock` among `tasks` and the tasks created after them. With
        `stop_at` (the blocked owners): those tasks are searched first, and a holder among
        them ends the search: the answer then has a blocked holder, `known` False (a drop
        needs one blocked holder; an accept needs them all, so no early end without one).
        Then the likely holders (new tasks, the file's creator, `sk_uid`'s groups; `index`
        is `tasks` indexed, built here when not given), and the rest only while the file's
        reference count is not accounted for (see _settled). `watched`: the tasks `stop_at`
        picks, when the caller has them already (nothing on the packet path is O(tasks) then
        but the fallback search). `table_map`: where the last walk found each fd array in
        physical memory; the groups using the tables it says hold the file now are searched
        right after the new tasks (the receiver of an SCM_RIGHTS, a socket opened with a cred
        no task holds: neither the file's cred nor sk_uid names them). Only the order changes:
        what settles the answer is the count, over tables read through the page tables."""
        out = Resolution()
        deadline = Deadline.after(seconds)
        walk = Walk(self.space, self.layout, self.shift, self.bounds)
        walk.deadline = deadline
        try:
            ref = self._file_of(walk, sock)
            if ref.file == 0:  # sock_orphan()ed (closed): no fd table can hold it
                out.why = "the sock has no socket (orphaned)"
                out.known = not walk.errors
                return out
            if ref.file < 0:
                out.why = "the sock's socket and file do not point back at each other"
                return out
            out.refs = ref.count
            index = index if index is not None else TaskIndex.build(tasks)
            out.new_tasks = self._new_tasks(walk, index)
            if walk.errors:
                out.why = f"new tasks: {walk.errors[0]}"
                return out
            needle = struct.pack("<Q", ref.file)
            if watched is not None:
                first = list(watched)
            else:
                first = [t for t in tasks if stop_at(t)] if stop_at is not None else []
            scans: dict[int, Scan] = {}
            found: dict[int, tuple[Task, list[int]]] = {}  # task address -> holder, fds
            searched: set[int] = set()
            slots = [0]  # slots holding the file in the tables read so far

            def search(task: Task) -> None:
                searched.add(task.address)
                for table in self._tables_now(walk, task):
                    scan = scans.get(table)
                    if scan is None:
                        scan = scans[table] = self._search(walk, table, needle, out)
                        slots[0] += scan.slots
                    if scan.fds:
                        found.setdefault(task.address, (task, []))[1].extend(scan.fds)

            def holders() -> list[tuple[Task, int]]:
                return [(t, fd) for t, fds in found.values() for fd in fds]

            for task in first:
                search(task)
            if found:
                out.holders = self._as_now(walk, holders(), index, out.new_tasks)
                out.why = "stopped at a blocked holder (the others not searched)"
                return out
            # New tasks first, all of them (no Owner judged them yet), then the likely
            # holders, then the rest while the count is not accounted for.
            creators = index.by_cred.get(ref.cred, ())

            def located() -> Iterator[Task]:  # run only when the creator's tables did not settle
                if table_map is not None:
                    out.located = table_map.holding(self.space.memory, needle, deadline)
                    yield from (t for f in out.located for t in index.by_table.get(f, ()))

            likely = chain(
                creators[:FIRST_CREATORS],
                located(),
                creators[FIRST_CREATORS:],
                index.by_uid.get(sk_uid, ()) if sk_uid is not None else (),
            )
            counting = self.hl.refs is not None and ref.count > 0
            if not counting:
                out.unsettled = "no reference count"
            new = {t.address for t in out.new_tasks}
            candidates = chain(out.new_tasks, likely, tasks)
            for task in (t for t in candidates if t.address not in searched):
                if deadline.expired():
                    out.why = f"{seconds:.3f} s reached"
                    return out
                search(task)
                if counting and slots[0] == ref.count and new <= searched:
                    counting = False  # one attempt: a count that moved is searched through
                    sharers = self._settled(walk, ref, scans, needle, index, out)
                    if sharers is not None:
                        for t in sharers:  # a table shared by groups: each is a holder
                            if t.address not in found:
                                search(t)
                        # A sharer that is not that task any more (pid changed): search on.
                        if all(t.address in found for t in sharers):
                            out.by_count = True
                            break
                        out.unsettled = "a group sharing a holding table is gone"
            out.holders = self._as_now(walk, holders(), index, out.new_tasks)
            out.known = not walk.errors
            out.why = str(walk.errors[0]) if walk.errors else ""
        except (MemoryReadError, struct.error, ValueError) as e:
            out.known, out.why = False, f"bad data: {e}"
        return out

    def _settled(
        self,
        walk: Walk,
        ref: FileRef,
        scans: Mapping[int, Scan],
        needle: bytes,
        index: TaskIndex,
        out: Resolution,
    ) -> list[Task] | None:
        """Every holder is known when the slots found account for the file's references:
        the count read again after the holding tables are read again, each unchanged, and
        each holding table used by no task but the threads of the groups known to use it
        (files_struct.count: a table shared with a task the walk did not see is not
        accounted for). Returns those groups (every one holds the file), None when anything
        does not account (the caller searches on)."""
        holding = {t: scan for t, scan in scans.items() if scan.slots}
        sharers: list[Task] = []
        for table, scan in holding.items():
            if len(scan.fds) != scan.slots:  # more dups than listed: not all named
                out.unsettled = "more fds than listed"
                return None
            users = [
                *index.by_table.get(table, ()),
                *(t for t in out.new_tasks if table in t.file_tables),
            ]
            if not users or any(t.file_tables != (table,) for t in users):
                out.unsettled = "a holding table is not one group's only table"
                return None
            sharers += users
            expected = sum(t.threads for t in users)
            again = self._search(walk, table, needle, Resolution())
            if again.fds != scan.fds or again.users != expected:
                out.unsettled = f"table {table:#x}: {again.users} users, {expected} known"
                return None
        after = [self._count(walk, ref.file) for _ in range(2)]
        if after != [ref.count, ref.count]:
            out.unsettled = f"reference count moved: {ref.count} -> {after}"
            return None
        return sharers

    def _count(self, walk: Walk, file: int) -> int:
        """The file's reference count now (-1: unreadable or past the counter's range)."""
        refs = self.hl.refs
        if refs is None:
            return -1
        raw = walk.read(file + refs.file_count, 8, "file reference count")
        if raw is None:
            return -1
        value = walk._u64(raw, 0)
        return value + refs.count_bias if value <= FILE_REF_MAXREF else -1

    def _file_of(self, walk: Walk, sock: int) -> FileRef:
        """sock -> sk_socket -> file, each checked back; file 0 when sk_socket is NULL (an
        orphan: held by no task), -1 when anything does not check (torn or hostile: not
        known). With the file: its reference count and f_cred (when the profile has them)."""
        lay, hl = self.layout, self.hl
        bad = FileRef(-1, -1, 0)
        raw = walk.read(sock + hl.sock_sk_socket, 8, "sock.sk_socket")
        if raw is None:
            return bad
        socket = walk._u64(raw, 0)
        if socket == 0:
            return FileRef(0, -1, 0)
        if not walk.is_kernel_pointer(socket):
            return bad
        lo = min(hl.socket_file, lay.socket_sk)
        hi = max(hl.socket_file, lay.socket_sk) + 8
        raw = walk.read(socket + lo, hi - lo, "socket")
        if raw is None or walk._u64(raw, lay.socket_sk - lo) != sock:
            return bad
        file = walk._u64(raw, hl.socket_file - lo)
        if file == 0 or not walk.is_kernel_pointer(file):
            return bad
        flo, fhi = lay.file_span
        if hl.refs is not None:
            flo = min(flo, hl.refs.file_count, hl.refs.file_cred)
            fhi = max(fhi, hl.refs.file_count + 8, hl.refs.file_cred + 8)
        raw = walk.read(file + flo, fhi - flo, "socket file")
        if raw is None:
            return bad
        if walk._u64(raw, lay.file_f_op - flo) != lay.socket_file_ops + self.shift:
            return bad
        if walk._u64(raw, lay.file_private_data - flo) != socket:
            return bad
        if hl.refs is None:
            return FileRef(file, -1, 0)
        count = walk._u64(raw, hl.refs.file_count - flo)
        count = count + hl.refs.count_bias if count <= FILE_REF_MAXREF else -1
        return FileRef(file, count, walk._u64(raw, hl.refs.file_cred - flo))

    def _new_tasks(self, walk: Walk, index: TaskIndex) -> list[Task]:
        """Thread groups added after the last walk: back from the task list's tail to the
        first known task (at most max_tasks steps, `next->prev` checked each step)."""
        lay = self.layout
        lo, hi = lay.task_span
        head = lay.init_task + self.shift + lay.task_tasks
        # A task_struct freed and handed to a new task (the slab reuses it at once: exit, fork)
        # is not the known task: the pid tells them apart.
        known = index.by_address
        raw = walk.read(head, 16, "task list")
        if raw is None:
            return []
        node, expect_next = walk._u64(raw, 8), head
        found: list[tuple[int, bytes]] = []
        for _ in range(self.bounds.max_tasks):
            if node == head:
                break
            if not walk.is_kernel_pointer(node):
                walk.wild("task list (backwards)", node)
                return []
            task = node - lay.task_tasks
            blob = walk.read(task + lo, hi - lo, "task list (backwards)")
            if blob is None:
                return []
            seen = known.get(task)
            if seen is not None and seen.pid == lay.task_pid.get(blob, lo):
                break
            nxt, prev = struct.unpack_from("<QQ", blob, lay.task_tasks - lo)
            if nxt != expect_next:
                walk.issue("task list (backwards)", WalkReason.BAD_PREV, node)
                return []
            found.append((task, blob))
            node, expect_next = prev, node
        else:
            detail = f"more than {self.bounds.max_tasks} new tasks"
            walk.issue("task list (backwards)", WalkReason.STEP_BOUND, node, detail)
            return []
        fresh = {lay.init_task + self.shift: 0}
        fresh.update((a, lay.task_tgid.get(b, lo)) for a, b in found)
        tgids = ChainMap(fresh, index.tgids)
        tasks = [walk._task(a, b, tgids) for a, b in reversed(found)]
        return [t for t in tasks if t is not None]

    def _as_now(
        self,
        walk: Walk,
        holders: list[tuple[Task, int]],
        index: TaskIndex,
        new_tasks: Sequence[Task],
    ) -> list[tuple[Task, int]]:
        """The holders as their task_structs say now, not as the last walk saw them: a task
        that was a root shell at the walk may have dropped to the blocked uid and exec'd the
        attacker's program since (how a login or a cron job starts one), and its sockets must
        not be judged by who it was. A holder that cannot be decoded again is left out and the
        answer is not known (`walk.errors`)."""
        lay = self.layout
        lo, hi = lay.task_span
        extra = {t.address: t.tgid for t in new_tasks}
        extra[lay.init_task + self.shift] = 0
        tgids = ChainMap(extra, index.tgids)
        fresh: dict[int, Task | None] = {}
        out: list[tuple[Task, int]] = []
        for task, fd in holders:
            if task.address not in fresh:
                blob = walk.read(task.address + lo, hi - lo, f"holder pid {task.pid}")
                now = walk._decode_task(task.address, blob, tgids) if blob is not None else None
                if now is not None and now.pid != task.pid:
                    walk.issue("holder", WalkReason.IMPLAUSIBLE, task.address, "pid changed")
                    now = None
                fresh[task.address] = now
            now = fresh[task.address]
            if now is not None:
                out.append((now, fd))
        return out

    def _tables_now(self, walk: Walk, task: Task) -> tuple[int, ...]:
        """The task's fd tables as the walk saw them, the leader's re-read (an exited task has
        none; a task_struct reused by another pid is not that task)."""
        lay = self.layout
        lo = min(lay.task_pid.offset, lay.task_files)
        hi = max(lay.task_pid.offset + 4, lay.task_files + 8)
        raw = walk.read(task.address + lo, hi - lo, f"task of pid {task.pid}")
        if raw is None:
            return ()
        pid = lay.task_pid.get(raw, lo)
        if pid != task.pid or not 0 < pid < PID_MAX_LIMIT:
            return ()
        files = walk._u64(raw, lay.task_files - lo)
        return tuple(dict.fromkeys(f for f in (files, *task.thread_files) if f))

    def _search(self, walk: Walk, files: int, needle: bytes, out: Resolution) -> Scan:
        """The fds of table `files` holding the file `needle` (at most fds_per_file listed,
        every 8-aligned slot counted), and the table's users (files_struct.count)."""
        lay = self.layout
        what = "fd table"
        none = Scan((), 0, -1)
        if not walk.is_kernel_pointer(files):
            walk.wild(what, files)
            return none
        refs = self.hl.refs
        lo = hi = lay.files_fdt
        if refs is not None:
            lo, hi = min(lo, refs.files_count), max(hi, refs.files_count + 4)
        raw = walk.read(files + lo, hi + 8 - lo, what)
        fdt = 0 if raw is None else walk._u64(raw, lay.files_fdt - lo)
        if raw is None or not walk.is_kernel_pointer(fdt):
            walk.wild(what, fdt)
            return none
        users = -1 if refs is None else struct.unpack_from("<i", raw, refs.files_count - lo)[0]
        head = walk.read(fdt, max(lay.fdt_fd + 8, lay.fdt_max_fds.offset + 4), what)
        if head is None:
            return none
        count = min(lay.fdt_max_fds.get(head), self.bounds.max_fds)
        fd_array = walk._u64(head, lay.fdt_fd)
        if count <= 0:
            return Scan((), 0, users)
        if not walk.is_kernel_pointer(fd_array):
            walk.wild(what, fd_array)
            return none
        arr = walk.read(fd_array, count * 8, what)
        if arr is None:
            return none
        out.tables += 1
        out.slots += count
        fds: list[int] = []
        slots = 0
        start = arr.find(needle)
        while start >= 0:  # at most `count` aligned matches: bounded by the array
            if not start & 7:
                slots += 1
                if len(fds) < self.bounds.fds_per_file:
                    fds.append(start >> 3)
                start = arr.find(needle, start + 8)
            else:
                start = arr.find(needle, start + 1)
        return Scan(tuple(fds), slots, users)
