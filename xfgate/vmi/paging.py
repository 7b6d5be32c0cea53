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

from xfgate.errors import MemoryReadError, TranslationError
from xfgate.vmi.memory import PhysicalMemory

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)
PTE_PRESENT = 1 << 0
PTE_PSE = 1 << 7  # page size: a 1 GiB (PDPTE) or 2 MiB (PDE) page
PHYS_MASK = 0x000FFFFFFFFFF000  # bits 12..51: next table or page frame
_U64 = struct.Struct("<Q")
_SHIFT_2M = 21
_SHIFT_1G = 30
MAX_READ = 64 << 20  # one read of more than this is a bug or hostile data, never a real object


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
        # Three maps (4 KiB, 2 MiB, 1 GiB frames), each virtual frame number -> physical base.
        self._cache4k: dict[int, int] = {}
        self._cache2m: dict[int, int] = {}
        self._cache1g: dict[int, int] = {}

    def new_snapshot(self) -> None:
        """Forget cached translations: call at the start of every walk of live memory."""
        self._cache4k.clear()
        self._cache2m.clear()
        self._cache1g.clear()

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
        pa = self._cache4k.get(vaddr >> PAGE_SHIFT)
        if pa is not None:
            return pa | (vaddr & 0xFFF)
        pa = self._cache2m.get(vaddr >> _SHIFT_2M)
        if pa is not None:
            return pa | (vaddr & 0x1FFFFF)
        pa = self._cache1g.get(vaddr >> _SHIFT_1G)
        if pa is not None:
            return pa | (vaddr & 0x3FFFFFFF)
        return self._walk(vaddr)

    def _walk(self, vaddr: int) -> int:
        if not canonical(vaddr, self.levels):
            raise TranslationError(vaddr, self.name, "not a canonical address")
        table = self.root
        # Level 5 (PML5) and 4 (PML4) never map pages directly.
        for shift in (48, 39) if self.levels == 5 else (39,):
            entry = self._entry(table, (vaddr >> shift) & 0x1FF, vaddr)
            if not entry & PTE_PRESENT:
                raise TranslationError(vaddr, self.name)
            table = entry & PHYS_MASK
        entry = self._entry(table, (vaddr >> 30) & 0x1FF, vaddr)  # PDPTE
        if not entry & PTE_PRESENT:
            raise TranslationError(vaddr, self.name)
        if entry & PTE_PSE:
            base = entry & PHYS_MASK & ~((1 << _SHIFT_1G) - 1)
            self._cache1g[vaddr >> _SHIFT_1G] = base
            return base | (vaddr & 0x3FFFFFFF)
        entry = self._entry(entry & PHYS_MASK, (vaddr >> 21) & 0x1FF, vaddr)  # PDE
        if not entry & PTE_PRESENT:
            raise TranslationError(vaddr, self.name)
        if entry & PTE_PSE:
            base = entry & PHYS_MASK & ~((1 << _SHIFT_2M) - 1)
            self._cache2m[vaddr >> _SHIFT_2M] = base
            return base | (vaddr & 0x1FFFFF)
        entry = self._entry(entry & PHYS_MASK, (vaddr >> 12) & 0x1FF, vaddr)  # PTE
        if not entry & PTE_PRESENT:
            raise TranslationError(vaddr, self.name)
        base = entry & PHYS_MASK
        self._cache4k[vaddr >> PAGE_SHIFT] = base
        return base | (vaddr & 0xFFF)

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
        first_end = (vaddr | 0xFFF) + 1
        if vaddr + length <= first_end:  # the common case: inside one 4 KiB page
            return self.memory.read(self.translate(vaddr), length)
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
