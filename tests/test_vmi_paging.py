"""x86-64 translation over hand-built page tables in a byte buffer."""

from __future__ import annotations

import struct

import pytest

from xfgate.errors import MemoryReadError, TranslationError
from xfgate.vmi.memory import BufferMemory
from xfgate.vmi.paging import AddressSpace, canonical

PRESENT_RW = 0x3
PSE = 0x80


class Tables:
    """Page tables in a 4 MiB buffer; tables allocated from 0x1000 up, data from 2 MiB."""

    def __init__(self, levels: int) -> None:
        self.buf = bytearray(4 << 20)
        self.levels = levels
        self.next = 0x2000
        self.root = 0x1000

    def _sub(self, table: int, index: int) -> int:
        e = struct.unpack_from("<Q", self.buf, table + index * 8)[0]
        if e & 1:
            return int(e & 0x000FFFFFFFFFF000)
        t, self.next = self.next, self.next + 0x1000
        struct.pack_into("<Q", self.buf, table + index * 8, t | PRESENT_RW)
        return t

    def map(self, vaddr: int, paddr: int, size: int) -> None:
        t = self.root
        for shift in [48, 39] if self.levels == 5 else [39]:
            t = self._sub(t, (vaddr >> shift) & 0x1FF)
        if size == 1 << 30:
            struct.pack_into(
                "<Q", self.buf, t + ((vaddr >> 30) & 0x1FF) * 8, paddr | PRESENT_RW | PSE
            )
            return
        t = self._sub(t, (vaddr >> 30) & 0x1FF)
        if size == 1 << 21:
            struct.pack_into(
                "<Q", self.buf, t + ((vaddr >> 21) & 0x1FF) * 8, paddr | PRESENT_RW | PSE
            )
            return
        t = self._sub(t, (vaddr >> 21) & 0x1FF)
        struct.pack_into("<Q", self.buf, t + ((vaddr >> 12) & 0x1FF) * 8, paddr | PRESENT_RW)

    def pte_address(self, vaddr: int) -> int:
        t = self.root
        for shift in [48, 39, 30, 21] if self.levels == 5 else [39, 30, 21]:
            e = struct.unpack_from("<Q", self.buf, t + ((vaddr >> shift) & 0x1FF) * 8)[0]
            t = e & 0x000FFFFFFFFFF000
        return int(t + ((vaddr >> 12) & 0x1FF) * 8)


@pytest.mark.parametrize("levels", [4, 5])
def test_4k_2m_1g_pages(levels: int) -> None:
    t = Tables(levels)
    v4k = 0xFFFFFFFF81234000
    t.map(v4k, 0x200000, 0x1000)
    v2m = 0xFFFF888000200000
    t.map(v2m, 0x200000, 1 << 21)
    v1g = 0xFFFF890000000000
    t.map(v1g, 0, 1 << 30)
    space = AddressSpace(BufferMemory(t.buf), t.root, levels)
    assert space.translate(v4k + 0x123) == 0x200123
    assert space.translate(v2m + 0x1ABCDE) == 0x3ABCDE
    assert space.translate(v1g + 0x3F0000) == 0x3F0000
    with pytest.raises(TranslationError):
        space.translate(v4k + 0x1000)


def test_read_across_pages_mapped_out_of_order() -> None:
    t = Tables(4)
    base = 0xFFFFC90000000000
    t.map(base, 0x300000, 0x1000)
    t.map(base + 0x1000, 0x201000, 0x1000)  # next virtual page is physically lower
    t.buf[0x300FF0:0x301000] = b"A" * 16
    t.buf[0x201000:0x201010] = b"B" * 16
    space = AddressSpace(BufferMemory(t.buf), t.root)
    assert space.read(base + 0xFF0, 32) == b"A" * 16 + b"B" * 16
    with pytest.raises(MemoryReadError):
        space.read(base + 0x1FF0, 32)  # runs into an unmapped page


def test_cache_is_per_snapshot() -> None:
    t = Tables(4)
    v = 0xFFFFC90000010000
    t.map(v, 0x300000, 0x1000)
    space = AddressSpace(BufferMemory(t.buf), t.root)
    assert space.translate(v) == 0x300000
    struct.pack_into("<Q", t.buf, t.pte_address(v), 0x301000 | PRESENT_RW)  # guest remaps
    assert space.translate(v) == 0x300000  # same snapshot: cached
    space.new_snapshot()
    assert space.translate(v) == 0x301000


def test_non_canonical_and_tables_outside_memory() -> None:
    t = Tables(4)
    space = AddressSpace(BufferMemory(t.buf), t.root)
    with pytest.raises(TranslationError, match="canonical"):
        space.translate(0x0000900000000000)
    assert canonical(0xFFFF800000000000) and not canonical(0xFF00000000000000)
    assert canonical(0xFF00000000000000, 5)
    # A PML4 entry pointing past the end of memory: an error, not an IndexError.
    struct.pack_into("<Q", t.buf, t.root + 0x1FF * 8, (64 << 30) | PRESENT_RW)
    with pytest.raises(TranslationError, match="outside memory"):
        space.translate(0xFFFFFF8000000000)


def test_pti_user_root_is_not_the_kernel_root() -> None:
    from xfgate.vmi.qmp import ControlRegisters, parse_control_registers

    regs = parse_control_registers(
        "RAX=0\nCR0=80050033 CR2=00007f CR3=0000000009a11000 CR4=000006f0\n"
    )
    assert regs == ControlRegisters(0x9A11000, 0x6F0)
    assert regs.kernel_root == 0x9A10000 and not regs.la57
    assert ControlRegisters(0x1000, 1 << 12).la57
