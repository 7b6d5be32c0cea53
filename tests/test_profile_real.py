"""Profiles of the real Debian kernels (generic and cloud flavours), from their vmlinuz alone.

The oracles are independent of the code under test: the offsets measured in the lab notes, the
kernel's own initialised data (``init_task.tasks`` points to itself, ``init_task.files`` is
``&init_files``), the gaps between kallsyms symbols, BTF's per-cpu variable offsets, and a
second, direct walk over the BTF graph written here.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from xfgate.cli import build_parser
from xfgate.errors import PrerequisiteError, ProfileError
from xfgate.vmi import isf, kernel_image, profile_build
from xfgate.vmi.btf import Btf, Kind, parse_btf
from xfgate.vmi.profile import Profile

RELEASES = {"generic": "6.1.0-56-amd64", "cloud": "6.1.0-56-cloud-amd64"}

# /work/shared/lab-notes.md, measured on dumps of a 6.1.0-56-amd64 guest.
LAB_NOTES_OFFSETS = {
    ("task_struct", "tasks"): 2192,
    ("task_struct", "pid"): 2416,
    ("task_struct", "tgid"): 2420,
    ("task_struct", "real_cred"): 2952,
    ("task_struct", "cred"): 2960,
    ("task_struct", "comm"): 2976,
    ("task_struct", "files"): 3048,
    ("cred", "uid"): 8,
    ("cred", "euid"): 24,
    ("files_struct", "fdt"): 32,
    ("fdtable", "max_fds"): 0,
    ("fdtable", "fd"): 8,
    ("file", "f_path.dentry"): 24,
    ("file", "f_inode"): 32,
    ("file", "f_op"): 40,
    ("file", "private_data"): 200,
    ("inode", "i_mode"): 0,
    ("inode", "i_ino"): 64,
    ("socket_alloc", "socket"): 0,
    ("socket_alloc", "vfs_inode"): 128,
    ("socket", "sk"): 24,
    ("sock_common", "skc_daddr"): 0,
    ("sock_common", "skc_rcv_saddr"): 4,
    ("sock_common", "skc_dport"): 12,
    ("sock_common", "skc_num"): 14,
    ("sock_common", "skc_family"): 16,
    ("sock_common", "skc_state"): 18,
    ("sock_common", "skc_v6_daddr"): 56,
    ("sock_common", "skc_v6_rcv_saddr"): 72,
    ("sock", "sk_type"): 514,
    ("sock", "sk_protocol"): 516,
    ("sock", "sk_uid"): 560,
}


@dataclass(frozen=True)
class Kernel:
    release: str
    assets: Path
    vmlinux: bytes
    btf: Btf
    build: profile_build.ProfileBuild

    @property
    def profile(self) -> Profile:
        return self.build.profile

    def read(self, address: int, length: int) -> bytes:
        return kernel_image.read_elf_virtual(self.vmlinux, address, length)

    def pointer(self, address: int) -> int:
        value: int = struct.unpack("<Q", self.read(address, 8))[0]
        return value


@pytest.fixture(scope="session")
def profile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("xfgate-cache")


def _fetch(release: str) -> Path:
    try:
        return profile_build.kernel_assets_for(f"linux-image-{release}")
    except (ProfileError, PrerequisiteError) as e:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"cannot fetch linux-image-{release} with apt: {e}")


@pytest.fixture(scope="session")
def kernels(profile_cache: Path) -> dict[str, Kernel]:
    """Both flavours downloaded into the shared kernel cache; profiles built into a fresh one."""
    out = {}
    for flavour, release in RELEASES.items():
        assets = _fetch(release)
        vmlinux = kernel_image.decompress_vmlinuz(kernel_image.vmlinuz_in(assets))
        btf = parse_btf(kernel_image.read_elf_section(vmlinux, ".BTF"))
        build = profile_build.build_profile_files(assets, profile_cache)
        out[flavour] = Kernel(release, assets, vmlinux, btf, build)
    return out


@pytest.fixture(scope="session")
def generic(kernels: dict[str, Kernel]) -> Kernel:
    return kernels["generic"]


@pytest.fixture(scope="session")
def cloud(kernels: dict[str, Kernel]) -> Kernel:
    return kernels["cloud"]


def test_generic_offsets_match_the_lab_notes(generic: Kernel) -> None:
    p = generic.profile
    assert p.release == RELEASES["generic"]
    found = {key: p.offset(*key) for key in LAB_NOTES_OFFSETS}
    assert found == LAB_NOTES_OFFSETS
    assert not p.has_member("sock", "sk_family")  # a macro, not a member (lab notes)
    assert p.member("cred", "uid").size == 4
    assert p.member("sock_common", "skc_state").size == 1


@pytest.mark.parametrize("flavour", RELEASES)
def test_symbols_and_offsets_agree_with_the_kernels_own_data(
    kernels: dict[str, Kernel], flavour: str
) -> None:
    """init_task is statically initialised: its list head points to itself, its files and
    cred pointers name init_files and init_cred, its comm is "swapper"."""
    k = kernels[flavour]
    p = k.profile
    task = p.symbol("init_task")
    tasks = task + p.offset("task_struct", "tasks")
    assert k.pointer(tasks) == tasks
    assert k.pointer(tasks + p.offset("list_head", "prev")) == tasks
    assert k.pointer(task + p.offset("task_struct", "files")) == p.symbol("init_files")
    assert k.pointer(task + p.offset("task_struct", "real_cred")) == p.symbol("init_cred")
    assert k.pointer(task + p.offset("task_struct", "cred")) == p.symbol("init_cred")
    comm = k.read(task + p.offset("task_struct", "comm"), p.member("task_struct", "comm").size)
    assert comm.split(b"\0")[0] == b"swapper"
    banner = k.read(p.symbol("linux_banner"), len(p.banner) + 1)
    assert banner == p.banner.encode() + b"\0"
    assert p.release in p.banner and p.symbol_types["init_task"] == "task_struct"


@pytest.mark.parametrize("flavour", RELEASES)
def test_struct_sizes_match_the_gap_to_the_next_symbol(
    kernels: dict[str, Kernel], flavour: str
) -> None:
    p = kernels[flavour].profile
    by_address = sorted(set(p.symbols.values()))
    for symbol in ("init_task", "init_files", "init_cred", "init_net"):
        start = p.symbol(symbol)
        gap = next(a for a in by_address if a > start) - start
        size = p.size(p.symbol_types[symbol])
        assert size <= gap < size + 64, symbol


def test_flavours_differ_where_their_kernels_do(generic: Kernel, cloud: Kernel) -> None:
    g, c = generic.profile, cloud.profile
    # Same socket/file layouts in both flavours...
    for key in LAB_NOTES_OFFSETS:
        assert c.offset(*key) == g.offset(*key)
    # ...but task_struct and net differ: cloud drops machine-check and some protocol state.
    assert (g.size("task_struct"), c.size("task_struct")) == (
        generic.btf.find("task_struct", Kind.STRUCT)[0].size,
        cloud.btf.find("task_struct", Kind.STRUCT)[0].size,
    )
    assert g.size("task_struct") != c.size("task_struct")
    assert g.offset("task_struct", "thread") != c.offset("task_struct", "thread")
    assert g.has_member("task_struct", "mce_vaddr") and not c.has_member("task_struct", "mce_vaddr")
    assert g.size("net") != c.size("net")
    assert g.symbol("tcp_hashinfo") != c.symbol("tcp_hashinfo")
    assert g.banner != c.banner


def _direct_members(btf: Btf, type_id: int, base: int = 0, depth: int = 0) -> dict[str, int]:
    """Byte offsets of a struct's members, anonymous ones flattened: written independently of
    the ISF path the profile takes."""
    assert depth < 16
    out: dict[str, int] = {}
    for m in btf.type(type_id).members:
        target = btf.strip(m.type_id)
        offset = base + m.bit_offset // 8
        if not m.name and target.kind in (Kind.STRUCT, Kind.UNION):
            for name, inner in _direct_members(btf, target.id, offset, depth + 1).items():
                out.setdefault(name, inner)
        elif m.name:
            out[m.name] = offset
    return out


@pytest.mark.parametrize("flavour", RELEASES)
def test_every_named_struct_matches_a_direct_btf_walk(
    kernels: dict[str, Kernel], flavour: str
) -> None:
    k = kernels[flavour]
    checked = 0
    seen: set[str] = set()
    for t in k.btf.types:
        if t.kind not in (Kind.STRUCT, Kind.UNION) or not t.name or t.name in seen:
            continue
        seen.add(t.name)
        layout = k.profile.struct(t.name)
        assert layout.size == t.size, t.name
        assert {n: m.offset for n, m in layout.members.items()} == _direct_members(k.btf, t.id)
        checked += 1
    assert checked > 7000


def test_kallsyms_agree_with_btf_percpu_variables(generic: Kernel) -> None:
    """Per-cpu variables: BTF's .data..percpu section gives their offsets, kallsyms their
    (absolute, zero-based) addresses; two sources, one truth."""
    sections = [
        t for t in generic.btf.types if t.kind == Kind.DATASEC and t.name == ".data..percpu"
    ]
    assert sections
    pairs = [(generic.btf.type(s.type_id).name, s.offset) for s in sections[0].secinfos]
    assert len(pairs) > 100
    p = generic.profile
    assert {name: p.symbol(name) for name, _ in pairs} == dict(pairs)


def test_kallsyms_table_and_system_map(generic: Kernel) -> None:
    p = generic.profile
    assert len(p.symbols) > 80000
    assert p.symbol("_text") == 0xFFFFFFFF81000000
    text = generic.build.system_map_path.read_text()
    assert text.count("\n") > 90000
    assert kernel_image.parse_system_map(text) == dict(p.symbols)
    # the package's own System.map is a stub: the symbols above came from kallsyms
    stub = next(generic.assets.glob("tree/boot/System.map-*"), None) or next(
        generic.assets.glob("**/System.map-*")
    )
    assert len(stub.read_text().splitlines()) < 10
    assert kernel_image.read_build_id(generic.vmlinux)  # Debian kernels carry a GNU build-id


def test_cache_reload_and_isf_round_trip(generic: Kernel, profile_cache: Path) -> None:
    again = profile_build.build_profile_files(generic.assets, profile_cache)
    assert again.from_cache and again.profile_path == generic.build.profile_path
    assert again.profile == generic.profile
    from_isf = isf.load_isf_profile(generic.build.isf_path)
    assert from_isf == generic.profile
    assert profile_build.load_profile(generic.build.isf_path) == generic.profile
    assert profile_build.profile_for_release(generic.release, profile_cache) == generic.profile
    assert profile_build.profile_for_banner(generic.profile.banner, profile_cache).release == (
        generic.release
    )
    with pytest.raises(ProfileError, match="no cached profile matches"):
        profile_build.profile_for_banner(generic.profile.banner.replace("#", "#9"), profile_cache)


def test_stale_or_corrupt_cache_entries_are_rebuilt(generic: Kernel, tmp_path: Path) -> None:
    first = profile_build.build_profile_files(generic.assets, tmp_path)
    doc = json.loads(first.profile_path.read_text())
    doc["builder"] = profile_build.BUILDER_VERSION - 1
    doc["banner"] = "stale"
    first.profile_path.write_text(json.dumps(doc))
    again = profile_build.build_profile_files(generic.assets, tmp_path)
    assert not again.from_cache and again.profile.banner == generic.profile.banner
    first.profile_path.write_text("{truncated")
    assert not profile_build.build_profile_files(generic.assets, tmp_path).from_cache
    assert profile_build.build_profile_files(generic.assets, tmp_path).from_cache


def test_real_isf_is_accepted_by_volatility_schema(generic: Kernel) -> None:
    import jsonschema  # without it volatility3 reports success on anything
    from volatility3 import schemas

    doc = isf.read_isf(generic.build.isf_path)
    assert jsonschema.__name__ and schemas.validate(doc, use_cache=False)
    assert generic.build.isf_path.stat().st_size < 4 << 20  # xz-compressed


def _cli(argv: list[str]) -> int:
    """The real parser (its --cache-dir defaults to $XFGATE_CACHE), errors raised, not printed."""
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


def test_cli_build_and_show(
    generic: Kernel,
    profile_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("XFGATE_CACHE", str(profile_cache))
    out = tmp_path / "k.json"
    assert _cli(["profile", "build", "--vmlinuz", str(generic.assets), "--isf", str(out)]) == 0
    assert "cached profile for 6.1.0-56-amd64" in capsys.readouterr().out
    assert isf.profile_from_isf(isf.read_isf(out)) == generic.profile
    assert _cli(["profile", "show", str(out), "--struct", "sock_common", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["members"]["skc_dport"]["offset"] == 12
    assert _cli(["profile", "show", str(generic.assets), "--symbol", "init_task"]) == 0
    assert capsys.readouterr().out.startswith(f"{generic.profile.symbol('init_task'):016x}")
    with pytest.raises(ProfileError, match="no struct no_such"):
        _cli(["profile", "show", str(out), "--struct", "no_such"])


def test_meta_package_resolves_and_unknown_names_fail_clearly() -> None:
    try:
        concrete = kernel_image.resolve_kernel_package("linux-image-amd64")
    except (ProfileError, PrerequisiteError) as e:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"apt cannot resolve linux-image-amd64: {e}")
    assert concrete.startswith("linux-image-") and concrete.endswith("-amd64")
    assert concrete[len("linux-image-")].isdigit()
    with pytest.raises(ProfileError, match="no Debian package named 'xfgate-no-such-package'"):
        kernel_image.resolve_kernel_package("xfgate-no-such-package")
    with pytest.raises(ProfileError, match="not a Debian package name"):
        kernel_image.resolve_kernel_package("../etc")


def test_non_kernel_files_are_rejected(tmp_path: Path, generic: Kernel) -> None:
    (tmp_path / "empty").mkdir()
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ProfileError, match="neither an ELF vmlinux nor an x86 bzImage"):
        kernel_image.decompress_vmlinuz(junk)
    truncated = tmp_path / "vmlinuz-truncated"
    truncated.write_bytes(kernel_image.vmlinuz_in(generic.assets).read_bytes()[:200_000])
    with pytest.raises(ProfileError, match="truncated"):
        kernel_image.decompress_vmlinuz(truncated)
    with pytest.raises(ProfileError, match=r"has no \.nosuch section"):
        kernel_image.read_elf_section(generic.vmlinux, ".nosuch")
    with pytest.raises(ProfileError, match="no vmlinuz"):
        profile_build.build_profile(tmp_path / "empty")
