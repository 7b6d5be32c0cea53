"""Physical memory backends: exact bytes, clear errors at every edge."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from xfgate.config import MemoryConfig
from xfgate.errors import ConfigError, GuestNotRunning, MemoryReadError
from xfgate.vmi.memory import (
    GIB,
    BufferMemory,
    ElfDumpMemory,
    RawImageMemory,
    Segment,
    SegmentedMemory,
    SharedFileMemory,
    elf_load_segments,
    open_memory,
    pc_ram_layout,
)


def _pattern(n: int) -> bytes:
    return bytes((i * 7 + (i >> 8)) & 0xFF for i in range(n))


def test_buffer_reads_exact_bytes_and_refuses_out_of_range() -> None:
    data = _pattern(8192)
    mem = BufferMemory(data)
    assert mem.size == 8192
    assert mem.read(4000, 200) == data[4000:4200]
    with pytest.raises(MemoryReadError, match="no memory at 0x2000"):
        mem.read(8190, 4)
    with pytest.raises(MemoryReadError):
        mem.read(-1, 4)


def test_segments_with_a_hole_read_across_and_fail_in_the_hole() -> None:
    buf = bytearray(_pattern(0x3000))
    buf[0x2100:0x2110] = b"unique-needle-42"
    mem = SegmentedMemory(
        buf,
        [Segment(0, 0, 0x1000), Segment(0x1000, 0x1000, 0x1000), Segment(0x10000, 0x2000, 0x1000)],
        "t",
    )
    assert mem.read(0xFF0, 0x20) == buf[0xFF0:0x1010]  # two adjacent segments
    assert mem.read(0x10000, 16) == buf[0x2000:0x2010]
    with pytest.raises(MemoryReadError, match="no memory at 0x2000"):
        mem.read(0x1FF0, 0x20)
    assert mem.find(b"unique-needle-42") == 0x10100
    assert mem.find(b"\xfe\xfd\xfc\xfb\xfa\xf9\xf8") == -1


def test_pc_layout_below_and_above_the_pci_hole() -> None:
    assert pc_ram_layout(256 << 20) == [Segment(0, 0, 256 << 20)]
    low, high = pc_ram_layout(4 * GIB)
    assert low == Segment(0, 0, 0xC0000000)
    assert high == Segment(4 * GIB, 0xC0000000, 4 * GIB - 0xC0000000)


def test_shared_file_is_a_live_view(tmp_path: Path) -> None:
    path = tmp_path / "ram.mem"
    path.write_bytes(bytes(1 << 16))
    mem = SharedFileMemory(path)
    assert mem.read(100, 4) == b"\0\0\0\0"
    with path.open("r+b") as f:  # the guest writes: we see it without reopening
        f.seek(100)
        f.write(b"ABCD")
    assert mem.read(100, 4) == b"ABCD"
    assert mem.identity()[2] == 1 << 16
    mem.close()


def test_missing_and_truncated_ram_files(tmp_path: Path) -> None:
    with pytest.raises(GuestNotRunning, match="does not exist"):
        SharedFileMemory(tmp_path / "nope.mem")
    small = tmp_path / "small.mem"
    small.write_bytes(bytes(4096))
    with pytest.raises(MemoryReadError, match="truncated"):
        SharedFileMemory(small, expected_size=1 << 20)
    empty = tmp_path / "empty.mem"
    empty.write_bytes(b"")
    with pytest.raises(MemoryReadError, match="empty"):
        SharedFileMemory(empty)


def _elf_core(segments: list[tuple[int, bytes]]) -> bytes:
    """A minimal ELF64 core with one PT_NOTE and the given PT_LOADs."""
    phnum = len(segments) + 1
    header = bytearray(64)
    header[0:4] = b"\x7fELF"
    header[4], header[5], header[6] = 2, 1, 1
    struct.pack_into("<HHIQQQIHHHHHH", header, 16, 4, 62, 1, 0, 64, 0, 0, 64, 56, phnum, 0, 0, 0)
    data_off = 64 + phnum * 56
    phdrs = bytearray(struct.pack("<IIQQQQQQ", 4, 0, data_off, 0, 0, 0, 0, 1))
    body = b""
    for paddr, payload in segments:
        off = data_off + len(body)
        phdrs += struct.pack("<IIQQQQQQ", 1, 7, off, 0, paddr, len(payload), len(payload), 1)
        body += payload
    return bytes(header) + bytes(phdrs) + body


def test_elf_dump_maps_pt_load_by_physical_address(tmp_path: Path) -> None:
    a, b = _pattern(0x2000), _pattern(0x1000)[::-1]
    path = tmp_path / "core.elf"
    path.write_bytes(_elf_core([(0, a), (0x100000, b)]))
    mem = ElfDumpMemory(path)
    assert mem.read(0x1FF0, 16) == a[0x1FF0:]
    assert mem.read(0x100010, 8) == b[0x10:0x18]
    with pytest.raises(MemoryReadError):
        mem.read(0x3000, 1)
    assert mem.size == 0x101000


def test_elf_dump_rejects_garbage_and_truncation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"not an elf at all" * 10)
    with pytest.raises(MemoryReadError, match="not an ELF"):
        ElfDumpMemory(bad)
    core = _elf_core([(0, _pattern(0x1000))])
    with pytest.raises(MemoryReadError, match="beyond end of file"):
        elf_load_segments(core[:-10], len(core) - 10, "cut")


def test_raw_image_and_factory(tmp_path: Path) -> None:
    path = tmp_path / "img.raw"
    data = _pattern(0x4000)
    path.write_bytes(data)
    mem = open_memory(MemoryConfig("raw", str(path)))
    assert isinstance(mem, RawImageMemory)
    assert mem.read(0x3FFC, 4) == data[-4:]
    assert isinstance(open_memory(MemoryConfig("qemu-shm", str(path))), SharedFileMemory)
    with pytest.raises(ConfigError):
        open_memory(MemoryConfig("floppy", str(path)))
