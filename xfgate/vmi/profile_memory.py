"""A kernel profile from a running guest's memory alone: no package, no file from the guest.

1. VMCOREINFO (``vmcoreinfo``): release, build-id, KASLR shift, phys_base, and where the kallsyms
   tables are (``SYMBOL(kallsyms_*)``, v6.0+);
2. the kallsyms tables (``kallsyms``): every symbol, as System.map has them;
3. the kernel's BTF, the bytes between ``__start_BTF`` and ``__stop_BTF`` (CONFIG_DEBUG_INFO_BTF);
4. ``linux_banner``; then the same ISF -> Profile path the package build takes
   (``isf.isf_from_btf``), so both builds give equal profiles.

Cached in ``<cache dir>/profiles/`` as ``<release>-mem-<sha256(release, build-id)[:16]>.*``,
with ``.sources.json`` listing the guest bytes it was built from (kallsyms tables, BTF, banner)
and their sha256: a later contact costs the VMCOREINFO scan, a hash of those ~8 MB and a load,
and a guest whose bytes differ (another build claiming the same release and build-id: a hostile
kernel poisoning the cache for its neighbours) gets its own build, never the cached one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from pathlib import Path

from xfgate.config import DEFAULT_CACHE_DIR, DomainConfig
from xfgate.errors import GuestNotRunning, MemoryReadError, ProfileError, ProfileMismatch, QmpError
from xfgate.vmi import isf, kallsyms, kernel_image
from xfgate.vmi.btf import parse_btf
from xfgate.vmi.memory import PhysicalMemory, open_domain_memory
from xfgate.vmi.monitor import open_monitor
from xfgate.vmi.profile import Profile
from xfgate.vmi.profile_build import (
    BUILDER_VERSION,
    WELL_KNOWN_SYMBOL_TYPES,
    ProfileBuild,
    load_profile,
    profiles_dir,
    save_profile,
)
from xfgate.vmi.vmcoreinfo import VmcoreInfo, find_vmcoreinfo, no_profile_hint

log = logging.getLogger(__name__)

MAX_BTF = 64 << 20  # a Debian kernel's BTF is ~5 MB
BANNER_MAX = 512
MAX_EXTENTS = 16
MAX_SOURCE_BYTES = 256 << 20
# Runtime addresses VMCOREINFO states and kallsyms also lists: they decide the addressing mode.
ANCHORS = ("swapper_pg_dir", "init_uts_ns", "_stext", "init_top_pgt", "node_online_map")


def memory_profile_key(info: VmcoreInfo) -> str:
    digest = hashlib.sha256(f"{info.release}\n{info.build_id}".encode()).hexdigest()[:16]
    return f"{info.release}-mem-{digest}"


def _image_reader(memory: PhysicalMemory, info: VmcoreInfo) -> kallsyms.ImageReader:
    def read(vaddr: int, length: int) -> bytes:
        return memory.read(info.image_paddr(vaddr), length)

    return read


def read_guest_banner(memory: PhysicalMemory, info: VmcoreInfo, link_address: int) -> str:
    """``linux_banner`` as the guest holds it (link-time ``link_address``)."""
    try:
        raw = memory.read(info.image_paddr(link_address + info.virt_shift), BANNER_MAX)
    except MemoryReadError as e:
        raise ProfileError(
            f"cannot read linux_banner from guest memory: {e}", "linux_banner"
        ) from e
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def check_banner(info: VmcoreInfo, banner: str) -> None:
    """The banner must name VMCOREINFO's release: otherwise the tables are another kernel's."""
    if not banner.startswith(f"Linux version {info.release} "):
        raise ProfileMismatch(f"Linux version {info.release} ...", banner[:120] or "(empty)")


def read_btf(memory: PhysicalMemory, info: VmcoreInfo, symbols: dict[str, int]) -> bytes:
    start, stop = symbols.get("__start_BTF"), symbols.get("__stop_BTF")
    if start is None or stop is None:
        raise ProfileError(
            f"the guest kernel {info.release} has no BTF (no __start_BTF/__stop_BTF in its "
            "kallsyms: built without CONFIG_DEBUG_INFO_BTF); "
            f"name its kernel package (linux-image-{info.release}) or pass an ISF (--profile)",
            symbol="__start_BTF",
        )
    if not 0 < stop - start <= MAX_BTF:
        raise ProfileError(f"the guest's BTF is {stop - start} bytes: not a BTF blob", "BTF")
    try:
        return memory.read(info.image_paddr(start + info.virt_shift), stop - start)
    except MemoryReadError as e:
        raise ProfileError(f"cannot read the guest's BTF: {e}", "BTF") from e


def _paths(key: str, cache: Path) -> tuple[Path, Path, Path]:
    out = profiles_dir(cache)
    return (out / f"{key}.json", out / f"{key}.isf.json.xz", out / f"{key}.System.map")


def _sources_path(profile_path: Path) -> Path:
    return profile_path.with_name(profile_path.name.removesuffix(".json") + ".sources.json")


def content_digest(memory: PhysicalMemory, info: VmcoreInfo, extents: list[tuple[int, int]]) -> str:
    """sha256 of the guest bytes a profile was built from (link-time extents: kallsyms
    tables, BTF, banner), read at this boot's addresses."""
    if len(extents) > MAX_EXTENTS or sum(n for _a, n in extents) > MAX_SOURCE_BYTES:
        raise ProfileError("a cached profile's source list is too large", "cache")
    digest = hashlib.sha256()
    base = info.symbols.get("kallsyms_relative_base")
    if base is not None:  # relocated by KASLR: compared at its link-time value
        try:
            (value,) = struct.unpack("<Q", memory.read(info.image_paddr(base), 8))
        except MemoryReadError as e:
            raise ProfileError(f"cannot re-read kallsyms_relative_base: {e}", "cache") from e
        digest.update(struct.pack("<Q", (value - info.virt_shift) & ((1 << 64) - 1)))
    for link, length in extents:
        try:
            digest.update(memory.read(info.image_paddr(link + info.virt_shift), length))
        except MemoryReadError as e:
            raise ProfileError(f"cannot re-read the profile's sources: {e}", "cache") from e
    return digest.hexdigest()


def _cached(
    memory: PhysicalMemory, info: VmcoreInfo, paths: tuple[Path, Path, Path]
) -> Profile | None:
    """The cached build of this kernel, only if this guest holds the very bytes it was built
    from: a cache entry another guest (a hostile kernel) made under the same release and
    build-id is never used for this one."""
    sources = _sources_path(paths[0])
    if not all(p.exists() for p in (*paths, sources)):
        return None
    try:
        recorded = json.loads(sources.read_text())
        extents = [(int(a), int(n)) for a, n in recorded["extents"]]
        if content_digest(memory, info, extents) != recorded["sha256"]:
            log.warning("cached profile %s was built from other bytes: rebuilding", paths[0].name)
            return None
        return load_profile(paths[0])
    except (OSError, ValueError, KeyError, TypeError, ProfileError) as e:
        log.info("cached memory profile %s not usable (%s): rebuilding", paths[0].name, e)
        return None


def build_memory_profile(
    memory: PhysicalMemory,
    cache: Path = DEFAULT_CACHE_DIR,
    kernel_root: int = -1,
    rebuild: bool = False,
) -> ProfileBuild:
    """The profile of the kernel running in ``memory``, built once per kernel build then
    cached. ``kernel_root``: the vCPU's kernel page-table root when a monitor gives it."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    info = find_vmcoreinfo(memory, kernel_root)
    t1 = time.perf_counter()
    timings["vmcoreinfo"] = t1 - t0
    key = memory_profile_key(info)
    paths = _paths(key, cache)
    if not rebuild and info.build_id:
        profile = _cached(memory, info, paths)
        if profile is not None:
            timings["load"] = time.perf_counter() - t1
            return ProfileBuild(profile, *paths, from_cache=True, timings=timings)
    try:
        tables = kallsyms.KallsymsTables.from_symbols(info.symbols)
    except ProfileError as e:
        raise ProfileError(f"{e}; {no_profile_hint(memory)}", e.symbol) from e
    anchors = {k: info.symbols[k] for k in ANCHORS if k in info.symbols}
    decoded = kallsyms.decode(_image_reader(memory, info), tables, info.virt_shift, anchors)
    table = decoded.table
    t2 = time.perf_counter()
    symbols: dict[str, int] = {}
    for address, _type, name in table:
        symbols.setdefault(name, address)
    if "linux_banner" not in symbols:
        raise ProfileError("the guest's kallsyms has no linux_banner", "linux_banner")
    banner = read_guest_banner(memory, info, symbols["linux_banner"])
    check_banner(info, banner)
    blob = read_btf(memory, info, symbols)
    btf = parse_btf(blob)
    sources = None
    if decoded.extents is not None:
        extents = [(a - info.virt_shift, n) for a, n in decoded.extents]
        extents.append((symbols["__start_BTF"], len(blob)))
        extents.append((symbols["linux_banner"], len(banner.encode()) + 1))
        sources = {"extents": extents, "sha256": content_digest(memory, info, extents)}
    t3 = time.perf_counter()
    source = {"name": f"guest memory ({memory.name})", "build_id": info.build_id}
    doc = isf.isf_from_btf(btf, symbols, banner, WELL_KNOWN_SYMBOL_TYPES, source)
    profile = isf.profile_from_isf(doc)
    t4 = time.perf_counter()
    timings.update(kallsyms=t2 - t1, btf=t3 - t2, isf=t4 - t3)
    # xz preset 0: a first contact waits for this write (~2 s, 1.9 MB, vs ~15 s at 6).
    isf_bytes = isf.write_isf(doc, paths[1], preset=0)
    paths[2].write_text(kernel_image.system_map_text(table))
    if sources is not None:  # without it the build is never reused
        _sources_path(paths[0]).write_text(json.dumps(sources))
    else:
        _sources_path(paths[0]).unlink(missing_ok=True)
    save_profile(profile, paths[0])  # last: its presence marks a complete build
    timings["write"] = time.perf_counter() - t4
    log.info(
        "built profile %s from guest memory in %.1f s (builder %d)",
        key,
        time.perf_counter() - t0,
        BUILDER_VERSION,
    )
    return ProfileBuild(profile, *paths, from_cache=False, timings=timings, isf_bytes=isf_bytes)


def _kernel_root(domain: DomainConfig) -> int:
    """The vCPU's kernel page-table root through the domain's monitor, -1 without one."""
    if domain.qmp is None and domain.libvirt is None:
        return -1
    try:
        with open_monitor(domain) as monitor:
            return monitor.control_registers().kernel_root
    except (QmpError, GuestNotRunning, OSError) as e:
        log.info("domain %s: no control registers (%s): memory alone will do", domain.id, e)
        return -1


def domain_memory_profile(
    domain: DomainConfig, cache: Path = DEFAULT_CACHE_DIR, rebuild: bool = False
) -> ProfileBuild:
    """The profile of the kernel a configured domain runs, from its memory (cached)."""
    memory = open_domain_memory(domain)
    try:
        try:
            return build_memory_profile(memory, cache, _kernel_root(domain), rebuild)
        except ProfileMismatch:
            raise
        except ProfileError as e:
            raise ProfileError(f"domain {domain.id}: {e}", e.symbol) from e
    finally:
        memory.close()
