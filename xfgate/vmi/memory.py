"""Guest physical memory behind one small read interface.

Backends: the live QEMU RAM file (mmap, shared with QEMU), the RAM of a running QEMU process
(qemu_memory.py, process_vm_readv), QEMU `dump-guest-memory` ELF cores, raw images, byte
buffers (tests) and LibVMI (Xen). Reads copy only what was asked for: this is on
the packet path. Nothing is cached here: live memory changes under us.
"""

from __future__ import annotations

import bisect
import io
import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, cast

from xfgate.config import DomainConfig, MemoryConfig
from xfgate.errors import ConfigError, GuestNotRunning, MemoryReadError, PrerequisiteError

GIB = 1 << 30
# QEMU `pc` (i440fx) machine: guests with >= 3.5 GiB get only 3 GiB below 4 GiB
# (gigabyte_align, hw/i386/pc_piix.c), the rest is mapped from 4 GiB up.
PC_LOWMEM_LIMIT = 0xE0000000
PC_LOWMEM_ALIGNED = 0xC0000000


class PhysicalMemory(Protocol):
    """Guest physical memory. `read` raises MemoryReadError for any byte it cannot supply."""

    name: str

    @property
    def size(self) -> int:
        """One past the highest guest physical address backed by memory."""
        ...

    def read(self, paddr: int, length: int) -> bytes: ...

    def find(self, needle: bytes, start: int = 0) -> int:
        """Lowest guest physical address >= start where `needle` begins, or -1 (a scan)."""
        ...

    def identity(self) -> tuple[int, ...]:
        """Changes when the backing memory is replaced (new QEMU, new dump): re-detect KASLR."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Segment:
    paddr: int  # guest physical address of the first byte
    offset: int  # where that byte is in the backing buffer
    length: int


class SegmentedMemory:
    """Guest physical ranges laid out in one buffer (a file mapping or bytes)."""

    def __init__(self, buffer: Any, segments: Sequence[Segment], name: str) -> None:
        self.name = name
        self._buf = buffer
        self._segments = sorted((s for s in segments if s.length > 0), key=lambda s: s.paddr)
        self._starts = [s.paddr for s in self._segments]
        # The common case (one segment at 0) skips the bisect: reads are on the hot path.
        first = self._segments[0] if self._segments else None
        self._flat = (
            first.length if first is not None and first.paddr == 0 and first.offset == 0 else 0
        )

    @property
    def size(self) -> int:
        return max((s.paddr + s.length for s in self._segments), default=0)

    @property
    def segments(self) -> tuple[Segment, ...]:
        return tuple(self._segments)

    def flat_view(self) -> tuple[Any, int]:
        """(buffer, n): guest physical [0, n) is buffer[0:n], read by slicing it (the address
        space's in-page fast path); n 0 when the layout is not one segment at 0, or when a
        subclass reads otherwise (a test's failing or counting memory must see every read)."""
        if type(self).read is not SegmentedMemory.read:
            return None, 0
        return self._buf, self._flat

    def read(self, paddr: int, length: int) -> bytes:
        if paddr >= 0 and length >= 0 and paddr + length <= self._flat:
            return bytes(self._buf[paddr : paddr + length])
        return self._read_segments(paddr, length)

    def _read_segments(self, paddr: int, length: int) -> bytes:
        if paddr < 0 or length < 0:
            raise MemoryReadError(paddr, length, self.name, "negative address or length")
        parts: list[bytes] = []
        addr, left = paddr, length
        while left > 0:
            i = bisect.bisect_right(self._starts, addr) - 1
            seg = self._segments[i] if i >= 0 else None
            if seg is None or addr >= seg.paddr + seg.length:
                raise MemoryReadError(paddr, length, self.name, f"no memory at {addr:#x}")
            n = min(left, seg.paddr + seg.length - addr)
            start = seg.offset + (addr - seg.paddr)
            parts.append(bytes(self._buf[start : start + n]))
            addr += n
            left -= n
        return b"".join(parts)

    def find(self, needle: bytes, start: int = 0) -> int:
        for seg in self._segments:
            if seg.paddr + seg.length <= start:
                continue
            lo = seg.offset + max(0, start - seg.paddr)
            hit: int = self._buf.find(needle, lo, seg.offset + seg.length)
            if hit >= 0:
                return seg.paddr + (hit - seg.offset)
        return -1

    def identity(self) -> tuple[int, ...]:
        return (id(self._buf),)

    def close(self) -> None:
        closer = getattr(self._buf, "close", None)
        if closer is not None:
            closer()


class BufferMemory(SegmentedMemory):
    """Bytes as guest physical memory from address 0 (tests, fuzzing)."""

    def __init__(self, data: bytes | bytearray, name: str = "buffer") -> None:
        super().__init__(data, [Segment(0, 0, len(data))], name)


class _MappedFile(SegmentedMemory):
    """A read-only shared mapping of a file: reads see the guest's writes, nothing is copied."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise GuestNotRunning(
                str(path), f"{kind} {path} does not exist (is the guest started?)"
            ) from None
        except OSError as e:
            raise MemoryReadError(0, 0, str(path), f"cannot open {kind}: {e}") from e
        try:
            st = os.fstat(fd)
            if st.st_size == 0:
                raise MemoryReadError(0, 0, str(path), f"{kind} is empty")
            mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self._stat = (st.st_dev, st.st_ino, st.st_size)
        super().__init__(mm, self.layout(mm, st.st_size), f"{kind} {path}")

    def layout(self, mm: mmap.mmap, file_size: int) -> list[Segment]:
        return [Segment(0, 0, file_size)]

    def identity(self) -> tuple[int, ...]:
        return self._stat


class SharedFileMemory(_MappedFile):
    """QEMU's RAM file (memory-backend-file share=on, `pc` machine): file offset = guest
    physical address, except above the PCI hole for guests of >= 3.5 GiB."""

    def __init__(self, path: Path | str, expected_size: int = 0) -> None:
        self._expected = expected_size
        super().__init__(Path(path), "RAM file")

    def layout(self, mm: mmap.mmap, file_size: int) -> list[Segment]:
        if self._expected and file_size < self._expected:
            raise MemoryReadError(
                0,
                self._expected,
                str(self.path),
                f"RAM file is truncated ({file_size} < {self._expected} bytes)",
            )
        return pc_ram_layout(file_size)


def pc_ram_layout(ram_size: int) -> list[Segment]:
    """Where QEMU's `pc` machine puts `ram_size` bytes of RAM in guest physical space."""
    if ram_size < PC_LOWMEM_LIMIT:
        return [Segment(0, 0, ram_size)]
    return [
        Segment(0, 0, PC_LOWMEM_ALIGNED),
        Segment(4 * GIB, PC_LOWMEM_ALIGNED, ram_size - PC_LOWMEM_ALIGNED),
    ]


class RawImageMemory(_MappedFile):
    """A raw physical memory image (file offset = guest physical address)."""

    def __init__(self, path: Path | str) -> None:
        super().__init__(Path(path), "raw image")


ELF_MAGIC = b"\x7fELF"


class ElfDumpMemory(_MappedFile):
    """A QEMU `dump-guest-memory` ELF core: guest physical ranges are its PT_LOAD segments,
    read once (pyelftools) when the dump is opened; reads are offset arithmetic after that."""

    def __init__(self, path: Path | str) -> None:
        super().__init__(Path(path), "ELF dump")

    def layout(self, mm: mmap.mmap, file_size: int) -> list[Segment]:
        return elf_load_segments(mm, file_size, str(self.path))


def elf_load_segments(data: Any, file_size: int, name: str) -> list[Segment]:
    """PT_LOAD segments of an ELF64 little-endian core (a mapping or bytes), checked against
    the file size."""
    if file_size < 64 or bytes(data[0:4]) != ELF_MAGIC:
        raise MemoryReadError(0, 64, name, "not an ELF file (expected a dump-guest-memory core)")
    if data[4] != 2 or data[5] != 1:
        raise MemoryReadError(0, 64, name, "not a 64-bit little-endian ELF core")
    # An mmap is a file object already; bytes get a stream that shares their buffer.
    stream = cast(IO[bytes], data) if isinstance(data, mmap.mmap) else io.BytesIO(bytes(data))
    # pyelftools on first use: a live guest's reads never need it (0.05 s of `xfgate ps`).
    from elftools.common.exceptions import ELFError
    from elftools.construct import ConstructError
    from elftools.elf.elffile import ELFFile

    try:
        elf = ELFFile(stream)
        phoff, phentsize = elf["e_phoff"], elf["e_phentsize"]
        phnum = elf.num_segments()  # follows PN_XNUM to section 0's sh_info
        if phentsize < 56 or phoff + phnum * phentsize > file_size:
            raise MemoryReadError(phoff, phnum * phentsize, name, "program headers out of file")
        headers = [elf.get_segment(i).header for i in range(phnum)]
    except (ELFError, ConstructError, ValueError) as e:
        raise MemoryReadError(0, 64, name, f"malformed ELF core: {e}") from e
    segments = []
    for ph in headers:
        if ph["p_type"] != "PT_LOAD" or ph["p_filesz"] == 0:
            continue
        p_paddr, p_offset, p_filesz = ph["p_paddr"], ph["p_offset"], ph["p_filesz"]
        if p_offset + p_filesz > file_size:
            raise MemoryReadError(p_paddr, p_filesz, name, "PT_LOAD segment beyond end of file")
        segments.append(Segment(p_paddr, p_offset, p_filesz))
    if not segments:
        raise MemoryReadError(0, 0, name, "ELF core has no PT_LOAD segments (paging=true dump?)")
    return segments


class LibvmiMemory:
    """Guest physical memory through LibVMI (Xen domains; its file mode on dumps).

    `source` is a Xen domain name, or with `file_mode` a memory dump path. LibVMI is only used
    as a physical reader here: translation and KASLR stay ours, so it needs no OS profile
    (VMI_INIT_PARTIAL).
    """

    CHUNK = 1 << 20

    def __init__(self, source: str, file_mode: bool = False) -> None:
        try:
            from libvmi import INIT_DOMAINNAME, Libvmi, VMIMode
        except ImportError as e:  # pragma: no cover - depends on the optional extra
            raise PrerequisiteError(
                f"the libvmi backend needs the `libvmi` wheel: pip install 'xfgate[xen]' ({e})"
            ) from e
        mode = VMIMode.FILE if file_mode else VMIMode.XEN
        if file_mode and not os.access(source, os.R_OK):
            # libvmi 3.7's file driver crashes the process on a missing file: check first.
            raise GuestNotRunning(source, f"LibVMI could not open it: cannot read {source}")
        try:
            self._vmi = Libvmi(source, INIT_DOMAINNAME, mode=mode, partial=True)
        except Exception as e:  # libvmi raises its own LibvmiError; any failure means "not open"
            raise GuestNotRunning(source, f"LibVMI could not open it: {e}") from e
        self.name = f"libvmi {'file' if file_mode else 'xen'} {source}"
        self._size = int(self._vmi.get_memsize())
        self._source = source

    @property
    def size(self) -> int:
        return self._size

    def read(self, paddr: int, length: int) -> bytes:
        if paddr < 0 or length < 0 or paddr + length > self._size:
            raise MemoryReadError(paddr, length, self.name, "outside guest memory")
        try:
            data, got = self._vmi.read_pa(paddr, length)
        except Exception as e:
            raise MemoryReadError(paddr, length, self.name, str(e)) from e
        if got != length:
            raise MemoryReadError(paddr, length, self.name, f"short read ({got} bytes)")
        return bytes(data)

    def find(self, needle: bytes, start: int = 0) -> int:
        return find_chunked(self.read, needle, max(0, start), self._size, self.CHUNK)

    def identity(self) -> tuple[int, ...]:
        return (hash(self._source), self._size)

    def close(self) -> None:
        destroy = getattr(self._vmi, "destroy", None)
        if destroy is not None:
            destroy()


def find_chunked(
    read: Callable[[int, int], bytes], needle: bytes, start: int, end: int, chunk: int
) -> int:
    """The first `needle` in [start, end), read `chunk` bytes (plus the needle's length less
    one, so no hit straddles two reads) at a time; an unreadable chunk is skipped. -1: none."""
    overlap = max(0, len(needle) - 1)
    addr = start
    while addr < end:
        n = min(chunk + overlap, end - addr)
        try:
            data = read(addr, n)
        except MemoryReadError:
            addr += chunk
            continue
        hit = data.find(needle)
        if hit >= 0:
            return addr + hit
        addr += chunk
    return -1


def open_domain_memory(domain: DomainConfig) -> PhysicalMemory:
    """The backend a domain's `[domain.memory]` names; `qemu-process` reads the RAM of the QEMU
    serving the domain's QMP socket (its pid from SO_PEERCRED, checked against `qmp.pid`)."""
    if domain.memory.backend == "qemu-process":
        from xfgate.vmi.monitor import open_monitor, qemu_pid
        from xfgate.vmi.qemu_memory import QemuProcessMemory

        pid = qemu_pid(domain)
        return QemuProcessMemory(pid, open_monitor(domain), f"QEMU pid {pid} (domain {domain.id})")
    return open_memory(domain.memory)


def open_memory(config: MemoryConfig) -> PhysicalMemory:
    """The backend a `[domain.memory]` table names (file-backed and LibVMI ones; the QEMU
    process backend needs the whole domain: open_domain_memory)."""
    if config.backend == "qemu-process":
        raise ConfigError("the qemu-process backend needs the domain's QMP socket")
    if config.backend == "qemu-shm":
        return SharedFileMemory(config.path)
    if config.backend == "elf-dump":
        return ElfDumpMemory(config.path)
    if config.backend == "raw":
        return RawImageMemory(config.path)
    if config.backend == "libvmi":
        # "file:/path" opens a dump through LibVMI's file driver, anything else is a Xen domain.
        if config.path.startswith("file:"):
            return LibvmiMemory(config.path[5:], file_mode=True)
        return LibvmiMemory(config.path)
    raise ConfigError(f"memory backend {config.backend!r} unknown")
