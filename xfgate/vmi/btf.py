"""A minimal reader of the kernel's BTF (BPF Type Format) blob, stdlib only.

The blob is the vmlinux's ``.BTF`` section; the same bytes sit in guest RAM, so it may come from a
hostile guest: every length, string offset and type id is checked, and every walk over the type
graph (typedef chains, qualifiers) is bounded. Any inconsistency raises ``ProfileError``.

Layout (include/uapi/linux/btf.h): a header, then a type section of variable-length records
(``struct btf_type`` + kind-specific data) and a string section. Type ids start at 1 in section
order; id 0 is ``void``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple

from xfgate.errors import ProfileError

BTF_MAGIC = 0xEB9F
HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type_off/len, str_off/len
TYPE_HEADER = struct.Struct("<III")  # name_off, info, size_or_type
MAX_BLOB = 256 << 20  # a real vmlinux BTF is ~5 MB
MAX_CHAIN = 64  # typedef/qualifier/array nesting deeper than this is hostile


class Kind(IntEnum):
    UNKN = 0
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


# Kinds whose third header word is a type id (the rest carry a size, or nothing).
REFERENCE_KINDS = frozenset(
    {
        Kind.PTR,
        Kind.TYPEDEF,
        Kind.VOLATILE,
        Kind.CONST,
        Kind.RESTRICT,
        Kind.FUNC,
        Kind.VAR,
        Kind.DECL_TAG,
        Kind.TYPE_TAG,
    }
)
# Kinds that only decorate another type: skipped when resolving what a member really is.
QUALIFIER_KINDS = frozenset({Kind.TYPEDEF, Kind.VOLATILE, Kind.CONST, Kind.RESTRICT, Kind.TYPE_TAG})

INT_SIGNED = 1 << 0
INT_CHAR = 1 << 1
INT_BOOL = 1 << 2


class BtfMember(NamedTuple):
    """A struct/union member. ``bit_offset`` counts from the start of the struct."""

    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int  # 0 unless a bitfield


class BtfEnumValue(NamedTuple):
    name: str
    value: int


class BtfParam(NamedTuple):
    name: str
    type_id: int


class BtfVarSecinfo(NamedTuple):
    type_id: int
    offset: int
    size: int


class BtfArray(NamedTuple):
    elem_type_id: int
    index_type_id: int
    nelems: int


class BtfInt(NamedTuple):
    encoding: int  # INT_SIGNED | INT_CHAR | INT_BOOL
    bit_offset: int
    bits: int


class BtfType(NamedTuple):
    """One type record. ``size`` is set for sized kinds, ``ref`` for reference kinds."""

    id: int
    kind: Kind
    name: str
    kind_flag: bool
    vlen: int
    size: int
    ref: int
    int_info: BtfInt | None = None
    array: BtfArray | None = None
    members: tuple[BtfMember, ...] = ()
    enum_values: tuple[BtfEnumValue, ...] = ()
    params: tuple[BtfParam, ...] = ()
    secinfos: tuple[BtfVarSecinfo, ...] = ()
    extra: int = 0  # VAR linkage, DECL_TAG component_idx


@dataclass(frozen=True)
class Btf:
    """A parsed BTF blob: ``types[i]`` is type id ``i`` (``types[0]`` is void)."""

    types: tuple[BtfType, ...]

    def __len__(self) -> int:
        return len(self.types)

    def type(self, type_id: int) -> BtfType:
        if not 0 <= type_id < len(self.types):
            raise ProfileError(f"BTF type id {type_id} out of range (0..{len(self.types) - 1})")
        return self.types[type_id]

    def find(self, name: str, kind: Kind | None = None) -> list[BtfType]:
        """All types of that name (and kind): a linear scan, for tools and tests."""
        return [t for t in self.types if t.name == name and (kind is None or t.kind == kind)]

    def strip(self, type_id: int) -> BtfType:
        """Follow typedefs and qualifiers to the type that has a layout (bounded)."""
        t = self.type(type_id)
        for _ in range(MAX_CHAIN):
            if t.kind not in QUALIFIER_KINDS:
                return t
            t = self.type(t.ref)
        raise ProfileError(f"BTF type {type_id}: typedef/qualifier chain longer than {MAX_CHAIN}")

    def type_size(self, type_id: int) -> int:
        """Size in bytes of a type, following typedefs, qualifiers and arrays (bounded)."""
        count = 1
        t = self.strip(type_id)
        for _ in range(MAX_CHAIN):
            if t.kind == Kind.ARRAY:
                assert t.array is not None
                count *= t.array.nelems
                t = self.strip(t.array.elem_type_id)
                continue
            if t.kind == Kind.PTR:
                return 8 * count
            if t.kind in (Kind.INT, Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64, Kind.FLOAT):
                return t.size * count
            return 0  # void, functions, forward declarations: no size
        raise ProfileError(f"BTF type {type_id}: array nesting deeper than {MAX_CHAIN}")


class _Names(dict[int, str]):
    """Strings of the string section by offset; a name may also point mid-string (valid BTF
    never does, hostile BTF may), which ``__missing__`` decodes on demand, bounds-checked."""

    def __init__(self, section: bytes) -> None:
        super().__init__()
        self.section = section
        offset = 0
        for raw in section.split(b"\0"):
            self[offset] = raw.decode("utf-8", "replace")
            offset += len(raw) + 1

    def __missing__(self, offset: int) -> str:
        if offset >= len(self.section):
            raise ProfileError(f"BTF name offset {offset} beyond the string section")
        end = self.section.index(b"\0", offset)  # found: the section ends with NUL
        name = self.section[offset:end].decode("utf-8", "replace")
        self[offset] = name
        return name


def _string_table(blob: bytes, start: int, length: int) -> _Names:
    section = blob[start : start + length]
    if length and section[-1:] != b"\0":
        raise ProfileError("BTF string section is not NUL-terminated")
    return _Names(section)


def parse_btf(blob: bytes) -> Btf:
    """Parse a BTF blob (little-endian, as on x86-64) into a ``Btf``; ``ProfileError`` if bad."""
    if len(blob) > MAX_BLOB:
        raise ProfileError(f"BTF blob of {len(blob)} bytes is larger than {MAX_BLOB}")
    if len(blob) < HEADER.size:
        raise ProfileError(f"BTF blob of {len(blob)} bytes is shorter than its header")
    magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = HEADER.unpack_from(blob)
    if magic != BTF_MAGIC:
        raise ProfileError(f"not a BTF blob (magic {magic:#06x}, expected {BTF_MAGIC:#06x})")
    if version != 1:
        raise ProfileError(f"BTF version {version} is not supported (only 1)")
    if hdr_len < HEADER.size or hdr_len > len(blob):
        raise ProfileError(f"BTF header length {hdr_len} is invalid")
    for what, off, length in (("type", type_off, type_len), ("string", str_off, str_len)):
        if hdr_len + off + length > len(blob):
            raise ProfileError(
                f"BTF {what} section ({off}+{length}) runs past the blob ({len(blob)} bytes)"
            )
    names = _string_table(blob, hdr_len + str_off, str_len)
    return Btf(_parse_types(blob, hdr_len + type_off, type_len, names))


# Bytes of kind-specific data after the 12-byte header: (fixed, per vlen item), by kind number.
_EXTRA_SIZE: tuple[tuple[int, int], ...] = tuple(
    (4, 0)
    if k in (Kind.INT, Kind.VAR, Kind.DECL_TAG)
    else (12, 0)
    if k == Kind.ARRAY
    else (0, 12)
    if k in (Kind.STRUCT, Kind.UNION, Kind.DATASEC, Kind.ENUM64)
    else (0, 8)
    if k in (Kind.ENUM, Kind.FUNC_PROTO)
    else (0, 0)
    for k in Kind
)
_KINDS = tuple(Kind)
_IS_REFERENCE = tuple(k in REFERENCE_KINDS for k in Kind)


def _parse_types(blob: bytes, start: int, length: int, names: _Names) -> tuple[BtfType, ...]:
    end = start + length
    pos = start
    types: list[BtfType] = [BtfType(0, Kind.UNKN, "void", False, 0, 0, 0)]
    unpack_header = TYPE_HEADER.unpack_from
    while pos < end:
        if pos + 12 > end:
            raise ProfileError(f"BTF type record at {pos - start} truncated")
        name_off, info, size_or_type = unpack_header(blob, pos)
        pos += 12
        raw_kind = (info >> 24) & 0x1F
        if raw_kind == 0 or raw_kind > Kind.ENUM64:
            raise ProfileError(f"BTF type {len(types)}: unknown kind {raw_kind}")
        kind = _KINDS[raw_kind]
        vlen = info & 0xFFFF
        fixed, per_item = _EXTRA_SIZE[raw_kind]
        extra_len = fixed + per_item * vlen
        if pos + extra_len > end:
            raise ProfileError(f"BTF type {len(types)} ({kind.name}) runs past the type section")
        kind_flag = bool(info >> 31)
        if _IS_REFERENCE[raw_kind]:
            t = BtfType(len(types), kind, names[name_off], kind_flag, vlen, 0, size_or_type)
        else:
            t = BtfType(len(types), kind, names[name_off], kind_flag, vlen, size_or_type, 0)
        if extra_len:
            t = t._replace(**_extra_fields(kind, kind_flag, vlen, blob, pos, names))
        pos += extra_len
        types.append(t)
    _check_references(types)
    return tuple(types)


def _extra_fields(
    kind: Kind, kind_flag: bool, vlen: int, blob: bytes, pos: int, names: _Names
) -> dict[str, Any]:
    """The kind-specific data after a type's header, as BtfType fields."""
    if kind == Kind.STRUCT or kind == Kind.UNION:
        words = struct.unpack_from(f"<{3 * vlen}I", blob, pos)
        member_names = map(names.__getitem__, words[0::3])
        if kind_flag:  # offset word = bitfield_size << 24 | bit_offset
            offsets = words[2::3]
            return {
                "members": tuple(
                    map(
                        BtfMember,
                        member_names,
                        words[1::3],
                        [w & 0xFFFFFF for w in offsets],
                        [w >> 24 for w in offsets],
                    )
                )
            }
        zeros = [0] * vlen
        return {"members": tuple(map(BtfMember, member_names, words[1::3], words[2::3], zeros))}
    if kind == Kind.FUNC_PROTO:
        words = struct.unpack_from(f"<{2 * vlen}I", blob, pos)
        return {"params": tuple(map(BtfParam, map(names.__getitem__, words[0::2]), words[1::2]))}
    if kind == Kind.INT:
        (word,) = struct.unpack_from("<I", blob, pos)
        return {"int_info": BtfInt((word >> 24) & 0x0F, (word >> 16) & 0xFF, word & 0xFF)}
    if kind == Kind.VAR or kind == Kind.DECL_TAG:
        return {"extra": struct.unpack_from("<i", blob, pos)[0]}
    if kind == Kind.ARRAY:
        return {"array": BtfArray(*struct.unpack_from("<III", blob, pos))}
    if kind == Kind.ENUM:
        words = struct.unpack_from(f"<{2 * vlen}{'i' if kind_flag else 'I'}", blob, pos)
        value_names = map(names.__getitem__, [w & 0xFFFFFFFF for w in words[0::2]])
        return {"enum_values": tuple(map(BtfEnumValue, value_names, words[1::2]))}
    if kind == Kind.ENUM64:
        words = struct.unpack_from(f"<{3 * vlen}I", blob, pos)
        values = []
        for i in range(0, 3 * vlen, 3):
            value = words[i + 1] | words[i + 2] << 32
            if kind_flag and value >= 1 << 63:
                value -= 1 << 64
            values.append(BtfEnumValue(names[words[i]], value))
        return {"enum_values": tuple(values)}
    if kind == Kind.DATASEC:
        words = struct.unpack_from(f"<{3 * vlen}I", blob, pos)
        return {"secinfos": tuple(map(BtfVarSecinfo, words[0::3], words[1::3], words[2::3]))}
    return {}


def _check_references(types: list[BtfType]) -> None:
    """Every type id a record names must exist: later walks then index without checks."""
    count = len(types)
    for t in types:
        if t.ref < count and not t.members and not t.params and t.array is None:
            continue  # the common case, checked without building a list
        ids: list[int] = [t.ref]
        if t.array is not None:
            ids += [t.array.elem_type_id, t.array.index_type_id]
        ids += [m.type_id for m in t.members]
        ids += [p.type_id for p in t.params]
        ids += [s.type_id for s in t.secinfos]
        for type_id in ids:
            if type_id >= count:
                raise ProfileError(
                    f"BTF type {t.id} ({t.kind.name} {t.name!r}) refers to type {type_id}, "
                    f"but only {count - 1} types exist"
                )
