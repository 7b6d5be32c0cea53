"""A synthetic guest in a byte buffer: page tables, a kernel image with KASLR, a VMCOREINFO note,
tasks, creds, fd tables, files, sockets and the socket hash tables, laid out from a synthetic
profile whose offsets differ from any real kernel's (so nothing hard-coded can pass).

Built only with the public layout facts (profile offsets) and the kernel's hash functions; the
tests then check that the walkers read back what was built.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address

from xfgate.config import DomainConfig, MemoryConfig
from xfgate.errors import ProfileError
from xfgate.flow import GuestView, IPAddress
from xfgate.inet import IPProto
from xfgate.vmi import jhash
from xfgate.vmi.introspect import GuestIntrospector, guest_view
from xfgate.vmi.kaslr import START_KERNEL_MAP
from xfgate.vmi.memory import BufferMemory
from xfgate.vmi.profile import Member, Profile, StructLayout
from xfgate.vmi.sockets import hash_secret

DIRECT_MAP = 0xFFFF888000000000  # where the fake kernel maps all physical memory (2 MiB pages)
TEXT_LINK = 0xFFFFFFFF81000000
BANNER = "Linux version 6.1.0-fake (fake@example) #1 SMP PREEMPT_DYNAMIC Debian 6.1.0-1\n"
RELEASE = "6.1.0-fake"

MB = 1 << 20


def _layout(name: str, size: int, members: dict[str, tuple[int, str, int]]) -> StructLayout:
    return StructLayout(name, size, {k: Member(o, t, s) for k, (o, t, s) in members.items()})


P = "pointer"
U32 = "unsigned int"


def synthetic_structs() -> dict[str, StructLayout]:
    """Offsets deliberately unlike 6.1's (tasks 2192, pid 2416, ...)."""
    return {
        s.name: s
        for s in [
            _layout(
                "task_struct",
                0x600,
                {
                    "tasks": (0x120, "struct list_head", 16),
                    "pid": (0x200, "int", 4),
                    "tgid": (0x204, "int", 4),
                    "real_parent": (0x210, P, 8),
                    "parent": (0x218, P, 8),
                    "real_cred": (0x2A0, P, 8),
                    "cred": (0x2A8, P, 8),
                    "comm": (0x2B8, "array", 16),
                    "files": (0x300, P, 8),
                    "thread_node": (0x340, "struct list_head", 16),
                    "signal": (0x360, P, 8),
                },
            ),
            _layout("signal_struct", 0x100, {"thread_head": (0x30, "struct list_head", 16)}),
            _layout(
                "cred", 0x60, {"uid": (0x8, "struct anon", 4), "euid": (0x18, "struct anon", 4)}
            ),
            _layout("files_struct", 0x80, {"count": (0x0, "atomic_t", 4), "fdt": (0x28, P, 8)}),
            _layout("fdtable", 0x30, {"max_fds": (0x0, U32, 4), "fd": (0x10, P, 8)}),
            _layout(
                "file",
                0x120,
                {
                    "f_inode": (0x18, P, 8),
                    "f_op": (0x30, P, 8),
                    "f_count": (0x38, "atomic_long_t", 8),
                    "f_cred": (0x90, P, 8),
                    "private_data": (0xD0, P, 8),
                },
            ),
            _layout("socket", 0x40, {"sk": (0x20, P, 8), "file": (0x28, P, 8)}),
            _layout(
                "sock_common",
                0x90,
                {
                    "skc_daddr": (0, "unsigned int", 4),
                    "skc_rcv_saddr": (4, "unsigned int", 4),
                    "skc_hash": (8, U32, 4),
                    "skc_dport": (12, "short unsigned int", 2),
                    "skc_num": (14, "short unsigned int", 2),
                    "skc_family": (16, "short unsigned int", 2),
                    "skc_state": (18, "unsigned char", 1),
                    "skc_net": (48, "struct anon", 8),
                    "skc_v6_daddr": (56, "struct in6_addr", 16),
                    "skc_v6_rcv_saddr": (72, "struct in6_addr", 16),
                    "skc_listener": (96, P, 8),
                    "skc_nulls_node": (112, "struct hlist_nulls_node", 16),
                    "skc_node": (112, "struct hlist_node", 16),
                },
            ),
            _layout(
                "sock",
                0x340,
                {
                    "__sk_common": (0, "struct sock_common", 0x90),
                    "sk_type": (0x212, "short unsigned int", 2),
                    "sk_protocol": (0x214, "short unsigned int", 2),
                    "sk_uid": (0x238, "struct anon", 4),
                    "sk_socket": (0x280, P, 8),
                },
            ),
            _layout(
                "inet_hashinfo",
                0x50,
                {
                    "ehash": (0, P, 8),
                    "ehash_mask": (16, U32, 4),
                    "lhash2_mask": (60, U32, 4),
                    "lhash2": (64, P, 8),
                },
            ),
            _layout(
                "inet_listen_hashbucket",
                16,
                {
                    "lock": (0, "struct spinlock", 4),
                    "nulls_head": (8, "struct hlist_nulls_head", 8),
                },
            ),
            _layout("udp_table", 24, {"hash": (0, P, 8), "mask": (16, U32, 4)}),
            _layout("udp_hslot", 16, {"head": (0, "struct hlist_head", 8), "count": (8, "int", 4)}),
            _layout("net", 0x200, {"hash_mix": (0x148, U32, 4)}),
        ]
    }


# Link-time symbol addresses inside the fake kernel image (2 MiB from _text).
SYMBOL_OFFSETS = {
    "_text": 0,
    "linux_banner": 0x10000,
    "socket_file_ops": 0x11000,
    "init_task": 0x20000,
    "init_files": 0x21000,
    "tcp_hashinfo": 0x22000,
    "udp_table": 0x22100,
    "init_net": 0x23000,
    "inet_ehash_secret.3": 0x24000,
    "inet6_ehash_secret.3": 0x24004,
    "ipv6_hash_secret.2": 0x24008,
    "init_top_pgt": 0x1F0000,
}


def synthetic_profile(banner: str = BANNER, release: str = RELEASE) -> Profile:
    return Profile(
        release=release,
        banner=banner,
        structs=synthetic_structs(),
        symbols={k: TEXT_LINK + v for k, v in SYMBOL_OFFSETS.items()},
        symbol_types={"init_task": "task_struct"},
    )


def counters_profile() -> Profile:
    """The synthetic profile with kernel/fork.c's `nr_threads` and `total_forks` (adjacent, as
    on 6.1 and 6.12): the introspector's quiet refreshes use them; FakeGuest keeps them."""
    base = synthetic_profile()
    symbols = dict(base.symbols)
    symbols["nr_threads"] = TEXT_LINK + 0x25000
    symbols["total_forks"] = TEXT_LINK + 0x25008
    return dataclasses.replace(base, symbols=symbols)


def worker_profile(full_worker_id: bool = True) -> Profile:
    """The synthetic profile with what /proc's kernel-thread names need (task flags, kthread,
    worker, workqueue_struct); `full_worker_id`: the kernel has format_worker_id (6.10+)."""
    base = synthetic_profile()
    structs = dict(base.structs)
    task = structs["task_struct"]
    structs["task_struct"] = StructLayout(
        "task_struct",
        task.size,
        {
            **task.members,
            "flags": Member(0x2C, U32, 4),
            "worker_private": Member(0x3A0, P, 8),
        },
    )
    structs["kthread"] = _layout("kthread", 0x80, {"data": (0x18, P, 8), "full_name": (0x58, P, 8)})
    structs["worker"] = _layout(
        "worker",
        0xC0,
        {
            "current_work": (0x18, P, 8),
            "pool": (0x60, P, 8),
            "desc": (0x70, "array", 24),
            "rescue_wq": (0xA8, P, 8),
        },
    )
    structs["workqueue_struct"] = _layout("workqueue_struct", 0x140, {"name": (0xD0, "array", 32)})
    symbols = dict(base.symbols)
    if full_worker_id:
        symbols["format_worker_id"] = TEXT_LINK + 0x12000
    return Profile(
        release=base.release,
        banner=base.banner,
        structs=structs,
        symbols=symbols,
        symbol_types=dict(base.symbol_types),
    )


HOTDATA_OFFSET = 0x25000  # net_hotdata in the fake image


def hotdata_profile(release: str = "6.12.0-fake") -> Profile:
    """6.12's spelling: no hash-secret symbols, the secrets are members of net_hotdata
    (tcp_protocol.secret, tcpv6_protocol.secret, tcpv6_offload.secret), offsets unlike 6.12's."""
    base = synthetic_profile(BANNER.replace("6.1.0-fake", release), release)
    structs = dict(base.structs)
    structs["net_protocol"] = _layout(
        "net_protocol", 32, {"handler": (0, P, 8), "secret": (20, U32, 4)}
    )
    structs["inet6_protocol"] = _layout(
        "inet6_protocol", 40, {"handler": (0, P, 8), "flags": (24, U32, 4), "secret": (28, U32, 4)}
    )
    structs["net_offload"] = _layout(
        "net_offload", 36, {"flags": (24, U32, 4), "secret": (32, U32, 4)}
    )
    structs["net_hotdata"] = _layout(
        "net_hotdata",
        0x200,
        {
            "tcp_protocol": (0x40, "struct net_protocol", 32),
            "udp_protocol": (0x60, "struct net_protocol", 32),
            "tcpv6_offload": (0x100, "struct net_offload", 36),
            "tcpv6_protocol": (0x140, "struct inet6_protocol", 40),
        },
    )
    symbols = {k: v for k, v in base.symbols.items() if "hash_secret" not in k}
    symbols["net_hotdata"] = TEXT_LINK + HOTDATA_OFFSET
    return Profile(
        release=release,
        banner=base.banner,
        structs=structs,
        symbols=symbols,
        symbol_types=dict(base.symbol_types),
    )


@dataclass
class FakeTask:
    address: int
    pid: int
    comm: str
    uid: int
    euid: int
    ppid: int
    files: int
    fd_array: int
    max_fds: int


@dataclass
class FakeGuest:
    """Build with the add_* methods, then read through `memory` with `profile`."""

    size: int = 16 * MB
    levels: int = 4
    virt_shift: int = 0x2E000000
    phys_text: int = 0x600000
    vmcoreinfo: bool = True
    ehash_buckets: int = 64
    lhash2_buckets: int = 16
    udp_buckets: int = 32
    secrets: tuple[int, int, int, int] = (0x1234ABCD, 0x0BADF00D, 0xC0FFEE11, 0x5EED5EED)
    profile: Profile = field(default_factory=synthetic_profile)

    def __post_init__(self) -> None:
        self.buf = bytearray(self.size)
        self.memory = BufferMemory(self.buf, "fake guest")
        self.phys_base = self.phys_text - (TEXT_LINK + self.virt_shift - START_KERNEL_MAP)
        self._next_table = 0x100000  # page tables from 1 MiB
        self._next_obj = 0x900000  # objects (slab) from 9 MiB
        self.root = self.symbol_paddr("init_top_pgt")
        self.tasks: list[FakeTask] = []
        self._build_paging()
        self._write_bytes(self.sym("linux_banner"), self.profile.banner.encode() + b"\0")
        self._build_init_task()
        self._build_hash_tables()
        if self.vmcoreinfo:
            self._write_vmcoreinfo()

    # -- addresses -------------------------------------------------------------------------------

    def sym(self, name: str) -> int:
        """Runtime virtual address of a symbol."""
        return self.profile.symbol(name) + self.virt_shift

    def symbol_paddr(self, name: str) -> int:
        return self.profile.symbol(name) + self.virt_shift - START_KERNEL_MAP + self.phys_base

    def pa(self, vaddr: int) -> int:
        """Physical address of a fake kernel virtual address (image or direct map)."""
        if vaddr >= START_KERNEL_MAP:
            return vaddr - START_KERNEL_MAP + self.phys_base
        if DIRECT_MAP <= vaddr < DIRECT_MAP + self.size:
            return vaddr - DIRECT_MAP
        raise ValueError(f"{vaddr:#x} is not mapped in the fake guest")

    def off(self, struct_name: str, member: str) -> int:
        return self.profile.offset(struct_name, member)

    def read_q(self, vaddr: int) -> int:
        value: int = struct.unpack_from("<Q", self.buf, self.pa(vaddr))[0]
        return value

    def w(self, vaddr: int, fmt: str, *values: int) -> None:
        struct.pack_into(fmt, self.buf, self.pa(vaddr), *values)

    def _write_bytes(self, vaddr: int, data: bytes) -> None:
        p = self.pa(vaddr)
        self.buf[p : p + len(data)] = data

    def alloc(self, size: int, align: int = 64) -> int:
        """A zeroed object in the direct map (virtual address)."""
        self._next_obj = (self._next_obj + align - 1) & ~(align - 1)
        p = self._next_obj
        self._next_obj += size
        if self._next_obj > self.size:
            raise MemoryError("fake guest full")
        return DIRECT_MAP + p

    # -- paging ----------------------------------------------------------------------------------

    def _table(self) -> int:
        p = self._next_table
        self._next_table += 0x1000
        return p

    def _entry(self, table: int, index: int) -> int:
        value: int = struct.unpack_from("<Q", self.buf, table + index * 8)[0]
        return value

    def _next_level(self, table: int, index: int) -> int:
        e = self._entry(table, index)
        if e & 1:
            return e & 0x000FFFFFFFFFF000
        t = self._table()
        struct.pack_into("<Q", self.buf, table + index * 8, t | 0x63)
        return t

    def map_page(self, vaddr: int, paddr: int, page_size: int = 0x1000) -> None:
        table = self.root
        shifts = [48, 39] if self.levels == 5 else [39]
        for s in shifts:
            table = self._next_level(table, (vaddr >> s) & 0x1FF)
        if page_size == 1 << 30:
            struct.pack_into("<Q", self.buf, table + ((vaddr >> 30) & 0x1FF) * 8, paddr | 0xE3)
            return
        table = self._next_level(table, (vaddr >> 30) & 0x1FF)
        if page_size == 1 << 21:
            struct.pack_into("<Q", self.buf, table + ((vaddr >> 21) & 0x1FF) * 8, paddr | 0xE3)
            return
        table = self._next_level(table, (vaddr >> 21) & 0x1FF)
        struct.pack_into("<Q", self.buf, table + ((vaddr >> 12) & 0x1FF) * 8, paddr | 0x63)

    def _build_paging(self) -> None:
        # Kernel image: 4 KiB pages (exercises the full walk), 2 MiB of it.
        text = TEXT_LINK + self.virt_shift
        for off in range(0, 2 * MB, 0x1000):
            self.map_page(text + off, self.phys_text + off)
        # Direct map: 2 MiB pages over all memory.
        for off in range(0, self.size, 2 * MB):
            self.map_page(DIRECT_MAP + off, off, 2 * MB)

    def _write_vmcoreinfo(self) -> None:
        text = (
            f"OSRELEASE={self.profile.release}\nPAGESIZE=4096\n"
            f"SYMBOL(swapper_pg_dir)={self.sym('init_top_pgt'):x}\n"
            f"SYMBOL(_stext)={self.sym('_text'):x}\n"
            f"NUMBER(phys_base)={self.phys_base}\n"
            f"NUMBER(pgtable_l5_enabled)={1 if self.levels == 5 else 0}\n"
            f"KERNELOFFSET={self.virt_shift:x}\n"
        ).encode()
        self.buf[0x80000 : 0x80000 + len(text) + 1] = text + b"\0"

    # -- tasks -----------------------------------------------------------------------------------

    def _build_init_task(self) -> None:
        t = self.sym("init_task")
        head = t + self.off("task_struct", "tasks")
        self.w(head, "<QQ", head, head)  # empty list: next = prev = head
        self.w(t + self.off("task_struct", "files"), "<Q", self.sym("init_files"))
        self._write_bytes(t + self.off("task_struct", "comm"), b"swapper/0\0")
        cred = self.alloc(0x60)
        self.w(t + self.off("task_struct", "real_cred"), "<Q", cred)

    def add_task(
        self,
        pid: int,
        comm: str,
        uid: int = 0,
        euid: int | None = None,
        parent: int = 0,
        max_fds: int = 64,
        with_files: bool = True,
        at: int | None = None,
    ) -> int:
        """A thread-group leader appended to init_task.tasks; returns its address (`at`: the
        task_struct of a task that exited, reused as the slab does)."""
        t = at if at is not None else self.alloc(0x600)
        ts = "task_struct"
        self.w(t + self.off(ts, "pid"), "<ii", pid, pid)
        parent = parent or self.sym("init_task")
        self.w(t + self.off(ts, "real_parent"), "<QQ", parent, parent)
        cred = self.alloc(0x60)
        self.w(cred + self.off("cred", "uid"), "<I", uid)
        self.w(cred + self.off("cred", "euid"), "<I", uid if euid is None else euid)
        self.w(t + self.off(ts, "real_cred"), "<QQ", cred, cred)
        self._write_bytes(t + self.off(ts, "comm"), comm.encode()[:15] + b"\0")
        files = fd_array = 0
        if with_files:
            files, fd_array = self.new_files(max_fds)
        self.w(t + self.off(ts, "files"), "<Q", files)
        signal = self.alloc(0x100)
        head = signal + self.off("signal_struct", "thread_head")
        node = t + self.off(ts, "thread_node")
        self.w(head, "<QQ", node, node)
        self.w(node, "<QQ", head, head)
        self.w(t + self.off(ts, "signal"), "<Q", signal)
        self._list_add_tail(t + self.off(ts, "tasks"))
        self.count_fork()
        ppid = 0 if parent == self.sym("init_task") else self.task_at(parent).pid
        self.tasks.append(
            FakeTask(
                t, pid, comm, uid, uid if euid is None else euid, ppid, files, fd_array, max_fds
            )
        )
        return t

    def add_rescuer(self, pid: int, workqueue: str, desc: str = "", busy: bool = False) -> int:
        """A workqueue's rescuer kthread as 6.12 creates it: comm "kworker/R-" + the name cut to
        15 characters, PF_KTHREAD | PF_WQ_WORKER, kthread->data the worker, worker->rescue_wq
        the workqueue; attached to a pool (and `desc` set) only while it works."""
        t = self.add_task(pid, f"kworker/R-{workqueue}", with_files=False)
        self.w(t + self.off("task_struct", "flags"), "<I", 0x00200000 | 0x20)
        kthread, worker, wq = self.alloc(0x80), self.alloc(0xC0), self.alloc(0x140)
        self.w(t + self.off("task_struct", "worker_private"), "<Q", kthread)
        self.w(kthread + self.off("kthread", "data"), "<Q", worker)
        self.w(worker + self.off("worker", "rescue_wq"), "<Q", wq)
        self._write_bytes(wq + self.off("workqueue_struct", "name"), workqueue.encode() + b"\0")
        if desc:
            self.w(worker + self.off("worker", "pool"), "<Q", self.alloc(0x40))
            self._write_bytes(worker + self.off("worker", "desc"), desc.encode() + b"\0")
            self.w(
                worker + self.off("worker", "current_work"), "<Q", self.alloc(0x20) if busy else 0
            )
        return t

    def new_files(self, max_fds: int = 64) -> tuple[int, int]:
        """A files_struct with its fdtable: (files_struct, fd array)."""
        files = self.alloc(0x80)
        fdt = self.alloc(0x30)
        fd_array = self.alloc(max_fds * 8)
        self.w(files + self.off("files_struct", "fdt"), "<Q", fdt)
        self.w(files + self.off("files_struct", "count"), "<i", 1)
        self.w(fdt + self.off("fdtable", "max_fds"), "<I", max_fds)
        self.w(fdt + self.off("fdtable", "fd"), "<Q", fd_array)
        return files, fd_array

    def add_thread(self, leader: int, tid: int, files: int = 0) -> int:
        """A thread of `leader`'s group (on signal->thread_head), sharing its files_struct
        unless `files` (unshare(CLONE_FILES)); not on init_task.tasks."""
        ts = "task_struct"
        t = self.alloc(0x600)
        tgid = self.task_at(leader).pid
        self.w(t + self.off(ts, "pid"), "<ii", tid, tgid)
        self.w(t + self.off(ts, "files"), "<Q", files or self.task_at(leader).files)
        if not files:  # one more task on the leader's table (copy_files with CLONE_FILES)
            self.add_count(self.task_at(leader).files + self.off("files_struct", "count"), 1, 4)
        signal = struct.unpack_from("<Q", self.buf, self.pa(leader + self.off(ts, "signal")))[0]
        head = signal + self.off("signal_struct", "thread_head")
        prev = struct.unpack_from("<Q", self.buf, self.pa(head + 8))[0]
        node = t + self.off(ts, "thread_node")
        self.w(node, "<QQ", head, prev)  # list_add_tail
        self.w(prev, "<Q", node)
        self.w(head + 8, "<Q", node)
        return t

    def put_fd(self, fd_array: int, fd: int, file: int) -> None:
        """Install `file` at `fd` (0: close it), the files' reference counts kept as the
        kernel keeps them (when the profile has file.f_count)."""
        old = self.read_q(fd_array + fd * 8)
        self.w(fd_array + fd * 8, "<Q", file)
        if self.profile.has_member("file", "f_count"):
            for f, delta in ((old, -1), (file, 1)):
                if f:
                    self.add_count(f + self.off("file", "f_count"), delta)

    def add_count(self, vaddr: int, delta: int, size: int = 8) -> None:
        fmt = "<q" if size == 8 else "<i"
        self.w(vaddr, fmt, struct.unpack_from(fmt, self.buf, self.pa(vaddr))[0] + delta)

    def task_at(self, address: int) -> FakeTask:
        return next(t for t in self.tasks if t.address == address)

    def count_fork(self, threads: int = 1) -> None:
        """What copy_process does to the counters (a profile with them: counters_profile)."""
        if self.profile.has_symbol("total_forks"):
            forks, nr = self.sym("total_forks"), self.sym("nr_threads")
            self.w(forks, "<Q", self.read_q(forks) + 1)
            self.w(nr, "<i", struct.unpack_from("<i", self.buf, self.pa(nr))[0] + threads)

    def exit_task(self, task: int) -> None:
        """A thread group leaves: unlinked from the task list (list_del_rcu), nr_threads down."""
        node = task + self.off("task_struct", "tasks")
        nxt, prev = self.read_q(node), self.read_q(node + 8)
        self.w(prev, "<Q", nxt)
        self.w(nxt + 8, "<Q", prev)
        self.tasks = [t for t in self.tasks if t.address != task]
        if self.profile.has_symbol("nr_threads"):
            nr = self.sym("nr_threads")
            self.w(nr, "<i", struct.unpack_from("<i", self.buf, self.pa(nr))[0] - 1)

    def _list_add_tail(self, node: int) -> None:
        head = self.sym("init_task") + self.off("task_struct", "tasks")
        prev = struct.unpack_from("<Q", self.buf, self.pa(head + 8))[0]
        self.w(node, "<QQ", head, prev)
        self.w(prev, "<Q", node)
        self.w(head + 8, "<Q", node)

    # -- sockets ---------------------------------------------------------------------------------

    def new_sock(
        self,
        proto: int,
        state: int,
        local: str,
        lport: int,
        remote: str,
        rport: int,
        sk_uid: int = 0,
        size: int = 0x340,
    ) -> int:
        sk = self.alloc(size)
        loc, rem = ip_address(local), ip_address(remote)
        sc = "sock_common"
        if loc.version == 4:
            self.w(sk + self.off(sc, "skc_family"), "<H", 2)
            self._write_bytes(sk + self.off(sc, "skc_rcv_saddr"), loc.packed)
            self._write_bytes(sk + self.off(sc, "skc_daddr"), rem.packed)
        else:
            self.w(sk + self.off(sc, "skc_family"), "<H", 10)
            self._write_bytes(sk + self.off(sc, "skc_v6_rcv_saddr"), loc.packed)
            self._write_bytes(sk + self.off(sc, "skc_v6_daddr"), rem.packed)
            for v6, v4_member in ((loc, "skc_rcv_saddr"), (rem, "skc_daddr")):
                assert isinstance(v6, IPv6Address)
                if v6.ipv4_mapped is not None:
                    self._write_bytes(sk + self.off(sc, v4_member), v6.ipv4_mapped.packed)
        self.w(sk + self.off(sc, "skc_num"), "<H", lport)
        self.w(sk + self.off(sc, "skc_dport"), ">H", rport)
        self.w(sk + self.off(sc, "skc_state"), "<B", state)
        self.w(sk + self.off(sc, "skc_net"), "<Q", self.sym("init_net"))
        if size >= 0x340:
            self.w(sk + self.off("sock", "sk_type"), "<HH", 1 if proto == IPProto.TCP else 2, proto)
            self.w(sk + self.off("sock", "sk_uid"), "<I", sk_uid)
        return sk

    def add_fd(self, task: int, fd: int, sk: int, socket_file: bool = True) -> int:
        """Put a file for `sk` at `fd` of `task`'s table; returns the struct file."""
        fake = self.task_at(task)
        file = self.alloc(0x120)
        sock = self.alloc(0x40)
        self.w(sock + self.off("socket", "sk"), "<Q", sk)
        self.w(sock + self.off("socket", "file"), "<Q", file)
        if self.profile.has_member("sock", "sk_socket"):  # the holder resolver's way back
            self.w(sk + self.off("sock", "sk_socket"), "<Q", sock)
        f_op = self.sym("socket_file_ops") if socket_file else self.sym("socket_file_ops") + 0x100
        self.w(file + self.off("file", "f_op"), "<Q", f_op)
        self.w(file + self.off("file", "private_data"), "<Q", sock)
        if self.profile.has_member("file", "f_cred"):  # opened with the task's cred
            cred = self.read_q(task + self.off("task_struct", "real_cred"))
            self.w(file + self.off("file", "f_cred"), "<Q", cred)
        self.put_fd(fake.fd_array, fd, file)
        return file

    # -- hash tables -----------------------------------------------------------------------------

    def _build_hash_tables(self) -> None:
        hi = self.sym("tcp_hashinfo")
        self.ehash = self.alloc(self.ehash_buckets * 8)
        for i in range(self.ehash_buckets):  # empty nulls lists end in (slot << 1) | 1
            self.w(self.ehash + i * 8, "<Q", (i << 1) | 1)
        self.lhash2 = self.alloc(self.lhash2_buckets * 16)
        for i in range(self.lhash2_buckets):
            self.w(self.lhash2 + i * 16 + 8, "<Q", (i << 1) | 1)
        self.w(hi + self.off("inet_hashinfo", "ehash"), "<Q", self.ehash)
        self.w(hi + self.off("inet_hashinfo", "ehash_mask"), "<I", self.ehash_buckets - 1)
        self.w(hi + self.off("inet_hashinfo", "lhash2"), "<Q", self.lhash2)
        self.w(hi + self.off("inet_hashinfo", "lhash2_mask"), "<I", self.lhash2_buckets - 1)
        self.udp_hash = self.alloc(self.udp_buckets * 16)
        ut = self.sym("udp_table")
        self.w(ut + self.off("udp_table", "hash"), "<Q", self.udp_hash)
        self.w(ut + self.off("udp_table", "mask"), "<I", self.udp_buckets - 1)
        mix, e4, e6, v6 = self.secrets
        self.w(self.sym("init_net") + self.off("net", "hash_mix"), "<I", mix)
        for what, value in (
            ("inet_ehash_secret", e4),
            ("inet6_ehash_secret", e6),
            ("ipv6_hash_secret", v6),
        ):
            try:  # where this profile keeps it (a symbol in 6.1, net_hotdata in 6.12)
                addr = hash_secret(self.profile, what)
            except ProfileError:
                continue  # a profile without it: the guest still has the others
            self.w(addr + self.virt_shift, "<I", value)

    def _push(self, head: int, sk: int) -> None:
        self._hlist_add_head(head, sk + self.off("sock_common", "skc_nulls_node"))

    def _hlist_add_head(self, head: int, node: int) -> None:
        """hlist_add_head / hlist_nulls_add_head: next, pprev == &head->first, next->pprev."""
        first = struct.unpack_from("<Q", self.buf, self.pa(head))[0]
        self.w(node, "<QQ", first, head)
        if first and not first & 1:
            self.w(first + 8, "<Q", node)
        self.w(head, "<Q", node)

    def hash_established(self, sk: int, local: str, lport: int, remote: str, rport: int) -> int:
        """Insert into ehash where the kernel would (inet_ehashfn/inet6_ehashfn)."""
        mix, e4, e6, v6 = self.secrets
        loc, rem = ip_address(local), ip_address(remote)
        if isinstance(loc, IPv6Address) and loc.ipv4_mapped is not None:
            assert isinstance(rem, IPv6Address) and rem.ipv4_mapped is not None
            loc, rem = loc.ipv4_mapped, rem.ipv4_mapped
        if loc.version == 4:
            key = jhash.inet_ehashfn(loc.packed, lport, rem.packed, rport, (e4 + mix) & jhash.M32)
        else:
            key = jhash.inet6_ehashfn(loc.packed, lport, rem.packed, rport, e6, v6, mix)
        self.w(sk + self.off("sock_common", "skc_hash"), "<I", key)
        slot = key & (self.ehash_buckets - 1)
        self._push(self.ehash + slot * 8, sk)
        return slot

    def hash_listener(self, sk: int, local: str, lport: int) -> None:
        mix = self.secrets[0]
        loc = ip_address(local)
        if loc.version == 4:
            key = jhash.ipv4_portaddr_hash(loc.packed, lport, mix)
        else:
            key = jhash.ipv6_portaddr_hash(loc.packed, lport, mix)
        slot = key & (self.lhash2_buckets - 1)
        self._push(self.lhash2 + slot * 16 + 8, sk)

    def hash_udp(self, sk: int, lport: int) -> None:
        slot = (lport + self.secrets[0]) & (self.udp_buckets - 1)
        # plain hlist: NULL-terminated
        self._hlist_add_head(self.udp_hash + slot * 16, sk + self.off("sock_common", "skc_node"))

    def set_request_listener(self, req: int, listener: int) -> None:
        self.w(req + self.off("sock_common", "skc_listener"), "<Q", listener)


def standard_guest(levels: int = 4, profile: Profile | None = None) -> FakeGuest:
    """A small guest: init, a root web server (listening v4 + v6 + one established conn),
    alice's client, bob's UDP resolver, and a kernel thread."""
    g = FakeGuest(levels=levels, profile=profile or synthetic_profile())
    init = g.add_task(1, "init")
    g.add_task(2, "kthreadd", with_files=False)
    web = g.add_task(100, "httpd", parent=init)
    lst = g.new_sock(IPProto.TCP, 10, "0.0.0.0", 80, "0.0.0.0", 0)
    g.hash_listener(lst, "0.0.0.0", 80)
    g.add_fd(web, 3, lst)
    lst6 = g.new_sock(IPProto.TCP, 10, "::", 8080, "::", 0)
    g.hash_listener(lst6, "::", 8080)
    g.add_fd(web, 4, lst6)
    conn = g.new_sock(IPProto.TCP, 1, "198.18.1.1", 80, "198.18.0.1", 40000)
    g.hash_established(conn, "198.18.1.1", 80, "198.18.0.1", 40000)
    g.add_fd(web, 5, conn)
    alice = g.add_task(200, "curl", uid=1000, parent=init)
    c6 = g.new_sock(IPProto.TCP, 1, "2001:2::1:1", 51000, "2001:2::1", 443, sk_uid=1000)
    g.hash_established(c6, "2001:2::1:1", 51000, "2001:2::1", 443)
    g.add_fd(alice, 3, c6)
    bob = g.add_task(300, "resolver", uid=1001, euid=0, parent=init)
    u = g.new_sock(IPProto.UDP, 7, "0.0.0.0", 5353, "0.0.0.0", 0, sk_uid=1001)
    g.hash_udp(u, 5353)
    g.add_fd(bob, 7, u)
    g.add_fd(bob, 8, g.new_sock(IPProto.TCP, 1, "1.1.1.1", 1, "1.1.1.1", 2), socket_file=False)
    return g


def addr(text: str) -> IPAddress:
    a = ip_address(text)
    assert isinstance(a, IPv4Address | IPv6Address)
    return a


# -- shared by the introspection tests -----------------------------------------------------------


def fake_domain() -> DomainConfig:
    """Domain 1 of the fake guests (its memory is passed to the introspector, never opened)."""
    return DomainConfig(1, "fake", ("vif1.0",), MemoryConfig("raw", "/nonexistent/fake.mem"))


def spray_and_web(profile: Profile | None = None) -> tuple[FakeGuest, int, int, int]:
    """standard_guest plus uid 1001's spray (pid 400) and uid 1000's web (pid 500), each holding
    one socket: (guest, spray, web, web's listening sock)."""
    g = standard_guest(profile=profile)
    spray = g.add_task(400, "spray", uid=1001)
    sk = g.new_sock(IPProto.TCP, 2, "198.18.1.1", 33000, "198.18.0.1", 2222, sk_uid=1001)
    g.add_fd(spray, 3, sk)
    web = g.add_task(500, "web", uid=1000)
    lsk = g.new_sock(IPProto.TCP, 10, "0.0.0.0", 8080, "0.0.0.0", 0, sk_uid=1000)
    g.add_fd(web, 4, lsk)
    return g, spray, web, lsk


def lports_of(view: GuestView, pid: int) -> set[int]:
    """The local ports of the view's sockets `pid` holds."""
    return {s.lport for s in view.sockets for o in s.owners if o.pid == pid}


def view_from_scratch(gi: GuestIntrospector) -> GuestView:
    """The view of the introspector's last walk built anew (what an incremental one must equal)."""
    assert gi._boot is not None and gi._boot.last_walk is not None
    return guest_view(gi._boot.last_walk)
