"""The LibVMI backend through LibVMI's file driver, on the synthetic guest and on a QEMU dump of
the lab guest (its Xen driver needs a Xen host: untested). Without the `libvmi` wheel these
tests skip with the reason; under CI=true they fail instead."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.conftest import in_ci
from tests.vmi_fakes import standard_guest
from xfgate.config import DomainConfig, MemoryConfig
from xfgate.errors import GuestNotRunning, MemoryReadError
from xfgate.vmi.cli import load_domain_profile
from xfgate.vmi.introspect import GuestIntrospector, ps_document
from xfgate.vmi.memory import ElfDumpMemory, LibvmiMemory, open_memory
from xfgate.vmi.qmp import QmpClient


@pytest.fixture(autouse=True)
def _libvmi_wheel() -> None:
    if importlib.util.find_spec("libvmi") is None:
        reason = "the libvmi wheel is not installed (pip install 'xfgate[xen]')"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)


def test_walk_through_libvmi_file_mode_equals_buffer(tmp_path: Path) -> None:
    g = standard_guest()
    path = tmp_path / "guest.raw"
    path.write_bytes(g.buf)
    mem = open_memory(MemoryConfig("libvmi", f"file:{path}"))
    assert isinstance(mem, LibvmiMemory) and mem.size == len(g.buf)
    assert mem.read(0x80000, 10) == bytes(g.buf[0x80000:0x80010])[:10]
    with pytest.raises(MemoryReadError):
        mem.read(len(g.buf) - 4, 8)
    dom = DomainConfig(1, "f", (), MemoryConfig("libvmi", f"file:{path}"))
    with GuestIntrospector(dom, g.profile, memory=mem) as via_libvmi:
        a = via_libvmi.ps_json()
    with GuestIntrospector(dom, g.profile, memory=g.memory) as via_buffer:
        b = via_buffer.ps_json()
    assert a == b and len(a["sockets"]) == 5


def test_libvmi_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GuestNotRunning, match="LibVMI could not open"):
        LibvmiMemory(str(tmp_path / "none.raw"), file_mode=True)


@pytest.mark.lab
def test_libvmi_file_mode_on_a_qemu_dump_of_the_lab_guest(
    lab_domain: DomainConfig, tmp_path: Path
) -> None:
    """`dump-guest-memory` of the running lab guest; its RAM read through LibVMI's file driver
    gives the same walk as the ELF dump read by xfgate itself, and a complete one."""
    assert lab_domain.qmp is not None
    elf = tmp_path / "guest.elf"
    with QmpClient(lab_domain.qmp.socket) as qmp:
        qmp.dump_guest_memory(str(elf))
    dump = ElfDumpMemory(elf)
    ram = next(s for s in dump.segments if s.paddr == 0)  # RAM; the BIOS ROM is elsewhere
    raw = tmp_path / "guest.raw"  # LibVMI's file driver reads a raw physical image
    raw.write_bytes(dump.read(0, ram.length))
    profile = load_domain_profile(lab_domain, os.environ.get("XFGATE_PROFILE"))
    offline = DomainConfig(1, "dump", (), MemoryConfig("libvmi", f"file:{raw}"))
    mem = open_memory(offline.memory)
    assert isinstance(mem, LibvmiMemory) and mem.size == ram.length
    with GuestIntrospector(offline, profile, memory=mem) as via_libvmi:  # closes mem
        a = via_libvmi.walk()
    with GuestIntrospector(offline, profile, memory=dump) as via_elf:  # closes dump
        b = via_elf.walk()
    assert a.errors == [] and b.errors == []
    assert len(a.tasks) > 20 and a.sockets
    assert ps_document(a) == ps_document(b)
