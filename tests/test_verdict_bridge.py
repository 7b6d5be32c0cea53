"""VLAN, PPPoE and other ethertypes from a vif: dropped while a block is in force (a private
network namespace, real frames through a real bridge, sent and counted with AF_PACKET)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from typing import Any

import pytest
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6

from tests.fresh_netns import probe_in_fresh_netns
from xfgate.verdict import bridge

MARK = b"xfgate-frame-probe"
BCAST = b"\xff" * 6
SRC = b"\x02\x00\x00\x00\x00\x09"
KINDS = ("ipv4", "ipv6", "arp", "other", "pppoe", "vlan-other", "vlan-ipv4", "qinq")


def frame(kind: str, marker: bytes) -> bytes:
    """One frame of `kind` carrying `marker` where nothing trims it (br_netfilter trims a
    bridged IP packet to its header's length: the marker is inside the IP payload)."""
    # Valid IP headers: br_netfilter drops a bridged IPv4/IPv6 frame whose header is invalid.
    ip4 = bytes(IP(src="198.18.9.2", dst="198.18.9.1", proto=253) / marker)
    ip6 = bytes(IPv6(src="2001:2:0:9::2", dst="2001:2:0:9::1", nh=59) / marker)
    body = {
        "ipv4": b"\x08\x00" + ip4,
        "ipv6": b"\x86\xdd" + ip6,
        "arp": b"\x08\x06" + bytes(28) + marker,
        "other": b"\x88\xb5" + marker,
        "pppoe": b"\x88\x64" + b"\x11\x00\x00\x01\x00\x20\x00\x21" + marker,
        "vlan-other": b"\x81\x00\x00\x07\x88\xb5" + marker,
        "vlan-ipv4": b"\x81\x00\x00\x07\x08\x00" + ip4,
        "qinq": b"\x88\xa8\x00\x07\x81\x00\x00\x07\x08\x00" + ip4,
    }[kind]
    return BCAST + SRC + body


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def _send_and_count(tag: str) -> dict[str, int]:
    """Each frame kind once from the guest end of vif9.0; what reaches the client end."""
    rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    rx.bind(("cx", 0))
    rx.settimeout(0.2)
    tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    tx.bind(("gx", 0))
    markers = {name: MARK + tag.encode() + name.encode() for name in KINDS}
    for name in KINDS:
        tx.send(frame(name, markers[name]))
    seen = dict.fromkeys(KINDS, 0)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        try:
            data = rx.recv(2048)
        except TimeoutError:
            continue
        for name in KINDS:
            if markers[name] in data:
                seen[name] += 1
    rx.close()
    tx.close()
    return seen


def _probe() -> dict[str, Any]:
    _ip("link", "add", "br0", "type", "bridge")
    _ip("link", "add", "vif9.0", "type", "veth", "peer", "name", "gx")
    _ip("link", "add", "c0", "type", "veth", "peer", "name", "cx")
    for port in ("vif9.0", "c0"):
        _ip("link", "set", port, "master", "br0")
    for dev in ("br0", "vif9.0", "gx", "c0", "cx", "lo"):
        _ip("link", "set", dev, "up")
    time.sleep(0.5)
    out: dict[str, Any] = {"before": _send_and_count("a")}
    bridge.install(9, ["vif9.0"])
    bridge.install(9, ["vif9.0"])  # idempotent: kept as it is
    out["installed"] = bridge.installed(9)
    out["sysctls"] = {n: (bridge.SYSCTL_DIR / n).read_text().strip() for n in bridge.SYSCTLS}
    out["during"] = _send_and_count("b")
    bridge.remove(9)
    bridge.remove(9)  # absent: not an error
    out["removed"] = not bridge.installed(9)
    out["after"] = _send_and_count("c")
    return out


@pytest.fixture(scope="module")
def probed() -> dict[str, Any]:
    return probe_in_fresh_netns("tests.test_verdict_bridge")


pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and nftables"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)"),
]


def test_every_frame_kind_crosses_an_unfiltered_bridge(probed: dict[str, Any]) -> None:
    assert all(n >= 1 for n in probed["before"].values()), probed["before"]


def test_only_ip_arp_and_vlan_with_ip_inside_cross_while_a_block_is_in_force(
    probed: dict[str, Any],
) -> None:
    assert probed["installed"] and probed["sysctls"] == dict.fromkeys(bridge.SYSCTLS, "1")
    passed = {name for name, n in probed["during"].items() if n}
    assert passed == {"ipv4", "ipv6", "arp", "vlan-ipv4"}, probed["during"]


def test_removed_filter_lets_every_kind_through_again(probed: dict[str, Any]) -> None:
    assert probed["removed"]
    # The sysctls stay 1: br_netfilter itself now drops a PPPoE frame whose IP is invalid.
    passed = {name for name, n in probed["after"].items() if n}
    assert passed == set(KINDS) - {"pppoe"}, probed["after"]


if __name__ == "__main__":
    print(json.dumps(_probe()))
