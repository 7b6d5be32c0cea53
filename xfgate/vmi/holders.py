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

What it cannot see (a thread that unshared its files since the walk, a task freed and its
memory reused) is what the periodic full walk cross-checks (GuestIntrospector counts every
disagreement and repairs the index from the walk). Every read is bounded (tasks, slots, time);
a resolution that hit a bound or unreadable memory answers "holders not known", never raises.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from xfgate.errors import MemoryReadError, ProfileError
from xfgate.vmi.kernel_constants import PID_MAX_LIMIT
from xfgate.vmi.linux import KernelLayout, Task, Walk, WalkBounds
from xfgate.vmi.paging import AddressSpace
from xfgate.vmi.profile import Profile
from xfgate.vmi.walk import Deadline, WalkReason


@dataclass(frozen=True)
class HolderLayout:
    """The two back pointers from a sock to its file (absent: the resolver is off)."""

    sock_sk_socket: int
    socket_file: int

    @classmethod
    def from_profile(cls, p: Profile) -> HolderLayout | None:
        try:
            return cls(p.offset("sock", "sk_socket"), p.offset("socket", "file"))
        except ProfileError:
            return None


@dataclass
class Resolution:
    """The (task, fd) pairs holding one sock; `known` False when something was not read."""

    holders: list[tuple[Task, int]] = field(default_factory=list)
    new_tasks: list[Task] = field(default_factory=list)
    known: bool = False
    why: str = ""
    tables: int = 0  # fd tables searched
    slots: int = 0  # fd slots searched


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
    ) -> Resolution:
        """The holders of `sock` among `tasks` and the tasks created after them. With
        `stop_at` (the blocked owners): those tasks are searched first, and a holder among
        them ends the search: the answer then has a blocked holder, `known` False (a drop
        needs one blocked holder; an accept needs them all, so no early end without one)."""
        out = Resolution()
        deadline = Deadline.after(seconds)
        walk = Walk(self.space, self.layout, self.shift, self.bounds)
        walk.deadline = deadline
        try:
            file = self._file_of(walk, sock)
            if file == 0:  # sock_orphan()ed (closed): no fd table can hold it
                out.why = "the sock has no socket (orphaned)"
                out.known = not walk.errors
                return out
            if file < 0:
                out.why = "the sock's socket and file do not point back at each other"
                return out
            out.new_tasks = self._new_tasks(walk, tasks)
            if walk.errors:
                out.why = f"new tasks: {walk.errors[0]}"
                return out
            needle = struct.pack("<Q", file)
            order = [*tasks, *out.new_tasks]
            first = [t for t in order if stop_at(t)] if stop_at is not None else []
            for task in first:
                for table in self._tables_now(walk, task):
                    out.holders += [(task, fd) for fd in self._search(walk, table, needle, out)]
            if out.holders:
                out.holders = self._as_now(walk, out.holders, order)
                out.why = "stopped at a blocked holder (the others not searched)"
                return out
            searched = {id(t) for t in first}
            for task in (t for t in order if id(t) not in searched):
                if deadline.expired():
                    out.why = f"{seconds:.3f} s reached"
                    return out
                for table in self._tables_now(walk, task):
                    fds = self._search(walk, table, needle, out)
                    out.holders += [(task, fd) for fd in fds]
            out.holders = self._as_now(walk, out.holders, order)
            out.known = not walk.errors
            out.why = str(walk.errors[0]) if walk.errors else ""
        except (MemoryReadError, struct.error, ValueError) as e:
            out.known, out.why = False, f"bad data: {e}"
        return out

    def _file_of(self, walk: Walk, sock: int) -> int:
        """sock -> sk_socket -> file, each checked back; 0 when sk_socket is NULL (an orphan:
        held by no task), -1 when anything does not check (torn or hostile: not known)."""
        lay, hl = self.layout, self.hl
        raw = walk.read(sock + hl.sock_sk_socket, 8, "sock.sk_socket")
        if raw is None:
            return -1
        socket = walk._u64(raw, 0)
        if socket == 0:
            return 0
        if not walk.is_kernel_pointer(socket):
            return -1
        lo = min(hl.socket_file, lay.socket_sk)
        hi = max(hl.socket_file, lay.socket_sk) + 8
        raw = walk.read(socket + lo, hi - lo, "socket")
        if raw is None or walk._u64(raw, lay.socket_sk - lo) != sock:
            return -1
        file = walk._u64(raw, hl.socket_file - lo)
        if file == 0 or not walk.is_kernel_pointer(file):
            return -1
        flo, fhi = lay.file_span
        raw = walk.read(file + flo, fhi - flo, "socket file")
        if raw is None:
            return -1
        if walk._u64(raw, lay.file_f_op - flo) != lay.socket_file_ops + self.shift:
            return -1
        return file if walk._u64(raw, lay.file_private_data - flo) == socket else -1

    def _new_tasks(self, walk: Walk, known: Sequence[Task]) -> list[Task]:
        """Thread groups added after the last walk: back from the task list's tail to the
        first known task (at most max_tasks steps, `next->prev` checked each step)."""
        lay = self.layout
        lo, hi = lay.task_span
        head = lay.init_task + self.shift + lay.task_tasks
        # A task_struct freed and handed to a new task (the slab reuses it at once: exit, fork)
        # is not the known task: the pid tells them apart.
        seen = {t.address: t.pid for t in known}
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
            if seen.get(task) == lay.task_pid.get(blob, lo):
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
        tgids = {t.address: t.tgid for t in known}
        tgids[lay.init_task + self.shift] = 0
        tgids.update((a, lay.task_tgid.get(b, lo)) for a, b in found)
        tasks = [walk._task(a, b, tgids) for a, b in reversed(found)]
        return [t for t in tasks if t is not None]

    def _as_now(
        self, walk: Walk, holders: list[tuple[Task, int]], tasks: Sequence[Task]
    ) -> list[tuple[Task, int]]:
        """The holders as their task_structs say now, not as the last walk saw them: a task
        that was a root shell at the walk may have dropped to the blocked uid and exec'd the
        attacker's program since (how a login or a cron job starts one), and its sockets must
        not be judged by who it was. A holder that cannot be decoded again is left out and the
        answer is not known (`walk.errors`)."""
        lay = self.layout
        lo, hi = lay.task_span
        tgids = {t.address: t.tgid for t in tasks}
        tgids[lay.init_task + self.shift] = 0
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

    def _search(self, walk: Walk, files: int, needle: bytes, out: Resolution) -> list[int]:
        """The fds of table `files` holding the file `needle` (at most fds_per_file)."""
        lay = self.layout
        what = "fd table"
        if not walk.is_kernel_pointer(files):
            walk.wild(what, files)
            return []
        raw = walk.read(files + lay.files_fdt, 8, what)
        fdt = 0 if raw is None else walk._u64(raw, 0)
        if not walk.is_kernel_pointer(fdt):
            walk.wild(what, fdt)
            return []
        head = walk.read(fdt, max(lay.fdt_fd + 8, lay.fdt_max_fds.offset + 4), what)
        if head is None:
            return []
        count = min(lay.fdt_max_fds.get(head), self.bounds.max_fds)
        fd_array = walk._u64(head, lay.fdt_fd)
        if count <= 0:
            return []
        if not walk.is_kernel_pointer(fd_array):
            walk.wild(what, fd_array)
            return []
        arr = walk.read(fd_array, count * 8, what)
        if arr is None:
            return []
        out.tables += 1
        out.slots += count
        fds: list[int] = []
        start = arr.find(needle)
        while start >= 0 and len(fds) < self.bounds.fds_per_file:
            if not start & 7:
                fds.append(start >> 3)
                start = arr.find(needle, start + 8)
            else:
                start = arr.find(needle, start + 1)
        return fds
