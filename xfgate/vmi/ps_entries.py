"""One process and one held socket as `xfgate ps --json` lists them: the shape
`xfgate-lab truth --json` emits (/proc fields). Shared by the walk's document
(`introspect.ps_document`) and the gate's cached answer (`current.PsRenderer`), which must
agree byte for byte."""

from __future__ import annotations

from typing import Any

from xfgate.flow import IPAddress
from xfgate.inet import proto_label
from xfgate.vmi.linux import FdSocket, Task


def process_entry(t: Task) -> dict[str, Any]:
    return {
        "pid": t.tgid,
        "tgid": t.tgid,
        "ppid": t.ppid,
        "uid": t.uid,
        "euid": t.euid,
        "comm": t.name or t.comm,
    }


def socket_entry(s: FdSocket, names: dict[IPAddress, str] | None = None) -> dict[str, Any]:
    """`names`: addresses already spelled (an IPv6 address's str() is ~20 us, and a crowd's
    20,000 sockets share a handful of addresses)."""
    names = {} if names is None else names
    k = s.sock
    local = names.get(k.local)
    if local is None:
        local = names[k.local] = str(k.local)
    remote = names.get(k.remote)
    if remote is None:
        remote = names[k.remote] = str(k.remote)
    return {
        "pid": s.pid,
        "fd": s.fd,
        "proto": proto_label(k.proto),
        "family": k.family,
        "local": local,
        "lport": k.lport,
        "remote": remote,
        "rport": k.rport,
        "state": k.state_name,
    }
