"""A synthetic Linux guest's physical memory for profile-from-memory tests: a kernel image with
kallsyms tables (scripts/kallsyms.c's encoding), a BTF blob between __start_BTF and __stop_BTF,
linux_banner and init_uts_ns, and a VMCOREINFO text naming it all, as kernel/vmcore_info.c
writes it. KASLR on: the image runs ``shift`` above its link address, phys_base negative as on
the lab's guests."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from tests.btf_fakes import sample_kernel

START_KERNEL_MAP = 0xFFFFFFFF80000000
TEXT_LINK = 0xFFFFFFFF81000000
RELEASE = "6.99.0-1-fake"
BUILD_ID = "0123456789abcdef0123456789abcdef01234567"
BIG_NAME = "a_very_long_rust_symbol_" + "x" * 150  # > 127 tokens: two-byte length (v6.1)
# Multi-character tokens, as the compressor would pick common substrings.
MULTI_TOKENS = {0xF0: "init_", 0xF1: "kallsyms_", 0xF2: "swapper"}


@dataclass
class FakeKernel:
    release: str = RELEASE
    banner_release: str = ""  # "" = release; another value makes linux_banner disagree
    build_id: str = BUILD_ID
    shift: int = 0x2A000000  # KERNELOFFSET
    image_paddr: int = 0x200000  # where _text is in guest memory
    absolute_percpu: bool = True  # CONFIG_KALLSYMS_ABSOLUTE_PERCPU (x86-64 SMP)
    with_btf: bool = True
    with_kallsyms_keys: bool = True
    vmcoreinfo_paddr: int = 0x1000
    memory_size: int = 0x400000
    extra_vmcoreinfo: dict[str, str] = field(default_factory=dict)

    @property
    def phys_base(self) -> int:
        return self.image_paddr - (TEXT_LINK + self.shift - START_KERNEL_MAP)

    def paddr(self, link: int) -> int:
        return self.image_paddr + link - TEXT_LINK

    @property
    def banner(self) -> str:
        release = self.banner_release or self.release
        return f"Linux version {release} (fake@build) (gcc 12) #1 SMP PREEMPT_DYNAMIC\n"


def encode_name(text: str) -> bytes:
    """Token numbers for ``text``: the multi-character tokens where they fit, else one byte per
    character (every printable byte is its own token in these tables)."""
    out = bytearray()
    i = 0
    while i < len(text):
        for number, token in MULTI_TOKENS.items():
            if text.startswith(token, i):
                out.append(number)
                i += len(token)
                break
        else:
            out.append(ord(text[i]))
            i += 1
    length = len(out)
    prefix = bytes([length]) if length < 0x80 else bytes([0x80 | (length & 0x7F), length >> 7])
    return prefix + bytes(out)


def token_tables() -> tuple[bytes, bytes]:
    table = bytearray()
    index = []
    for number in range(256):
        index.append(len(table))
        token = MULTI_TOKENS.get(number, chr(number) if 0x20 < number < 0x7F else "?")
        table += token.encode("latin-1") + b"\0"
    return bytes(table), struct.pack("<256H", *index)


def build(k: FakeKernel) -> tuple[bytearray, list[tuple[int, str, str]]]:
    """The guest's memory, and the symbol table (link-time address, type, name) it holds."""
    mem = bytearray(k.memory_size)
    btf_builder, _ids = sample_kernel()
    btf = btf_builder.blob() if k.with_btf else b""
    tokens, token_index = token_tables()
    # Data layout inside the image (link-time addresses).
    at = {
        "linux_banner": TEXT_LINK + 0x1000,
        "init_uts_ns": TEXT_LINK + 0x1400,
        "swapper_pg_dir": TEXT_LINK + 0x2000,
        "__start_BTF": TEXT_LINK + 0x3000,
        "kallsyms_num_syms": TEXT_LINK + 0x10000,
        "kallsyms_relative_base": TEXT_LINK + 0x10008,
        "kallsyms_token_index": TEXT_LINK + 0x10100,
        "kallsyms_token_table": TEXT_LINK + 0x10400,
        "kallsyms_offsets": TEXT_LINK + 0x11000,
        "kallsyms_names": TEXT_LINK + 0x12000,
    }
    at["__stop_BTF"] = at["__start_BTF"] + len(btf)
    table: list[tuple[int, str, str]] = [
        (0, "A", "__per_cpu_start"),
        (0x1000, "A", "cpu_debug_store"),
        (TEXT_LINK, "T", "_text"),
        (TEXT_LINK, "T", "_stext"),
        (TEXT_LINK + 0x40, "T", "start_kernel"),
        (TEXT_LINK + 0x80, "t", "init_one"),
        (TEXT_LINK + 0x80, "t", "init_one"),  # a duplicated static name: the first one counts
        (TEXT_LINK + 0x90, "t", BIG_NAME),
    ]
    table += [(addr, "D", name) for name, addr in at.items()]
    if not k.with_btf:
        table = [t for t in table if not t[2].endswith("_BTF")]
    if not k.absolute_percpu:  # per-cpu symbols are relocated like the rest then
        table = [t for t in table if t[1] != "A"]
    table.sort(key=lambda t: t[0])
    runtime = [a + k.shift if a >= TEXT_LINK else a for a, _t, _n in table]
    base = TEXT_LINK + k.shift
    if k.absolute_percpu:
        offsets = [a if a < TEXT_LINK else -(a - base + 1) for a in runtime]
        if not all(-(1 << 31) <= o < (1 << 31) for o in offsets):
            raise ValueError("offsets out of int range")
    else:
        base = min(runtime)
        offsets = [a - base for a in runtime]
    names = b"".join(encode_name(t + n) for _a, t, n in table)

    def put(link: int, data: bytes) -> None:
        p = k.paddr(link)
        mem[p : p + len(data)] = data

    put(at["linux_banner"], k.banner.encode() + b"\0")
    uts = b"Linux".ljust(65, b"\0") + b"fake".ljust(65, b"\0") + k.release.encode().ljust(65, b"\0")
    put(at["init_uts_ns"], uts)
    put(at["__start_BTF"], btf)
    put(at["kallsyms_num_syms"], struct.pack("<I", len(table)))
    put(at["kallsyms_relative_base"], struct.pack("<Q", base))
    put(at["kallsyms_token_index"], token_index)
    put(at["kallsyms_token_table"], tokens)
    fmt = "<" + ("i" if k.absolute_percpu else "I") * len(offsets)
    put(at["kallsyms_offsets"], struct.pack(fmt, *offsets))
    put(at["kallsyms_names"], names)
    write_vmcoreinfo(mem, k, at)
    return mem, table


def vmcoreinfo_text(k: FakeKernel, at: dict[str, int]) -> str:
    lines = [
        f"OSRELEASE={k.release}",
        f"BUILD-ID={k.build_id}",
        "PAGESIZE=4096",
        f"SYMBOL(init_uts_ns)={at['init_uts_ns'] + k.shift:016x}",
        "OFFSET(uts_namespace.name)=0",
        f"SYMBOL(swapper_pg_dir)={at['swapper_pg_dir'] + k.shift:016x}",
        f"SYMBOL(_stext)={TEXT_LINK + k.shift:016x}",
    ]
    if k.with_kallsyms_keys:
        for key in (
            "kallsyms_names",
            "kallsyms_num_syms",
            "kallsyms_token_table",
            "kallsyms_token_index",
            "kallsyms_offsets",
            "kallsyms_relative_base",
        ):
            lines.append(f"SYMBOL({key})={at[key] + k.shift:016x}")
    lines += [
        f"NUMBER(phys_base)={k.phys_base}",
        "NUMBER(pgtable_l5_enabled)=0",
        f"KERNELOFFSET={k.shift:x}",
    ]
    lines += [f"{key}={value}" for key, value in k.extra_vmcoreinfo.items()]
    return "\n".join(lines) + "\n"


def write_vmcoreinfo(mem: bytearray, k: FakeKernel, at: dict[str, int]) -> None:
    text = vmcoreinfo_text(k, at).encode() + b"\0"
    mem[k.vmcoreinfo_paddr : k.vmcoreinfo_paddr + len(text)] = text


def expected_symbols(table: list[tuple[int, str, str]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for address, _type, name in table:
        out.setdefault(name, address)
    return out


def map_image(mem: bytearray, k: FakeKernel, root: int) -> None:
    """4-level page tables at ``root`` (three pages) mapping the image's first 2 MiB at its
    runtime address with one large page, as the kernel's own mapping does."""
    vaddr = TEXT_LINK + k.shift
    pdpt, pd = root + 0x1000, root + 0x2000
    entries = (
        (root, (vaddr >> 39) & 511, pdpt | 0x3),
        (pdpt, (vaddr >> 30) & 511, pd | 0x3),
        (pd, (vaddr >> 21) & 511, (k.image_paddr & ~0x1FFFFF) | 0x83),  # present, rw, 2 MiB
    )
    for table, index, entry in entries:
        struct.pack_into("<Q", mem, table + 8 * index, entry)
