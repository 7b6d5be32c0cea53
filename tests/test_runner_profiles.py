"""The gate loads one profile per kernel, shared by the domains that run it (issue 10: memory
per domain), and never shares across kernels or for a domain that names no kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from xfgate.config import DomainConfig, KernelConfig, MemoryConfig
from xfgate.verdict.options import GateOptions
from xfgate.verdict.policy import Policy
from xfgate.verdict.runner import IntrospectionSources
from xfgate.vmi import cli as vmi_cli
from xfgate.vmi.profile import Profile


def _domain(i: int, kernel: KernelConfig) -> DomainConfig:
    return DomainConfig(
        i, f"g{i}", (f"vif{i}.0",), MemoryConfig("qemu-shm", f"/dev/shm/g{i}"), None, kernel
    )


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def fake_load(domain: DomainConfig, path: str | None, cache_dir: Path) -> Profile:
        calls.append(domain.id)
        return Profile(domain.kernel.release or "mem", "banner", {}, {})

    monkeypatch.setattr(vmi_cli, "load_domain_profile", fake_load)
    return calls


def test_one_profile_per_kernel(loads: list[int], tmp_path: Path) -> None:
    opts = GateOptions(domains=(1, 2, 3), policy=Policy(), run_dir=tmp_path)
    a = KernelConfig(package="linux-image-6.1.0-57-amd64", release="6.1.0-57-amd64")
    b = KernelConfig(package="linux-image-6.1.0-57-cloud-amd64", release="6.1.0-57-cloud-amd64")
    sources = IntrospectionSources()
    p1, p2, p3 = (sources.profile(_domain(i, k), opts) for i, k in ((1, a), (2, a), (3, b)))
    assert p1 is p2  # same kernel: loaded once
    assert p3 is not p1 and p3.release == "6.1.0-57-cloud-amd64"
    assert loads == [1, 3]
    # Another gate (another IntrospectionSources) loads its own.
    assert IntrospectionSources().profile(_domain(4, a), opts) is not p1


def test_a_domain_naming_no_kernel_gets_its_own(loads: list[int], tmp_path: Path) -> None:
    opts = GateOptions(domains=(1, 2), policy=Policy(), run_dir=tmp_path)
    sources = IntrospectionSources()
    p1 = sources.profile(_domain(1, KernelConfig()), opts)
    p2 = sources.profile(_domain(2, KernelConfig()), opts)
    assert p1 is not p2 and loads == [1, 2]
