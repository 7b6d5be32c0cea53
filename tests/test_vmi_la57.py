"""A real guest with 5-level paging: the stock Debian kernel under QEMU TCG `-cpu max` turns LA57
on by itself (Volatility 3 prints an empty table there, LibVMI's file mode fails). xfgate must
locate the kernel and walk it exactly as on a 4-level guest.

The lab tests run in a private lab (own prefix and domains file), torn down at the end of the
module; the unit tests beside them check the level detection on a synthetic guest.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_lab_prerequisites
from tests.test_vmi_lab import cli_ps_json, ps_against_truth
from tests.vmi_fakes import TEXT_LINK, FakeGuest, synthetic_profile
from xfgate.config import DomainConfig
from xfgate.vmi.cli import load_domain_profile
from xfgate.vmi.kaslr import (
    L5_ENABLED,
    KernelLocator,
    from_banner_scan,
    from_cr3,
    from_vmcoreinfo,
    parse_vmcoreinfo,
)
from xfgate.vmi.memory import SharedFileMemory
from xfgate.vmi.paging import AddressSpace
from xfgate.vmi.profile import Profile
from xfgate.vmi.qmp import QmpClient
from xfgate_lab import lab
from xfgate_lab.cli import guest_exec
from xfgate_lab.layout import LabLayout

CR4_LA57 = 1 << 12


# ---- the paging level, decided by the kernel's own variable (synthetic guest) ----------------


def _guest_with_l5_variable(levels: int, value: int | None, vmcoreinfo: bool) -> FakeGuest:
    base = synthetic_profile()
    symbols = dict(base.symbols)
    if value is not None:
        symbols[L5_ENABLED] = TEXT_LINK + 0x25000
    profile = dataclasses.replace(base, symbols=symbols)
    g = FakeGuest(levels=levels, vmcoreinfo=vmcoreinfo, profile=profile)
    if value is not None:
        struct.pack_into("<I", g.buf, g.symbol_paddr(L5_ENABLED), value)
    return g


@pytest.mark.parametrize("levels", [4, 5])
def test_banner_scan_takes_the_level_from_the_kernel(levels: int) -> None:
    g = _guest_with_l5_variable(levels, int(levels == 5), vmcoreinfo=False)
    loc = from_banner_scan(g.memory, g.profile)
    assert loc is not None and loc.levels == levels and loc.virt_shift == g.virt_shift


def test_banner_scan_trusts_the_kernel_variable_over_a_guess() -> None:
    # A 5-level guest whose variable says 4: only 4 levels are tried, and they do not reach
    # the banner. (Proof that the variable, not trial and error, picked 5 above.)
    g = _guest_with_l5_variable(5, 0, vmcoreinfo=False)
    assert from_banner_scan(g.memory, g.profile) is None
    # Garbage in the variable, or no such symbol: both levels are tried, the banner decides.
    for value in (7, None):
        g = _guest_with_l5_variable(5, value, vmcoreinfo=False)
        loc = from_banner_scan(g.memory, g.profile)
        assert loc is not None and loc.levels == 5


def test_vmcoreinfo_without_the_level_number_asks_the_kernel() -> None:
    g = _guest_with_l5_variable(5, 1, vmcoreinfo=True)
    key = b"NUMBER(pgtable_l5_enabled)=1\n"
    at = bytes(g.buf).find(key)
    assert at >= 0
    g.buf[at : at + len(key)] = b"#" * (len(key) - 1) + b"\n"  # an older kernel's note
    loc = from_vmcoreinfo(g.memory, g.profile)
    assert loc is not None and (loc.levels, loc.method) == (5, "vmcoreinfo")


# ---- the real LA57 guest ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def la57_lab(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LabLayout, DomainConfig, Path]]:
    require_lab_prerequisites()
    layout = LabLayout(f"xf57{os.getpid() % 100000}")
    domains_file = tmp_path_factory.mktemp("la57") / "domains.toml"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XFGATE_DOMAINS", str(domains_file))
        try:
            up = lab.lab_up(layout, domains=1, cpu="max", log=lambda _m: None)
            print(f"\nLA57 lab up: {up.state.timings}")
            yield layout, up.domains[0], domains_file
        finally:
            lab.lab_down(layout, force=True, log=lambda _m: None)


@pytest.fixture(scope="module")
def la57_profile(la57_lab: tuple[LabLayout, DomainConfig, Path]) -> Profile:
    return load_domain_profile(la57_lab[1], None)


@pytest.mark.lab
def test_the_guest_really_runs_with_5_level_paging(
    la57_lab: tuple[LabLayout, DomainConfig, Path], la57_profile: Profile
) -> None:
    layout, domain, _ = la57_lab
    assert lab.read_state(layout) is not None and lab.lab_status(layout)["cpu"] == "max"
    assert domain.qmp is not None
    with QmpClient(domain.qmp.socket) as qmp:
        assert qmp.control_registers().cr4 & CR4_LA57, "CR4.LA57 is off"
    # The guest kernel's own view: the CPU flag, and its crash-dump note says 5 levels.
    assert "la57" in guest_exec(layout, 1, "cat /proc/cpuinfo").output.decode().split()
    memory = SharedFileMemory(domain.memory.path)
    hit = memory.find(b"OSRELEASE=" + la57_profile.release.encode() + b"\n")
    assert hit >= 0, "no VMCOREINFO note in guest memory"
    note = memory.read(hit, 4096).split(b"\0", 1)[0].decode("ascii", errors="replace")
    assert parse_vmcoreinfo(note)["NUMBER(pgtable_l5_enabled)"] == "1"


@pytest.mark.lab
def test_kaslr_found_by_every_method_on_la57(
    la57_lab: tuple[LabLayout, DomainConfig, Path], la57_profile: Profile
) -> None:
    _, domain, _ = la57_lab
    assert domain.qmp is not None
    memory = SharedFileMemory(domain.memory.path)
    with QmpClient(domain.qmp.socket) as qmp:
        regs = qmp.control_registers()
    found = {
        "vmcoreinfo": from_vmcoreinfo(memory, la57_profile),
        "cr3": from_cr3(memory, la57_profile, regs),
        "banner-scan": from_banner_scan(memory, la57_profile),
    }
    for method, loc in found.items():
        assert loc is not None, f"{method} found nothing"
        assert (loc.method, loc.levels) == (method, 5)
    shifts = {(x.virt_shift, x.phys_base) for x in found.values() if x is not None}
    assert len(shifts) == 1 and next(iter(shifts))[0] != 0, shifts
    # The locator the gate uses agrees (and so does a 4-level reading of the root: it must
    # not read the banner, or the level could be guessed wrong).
    loc = KernelLocator(memory, la57_profile).locate()
    assert loc.levels == 5 and (loc.virt_shift, loc.phys_base) in shifts
    banner = la57_profile.symbol("linux_banner") + loc.virt_shift
    assert AddressSpace(memory, loc.root, 5).read(banner, 14) == b"Linux version "
    four = AddressSpace(memory, loc.root, 4)
    assert not four.is_mapped(banner) or four.read(banner, 14) != b"Linux version "
    # The direct map lies below the 4-level kernel half (LA57 moved it): a walk must use it.
    page_offset_base = AddressSpace(memory, loc.root, 5).read_u64(
        la57_profile.symbol("page_offset_base") + loc.virt_shift
    )
    assert page_offset_base < 0xFFFF800000000000, hex(page_offset_base)


@pytest.mark.lab
def test_ps_json_equals_lab_truth_on_la57(la57_lab: tuple[LabLayout, DomainConfig, Path]) -> None:
    layout, domain, domains_file = la57_lab
    env = {**os.environ, "XFGATE_DOMAINS": str(domains_file)}
    diffs, ps = ps_against_truth(layout, cli_ps_json(domain.id, env=env))
    assert diffs == []
    assert len({p["uid"] for p in ps["processes"]}) >= 3
    assert {s["family"] for s in ps["sockets"]} == {4, 6}
    assert {s["proto"] for s in ps["sockets"]} == {"tcp", "udp"}
