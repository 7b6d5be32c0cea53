"""One bounded walk over a linked list in guest memory, and the structured record of why it stopped.

Every list the walkers follow goes through `walk_list`: the task list (a circular `list_head`),
and the socket hash chains (`hlist_nulls` and `hlist`, ended by NULL or an odd "nulls" marker).
Guest memory is live and attacker-controlled, so a walk is

  - bounded in steps (`max_steps` nodes) and in time (a `Deadline` shared by a whole walk),
  - cycle-safe (a visited set),
  - checked pointer by pointer before a pointer is followed (`valid`),
  - checked backwards where the list is doubly linked: a `list_head`'s `next->prev` and an
    `hlist_node`'s `next->pprev` must point back at the position the walk came from.

A walk never raises on guest data: it returns the nodes it could read and, if it stopped early,
one `WalkIssue` saying where and why. Callers keep the issues as records and render them to text
only at the edge (log lines, `xfgate ps` warnings).
"""

from __future__ import annotations

import enum
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

from xfgate.errors import MemoryReadError

T = TypeVar("T")


class WalkReason(enum.Enum):
    """Why a walk (or one object in it) could not be read as the kernel would."""

    CYCLE = "cycle"
    BAD_PREV = "bad next->prev"
    STEP_BOUND = "step bound"
    TIME_BOUND = "time bound"
    UNREADABLE = "unreadable"
    POINTER_OUT_OF_RANGE = "pointer out of range"
    IMPLAUSIBLE = "implausible value"


@dataclass(frozen=True, slots=True)
class WalkIssue:
    """Where a walk met guest data it could not follow: which list or object (`what`), the address
    involved, the step (node index, -1 when not on a list), the reason and a human detail."""

    what: str
    reason: WalkReason
    address: int = 0
    step: int = -1
    detail: str = ""

    def __str__(self) -> str:
        at = f" at {self.address:#x}" if self.address else ""
        step = f" (step {self.step})" if self.step >= 0 else ""
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.what}: {self.reason.value}{at}{step}{detail}"


@dataclass(frozen=True, slots=True)
class Deadline:
    """The time bound of one walk attempt (shared by every list it follows)."""

    seconds: float
    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(seconds, time.monotonic() + seconds)

    def expired(self) -> bool:
        return time.monotonic() > self.at


class Links(NamedTuple, Generic[T]):
    """What reading one node gives: its forward pointer, its back pointer (`prev` of a
    `list_head`, `pprev` of an `hlist_node`; None when the list is singly linked) and whatever
    else the caller read with it (e.g. the whole task_struct span). A NamedTuple: one is made
    per node of every walk (a frozen dataclass's __init__ cost a third of a hash-chain step)."""

    next: int
    back: int | None
    payload: T


@dataclass(frozen=True, slots=True)
class ListSpec:
    """The shape of one list: `what` names it in issues; `origin` is the address whose forward
    pointer is the first node (a list_head head, an hlist bucket); `is_end` tells the end marker
    (the head of a circular list, NULL or a nulls marker); `valid` checks a pointer before it is
    followed."""

    what: str
    origin: int
    is_end: Callable[[int], bool]
    valid: Callable[[int], bool]
    max_steps: int


@dataclass
class ListWalk(Generic[T]):
    """The nodes read in order (node address, payload), and the issue that stopped the walk."""

    nodes: list[tuple[int, T]] = field(default_factory=list)
    issue: WalkIssue | None = None


def walk_list(
    spec: ListSpec,
    first: int,
    read_node: Callable[[int], Links[T]],
    deadline: Deadline,
    stop: Callable[[T], bool] | None = None,
) -> ListWalk[T]:
    """Follow `first` and each node's forward pointer until `spec.is_end`. `read_node` may raise
    MemoryReadError (reported as UNREADABLE). Never raises on guest data. `stop`: the walk ends
    after the first node whose payload it accepts (a hash lookup that found its sock, as the
    kernel's own lookup stops there); that node is the last one returned."""
    out: ListWalk[T] = ListWalk()
    nodes = out.nodes
    seen: set[int] = set()
    is_end, valid, max_steps = spec.is_end, spec.valid, spec.max_steps
    at, clock = deadline.at, time.monotonic
    pos, node = spec.origin, first
    for step in range(max_steps + 1):
        if is_end(node):
            return out
        if step == max_steps:
            out.issue = WalkIssue(
                spec.what, WalkReason.STEP_BOUND, node, step, f"longer than {max_steps}"
            )
            return out
        if clock() > at:
            detail = f"{deadline.seconds} s reached"
            out.issue = WalkIssue(spec.what, WalkReason.TIME_BOUND, node, step, detail)
            return out
        if not valid(node):
            detail = f"after {pos:#x}"
            out.issue = WalkIssue(spec.what, WalkReason.POINTER_OUT_OF_RANGE, node, step, detail)
            return out
        if node in seen:
            out.issue = WalkIssue(spec.what, WalkReason.CYCLE, node, step)
            return out
        seen.add(node)
        try:
            nxt, back, payload = read_node(node)
        except MemoryReadError as e:
            out.issue = WalkIssue(spec.what, WalkReason.UNREADABLE, node, step, e.reason)
            return out
        if back is not None and back != pos:
            detail = f"points back at {back:#x}, came from {pos:#x} (torn or corrupted)"
            out.issue = WalkIssue(spec.what, WalkReason.BAD_PREV, node, step, detail)
            return out
        nodes.append((node, payload))
        if stop is not None and stop(payload):
            return out
        pos, node = node, nxt
    raise AssertionError("unreachable: the loop returns at step max_steps")  # pragma: no cover


def walk_hlist(
    what: str,
    origin: int,
    first: int,
    read: Callable[[int, int], bytes],
    node_off: int,
    span: int,
    low: int,
    deadline: Deadline,
    max_steps: int,
    stop: Callable[[bytes], bool] | None = None,
) -> ListWalk[bytes]:
    """`walk_list` for a socket hash chain (an `hlist_nulls` or `hlist` bucket), unrolled for
    the packet path, with the same checks in the same order and the same answer: the chain
    ends at NULL or an odd "nulls" marker; a node is followed only if it is a kernel pointer
    (`low` <= node <= the last page: KERNEL_SPACE_START or its LA57 value), not seen before,
    within `max_steps` and the deadline; each node is one read of `span` bytes at
    `node - node_off` (its sock_common: the `hlist_(nulls_)node` lies inside it), whose
    `pprev` must point back at the position the walk came from (`origin` for the first).
    Payload: those bytes. `stop` as in walk_list. Never raises on guest data."""
    out: ListWalk[bytes] = ListWalk()
    nodes = out.nodes
    seen: set[int] = set()
    at, clock, unpack = deadline.at, time.monotonic, _HLIST_NODE.unpack_from
    high = _LAST_KERNEL_PAGE
    pos, node = origin, first
    for step in range(max_steps + 1):
        if node == 0 or node & 1:
            return out
        if step == max_steps:
            out.issue = WalkIssue(
                what, WalkReason.STEP_BOUND, node, step, f"longer than {max_steps}"
            )
            return out
        if clock() > at:
            detail = f"{deadline.seconds} s reached"
            out.issue = WalkIssue(what, WalkReason.TIME_BOUND, node, step, detail)
            return out
        if not low <= node <= high:
            detail = f"after {pos:#x}"
            out.issue = WalkIssue(what, WalkReason.POINTER_OUT_OF_RANGE, node, step, detail)
            return out
        if node in seen:
            out.issue = WalkIssue(what, WalkReason.CYCLE, node, step)
            return out
        seen.add(node)
        try:
            head = read(node - node_off, span)
            nxt, back = unpack(head, node_off)
        except (MemoryReadError, struct.error) as e:
            reason = e.reason if isinstance(e, MemoryReadError) else f"short node: {e}"
            out.issue = WalkIssue(what, WalkReason.UNREADABLE, node, step, reason)
            return out
        if back != pos:
            detail = f"points back at {back:#x}, came from {pos:#x} (torn or corrupted)"
            out.issue = WalkIssue(what, WalkReason.BAD_PREV, node, step, detail)
            return out
        nodes.append((node, head))
        if stop is not None and stop(head):
            return out
        pos, node = node, nxt
    raise AssertionError("unreachable: the loop returns at step max_steps")  # pragma: no cover


_HLIST_NODE = struct.Struct("<QQ")  # struct hlist_(nulls_)node: next, pprev
_LAST_KERNEL_PAGE = 0xFFFFFFFFFFFFF000  # linux.is_kernel_pointer's upper end
