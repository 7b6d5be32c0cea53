"""What to block: an immutable, compiled policy and the pure decision over one flow's owners.

A policy is a frozen snapshot: a live change builds a new one and swaps the reference, so a
packet is always decided against one consistent policy.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from xfgate.errors import ConfigError
from xfgate.flow import Flow, GuestSocket, Owner, Ownership, Via
from xfgate.inet import PORT_PROTOS, proto_label
from xfgate.vmi.kernel_constants import COMM_MAX_CHARS, comm_key

# Harness compatibility (xfgate/verdict/static_source.py reads it): use IPProto.from_label.


class Verdict(enum.StrEnum):
    ACCEPT = "accept"
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str
    owner: Owner | None = None  # the owner that decided it (the blocked one, or the first)
    known: bool = True  # False when the owner could not be known: the default was applied


@dataclass(frozen=True)
class Policy:
    """Block lists. An owner matches ``block_uids`` by its real or its effective uid."""

    block_pids: frozenset[int] = frozenset()
    block_uids: frozenset[int] = frozenset()
    block_comms: frozenset[str] = frozenset()
    block_sk_uids: frozenset[int] = frozenset()  # the socket creator's uid (sock.sk_uid)
    block_ports: frozenset[tuple[int, int]] = frozenset()  # (proto, guest-local port)
    unknown: Verdict = Verdict.ACCEPT  # owner cannot be known (kernel RST, ICMP, TIME_WAIT, ...)
    version: int = 0  # bumped on every change; lets caches and logs tell snapshots apart
    _comm_keys: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_comm_keys", frozenset(comm_key(c) for c in self.block_comms))

    @property
    def blocks_anything(self) -> bool:
        return bool(
            self.block_pids
            or self.block_uids
            or self.block_comms
            or self.block_sk_uids
            or self.block_ports
        )

    def owner_blocked(self, owner: Owner) -> str | None:
        """Why this owner is blocked, or None."""
        if owner.pid in self.block_pids:
            return f"pid {owner.pid} blocked"
        if owner.uid in self.block_uids:
            return f"uid {owner.uid} blocked"
        if owner.euid in self.block_uids:
            return f"euid {owner.euid} blocked"
        if comm_key(owner.comm) in self._comm_keys:
            return f"comm {owner.comm!r} blocked"
        return None

    def changed(self, op: str, kind: str, value: str) -> Policy:
        """A new snapshot with one entry added (op "block") or removed (op "unblock")."""
        attr, parsed = _parse_entry(kind, value)
        current: frozenset[Any] = getattr(self, attr)
        if op == "block":
            new = current | {parsed}
        elif op == "unblock":
            new = current - {parsed}
        else:
            raise ConfigError(f"unknown policy operation {op!r} (block or unblock)")
        changes: dict[str, Any] = {attr: new, "version": self.version + 1}
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "block_pids": sorted(self.block_pids),
            "block_uids": sorted(self.block_uids),
            "block_comms": sorted(self.block_comms),
            "block_sk_uids": sorted(self.block_sk_uids),
            "block_ports": [f"{proto_label(p)}/{port}" for p, port in sorted(self.block_ports)],
            "unknown": self.unknown.value,
            "version": self.version,
        }


def _parse_entry(kind: str, value: str) -> tuple[str, Any]:
    try:
        if kind == "pid":
            return "block_pids", _non_negative(int(value), kind)
        if kind == "uid":
            return "block_uids", _non_negative(int(value), kind)
        if kind == "sk_uid":
            return "block_sk_uids", _non_negative(int(value), kind)
        if kind == "comm":
            if not value or len(value) > COMM_MAX_CHARS:
                raise ConfigError(f"process name {value!r}: 1 to {COMM_MAX_CHARS} characters")
            return "block_comms", value
        if kind == "port":
            return "block_ports", parse_port(value)
    except ValueError as e:
        raise ConfigError(f"bad {kind} {value!r}: {e}") from None
    raise ConfigError(f"unknown block kind {kind!r} (pid, uid, sk_uid, comm, port)")


def _non_negative(n: int, kind: str) -> int:
    if n < 0:
        raise ConfigError(f"{kind} must be >= 0, got {n}")
    return n


def parse_port(text: str) -> tuple[int, int]:
    """``tcp/80`` or ``udp/5353`` to (proto, port)."""
    proto_name, sep, port_text = text.partition("/")
    proto = next((p for p in PORT_PROTOS if p.label == proto_name), None)
    if not sep or proto is None:
        raise ConfigError(f"port {text!r}: write tcp/PORT or udp/PORT")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ConfigError(f"port {text!r}: out of range 1-65535")
    return proto, port


def compile_policy(
    pids: Iterable[int] = (),
    uids: Iterable[int] = (),
    comms: Iterable[str] = (),
    sk_uids: Iterable[int] = (),
    ports: Iterable[str] = (),
    unknown: str = "accept",
) -> Policy:
    """Build a policy from command-line style values, validating each."""
    try:
        unknown_verdict = Verdict(unknown)
    except ValueError:
        raise ConfigError(f"--unknown must be accept or drop, got {unknown!r}") from None
    policy = Policy(unknown=unknown_verdict)
    for kind, values in (
        ("pid", pids),
        ("uid", uids),
        ("comm", comms),
        ("sk_uid", sk_uids),
        ("port", ports),
    ):
        for v in values:
            policy = policy.changed("block", kind, str(v))
    return replace(policy, version=0)


def policy_from_dict(d: Mapping[str, Any]) -> Policy:
    return compile_policy(
        d.get("block_pids", ()),
        d.get("block_uids", ()),
        d.get("block_comms", ()),
        d.get("block_sk_uids", ()),
        d.get("block_ports", ()),
        d.get("unknown", "accept"),
    )


def decide(
    ownership: Ownership | None, flow: Flow | None, policy: Policy, why: str = ""
) -> Decision:
    """The verdict for one flow given who owns it.

    Several owners (a forked server sharing a listening socket): blocked if any owner is blocked,
    since the blocked process can use the socket as well as its siblings.
    """
    if flow is not None and (flow.proto, flow.lport) in policy.block_ports:
        return Decision(Verdict.DROP, f"guest port {flow.lport} blocked", None)
    if ownership is None:
        return Decision(policy.unknown, f"unknown owner ({why or 'no guest socket'})", known=False)
    for owner in ownership.owners:
        reason = policy.owner_blocked(owner)
        if reason is not None:
            return Decision(Verdict.DROP, reason, owner)
    if ownership.sk_uid in policy.block_sk_uids:
        first = ownership.owners[0] if ownership.owners else None
        return Decision(Verdict.DROP, f"sk_uid {ownership.sk_uid} blocked", first)
    if not ownership.owners:
        # TIME_WAIT, orphaned or kernel sockets: no process to judge.
        return Decision(
            policy.unknown,
            f"unknown owner (socket {ownership.state}, no task holds it)",
            known=False,
        )
    return Decision(Verdict.ACCEPT, "owner not blocked", ownership.owners[0])


def blocked_ports(sockets: Iterable[GuestSocket], policy: Policy) -> set[tuple[int, int]]:
    """(proto, guest-local port) of every socket a blocked owner holds, plus blocked ports:
    what the kernel-side sets (queue mode) or the thesis's DROP rules (poll mode) hold."""
    ports = set(policy.block_ports)
    for s in sockets:
        if s.proto not in PORT_PROTOS or not 0 < s.lport < 65536:
            continue
        ownership = Ownership(s.owners, s.sk_uid, s.state, Via.WALK, s.sock_addr)
        if not s.owners and s.sk_uid not in policy.block_sk_uids:
            continue  # TIME_WAIT & co: nobody to block, and the port is about to be reused
        if decide(ownership, None, policy).verdict is Verdict.DROP:
            ports.add((s.proto, s.lport))
    return ports
