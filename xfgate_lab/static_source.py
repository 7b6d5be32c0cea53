"""An OwnerSource read from a JSON table instead of guest memory.

For tests and benchmarks of the gate without introspection (``xfgate-lab gate --owners-json``).
The file is re-read when it changes, which bumps the generation (as a guest reboot would)::

    {"entries": [
      {"proto": "tcp", "lport": 80, "owners": [{"pid": 1, "uid": 0, "comm": "httpd"}],
       "state": "LISTEN", "sk_uid": 0},
      {"proto": "tcp", "rport": 2222, "owners": [{"pid": 7, "uid": 1001, "comm": "spray"}]}
    ]}

``lport``/``rport``/``local``/``remote`` left out (or 0 / "") match anything; first match wins.
An owner may carry ``exe`` and ``ancestors`` (tgids, nearest first). Optional top-level keys
for ``view()``: ``"raw_holders"`` (owners holding raw/packet sockets), ``"tasks"`` (thread
groups beyond the entries' owners) and ``"complete": false`` (an incomplete walk).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

from xfgate.errors import ConfigError
from xfgate.flow import Flow, GuestSocket, GuestView, Owner, Ownership, Via
from xfgate.inet import IPProto


@dataclass(frozen=True)
class StaticEntry:
    proto: int
    lport: int
    rport: int
    local: str
    remote: str
    ownership: Ownership
    v6only: bool = False  # a [::] entry that does not take IPv4 (for the kernel sets)

    def matches(self, flow: Flow) -> bool:
        return (
            flow.proto == self.proto
            and self.lport in (0, flow.lport)
            and self.rport in (0, flow.rport)
            and self.local in ("", str(flow.local))
            and self.remote in ("", str(flow.remote))
        )


def parse_owner(o: Any) -> Owner:
    return Owner(
        pid=int(o["pid"]),
        uid=int(o["uid"]),
        euid=int(o.get("euid", o["uid"])),
        comm=str(o.get("comm", "")),
        fd=int(o.get("fd", -1)),
        exe=str(o.get("exe", "")),
        ancestors=tuple(int(a) for a in o.get("ancestors", ())),
    )


def parse_owners(data: Any, key: str, where: str) -> tuple[Owner, ...]:
    try:
        return tuple(parse_owner(o) for o in data.get(key, []))
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise ConfigError(f"{where}: {key} invalid: {err!r}") from None


def parse_entries(data: Any, where: str) -> tuple[StaticEntry, ...]:
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise ConfigError(f"{where}: expected an object with an 'entries' list")
    out = []
    for i, e in enumerate(data["entries"]):
        try:
            owners = tuple(parse_owner(o) for o in e.get("owners", []))
            proto = IPProto.from_label(e["proto"])
            out.append(
                StaticEntry(
                    proto=proto,
                    lport=int(e.get("lport", 0)),
                    rport=int(e.get("rport", 0)),
                    local=str(e.get("local", "")),
                    remote=str(e.get("remote", "")),
                    v6only=bool(e.get("v6only", False)),
                    ownership=Ownership(
                        owners=owners,
                        sk_uid=int(e.get("sk_uid", owners[0].uid if owners else 0)),
                        state=str(e.get("state", "ESTABLISHED")),
                        via=Via.STATIC,
                    ),
                )
            )
        except (KeyError, ValueError, TypeError, IndexError) as err:
            raise ConfigError(f"{where}: entry {i} is invalid: {err!r}") from None
    return tuple(out)


class StaticOwnerSource:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: int | None = None
        self._entries: tuple[StaticEntry, ...] = ()
        self._raw_holders: tuple[Owner, ...] = ()
        self._tasks: tuple[Owner, ...] = ()
        self._complete = True
        self._generation = 0
        self._reload()

    def _reload(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError as e:
            raise ConfigError(f"owner table {self.path}: {e}") from e
        if mtime == self._mtime:
            return
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"owner table {self.path} unreadable: {e}") from e
        self._entries = parse_entries(data, str(self.path))
        self._raw_holders = parse_owners(data, "raw_holders", str(self.path))
        self._tasks = parse_owners(data, "tasks", str(self.path))
        self._complete = bool(data.get("complete", True))
        self._mtime = mtime
        self._generation += 1

    def lookup(self, flow: Flow) -> Ownership | None:
        for entry in self._entries:
            if entry.matches(flow):
                return entry.ownership
        return None

    def lookup_listener(self, flow: Flow) -> Ownership | None:
        """The first LISTEN entry matching `flow`'s local end, as a listener's answer (what
        the gate's keeper of granted listeners asks, like GuestIntrospector.lookup_listener)."""
        for entry in self._entries:
            if entry.ownership.state == "LISTEN" and entry.matches(flow):
                return replace(entry.ownership, via=Via.LISTENER)
        return None

    def sockets(self) -> Sequence[GuestSocket]:
        self._reload()
        out = []
        for e in self._entries:
            if not e.lport:
                continue
            local: IPv4Address | IPv6Address = ip_address(e.local or "0.0.0.0")
            remote: IPv4Address | IPv6Address = ip_address(e.remote or "0.0.0.0")
            o = e.ownership
            out.append(
                GuestSocket(
                    e.proto,
                    local,
                    e.lport,
                    remote,
                    e.rport,
                    o.state,
                    o.sk_uid,
                    o.owners,
                    v6only=e.v6only,
                )
            )
        return out

    def view(self) -> GuestView:
        """The table as one walk: its sockets, their owners (and the listed tasks) as the
        thread groups, the listed raw-socket holders."""
        sockets = tuple(self.sockets())
        tasks = {o.pid: o for o in self._tasks}
        for e in self._entries:
            for o in e.ownership.owners + self._raw_holders:
                tasks.setdefault(o.pid, replace(o, fd=-1))
        problems = () if self._complete else ("static table marked incomplete",)
        return GuestView(
            sockets, tuple(tasks.values()), self._raw_holders, self._complete, problems
        )

    def generation(self) -> int:
        self._reload()
        return self._generation
