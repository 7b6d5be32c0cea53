"""The QEMU monitor as introspection needs it, whoever carries it (QMP socket, libvirt).

`Monitor` is the one interface the rest of xfgate uses: QMP commands, HMP commands through
`human-monitor-command`, pause/resume, the run state and the vCPU control registers.
`open_monitor(domain)` picks the transport for a domain; callers never build a client
themselves. A monitor connects on `__enter__` (or its first command) and lets go on `close`:
QEMU serves one QMP client at a time, so nobody holds it longer than a command sequence.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
from pathlib import Path
from typing import Any, Protocol

from xfgate.config import DomainConfig
from xfgate.errors import ConfigError, GuestNotRunning, QmpError
from xfgate.vmi.qmp import DEFAULT_TIMEOUT, ControlRegisters, QmpClient


class Monitor(Protocol):
    """A QEMU monitor session (see QmpClient for the reference implementation)."""

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any: ...

    def human(self, command_line: str) -> str: ...

    def stop(self) -> None: ...

    def cont(self) -> None: ...

    def status(self) -> str: ...

    def is_running(self) -> bool: ...

    def control_registers(self) -> ControlRegisters: ...

    def close(self) -> None: ...

    def __enter__(self) -> Monitor: ...

    def __exit__(self, *exc: object) -> None: ...


def open_monitor(domain: DomainConfig, timeout: float = DEFAULT_TIMEOUT) -> Monitor:
    """The monitor of a domain (not connected yet: use it as a context manager)."""
    if domain.qmp is not None:
        return QmpClient(domain.qmp.socket, timeout=timeout, domain=domain.id)
    if domain.libvirt is not None:
        # libvirt owns its QEMU's monitor: QMP through libvirt's passthrough (README: libvirt).
        from xfgate.hypervisor.libvirt import LibvirtMonitor

        return LibvirtMonitor(domain.libvirt.uri, domain.libvirt.uuid)
    raise ConfigError(
        f"domain {domain.id} has neither a [domain.qmp] socket nor a libvirt domain: no monitor"
    )


_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


def socket_peer_pid(path: str, timeout: float = 2.0) -> int:
    """The pid of the process serving a unix socket (SO_PEERCRED of a fresh connection).

    Connecting to a QMP socket briefly takes QEMU's single monitor slot; we close before
    reading anything, so QEMU drops us at once."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            break
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise GuestNotRunning(
                path, f"QEMU monitor {path} does not answer ({e.strerror})"
            ) from None
        except BlockingIOError as e:  # the listen backlog is full: a client holds the monitor
            if time.monotonic() >= deadline:
                raise QmpError(
                    f"QMP socket {path} accepts no connection within {timeout} s (its backlog "
                    "is full: another client holds the monitor)"
                ) from e
        except OSError as e:
            raise QmpError(f"cannot connect to QMP socket {path}: {e}") from e
        finally:
            sock.close()
        time.sleep(0.05)
    pid = int(_UCRED.unpack(raw)[0])
    if pid <= 0:
        raise QmpError(f"QMP socket {path}: no peer credentials (pid {pid})")
    return pid


def process_start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat (start time in clock ticks): a pid and its start time name
    one process, a recycled pid has another start time. 0 if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0
    # comm (field 2) may contain spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return 0


def qemu_pid(domain: DomainConfig) -> int:
    """The pid of the domain's QEMU: from its QMP socket's SO_PEERCRED; a configured
    `qmp.pid` must agree (a stale one names a dead or another process)."""
    if domain.qmp is None:
        if domain.libvirt is not None and domain.libvirt.pid:
            # libvirt's pid, checked against the QEMU's command line when it was discovered
            if not os.path.exists(f"/proc/{domain.libvirt.pid}"):
                raise GuestNotRunning(domain.id, f"QEMU pid {domain.libvirt.pid} is gone")
            return domain.libvirt.pid
        raise ConfigError(f"domain {domain.id} has no [domain.qmp] socket: cannot find its QEMU")
    peer = socket_peer_pid(domain.qmp.socket)
    if domain.qmp.pid and domain.qmp.pid != peer:
        raise ConfigError(
            f"domain {domain.id}: qmp.pid = {domain.qmp.pid} in the domains file, but "
            f"{domain.qmp.socket} is served by pid {peer} (a restarted QEMU? fix or drop qmp.pid)"
        )
    if not os.path.exists(f"/proc/{peer}"):
        raise GuestNotRunning(domain.id, f"QEMU pid {peer} is gone")
    return peer


# `info network`: " \ n0: index=0,type=tap,ifname=vif1.0,script=no,downscript=no"
_TAP_RE = re.compile(r"\btype=tap,(?:[^,\s]+,)*?ifname=([^,\s]+)")


def tap_ifnames(info_network: str) -> tuple[str, ...]:
    """The host tap devices of a QEMU's network backends, from `info network` text."""
    names: list[str] = []
    for m in _TAP_RE.finditer(info_network):
        if m.group(1) not in names:
            names.append(m.group(1))
    return tuple(names)


def process_tap_ifnames(pid: int, max_fds: int = 65536) -> tuple[str, ...]:
    """The tap devices a process holds open: its /dev/net/tun descriptors, whose fdinfo names
    the interface (`iff:`, drivers/net/tun.c tun_chr_show_fdinfo). Covers taps handed to QEMU
    as a file descriptor (libvirt's `-netdev tap,fd=N`), which `info network` does not name."""
    names: list[str] = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")[:max_fds]
    except OSError:
        return ()
    for fd in sorted(fds, key=lambda f: int(f) if f.isdigit() else -1):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "/dev/net/tun":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        for line in info.splitlines():
            if line.startswith("iff:") and line.split()[1:] and line.split()[1] not in names:
                names.append(line.split()[1])
    return tuple(names)


def domain_vifs(domain: DomainConfig) -> tuple[str, ...]:
    """The domain's vifs: as configured, else the taps its QEMU uses (for QEMU-process domains,
    whose vifs need not be written down): named by `info network`, or, for taps passed as a
    file descriptor, found in the QEMU process's open files."""
    if domain.vifs or (domain.qmp is None and domain.libvirt is None):
        return domain.vifs
    with open_monitor(domain) as monitor:
        found = tap_ifnames(monitor.human("info network"))
    if not found:
        found = process_tap_ifnames(qemu_pid(domain))
    if not found:
        raise ConfigError(
            f"domain {domain.id} has no vifs in the domains file and its QEMU has no tap "
            "network backend (`info network`): give `vifs = [...]`"
        )
    return found
