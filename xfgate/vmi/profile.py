"""A kernel profile: struct layouts and symbol addresses of one kernel build.

Built from the kernel's BTF + kallsyms (see ``profile_build``), or imported from a Volatility 3
ISF file (see ``isf``). Code that reads kernel structures asks the profile for every offset:
layout differences between kernels live here, never in hard-coded numbers.

Symbol addresses are link-time (unrelocated) virtual addresses, as in System.map; KASLR's
virtual shift is applied by the caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from xfgate.errors import ProfileError


@dataclass(frozen=True, slots=True)
class Member:
    offset: int  # bytes from the start of the struct
    type_name: str  # e.g. "struct list_head", "pointer", "unsigned int", "array"
    size: int  # bytes; 0 if unknown
    bit_offset: int = 0  # for bitfields: bit position inside the byte at `offset`
    bit_size: int = 0  # 0 unless a bitfield


@dataclass(frozen=True)
class StructLayout:
    name: str  # without the "struct " prefix, e.g. "task_struct"
    size: int
    members: Mapping[str, Member]  # anonymous struct/union members flattened in


@dataclass(frozen=True)
class Profile:
    release: str  # e.g. "6.1.0-56-amd64"
    banner: str  # linux_banner text, e.g. "Linux version 6.1.0-56-amd64 (...) ...\n"
    structs: Mapping[str, StructLayout]
    symbols: Mapping[str, int]
    # Types of well-known globals, BTF has none (e.g. {"init_task": "task_struct"}).
    symbol_types: Mapping[str, str] = field(default_factory=dict)

    def struct(self, name: str) -> StructLayout:
        try:
            return self.structs[name]
        except KeyError:
            raise ProfileError(
                f"profile for {self.release} has no struct {name}", symbol=name
            ) from None

    def size(self, struct: str) -> int:
        return self.struct(struct).size

    def has_member(self, struct: str, member: str) -> bool:
        return struct in self.structs and member in self.structs[struct].members

    def member(self, struct: str, member: str) -> Member:
        layout = self.struct(struct)
        try:
            return layout.members[member]
        except KeyError:
            raise ProfileError(
                f"profile for {self.release}: struct {struct} has no member {member}",
                symbol=f"{struct}.{member}",
            ) from None

    def offset(self, struct: str, path: str) -> int:
        """Offset of a member, a dotted path through embedded structs allowed:
        ``offset("file", "f_path.dentry")``."""
        total = 0
        current = struct
        parts = path.split(".")
        for i, part in enumerate(parts):
            m = self.member(current, part)
            total += m.offset
            if i + 1 < len(parts):
                if not m.type_name.startswith("struct ") and not m.type_name.startswith("union "):
                    raise ProfileError(
                        f"{struct}.{'.'.join(parts[: i + 1])} is {m.type_name}, not a struct",
                        symbol=f"{struct}.{path}",
                    )
                current = m.type_name.split(" ", 1)[1]
        return total

    def symbol(self, name: str) -> int:
        try:
            return self.symbols[name]
        except KeyError:
            raise ProfileError(
                f"profile for {self.release} has no symbol {name}", symbol=name
            ) from None

    def has_symbol(self, name: str) -> bool:
        return name in self.symbols
