"""The qemu-process backend on real QEMUs: guest RAM read from the QEMU process as stock QEMU
has it (anonymous memory, no share=on), the map from QEMU itself.

- a bare QEMU started here with only a QMP socket (no guest kernel: SeaBIOS runs and stops at
  "no bootable device"): the map around the PCI hole, reads equal to QEMU's own `pmemsave`, a
  hot-plugged DIMM, a QEMU that goes away;
- the shared lab guest (memory-backend-file): both backends give the same walk;
- a lab guest with anonymous RAM (`xfgate-lab up --memory anonymous`, prefix
  $XFGATE_QEMU_LAB_PREFIX or xfqlab, a domains entry with no RAM path and no vifs):
  `xfgate ps --json` equals the guest's /proc and `xfgate run --block-uid 1001` lets 0 attacker
  packets out while uid 0's and uid 1000's services answer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.test_verdict_lab import (
    GUEST4,
    SPRAY_PERIOD,
    Lab,
    leftovers,
    private_lab,
    spray_quiet,
)
from tests.test_vmi_lab import cli_ps_json, ps_against_truth, workload_stopped
from xfgate.config import DomainConfig, MemoryConfig, QmpConfig, load_domains
from xfgate.errors import ConfigError, GuestNotRunning, MemoryReadError
from xfgate.vmi.cli import load_domain_profile
from xfgate.vmi.introspect import GuestIntrospector
from xfgate.vmi.liveness import require_running
from xfgate.vmi.memory import GIB, open_domain_memory, pc_ram_layout
from xfgate.vmi.monitor import open_monitor, process_tap_ifnames, tap_ifnames
from xfgate.vmi.qemu_memory import QemuProcessMemory
from xfgate_lab import lab as labmod
from xfgate_lab.gate_process import start_gate
from xfgate_lab.layout import LabLayout, cache_dir_from_env

pytestmark = [pytest.mark.lab]

MIB = 1 << 20


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class BareQemu:
    """A QEMU with 4 GiB of anonymous RAM (3 GiB below the hole, 1 GiB from 4 GiB; untouched
    pages cost nothing), two DIMM slots, no disk, no network, and a QMP socket."""

    def __init__(self, workdir: Path) -> None:
        self.sock = workdir / "qmp.sock"
        self.pidfile = workdir / "qemu.pid"
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-machine", "pc",
            "-m", "4G,slots=2,maxmem=8G", "-nodefaults", "-display", "none",
            "-qmp", f"unix:{self.sock},server=on,wait=off",
            "-daemonize", "-pidfile", str(self.pidfile),
        ]  # fmt: skip
        subprocess.run(argv, check=True, timeout=30, capture_output=True)
        self.pid = int(self.pidfile.read_text())
        self.domain = DomainConfig(
            id=7,
            name="bare",
            vifs=(),
            memory=MemoryConfig("qemu-process", ""),
            qmp=QmpConfig(str(self.sock)),
        )

    def kill(self) -> None:
        cmd = Path(f"/proc/{self.pid}/cmdline")
        if cmd.exists() and str(self.sock).encode() in cmd.read_bytes():
            os.kill(self.pid, signal.SIGKILL)
            _wait(lambda: not cmd.exists(), 10, "qemu to exit")


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BareQemu]:
    from tests.conftest import require_lab_prerequisites

    require_lab_prerequisites()
    q = BareQemu(tmp_path_factory.mktemp("bareqemu"))
    try:
        time.sleep(1.0)  # SeaBIOS writes its tables and stops at "no bootable device"
        with open_monitor(q.domain) as m:
            m.stop()
        yield q
    finally:
        q.kill()


def test_map_from_qemu_covers_ram_around_the_pci_hole(bare: BareQemu) -> None:
    mem = open_domain_memory(bare.domain)
    assert isinstance(mem, QemuProcessMemory) and mem.pid == bare.pid
    spans = [(r.gpa, r.end) for r in mem.ranges]
    # 4 GiB on `pc`: 3 GiB below 4 GiB, the rest from 4 GiB (memory.pc_ram_layout, what the
    # shared-file backend assumes). Below 1 MiB the firmware's PAM shadowing decides which
    # parts of 0xc0000-0xfffff are RAM now (it changes at run time: revalidate() is for this).
    assert spans[-2:] == [(0x100000, 3 * GIB), (4 * GIB, 5 * GIB)]
    assert spans[0][0] == 0 and all(end <= 0x100000 for _, end in spans[:-2])
    assert {r.block for r in mem.ranges} == {"pc.ram"}
    # one RAMBlock: host address - block offset is the same for every range, where the block
    # offset is what pc_ram_layout says (= gpa below 4 GiB, gpa - 1 GiB above)
    layout = pc_ram_layout(4 * GIB)
    bases = set()
    for r in mem.ranges:
        seg = next(s for s in layout if s.paddr <= r.gpa < s.paddr + s.length)
        bases.add(r.hva - (seg.offset + r.gpa - seg.paddr))
    assert len(bases) == 1
    mem.close()


def _pmemsave(bare: BareQemu, addr: int, size: int, path: Path) -> bytes:
    with open_monitor(bare.domain) as m:
        m.execute("pmemsave", {"val": addr, "size": size, "filename": str(path)})
    return path.read_bytes()


def test_reads_equal_qemus_own_pmemsave(bare: BareQemu, tmp_path: Path) -> None:
    mem = open_domain_memory(bare.domain)
    windows = [(0, 0xC0000), (3 * GIB - 2 * MIB, 2 * MIB), (4 * GIB, MIB)]
    nonzero = 0
    for addr, size in windows:
        want = _pmemsave(bare, addr, size, tmp_path / f"{addr:x}.bin")
        got = mem.read(addr, size)
        assert got == want, f"window {addr:#x}+{size:#x} differs"
        nonzero += sum(1 for b in got if b)
    assert nonzero > 1000  # SeaBIOS left data: the comparison is not zeros against zeros
    with pytest.raises(MemoryReadError, match="no guest RAM"):
        mem.read(3 * GIB - 4, 8)  # into the PCI hole: an error, never padding
    mem.close()


def test_a_hot_plugged_dimm_is_read_after_revalidation(bare: BareQemu, tmp_path: Path) -> None:
    mem = open_domain_memory(bare.domain)
    assert isinstance(mem, QemuProcessMemory)
    with pytest.raises(MemoryReadError):
        mem.read(5 * GIB - 4, 8)
    with open_monitor(bare.domain) as m:
        m.execute("object-add", {"qom-type": "memory-backend-ram", "id": "d1", "size": 128 * MIB})
        m.execute("device_add", {"driver": "pc-dimm", "id": "dimm1", "memdev": "d1"})
    time.sleep(0.3)  # past STALE_MIN_SECONDS since the map was read
    assert mem.revalidate() is True  # the stale mark of the failed read: re-read now
    dimm = [r for r in mem.ranges if r.block == "d1"]
    assert [(r.gpa, r.length) for r in dimm] == [(5 * GIB, 128 * MIB)]
    # one read across two RAM blocks (pc.ram above 4 GiB, then the DIMM): two iovecs
    assert mem.read(5 * GIB - 4, 8) == _pmemsave(bare, 5 * GIB - 4, 8, tmp_path / "x.bin")
    mem.close()


def test_a_wrong_pid_and_a_gone_qemu_are_clear_errors(bare: BareQemu) -> None:
    wrong = replace(bare.domain, qmp=QmpConfig(str(bare.sock), pid=bare.pid + 100000))
    with pytest.raises(ConfigError, match="served by pid"):
        open_domain_memory(wrong)
    mem = open_domain_memory(bare.domain)
    assert isinstance(mem, QemuProcessMemory)
    require_running(bare.domain)
    bare.kill()
    with pytest.raises(MemoryReadError, match="QEMU is gone"):
        mem.read(0x1000, 8)
    with pytest.raises(GuestNotRunning, match="gone"):
        mem.revalidate()
    with pytest.raises(GuestNotRunning):
        open_domain_memory(bare.domain)
    with pytest.raises(GuestNotRunning):
        require_running(bare.domain)


# --- the shared lab guest: both backends read the same guest -----------------------------------


def test_both_backends_give_the_same_walk(lab_domain: DomainConfig, lab_layout: LabLayout) -> None:
    """A memory-backend-file guest is also a QEMU process: read it both ways, same results."""
    profile = load_domain_profile(lab_domain, None, cache_dir_from_env())
    assert lab_domain.qmp is not None
    proc_domain = replace(lab_domain, memory=MemoryConfig("qemu-process", ""))
    with (
        GuestIntrospector(lab_domain, profile, allow_pause=False) as shared,
        GuestIntrospector(proc_domain, profile, allow_pause=False) as process,
    ):
        assert isinstance(process.memory, QemuProcessMemory)
        assert {r.block for r in process.memory.ranges} == {"mem"}  # the file backend's block
        with workload_stopped(lab_layout):
            for _ in range(3):  # a kernel thread may come or go between the two walks
                a, b = shared.ps_json(), process.ps_json()
                if a == b:
                    break
        assert a == b
        assert shared.boot().location.virt_shift == process.boot().location.virt_shift
        assert len(a["processes"]) > 20 and a["sockets"]


# --- a lab guest with anonymous RAM, as operators run them -------------------------------------


@pytest.fixture(scope="module")
def alab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    prefix = os.environ.get("XFGATE_QEMU_LAB_PREFIX", "xfqlab")
    counted = (("tcp", 2222), ("udp", 5353))
    workdir = tmp_path_factory.mktemp("xfqlab")
    with private_lab(workdir, prefix, counted, memory="anonymous") as lab:
        yield lab


def test_anonymous_lab_guest_has_no_ram_file_and_an_operators_entry(alab: Lab) -> None:
    dom = load_domains(Path(alab.env["XFGATE_DOMAINS"]))[1]
    assert dom.memory == MemoryConfig("qemu-process", "") and dom.vifs == ()
    assert dom.qmp is not None and dom.qmp.pid == 0
    assert not alab.layout.ram_path(1).exists()
    pid = labmod.read_state(alab.layout).qemu_pid(1)  # type: ignore[union-attr]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b"memory-backend" not in cmdline and b"share=on" not in cmdline
    with open_monitor(dom) as m:
        assert tap_ifnames(m.human("info network")) == ("vif1.0",)
    assert process_tap_ifnames(pid) == ("vif1.0",)  # the same from QEMU's open /dev/net/tun


def test_ps_json_equals_truth_on_anonymous_ram(alab: Lab) -> None:
    diffs, ps = ps_against_truth(alab.layout, cli_ps_json(1, env=alab.env), max_collector=3)
    assert diffs == []
    assert len({p["uid"] for p in ps["processes"]}) >= 3
    assert {s["family"] for s in ps["sockets"]} == {4, 6}


def test_block_uid_1001_on_anonymous_ram(alab: Lab) -> None:
    log, out = alab.workdir / "verdicts.log", alab.workdir / "gate.out"
    process = start_gate(
        ["--domain", "1", "--log", str(log), "--block-uid", "1001"], out, env=alab.env
    )
    try:
        process.wait_ready(90)
        assert spray_quiet(alab, 6 * SPRAY_PERIOD * 2) == (0, 0)
        assert alab.http(GUEST4, 80) and alab.http(GUEST4, 8080) and alab.http(GUEST4, 8000)
        status = alab.xfgate(["status", "--domain", "1", "--json"])
        assert '"vif1.0"' in status.stdout  # the vif came from QEMU, not the domains file
    finally:
        assert process.stop(signal.SIGTERM, timeout=30) == 0
        alab.xfgate(["cleanup", "--domain", "1"])
    assert "vifs from QEMU: vif1.0" in out.read_text()


def test_a_gate_lets_go_of_a_guest_whose_qemu_exits(alab: Lab) -> None:
    """Last in the module: it kills the anonymous lab's QEMU (the fixture's `down` copes)."""
    out = alab.workdir / "gate-gone.out"
    process = start_gate(["--domain", "1", "--block-uid", "1001"], out, env=alab.env)
    try:
        process.wait_ready(90)
        state = labmod.read_state(alab.layout)
        assert state is not None
        os.kill(state.qemu_pid(1), signal.SIGKILL)
        _wait(lambda: process.proc.poll() is not None, 60, "the gate to let go and end")
    finally:
        if process.proc.poll() is None:
            process.stop(signal.SIGTERM, timeout=30)
    text = out.read_text()
    assert "domain 1 let go: domain" in text and "is not running" in text, text[-2000:]
    assert "no domain left to serve" in text
    assert leftovers(alab) == []  # its chains, sets and queue rule are gone
