"""Granted listeners (issue 9's flood): which listeners' new connections the kernel may accept
without the engine, and when the keeper renews a grant. Pure: sockets and answers built here;
the real kernel sets are in test_verdict_nfnetlink.py, the whole thing under a flood in
test_verdict_netns.py."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address, ip_address

from xfgate.flow import Flow, GuestSocket, Owner, Ownership, Via
from xfgate.inet import IPProto
from xfgate.verdict.blocksets import BlockEntry
from xfgate.verdict.listeners import (
    CARRY_SECONDS,
    ListenerGrant,
    carried_grants,
    keeper_facts,
    listener_grants,
    renewable,
)
from xfgate.verdict.policy import GuestFacts, Policy, compile_policy

ANY4, ANY6 = IPv4Address(0), IPv6Address(0)
GUEST4 = ip_address("198.18.1.1")
PEER4 = ip_address("198.18.0.1")
WEB = Owner(200, 1000, 1000, "fastweb", fd=3)
MALLORY = Owner(300, 1001, 1001, "spray", fd=4)
BLOCK_1001 = compile_policy(uids=[1001])


def listener(
    owner: Owner | None = WEB,
    port: int = 8000,
    local: object = ANY4,
    addr: int = 0x1000,
    **kw: object,
) -> GuestSocket:
    owners = (owner,) if owner else ()
    sk_uid = int(kw.pop("sk_uid", owner.uid if owner else 0))  # type: ignore[call-overload]
    return GuestSocket(
        IPProto.TCP,
        local,  # type: ignore[arg-type]
        port,
        ANY6 if getattr(local, "version", 4) == 6 else ANY4,
        0,
        str(kw.pop("state", "LISTEN")),
        sk_uid,
        owners,
        addr,
        **kw,  # type: ignore[arg-type]
    )


def grants(sockets: list[GuestSocket], policy: Policy = BLOCK_1001, **facts: object) -> set[str]:
    found = listener_grants(sockets, policy, GuestFacts(sockets=tuple(sockets), **facts))  # type: ignore[arg-type]
    return {str(g.entry) for g in found}


def test_a_good_wildcard_listener_is_granted_for_its_own_family_only() -> None:
    (grant, *_rest) = sorted(listener_grants([listener()], BLOCK_1001, GuestFacts()), key=str)
    assert grants([listener()]) == {"0.0.0.0/1,tcp:8000", "128.0.0.0/1,tcp:8000"}
    assert grant.probe == Flow(IPProto.TCP, ANY4, 8000, ANY4, 0)
    assert grant.socks == {0x1000}


def test_nothing_is_granted_on_an_incomplete_view() -> None:
    assert grants([listener()], complete=False) == set()


def test_a_blocked_or_invisible_holder_or_creator_is_never_granted() -> None:
    assert grants([listener(MALLORY)]) == set()
    assert grants([listener(None, sk_uid=1000)]) == set()  # held by no visible task
    assert grants([listener(WEB, sk_uid=1001)]) == set()  # created by the blocked uid
    assert grants([listener()], compile_policy(sk_uids=[1000])) == set()
    assert grants([listener()], compile_policy(uids=[1001], ports=["tcp/8000"])) == set()
    # A forked server: one blocked holder is enough.
    shared = replace(listener(), owners=(WEB, MALLORY))
    assert grants([shared]) == set()


def test_any_socket_that_could_take_the_syn_must_be_good() -> None:
    good = listener()
    # An SO_REUSEPORT sibling, a specific-address bind beside the wildcard, a bound socket
    # that may listen() at any time, a [::] socket taking IPv4: each blocked, each refuses.
    sibling = listener(MALLORY, addr=0x2000)
    specific = listener(MALLORY, local=GUEST4, addr=0x2000)
    bound = listener(MALLORY, addr=0x2000, state="CLOSE")
    dual = listener(MALLORY, local=ANY6, addr=0x2000)
    for rival in (sibling, specific, bound, dual):
        assert grants([good, rival]) == set(), rival
    # The specific listener is good, the wildcard one is not: neither is granted.
    assert grants([listener(MALLORY), listener(local=GUEST4, addr=0x2000)]) == set()


def test_what_cannot_take_the_syn_does_not_refuse_a_grant() -> None:
    good = listener()
    v6only = listener(MALLORY, local=ANY6, addr=0x2000, v6only=True)
    other_port = listener(MALLORY, port=8001, addr=0x2000)
    connected = replace(
        listener(MALLORY, addr=0x2000, state="ESTABLISHED"), local=GUEST4, remote=PEER4, rport=2222
    )
    time_wait = replace(listener(None, addr=0x3000, state="TIME_WAIT"), sk_uid=1001)
    assert grants([good, v6only, other_port, connected, time_wait]) == {
        "0.0.0.0/1,tcp:8000",
        "128.0.0.0/1,tcp:8000",
    }


def test_a_process_rule_refuses_listeners_of_the_blocked_tasks_uid() -> None:
    # --block-pid 500 (a uid-1000 task): it could join a SO_REUSEPORT group of uid 1000's
    # listener or take its fd (same uid) between two walks, so uid 1000's listeners stay queued.
    blocked_task = Owner(500, 1000, 1000, "evil")
    policy = compile_policy(pids=[500])
    assert grants([listener()], policy, tasks=(blocked_task, WEB)) == set()
    root_listener = listener(Owner(100, 0, 0, "httpd"), port=80)
    assert grants([root_listener], policy, tasks=(blocked_task,)) == {
        "0.0.0.0/1,tcp:80",
        "128.0.0.0/1,tcp:80",
    }


def test_udp_and_mptcp_are_never_granted() -> None:
    udp = replace(listener(), proto=IPProto.UDP, state="CLOSE")
    mptcp = replace(listener(), proto=262)
    assert grants([udp]) == set()
    assert grants([mptcp]) == set()
    assert grants([listener(), replace(mptcp, owners=(MALLORY,), sock_addr=0x2000)]) == set()


GRANT = ListenerGrant(
    BlockEntry(4, IPProto.TCP, 8000, "0.0.0.0/1"),
    Flow(IPProto.TCP, ANY4, 8000, ANY4, 0),
    frozenset({0x1000}),
)
SAME = Ownership((WEB,), 1000, "LISTEN", Via.LISTENER, 0x1000)


def test_the_keeper_renews_only_the_same_good_listener() -> None:
    facts = GuestFacts()
    assert renewable(GRANT, SAME, BLOCK_1001, facts)
    refused = [
        None,  # no listener any more
        replace(SAME, sock_addr=0x2000),  # another sock took the port
        replace(SAME, owners=(MALLORY,)),  # the same sock, now a blocked holder
        replace(SAME, owners=(WEB, MALLORY)),
        replace(SAME, owners=()),
        replace(SAME, holders_known=False),  # newer than the last walk
        replace(SAME, sk_uid=1001),
        replace(SAME, via=Via.MPTCP_SUBFLOW),
    ]
    for answer in refused:
        assert not renewable(GRANT, answer, BLOCK_1001, facts), answer
    assert not renewable(GRANT, SAME, BLOCK_1001, GuestFacts(complete=False))
    assert not renewable(GRANT, SAME, compile_policy(uids=[1000]), facts)


def test_an_incomplete_view_carries_only_the_grants_it_bears_out() -> None:
    """A flood's churning tables tear a walk now and then: the last complete view's grants go
    on while the incomplete view shows the same good listener, and no further."""
    good = [listener()]
    previous = listener_grants(good, BLOCK_1001, GuestFacts(sockets=tuple(good)))
    torn = GuestFacts(complete=False)
    assert carried_grants(previous, good, BLOCK_1001, torn) == previous
    # Nothing new from an incomplete view.
    other = [listener(), listener(port=9000, addr=0x3000)]
    assert carried_grants(previous, other, BLOCK_1001, torn) == previous
    refused = [
        [],  # the listener not seen (its table unread, or it closed)
        [listener(addr=0x2000)],  # another sock on the port
        [listener(), listener(MALLORY, addr=0x2000)],  # a blocked SO_REUSEPORT sibling
        [listener(WEB, sk_uid=1001)],
    ]
    for view in refused:
        assert carried_grants(previous, view, BLOCK_1001, torn) == set(), view


def test_the_keeper_judges_carried_grants_as_on_the_last_complete_view_for_a_bounded_time() -> None:
    torn = GuestFacts(complete=False)
    assert keeper_facts(torn, 1.0).complete
    assert renewable(GRANT, SAME, BLOCK_1001, keeper_facts(torn, 1.0))
    assert not keeper_facts(torn, CARRY_SECONDS + 0.1).complete
    assert not renewable(GRANT, SAME, BLOCK_1001, keeper_facts(torn, CARRY_SECONDS + 0.1))
    # The facts of an incomplete view are the union with the complete one's: a blocked holder
    # stays blocked whatever the flag.
    assert not renewable(GRANT, replace(SAME, owners=(MALLORY,)), BLOCK_1001, keeper_facts(torn, 1))


def test_a_loopback_listener_is_never_granted_but_still_rivals_a_wildcard_one() -> None:
    # A SYN from the vif never reaches a listener bound to loopback: a grant would be renewed
    # every KEEP_INTERVAL for nothing (a crowded guest has 1,200 of them).
    for local in (ip_address("127.0.0.1"), ip_address("127.9.9.9"), ip_address("::1")):
        assert grants([listener(local=local)]) == set(), local
    assert grants([listener(local=ip_address("::ffff:127.0.0.1"))]) == set()
    # ... and a blocked owner's loopback listener on the port still refuses the wildcard grant
    # (the wildcard's nets cover 127/8).
    rival = listener(MALLORY, local=ip_address("127.0.0.1"), addr=0x2000)
    assert grants([listener(), rival]) == set()
    assert grants([listener(), listener(local=ip_address("127.0.0.1"), addr=0x2000)]) == {
        "0.0.0.0/1,tcp:8000",
        "128.0.0.0/1,tcp:8000",
    }
