"""Volatility 3 ISF (Intermediate Symbol Format) JSON: export from BTF, import into a Profile.

ISF is xfgate's on-disk profile format too: ``profile_build`` caches the ISF it exports and loads
profiles back through ``profile_from_isf``, so a dwarf2json ISF of a kernel works the same way.

Export follows format 6.2.0 (``volatility3/schemas/schema-6.2.0.json``): anonymous struct/union
members are kept as fields flagged ``anonymous: true`` (Volatility flattens them, as we do on
import); ``symbols.linux_banner.constant_data`` holds the banner bytes with their NUL, which is
how Volatility matches an ISF to a memory image. BTF names no type for global variables, so the
caller passes ``symbol_types`` for the well-known ones (``init_task`` is a ``task_struct``...).
"""

from __future__ import annotations

import base64
import json
import lzma
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xfgate.errors import ProfileError
from xfgate.vmi.btf import MAX_CHAIN, QUALIFIER_KINDS, Btf, BtfMember, BtfType, Kind
from xfgate.vmi.profile import Member, Profile, StructLayout

ISF_FORMAT = "6.2.0"
POINTER_SIZE = 8
MAX_ISF_BYTES = 1 << 30  # decompressed; a full kernel ISF is ~11 MB

TypeDescriptor = dict[str, Any]


# ---------------------------------------------------------------- export: BTF -> ISF


def user_type_names(btf: Btf) -> dict[int, str]:
    """ISF name of every struct, union and enum: its own name; if anonymous, the name of a
    typedef of it (``kuid_t``, ``atomic_t``) or else ``unnamed_<id>``; ``<name>_<id>`` for a
    later type that reuses a name (rare: a few driver-local structs)."""
    aggregate = (Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64)
    declared = {t.name for t in btf.types if t.kind in aggregate and t.name}
    typedef_of: dict[int, str] = {}
    for t in btf.types:
        if t.kind == Kind.TYPEDEF and t.name not in declared:
            target = btf.types[t.ref]
            if target.kind in aggregate and not target.name:
                typedef_of.setdefault(target.id, t.name)
    names: dict[int, str] = {}
    taken: set[tuple[str, str]] = set()
    for t in btf.types:
        if t.kind in aggregate:
            # Structs and unions share ISF's user_types; enums have their own table.
            space = "enum" if t.kind in (Kind.ENUM, Kind.ENUM64) else "user"
            name = t.name or typedef_of.get(t.id) or f"unnamed_{t.id}"
            if (space, name) in taken:
                name = f"{name}_{t.id}"
            taken.add((space, name))
            names[t.id] = name
    return names


def _base_type_entry(t: BtfType) -> dict[str, Any]:
    if t.kind == Kind.FLOAT:
        return {"size": t.size, "signed": True, "kind": "float", "endian": "little"}
    assert t.int_info is not None
    encoding = t.int_info.encoding
    if encoding & 4 or t.name == "_Bool":
        kind = "bool"
    elif encoding & 2 or t.name in ("char", "signed char", "unsigned char"):
        kind = "char"
    else:
        kind = "int"
    return {"size": t.size, "signed": bool(encoding & 1), "kind": kind, "endian": "little"}


def _enum_base(size: int, signed: bool) -> str:
    return {
        (1, True): "signed char",
        (1, False): "unsigned char",
        (2, True): "short int",
        (2, False): "short unsigned int",
        (4, True): "int",
        (4, False): "unsigned int",
        (8, True): "long int",
        (8, False): "long unsigned int",
    }.get((size, signed), "unsigned int" if size <= 4 else "long unsigned int")


def _int_entry(size: int, signed: bool) -> dict[str, Any]:
    return {"size": size, "signed": signed, "kind": "int", "endian": "little"}


class _Exporter:
    """One BTF -> ISF conversion: descriptors are memoised per type id."""

    def __init__(self, btf: Btf) -> None:
        self.btf = btf
        self.names = user_type_names(btf)
        self.descriptors: dict[int, TypeDescriptor] = {}
        self.fwd_needed: dict[str, str] = {}  # forward-declared names without a definition

    def descriptor(self, type_id: int, depth: int = 0) -> TypeDescriptor:
        found = self.descriptors.get(type_id)
        if found is not None:
            return found
        if depth > MAX_CHAIN:
            raise ProfileError(f"BTF type {type_id}: nesting deeper than {MAX_CHAIN} (a cycle?)")
        t = self.btf.type(type_id)
        d: TypeDescriptor
        if t.kind == Kind.UNKN:
            d = {"kind": "base", "name": "void"}
        elif t.kind in (Kind.INT, Kind.FLOAT):
            d = {"kind": "base", "name": t.name}
        elif t.kind == Kind.PTR:
            d = {"kind": "pointer", "subtype": self.descriptor(t.ref, depth + 1)}
        elif t.kind == Kind.ARRAY:
            assert t.array is not None
            d = {
                "kind": "array",
                "count": t.array.nelems,
                "subtype": self.descriptor(t.array.elem_type_id, depth + 1),
            }
        elif t.kind in (Kind.STRUCT, Kind.UNION):
            d = {"kind": "struct" if t.kind == Kind.STRUCT else "union", "name": self.names[t.id]}
        elif t.kind in (Kind.ENUM, Kind.ENUM64):
            d = {"kind": "enum", "name": self.names[t.id]}
        elif t.kind == Kind.FWD:
            kind = "union" if t.kind_flag else "struct"
            self.fwd_needed.setdefault(t.name, kind)
            d = {"kind": kind, "name": t.name}
        elif t.kind in (Kind.FUNC_PROTO, Kind.FUNC):
            d = {"kind": "function"}
        elif t.kind in QUALIFIER_KINDS:
            d = self.descriptor(t.ref, depth + 1)
        else:  # VAR, DATASEC, DECL_TAG never describe a member
            raise ProfileError(f"BTF type {type_id} ({t.kind.name}) cannot be a member's type")
        self.descriptors[type_id] = d
        return d

    def field(self, owner: BtfType, index: int, m: BtfMember) -> tuple[str, dict[str, Any]]:
        target = self.btf.strip(m.type_id)
        anonymous = not m.name and target.kind in (Kind.STRUCT, Kind.UNION)
        name = m.name or f"unnamed_field_{index}"
        if m.bitfield_size:
            storage = max(target.size, 1)
            start = (m.bit_offset // (storage * 8)) * storage
            if m.bit_offset - start * 8 + m.bitfield_size > storage * 8:
                start = m.bit_offset // 8  # straddles its storage unit (packed struct)
            return name, {
                "offset": start,
                "type": {
                    "kind": "bitfield",
                    "bit_position": m.bit_offset - start * 8,
                    "bit_length": m.bitfield_size,
                    "type": self.descriptor(m.type_id),
                },
            }
        if m.bit_offset % 8:
            raise ProfileError(
                f"BTF {owner.kind.name.lower()} {owner.name!r} member {name!r} is not byte-aligned"
            )
        entry: dict[str, Any] = {"offset": m.bit_offset // 8, "type": self.descriptor(m.type_id)}
        if anonymous:
            entry["anonymous"] = True
        return name, entry


def isf_from_btf(
    btf: Btf,
    symbols: Mapping[str, int],
    banner: str,
    symbol_types: Mapping[str, str] | None = None,
    source: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The whole BTF type graph plus symbols as an ISF document (a JSON-ready dict).

    ``symbol_types`` maps global symbols to struct names; entries whose symbol or struct is
    missing are skipped. ``source`` may name the image: {"name": ..., "sha256": ...}."""
    ex = _Exporter(btf)
    base_types: dict[str, Any] = {
        "void": {"size": 0, "signed": False, "kind": "void", "endian": "little"},
        "pointer": _int_entry(POINTER_SIZE, False),
    }
    user_types: dict[str, Any] = {}
    enums: dict[str, Any] = {}
    for t in btf.types:
        if t.kind in (Kind.INT, Kind.FLOAT):
            base_types.setdefault(t.name, _base_type_entry(t))
        elif t.kind in (Kind.STRUCT, Kind.UNION):
            fields = dict(ex.field(t, i, m) for i, m in enumerate(t.members))
            user_types[ex.names[t.id]] = {
                "kind": "struct" if t.kind == Kind.STRUCT else "union",
                "size": t.size,
                "fields": fields,
            }
        elif t.kind in (Kind.ENUM, Kind.ENUM64):
            signed = t.kind_flag or any(v.value < 0 for v in t.enum_values)
            base = _enum_base(t.size, signed)
            base_types.setdefault(base, _int_entry(t.size, signed))
            enums[ex.names[t.id]] = {
                "size": t.size,
                "base": base,
                "constants": {v.name: v.value for v in t.enum_values},
            }
    for name, kind in ex.fwd_needed.items():
        user_types.setdefault(name, {"kind": kind, "size": 0, "fields": {}})

    isf_symbols: dict[str, Any] = {name: {"address": addr} for name, addr in symbols.items()}
    for sym, struct_name in (symbol_types or {}).items():
        if sym in isf_symbols and struct_name in user_types:
            kind = user_types[struct_name]["kind"]
            isf_symbols[sym]["type"] = {"kind": kind, "name": struct_name}
    banner_bytes = banner.encode() + b"\0"
    banner_entry = isf_symbols.setdefault("linux_banner", {"address": 0})
    banner_entry["constant_data"] = base64.b64encode(banner_bytes).decode("ascii")
    banner_entry["type"] = {
        "kind": "array",
        "count": len(banner_bytes),
        "subtype": {"kind": "base", "name": "char"},
    }
    base_types.setdefault("char", {"size": 1, "signed": True, "kind": "char", "endian": "little"})
    return {
        "metadata": _metadata(source),
        "base_types": base_types,
        "user_types": user_types,
        "enums": enums,
        "symbols": isf_symbols,
    }


def _metadata(source: Mapping[str, str] | None) -> dict[str, Any]:
    item: dict[str, str] = {"kind": "symtab", "name": "kallsyms"}
    if source:
        item["name"] = f"kallsyms of {source.get('name', 'vmlinuz')}"
        if source.get("sha256"):
            item.update(hash_type="sha256", hash_value=source["sha256"])
    return {
        "format": ISF_FORMAT,
        "producer": {"name": "xfgate", "version": "0.1.0"},
        "linux": {"symbols": [item]},
    }


def with_signed_addresses(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A copy whose symbol addresses >= 2**63 are written as negative numbers: LibVMI's json-c
    mangles unsigned 64-bit integers in an ISF (lab notes). Our import reads both forms."""
    symbols = {
        name: {**entry, "address": entry["address"] - (1 << 64)}
        if entry.get("address", 0) >= 1 << 63
        else entry
        for name, entry in doc["symbols"].items()
    }
    return {**doc, "symbols": symbols}


# ---------------------------------------------------------------- import: ISF -> Profile


def profile_from_isf(doc: Mapping[str, Any]) -> Profile:
    """A Profile from an ISF document (ours or dwarf2json's): anonymous members flattened in."""
    for key in ("metadata", "base_types", "user_types", "symbols"):
        if not isinstance(doc.get(key), dict):
            raise ProfileError(f"not a Volatility ISF document: no {key!r} object")
    banner = _isf_banner(doc["symbols"])
    parts = banner.split()
    release = parts[2] if len(parts) > 2 and parts[:2] == ["Linux", "version"] else ""
    if not release:
        raise ProfileError("ISF has no linux_banner constant_data: cannot tell its kernel release")
    sizes = _Sizes(doc)
    structs = {
        name: StructLayout(name, int(ut.get("size", 0)), _flatten(doc, name, sizes))
        for name, ut in doc["user_types"].items()
    }
    symbols: dict[str, int] = {}
    symbol_types: dict[str, str] = {}
    for name, entry in doc["symbols"].items():
        address = entry.get("address")
        if not isinstance(address, int):
            raise ProfileError(f"ISF symbol {name!r} has no integer address", symbol=name)
        symbols[name] = address & 0xFFFFFFFFFFFFFFFF  # LibVMI-style signed addresses too
        t = entry.get("type")
        if isinstance(t, dict) and t.get("kind") in ("struct", "union") and "name" in t:
            symbol_types[name] = t["name"]
    return Profile(release, banner, structs, symbols, symbol_types)


def _isf_banner(symbols: Mapping[str, Any]) -> str:
    data = symbols.get("linux_banner", {}).get("constant_data")
    if not isinstance(data, str):
        return ""
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError as e:
        raise ProfileError(f"ISF linux_banner constant_data is not base64: {e}") from e
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


class _Sizes:
    """Byte sizes of ISF type descriptors."""

    def __init__(self, doc: Mapping[str, Any]) -> None:
        self.base = doc["base_types"]
        self.user = doc["user_types"]
        self.enums = doc.get("enums", {})

    def of(self, d: Mapping[str, Any], depth: int = 0) -> int:
        if depth > MAX_CHAIN:
            raise ProfileError(f"ISF type descriptor nested deeper than {MAX_CHAIN}")
        kind = d.get("kind")
        if kind == "pointer":
            return int(self.base.get("pointer", {}).get("size", POINTER_SIZE))
        if kind == "base":
            return int(self.base.get(d.get("name"), {}).get("size", 0))
        if kind in ("struct", "union", "class"):
            return int(self.user.get(d.get("name"), {}).get("size", 0))
        if kind == "enum":
            return int(self.enums.get(d.get("name"), {}).get("size", 0))
        if kind == "array":
            return int(d.get("count", 0)) * self.of(d.get("subtype", {}), depth + 1)
        if kind == "bitfield":
            return (int(d.get("bit_position", 0)) % 8 + int(d.get("bit_length", 0)) + 7) // 8
        return 0


def type_name(d: Mapping[str, Any]) -> str:
    """The Profile's short name of an ISF type: "struct list_head", "pointer", "unsigned int"."""
    kind = d.get("kind")
    if kind == "base":
        return str(d.get("name", ""))
    if kind in ("struct", "union", "enum"):
        return f"{kind} {d.get('name', '')}"
    if kind == "class":
        return f"struct {d.get('name', '')}"
    if kind == "bitfield":
        return type_name(d.get("type", {}))
    return str(kind)  # pointer, array, function


def _flatten(
    doc: Mapping[str, Any], struct_name: str, sizes: _Sizes, base: int = 0, depth: int = 0
) -> dict[str, Member]:
    if depth > MAX_CHAIN:
        raise ProfileError(
            f"ISF struct {struct_name}: anonymous members nested too deep (a cycle?)"
        )
    fields = doc["user_types"].get(struct_name, {}).get("fields", {})
    members: dict[str, Member] = {}
    for name, f in fields.items():
        d = f.get("type", {})
        offset = base + int(f.get("offset", 0))
        if f.get("anonymous"):
            for inner, m in _flatten(doc, str(d.get("name")), sizes, offset, depth + 1).items():
                members.setdefault(inner, m)
            continue
        if d.get("kind") == "bitfield":
            position = int(d.get("bit_position", 0))
            members[name] = Member(
                offset + position // 8,
                type_name(d),
                sizes.of({**d, "bit_position": position % 8}),
                position % 8,
                int(d.get("bit_length", 0)),
            )
        else:
            members[name] = Member(offset, type_name(d), sizes.of(d))
    return members


# ---------------------------------------------------------------- files


def write_isf(doc: Mapping[str, Any], path: Path | str, preset: int = 6) -> int:
    """Write an ISF as compact JSON (``.xz`` suffix: compressed with xz ``preset``: 6 is ~5x
    slower than 0 for ~25 % less); returns the bytes written."""
    path = Path(path)
    data = json.dumps(doc, separators=(",", ":")).encode()
    if path.suffix == ".xz":
        data = lzma.compress(data, preset=preset)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return len(data)


def read_isf(path: Path | str) -> dict[str, Any]:
    """Read an ISF file (plain or ``.xz``); ``ProfileError`` if unreadable or not JSON."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:6] == b"\xfd7zXZ\x00":
            xz = lzma.LZMADecompressor()
            raw = xz.decompress(raw, max_length=MAX_ISF_BYTES)
            if not xz.eof:
                raise ProfileError(f"{path}: compressed ISF is truncated or too large")
        doc = json.loads(raw)
    except (OSError, lzma.LZMAError, ValueError) as e:
        raise ProfileError(f"cannot read ISF profile {path}: {e}") from e
    if not isinstance(doc, dict):
        raise ProfileError(f"{path} is not an ISF document (top level is not an object)")
    return doc


def load_isf_profile(path: Path | str) -> Profile:
    return profile_from_isf(read_isf(path))
