"""The one-definition vocabularies: protocol names both ways, TCP flags, kernel constants."""

from __future__ import annotations

import pytest

from xfgate.inet import PORT_PROTOS, AddressFamily, IPProto, TCPFlag, proto_label
from xfgate.vmi.kernel_constants import TASK_COMM_LEN, TCPState, comm_key, tcp_state_name


def test_protocol_names_go_both_ways() -> None:
    for proto in IPProto:
        assert IPProto.from_label(proto.label) is proto
    assert (IPProto.TCP, IPProto.UDP, IPProto.ICMPV6) == (6, 17, 58)
    assert [p.label for p in PORT_PROTOS] == ["tcp", "udp"]
    assert proto_label(17) == "udp" and proto_label(253) == "253" and proto_label(132) == "sctp"
    with pytest.raises(ValueError):
        IPProto.from_label("dccp")


def test_tcp_flags_are_the_header_bits() -> None:
    assert (TCPFlag.FIN, TCPFlag.SYN, TCPFlag.RST, TCPFlag.ACK) == (0x01, 0x02, 0x04, 0x10)
    assert 0x12 & (TCPFlag.SYN | TCPFlag.ACK | TCPFlag.RST) == TCPFlag.SYN | TCPFlag.ACK


def test_address_families_are_linux_numbers() -> None:
    assert (AddressFamily.INET, AddressFamily.INET6) == (2, 10)
    assert (AddressFamily.INET.ip_version, AddressFamily.INET6.ip_version) == (4, 6)


def test_comm_match_compares_what_the_kernel_keeps() -> None:
    assert TASK_COMM_LEN == 16
    long_name = "a-process-name-longer-than-sixteen"
    assert comm_key(long_name) == long_name[: TASK_COMM_LEN - 1]
    assert len(comm_key(long_name)) == 15 and comm_key("httpd") == "httpd"


def test_tcp_states_follow_tcp_states_h() -> None:
    assert (TCPState.ESTABLISHED, TCPState.LISTEN, TCPState.NEW_SYN_RECV) == (1, 10, 12)
    assert tcp_state_name(6) == "TIME_WAIT" and tcp_state_name(99) == "UNKNOWN(99)"
