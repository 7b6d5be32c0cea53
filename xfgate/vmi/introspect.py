"""One guest seen from the host: processes, sockets and who owns a flow (xfgate.flow.OwnerSource).

Ties the layers together: physical memory (memory.py), the kernel's location (kaslr.py), the
page tables (paging.py), bounded walks (linux.py) and hash-table lookups (sockets.py). Full walks
keep an index {struct sock address -> owners}; a targeted lookup finds the sock in the kernel's
hash tables and asks the index, walking again only for a sock it has not seen yet.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from xfgate.config import DomainConfig
from xfgate.errors import MemoryReadError, ProfileError, WalkError
from xfgate.flow import Flow, GuestSocket, Owner, Ownership, Via
from xfgate.inet import IPProto
from xfgate.vmi.kaslr import KernelLocation, KernelLocator
from xfgate.vmi.kernel_constants import TCPState
from xfgate.vmi.linux import (
    FdSocket,
    KernelLayout,
    Task,
    WalkBounds,
    WalkResult,
    walk_guest,
)
from xfgate.vmi.memory import PhysicalMemory, open_memory
from xfgate.vmi.paging import AddressSpace
from xfgate.vmi.profile import Profile
from xfgate.vmi.qmp import ControlRegisters, PauseRecord, QmpClient, paused
from xfgate.vmi.sockets import FoundSock, HashLayout, HashTable, SocketTables

LOOKUP_RETRIES = 2
# What an answer's `via` is when the sock's table says it all (the other cases are decided
# in GuestIntrospector.lookup).
VIA_OF_TABLE: Mapping[HashTable, Via] = MappingProxyType(
    {
        HashTable.ESTABLISHED: Via.ESTABLISHED,
        HashTable.TIME_WAIT: Via.TIME_WAIT,
        HashTable.LISTENER: Via.LISTENER,
        HashTable.UDP: Via.UDP,
    }
)
# How long a checked boot is trusted by lookups before the RAM file's identity and the banner
# are checked again. A reboot takes seconds before the new kernel has any socket, a lookup
# that meets unreadable memory re-checks at once, and every walk checks: 50 ms loses nothing.
REVALIDATE_SECONDS = 0.05


@dataclass
class _Boot:
    """What is valid for one guest boot (one KASLR location)."""

    location: KernelLocation
    space: AddressSpace
    tables: SocketTables | None
    owners: dict[int, tuple[Owner, ...]] = field(default_factory=dict)
    last_walk: WalkResult | None = None


class GuestIntrospector:
    """Introspection of one domain. Not thread-safe: one caller at a time."""

    def __init__(
        self,
        domain: DomainConfig,
        profile: Profile,
        *,
        memory: PhysicalMemory | None = None,
        bounds: WalkBounds | None = None,
        allow_pause: bool = True,
        min_rewalk_seconds: float = 0.0,
        revalidate_seconds: float = REVALIDATE_SECONDS,
    ) -> None:
        """`min_rewalk_seconds`: a lookup meeting a socket the index does not know walks again
        unless the last walk is younger than this (0: always, exact; more: cheaper under a
        flood of new connections, at the risk of answering with no owner).
        `revalidate_seconds`: lookups re-check the boot (RAM file identity, banner) at most
        this often (0: on every lookup); walks always re-check."""
        self.domain = domain
        self.profile = profile
        self.bounds = bounds or WalkBounds()
        self.allow_pause = allow_pause
        self.min_rewalk_seconds = min_rewalk_seconds
        self.revalidate_seconds = revalidate_seconds
        self._last_walk = -1e9
        self._checked_at = -1e9  # monotonic time of the last boot check that passed
        self._owns_memory = memory is None
        self.memory = memory if memory is not None else open_memory(domain.memory)
        # QEMU serves one QMP client at a time: connect per use, never hold the monitor.
        self._qmp_socket = domain.qmp.socket if domain.qmp else ""
        self.layout = KernelLayout.from_profile(profile)
        try:
            self.hashes: HashLayout | None = HashLayout.from_profile(profile)
            self.hash_problem = ""
        except ProfileError as e:  # lookups fall back to the walk index
            self.hashes, self.hash_problem = None, str(e)
        self.locator = KernelLocator(
            self.memory, profile, self._registers if self._qmp_socket else None
        )
        self._boot: _Boot | None = None
        self.pause_records: list[float] = []  # seconds of every pause we caused

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        self.memory.close()

    def __enter__(self) -> GuestIntrospector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _registers(self) -> ControlRegisters:
        with QmpClient(self._qmp_socket, domain=self.domain.id) as qmp:
            return qmp.control_registers()

    @contextmanager
    def _pause(self) -> Iterator[PauseRecord]:
        with QmpClient(self._qmp_socket, domain=self.domain.id) as qmp, paused(qmp) as record:
            yield record

    def _memory_replaced(self) -> bool:
        """A new QEMU (or a new dump) behind the same path: our mapping shows the old one."""
        if not self._owns_memory or self.domain.memory.backend == "libvmi":
            return False
        try:
            st = os.stat(self.domain.memory.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino, st.st_size) != self.memory.identity()

    def boot(self, *, recheck: bool = True) -> _Boot:
        """The current boot's state; the kernel re-located after a reboot or a new QEMU.
        With `recheck` False, a boot checked less than `revalidate_seconds` ago is trusted
        without the stat and banner read (the per-lookup fast path)."""
        if (
            not recheck
            and self._boot is not None
            and time.monotonic() - self._checked_at < self.revalidate_seconds
        ):
            return self._boot
        boot = self._checked_boot()
        self._checked_at = time.monotonic()
        return boot

    def _checked_boot(self) -> _Boot:
        if self._memory_replaced():
            self.memory.close()
            self.memory = open_memory(self.domain.memory)
            self.locator = KernelLocator(
                self.memory, self.profile, self._registers if self._qmp_socket else None
            )
            self.locator.generation = self.generation() + 1
            self._boot = None
        if self._boot is not None and self.locator.still_valid():
            return self._boot
        location = self.locator.locate()
        space = AddressSpace(
            self.memory, location.root, location.levels, f"domain {self.domain.id}"
        )
        tables = (
            SocketTables(space, self.layout, self.hashes, location.virt_shift)
            if self.hashes is not None
            else None
        )
        self._boot = _Boot(location, space, tables)
        return self._boot

    def generation(self) -> int:
        return self.locator.generation

    # -- full walks -----------------------------------------------------------------------------

    def walk(self) -> WalkResult:
        """Every process and inet socket; refreshes the owner index."""
        boot = self.boot()
        pause = self._pause if (self._qmp_socket and self.allow_pause) else None
        self._last_walk = time.monotonic()
        result = walk_guest(boot.space, self.layout, boot.location.virt_shift, self.bounds, pause)
        if result.paused_seconds:
            self.pause_records.append(result.paused_seconds)
        if not result.tasks and result.errors:
            # Nothing readable at all: the guest may have rebooted under us. Re-locate once.
            self._boot = None
            boot = self.boot()
            result = walk_guest(
                boot.space, self.layout, boot.location.virt_shift, self.bounds, pause
            )
        boot.owners = owners_index(result.tasks, result.sockets)
        boot.last_walk = result
        return result

    def processes(self) -> list[Task]:
        return sorted(self.walk().tasks, key=lambda t: t.pid)

    def sockets(self) -> Sequence[GuestSocket]:
        result = self.walk()
        return guest_sockets(result.sockets, owners_index(result.tasks, result.sockets))

    def ps_json(self, result: WalkResult | None = None) -> dict[str, Any]:
        """Exactly the shape of `xfgate-lab truth --json`."""
        return ps_document(result if result is not None else self.walk())

    # -- targeted lookup ------------------------------------------------------------------------

    def _find(self, tables: SocketTables, flow: Flow, listener_only: bool) -> FoundSock | None:
        find = tables.find_listener if listener_only else tables.find
        found = find(flow)
        for _ in range(LOOKUP_RETRIES):
            if found is not None or not tables.errors:
                break
            found = find(flow)  # a chain torn by the guest changing it: again
        if found is None and tables.errors:
            self._checked_at = -1e9  # unreadable: the next lookup re-checks the boot first
        return found

    def lookup_listener(self, flow: Flow) -> Ownership | None:
        """The TCP listener that would take a new connection to `flow`'s local end (what a
        SYN meeting a TIME_WAIT sock is handed to), with its owners; None if none listens."""
        boot = self.boot(recheck=False)
        if boot.tables is None or flow.proto != IPProto.TCP:
            return None
        found = self._find(boot.tables, flow, listener_only=True)
        if found is None:
            return None
        sock = found.sock
        owners = self._owners_of(boot, sock.address)
        return Ownership(owners, sock.sk_uid, sock.state_name, Via.LISTENER, sock.address)

    def lookup(self, flow: Flow) -> Ownership | None:
        boot = self.boot(recheck=False)
        if boot.tables is None:
            return self._lookup_by_walk(flow)
        found = self._find(boot.tables, flow, listener_only=False)
        if found is None:
            return None
        sock = found.sock
        if found.table is HashTable.TIME_WAIT:
            return Ownership((), sock.sk_uid, sock.state_name, Via.TIME_WAIT, sock.address)
        if found.table is HashTable.REQUEST:
            owners = self._owners_of(boot, found.listener)
            try:
                listener_sock = boot.space.read(found.listener, self.layout.sock_span)
                sk_uid = self.layout.sk_uid.get(listener_sock)
            except MemoryReadError:
                sk_uid = -1
            return Ownership(
                owners,
                sk_uid,
                TCPState.NEW_SYN_RECV.name,
                Via.REQUEST_SOCK_LISTENER,
                found.listener,
            )
        owners = self._owners_of(boot, sock.address)
        if not owners and found.table is HashTable.ESTABLISHED and flow.proto == IPProto.TCP:
            # Accepted by the kernel, not yet by the process: it waits in the listener's queue.
            listener = boot.tables.find_listener(flow)
            if listener is not None:
                return Ownership(
                    self._owners_of(boot, listener.sock.address),
                    sock.sk_uid,
                    sock.state_name,
                    Via.ESTABLISHED_LISTENER,
                    sock.address,
                )
        return Ownership(
            owners, sock.sk_uid, sock.state_name, VIA_OF_TABLE[found.table], sock.address
        )

    def _owners_of(self, boot: _Boot, sock_addr: int) -> tuple[Owner, ...]:
        owners = boot.owners.get(sock_addr)
        recent = time.monotonic() - self._last_walk < self.min_rewalk_seconds
        if owners is None and not recent:  # a socket newer than our last walk
            self.walk()
            boot = self.boot(recheck=False)  # the walk just checked it
            owners = boot.owners.get(sock_addr, ())
        return owners or ()

    def _lookup_by_walk(self, flow: Flow) -> Ownership | None:
        """Without hash-table layouts in the profile: match the walk's sockets by 5-tuple."""
        result = self.walk()
        index = owners_index(result.tasks, result.sockets)
        for s in result.sockets:
            k = s.sock
            if (k.proto, k.lport) != (flow.proto, flow.lport) or k.local != flow.local:
                continue
            if k.remote == flow.remote and k.rport == flow.rport:
                return Ownership(index[k.address], k.sk_uid, k.state_name, Via.WALK, k.address)
        return None


# -- pure helpers ---------------------------------------------------------------------------------


def owners_index(
    tasks: Sequence[Task], sockets: Sequence[FdSocket]
) -> dict[int, tuple[Owner, ...]]:
    """{struct sock address: every (process, fd) holding it}, deterministic order."""
    by_pid = {t.tgid: t for t in tasks}
    index: dict[int, list[Owner]] = {}
    for s in sorted(sockets, key=lambda s: (s.pid, s.fd)):
        t = by_pid.get(s.pid)
        if t is None:
            continue
        index.setdefault(s.sock.address, []).append(Owner(t.tgid, t.uid, t.euid, t.comm, s.fd))
    return {addr: tuple(owners) for addr, owners in index.items()}


def guest_sockets(
    sockets: Sequence[FdSocket], index: dict[int, tuple[Owner, ...]]
) -> list[GuestSocket]:
    seen: dict[int, GuestSocket] = {}
    for s in sockets:
        k = s.sock
        if k.address not in seen:
            seen[k.address] = GuestSocket(
                k.proto,
                k.local,
                k.lport,
                k.remote,
                k.rport,
                k.state_name,
                k.sk_uid,
                index.get(k.address, ()),
                k.address,
            )
    return sorted(seen.values(), key=lambda g: (g.owners[0].pid if g.owners else 0, g.sock_addr))


def ps_document(result: WalkResult) -> dict[str, Any]:
    """The `xfgate-lab truth --json` shape from a walk."""
    processes = [
        {
            "pid": t.tgid,
            "tgid": t.tgid,
            "ppid": t.ppid,
            "uid": t.uid,
            "euid": t.euid,
            "comm": t.name or t.comm,
        }
        for t in sorted(result.tasks, key=lambda t: t.tgid)
    ]
    sockets = [
        {
            "pid": s.pid,
            "fd": s.fd,
            "proto": IPProto(s.sock.proto).label,
            "family": s.sock.family,
            "local": str(s.sock.local),
            "lport": s.sock.lport,
            "remote": str(s.sock.remote),
            "rport": s.sock.rport,
            "state": s.sock.state_name,
        }
        for s in sorted(result.sockets, key=lambda s: (s.pid, s.fd))
    ]
    return {"processes": processes, "sockets": sockets}


def require_complete(result: WalkResult, what: str = "walk") -> None:
    """Raise when a walk could not read everything (for callers that need exact answers)."""
    if result.errors:
        raise WalkError(what, "; ".join(map(str, result.errors[:5])), issues=tuple(result.errors))
