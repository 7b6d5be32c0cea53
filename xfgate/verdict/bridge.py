"""Frames the IP chains never see: VLAN-tagged, PPPoE and other ethertypes from the guest's vif.

br_netfilter hands a bridged frame to iptables only if it is IPv4/IPv6 (and, with
``bridge-nf-filter-vlan-tagged`` / ``-pppoe-tagged`` set to 1, if its 802.1Q or PPPoE payload
is): everything else would cross the bridge unfiltered. For a domain with a block in force the
gate sets both sysctls to 1 in its network namespace (they stay 1: harmless for others) and
drops, in the nftables bridge family (table ``bridge xfgate``, chain ``xfgate-D`` on the
forward hook), every frame entering from the domain's vifs that is not IPv4, IPv6 or ARP, or
802.1Q with IPv4/IPv6 inside (which the same iptables chains then filter).

Over netlink with pyroute2's NFTables (no program forked); the expressions are the kernel's
(``meta iifname``, ``payload`` link-layer, ``cmp``, ``immediate`` verdict), as ``nft`` would
send for ``iifname "vifD.N" ether type != { ip, ip6, arp, 8021q } drop``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xfgate.errors import FirewallError

log = logging.getLogger(__name__)

NFPROTO_BRIDGE = 7
TABLE = "xfgate"
SYSCTLS = ("bridge-nf-filter-vlan-tagged", "bridge-nf-filter-pppoe-tagged")
SYSCTL_DIR = Path("/proc/sys/net/bridge")
NFT_META_IIFNAME = 6
NFT_PAYLOAD_LL_HEADER = 0
NFT_CMP_EQ, NFT_CMP_NEQ = 0, 1
NF_DROP = 0
IFNAMSIZ = 16
ETH_P_IP, ETH_P_IPV6, ETH_P_ARP, ETH_P_8021Q = b"\x08\x00", b"\x86\xdd", b"\x08\x06", b"\x81\x00"
ETHERTYPE_OFFSET = 12  # after the two MAC addresses
INNER_ETHERTYPE_OFFSET = 16  # after an 802.1Q tag


def chain_name(domain: int) -> str:
    return f"xfgate-{domain}"


def _cmp(op: int, value: bytes) -> Any:
    from pyroute2.nftables.expressions import genex

    return genex("cmp", {"sreg": 1, "op": op, "data": {"attrs": [("NFTA_DATA_VALUE", value)]}})


def _payload(offset: int) -> Any:
    from pyroute2.nftables.expressions import genex

    return genex("payload", {"dreg": 1, "base": NFT_PAYLOAD_LL_HEADER, "offset": offset, "len": 2})


def frame_rules(vif: str) -> list[list[Any]]:
    """The two rules for one vif: not IP/ARP/802.1Q -> drop; 802.1Q without IP inside -> drop."""
    from pyroute2.nftables.expressions import genex, verdict

    iif = [
        [genex("meta", {"key": NFT_META_IIFNAME, "dreg": 1})],
        [_cmp(NFT_CMP_EQ, vif.encode().ljust(IFNAMSIZ, b"\0"))],
    ]
    other = [
        *iif,
        [_payload(ETHERTYPE_OFFSET)],
        *([_cmp(NFT_CMP_NEQ, t)] for t in (ETH_P_IP, ETH_P_IPV6, ETH_P_ARP, ETH_P_8021Q)),
        verdict(NF_DROP),
    ]
    vlan = [
        *iif,
        [_payload(ETHERTYPE_OFFSET)],
        [_cmp(NFT_CMP_EQ, ETH_P_8021Q)],
        [_payload(INNER_ETHERTYPE_OFFSET)],
        *([_cmp(NFT_CMP_NEQ, t)] for t in (ETH_P_IP, ETH_P_IPV6)),
        verdict(NF_DROP),
    ]
    return [other, vlan]


def _open() -> Any:
    try:
        from pyroute2.nftables.main import NFTables

        return NFTables(nfgen_family=NFPROTO_BRIDGE)
    except Exception as e:
        raise FirewallError(f"cannot open the nftables netlink socket: {e}") from e


def _chains(nft: Any) -> set[str]:
    return {
        str(c.get_attr("NFTA_CHAIN_NAME"))
        for c in nft.get_chains()
        if c.get_attr("NFTA_CHAIN_TABLE") == TABLE and int(c["nfgen_family"]) == NFPROTO_BRIDGE
    }


def set_sysctls(directory: Path = SYSCTL_DIR) -> list[str]:
    """Both bridge-nf-filter-*-tagged to 1; returns what could not be set (and why)."""
    failed = []
    for name in SYSCTLS:
        try:
            (directory / name).write_text("1\n")
        except OSError as e:
            failed.append(f"{name}: {e}")
    return failed


def install(domain: int, vifs: Sequence[str]) -> None:
    """The domain's frame filter; a chain already there (a stopped gate's) is kept as it is."""
    for problem in set_sysctls():
        log.warning("domain %d: cannot set net.bridge.%s", domain, problem)
    nft = _open()
    try:
        if chain_name(domain) in _chains(nft):
            return
        nft.table("add", name=TABLE)
        nft.chain("add", table=TABLE, name=chain_name(domain), hook="forward", priority=-200)
        for vif in vifs:
            for rule in frame_rules(vif):
                nft.rule("add", table=TABLE, chain=chain_name(domain), expressions=rule)
    except FirewallError:
        raise
    except Exception as e:
        raise FirewallError(f"cannot install the bridge frame filter: {e}") from e
    finally:
        nft.close()


def remove(domain: int) -> None:
    """Remove the domain's frame filter (and the table once empty); absent is not an error."""
    try:
        nft = _open()
    except FirewallError:
        return  # no nf_tables: nothing of ours there
    try:
        chains = _chains(nft)
        if chain_name(domain) in chains:
            nft.rule("del", table=TABLE, chain=chain_name(domain))
            nft.chain("del", table=TABLE, name=chain_name(domain))
            chains.discard(chain_name(domain))
        if not chains and any(
            str(t.get_attr("NFTA_TABLE_NAME")) == TABLE for t in nft.get_tables()
        ):
            nft.table("del", name=TABLE)
    except Exception as e:
        raise FirewallError(f"cannot remove the bridge frame filter: {e}") from e
    finally:
        nft.close()


def installed(domain: int) -> bool:
    try:
        nft = _open()
    except FirewallError:
        return False
    try:
        return chain_name(domain) in _chains(nft)
    except Exception:
        return False
    finally:
        nft.close()
