"""ELF reading of kernel_image on hand-assembled ELF files (sections, notes, program headers),
beside the host's own binaries as real inputs; the real vmlinux is in test_profile_real."""

from __future__ import annotations

import contextlib
import shutil
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from xfgate.errors import ProfileError
from xfgate.vmi import kernel_image

SHT_PROGBITS, SHT_STRTAB, SHT_NOTE, SHT_NOBITS = 1, 3, 7, 8
PT_LOAD, PT_INTERP = 1, 3
EM_X86_64 = 62
BUILD_ID = bytes(range(20))


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)

    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def build_elf(
    sections: list[tuple[str, int, bytes]],
    segments: Sequence[tuple[int, int, bytes]] = (),
    etype: int = 2,
) -> bytes:
    """ELF64 LE: the given (name, type, data) sections (plus .shstrtab) and (p_type, vaddr,
    data) program headers, laid out after the headers."""
    names = b"\0"
    name_offsets = []
    for name, _, _ in [*sections, (".shstrtab", SHT_STRTAB, b"")]:
        name_offsets.append(len(names))
        names += name.encode() + b"\0"
    all_sections = [*sections, (".shstrtab", SHT_STRTAB, names)]
    phoff = 64
    body_off = phoff + 56 * len(segments)
    body = bytearray()
    seg_places = []
    for _, _, data in segments:
        seg_places.append(body_off + len(body))
        body += data
    sec_places = []
    for _, stype, data in all_sections:
        sec_places.append(body_off + len(body))
        if stype != SHT_NOBITS:
            body += data
    shoff = body_off + len(body)
    out = bytearray(64)
    out[0:4] = b"\x7fELF"
    out[4], out[5], out[6] = 2, 1, 1
    struct.pack_into(
        "<HHIQQQIHHHHHH",
        out,
        16,
        etype,
        EM_X86_64,
        1,
        0,
        phoff if segments else 0,
        shoff,
        0,
        64,
        56,
        len(segments),
        64,
        len(all_sections) + 1,
        len(all_sections),
    )
    for (ptype, vaddr, data), place in zip(segments, seg_places, strict=True):
        out += struct.pack("<IIQQQQQQ", ptype, 5, place, vaddr, vaddr, len(data), len(data), 1)
    out += body
    out += bytes(64)  # section 0
    for (_, stype, data), place, name_off in zip(
        all_sections, sec_places, name_offsets, strict=True
    ):
        out += struct.pack("<IIQQQQIIQQ", name_off, stype, 0, 0, place, len(data), 0, 0, 1, 0)
    return bytes(out)


def kernel_like() -> bytes:
    return build_elf(
        [
            (".text", SHT_PROGBITS, b"\x90" * 16),
            (".BTF", SHT_PROGBITS, b"\x9f\xeb\x01\x00btf-blob"),
            (".note.gnu.build-id", SHT_NOTE, _note(b"GNU", 3, BUILD_ID)),
            (".bss", SHT_NOBITS, bytes(32)),
        ],
        [(PT_LOAD, 0xFFFFFFFF81000000, b"Linux version 6.1.0-x (b@h) #1 SMP\n\0" + bytes(600))],
    )


def test_sections_notes_and_virtual_reads() -> None:
    elf = kernel_like()
    assert kernel_image.read_elf_section(elf, ".BTF") == b"\x9f\xeb\x01\x00btf-blob"
    with pytest.raises(ProfileError, match="no contents"):
        kernel_image.read_elf_section(elf, ".bss")
    with pytest.raises(ProfileError, match=r"no \.nosuch section"):
        kernel_image.read_elf_section(elf, ".nosuch")
    assert kernel_image.read_build_id(elf) == BUILD_ID.hex()
    base = 0xFFFFFFFF81000000
    assert kernel_image.read_elf_virtual(elf, base + 6, 7) == b"version"
    with pytest.raises(ProfileError, match="not in the vmlinux's file-backed segments"):
        kernel_image.read_elf_virtual(elf, base + 600, 64)
    banner = kernel_image.read_linux_banner(elf, base)
    assert banner == "Linux version 6.1.0-x (b@h) #1 SMP\n"


def test_no_build_id_and_other_notes() -> None:
    elf = build_elf([(".note.other", SHT_NOTE, _note(b"Xen", 3, b"abcd"))])
    assert kernel_image.read_build_id(elf) == ""


def test_malformed_elf_is_a_profile_error_never_a_crash() -> None:
    elf = kernel_like()
    with pytest.raises(ProfileError, match="not an ELF"):
        kernel_image.read_elf_section(b"MZ" + elf[2:], ".BTF")
    with pytest.raises(ProfileError, match="little-endian 64-bit"):
        kernel_image.read_elf_section(elf[:4] + b"\x01" + elf[5:], ".BTF")
    for cut in (100, len(elf) // 2, len(elf) - 70, len(elf) - 1):
        for call in (
            lambda e: kernel_image.read_elf_section(e, ".BTF"),
            lambda e: kernel_image.read_build_id(e),
            lambda e: kernel_image.read_elf_virtual(e, 0xFFFFFFFF81000000, 4),
        ):
            with contextlib.suppress(ProfileError):  # a clear error; anything else fails
                call(elf[:cut])


def test_elf_is_static_on_synthetic_files() -> None:
    static = build_elf([(".text", SHT_PROGBITS, b"\x90")], [(PT_LOAD, 0x400000, b"\x90" * 8)])
    dynamic = build_elf(
        [(".text", SHT_PROGBITS, b"\x90")],
        [(PT_INTERP, 0x400000, b"/lib64/ld-linux-x86-64.so.2\0"), (PT_LOAD, 0x400000, b"\x90")],
    )
    assert kernel_image.elf_is_static(static)
    assert not kernel_image.elf_is_static(dynamic)
    assert not kernel_image.elf_is_static(b"#!/bin/sh\n" * 10)
    assert not kernel_image.elf_is_static(static[:4] + b"\x01" + static[5:])  # 32-bit
    assert not kernel_image.elf_is_static(dynamic[:80])  # program headers cut off


@pytest.mark.skipif(shutil.which("file") is None, reason="needs file(1) as the oracle")
def test_elf_is_static_on_the_hosts_binaries() -> None:
    candidates = [Path(p) for p in (shutil.which("busybox"), "/bin/ls", "/bin/sh") if p]
    checked = 0
    for path in candidates:
        path = path.resolve()
        if not path.is_file():
            continue
        described = subprocess.run(
            ["file", "-b", str(path)], capture_output=True, text=True, timeout=10
        ).stdout
        if "ELF 64-bit" not in described or "x86-64" not in described:
            continue
        expected = "statically linked" in described or "static-pie" in described
        assert kernel_image.elf_is_static(path.read_bytes()) == expected, (path, described)
        checked += 1
    assert checked >= 2  # /bin/ls and /bin/sh at least
