"""The guest kernel's VMCOREINFO, found in its physical memory.

The kernel writes the text once at boot (``crash_save_vmcoreinfo_init``, a subsys_initcall in
kernel/vmcore_info.c, kernel/crash_core.c before v6.9) into a page of its own and into the
``vmcoreinfo_note`` ELF note: ``OSRELEASE=``, ``BUILD-ID=``, ``PAGESIZE=``, ``SYMBOL(name)=``
(runtime addresses), ``NUMBER(phys_base)=``, ``KERNELOFFSET=`` (the KASLR shift)... A scan for
``OSRELEASE=`` finds both copies (identical) and any stale copy a previous boot left in free
memory: a candidate counts only if its own ``init_uts_ns`` holds its release. With the vCPU's
page-table root (QMP), only a copy whose ``swapper_pg_dir`` those tables map where the copy says
counts: user space can forge a whole VMCOREINFO and kallsyms in its own pages, not the kernel's
mappings. From memory alone (dumps, no monitor) a forged copy is caught only when it disagrees
with another one (then nothing is guessed).

QEMU's ``-device vmcoreinfo`` tells the host where the note is only inside a
``dump-guest-memory`` core; for a live guest the scan is the way (~0.1-0.4 s per 256 MiB).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from xfgate.errors import MemoryReadError, ProfileError
from xfgate.vmi.kaslr import (
    BANNER_PREFIX,
    START_KERNEL_MAP,
    guest_banner_text,
    parse_vmcoreinfo,
)
from xfgate.vmi.memory import PhysicalMemory
from xfgate.vmi.paging import AddressSpace

MAX_CANDIDATES = 4096  # hits of OSRELEASE= examined: a spray of fakes must not hide the note
MAX_KEPT = 64  # distinct self-consistent kernels kept
VMCOREINFO_MAX = 4096  # VMCOREINFO_BYTES: one page
NEW_UTS_LEN = 65  # include/uapi/linux/utsname.h: struct new_utsname's char arrays
UTS_RELEASE_OFFSET = 2 * NEW_UTS_LEN  # sysname, nodename, then release
REQUIRED = ("OSRELEASE", "PAGESIZE", "KERNELOFFSET", "NUMBER(phys_base)")


def no_profile_hint(memory: PhysicalMemory) -> str:
    """What the operator can supply instead of a profile built from memory."""
    banner = guest_banner_text(memory)
    if banner.startswith(BANNER_PREFIX.decode()):
        release = banner.split()[2]
        return (
            f"the guest shows the banner {banner[:100]!r}: name its kernel package in the "
            f'domains file ([domain.kernel] package = "linux-image-{release}") or pass a '
            "profile/ISF file (--profile)"
        )
    return (
        "no Linux banner either (not a Linux guest, or not booted yet?): name the guest's kernel "
        "package in the domains file ([domain.kernel] package) or pass a profile/ISF file "
        "(--profile)"
    )


@dataclass(frozen=True)
class VmcoreInfo:
    paddr: int  # where this copy of the text was found
    fields: Mapping[str, str]
    release: str
    build_id: str  # "" when the kernel writes none (before v5.9)
    page_size: int
    virt_shift: int  # KERNELOFFSET
    phys_base: int
    symbols: Mapping[str, int]  # SYMBOL(name) lines: runtime virtual addresses
    levels: int  # 4 or 5; 0 when the note does not say (before v4.17)

    def image_paddr(self, vaddr: int) -> int:
        """Physical address of a runtime kernel-image virtual address (the image is
        physically contiguous)."""
        return vaddr - START_KERNEL_MAP + self.phys_base

    @property
    def root(self) -> int:
        """Physical address of the kernel's top-level page table (``swapper_pg_dir``)."""
        pgd = self.symbols.get("swapper_pg_dir") or self.symbols.get("init_top_pgt", 0)
        return self.image_paddr(pgd) if pgd else -1


def parse(paddr: int, text: str) -> VmcoreInfo | None:
    """A VMCOREINFO text's fields, or None when it lacks what locating the kernel needs."""
    fields = parse_vmcoreinfo(text)
    if any(key not in fields for key in REQUIRED):
        return None
    symbols: dict[str, int] = {}
    try:
        for key, value in fields.items():
            if key.startswith("SYMBOL(") and key.endswith(")"):
                symbols[key[7:-1]] = int(value, 16)
        virt_shift = int(fields["KERNELOFFSET"], 16)
        phys_base = int(fields["NUMBER(phys_base)"], 0)
        page_size = int(fields["PAGESIZE"])
    except ValueError:
        return None
    l5 = fields.get("NUMBER(pgtable_l5_enabled)")
    return VmcoreInfo(
        paddr=paddr,
        fields=fields,
        release=fields["OSRELEASE"],
        build_id=fields.get("BUILD-ID", ""),
        page_size=page_size,
        virt_shift=virt_shift,
        phys_base=phys_base,
        symbols=symbols,
        levels={"0": 4, "1": 5}.get(l5 or "", 0),
    )


def _self_consistent(memory: PhysicalMemory, info: VmcoreInfo) -> bool:
    """Its own ``init_uts_ns.name.release`` holds its OSRELEASE (a live kernel's does)."""
    uts = info.symbols.get("init_uts_ns")
    if uts is None:
        return True  # nothing to check against; the banner check after decoding still runs
    try:
        name_off = int(info.fields.get("OFFSET(uts_namespace.name)", "0"))
        raw = memory.read(info.image_paddr(uts) + name_off + UTS_RELEASE_OFFSET, NEW_UTS_LEN)
    except (MemoryReadError, ValueError):
        return False
    return raw.split(b"\0", 1)[0].decode("latin-1") == info.release


def candidates(memory: PhysicalMemory) -> list[VmcoreInfo]:
    """Every usable, self-consistent VMCOREINFO text in guest memory (bounded scan), one per
    distinct kernel (release, build-id, shift, phys_base)."""
    found: dict[tuple[str, str, int, int], VmcoreInfo] = {}
    pos = 0
    for _ in range(MAX_CANDIDATES):
        hit = memory.find(b"OSRELEASE=", pos)
        if hit < 0:
            break
        pos = hit + 1
        try:
            raw = memory.read(hit, min(VMCOREINFO_MAX, memory.size - hit))
        except MemoryReadError:
            continue
        info = parse(hit, raw.split(b"\0", 1)[0].decode("ascii", errors="replace"))
        if info is None or not _self_consistent(memory, info):
            continue
        found.setdefault((info.release, info.build_id, info.virt_shift, info.phys_base), info)
        if len(found) >= MAX_KEPT:
            break
    return list(found.values())


def _mapped_by(memory: PhysicalMemory, info: VmcoreInfo, root: int) -> bool:
    """The page tables at ``root`` (any task's: the kernel half is shared) map this
    candidate's ``swapper_pg_dir`` where the candidate says its image is: it is the live one."""
    pgd = info.symbols.get("swapper_pg_dir") or info.symbols.get("init_top_pgt", 0)
    if not pgd:
        return False
    for levels in (info.levels,) if info.levels else (4, 5):
        try:
            if AddressSpace(memory, root, levels).translate(pgd) == info.image_paddr(pgd):
                return True
        except MemoryReadError:
            continue
    return False


def find_vmcoreinfo(memory: PhysicalMemory, kernel_root: int = -1) -> VmcoreInfo:
    """The running kernel's VMCOREINFO. ``kernel_root``: the vCPU's page-table root (CR3),
    when known, picks the live copy among several boots' copies."""
    found = candidates(memory)
    if kernel_root >= 0:
        # With the vCPU's page tables, a candidate counts only if they map its swapper_pg_dir
        # where it says: user space can write a whole fake VMCOREINFO + tables into its own
        # pages (and spray copies ahead of the real one), but not the kernel's mappings.
        live = [info for info in found if _mapped_by(memory, info, kernel_root)]
        if live:
            return live[0]
        if found:
            raise ProfileError(
                f"no VMCOREINFO in the guest's memory ({memory.name}) is the running kernel's "
                f"(the vCPU's page tables confirm none of {len(found)}): "
                + no_profile_hint(memory),
                symbol="VMCOREINFO",
            )
    if not found:
        raise ProfileError(
            f"no VMCOREINFO in the guest's memory ({memory.name}): the guest is still booting, "
            "is not Linux, or its kernel lacks CONFIG_VMCORE_INFO (CRASH_CORE before 6.9); "
            + no_profile_hint(memory),
            symbol="VMCOREINFO",
        )
    if len(found) == 1:
        return found[0]
    kernels = ", ".join(f"{i.release} shift {i.virt_shift:#x}" for i in found)
    raise ProfileError(
        f"{len(found)} different kernels' VMCOREINFO in the guest's memory ({kernels}), and no "
        "QEMU monitor to tell the running one: configure the domain's [domain.qmp] socket, or "
        "name its kernel package",
        symbol="VMCOREINFO",
    )
