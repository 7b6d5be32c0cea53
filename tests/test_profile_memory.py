"""Profiles from guest memory alone, on a synthetic guest (tests/kallsyms_fakes.py): the
kallsyms decoding, the VMCOREINFO scan, the cache, and every piece that can be missing or lie.
The real kernels are in tests/test_profile_memory_lab.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.kallsyms_fakes import (
    BIG_NAME,
    RELEASE,
    FakeKernel,
    build,
    expected_symbols,
    map_image,
)
from xfgate.cli import main
from xfgate.config import DomainConfig, KernelConfig, MemoryConfig
from xfgate.errors import ProfileError, ProfileMismatch
from xfgate.vmi import profile_build, profile_memory
from xfgate.vmi.memory import BufferMemory
from xfgate.vmi.profile_build import ProfileBuild
from xfgate.vmi.vmcoreinfo import candidates, find_vmcoreinfo


def _build(k: FakeKernel, cache: Path, rebuild: bool = False) -> ProfileBuild:
    mem, _table = build(k)
    return profile_memory.build_memory_profile(BufferMemory(mem), cache, rebuild=rebuild)


@pytest.mark.parametrize("absolute_percpu", [True, False])
def test_profile_from_memory_has_every_symbol_and_the_btf_layouts(
    tmp_path: Path, absolute_percpu: bool
) -> None:
    k = FakeKernel(absolute_percpu=absolute_percpu)
    mem, table = build(k)
    result = profile_memory.build_memory_profile(BufferMemory(mem), tmp_path)
    p = result.profile
    assert not result.from_cache
    assert dict(p.symbols) == expected_symbols(table)  # link-time, per-cpu ones absolute
    assert p.symbol("_text") == 0xFFFFFFFF81000000
    assert p.symbol(BIG_NAME) == 0xFFFFFFFF81000090  # a two-byte name length decoded
    if absolute_percpu:
        assert p.symbol("cpu_debug_store") == 0x1000
    assert p.release == RELEASE and p.banner == k.banner
    assert p.offset("sock_common", "skc_num") == 14  # from the BTF blob in memory
    assert result.profile_path.name.startswith(f"{RELEASE}-mem-")
    assert result.system_map_path.read_text().count("\n") == len(table)
    # The ISF exported is a profile of its own, equal to the one built.
    from_isf = profile_build.load_profile(result.isf_path)
    assert dict(from_isf.symbols) == dict(p.symbols)


def test_second_contact_loads_the_cached_profile(tmp_path: Path) -> None:
    first = _build(FakeKernel(), tmp_path)
    again = _build(FakeKernel(shift=0x3C000000), tmp_path)  # same build, rebooted elsewhere
    assert again.from_cache and again.profile_path == first.profile_path
    assert dict(again.profile.symbols) == dict(first.profile.symbols)
    # Another build-id is another kernel: never the cached one.
    other = _build(FakeKernel(build_id="ff" * 20), tmp_path)
    assert not other.from_cache and other.profile_path != first.profile_path


def test_a_cached_profile_whose_banner_the_guest_does_not_hold_is_rebuilt(
    tmp_path: Path,
) -> None:
    """Same release and build-id claimed, another banner in memory (a forged note, or a cache
    entry from another build): the cache is not trusted."""
    _build(FakeKernel(), tmp_path)
    k = FakeKernel()
    mem, _table = build(k)
    at = k.paddr(0xFFFFFFFF81000000 + 0x1000)
    mem[at + 29 : at + 33] = b"XXXX"  # the banner's build host differs
    result = profile_memory.build_memory_profile(BufferMemory(mem), tmp_path)
    assert not result.from_cache
    assert "XXXX" in result.profile.banner


def test_a_cache_entry_poisoned_by_another_guest_is_never_used(tmp_path: Path) -> None:
    """A hostile guest kernel claims a neighbour's release and build-id with its own BTF (a
    member renamed): its build is cached under that key, yet the honest guest gets a profile
    built from its own bytes, and the other way round."""
    forged, _ = build(FakeKernel())
    at = forged.index(b"skc_num\0")
    forged[at : at + 7] = b"skc_nuX"
    poisoned = profile_memory.build_memory_profile(BufferMemory(forged), tmp_path)
    assert poisoned.profile.has_member("sock_common", "skc_nuX")
    honest = _build(FakeKernel(), tmp_path)
    assert not honest.from_cache and honest.profile_path == poisoned.profile_path
    assert honest.profile.offset("sock_common", "skc_num") == 14
    assert not honest.profile.has_member("sock_common", "skc_nuX")
    again = profile_memory.build_memory_profile(BufferMemory(forged), tmp_path)
    assert not again.from_cache and again.profile.has_member("sock_common", "skc_nuX")


def test_no_vmcoreinfo_names_what_to_supply(tmp_path: Path) -> None:
    mem = bytearray(1 << 20)
    with pytest.raises(ProfileError) as err:
        profile_memory.build_memory_profile(BufferMemory(mem), tmp_path)
    text = str(err.value)
    assert "no VMCOREINFO" in text and "still booting" in text and "not Linux" in text
    assert "[domain.kernel] package" in text and "--profile" in text
    # A banner in memory names the package to fetch.
    mem[0x8000:0x8040] = b"Linux version 6.1.0-57-amd64 (debian-kernel@lists) #1 SMP\n\0"
    with pytest.raises(ProfileError, match=r"linux-image-6\.1\.0-57-amd64"):
        profile_memory.build_memory_profile(BufferMemory(mem), tmp_path)


def test_booting_guest_with_half_a_note_is_no_vmcoreinfo(tmp_path: Path) -> None:
    k = FakeKernel()
    mem, _table = build(k)
    text_end = mem.index(b"KERNELOFFSET", k.vmcoreinfo_paddr)
    mem[text_end : text_end + 40] = bytes(40)  # the note is still being written
    with pytest.raises(ProfileError, match="no VMCOREINFO"):
        profile_memory.build_memory_profile(BufferMemory(mem), tmp_path)


def test_no_kallsyms_in_vmcoreinfo(tmp_path: Path) -> None:
    with pytest.raises(ProfileError) as err:
        _build(FakeKernel(with_kallsyms_keys=False), tmp_path)
    assert "kallsyms_names" in str(err.value) and "before 6.0" in str(err.value)
    assert f"linux-image-{RELEASE}" in str(err.value)


def test_no_btf_names_the_config_and_the_package(tmp_path: Path) -> None:
    with pytest.raises(ProfileError) as err:
        _build(FakeKernel(with_btf=False), tmp_path)
    text = str(err.value)
    assert "CONFIG_DEBUG_INFO_BTF" in text and f"linux-image-{RELEASE}" in text
    assert "ISF" in text


def test_a_banner_that_disagrees_with_vmcoreinfo_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProfileMismatch):
        _build(FakeKernel(banner_release="6.1.0-57-amd64"), tmp_path)
    assert not list(tmp_path.glob("profiles/*.json"))  # nothing cached


def test_kallsyms_that_disagree_with_vmcoreinfo_are_refused(tmp_path: Path) -> None:
    k = FakeKernel(extra_vmcoreinfo={})
    mem, _table = build(k)
    # VMCOREINFO claims swapper_pg_dir elsewhere than the tables put it.
    text = bytes(mem[k.vmcoreinfo_paddr : k.vmcoreinfo_paddr + 2048])
    line = next(x for x in text.split(b"\n") if x.startswith(b"SYMBOL(swapper_pg_dir)="))
    forged = line[:-4] + b"4000"
    pos = mem.index(line)
    mem[pos : pos + len(line)] = forged
    with pytest.raises(ProfileError, match="do not agree with VMCOREINFO"):
        profile_memory.build_memory_profile(BufferMemory(mem), tmp_path)


@pytest.mark.parametrize(
    "what,patch",
    [
        ("kallsyms_num_syms", lambda k: (k.paddr(0xFFFFFFFF81010000), b"\xff\xff\xff\x7f")),
        ("kallsyms_names", lambda k: (k.paddr(0xFFFFFFFF81012000), b"\x00")),
        ("kallsyms_token_table", lambda k: (k.paddr(0xFFFFFFFF81010400), b"x" * 2000)),
    ],
)
def test_hostile_tables_are_a_profile_error_never_a_crash(
    tmp_path: Path, what: str, patch: Callable[[FakeKernel], tuple[int, bytes]]
) -> None:
    k = FakeKernel()
    mem, _table = build(k)
    at, data = patch(k)
    mem[at : at + len(data)] = data
    with pytest.raises(ProfileError) as err:
        profile_memory.build_memory_profile(BufferMemory(mem), tmp_path)
    assert "kallsyms" in str(err.value) or what in str(err.value)


def test_tables_beyond_the_end_of_memory(tmp_path: Path) -> None:
    k = FakeKernel()
    mem, _table = build(k)
    cut = k.paddr(0xFFFFFFFF81012000) + 100  # in the middle of kallsyms_names
    with pytest.raises(ProfileError, match="kallsyms_names"):
        profile_memory.build_memory_profile(BufferMemory(mem[:cut]), tmp_path)


def test_stale_vmcoreinfo_of_a_previous_boot_is_skipped() -> None:
    """A copy left in free memory by an earlier boot (another shift) whose init_uts_ns no
    longer holds its release is not a candidate."""
    k = FakeKernel()
    mem, _table = build(k)
    old = dataclasses.replace(k, shift=0x10000000, image_paddr=0x300000, vmcoreinfo_paddr=0x3000)
    stale, _ = build(old)
    mem[0x3000:0x4000] = stale[0x3000:0x4000]
    found = candidates(BufferMemory(mem))
    assert [c.virt_shift for c in found] == [k.shift]


def test_two_live_looking_kernels_need_the_monitor() -> None:
    """Two self-consistent VMCOREINFO copies of different boots and no CR3: no guess."""
    k = FakeKernel()
    mem, _table = build(k)
    other = dataclasses.replace(
        k, shift=0x10000000, image_paddr=0x300000, vmcoreinfo_paddr=0x3000, memory_size=0x500000
    )
    mem2, _ = build(other)
    mem2[: len(mem)] = bytes(a | b for a, b in zip(mem, mem2[: len(mem)], strict=True))
    with pytest.raises(ProfileError, match="2 different kernels"):
        find_vmcoreinfo(BufferMemory(mem2))


def _raw_domain(tmp_path: Path, mem: bytearray, kernel: KernelConfig) -> DomainConfig:
    image = tmp_path / "guest.raw"
    image.write_bytes(mem)
    return DomainConfig(
        id=7, name="g7", vifs=(), memory=MemoryConfig("raw", str(image)), kernel=kernel
    )


def test_a_domain_without_kernel_field_gets_its_profile_from_memory(tmp_path: Path) -> None:
    mem, table = build(FakeKernel())
    domain = _raw_domain(tmp_path, mem, KernelConfig())
    p = profile_build.profile_for_domain(domain, tmp_path)
    assert dict(p.symbols) == expected_symbols(table)
    # A named release with no cached build falls back on memory too.
    named = dataclasses.replace(domain, kernel=KernelConfig(release=RELEASE))
    assert profile_build.profile_for_domain(named, tmp_path).banner == p.banner


def test_cli_profile_build_domain_from_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mem, _table = build(FakeKernel())
    image = tmp_path / "guest.raw"
    image.write_bytes(mem)
    domains = tmp_path / "domains.toml"
    domains.write_text(
        f'[[domain]]\nid = 3\nname = "g3"\n[domain.memory]\nbackend = "raw"\npath = "{image}"\n'
    )
    isf_out = tmp_path / "out.isf.json"
    rc = main(
        [
            "--domains-file",
            str(domains),
            "--cache-dir",
            str(tmp_path / "cache"),
            "profile",
            "build",
            "--domain",
            "3",
            "--isf",
            str(isf_out),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "from guest memory" in out and RELEASE in out
    assert isf_out.exists()
    with pytest.raises(SystemExit):
        main(["profile", "build", "--vmlinuz", "x", "--domain", "3"])  # one source only


def _guest_with_a_forgery() -> tuple[bytearray, FakeKernel, FakeKernel]:
    """The real kernel, and a whole fake one (VMCOREINFO, uts, tables) a user process could
    write into its own pages."""
    real = FakeKernel(image_paddr=0x400000, memory_size=0x800000)
    mem, _ = build(real)
    fake = dataclasses.replace(
        real, shift=0x10000000, image_paddr=0x200000, vmcoreinfo_paddr=0x3000
    )
    forged, _ = build(fake)
    mem[0x3000:0x3FFFFF] = forged[0x3000:0x3FFFFF]
    return mem, real, fake


def test_the_vcpus_page_tables_pick_the_running_kernel_over_a_forgery() -> None:
    mem, real, _fake = _guest_with_a_forgery()
    assert len(candidates(BufferMemory(mem))) == 2
    with pytest.raises(ProfileError, match="2 different kernels"):
        find_vmcoreinfo(BufferMemory(mem))  # memory alone: no guess
    map_image(mem, real, root=0x700000)
    assert find_vmcoreinfo(BufferMemory(mem), kernel_root=0x700000).virt_shift == real.shift


def test_with_page_tables_a_lone_forgery_is_refused() -> None:
    """The real note hidden (say, by a spray ahead of it), only the forgery left: the vCPU's
    page tables do not map it, so no profile is built from it."""
    mem, real, fake = _guest_with_a_forgery()
    at = real.vmcoreinfo_paddr
    mem[at : at + 4096] = bytes(4096)  # the real text out of reach of the scan
    map_image(mem, real, root=0x700000)
    assert [c.virt_shift for c in candidates(BufferMemory(mem))] == [fake.shift]
    with pytest.raises(ProfileError, match="confirm none"):
        find_vmcoreinfo(BufferMemory(mem), kernel_root=0x700000)
