"""Volatility 3 reads the lab guest with xfgate's ISF export: an oracle for the profile.

One QMP ``dump-guest-memory`` of the running lab guest (KASLR on); Volatility finds the ISF
by its banner (``symbols.linux_banner.constant_data``), and its ``linux.pslist`` must list the
processes xfgate's walker reads from the same dump. The other flavour's ISF must not match.
Its ``linux.sockstat`` must list the sockets xfgate reads from that dump.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from xfgate.config import DomainConfig, MemoryConfig
from xfgate.errors import PrerequisiteError, ProfileError
from xfgate.vmi.introspect import GuestIntrospector
from xfgate.vmi.profile_build import ProfileBuild, build_profile_files, kernel_assets_for
from xfgate.vmi.qmp import QmpClient

pytestmark = pytest.mark.lab


@dataclass(frozen=True)
class GuestDump:
    path: Path
    build: ProfileBuild


@pytest.fixture(scope="module")
def guest_dump(lab_domain: DomainConfig, tmp_path_factory: pytest.TempPathFactory) -> GuestDump:
    build = build_profile_files(lab_domain.kernel.assets)
    dump = tmp_path_factory.mktemp("voldump") / "guest.elf"
    assert lab_domain.qmp is not None
    with QmpClient(lab_domain.qmp.socket) as qmp:
        qmp.dump_guest_memory(str(dump))  # QEMU stops the vCPUs while it writes
    return GuestDump(dump, build)


def _symbols_dir(root: Path, isf_file: Path) -> Path:
    linux = root / "symbols" / "linux"
    linux.mkdir(parents=True, exist_ok=True)
    (linux / isf_file.name).write_bytes(isf_file.read_bytes())
    return root / "symbols"


def _volatility(
    symbols: Path, dump: Path, plugin: str, cache: Path
) -> subprocess.CompletedProcess[str]:
    vol = Path(sys.executable).parent / "vol"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}  # private banner cache; --offline: no
    # remote ISF index is ever fetched
    return subprocess.run(
        [str(vol), "-q", "--offline", "--cache-path", str(cache), "-s", str(symbols),
         "-f", str(dump), "-r", "json", plugin],
        capture_output=True, text=True, timeout=600, check=False, env=env,
    )  # fmt: skip


def _processes_from_volatility(rows: list[dict[str, Any]]) -> set[tuple[int, int, int, str]]:
    return {
        (int(r["PID"]), int(r["PPID"]), int(r["UID"]), str(r["COMM"]))
        for r in rows
        if r["PID"] == r["TID"]  # thread-group leaders: what a process list shows
    }


def test_volatility_pslist_with_our_isf_lists_what_xfgate_reads(
    guest_dump: GuestDump, tmp_path: Path
) -> None:
    symbols = _symbols_dir(tmp_path, guest_dump.build.isf_path)
    run = _volatility(symbols, guest_dump.path, "linux.pslist.PsList", tmp_path / "cache")
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = _processes_from_volatility(json.loads(run.stdout))
    offline = DomainConfig(1, "dump", (), MemoryConfig("elf-dump", str(guest_dump.path)))
    with GuestIntrospector(offline, guest_dump.build.profile) as guest:
        walk = guest.walk()
    ours = {(t.tgid, t.ppid, t.uid, t.comm) for t in walk.tasks}
    assert ours == theirs
    assert len(ours) >= 10 and (1, 0, 0) in {(pid, ppid, uid) for pid, ppid, uid, _ in ours}


def test_volatility_does_not_match_the_other_flavours_isf(
    guest_dump: GuestDump, tmp_path: Path
) -> None:
    """The banner in the ISF is what ties it to an image: a cloud-kernel ISF must not be used
    on the generic-kernel guest (no silent garbage)."""
    release = guest_dump.build.profile.release
    other = (
        release.replace("-cloud-amd64", "-amd64")
        if "cloud" in release
        else (release.replace("-amd64", "-cloud-amd64"))
    )
    try:
        other_build = build_profile_files(kernel_assets_for(f"linux-image-{other}"))
    except (ProfileError, PrerequisiteError) as e:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"cannot fetch linux-image-{other}: {e}")
    symbols = _symbols_dir(tmp_path, other_build.isf_path)
    run = _volatility(symbols, guest_dump.path, "linux.pslist.PsList", tmp_path / "cache")
    assert run.returncode != 0
    assert "symbol_table_name" in run.stderr or "Unsatisfied requirement" in run.stderr


def _volatility_sockets(rows: list[dict[str, Any]]) -> set[tuple[object, ...]]:
    out: set[tuple[object, ...]] = set()
    for r in rows:
        if r["PID"] != r["TID"] or r["Family"] not in ("AF_INET", "AF_INET6"):
            continue
        if r["Proto"] not in ("TCP", "UDP"):
            continue
        proto = r["Proto"].lower()
        out.add(
            (
                r["PID"],
                r["FD"],
                proto,
                4 if r["Family"] == "AF_INET" else 6,
                str(ip_address(r["Source Addr"])),
                int(r["Source Port"]),
                str(ip_address(r["Destination Addr"])),
                int(r["Destination Port"]),
                r["State"] if proto == "tcp" else "",
            )
        )
    return out


def test_volatility_sockstat_with_our_isf_lists_what_xfgate_reads(
    guest_dump: GuestDump, tmp_path: Path
) -> None:
    """Volatility 3 as an oracle: its linux.sockstat over xfgate's ISF export and a QMP dump."""
    offline = DomainConfig(1, "dump", (), MemoryConfig("elf-dump", str(guest_dump.path)))
    with GuestIntrospector(offline, guest_dump.build.profile) as guest:
        ours = {
            (
                s["pid"], s["fd"], s["proto"], s["family"], s["local"], s["lport"],
                s["remote"], s["rport"], s["state"] if s["proto"] == "tcp" else "",
            )
            for s in guest.ps_json()["sockets"]
        }  # fmt: skip
    symbols = _symbols_dir(tmp_path, guest_dump.build.isf_path)
    run = _volatility(symbols, guest_dump.path, "linux.sockstat.Sockstat", tmp_path / "cache")
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = _volatility_sockets(json.loads(run.stdout))
    assert ours == theirs and len(ours) >= 5
