"""Is the domain's VM alive? A QEMU RAM file outlives QEMU (lab notes), so reading it after the
VM died would show a dead guest's processes as if they were running: refuse instead."""

from __future__ import annotations

from pathlib import Path

from xfgate.config import DomainConfig
from xfgate.errors import GuestNotRunning, QmpError
from xfgate.vmi.monitor import open_monitor, qemu_pid

# Dumps and raw images are offline by nature; LibVMI checks itself.
LIVE_BACKENDS = ("qemu-shm", "qemu-process")


def qemu_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_domains_qemu(cmdline: list[str], ram_path: str) -> bool:
    """The process is a QEMU whose guest RAM is `ram_path` (pure: for tests)."""
    return bool(cmdline) and "qemu" in Path(cmdline[0]).name and any(ram_path in a for a in cmdline)


def require_running(domain: DomainConfig, qmp_timeout: float = 2.0) -> None:
    """Raise GuestNotRunning unless the domain's VM is alive (running or paused)."""
    if domain.memory.backend not in LIVE_BACKENDS:
        return
    if domain.memory.backend == "qemu-process":
        qemu_pid(domain)  # the socket's QEMU, agreeing with qmp.pid: or GuestNotRunning
        _require_status(domain, qmp_timeout)
        return
    if not Path(domain.memory.path).exists():
        raise GuestNotRunning(domain.id, f"its RAM file {domain.memory.path} does not exist")
    if domain.qmp is None:
        return  # nothing to ask: the RAM file is all we have
    if domain.qmp.pid:
        if not is_domains_qemu(qemu_cmdline(domain.qmp.pid), domain.memory.path):
            raise GuestNotRunning(
                domain.id,
                f"QEMU pid {domain.qmp.pid} is gone; {domain.memory.path} holds the memory of a "
                "dead guest (start the domain again, or `xfgate-lab up` for the demo)",
            )
        return
    _require_status(domain, qmp_timeout)


def _require_status(domain: DomainConfig, qmp_timeout: float) -> None:
    where = domain.qmp.socket if domain.qmp is not None else "(through libvirt)"
    try:
        with open_monitor(domain, timeout=qmp_timeout) as qmp:
            status = qmp.status()
    except (QmpError, OSError) as e:
        raise GuestNotRunning(domain.id, f"its QEMU monitor {where} does not answer: {e}") from e
    if status in ("shutdown", "guest-panicked", "internal-error"):
        raise GuestNotRunning(domain.id, f"QEMU reports the guest as {status}")
