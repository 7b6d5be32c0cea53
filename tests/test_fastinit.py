"""xfgate.fastinit: the same objects as the dataclass's own __init__, frozen still."""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass, field
from ipaddress import ip_address

import pytest

from xfgate.fastinit import fast_init
from xfgate.flow import Flow, GuestSocket, Owner, Ownership, Via
from xfgate.vmi.linux import FdSocket, InetSock, Task


def _plain(fast: bool) -> type:
    @dataclass(frozen=True, slots=True)
    class Plain:
        a: int
        b: str = "x"
        c: tuple[int, ...] = ()
        d: int = field(init=False, default=7, compare=False)
        e: int = field(init=False, compare=False, repr=False)

        def __post_init__(self) -> None:
            object.__setattr__(self, "e", self.a * 2)

    return fast_init(Plain) if fast else Plain


def _fields(o: object) -> tuple[object, ...]:
    return tuple(getattr(o, n) for n in "abcde")


def test_same_objects_as_the_dataclass_init() -> None:
    slow, fast = _plain(False), _plain(True)
    assert getattr(vars(fast)["__init__"], "__fast_init__", False)
    assert not getattr(vars(slow)["__init__"], "__fast_init__", False)
    for args, kwargs in (((3, "y"), {}), ((), {"b": "z", "a": 1}), ((5,), {"c": (1,)})):
        made = fast(*args, **kwargs)
        assert _fields(made) == _fields(slow(*args, **kwargs))
        assert repr(made) == repr(slow(*args, **kwargs))
    made = fast(3)
    assert made == fast(3) and hash(made) == hash(fast(3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.a = 4
    with pytest.raises(TypeError):
        fast()  # a is required
    with pytest.raises(TypeError):
        fast(1, "y", (), 5)  # d is not an init argument


def test_shapes_it_cannot_copy_are_refused_at_import() -> None:
    @dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclass(slots=True)
    class NotFrozen:
        a: int

    @dataclass(frozen=True, slots=True)
    class Factory:
        a: list[int] = field(default_factory=list)

    @dataclass(frozen=True, slots=True)
    class WithInitVar:
        a: int
        b: dataclasses.InitVar[int] = 0

        def __post_init__(self, b: int) -> None:
            pass

    for cls in (NoSlots, NotFrozen, Factory, WithInitVar):
        with pytest.raises(TypeError):
            fast_init(cls)


def test_the_hot_classes_use_it_and_stay_equal_hashable_picklable() -> None:
    a, b = ip_address("198.18.1.1"), ip_address("2001:2::1")
    sock = InetSock(0xFFFF888000001000, 4, 6, 1, a, 80, a, 4242, 1001)
    assert sock.sk_type == 1 and sock.v6only is False
    assert sock == InetSock(
        address=0xFFFF888000001000, family=4, proto=6, state=1, local=a, lport=80,
        remote=a, rport=4242, sk_uid=1001,
    )  # fmt: skip
    flow = Flow(6, a, 80, b, 9)
    assert hash(flow) == hash((6, a, 80, b, 9)) and pickle.loads(pickle.dumps(flow)) == flow
    owner = Owner(1, 1001, 1001, "nc")
    assert (owner.fd, owner.exe, owner.ancestors) == (-1, "", ())
    for cls in (Flow, Owner, Ownership, GuestSocket, InetSock, FdSocket, Task):
        assert getattr(cls.__init__, "__fast_init__", False), cls
    assert dataclasses.replace(sock, lport=81).lport == 81
    assert FdSocket(1, 3, sock) == FdSocket(1, 3, sock)
    assert Ownership((owner,), 1001, "ESTABLISHED", Via.ESTABLISHED, 1).owners == (owner,)
