"""A dead VM's RAM file is refused, not read as if the guest were alive."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xfgate.config import DomainConfig, MemoryConfig, QmpConfig
from xfgate.errors import GuestNotRunning
from xfgate.vmi import liveness
from xfgate.vmi.liveness import is_domains_qemu, require_running


def test_is_domains_qemu_checks_the_program_and_its_ram_file() -> None:
    argv = ["qemu-system-x86_64", "-object", "memory-backend-file,mem-path=/dev/shm/g1.mem"]
    assert is_domains_qemu(argv, "/dev/shm/g1.mem")
    assert not is_domains_qemu(argv, "/dev/shm/g2.mem")
    assert not is_domains_qemu(["/bin/sleep", "/dev/shm/g1.mem"], "/dev/shm/g1.mem")
    assert not is_domains_qemu([], "/dev/shm/g1.mem")


def _domain(ram: Path, pid: int, socket: str = "/nonexistent/qmp.sock") -> DomainConfig:
    return DomainConfig(
        7, "g", ("vif7.0",), MemoryConfig("qemu-shm", str(ram)), QmpConfig(socket, pid)
    )


def test_stale_ram_file_of_a_dead_qemu_is_refused(tmp_path: Path) -> None:
    ram = tmp_path / "g.mem"
    ram.write_bytes(b"\0" * 4096)
    with pytest.raises(GuestNotRunning, match=r"domain 7 is not running: QEMU pid .* is gone"):
        require_running(_domain(ram, os.getpid()))  # this pytest process is no QEMU
    with pytest.raises(GuestNotRunning, match="does not answer"):
        require_running(_domain(ram, 0))  # no pid recorded: the monitor is asked
    with pytest.raises(GuestNotRunning, match="does not exist"):
        require_running(_domain(tmp_path / "missing.mem", 0))


def test_offline_backends_need_no_running_vm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[int] = []

    def cmdline(pid: int) -> list[str]:
        asked.append(pid)
        return []

    monkeypatch.setattr(liveness, "qemu_cmdline", cmdline)
    ram = tmp_path / "x.mem"
    ram.write_bytes(b"\0" * 4096)
    for backend in ("elf-dump", "raw", "libvmi"):
        offline = DomainConfig(1, "d", (), MemoryConfig(backend, str(ram)), QmpConfig("/no", 1))
        require_running(offline)  # no GuestNotRunning: a dump is read as it is...
    assert asked == []  # ...and no process was even looked at
    live = DomainConfig(1, "d", (), MemoryConfig("qemu-shm", str(ram)), QmpConfig("/no", 1))
    with pytest.raises(GuestNotRunning, match="is gone"):
        require_running(live)  # the same file and pid, for a live backend: checked, refused
    assert asked == [1]
