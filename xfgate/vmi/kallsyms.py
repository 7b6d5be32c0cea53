"""The kernel's own symbol table, decoded from its kallsyms tables in guest memory.

The tables are what scripts/kallsyms.c emits and kernel/kallsyms.c reads (drgn's
libdrgn/kallsyms.c decodes them the same way from a live kernel):

- ``kallsyms_num_syms``: ``unsigned int``, the number of entries;
- ``kallsyms_names``: per entry a length, then that many token numbers; the length is one byte,
  or two when its top bit is set (``(b0 & 0x7f) | b1 << 7``, "big" symbols, commit 73bbb94466fd,
  v6.1); the expanded name's first character is the ``nm`` type letter;
- ``kallsyms_token_table``: 256 NUL-terminated strings; ``kallsyms_token_index``: 256 ``u16``
  offsets into it;
- addresses: ``kallsyms_offsets`` (``int``) from ``kallsyms_relative_base`` (CONFIG_KALLSYMS_
  BASE_RELATIVE, always on since v6.11), else ``kallsyms_addresses`` (``unsigned long``).
  With CONFIG_KALLSYMS_ABSOLUTE_PERCPU (x86-64 SMP) a non-negative offset is an absolute value
  (the per-cpu symbols) and a negative one is ``relative_base - 1 - offset``; without it every
  offset is unsigned from the base. Which one a kernel uses is decided by checking a symbol
  VMCOREINFO also names, never by version.

The guest memory is hostile: every count and length is bounded, and a table that does not decode
is a ``ProfileError`` naming it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from xfgate.errors import MemoryReadError, ProfileError

# Reads ``length`` bytes at a kernel-image virtual address (runtime, KASLR applied).
ImageReader = Callable[[int, int], bytes]

MAX_SYMS = 2_000_000  # a Debian kernel has ~150k; allmodconfig builds stay well below
MAX_NAMES_BYTES = 64 << 20
NAMES_CHUNK = 1 << 20
TOKEN_TABLE_MAX = 1 << 16  # 256 tokens of at most a few dozen bytes each
KSYM_NAME_LEN = 512  # include/linux/kallsyms.h (128 before v6.1)

# The VMCOREINFO keys naming the tables (kernel/vmcore_info.c, crash_core.c before v6.9;
# added by commit 5fd8fea935a1, v6.0).
TABLE_KEYS = (
    "kallsyms_names",
    "kallsyms_num_syms",
    "kallsyms_token_table",
    "kallsyms_token_index",
)
RELATIVE_KEYS = ("kallsyms_offsets", "kallsyms_relative_base")
ABSOLUTE_KEY = "kallsyms_addresses"


@dataclass(frozen=True, slots=True)
class KallsymsTables:
    """Runtime virtual addresses of the tables, from VMCOREINFO's ``SYMBOL(...)`` lines."""

    names: int
    num_syms: int
    token_table: int
    token_index: int
    offsets: int = 0  # base-relative kernels
    relative_base: int = 0
    addresses: int = 0  # kernels without CONFIG_KALLSYMS_BASE_RELATIVE

    @classmethod
    def from_symbols(cls, symbols: Mapping[str, int]) -> KallsymsTables:
        missing = [k for k in TABLE_KEYS if k not in symbols]
        relative = all(k in symbols for k in RELATIVE_KEYS)
        if not relative and ABSOLUTE_KEY not in symbols:
            missing.append(" + ".join(RELATIVE_KEYS) + f" (or {ABSOLUTE_KEY})")
        if missing:
            raise ProfileError(
                "the guest's VMCOREINFO names no kallsyms tables (missing SYMBOL("
                + "), SYMBOL(".join(missing)
                + "); a kernel before 6.0 or without CONFIG_KALLSYMS)",
                symbol="kallsyms",
            )
        return cls(
            names=symbols["kallsyms_names"],
            num_syms=symbols["kallsyms_num_syms"],
            token_table=symbols["kallsyms_token_table"],
            token_index=symbols["kallsyms_token_index"],
            offsets=symbols.get("kallsyms_offsets", 0) if relative else 0,
            relative_base=symbols.get("kallsyms_relative_base", 0) if relative else 0,
            addresses=0 if relative else symbols[ABSOLUTE_KEY],
        )


def _read(read: ImageReader, address: int, length: int, what: str) -> bytes:
    try:
        data = read(address, length)
    except MemoryReadError as e:
        raise ProfileError(f"cannot read the kernel's {what} at {address:#x}: {e}", what) from e
    if len(data) != length:
        raise ProfileError(f"short read of the kernel's {what} at {address:#x}", what)
    return data


def token_table_size(read: ImageReader, tables: KallsymsTables) -> tuple[tuple[int, ...], int]:
    index = struct.unpack("<256H", _read(read, tables.token_index, 512, "kallsyms_token_index"))
    return index, min(max(index) + 256, TOKEN_TABLE_MAX)


def read_tokens(read: ImageReader, tables: KallsymsTables) -> list[str]:
    """The 256 expansion strings of the name compression."""
    index, size = token_table_size(read, tables)
    raw = _read(read, tables.token_table, size, "kallsyms_token_table")
    tokens = []
    for start in index:
        end = raw.find(b"\0", start)
        if end < 0:
            raise ProfileError("kallsyms_token_table: a token is not terminated", "kallsyms")
        tokens.append(raw[start:end].decode("latin-1"))
    return tokens


def read_names(read: ImageReader, tables: KallsymsTables, count: int) -> tuple[list[str], int]:
    """``count`` expanded names (type letter first), in table order (sorted by address), and
    the bytes of ``kallsyms_names`` they took."""
    tokens = read_tokens(read, tables)
    buf = b""
    base = tables.names  # address of buf[0]
    pos = 0
    names: list[str] = []
    for i in range(count):
        if pos + 2 + KSYM_NAME_LEN > len(buf):  # refill: keep the unread tail
            if base + len(buf) - tables.names > MAX_NAMES_BYTES:
                raise ProfileError("kallsyms_names runs past its bound", "kallsyms_names")
            tail = buf[pos:]
            base += pos
            buf = tail + _read(read, base + len(tail), NAMES_CHUNK, "kallsyms_names")
            pos = 0
        length = buf[pos]
        pos += 1
        if length & 0x80:
            length = (length & 0x7F) | (buf[pos] << 7)
            pos += 1
        if length == 0 or length > KSYM_NAME_LEN:
            raise ProfileError(
                f"kallsyms_names entry {i} has length {length}: not a kallsyms table",
                "kallsyms_names",
            )
        names.append("".join([tokens[b] for b in buf[pos : pos + length]]))
        pos += length
    return names, base + pos - tables.names


def read_num_syms(read: ImageReader, tables: KallsymsTables) -> int:
    (count,) = struct.unpack("<I", _read(read, tables.num_syms, 4, "kallsyms_num_syms"))
    if not 0 < count <= MAX_SYMS:
        raise ProfileError(f"kallsyms_num_syms is {count}: not a kallsyms table", "kallsyms")
    return int(count)


def read_addresses(
    read: ImageReader, tables: KallsymsTables, count: int, absolute_percpu: bool
) -> list[int]:
    """Runtime addresses of the ``count`` entries (per-cpu ones stay absolute offsets)."""
    if not tables.offsets:
        raw = _read(read, tables.addresses, 8 * count, "kallsyms_addresses")
        return list(struct.unpack(f"<{count}Q", raw))
    (base,) = struct.unpack("<Q", _read(read, tables.relative_base, 8, "kallsyms_relative_base"))
    offsets = struct.unpack(
        f"<{count}i", _read(read, tables.offsets, 4 * count, "kallsyms_offsets")
    )
    mask = (1 << 64) - 1
    if absolute_percpu:
        return [off if off >= 0 else (base - 1 - off) & mask for off in offsets]
    return [(base + (off & 0xFFFFFFFF)) & mask for off in offsets]


@dataclass(frozen=True)
class Decoded:
    table: list[tuple[int, str, str]]  # (link-time address, type letter, name)
    # (runtime address, length) of the bytes the table was decoded from that do not move with
    # KASLR; besides them only kallsyms_relative_base (relocated). None with absolute
    # kallsyms_addresses (every address relocated): no fixed bytes to compare.
    extents: tuple[tuple[int, int], ...] | None


def decode(
    read: ImageReader,
    tables: KallsymsTables,
    virt_shift: int,
    anchors: Mapping[str, int],
) -> Decoded:
    """(link-time address, type letter, name) for every entry, in the kernel's order, as
    ``kernel_image.kallsyms_table`` gives them from a vmlinuz.

    ``anchors`` are runtime addresses VMCOREINFO states (``SYMBOL(swapper_pg_dir)``...): the
    addressing mode that puts them where VMCOREINFO says is the kernel's; none agreeing is an
    error (a table of another kernel, or garbage)."""
    count = read_num_syms(read, tables)
    names, names_bytes = read_names(read, tables, count)
    _index, token_bytes = token_table_size(read, tables)
    extents = [
        (tables.num_syms, 4),
        (tables.names, names_bytes),
        (tables.token_index, 512),
        (tables.token_table, token_bytes),
    ]
    if tables.offsets:  # kallsyms_relative_base is relocated by KASLR: not a fixed byte
        extents.append((tables.offsets, 4 * count))
    mask = (1 << 64) - 1
    modes = (True, False) if tables.offsets else (False,)
    for absolute_percpu in modes:
        addresses = read_addresses(read, tables, count, absolute_percpu)
        found: dict[str, int] = {}
        for address, name in zip(addresses, names, strict=True):
            if name[1:] in anchors:
                found.setdefault(name[1:], address)
        if found and all(found[k] == v for k, v in anchors.items() if k in found):
            table = [
                # Per-cpu symbols (absolute, below the kernel image) are not relocated.
                ((a - virt_shift) & mask if a >= 1 << 63 else a, n[:1], n[1:])
                for a, n in zip(addresses, names, strict=True)
            ]
            return Decoded(table, tuple(extents) if tables.offsets else None)
    raise ProfileError(
        "the kallsyms tables in guest memory do not agree with VMCOREINFO "
        f"(none of {', '.join(sorted(anchors))} decodes to the address VMCOREINFO gives)",
        "kallsyms",
    )
