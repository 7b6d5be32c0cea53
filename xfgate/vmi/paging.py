"""x86-64 address translation: 4- and 5-level paging, 2 MiB and 1 GiB pages.

Only presence and page size matter for reading (NX, U/S, R/W are ignored). With PTI the kernel's
page-table root is CR3 with bit 12 cleared (see ControlRegisters.kernel_root).

Translations are cached per page for one snapshot only: the guest changes its page tables, so the
caller drops the cache at the start of every walk (`new_snapshot`). Large pages are cached at
their own size, so the kernel's direct map (mostly 2 MiB / 1 GiB pages) costs one walk per large
page, not per 4 KiB.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from xfgate.errors import MemoryReadError, TranslationError
from xfgate.vmi.memory import PhysicalMemory

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)
PTE_PRESENT = 1 << 0
PTE_PSE = 1 << 7  # page size: a 1 GiB (PDPTE) or 2 MiB (PDE) page
PHYS_MASK = 0x000FFFFFFFFFF000  # bits 12..51: next table or page frame
_U64 = struct.Struct("<Q")
MAX_READ = 64 << 20  # one read of more than this is a bug or hostile data, never a real object


@dataclass(frozen=True, slots=True)
class PagingLevel:
    """One level of the x86-64 page-table tree (Intel SDM vol. 3 4.5, the Linux names)."""

    name: str
    shift: int  # the virtual-address bits [shift, shift + 9) index this level's table
    # When a present entry maps a page (rather than the next table): None never (pgd, p4d),
    # PTE_PSE if that bit is set (pud: 1 GiB, pmd: 2 MiB), 0 always (pte; bit 7 is PAT there).
    page_flag: int | None

    @property
    def offset_mask(self) -> int:
        return (1 << self.shift) - 1


# pgd/p4d/pud/pmd/pte as Linux names them; p4d is the extra (PML5) level of 5-level paging.
LEVELS_4 = (
    PagingLevel("pgd", 39, None),
    PagingLevel("pud", 30, PTE_PSE),
    PagingLevel("pmd", 21, PTE_PSE),
    PagingLevel("pte", 12, 0),
)
LEVELS_5 = (PagingLevel("pgd", 48, None), PagingLevel("p4d", 39, None), *LEVELS_4[1:])
PAGE_SHIFTS = (12, 21, 30)  # the page sizes a translation is cached at: 4 KiB, 2 MiB, 1 GiB


def canonical(vaddr: int, levels: int = 4) -> bool:
    """True if `vaddr` is a canonical 48-bit (or 57-bit) address."""
    bits = 57 if levels == 5 else 48
    top = vaddr >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


class AddressSpace:
    """A guest virtual address space: a page-table root over physical memory."""

    def __init__(self, memory: PhysicalMemory, root: int, levels: int = 4, name: str = "") -> None:
        if levels not in (4, 5):
            raise ValueError(f"x86-64 paging has 4 or 5 levels, not {levels}")
        self.memory = memory
        self.root = root & PHYS_MASK
        self.levels = levels
        self.name = name or f"{memory.name} cr3={self.root:#x}"
        self.paging_levels = LEVELS_5 if levels == 5 else LEVELS_4
        # One map per page size (4 KiB, 2 MiB, 1 GiB): virtual frame number -> physical base.
        self._caches: dict[int, dict[int, int]] = {shift: {} for shift in PAGE_SHIFTS}
        self._cache4k, self._cache2m, self._cache1g = (self._caches[s] for s in PAGE_SHIFTS)
        # The level table as plain tuples for the walk loop: (shift, page_flag, offset mask,
        # cache of the pages mapped at this level).
        self._plan = tuple(
            (lv.shift, lv.page_flag, lv.offset_mask, self._caches.get(lv.shift, {}))
            for lv in self.paging_levels
        )
        # Physical memory laid out flat from 0 (the RAM file, a raw image, a buffer): a read
        # inside one page slices it here, one call instead of three (the packet path's chains).
        flat_view = getattr(memory, "flat_view", None)
        flat: tuple[Any, int] = flat_view() if callable(flat_view) else (None, 0)
        self._flat_buf, self._flat_len = flat

    def new_snapshot(self) -> None:
        """Forget cached translations: call at the start of every walk of live memory."""
        for cache in self._caches.values():
            cache.clear()

    def _entry(self, table: int, index: int, vaddr: int) -> int:
        try:
            raw = self.memory.read(table + index * 8, 8)
        except MemoryReadError:
            raise TranslationError(
                vaddr, self.name, f"page table at {table:#x} is outside memory"
            ) from None
        entry: int = _U64.unpack(raw)[0]
        return entry

    def translate(self, vaddr: int) -> int:
        """Guest physical address of `vaddr`; TranslationError if not mapped."""
        # The cache probes are unrolled (smallest page first): this is the hottest line.
        pa = self._cache4k.get(vaddr >> 12)
        if pa is not None:
            return pa | (vaddr & 0xFFF)
        pa = self._cache2m.get(vaddr >> 21)
        if pa is not None:
            return pa | (vaddr & 0x1FFFFF)
        pa = self._cache1g.get(vaddr >> 30)
        if pa is not None:
            return pa | (vaddr & 0x3FFFFFFF)
        return self._walk(vaddr)

    def _walk(self, vaddr: int) -> int:
        """One loop over the levels (volatility3's Intel32e does the same): a not-present entry
        ends it, an entry that maps a page gives the page, any other entry the next table."""
        if not canonical(vaddr, self.levels):
            raise TranslationError(vaddr, self.name, "not a canonical address")
        table = self.root
        for shift, flag, mask, cache in self._plan:
            entry = self._entry(table, (vaddr >> shift) & 0x1FF, vaddr)
            if not entry & PTE_PRESENT:
                raise TranslationError(vaddr, self.name)
            if flag is not None and entry & flag == flag:
                base = entry & PHYS_MASK & ~mask
                cache[vaddr >> shift] = base
                return base | (vaddr & mask)
            table = entry & PHYS_MASK
        raise AssertionError("unreachable: the pte level always maps a page")  # pragma: no cover

    def is_mapped(self, vaddr: int) -> bool:
        try:
            self.translate(vaddr)
        except MemoryReadError:
            return False
        return True

    def read(self, vaddr: int, length: int) -> bytes:
        """`length` bytes at `vaddr`, across page boundaries; MemoryReadError if any is missing."""
        if length < 0 or length > MAX_READ:
            raise MemoryReadError(vaddr, length, self.name, "absurd read length")
        if (vaddr & 0xFFF) + length <= 0x1000:  # the common case: inside one 4 KiB page
            # translate's cache probes, 4 KiB then 2 MiB (the direct map's) inline.
            pa = self._cache4k.get(vaddr >> 12)
            if pa is not None:
                pa |= vaddr & 0xFFF
            else:
                pa = self._cache2m.get(vaddr >> 21)
                pa = self.translate(vaddr) if pa is None else pa | (vaddr & 0x1FFFFF)
            if pa + length <= self._flat_len:
                return bytes(self._flat_buf[pa : pa + length])
            return self.memory.read(pa, length)
        parts = []
        addr, left = vaddr, length
        while left > 0:
            n = min(left, ((addr | 0xFFF) + 1) - addr)
            parts.append(self.memory.read(self.translate(addr), n))
            addr += n
            left -= n
        return b"".join(parts)

    def read_u64(self, vaddr: int) -> int:
        value: int = _U64.unpack(self.read(vaddr, 8))[0]
        return value

    def read_cstring(self, vaddr: int, limit: int = 256) -> bytes:
        """Bytes up to the first NUL (not included), at most `limit`; stops at unmapped pages."""
        out = b""
        addr = vaddr
        while len(out) < limit:
            n = min(limit - len(out), ((addr | 0xFFF) + 1) - addr)
            chunk = self.read(addr, n)
            nul = chunk.find(b"\0")
            if nul >= 0:
                return out + chunk[:nul]
            out += chunk
            addr += n
        return out
