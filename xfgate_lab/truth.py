"""Ground truth from inside a guest: what its own /proc says about processes and sockets.

For tests only (compared with what introspection finds); never used by xfgate's decisions.
The guest runs ``TRUTH_SCRIPT`` (raw /proc text, no parsing in the guest) and the host parses
the sections with the pure functions below.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from xfgate.vmi.kernel_constants import tcp_state_name
from xfgate_lab.errors import LabError

SECTION_MARK = "@@xftruth "
# Only leaders are listed under /proc (threads live under /proc/PID/task). stderr is dropped:
# processes that exit during the listing make grep/stat complain and that is expected.
TRUTH_SCRIPT = (
    "cd /proc; "
    f"echo '{SECTION_MARK}status'; grep -E '^(Name|Pid|Tgid|PPid|Uid):' [0-9]*/status; "
    f"echo '{SECTION_MARK}fd'; stat -c '%n|%N' [0-9]*/fd/*; "
    "for t in tcp tcp6 udp udp6; do "
    f"echo '{SECTION_MARK}'$t; cat net/$t; done; "
    "true"
)


NET_TABLES: Mapping[str, tuple[str, int]] = {
    "tcp": ("tcp", 4),
    "tcp6": ("tcp", 6),
    "udp": ("udp", 4),
    "udp6": ("udp", 6),
}


@dataclass(frozen=True, order=True)
class TruthProcess:
    pid: int
    tgid: int
    ppid: int
    uid: int
    euid: int
    comm: str


@dataclass(frozen=True)
class NetEntry:
    """One row of /proc/net/{tcp,tcp6,udp,udp6}."""

    proto: str
    family: int
    local: str
    lport: int
    remote: str
    rport: int
    state: str
    inode: int


@dataclass(frozen=True, order=True)
class TruthSocket:
    pid: int
    fd: int
    proto: str
    family: int
    local: str
    lport: int
    remote: str
    rport: int
    state: str


@dataclass(frozen=True)
class Truth:
    processes: tuple[TruthProcess, ...]
    sockets: tuple[TruthSocket, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "processes": [asdict(p) for p in self.processes],
            "sockets": [asdict(s) for s in self.sockets],
        }


def split_sections(text: str) -> dict[str, str]:
    """Section name -> body, from the ``@@xftruth NAME`` lines TRUTH_SCRIPT prints."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith(SECTION_MARK):
            current = sections.setdefault(line[len(SECTION_MARK) :].strip(), [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines) for name, lines in sections.items()}


_STATUS_RE = re.compile(r"^(\d+)/status:(Name|Pid|Tgid|PPid|Uid):\t?(.*)$")


def parse_status(text: str) -> tuple[TruthProcess, ...]:
    """``grep`` output over /proc/*/status to processes; incomplete ones (exited mid-listing)
    are left out. pid 0 never appears in /proc."""
    fields: dict[int, dict[str, str]] = {}
    for line in text.splitlines():
        m = _STATUS_RE.match(line)
        if m:
            fields.setdefault(int(m.group(1)), {})[m.group(2)] = m.group(3)
    processes = []
    for dir_pid, f in fields.items():
        if not {"Name", "Pid", "Tgid", "PPid", "Uid"} <= f.keys():
            continue
        uids = f["Uid"].split()
        if len(uids) < 2:
            continue
        pid = int(f["Pid"])
        if pid != dir_pid:
            continue
        processes.append(
            TruthProcess(
                pid=pid,
                tgid=int(f["Tgid"]),
                ppid=int(f["PPid"]),
                uid=int(uids[0]),
                euid=int(uids[1]),
                comm=f["Name"],
            )
        )
    return tuple(sorted(processes))


_FD_RE = re.compile(r"^(\d+)/fd/(\d+)\|.* -> '?socket:\[(\d+)\]'?$")


def parse_fd_links(text: str) -> tuple[tuple[int, int, int], ...]:
    """``stat -c '%n|%N'`` over /proc/*/fd/* to (pid, fd, socket inode), sockets only."""
    links = []
    for line in text.splitlines():
        m = _FD_RE.match(line.strip())
        if m:
            links.append((int(m.group(1)), int(m.group(2)), int(m.group(3))))
    return tuple(sorted(links))


def decode_proc_net_address(hex_addr: str) -> str:
    """/proc/net address text to canonical form. The kernel prints each 32-bit word of the
    network-order address as a host-order (little-endian here) %08X."""
    raw = bytes.fromhex(hex_addr)
    if len(raw) not in (4, 16):
        raise ValueError(f"bad /proc/net address {hex_addr!r}")
    swapped = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(IPv4Address(swapped) if len(raw) == 4 else IPv6Address(swapped))


def parse_proc_net(text: str, table: str) -> tuple[NetEntry, ...]:
    """Rows of /proc/net/<table> (tcp, tcp6, udp, udp6); the header and junk lines skipped."""
    proto, family = NET_TABLES[table]
    entries = []
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 10 or not cols[0].endswith(":") or not cols[0][:-1].isdigit():
            continue
        try:
            local, lport = cols[1].split(":")
            remote, rport = cols[2].split(":")
            entries.append(
                NetEntry(
                    proto=proto,
                    family=family,
                    local=decode_proc_net_address(local),
                    lport=int(lport, 16),
                    remote=decode_proc_net_address(remote),
                    rport=int(rport, 16),
                    state=tcp_state_name(int(cols[3], 16)),
                    inode=int(cols[9]),
                )
            )
        except ValueError:
            continue
    return tuple(entries)


def join_sockets(
    links: Iterable[tuple[int, int, int]], entries: Iterable[NetEntry]
) -> tuple[TruthSocket, ...]:
    """One TruthSocket per (pid, fd) holding an inet socket; sockets no fd holds (inode 0,
    TIME_WAIT) drop out, as do fds of non-inet sockets."""
    by_inode = {e.inode: e for e in entries if e.inode != 0}
    sockets = []
    for pid, fd, inode in links:
        e = by_inode.get(inode)
        if e is None:
            continue
        sockets.append(
            TruthSocket(pid, fd, e.proto, e.family, e.local, e.lport, e.remote, e.rport, e.state)
        )
    return tuple(sorted(sockets))


def parse_truth(text: str) -> Truth:
    """The whole TRUTH_SCRIPT output to a Truth."""
    sections = split_sections(text)
    missing = [s for s in ("status", "fd", *NET_TABLES) if s not in sections]
    if missing:
        raise LabError(
            f"guest truth output lacks section(s) {', '.join(missing)}: the control channel "
            "returned truncated output; retry, or look at the guest's serial.log"
        )
    entries = [e for t in NET_TABLES for e in parse_proc_net(sections[t], t)]
    return Truth(
        processes=parse_status(sections["status"]),
        sockets=join_sockets(parse_fd_links(sections["fd"]), entries),
    )


def iter_workload(truth: Truth, comm: str) -> Iterator[TruthProcess]:
    """Processes named ``comm`` (a small helper for tests and the CLI)."""
    return (p for p in truth.processes if p.comm == comm)
