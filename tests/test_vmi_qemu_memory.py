"""The QEMU-process memory backend with a scripted monitor, reading real process memory: our
own process's buffers (or a forked child's, which has the same addresses) stand in for QEMU's
RAM blocks, so process_vm_readv runs for real. The real QEMU: test_vmi_qemu_process.py."""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from xfgate.config import DomainConfig, MemoryConfig, QmpConfig, parse_domain
from xfgate.errors import (
    ConfigError,
    GuestNotRunning,
    MemoryReadError,
    PrerequisiteError,
    QmpError,
)
from xfgate.vmi.memory import open_memory
from xfgate.vmi.monitor import qemu_pid, socket_peer_pid, tap_ifnames
from xfgate.vmi.qemu_memory import (
    QemuProcessMemory,
    parse_gpa2hva,
    parse_mtree_ram,
    ptrace_denied_reason,
)
from xfgate.vmi.qmp import ControlRegisters

MTREE_QEMU_7_2 = """FlatView #0
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-00000000000bffff (prio 0, ram): pc.ram
  00000000000c0000-00000000000dffff (prio 1, rom): pc.rom
  00000000000e0000-00000000000fffff (prio 0, rom): pc.bios @0000000000020000
  0000000000100000-000000000fffffff (prio 0, ram): pc.ram @0000000000100000
  00000000fec00000-00000000fec00fff (prio 0, i/o): ioapic
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-0000000107ffffff (prio 0, ram): d1

FlatView #1
 AS "cpu-smm-0", root: memory
 Root memory region: memory
  0000000000000000-00000000000bffff (prio 0, ram): pc.ram
  0000000200000000-0000000207ffffff (prio 0, ram): smm-only

FlatView #3
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
"""


def test_mtree_gives_the_ram_ranges_of_the_system_view_only() -> None:
    assert parse_mtree_ram(MTREE_QEMU_7_2) == [
        (0, 0xC0000, "pc.ram"),
        (0x100000, 0x10000000 - 0x100000, "pc.ram"),
        (0x100000000, 0x8000000, "d1"),
    ]
    assert parse_mtree_ram('FlatView #0\n AS "I/O", root: io\n') == []


def test_gpa2hva_parses_and_refuses_no_answer() -> None:
    text = "Host virtual address for 0x1000 (pc.ram) is 0x7fb513e01000\r\n"
    assert parse_gpa2hva(text) == 0x7FB513E01000
    with pytest.raises(Exception, match="no host address"):
        parse_gpa2hva("No memory is mapped at address 0x10000000\r\n")


class ScriptedMonitor:
    """Answers `info mtree -f` and `gpa2hva` for RAM ranges (gpa, length, hva) as QEMU does."""

    def __init__(self, ranges: list[tuple[int, int, int]]) -> None:
        self.ranges = ranges
        self.commands: list[str] = []
        self.connected = False

    def mtree(self) -> str:
        lines = ["FlatView #0", ' AS "memory", root: system', " Root memory region: system"]
        for i, (gpa, length, _hva) in enumerate(self.ranges):
            lines.append(f"  {gpa:016x}-{gpa + length - 1:016x} (prio 0, ram): blk{i}")
        return "\n".join(lines) + "\n"

    def human(self, command_line: str) -> str:
        assert self.connected, "the backend must use the monitor inside `with`"
        self.commands.append(command_line)
        if command_line == "info mtree -f":
            return self.mtree()
        if command_line.startswith("gpa2hva "):
            addr = int(command_line.split()[1], 16)
            for i, (gpa, length, hva) in enumerate(self.ranges):
                if gpa <= addr < gpa + length:
                    return f"Host virtual address for {addr:#x} (blk{i}) is {hva + addr - gpa:#x}"
            return f"No memory is mapped at address {addr:#x}"
        raise AssertionError(command_line)

    def execute(self, command: str, arguments: dict[str, object] | None = None) -> object:
        raise AssertionError(command)

    def stop(self) -> None: ...
    def cont(self) -> None: ...
    def status(self) -> str:
        return "running"

    def is_running(self) -> bool:
        return True

    def control_registers(self) -> ControlRegisters:
        return ControlRegisters(0, 0)

    def close(self) -> None:
        self.connected = False

    def __enter__(self) -> ScriptedMonitor:
        self.connected = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


PAGE = 4096


@pytest.fixture
def blocks() -> Iterator[tuple[ctypes.Array[ctypes.c_char], ctypes.Array[ctypes.c_char]]]:
    a = ctypes.create_string_buffer(bytes((i * 7) % 251 for i in range(4 * PAGE)), 4 * PAGE)
    b = ctypes.create_string_buffer(b"B" * (2 * PAGE), 2 * PAGE)
    yield a, b


def _mem(a: ctypes.Array[ctypes.c_char], b: ctypes.Array[ctypes.c_char]) -> QemuProcessMemory:
    # guest: [0, 4 pages) = a, [4 pages, 6 pages) = b (contiguous in the guest, not in us),
    # a hole, then b again at 1 MiB
    mon = ScriptedMonitor(
        [
            (0, 4 * PAGE, ctypes.addressof(a)),
            (4 * PAGE, 2 * PAGE, ctypes.addressof(b)),
            (1 << 20, PAGE, ctypes.addressof(b)),
        ]
    )
    return QemuProcessMemory(os.getpid(), mon)


def test_reads_come_from_the_process_and_cross_ranges(
    blocks: tuple[ctypes.Array[ctypes.c_char], ...],
) -> None:
    a, b = blocks
    mem = _mem(a, b)
    assert mem.size == (1 << 20) + PAGE
    assert mem.read(5, 10) == a.raw[5:15]
    # one read across two RAM blocks: one process_vm_readv with two iovecs
    assert mem.read(4 * PAGE - 3, 6) == a.raw[-3:] + b"BBB"
    assert mem.read(1 << 20, 4) == b"BBBB"
    a[100] = b"Z"  # live memory: the next read sees the write
    assert mem.read(100, 1) == b"Z"
    assert mem.read(0, 0) == b""


def test_reads_outside_ram_raise_and_mark_the_map_stale(
    blocks: tuple[ctypes.Array[ctypes.c_char], ...],
) -> None:
    a, b = blocks
    mem = _mem(a, b)
    for addr, n in ((6 * PAGE, 1), (6 * PAGE - 2, 4), ((1 << 20) + PAGE, 1), (-1, 2)):
        with pytest.raises(MemoryReadError):
            mem.read(addr, n)
    reads = mem.map_reads
    assert mem.revalidate(max_age=3600, stale_min_age=3600) is False  # stale, but just read
    assert mem.map_reads == reads
    assert mem.revalidate(max_age=3600, stale_min_age=0) is False  # stale: re-read, young
    assert mem.map_reads == reads + 1
    assert mem.revalidate(max_age=3600, stale_min_age=0) is False and mem.map_reads == reads + 1


def test_a_hot_plugged_range_appears_after_revalidate(
    blocks: tuple[ctypes.Array[ctypes.c_char], ...],
) -> None:
    a, b = blocks
    mem = _mem(a, b)
    mon = mem._monitor
    assert isinstance(mon, ScriptedMonitor)
    with pytest.raises(MemoryReadError):
        mem.read(2 << 20, 4)
    mon.ranges.append((2 << 20, PAGE, ctypes.addressof(a)))
    assert mem.revalidate(stale_min_age=0) is True
    assert mem.read(2 << 20, 4) == a.raw[:4]
    assert not mon.connected  # the monitor is let go after each use


def test_an_unmapped_host_page_is_an_error_never_zeros() -> None:
    m = mmap.mmap(-1, 2 * PAGE)
    m[:] = b"x" * 2 * PAGE
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    # first range readable, second one's host page unmapped below it
    gone = mmap.mmap(-1, PAGE)
    gone_addr = ctypes.addressof(ctypes.c_char.from_buffer(gone))
    mon = ScriptedMonitor([(0, 2 * PAGE, base), (2 * PAGE, PAGE, gone_addr)])
    mem = QemuProcessMemory(os.getpid(), mon)
    assert mem.read(PAGE, 8) == b"x" * 8
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.munmap(ctypes.c_void_p(gone_addr), PAGE) == 0
    with pytest.raises(MemoryReadError, match="short read"):
        mem.read(2 * PAGE - 4, 8)  # the first iovec succeeds, the second does not
    with pytest.raises(MemoryReadError, match="no memory there"):
        mem.read(2 * PAGE, 8)


def test_find_scans_every_range_in_chunks(
    blocks: tuple[ctypes.Array[ctypes.c_char], ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    import xfgate.vmi.qemu_memory as qm

    a, b = blocks
    monkeypatch.setattr(qm, "FIND_CHUNK", 1000)  # needles straddle chunk edges
    ctypes.memmove(ctypes.addressof(a) + 2998, b"NEEDLE", 6)
    mem = _mem(a, b)
    assert mem.find(b"NEEDLE") == 2998
    assert mem.find(b"NEEDLE", 2999) == -1
    assert mem.find(b"BBBB", 5 * PAGE) == 5 * PAGE
    assert mem.find(b"BBBB", 6 * PAGE) == 1 << 20


def test_a_gone_qemu_says_so() -> None:
    buf = ctypes.create_string_buffer(b"q" * PAGE, PAGE)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child has our address space (copy-on-write): the same addresses
        os.close(r)
        os.write(w, b"1")
        signal.pause()
        os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"1"
        mon = ScriptedMonitor([(0, PAGE, ctypes.addressof(buf))])
        mem = QemuProcessMemory(pid, mon)
        assert mem.read(0, 4) == b"qqqq" and mem.alive()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
    assert not mem.alive()
    with pytest.raises(MemoryReadError, match="QEMU is gone"):
        mem.read(0, 4)
    with pytest.raises(GuestNotRunning, match="gone"):
        mem.revalidate()
    with pytest.raises(GuestNotRunning, match="does not exist"):
        QemuProcessMemory(pid, mon)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")
def test_no_ptrace_access_is_a_prerequisite_error_naming_the_cause() -> None:
    buf = ctypes.create_string_buffer(b"r" * PAGE, PAGE)
    target = os.getpid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        msg = b"read it"
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            QemuProcessMemory(target, ScriptedMonitor([(0, PAGE, ctypes.addressof(buf))]))
        except PrerequisiteError as e:
            msg = str(e).encode()
        except BaseException as e:
            msg = repr(e).encode()
        os.write(w, msg[:4000])
        os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    text = out.decode()
    assert "cannot read the guest RAM" in text, text
    assert "CAP_SYS_PTRACE" in text and "uid 0" in text, text


def test_denied_reason_names_yama_when_present() -> None:
    reason = ptrace_denied_reason(os.getpid())
    if Path("/proc/sys/kernel/yama/ptrace_scope").exists():
        assert "ptrace_scope" in reason


def test_config_qemu_process_needs_qmp_not_a_path() -> None:
    dom = parse_domain(
        {"id": 3, "memory": {"backend": "qemu-process"}, "qmp": {"socket": "/x.sock"}}, "t"
    )
    assert dom.memory == MemoryConfig("qemu-process", "") and dom.vifs == ()
    with pytest.raises(ConfigError, match=r"needs a \[domain.qmp\]"):
        parse_domain({"id": 3, "memory": {"backend": "qemu-process"}}, "t")
    with pytest.raises(ConfigError, match="needs the domain"):
        open_memory(dom.memory)


def test_peer_pid_and_a_disagreeing_qmp_pid(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(8)
    with srv:
        assert socket_peer_pid(str(path)) == os.getpid()
        dom = DomainConfig(3, "g", (), MemoryConfig("qemu-process", ""), QmpConfig(str(path)))
        assert qemu_pid(dom) == os.getpid()
        bad = DomainConfig(
            3, "g", (), MemoryConfig("qemu-process", ""), QmpConfig(str(path), os.getpid() + 1)
        )
        with pytest.raises(ConfigError, match="served by pid"):
            qemu_pid(bad)
    with pytest.raises(GuestNotRunning):
        socket_peer_pid(str(tmp_path / "none.sock"))
    full = tmp_path / "full.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(full))
    srv.listen(0)
    waiting = []
    with srv, pytest.raises(QmpError, match="backlog is full"):  # a monitor nobody accepts on
        for _ in range(8):
            waiting.append(socket_peer_pid(str(full), timeout=0.2))
    assert len(waiting) <= 2


def test_tap_ifnames_from_info_network() -> None:
    text = (
        "virtio-net-pci.0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\r\n"
        " \\ n0: index=0,type=tap,ifname=vif1.0,script=no,downscript=no\r\n"
        "e1000.0: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:57\r\n"
        " \\ n1: index=0,type=tap,ifname=tap101i1,script=/etc/qemu-ifup\r\n"
        " \\ n2: index=0,type=user,net=10.0.2.0,restrict=on\r\n"
    )
    assert tap_ifnames(text) == ("vif1.0", "tap101i1")
    assert tap_ifnames("") == ()


def test_the_refresher_stops_and_says_why_when_the_guest_is_gone() -> None:
    """The gate's refresher meeting GuestNotRunning (its QEMU exited) records it and ends, for
    Gate._let_go_gone to release the domain (on the real guest: test_vmi_qemu_process)."""
    import threading
    from types import SimpleNamespace
    from typing import Any, cast

    from xfgate.verdict.runner import Refresher

    calls = []

    class GoneSource:
        def view(self, timeout: float | None = None) -> Any:
            calls.append(1)
            raise GuestNotRunning(1, "QEMU pid 42 is gone")

    engine = SimpleNamespace(policy=SimpleNamespace(blocks_anything=True))
    r = Refresher(1, cast(Any, GoneSource()), cast(Any, engine), lambda e: None, 0.01)
    t = threading.Thread(target=r.run, daemon=True)
    t.start()
    t.join(5)
    alive = t.is_alive()
    r.stop()
    assert not alive and calls == [1]
    assert r.gone == "domain 1 is not running: QEMU pid 42 is gone"
