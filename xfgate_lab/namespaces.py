"""The lab's network: a dom0 netns (bridge xenbr0, taps vifD.0) and a client netns joined to it
by a veth. Addresses from 198.18.0.0/15 and 2001:2::/48 only, and no routes out."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from xfgate.errors import PrerequisiteError
from xfgate_lab.errors import LabError
from xfgate_lab.layout import (
    BRIDGE,
    CLIENT_IFACE,
    CLIENT_V4,
    CLIENT_V6,
    DOM0_CLIENT_PORT,
    V4_PREFIXLEN,
    V6_PREFIXLEN,
    LabLayout,
)

NETNS_DIR = Path("/run/netns")


def ip(*args: str, netns: str = "", timeout: float = 20.0, check: bool = True) -> str:
    argv = ["ip", *(("-n", netns) if netns else ()), *args]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise PrerequisiteError("ip (iproute2) not found: run scripts/bootstrap.sh") from e
    except subprocess.TimeoutExpired as e:
        raise LabError(f"`{' '.join(argv)}` hung for {timeout:.0f} s") from e
    if check and r.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed: {r.stderr.strip()}")
    return r.stdout


def netns_exec(
    netns: str, argv: Sequence[str], timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["ip", "netns", "exec", netns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise LabError(f"`{' '.join(argv)}` in netns {netns} hung for {timeout:.0f} s") from e


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def link_exists(netns: str, dev: str) -> bool:
    return bool(ip("-o", "link", "show", "dev", dev, netns=netns, check=False).strip())


def sysctl(netns: str, key: str, value: str) -> None:
    r = netns_exec(netns, ["sysctl", "-q", "-w", f"{key}={value}"])
    if r.returncode != 0:
        raise LabError(f"sysctl {key}={value} in netns {netns} failed: {r.stderr.strip()}")


def create_network(layout: LabLayout) -> None:
    """dom0 + client namespaces, the bridge and the veth between them. Fails if a name is
    taken (the caller decides whether that is a stale lab of ours or someone else's)."""
    dom0, client = layout.dom0_netns, layout.client_netns
    for ns in (dom0, client):
        if netns_exists(ns):
            raise LabError(f"network namespace {ns} already exists")
        ip("netns", "add", ns)
    for ns in (dom0, client):
        ip("link", "set", "lo", "up", netns=ns)
    ip("link", "add", BRIDGE, "type", "bridge", "stp_state", "0", "forward_delay", "0", netns=dom0)
    # Bridged packets must traverse iptables/ip6tables in dom0 (that is where xfgate filters).
    sysctl(dom0, "net.bridge.bridge-nf-call-iptables", "1")
    sysctl(dom0, "net.bridge.bridge-nf-call-ip6tables", "1")
    ip("link", "set", BRIDGE, "up", netns=dom0)
    ip(
        "link", "add", DOM0_CLIENT_PORT, "netns", dom0,
        "type", "veth", "peer", "name", CLIENT_IFACE, "netns", client,
    )  # fmt: skip
    ip("link", "set", DOM0_CLIENT_PORT, "master", BRIDGE, "up", netns=dom0)
    ip("addr", "add", f"{CLIENT_V4}/{V4_PREFIXLEN}", "dev", CLIENT_IFACE, netns=client)
    ip(
        "-6",
        "addr",
        "add",
        f"{CLIENT_V6}/{V6_PREFIXLEN}",
        "dev",
        CLIENT_IFACE,
        "nodad",
        netns=client,
    )
    ip("link", "set", CLIENT_IFACE, "up", netns=client)


def add_vif(layout: LabLayout, vif: str) -> None:
    dom0 = layout.dom0_netns
    if link_exists(dom0, vif):
        raise LabError(f"interface {vif} already exists in netns {dom0}")
    ip("tuntap", "add", "dev", vif, "mode", "tap", netns=dom0)
    ip("link", "set", vif, "master", BRIDGE, "up", netns=dom0)


def delete_netns(name: str) -> bool:
    """Deletes a namespace (its veth, bridge and taps go with it). False if absent."""
    if not netns_exists(name):
        return False
    ip("netns", "delete", name)
    return True
