"""Build, cache and load kernel profiles from BTF (layouts) + kallsyms (symbols), no -dbg package.

A build decompresses the vmlinuz (~1 s), parses its ``.BTF`` (~0.6 s), rebuilds its symbols from
kallsyms (~3 s), exports the whole thing as a Volatility ISF and derives the Profile from that
ISF (the same import path a dwarf2json ISF takes). It then caches, per kernel build, in
``<cache dir>/profiles/``::

    <release>-<sha256 of the vmlinuz, 16 hex>.json        compact profile, loads in ~0.2 s
    <release>-<sha256 of the vmlinuz, 16 hex>.isf.json.xz  Volatility 3 ISF (~1 MB)
    <release>-<sha256 of the vmlinuz, 16 hex>.System.map   symbols, as the -dbg package has them

The key comes from the vmlinuz file itself (the release from its boot header), so finding a
cached profile costs a hash of ~8 MB, not a decompression.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xfgate.config import DEFAULT_CACHE_DIR, DomainConfig
from xfgate.errors import ProfileError
from xfgate.vmi import isf, kernel_image, profile_compact
from xfgate.vmi.btf import parse_btf
from xfgate.vmi.profile import Member, Profile, StructLayout

log = logging.getLogger(__name__)

PROFILE_FORMAT = "xfgate-profile-1"
# Bumped whenever a build would produce different content: older cached builds are redone.
BUILDER_VERSION = 3

# BTF names no type for global variables; these are the ones introspection and Volatility use.
WELL_KNOWN_SYMBOL_TYPES: Mapping[str, str] = {
    "init_task": "task_struct",
    "init_files": "files_struct",
    "init_fs": "fs_struct",
    "init_mm": "mm_struct",
    "init_cred": "cred",
    "init_nsproxy": "nsproxy",
    "init_net": "net",
    "init_pid_ns": "pid_namespace",
    "init_user_ns": "user_namespace",
    "init_uts_ns": "uts_namespace",
    "init_ipc_ns": "ipc_namespace",
    "tcp_hashinfo": "inet_hashinfo",
    "udp_table": "udp_table",
    "udplite_table": "udp_table",
    "raw_v4_hashinfo": "raw_hashinfo",
    "raw_v6_hashinfo": "raw_hashinfo",
    "modules": "list_head",
    "net_namespace_list": "list_head",
    "super_blocks": "list_head",
    # Volatility's linux.sockstat/lsof recognise socket files by these (object_from_symbol).
    "socket_file_ops": "file_operations",
    "sockfs_dentry_operations": "dentry_operations",
}


@dataclass(frozen=True)
class ProfileBuild:
    """What ``build_profile_files`` produced, and how long each step took (seconds)."""

    profile: Profile
    profile_path: Path
    isf_path: Path
    system_map_path: Path
    from_cache: bool
    timings: Mapping[str, float] = field(default_factory=dict)
    isf_bytes: int = 0


def profiles_dir(cache: Path = DEFAULT_CACHE_DIR) -> Path:
    return cache / "profiles"


def bzimage_release(vmlinuz: Path) -> str:
    """The release from a bzImage's boot header (``kernel_version``), without decompressing."""
    try:
        with vmlinuz.open("rb") as f:
            head = f.read(0x8000)
    except OSError as e:
        raise ProfileError(f"cannot read kernel image {vmlinuz}: {e}") from e
    if head[0x202:0x206] == b"HdrS" and len(head) >= 0x210:
        (pointer,) = struct.unpack_from("<H", head, 0x20E)
        start = pointer + 0x200
        if pointer and start < len(head):
            release = head[start : start + 128].split(b" ", 1)[0].split(b"\0", 1)[0]
            if release:
                return release.decode("ascii", "replace")
    name = vmlinuz.name  # an ELF vmlinux: fall back on Debian's file name
    return name.removeprefix("vmlinuz-").removeprefix("vmlinux-") or "unknown"


def profile_key(vmlinuz: Path) -> str:
    """``<release>-<sha256[:16]>`` of a kernel image file: the cache key of its profile."""
    digest = hashlib.sha256()
    try:
        with vmlinuz.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as e:
        raise ProfileError(f"cannot read kernel image {vmlinuz}: {e}") from e
    return f"{bzimage_release(vmlinuz)}-{digest.hexdigest()[:16]}"


def build_profile(
    source: Path | str, cache: Path = DEFAULT_CACHE_DIR, rebuild: bool = False
) -> Profile:
    """The profile of a kernel: ``source`` is a vmlinuz, an ELF vmlinux or an unpacked kernel
    package; loaded from the cache when it was built before."""
    return build_profile_files(source, cache, rebuild).profile


def build_profile_files(
    source: Path | str, cache: Path = DEFAULT_CACHE_DIR, rebuild: bool = False
) -> ProfileBuild:
    vmlinuz = kernel_image.vmlinuz_in(source)
    key = profile_key(vmlinuz)
    out = profiles_dir(cache)
    paths = (out / f"{key}.json", out / f"{key}.isf.json.xz", out / f"{key}.System.map")
    if not rebuild and all(p.exists() for p in paths):
        t0 = time.perf_counter()
        try:
            doc = profile_compact.read_profile_json(paths[0], PROFILE_FORMAT)
            if doc.get("builder") == BUILDER_VERSION:
                return ProfileBuild(
                    profile_from_dict(doc),
                    *paths,
                    from_cache=True,
                    timings={"load": time.perf_counter() - t0},
                )
        except ProfileError:
            pass  # a corrupt or foreign cache entry is rebuilt, not an error
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    vmlinux = kernel_image.decompress_vmlinuz(vmlinuz)
    t1 = time.perf_counter()
    btf = parse_btf(kernel_image.read_elf_section(vmlinux, ".BTF"))
    t2 = time.perf_counter()
    table = kernel_image.kallsyms_table(vmlinux)
    t3 = time.perf_counter()
    symbols: dict[str, int] = {}
    for address, _type, name in table:
        symbols.setdefault(name, address)
    banner = kernel_image.read_linux_banner(vmlinux, symbols.get("linux_banner", 0))
    source_info = {"name": vmlinuz.name, "sha256": key.rsplit("-", 1)[1]}
    doc = isf.isf_from_btf(btf, symbols, banner, WELL_KNOWN_SYMBOL_TYPES, source_info)
    profile = isf.profile_from_isf(doc)
    t4 = time.perf_counter()
    timings.update(decompress=t1 - t0, btf=t2 - t1, kallsyms=t3 - t2, isf=t4 - t3)
    isf_bytes = isf.write_isf(doc, paths[1])
    paths[2].write_text(kernel_image.system_map_text(table))
    save_profile(profile, paths[0])  # written last: its presence marks a complete build
    return ProfileBuild(profile, *paths, from_cache=False, timings=timings, isf_bytes=isf_bytes)


def profile_to_dict(profile: Profile) -> dict[str, Any]:
    """The compact cache form: members as lists, in struct order."""
    return {
        "format": PROFILE_FORMAT,
        "builder": BUILDER_VERSION,
        "release": profile.release,
        "banner": profile.banner,
        "symbol_types": dict(profile.symbol_types),
        "structs": {
            name: [
                layout.size,
                [
                    [m_name, m.offset, m.type_name, m.size, m.bit_offset, m.bit_size]
                    for m_name, m in layout.members.items()
                ],
            ]
            for name, layout in profile.structs.items()
        },
        "symbols": dict(profile.symbols),
    }


class LazyStructs(Mapping[str, StructLayout]):
    """Struct layouts built on first use: a profile has ~10k structs, a walker needs ~20."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self._raw = raw
        self._built: dict[str, StructLayout] = {}

    def __getitem__(self, name: str) -> StructLayout:
        layout = self._built.get(name)
        if layout is None:
            entry = self._raw[name]
            try:
                if isinstance(entry, str):  # the marshal side cache's form (profile_compact)
                    entry = json.loads(entry)
                size, members = entry
                layout = StructLayout(name, int(size), {m[0]: Member(*m[1:]) for m in members})
            except (TypeError, ValueError, IndexError) as e:  # JSONDecodeError too
                raise ProfileError(f"cached profile entry for struct {name} is corrupt: {e}") from e
            self._built[name] = layout
        return layout

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __contains__(self, name: object) -> bool:
        return name in self._raw


def profile_from_dict(doc: Mapping[str, Any]) -> Profile:
    if doc.get("format") != PROFILE_FORMAT:
        raise ProfileError(
            f"profile format {doc.get('format')!r} is not {PROFILE_FORMAT!r}: rebuild it with "
            "`xfgate profile build`"
        )
    try:
        return Profile(
            release=str(doc["release"]),
            banner=str(doc["banner"]),
            structs=LazyStructs(doc["structs"]),
            symbols=doc["symbols"],
            symbol_types=doc.get("symbol_types", {}),
        )
    except (KeyError, TypeError) as e:
        raise ProfileError(f"cached profile is missing {e}: rebuild it") from e


def save_profile(profile: Profile, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(profile_to_dict(profile), separators=(",", ":")))
    tmp.replace(path)


def load_profile(path: Path | str) -> Profile:
    """A profile file: our compact JSON, or any Volatility ISF (``.json`` or ``.json.xz``)."""
    path = Path(path)
    doc = profile_compact.read_profile_json(path, PROFILE_FORMAT)
    if doc.get("format") == PROFILE_FORMAT:
        return profile_from_dict(doc)
    if "metadata" in doc:
        return isf.profile_from_isf(doc)
    raise ProfileError(f"{path} is neither an xfgate profile nor a Volatility ISF")


def profile_for_assets(assets: Path | str, cache: Path = DEFAULT_CACHE_DIR) -> Profile:
    """The profile of an unpacked kernel package (or a vmlinuz), built once then cached."""
    return build_profile(assets, cache)


def kernel_assets_for(package: str, cache: Path = DEFAULT_CACHE_DIR) -> Path:
    """An unpacked kernel package in ``<cache dir>/kernels``, downloaded if missing."""
    return kernel_image.fetch_kernel_package(package, cache / "kernels")


def profile_for_domain(domain: DomainConfig, cache: Path = DEFAULT_CACHE_DIR) -> Profile:
    """The profile of a configured domain's kernel: from ``[domain.kernel] assets``, else its
    ``package`` (downloaded into the cache), else a cached profile of its ``release``, else
    built from the running guest's memory (and cached): a domain needs no kernel field."""
    kernel = domain.kernel
    if kernel.assets and Path(kernel.assets).exists():
        return profile_for_assets(kernel.assets, cache)
    if kernel.package:
        return profile_for_assets(kernel_assets_for(kernel.package, cache), cache)
    if kernel.release:
        try:
            return profile_for_release(kernel.release, cache)
        except ProfileError as e:
            log.info("domain %s: %s; building the profile from guest memory", domain.id, e)
    # No kernel named (or no cached build of it): the guest's own memory has everything.
    from xfgate.vmi import profile_memory  # it builds on this module

    return profile_memory.domain_memory_profile(domain, cache).profile


def cached_profiles(cache: Path = DEFAULT_CACHE_DIR) -> list[Path]:
    return sorted(
        p for p in profiles_dir(cache).glob("*.json") if not p.name.endswith(".sources.json")
    )


def profile_for_release(release: str, cache: Path = DEFAULT_CACHE_DIR) -> Profile:
    """A cached profile of that release (the newest if several builds share it)."""
    found = [p for p in cached_profiles(cache) if p.name.startswith(f"{release}-")]
    found = [p for p in found if p.name[len(release) + 1 :].count("-") == 0]
    if not found:
        raise ProfileError(
            f"no cached profile for kernel {release} in {profiles_dir(cache)}: build one with "
            "`xfgate profile build --kernel-package linux-image-<release>`"
        )
    return load_profile(max(found, key=lambda p: p.stat().st_mtime))


def profile_for_banner(banner: str, cache: Path = DEFAULT_CACHE_DIR) -> Profile:
    """The cached profile whose banner is exactly ``banner`` (as read from guest memory)."""
    release = kernel_image.banner_release(banner)
    text = banner.rstrip("\0")
    for path in cached_profiles(cache):
        # Profiles built from a guest's memory serve that guest only (profile_memory).
        if path.name.startswith(f"{release}-") and not path.name.startswith(f"{release}-mem-"):
            profile = load_profile(path)
            if profile.banner == text:
                return profile
    raise ProfileError(
        f"no cached profile matches the guest's banner {text[:90]!r}...: build one with "
        f"`xfgate profile build --kernel-package linux-image-{release}`"
    )
