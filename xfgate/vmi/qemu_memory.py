"""Guest RAM of a running QEMU process, read as it is: no shared file, no change to the guest.

QEMU says where guest RAM lives: `info mtree -f` lists the flat view of the system address
space (RAM split around the PCI hole below 4 GiB, the part above 4 GiB, hot-plugged DIMMs, each
a RAM region), and `gpa2hva` gives the host virtual address of a guest physical one inside QEMU.
The map is checked: each region's last byte must translate to its first byte's address plus
its length (a RAMBlock is contiguous in QEMU's address space). Reads then copy from QEMU's
address space with process_vm_readv(2), one call per read with one remote iovec per region it
crosses; a short read is an error, never a partial or zero-filled answer.

Reading another process's memory needs ptrace access (same uid and Yama ptrace_scope 0, or
CAP_SYS_PTRACE with ptrace_scope <= 2): the errors say which is missing.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xfgate.errors import GuestNotRunning, MemoryReadError, PrerequisiteError, QmpError
from xfgate.vmi.memory import find_chunked
from xfgate.vmi.monitor import Monitor, process_start_time

log = logging.getLogger(__name__)

FIND_CHUNK = 1 << 20
MAX_REGIONS = 256  # more RAM ranges than this in one address space is not a QEMU we know
IOV_MAX = 1024
# A map found stale (a read outside it, EFAULT) is re-read at the next revalidate(); an
# unchanged map at most this often.
REVALIDATE_SECONDS = 1.0
# ... but not more often than this even when stale: a guest that plants pointers into holes of
# its physical space must not turn every walk into a dozen monitor round trips.
STALE_MIN_SECONDS = 0.25
CAP_SYS_PTRACE = 19
SMALL_READ = 1 << 16

# `info mtree -f`: "  0000000000100000-000000000fffffff (prio 0, ram): pc.ram @0000000000100000"
_MTREE_LINE = re.compile(
    r"^\s+([0-9a-fA-F]+)-([0-9a-fA-F]+) \(prio -?\d+, ([a-z/]+)\): (\S+)(?: @([0-9a-fA-F]+))?"
)
_GPA2HVA = re.compile(r"Host virtual address for (0x[0-9a-fA-F]+) \((.*)\) is (0x[0-9a-fA-F]+)")


@dataclass(frozen=True, slots=True)
class RamRange:
    """One guest physical RAM range and where its first byte is in QEMU's address space."""

    gpa: int
    length: int
    hva: int
    block: str  # QEMU's RAM block (memory region) name: pc.ram, a DIMM's memdev id, ...

    @property
    def end(self) -> int:
        return self.gpa + self.length


def parse_mtree_ram(text: str) -> list[tuple[int, int, str]]:
    """(guest physical start, length, region name) of every RAM range in the flat view of the
    system address space (the view whose `AS "memory"` line names it)."""
    ranges: list[tuple[int, int, str]] = []
    in_memory = False
    for line in text.splitlines():
        if line.startswith("FlatView"):
            if in_memory:
                break  # the system view is done
            continue
        if line.startswith(' AS "memory"'):
            in_memory = True
            continue
        if not in_memory:
            continue
        m = _MTREE_LINE.match(line)
        if m is None or m.group(3) != "ram":
            continue
        start, last = int(m.group(1), 16), int(m.group(2), 16)
        if last < start:
            continue
        ranges.append((start, last - start + 1, m.group(4)))
        if len(ranges) > MAX_REGIONS:
            raise QmpError(f"`info mtree -f` lists more than {MAX_REGIONS} RAM ranges")
    return sorted(ranges)


def parse_gpa2hva(text: str) -> int:
    m = _GPA2HVA.search(text)
    if m is None:
        raise QmpError(f"`gpa2hva` gave no host address: {text.strip()[:200]!r}")
    return int(m.group(3), 16)


def read_ram_map(monitor: Monitor) -> list[RamRange]:
    """The guest physical -> QEMU virtual map, checked at both ends of every range."""
    ranges = parse_mtree_ram(monitor.human("info mtree -f"))
    if not ranges:
        raise QmpError("`info mtree -f` shows no RAM in the system address space")
    out = []
    for gpa, length, name in ranges:
        hva = parse_gpa2hva(monitor.human(f"gpa2hva {gpa:#x}"))
        last = parse_gpa2hva(monitor.human(f"gpa2hva {gpa + length - 1:#x}"))
        if last != hva + length - 1:
            raise QmpError(
                f"QEMU's RAM range {name} at {gpa:#x} (+{length:#x}) is not contiguous in "
                f"QEMU's address space ({hva:#x} .. {last:#x})"
            )
        out.append(RamRange(gpa, length, hva, name))
    return out


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def ptrace_denied_reason(pid: int) -> str:
    """Why this process may not read `pid`'s memory, in an operator's words."""
    parts = []
    try:
        scope = Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip()
    except OSError:
        scope = ""
    if scope:
        meaning = {
            "0": "classic: same uid or CAP_SYS_PTRACE",
            "1": "restricted: only a parent, or CAP_SYS_PTRACE",
            "2": "admin-only: CAP_SYS_PTRACE needed",
            "3": "no attach at all, not even root: set it to 2 or lower (reboot needed)",
        }.get(scope, "unknown value")
        parts.append(f"Yama ptrace_scope is {scope} ({meaning})")
    if not has_cap_sys_ptrace():
        parts.append("this process lacks CAP_SYS_PTRACE (run as root or grant it)")
    owner = _proc_uid(pid)
    if owner is not None and owner != os.geteuid():
        parts.append(f"QEMU runs as uid {owner}, xfgate as uid {os.geteuid()}")
    return "; ".join(parts) or "the kernel refused ptrace access"


def has_cap_sys_ptrace() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_PTRACE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _proc_uid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[2])  # effective uid
    except (OSError, ValueError, IndexError):
        pass
    return None


class QemuProcessMemory:
    """Guest physical memory of a running QEMU, read from the QEMU process (PhysicalMemory).

    `monitor` is only used, briefly, to (re)read the RAM map (never from `read`: a walk may be
    holding QEMU's single monitor slot for a pause). Not thread-safe: one caller at a time.
    """

    def __init__(self, pid: int, monitor: Monitor, name: str = "") -> None:
        self.pid = pid
        self.name = name or f"QEMU pid {pid}"
        self._monitor = monitor
        self._start_time = process_start_time(pid)
        if not self._start_time:
            raise GuestNotRunning(pid, f"QEMU pid {pid} does not exist")
        libc = ctypes.CDLL(None, use_errno=True)
        # No argtypes: the arguments are a pid and counts (C ints) and prepared references,
        # and ctypes' per-call conversion of declared argument types doubles a small read's cost.
        self._readv = libc.process_vm_readv
        self._readv.restype = ctypes.c_ssize_t
        # Reads of up to SMALL_READ bytes land in one reused buffer (the common 8-byte field
        # reads of a walk): no allocation, and the local iovec only changes its length.
        self._small = ctypes.create_string_buffer(SMALL_READ)
        self._small_addr = ctypes.addressof(self._small)
        self._local = _Iovec(self._small_addr, 0)
        self._local_ref = ctypes.byref(self._local)
        self._remote = (_Iovec * IOV_MAX)()
        self._remote0 = self._remote[0]
        # (gpa, end, hva) of the range of the last read: likely the next one's
        self._last: tuple[int, int, int] = (0, 0, 0)
        self._ranges: list[RamRange] = []
        self._starts: list[int] = []
        self._stale = False
        self._checked_at = -1e9
        self.map_reads = 0  # how often the map was read from QEMU (tests, bench)
        self.refresh()
        self._check_access()

    # -- the map --------------------------------------------------------------------------------

    @property
    def ranges(self) -> tuple[RamRange, ...]:
        return tuple(self._ranges)

    def refresh(self) -> bool:
        """Read the RAM map from QEMU again; True if it changed."""
        with self._monitor as monitor:
            ranges = read_ram_map(monitor)
        self.map_reads += 1
        self._checked_at = time.monotonic()
        self._stale = False
        if ranges == self._ranges:
            return False
        if self._ranges:
            log.info("%s: guest RAM map changed: %s", self.name, describe(ranges))
        self._ranges = ranges
        self._starts = [r.gpa for r in ranges]
        self._last = (0, 0, 0)
        return True

    def revalidate(
        self, max_age: float = REVALIDATE_SECONDS, stale_min_age: float = STALE_MIN_SECONDS
    ) -> bool:
        """Re-read the map if it is older than `max_age` seconds, or than `stale_min_age` when
        a read found it stale. Call it outside pauses (it needs the monitor). True if the map
        changed."""
        self.require_alive()
        age = time.monotonic() - self._checked_at
        if age < (stale_min_age if self._stale else max_age):
            return False
        return self.refresh()

    def alive(self) -> bool:
        """The same QEMU process is still there (a recycled pid has another start time)."""
        return process_start_time(self.pid) == self._start_time

    def require_alive(self) -> None:
        if not self.alive():
            raise GuestNotRunning(self.pid, f"{self.name} is gone (QEMU exited or was killed)")

    def _check_access(self) -> None:
        first = self._ranges[0]
        try:
            self.read(first.gpa, 8)
        except MemoryReadError as e:
            if e.reason.startswith("no permission"):
                raise PrerequisiteError(
                    f"cannot read the guest RAM of {self.name}: {e.reason}"
                ) from None
            raise

    # -- PhysicalMemory -------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._ranges[-1].end if self._ranges else 0

    def _iovecs(self, paddr: int, length: int) -> int:
        """Fill self._remote for [paddr, paddr+length); returns the iovec count."""
        count, addr, left = 0, paddr, length
        while left > 0:
            i = bisect.bisect_right(self._starts, addr) - 1
            r = self._ranges[i] if i >= 0 else None
            if r is None or addr >= r.end:
                self._stale = True  # perhaps a DIMM plugged since: re-read at the next check
                raise MemoryReadError(paddr, length, self.name, f"no guest RAM at {addr:#x}")
            if count == IOV_MAX:
                raise MemoryReadError(paddr, length, self.name, "read spans too many ranges")
            n = min(left, r.end - addr)
            self._last = (r.gpa, r.end, r.hva)
            self._remote[count].iov_base = r.hva + (addr - r.gpa)
            self._remote[count].iov_len = n
            count += 1
            addr += n
            left -= n
        return count

    def read(self, paddr: int, length: int) -> bytes:
        gpa, end, hva = self._last
        if gpa <= paddr and paddr + length <= end and length > 0:
            count = 1  # the hot path: inside the last range read
            self._remote0.iov_base = hva + (paddr - gpa)
            self._remote0.iov_len = length
        else:
            if paddr < 0 or length < 0:
                raise MemoryReadError(paddr, length, self.name, "negative address or length")
            if length == 0:
                return b""
            count = self._iovecs(paddr, length)
        if length <= SMALL_READ:
            self._local.iov_base = self._small_addr
            buf = None
        else:
            buf = ctypes.create_string_buffer(length)
            self._local.iov_base = ctypes.addressof(buf)
        self._local.iov_len = length
        got = self._readv(self.pid, self._local_ref, 1, self._remote, count, 0)
        if got == length:
            return ctypes.string_at(self._small_addr, length) if buf is None else buf.raw
        if got < 0:
            raise MemoryReadError(paddr, length, self.name, self._errno_reason(ctypes.get_errno()))
        raise MemoryReadError(paddr, length, self.name, f"short read ({got} of {length} bytes)")

    def _errno_reason(self, err: int) -> str:
        if err == errno.ESRCH:
            return "QEMU is gone (no such process)"
        if err == errno.EPERM:
            return f"no permission: {ptrace_denied_reason(self.pid)}"
        if err == errno.EFAULT:
            self._stale = True
            return "QEMU has no memory there any more (RAM unplugged or remapped?)"
        if err == errno.ENOSYS:
            return "process_vm_readv is not available on this host kernel"
        return os.strerror(err)

    def find(self, needle: bytes, start: int = 0) -> int:
        """A scan of every RAM range from `start`, in bounded chunks; unreadable chunks are
        skipped."""
        if not needle:
            return max(0, start)
        for r in list(self._ranges):
            if r.end <= start:
                continue
            hit = find_chunked(self.read, needle, max(start, r.gpa), r.end, FIND_CHUNK)
            if hit >= 0:
                return hit
        return -1

    def identity(self) -> tuple[int, ...]:
        return (self.pid, self._start_time)

    def close(self) -> None:
        self._monitor.close()


def describe(ranges: Sequence[RamRange]) -> str:
    return ", ".join(f"{r.block} {r.gpa:#x}+{r.length >> 20} MiB" for r in ranges)


def ram_map_json(ranges: Sequence[RamRange]) -> list[dict[str, Any]]:
    return [{"gpa": r.gpa, "length": r.length, "hva": r.hva, "block": r.block} for r in ranges]
