"""What a Debian kernel package's vmlinuz tells us without its -dbg package.

- ``decompress_vmlinuz``: bzImage -> the ELF vmlinux inside (its payload is xz on Debian);
- ``read_elf_section`` / ``read_build_id`` / ``read_linux_banner``: the ``.BTF`` blob, the GNU
  build-id note and the ``linux_banner`` string from that ELF (ELF parsing through pyelftools);
- ``elf_is_static``: whether an ELF executable needs no dynamic loader (the lab's busybox);
- ``kallsyms_symbols``: the symbol table rebuilt from the kernel's own kallsyms tables (via the
  vmlinux-to-elf package), as a dict and as System.map text;
- ``fetch_kernel_package``: download and unpack a ``linux-image-*`` package without installing it.

Nothing here needs the lab; the kernel image is trusted input from a package, but it is still
parsed with bounds so a truncated or foreign file gives a clear ``ProfileError``.
"""

from __future__ import annotations

import bz2
import io
import lzma
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from xfgate.errors import PrerequisiteError, ProfileError

MAX_VMLINUX = 512 << 20  # a decompressed x86-64 vmlinux is ~66 MB
ELF_MAGIC = b"\x7fELF"

if TYPE_CHECKING:
    from elftools.elf.elffile import ELFFile
BANNER_RE = re.compile(rb"Linux version (\S+) \([^\n\x00]{1,400}\n?\x00")
# A concrete Debian kernel image package carries its ABI in its name, in either of Debian 12's
# spellings: linux-image-6.1.0-56-cloud-amd64 (6.1: version-ABI number) and
# linux-image-6.12.117+deb12-rt-amd64 (6.12: full version+suffix), each also as -unsigned.
# Meta-packages (linux-image-amd64, linux-image-6.12-cloud-amd64) name no patch level.
CONCRETE_IMAGE_RE = re.compile(
    r"^linux-image-\d+\.\d+\.\d+(?:-\d+|\+[a-z0-9.~]+)-[a-z0-9-]*[a-z0-9]$"
)

# Magic bytes of the bzImage payload formats; the rest of the magic space is unsupported.
PAYLOAD_MAGICS: tuple[tuple[str, bytes], ...] = (
    ("xz", b"\xfd7zXZ\x00"),
    ("gzip", b"\x1f\x8b"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("lz4", b"\x02\x21\x4c\x18"),
    ("lzo", b"\x89LZO"),
)


def decompress_vmlinuz(path: Path | str, max_size: int = MAX_VMLINUX) -> bytes:
    """The ELF vmlinux inside a bzImage (x86 boot protocol >= 2.08 gives the payload's place).

    An ELF vmlinux is returned as is, so callers can pass either file."""
    path = Path(path)
    try:
        image = path.read_bytes()
    except OSError as e:
        raise ProfileError(f"cannot read kernel image {path}: {e}") from e
    if image[:4] == ELF_MAGIC:
        return image
    payload = _bzimage_payload(image, path)
    fmt = next((name for name, magic in PAYLOAD_MAGICS if payload.startswith(magic)), "")
    vmlinux = _decompress(payload, fmt, max_size, path)
    if vmlinux[:4] != ELF_MAGIC:
        raise ProfileError(f"{path}: the {fmt} payload does not decompress to an ELF vmlinux")
    return vmlinux


def _bzimage_payload(image: bytes, path: Path) -> bytes:
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        raise ProfileError(
            f"{path} is neither an ELF vmlinux nor an x86 bzImage (no 'HdrS' boot header)"
        )
    (version,) = struct.unpack_from("<H", image, 0x206)
    if version < 0x208:
        raise ProfileError(f"{path}: boot protocol {version:#x} < 2.08 has no payload offset")
    setup_sects = image[0x1F1] or 4  # 0 means 4, for historical reasons
    payload_offset, payload_length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    if payload_length == 0 or start + payload_length > len(image):
        raise ProfileError(f"{path}: bzImage payload ({start}+{payload_length}) is truncated")
    return image[start : start + payload_length]


def _decompress(payload: bytes, fmt: str, max_size: int, path: Path) -> bytes:
    too_big = ProfileError(f"{path}: vmlinux decompresses to more than {max_size} bytes")
    try:
        if fmt in ("xz", "lzma"):
            xz = lzma.LZMADecompressor(lzma.FORMAT_XZ if fmt == "xz" else lzma.FORMAT_ALONE)
            out = xz.decompress(payload, max_length=max_size)
            if not xz.eof and not xz.needs_input:
                raise too_big
            return out
        if fmt == "gzip":
            # The kernel appends its size after the stream: decompress only the first member.
            z = zlib.decompressobj(wbits=31)
            out = z.decompress(payload, max_size)
            if z.unconsumed_tail:
                raise too_big
            return out
        if fmt == "bzip2":
            bz = bz2.BZ2Decompressor()
            out = bz.decompress(payload, max_length=max_size)
            if not bz.eof and not bz.needs_input:
                raise too_big
            return out
        if fmt == "lz4":
            return _decompress_lz4_legacy(payload, max_size, path)
        if fmt == "zstd":
            import zstandard

            return bytes(zstandard.ZstdDecompressor().decompress(payload, max_output_size=max_size))
    except (lzma.LZMAError, OSError, zlib.error, EOFError, RuntimeError, ValueError) as e:
        raise ProfileError(f"{path}: corrupt {fmt} payload: {e}") from e
    if fmt:
        raise ProfileError(
            f"{path}: bzImage payload is {fmt}-compressed, which this tool cannot decompress "
            "(supported: xz, lzma, gzip, bzip2, lz4, zstd); pass the ELF vmlinux instead"
        )
    raise ProfileError(f"{path}: unknown bzImage payload format (magic {payload[:6].hex()})")


def _decompress_lz4_legacy(payload: bytes, max_size: int, path: Path) -> bytes:
    """The kernel's lz4 payload: the legacy frame (magic 0x184C2102), 8 MiB blocks, each prefixed
    by its compressed size; the kernel appends the total size, which is not a block."""
    import lz4.block

    block_max = 8 << 20
    out = bytearray()
    pos = 4
    while pos + 4 <= len(payload):
        (size,) = struct.unpack_from("<I", payload, pos)
        if size == 0 or pos + 4 + size > len(payload):
            break
        pos += 4
        out += lz4.block.decompress(payload[pos : pos + size], uncompressed_size=block_max)
        pos += size
        if len(out) > max_size:
            raise ProfileError(f"{path}: vmlinux decompresses to more than {max_size} bytes")
    return bytes(out)


def _elf_errors() -> tuple[type[Exception], ...]:
    """pyelftools' parse errors; pyelftools is imported on first use (0.05 s that `xfgate ps`
    with a cached profile never needs)."""
    from elftools.common.exceptions import ELFError
    from elftools.construct import ConstructError

    return (ELFError, ConstructError, ValueError, IndexError)


def _elf(elf: bytes) -> ELFFile:
    """pyelftools' view of a little-endian ELF64 file held in memory (nothing is copied)."""
    if len(elf) < 64 or elf[:4] != ELF_MAGIC:
        raise ProfileError("not an ELF file")
    if elf[4] != 2 or elf[5] != 1:
        raise ProfileError("only little-endian 64-bit ELF kernels are supported")
    from elftools.elf.elffile import ELFFile

    try:
        return ELFFile(io.BytesIO(elf))
    except _elf_errors() as e:
        raise ProfileError(f"malformed ELF header: {e}") from e


@contextmanager
def _parsing(what: str) -> Iterator[None]:
    """pyelftools' errors on a malformed table become ProfileError."""
    try:
        yield
    except ProfileError:
        raise
    except _elf_errors() as e:
        raise ProfileError(f"ELF {what} is truncated or malformed: {e}") from e


def read_elf_section(elf: bytes, name: str) -> bytes:
    """The bytes of one ELF section, e.g. ``.BTF``."""
    with _parsing("section header table"):
        section = _elf(elf).get_section_by_name(name)
        if section is not None:
            if section["sh_type"] == "SHT_NOBITS":
                raise ProfileError(f"ELF section {name} has no contents in the file")
            if section["sh_offset"] + section["sh_size"] > len(elf):
                raise ProfileError(f"ELF section {name} runs past the end of the file")
            return bytes(section.data())
    hint = " (kernel built without CONFIG_DEBUG_INFO_BTF?)" if name == ".BTF" else ""
    raise ProfileError(f"the vmlinux has no {name} section{hint}")


def read_elf_virtual(elf: bytes, address: int, length: int) -> bytes:
    """``length`` bytes at link-time virtual ``address`` of an ELF vmlinux, through its program
    headers (the initialised data a guest starts from, before KASLR relocates it)."""
    with _parsing("program header table"):
        for segment in _elf(elf).iter_segments():
            vaddr, offset, filesz = segment["p_vaddr"], segment["p_offset"], segment["p_filesz"]
            if vaddr <= address and address + length <= vaddr + filesz:
                start = offset + address - vaddr
                if start + length > len(elf):
                    break
                return elf[start : start + length]
    raise ProfileError(
        f"address {address:#x}+{length} is not in the vmlinux's file-backed segments"
    )


def read_build_id(elf: bytes) -> str:
    """The GNU build-id (hex) from the ELF notes, or "" when the kernel has none."""
    from elftools.elf.sections import NoteSection

    with _parsing("notes"):
        for section in _elf(elf).iter_sections():
            if not isinstance(section, NoteSection):
                continue
            if section["sh_offset"] + section["sh_size"] > len(elf):
                raise ProfileError(f"ELF section {section.name} runs past the end of the file")
            for note in section.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID" and note["n_name"] == "GNU":
                    return str(note["n_desc"])
    return ""


def elf_is_static(data: bytes) -> bool:
    """True for an x86-64 ELF executable without a PT_INTERP program header (no dynamic
    loader); False for anything else, including files that are not ELF."""
    if len(data) < 64 or data[:4] != ELF_MAGIC or data[4] != 2:
        return False
    from elftools.elf.elffile import ELFFile

    try:
        elf = ELFFile(io.BytesIO(data))
        return elf["e_machine"] == "EM_X86_64" and not any(
            segment["p_type"] == "PT_INTERP" for segment in elf.iter_segments()
        )
    except _elf_errors():
        return False


def read_linux_banner(image: bytes, address: int = 0) -> str:
    """The ``linux_banner`` string ("Linux version <release> (...) ...\\n"): read at its symbol's
    link-time ``address`` when given (a vmlinux holds two lookalikes: init/version.c's has the
    build number, "#1 SMP", the other not), else the first banner-shaped string.

    Its exact bytes (without the NUL) are what the guest holds at ``linux_banner``."""
    if address:
        raw = read_elf_virtual(image, address, 512).split(b"\0", 1)[0]
        if not raw.startswith(b"Linux version "):
            raise ProfileError(f"no 'Linux version ...' banner at linux_banner ({address:#x})")
        return raw.decode("utf-8", "replace")
    for match in BANNER_RE.finditer(image):
        text = match.group(0)[:-1].decode("utf-8", "replace")
        if "%" not in text:  # skip printk format strings that look alike
            return text
    raise ProfileError("no 'Linux version ...' banner found in the kernel image")


def banner_release(banner: str) -> str:
    """The release ("6.1.0-56-amd64") out of a banner."""
    parts = banner.split()
    if len(parts) < 3 or parts[:2] != ["Linux", "version"]:
        raise ProfileError(f"not a Linux banner: {banner[:80]!r}")
    return parts[2]


def kallsyms_symbols(vmlinux_or_vmlinuz: bytes) -> dict[str, int]:
    """Every symbol of the kernel's kallsyms table, name -> link-time address (~3 s on a vmlinux).

    Only the first address of a duplicated (static) name is kept, as System.map lookups do."""
    symbols: dict[str, int] = {}
    for address, _type, name in kallsyms_table(vmlinux_or_vmlinuz):
        symbols.setdefault(name, address)
    return symbols


def kallsyms_table(vmlinux_or_vmlinuz: bytes) -> list[tuple[int, str, str]]:
    """(address, nm type letter, name) for every kallsyms entry, in the kernel's order."""
    try:
        from vmlinux_to_elf.core.kallsyms import KallsymsFinder
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise PrerequisiteError(f"vmlinux-to-elf is not installed: {e}") from e
    try:
        finder = KallsymsFinder(vmlinux_or_vmlinuz, 64)
    except Exception as e:  # the library raises bare ValueErrors and asserts on odd images
        raise ProfileError(f"kallsyms tables not found in the kernel image: {e}") from e
    return [
        (address, name[:1], name[1:])
        for address, name in zip(finder.kernel_addresses, finder.symbol_names, strict=True)
    ]


def system_map_text(table: list[tuple[int, str, str]]) -> str:
    """System.map text: ``address type name`` lines sorted by address, as a kernel build has."""
    return "".join(f"{a:016x} {t} {n}\n" for a, t, n in sorted(table))


def parse_system_map(text: str) -> dict[str, int]:
    """A System.map back to name -> address (first address of a duplicated name)."""
    symbols: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            try:
                symbols.setdefault(parts[2], int(parts[0], 16))
            except ValueError:
                continue
    return symbols


def is_concrete_image_package(name: str) -> bool:
    """A kernel image package itself (holds a vmlinuz), not a meta-package naming one; debug
    symbol packages (-dbg) hold no vmlinuz and are not images."""
    return bool(CONCRETE_IMAGE_RE.match(name)) and not name.endswith("-dbg")


def resolve_kernel_package(name: str) -> str:
    """A concrete ``linux-image-<release>`` name: meta packages are resolved through apt."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", name):
        raise ProfileError(f"{name!r} is not a Debian package name")
    if name.endswith("-dbg"):
        raise ProfileError(
            f"{name} holds debug symbols, not a kernel: name the image package "
            f"({name.removesuffix('-dbg')})"
        )
    if is_concrete_image_package(name):
        return name
    try:
        out = _run(["apt-cache", "depends", name], f"look up {name}")
    except ProfileError as e:
        raise ProfileError(
            f"no Debian package named {name!r} (try linux-image-amd64, linux-image-cloud-amd64 "
            f"or a concrete linux-image-<release>; run apt-get update if it should exist): {e}"
        ) from e
    for line in out.splitlines():
        dep = line.strip().removeprefix("|").strip()
        if dep.startswith("Depends:"):
            target = dep.split(":", 1)[1].strip()
            if is_concrete_image_package(target):
                return target
    raise ProfileError(
        f"{name} is not a kernel image package (apt-cache depends names no linux-image-<version>); "
        "try e.g. linux-image-amd64 or linux-image-cloud-amd64"
    )


def fetch_kernel_package(name: str, dest: Path | str) -> Path:
    """Download ``name`` (meta names resolved) and unpack it into ``dest/<package>/tree``.

    Returns ``dest/<package>`` (the lab's asset layout, so both share one download); an
    existing unpacked copy is reused. The package is never installed on this machine."""
    package = resolve_kernel_package(name)
    root = Path(dest) / package
    tree = root / "tree"
    if any(tree.glob("boot/vmlinuz-*")):
        return root
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=root))
    try:
        _run(["apt-get", "download", "-q", package], f"download {package}", cwd=work)
        debs = sorted(work.glob(f"{package}_*.deb"))
        if not debs:
            raise ProfileError(f"apt-get download {package} produced no .deb in {work}")
        _run(["dpkg-deb", "-x", str(debs[0]), str(work / "tree")], f"unpack {debs[0].name}")
        if not any(tree.glob("boot/vmlinuz-*")):  # another process may have won the race
            shutil.rmtree(tree, ignore_errors=True)
            (work / "tree").rename(tree)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return root


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    if shutil.which(cmd[0]) is None:
        raise PrerequisiteError(f"cannot {what}: {cmd[0]} not found (a Debian host is needed)")
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        raise ProfileError(f"cannot {what}: {' '.join(cmd)} timed out") from e
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise ProfileError(
            f"cannot {what}: {' '.join(cmd)} failed: {detail[-1] if detail else done.returncode}"
            + (" (run apt-get update?)" if "Unable to locate" in done.stderr else "")
        )
    return done.stdout


def vmlinuz_in(assets: Path | str) -> Path:
    """The vmlinuz of an unpacked kernel package: ``assets`` itself if a file, else its
    ``vmlinuz`` link (the lab's layout), ``tree/boot/vmlinuz-*`` or ``boot/vmlinuz-*``."""
    assets = Path(assets)
    if assets.is_file():
        return assets
    for pattern in ("vmlinuz", "tree/boot/vmlinuz-*", "boot/vmlinuz-*", "vmlinuz-*"):
        found = sorted(p for p in assets.glob(pattern) if p.is_file())
        if found:
            return found[0]
    raise ProfileError(
        f"no vmlinuz in {assets} (expected vmlinuz, tree/boot/vmlinuz-* or boot/vmlinuz-*)"
    )
