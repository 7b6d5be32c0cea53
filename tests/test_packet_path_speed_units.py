"""The packet path's fast forms keep the general forms' answers (w5-rate): the unrolled hash
chain walk against walk_list on hostile chains, the address space's in-page read against the
memory's own read, the owner cache's expiring entries, the lock-free generation."""

from __future__ import annotations

import random
import struct
import threading

import pytest

from tests.test_vmi_paging import Tables
from xfgate.errors import MemoryReadError
from xfgate.flow import Flow
from xfgate.verdict.cache import OwnerCache, _ExpiringEntries
from xfgate.verdict.engine import LockedOwnerSource
from xfgate.vmi.linux import KERNEL_SPACE_START, KERNEL_SPACE_START_LA57
from xfgate.vmi.memory import BufferMemory
from xfgate.vmi.paging import AddressSpace
from xfgate.vmi.walk import Deadline, Links, ListSpec, ListWalk, walk_hlist, walk_list

BASE = 0xFFFF888000000000
NODE_OFF, SPAN = 0x30, 0x48


class Chains:
    """Socks of SPAN bytes in a fake kernel map, their hlist node at NODE_OFF; reads of an
    address outside it fail."""

    def __init__(self) -> None:
        self.mem: dict[int, bytearray] = {}

    def sock(self, addr: int, nxt: int, pprev: int) -> None:
        blob = bytearray(random.randbytes(SPAN))
        struct.pack_into("<QQ", blob, NODE_OFF, nxt, pprev)
        self.mem[addr] = blob

    def read(self, addr: int, length: int) -> bytes:
        blob = self.mem.get(addr)
        if blob is None or length != SPAN:
            raise MemoryReadError(addr, length, "fake", "not mapped")
        return bytes(blob)


def _general(
    c: Chains, origin: int, first: int, low: int, steps: int, deadline: Deadline
) -> ListWalk[bytes]:
    def read_node(node: int) -> Links[bytes]:
        head = c.read(node - NODE_OFF, SPAN)
        nxt, pprev = struct.unpack_from("<QQ", head, NODE_OFF)
        return Links(nxt, pprev, head)

    spec = ListSpec(
        "chain",
        origin,
        lambda n: n == 0 or bool(n & 1),
        lambda n: low <= n <= 0xFFFFFFFFFFFFF000,
        steps,
    )
    return walk_list(spec, first, read_node, deadline)


def _hostile_chain(rng: random.Random, c: Chains) -> tuple[int, int]:
    """A bucket and its first node: a chain of 0-8 socks, then maybe a cycle, a wrong pprev,
    a wild or unmapped pointer, a nulls marker or NULL."""
    bucket = BASE + 0x100000 + rng.randrange(1 << 12) * 8
    n = rng.randrange(9)
    addrs = [BASE + 0x1000 * (i + 1) + rng.randrange(0, 0x100, 8) for i in range(n)]
    nodes = [a + NODE_OFF for a in addrs]
    end = rng.choice(
        [0, 0x1F, 0x4141414141414140, 0xFFFFFFFFFFFFF800, BASE + 0x7777000 + NODE_OFF, *nodes[:1]]
    )
    for i, a in enumerate(addrs):
        nxt = nodes[i + 1] if i + 1 < n else end
        pprev = bucket if i == 0 else nodes[i - 1]
        if rng.random() < 0.1:
            pprev ^= 0x40  # torn
        c.sock(a, nxt, pprev)
    return bucket, (nodes[0] if nodes else end)


@pytest.mark.parametrize("seed", range(300))
def test_walk_hlist_answers_as_walk_list_on_hostile_chains(seed: int) -> None:
    rng = random.Random(seed)
    random.seed(seed)
    c = Chains()
    bucket, first = _hostile_chain(rng, c)
    low = rng.choice([KERNEL_SPACE_START, KERNEL_SPACE_START_LA57])
    steps = rng.choice([0, 1, 3, 64])
    deadline = Deadline.after(-1.0 if rng.random() < 0.05 else 5.0)
    want = _general(c, bucket, first, low, steps, deadline)
    got = walk_hlist("chain", bucket, first, c.read, NODE_OFF, SPAN, low, deadline, steps)
    assert [n for n, _ in got.nodes] == [n for n, _ in want.nodes]
    assert [h for _, h in got.nodes] == [h for _, h in want.nodes]
    assert got.issue == want.issue


def test_walk_hlist_stops_at_the_node_stop_accepts() -> None:
    c = Chains()
    bucket = BASE + 0x100000
    a, b = BASE + 0x1000, BASE + 0x2000
    c.sock(a, b + NODE_OFF, bucket)
    c.sock(b, 0, a + NODE_OFF)
    head_a = c.read(a, SPAN)
    got = walk_hlist(
        "chain",
        bucket,
        a + NODE_OFF,
        c.read,
        NODE_OFF,
        SPAN,
        KERNEL_SPACE_START,
        Deadline.after(5),
        64,
        lambda head: head == head_a,
    )
    assert [n for n, _ in got.nodes] == [a + NODE_OFF] and got.issue is None


class CountingMemory(BufferMemory):
    def __init__(self, data: bytearray) -> None:
        super().__init__(data, "counting")
        self.reads = 0

    def read(self, paddr: int, length: int) -> bytes:
        self.reads += 1
        return super().read(paddr, length)


def test_in_page_reads_slice_flat_memory_and_equal_the_memorys_own_reads() -> None:
    t = Tables(4)
    base = 0xFFFF888000300000
    t.map(base, 0x300000, 0x1000)
    t.map(base + 0x1000, 0x200000, 0x1000)
    t.buf[0x300000:0x301000] = random.Random(1).randbytes(0x1000)
    t.buf[0x200000:0x201000] = random.Random(2).randbytes(0x1000)
    fast = AddressSpace(BufferMemory(t.buf), t.root)
    counting = CountingMemory(t.buf)
    slow = AddressSpace(counting, t.root)
    for vaddr, n in [(base, 8), (base + 0xFF8, 8), (base + 0xFFC, 8), (base + 0x10, 0x1000)]:
        got = fast.read(vaddr, n)
        assert got == slow.read(vaddr, n) and type(got) is bytes
    assert counting.reads > 0  # a subclass that reads otherwise sees every read
    t.buf[0x300010] ^= 0xFF  # live memory: the next read sees the change
    assert fast.read(base + 0x10, 1) == bytes([t.buf[0x300010]])
    with pytest.raises(MemoryReadError):
        fast.read(base + 0x2000, 8)  # not mapped
    with pytest.raises(MemoryReadError):
        fast.read(base, -1)


def test_expiring_entries_bound_their_size_and_never_return_an_expired_one() -> None:
    now = [0.0]
    e = _ExpiringEntries(3, lambda: now[0])
    for i in range(5):
        e.put(("k", i), None, 10.0)  # type: ignore[arg-type]
    assert len(e) == 3 and e.get(("k", 0)) is None and e.get(("k", 4)) == (None, 10.0)  # type: ignore[arg-type]
    e.put(("short",), None, 1.0)  # type: ignore[arg-type]
    now[0] = 1.0
    assert e.get(("short",)) is None  # type: ignore[arg-type]
    now[0] = 11.0
    e.put(("new",), None, 20.0)  # type: ignore[arg-type]
    assert len(e) <= 3 and e.get(("new",)) == (None, 20.0)  # type: ignore[arg-type]
    assert all(e.get(("k", i)) is None for i in range(5))  # type: ignore[arg-type]


def test_owner_cache_size_stays_bounded_under_a_flood_of_new_flows() -> None:
    from ipaddress import ip_address

    cache = OwnerCache(maxsize=100)
    for port in range(1, 1001):
        flow = Flow(6, ip_address("198.18.1.1"), port, ip_address("198.19.0.1"), 80)
        cache.get_or_load(flow, lambda f: None)
    assert cache.stats().size == 100


class AttributeGeneration:
    generation_lock_free = True

    def __init__(self) -> None:
        self.gen = 7

    def generation(self) -> int:
        return self.gen

    def lookup(self, flow: Flow) -> None:
        return None


def test_a_lock_free_generation_is_read_while_a_walk_holds_the_source() -> None:
    src = AttributeGeneration()
    locked = LockedOwnerSource(src, packet_timeout=5.0)  # type: ignore[arg-type]
    held = threading.Event()
    done = threading.Event()

    def walk() -> None:
        locked._acquire()
        held.set()
        done.wait(10)
        locked._lock.release()

    th = threading.Thread(target=walk)
    th.start()
    try:
        assert held.wait(5)
        src.gen = 8
        assert locked.generation() == 8  # at once, not after the 5 s packet bound
    finally:
        done.set()
        th.join(10)
