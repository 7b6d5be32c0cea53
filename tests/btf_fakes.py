"""Hand-assembled BTF blobs for unit tests: the byte layout of include/uapi/linux/btf.h."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

KIND = {
    "INT": 1,
    "PTR": 2,
    "ARRAY": 3,
    "STRUCT": 4,
    "UNION": 5,
    "ENUM": 6,
    "FWD": 7,
    "TYPEDEF": 8,
    "VOLATILE": 9,
    "CONST": 10,
    "RESTRICT": 11,
    "FUNC": 12,
    "FUNC_PROTO": 13,
    "VAR": 14,
    "DATASEC": 15,
    "FLOAT": 16,
    "DECL_TAG": 17,
    "TYPE_TAG": 18,
    "ENUM64": 19,
}


@dataclass
class BtfBuilder:
    """Append types in id order (the first is id 1); ``blob()`` gives the BTF bytes."""

    strings: bytearray = field(default_factory=lambda: bytearray(b"\0"))
    types: bytearray = field(default_factory=bytearray)
    count: int = 0

    def name(self, text: str) -> int:
        if not text:
            return 0
        offset = len(self.strings)
        self.strings += text.encode() + b"\0"
        return offset

    def raw(
        self, kind: str, name: str, vlen: int, size_or_type: int, extra: bytes = b"", flag: int = 0
    ) -> int:
        info = (flag << 31) | (KIND[kind] << 24) | vlen
        self.types += struct.pack("<III", self.name(name), info, size_or_type) + extra
        self.count += 1
        return self.count

    def int_(self, name: str, size: int, signed: bool = False, bits: int = 0) -> int:
        encoding = 1 if signed else 0
        word = (encoding << 24) | (bits or size * 8)
        return self.raw("INT", name, 0, size, struct.pack("<I", word))

    def ref(self, kind: str, target: int, name: str = "") -> int:
        return self.raw(kind, name, 0, target)

    def array(self, elem: int, index: int, nelems: int) -> int:
        return self.raw("ARRAY", "", 0, 0, struct.pack("<III", elem, index, nelems))

    def struct_(
        self,
        name: str,
        size: int,
        members: list[tuple[str, int, int, int]],  # name, type, bit offset, bitfield size
        union: bool = False,
    ) -> int:
        flag = int(any(m[3] for m in members))
        extra = b"".join(
            struct.pack("<III", self.name(n), t, (bits << 24 | off) if flag else off)
            for n, t, off, bits in members
        )
        return self.raw("UNION" if union else "STRUCT", name, len(members), size, extra, flag)

    def enum(
        self, name: str, size: int, values: list[tuple[str, int]], signed: bool = False
    ) -> int:
        extra = b"".join(struct.pack("<Ii", self.name(n), v) for n, v in values)
        return self.raw("ENUM", name, len(values), size, extra, int(signed))

    def enum64(self, name: str, values: list[tuple[str, int]], signed: bool = False) -> int:
        extra = b""
        for n, v in values:
            v &= (1 << 64) - 1
            extra += struct.pack("<III", self.name(n), v & 0xFFFFFFFF, v >> 32)
        return self.raw("ENUM64", name, len(values), 8, extra, int(signed))

    def func_proto(self, ret: int, params: list[tuple[str, int]]) -> int:
        extra = b"".join(struct.pack("<II", self.name(n), t) for n, t in params)
        return self.raw("FUNC_PROTO", "", len(params), ret, extra)

    def var(self, name: str, type_id: int, linkage: int = 1) -> int:
        return self.raw("VAR", name, 0, type_id, struct.pack("<I", linkage))

    def datasec(self, name: str, entries: list[tuple[int, int, int]]) -> int:
        extra = b"".join(struct.pack("<III", *e) for e in entries)
        return self.raw("DATASEC", name, len(entries), sum(e[2] for e in entries), extra)

    def decl_tag(self, name: str, target: int, component: int) -> int:
        return self.raw("DECL_TAG", name, 0, target, struct.pack("<i", component))

    def blob(self) -> bytes:
        header = struct.pack(
            "<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings)
        )
        return header + bytes(self.types) + bytes(self.strings)


def sample_kernel() -> tuple[BtfBuilder, dict[str, int]]:
    """A tiny kernel-like type graph: sock_common with anonymous unions and bitfields, a sock
    embedding it, a typedef'd anonymous kuid_t, a task_struct with a comm array and a list."""
    b = BtfBuilder()
    ids: dict[str, int] = {}
    ids["u32"] = b.int_("unsigned int", 4)
    ids["u16"] = b.int_("short unsigned int", 2)
    ids["u8"] = b.int_("unsigned char", 1)
    ids["int"] = b.int_("int", 4, signed=True)
    ids["char"] = b.int_("char", 1, signed=True)
    ids["u64"] = b.int_("long long unsigned int", 8)
    ids["__u32"] = b.ref("TYPEDEF", ids["u32"], "__u32")
    ids["__be32"] = b.ref("TYPEDEF", ids["__u32"], "__be32")  # a typedef chain
    ids["anon_kuid"] = b.struct_("", 4, [("val", ids["u32"], 0, 0)])
    ids["kuid_t"] = b.ref("TYPEDEF", ids["anon_kuid"], "kuid_t")
    ids["list_head_fwd"] = b.raw("FWD", "list_head", 0, 0)
    ids["list_head_ptr"] = b.ref("PTR", ids["list_head_fwd"])
    ids["list_head"] = b.struct_(
        "list_head",
        16,
        [("next", ids["list_head_ptr"], 0, 0), ("prev", ids["list_head_ptr"], 64, 0)],
    )
    # sock_common { union { u64 skc_addrpair; struct { __be32 skc_daddr, skc_rcv_saddr; }; };
    #               union { u32 skc_portpair; struct { u16 skc_dport, skc_num; }; };
    #               u16 skc_family; u8 skc_state; u8 skc_reuse:4, skc_reuseport:1; }
    ids["addr_s"] = b.struct_(
        "", 8, [("skc_daddr", ids["__be32"], 0, 0), ("skc_rcv_saddr", ids["__be32"], 32, 0)]
    )
    ids["addr_u"] = b.struct_(
        "", 8, [("skc_addrpair", ids["u64"], 0, 0), ("", ids["addr_s"], 0, 0)], union=True
    )
    ids["port_s"] = b.struct_(
        "", 4, [("skc_dport", ids["u16"], 0, 0), ("skc_num", ids["u16"], 16, 0)]
    )
    ids["port_u"] = b.struct_(
        "", 4, [("skc_portpair", ids["u32"], 0, 0), ("", ids["port_s"], 0, 0)], union=True
    )
    ids["sock_common"] = b.struct_(
        "sock_common",
        24,
        [
            ("", ids["addr_u"], 0, 0),
            ("", ids["port_u"], 96, 0),
            ("skc_family", ids["u16"], 128, 0),
            ("skc_state", ids["u8"], 144, 0),
            ("skc_reuse", ids["u8"], 152, 4),
            ("skc_reuseport", ids["u8"], 156, 1),
        ],
    )
    ids["sock"] = b.struct_(
        "sock",
        40,
        [("__sk_common", ids["sock_common"], 0, 0), ("sk_uid", ids["kuid_t"], 256, 0)],
    )
    ids["long"] = b.int_("long int", 8, signed=True)
    ids["comm"] = b.array(ids["char"], ids["int"], 16)
    ids["const_char"] = b.ref("CONST", ids["char"])
    ids["task_state"] = b.enum("task_state", 4, [("RUNNING", 0), ("DEAD", -1)], signed=True)
    ids["task_struct"] = b.struct_(
        "task_struct",
        64,
        [
            ("tasks", ids["list_head"], 0, 0),
            ("pid", ids["int"], 128, 0),
            ("__state", ids["task_state"], 160, 0),
            ("comm", ids["comm"], 192, 0),
            ("flags", ids["u32"], 320, 3),
            ("exiting", ids["u32"], 323, 1),
        ],
    )
    ids["proto"] = b.func_proto(ids["int"], [("task", b.ref("PTR", ids["task_struct"]))])
    ids["func"] = b.raw("FUNC", "do_exit", 1, ids["proto"])
    ids["float"] = b.raw("FLOAT", "double", 0, 8)
    ids["var"] = b.var("init_task", ids["task_struct"])
    ids["datasec"] = b.datasec(".data", [(ids["var"], 0, 64)])
    ids["tag"] = b.decl_tag("user", ids["task_struct"], 1)
    ids["type_tag"] = b.ref("TYPE_TAG", ids["task_struct"], "rcu")
    ids["volatile"] = b.ref("VOLATILE", ids["int"])
    ids["restrict"] = b.ref("RESTRICT", ids["list_head_ptr"])
    ids["big"] = b.enum64("big", [("HUGE", 1 << 40), ("NEG", -2)], signed=True)
    return b, ids
