"""Network namespaces for both labs, built over netlink (pyroute2): namespaces, bridges, veth
pairs across namespaces, taps and addresses. The QEMU lab (`create_network`, `add_vif`) and the
private NFQUEUE lab (`netlab.create`) are both made of these pieces. Addresses from
198.18.0.0/15 and 2001:2::/48 only, and no routes out."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from ipaddress import IPv4Interface, IPv6Interface
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

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
IFA_F_NODAD = 0x02  # include/uapi/linux/if_addr.h: no duplicate address detection


@contextmanager
def _netlink(what: str, ns: str) -> Iterator[IPRoute]:
    """An rtnetlink socket inside namespace `ns`; netlink errors become a LabError naming
    what was being done."""
    try:
        with IPRoute(netns=ns) as ipr:
            yield ipr
    except (NetlinkError, OSError) as e:
        raise LabError(f"{what} in netns {ns} failed: {e}") from e


def _index(ipr: IPRoute, dev: str, ns: str) -> int:
    found = ipr.link_lookup(ifname=dev)
    if not found:
        raise LabError(f"no interface {dev} in netns {ns}")
    return int(found[0])


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def add_netns(name: str) -> None:
    """A new namespace with its loopback up. Fails if the name is taken."""
    if netns_exists(name):
        raise LabError(f"network namespace {name} already exists")
    try:
        netns.create(name)
    except OSError as e:
        raise LabError(f"creating network namespace {name} failed: {e}") from e
    set_up(name, "lo")


def delete_netns(name: str) -> bool:
    """Deletes a namespace (its veths, bridge and taps go with it). False if absent."""
    if not netns_exists(name):
        return False
    try:
        netns.remove(name)
    except OSError as e:
        raise LabError(f"deleting network namespace {name} failed: {e}") from e
    return True


def link_exists(ns: str, dev: str) -> bool:
    with _netlink(f"looking up {dev}", ns) as ipr:
        return bool(ipr.link_lookup(ifname=dev))


def set_up(ns: str, dev: str, master: str | None = None) -> None:
    """Brings `dev` up, first making it a port of bridge `master` if given."""
    with _netlink(f"bringing {dev} up", ns) as ipr:
        index = _index(ipr, dev, ns)
        if master is not None:
            ipr.link("set", index=index, master=_index(ipr, master, ns))
        ipr.link("set", index=index, state="up")


def add_bridge(ns: str, name: str) -> None:
    """A bridge that forwards at once: STP off, forward delay 0."""
    with _netlink(f"adding bridge {name}", ns) as ipr:
        ipr.link("add", ifname=name, kind="bridge", br_stp_state=0, br_forward_delay=0)
    set_up(ns, name)


def add_veth(ns: str, name: str, peer_ns: str, peer_name: str, bridge: str) -> None:
    """A veth pair: `name` in `ns`, up as a port of `bridge`; `peer_name` in `peer_ns`
    (left down: `add_addresses` brings it up)."""
    with _netlink(f"adding veth {name} <-> {peer_ns}/{peer_name}", ns) as ipr:
        ipr.link("add", ifname=name, kind="veth", peer={"ifname": peer_name, "net_ns_fd": peer_ns})
    set_up(ns, name, master=bridge)


def add_tap(ns: str, name: str, bridge: str) -> None:
    """A persistent tap (for QEMU's `-netdev tap,script=no`), up as a port of `bridge`."""
    if link_exists(ns, name):
        raise LabError(f"interface {name} already exists in netns {ns}")
    with _netlink(f"adding tap {name}", ns) as ipr:
        ipr.link("add", ifname=name, kind="tuntap", mode="tap", iff_no_pi=True)
    set_up(ns, name, master=bridge)


def add_addresses(ns: str, dev: str, addresses: Sequence[IPv4Interface | IPv6Interface]) -> None:
    """Adds the addresses (IPv6 without duplicate address detection) and brings `dev` up."""
    with _netlink(f"adding addresses to {dev}", ns) as ipr:
        index = _index(ipr, dev, ns)
        for a in addresses:
            flags = IFA_F_NODAD if a.version == 6 else 0
            ipr.addr(
                "add", index=index, address=str(a.ip), prefixlen=a.network.prefixlen, flags=flags
            )
    set_up(ns, dev)


def netns_exec(
    ns: str, argv: Sequence[str], timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    """Runs a program inside a namespace (`ip netns exec`), output captured."""
    try:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as e:
        raise PrerequisiteError("ip (iproute2) not found: run scripts/bootstrap.sh") from e
    except subprocess.TimeoutExpired as e:
        raise LabError(f"`{' '.join(argv)}` in netns {ns} hung for {timeout:.0f} s") from e


def sysctl(ns: str, key: str, value: str) -> None:
    """Writes a per-namespace sysctl (/proc/sys as seen from inside `ns`)."""
    r = netns_exec(ns, ["sysctl", "-q", "-w", f"{key}={value}"])
    if r.returncode != 0:
        raise LabError(f"sysctl {key}={value} in netns {ns} failed: {r.stderr.strip()}")


# --- the QEMU lab's network ---------------------------------------------------------------


def create_network(layout: LabLayout) -> None:
    """dom0 + client namespaces, the bridge and the veth between them. Fails if a name is
    taken (the caller decides whether that is a stale lab of ours or someone else's)."""
    dom0, client = layout.dom0_netns, layout.client_netns
    for ns in (dom0, client):
        add_netns(ns)
    add_bridge(dom0, BRIDGE)
    # Bridged packets must traverse iptables/ip6tables in dom0 (that is where xfgate filters).
    sysctl(dom0, "net.bridge.bridge-nf-call-iptables", "1")
    sysctl(dom0, "net.bridge.bridge-nf-call-ip6tables", "1")
    add_veth(dom0, DOM0_CLIENT_PORT, client, CLIENT_IFACE, BRIDGE)
    add_addresses(
        client,
        CLIENT_IFACE,
        [
            IPv4Interface(f"{CLIENT_V4}/{V4_PREFIXLEN}"),
            IPv6Interface(f"{CLIENT_V6}/{V6_PREFIXLEN}"),
        ],
    )


def add_vif(layout: LabLayout, vif: str) -> None:
    """A guest's tap `vif` on the dom0 bridge."""
    add_tap(layout.dom0_netns, vif, BRIDGE)
