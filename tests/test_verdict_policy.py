"""Policy compilation, live changes and the pure decision."""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

import pytest

from xfgate.errors import ConfigError
from xfgate.flow import Flow, GuestSocket, Owner, Ownership, Via
from xfgate.inet import IPProto
from xfgate.verdict.policy import Verdict, blocked_ports, compile_policy, decide, policy_from_dict

ROOT = Owner(pid=100, uid=0, euid=0, comm="httpd")
WEB = Owner(pid=200, uid=1000, euid=1000, comm="httpd")
SPRAY = Owner(pid=300, uid=1001, euid=1001, comm="spray")
FLOW = Flow(IPProto.TCP, ip_address("198.18.1.1"), 80, ip_address("198.18.0.1"), 5000)


def own(*owners: Owner, sk_uid: int = 0, state: str = "ESTABLISHED") -> Ownership:
    return Ownership(tuple(owners), sk_uid, state, Via.ESTABLISHED)


@pytest.mark.parametrize(
    ("kwargs", "owner", "verdict", "reason"),
    [
        ({"uids": [1001]}, SPRAY, Verdict.DROP, "uid 1001 blocked"),
        ({"uids": [1001]}, WEB, Verdict.ACCEPT, "owner not blocked"),
        ({"pids": [200]}, WEB, Verdict.DROP, "pid 200 blocked"),
        ({"pids": [200]}, ROOT, Verdict.ACCEPT, "owner not blocked"),
        ({"comms": ["spray"]}, SPRAY, Verdict.DROP, "comm 'spray' blocked"),
        ({"comms": ["spray"]}, WEB, Verdict.ACCEPT, "owner not blocked"),
    ],
)
def test_decide_by_owner(
    kwargs: dict[str, Any], owner: Owner, verdict: Verdict, reason: str
) -> None:
    d = decide(own(owner, sk_uid=owner.uid), FLOW, compile_policy(**kwargs))
    assert (d.verdict, d.reason) == (verdict, reason)
    assert d.owner == owner and d.known


def test_effective_uid_counts() -> None:
    setuid = Owner(pid=5, uid=0, euid=1001, comm="x")
    assert decide(own(setuid), FLOW, compile_policy(uids=[1001])).reason == "euid 1001 blocked"


def test_comm_compared_as_the_kernel_truncates_it() -> None:
    long_name = Owner(pid=5, uid=5, euid=5, comm="averyveryverylo")  # kernel keeps 15 chars
    p = compile_policy(comms=["averyveryverylo"])
    assert decide(own(long_name), FLOW, p).verdict is Verdict.DROP
    with pytest.raises(ConfigError, match="1 to 15 characters"):
        compile_policy(comms=["averyveryverylong"])


def test_any_blocked_owner_blocks_a_shared_socket() -> None:
    d = decide(own(ROOT, SPRAY), FLOW, compile_policy(uids=[1001]))
    assert d.verdict is Verdict.DROP and d.owner == SPRAY


def test_unknown_owner_follows_the_configured_default() -> None:
    for unknown in ("accept", "drop"):
        p = compile_policy(uids=[0], unknown=unknown)
        d = decide(None, FLOW, p, "icmp error")
        assert d.verdict is Verdict(unknown) and not d.known and "icmp error" in d.reason
        tw = decide(own(sk_uid=0, state="TIME_WAIT"), FLOW, p)
        assert tw.verdict is Verdict(unknown) and "TIME_WAIT" in tw.reason


def test_sk_uid_and_port_blocks() -> None:
    orphan = own(sk_uid=1001, state="FIN_WAIT1")
    assert decide(orphan, FLOW, compile_policy(sk_uids=[1001])).reason == "sk_uid 1001 blocked"
    d = decide(own(WEB), FLOW, compile_policy(ports=["tcp/80"]))
    assert d.verdict is Verdict.DROP and "port 80" in d.reason
    assert decide(own(WEB), FLOW, compile_policy(ports=["udp/80"])).verdict is Verdict.ACCEPT


def test_live_changes_make_new_snapshots() -> None:
    p0 = compile_policy()
    p1 = p0.changed("block", "uid", "1001")
    p2 = p1.changed("unblock", "uid", "1001")
    assert p0.block_uids == frozenset() and p1.block_uids == {1001} and p2.block_uids == set()
    assert p0.version < p1.version < p2.version
    assert policy_from_dict(p1.to_dict()).block_uids == {1001}


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [
        ("uid", "-1", "must be >= 0"),
        ("uid", "root", "bad uid"),
        ("port", "80", "tcp/PORT"),
        ("port", "tcp/0", "out of range"),
        ("colour", "red", "unknown block kind"),
    ],
)
def test_bad_entries_are_refused_clearly(kind: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compile_policy().changed("block", kind, value)


def test_unknown_option_validated() -> None:
    with pytest.raises(ConfigError, match="accept or drop"):
        compile_policy(unknown="maybe")


def test_blocked_ports_from_a_walk() -> None:
    g, c, any4 = ip_address("198.18.1.1"), ip_address("198.18.0.1"), ip_address("0.0.0.0")
    sockets = [
        GuestSocket(IPProto.TCP, any4, 80, any4, 0, "LISTEN", 0, (ROOT,)),
        GuestSocket(IPProto.TCP, any4, 8080, any4, 0, "LISTEN", 1000, (WEB,)),
        GuestSocket(IPProto.TCP, g, 40000, c, 2222, "SYN_SENT", 1001, (SPRAY,)),
        GuestSocket(IPProto.UDP, any4, 41000, any4, 0, "CLOSE", 1001, (SPRAY,)),
        GuestSocket(IPProto.TCP, g, 40001, c, 2222, "TIME_WAIT", 0, ()),
    ]
    assert blocked_ports(sockets, compile_policy(uids=[1001])) == {
        (IPProto.TCP, 40000),
        (IPProto.UDP, 41000),
    }
    assert blocked_ports(sockets, compile_policy(uids=[0], ports=["udp/53"])) == {
        (IPProto.TCP, 80),
        (IPProto.UDP, 53),
    }
    assert blocked_ports(sockets, compile_policy()) == set()


def test_unanswered_lookup_drops_by_the_last_view_and_names_the_holder() -> None:
    from xfgate.verdict.policy import GuestFacts, decide_unanswered

    g, c, any4 = ip_address("198.18.1.1"), ip_address("198.18.0.1"), ip_address("0.0.0.0")
    facts = GuestFacts(
        sockets=(
            GuestSocket(IPProto.TCP, g, 40000, c, 2222, "SYN_SENT", 1001, (SPRAY,)),
            GuestSocket(IPProto.UDP, any4, 41000, any4, 0, "CLOSE", 1001, ()),
            GuestSocket(IPProto.TCP, any4, 8080, any4, 0, "LISTEN", 1000, (WEB,)),
        )
    )
    policy = compile_policy(uids=[1001])
    out = Flow(IPProto.TCP, g, 40000, c, 2222)
    d = decide_unanswered(out, policy, facts, "owner lookup: timed out")
    assert (d.verdict, d.owner, d.settle) == (Verdict.DROP, SPRAY, False)
    udp = Flow(IPProto.UDP, g, 41000, c, 5353)
    d = decide_unanswered(udp, policy, facts, "owner lookup: timed out")
    assert (d.verdict, d.owner) == (Verdict.DROP, None)
    assert "sk_uid 1001 (the creator) blocked" in d.reason
    web = Flow(IPProto.TCP, g, 8080, c, 5000)
    d = decide_unanswered(web, policy, facts, "owner lookup: timed out")
    assert (d.verdict, d.known, d.settle) == (Verdict.ACCEPT, False, False)


def test_unanswered_lookup_is_never_a_free_pass_while_a_block_is_in_force() -> None:
    """A flow the last view does not show (the blocked owner's newest socket, its lookup starved
    by load) is dropped while any block is in force; with none, the unknown verdict."""
    from xfgate.verdict.policy import GuestFacts, decide_unanswered

    g, c = ip_address("198.18.1.1"), ip_address("198.18.0.1")
    new = Flow(IPProto.TCP, g, 45000, c, 2222)
    d = decide_unanswered(new, compile_policy(uids=[1001]), GuestFacts(), "owner lookup: timed out")
    assert (d.verdict, d.known, d.settle) == (Verdict.DROP, False, False)
    d = decide_unanswered(new, compile_policy(), GuestFacts(), "owner lookup: timed out")
    assert (d.verdict, d.settle) == (Verdict.ACCEPT, False)
    d = decide_unanswered(
        new, compile_policy(unknown="drop"), GuestFacts(), "owner lookup: timed out"
    )
    assert d.verdict is Verdict.DROP


def test_an_unanswered_outgoing_syn_is_not_vouched_for_by_the_last_views_good_owner() -> None:
    """The last view shows uid 1000's socket on port 40001; a SYN from that port whose lookup
    timed out may be the blocked owner's new socket on a port just left: dropped while a block
    is in force. Anything else on that port (an ACK, an incoming SYN) the view still answers."""
    from xfgate.inet import TCPFlag
    from xfgate.verdict.policy import GuestFacts, decide_unanswered

    g, c = ip_address("198.18.1.1"), ip_address("198.18.0.1")
    facts = GuestFacts(
        sockets=(GuestSocket(IPProto.TCP, g, 40001, c, 2222, "ESTABLISHED", 1000, (WEB,)),)
    )
    flow = Flow(IPProto.TCP, g, 40001, c, 2222)
    block, why = compile_policy(uids=[1001]), "owner lookup: timed out"
    d = decide_unanswered(flow, block, facts, why, TCPFlag.SYN, outgoing=True)
    assert (d.verdict, d.known, d.settle) == (Verdict.DROP, False, False)
    assert d.reason.startswith("tcp SYN, owner lookup: timed out")
    for flags, outgoing in (
        (TCPFlag.ACK, True),
        (TCPFlag.SYN | TCPFlag.ACK, True),
        (TCPFlag.SYN, False),
    ):
        d = decide_unanswered(flow, block, facts, why, flags, outgoing)
        assert (d.verdict, d.owner, d.settle) == (Verdict.ACCEPT, WEB, False), (flags, outgoing)
    d = decide_unanswered(flow, compile_policy(), facts, why, TCPFlag.SYN, outgoing=True)
    assert d.verdict is Verdict.ACCEPT  # nothing blocked: nothing to protect


def test_holders_not_all_known_is_never_a_settled_accept() -> None:
    """A lookup whose budget ran out found a holder that is not blocked: the holders it did not
    read may be (a socket passed to a blocked process): the unknown verdict, never settled; a
    blocked holder among those read still drops, and so does a blocked creator."""
    p = compile_policy(uids=[1001])
    partial = Ownership((WEB,), 1000, "ESTABLISHED", Via.ESTABLISHED, 0x1000, False)
    d = decide(partial, FLOW, p)
    assert d.verdict is Verdict.ACCEPT and not d.known and not d.settle
    assert (
        decide(partial, FLOW, compile_policy(uids=[1001], unknown="drop")).verdict is Verdict.DROP
    )
    with_spray = Ownership((WEB, SPRAY), 1000, "ESTABLISHED", Via.ESTABLISHED, 0x1000, False)
    assert decide(with_spray, FLOW, p).verdict is Verdict.DROP
    by_creator = Ownership((WEB,), 1001, "ESTABLISHED", Via.ESTABLISHED, 0x1000, False)
    assert decide(by_creator, FLOW, p).verdict is Verdict.DROP


def test_a_lineage_that_breaks_off_is_no_settled_accept_under_a_pid_block() -> None:
    """An owner whose real_parent chain ends in a task the lookup did not know may descend
    from the blocked pid: dropped, unsettled, while a pid block is in force; a chain that
    reaches init (or kthreadd) is judged as usual, and no pid rule: no question asked."""
    broken = Owner(pid=174, uid=1001, euid=1001, comm="xfprobe", ancestors=(171,))
    whole = Owner(pid=174, uid=1001, euid=1001, comm="xfprobe", ancestors=(171, 130, 1))
    d = decide(own(broken), FLOW, compile_policy(pids=[133]))
    assert (d.verdict, d.settle) == (Verdict.DROP, False) and "lineage not known" in d.reason
    assert decide(own(whole), FLOW, compile_policy(pids=[133])).verdict is Verdict.ACCEPT
    assert decide(own(broken), FLOW, compile_policy(uids=[0])).verdict is Verdict.ACCEPT
    assert decide(own(WEB), FLOW, compile_policy(pids=[133])).verdict is Verdict.ACCEPT
