"""Where the guest kernel is: KASLR's virtual shift, the physical base and the page-table root.

Three ways, all checked by reading `linux_banner` through the page tables found:
  0. with a monitor (QMP), first: way 2, then the kernel's own root (`init_top_pgt`) where it
     puts the image, the banner read through that root: the same location as way 1 without
     scanning all guest RAM for the note (0.4-1 s of `xfgate ps` on 256-576 MiB guests);
  1. VMCOREINFO (memory alone, preferred): the kernel's crash-dump note carries KERNELOFFSET,
     phys_base, SYMBOL(swapper_pg_dir) (the kernel's page-table root) and the paging level;
  2. the vCPU's CR3/CR4 over QMP: the first mapped 2 MiB page of the kernel text range is `_text`;
  3. a banner scan (as Volatility 3 does): `linux_banner` found physically, then `init_task`
     beside it gives the virtual shift through `init_task.files == &init_files`.
A guest running another kernel than the profile's is a ProfileMismatch, never garbage.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from xfgate.errors import GuestNotRunning, MemoryReadError, ProfileMismatch, QmpError, WalkError
from xfgate.vmi.memory import PhysicalMemory
from xfgate.vmi.paging import AddressSpace
from xfgate.vmi.profile import Profile
from xfgate.vmi.qmp import ControlRegisters

START_KERNEL_MAP = 0xFFFFFFFF80000000  # __START_KERNEL_map: kernel image virtual base
KERNEL_TEXT_END = 0xFFFFFFFFC0000000  # KERNEL_IMAGE_SIZE is 1 GiB with KASLR
STEP_2M = 1 << 21
MAX_CANDIDATES = 64  # stale copies of notes/banners in free memory: bounded
VMCOREINFO_MAX = 4096
BANNER_PREFIX = b"Linux version "
L5_ENABLED = "__pgtable_l5_enabled"  # arch/x86/kernel/head64.c, with CONFIG_X86_5LEVEL


@dataclass(frozen=True, slots=True)
class KernelLocation:
    virt_shift: int  # runtime virtual address = link-time address + virt_shift
    phys_base: int  # x86-64 phys_base: physical = virtual - __START_KERNEL_map + phys_base
    root: int  # physical address of the kernel's top-level page table
    levels: int  # 4 or 5
    method: str  # "vmcoreinfo", "cr3", "banner-scan"

    def symbol_paddr(self, link_vaddr: int) -> int:
        """Physical address of a kernel-image symbol (the image is physically contiguous)."""
        return link_vaddr + self.virt_shift - START_KERNEL_MAP + self.phys_base


def parse_vmcoreinfo(text: str) -> dict[str, str]:
    """KEY=VALUE lines of a VMCOREINFO note."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out.setdefault(key, value)
    return out


def _iter_finds(memory: PhysicalMemory, needle: bytes, limit: int) -> Iterator[int]:
    pos = 0
    for _ in range(limit):
        hit = memory.find(needle, pos)
        if hit < 0:
            return
        yield hit
        pos = hit + 1


def _read_banner(space: AddressSpace, profile: Profile, shift: int) -> bytes | None:
    want = profile.banner.encode()
    try:
        return space.read(profile.symbol("linux_banner") + shift, len(want))
    except MemoryReadError:
        return None


def _banner_matches(space: AddressSpace, profile: Profile, shift: int) -> bool:
    return _read_banner(space, profile, shift) == profile.banner.encode()


def guest_banner_text(memory: PhysicalMemory) -> str:
    """The first `Linux version ...` line in guest memory, for error messages."""
    hit = memory.find(BANNER_PREFIX)
    if hit < 0:
        return "(no Linux banner found in guest memory)"
    try:
        raw = memory.read(hit, 256)
    except MemoryReadError:
        return "(unreadable banner)"
    return raw.split(b"\n", 1)[0].split(b"\0", 1)[0].decode(errors="replace")


def kernel_paging_levels(
    memory: PhysicalMemory, profile: Profile, paddr_of: int
) -> tuple[int, ...]:
    """Paging levels to try, from the guest kernel's own `__pgtable_l5_enabled` (an int set at
    boot when CR4.LA57 is on), read physically at ``paddr_of`` - the physical address the
    caller computed for that symbol - so no page-table guess is involved. Without the symbol
    or a sane value (0 or 1): both, 4 first (a 5-level root read as 4-level does not reach
    the banner, so the banner check still decides)."""
    if paddr_of < 0:
        return (4, 5)
    try:
        value = struct.unpack("<I", memory.read(paddr_of, 4))[0]
    except MemoryReadError:
        return (4, 5)
    return {0: (4,), 1: (5,)}.get(value, (4, 5))


def _l5_paddr(profile: Profile, shift: int, phys_base: int) -> int:
    if not profile.has_symbol(L5_ENABLED):
        return -1
    return profile.symbol(L5_ENABLED) + shift - START_KERNEL_MAP + phys_base


def from_vmcoreinfo(
    memory: PhysicalMemory, profile: Profile, prefer_root: int = -1
) -> KernelLocation | None:
    """Location from the VMCOREINFO note; None when there is no usable note."""
    release_mismatch = ""
    found: list[KernelLocation] = []
    for hit in _iter_finds(memory, b"OSRELEASE=", MAX_CANDIDATES):
        try:
            raw = memory.read(hit, min(VMCOREINFO_MAX, memory.size - hit))
        except MemoryReadError:
            continue
        info = parse_vmcoreinfo(raw.split(b"\0", 1)[0].decode("ascii", errors="replace"))
        try:
            shift = int(info["KERNELOFFSET"], 16)
            phys_base = int(info["NUMBER(phys_base)"])
            pgd = int(info["SYMBOL(swapper_pg_dir)"], 16)
        except (KeyError, ValueError):
            continue
        if info.get("OSRELEASE") != profile.release:
            release_mismatch = info.get("OSRELEASE", "")
            continue
        note_l5 = info.get("NUMBER(pgtable_l5_enabled)")
        if note_l5 in ("0", "1"):
            candidates: tuple[int, ...] = (5,) if note_l5 == "1" else (4,)
        else:  # older kernels' notes lack the number: ask the kernel's variable
            candidates = kernel_paging_levels(memory, profile, _l5_paddr(profile, shift, phys_base))
        root = pgd - START_KERNEL_MAP + phys_base
        for levels in candidates:
            loc = KernelLocation(shift, phys_base, root, levels, "vmcoreinfo")
            if _banner_matches(AddressSpace(memory, loc.root, levels), profile, shift):
                if loc.root == prefer_root:
                    return loc
                found.append(loc)
                break
    if found:
        return found[0]
    if release_mismatch:
        raise ProfileMismatch(profile.release, release_mismatch)
    return None


def from_cr3(memory: PhysicalMemory, profile: Profile, regs: ControlRegisters) -> KernelLocation:
    """Location from the vCPU's page tables: the first mapped 2 MiB page of the kernel image
    range is `_text`."""
    levels = 5 if regs.la57 else 4
    text_link = profile.symbol("_text")
    for root in (regs.kernel_root, regs.cr3 & 0x000FFFFFFFFFF000):
        space = AddressSpace(memory, root, levels)
        for vaddr in range(START_KERNEL_MAP, KERNEL_TEXT_END, STEP_2M):
            try:
                paddr = space.translate(vaddr)
            except MemoryReadError:
                continue
            shift = vaddr - text_link
            phys_base = paddr - (vaddr - START_KERNEL_MAP)
            found = _read_banner(space, profile, shift)
            if found == profile.banner.encode():
                return KernelLocation(shift, phys_base, root, levels, "cr3")
            if found is not None and found.startswith(BANNER_PREFIX):
                # Same symbol address holds another banner: the guest runs another build.
                text = space.read_cstring(profile.symbol("linux_banner") + shift, 512)
                raise ProfileMismatch(profile.banner, text.decode(errors="replace"))
            break
    raise ProfileMismatch(profile.banner.strip(), guest_banner_text(memory))


def from_cr3_kernel_root(
    memory: PhysicalMemory, profile: Profile, regs: ControlRegisters
) -> KernelLocation | None:
    """from_cr3, then the kernel's own page-table root (`init_top_pgt`, which VMCOREINFO calls
    swapper_pg_dir) where that location puts it, checked by reading the banner through it; None
    if any step fails (the callers then scan memory for VMCOREINFO). The vCPU's CR3 is mostly
    a user process's tables, freed when it exits: never kept as the root. A few reads and one
    QMP round trip instead of a scan of all guest RAM (0.4-1 s for 256-576 MiB)."""
    try:
        via = from_cr3(memory, profile, regs)
    except (ProfileMismatch, MemoryReadError):
        return None
    for name in ("init_top_pgt", "swapper_pg_dir"):
        if profile.has_symbol(name):
            root = profile.symbol(name) + via.virt_shift - START_KERNEL_MAP + via.phys_base
            break
    else:
        return None
    if not 0 <= root < memory.size:
        return None
    if not _banner_matches(AddressSpace(memory, root, via.levels), profile, via.virt_shift):
        return None
    return KernelLocation(via.virt_shift, via.phys_base, root, via.levels, "cr3")


def from_banner_scan(memory: PhysicalMemory, profile: Profile) -> KernelLocation | None:
    """Location from `linux_banner` found in physical memory and `init_task` next to it."""
    banner_link = profile.symbol("linux_banner")
    init_task_link = profile.symbol("init_task")
    files_off = profile.offset("task_struct", "files")
    pid_off = profile.offset("task_struct", "pid")
    comm_off = profile.offset("task_struct", "comm")
    init_files = profile.symbol("init_files")
    top_pgt = profile.symbol("init_top_pgt")
    for hit in _iter_finds(memory, profile.banner.encode(), MAX_CANDIDATES):
        task = hit + (init_task_link - banner_link)
        try:
            pid = struct.unpack("<i", memory.read(task + pid_off, 4))[0]
            comm = memory.read(task + comm_off, 16)
            files = struct.unpack("<Q", memory.read(task + files_off, 8))[0]
        except MemoryReadError:
            continue
        if pid != 0 or not comm.startswith(b"swapper"):
            continue
        shift = files - init_files
        if shift % STEP_2M:
            continue
        phys_base = hit - (banner_link + shift - START_KERNEL_MAP)
        root = top_pgt + shift - START_KERNEL_MAP + phys_base
        for levels in kernel_paging_levels(memory, profile, _l5_paddr(profile, shift, phys_base)):
            if _banner_matches(AddressSpace(memory, root, levels), profile, shift):
                return KernelLocation(shift, phys_base, root, levels, "banner-scan")
    return None


class KernelLocator:
    """Finds the kernel once, re-checks it cheaply, re-finds it after a guest reboot.

    `generation` grows whenever the location changes (new boot, new KASLR shift): anything
    cached about the guest (owners, sockets) is invalid then.
    """

    def __init__(
        self,
        memory: PhysicalMemory,
        profile: Profile,
        registers: Callable[[], ControlRegisters] | None = None,
    ) -> None:
        self.memory = memory
        self.profile = profile
        self.registers = registers
        self.location: KernelLocation | None = None
        self.generation = 0

    def locate(self) -> KernelLocation:
        regs = self._registers()
        loc = from_cr3_kernel_root(self.memory, self.profile, regs) if regs is not None else None
        if loc is None:
            loc = from_vmcoreinfo(
                self.memory, self.profile, regs.kernel_root if regs is not None else -1
            )
        if loc is None and regs is not None:
            loc = from_cr3(self.memory, self.profile, regs)
        if loc is None:
            loc = from_banner_scan(self.memory, self.profile)
        if loc is None:
            found = guest_banner_text(self.memory)
            if not found.startswith("(") and found != self.profile.banner.strip():
                raise ProfileMismatch(self.profile.banner.strip(), found)
            raise WalkError(
                "kernel location",
                "no VMCOREINFO note, no usable CR3 and no linux_banner/init_task pair found: "
                "is the guest booted (and is this the right memory file)?",
            )
        if loc != self.location:
            self.location = loc
            self.generation += 1
        return loc

    def _registers(self) -> ControlRegisters | None:
        if self.registers is None:
            return None
        try:
            return self.registers()
        except (QmpError, GuestNotRunning, OSError):  # no monitor: memory alone will do
            return None

    def current(self) -> KernelLocation:
        return self.location if self.location is not None else self.locate()

    def still_valid(self) -> bool:
        """The banner still reads right at the known location (cheap: one read)."""
        if self.location is None:
            return False
        space = AddressSpace(self.memory, self.location.root, self.location.levels)
        return _banner_matches(space, self.profile, self.location.virt_shift)

    def revalidate(self) -> KernelLocation:
        """The current location, re-found if the banner no longer reads (guest rebooted)."""
        if self.still_valid():
            assert self.location is not None
            return self.location
        return self.locate()


_RELEASE_RE = re.compile(r"Linux version (\S+)")


def banner_release(banner: str) -> str:
    m = _RELEASE_RE.search(banner)
    return m.group(1) if m else ""
