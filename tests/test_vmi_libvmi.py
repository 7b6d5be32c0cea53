"""The LibVMI backend through LibVMI's file driver (its Xen driver needs a Xen host: untested)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vmi_fakes import standard_guest
from xfgate.config import DomainConfig, MemoryConfig
from xfgate.errors import GuestNotRunning, MemoryReadError
from xfgate.vmi.introspect import GuestIntrospector
from xfgate.vmi.memory import LibvmiMemory, open_memory

pytest.importorskip("libvmi")


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
