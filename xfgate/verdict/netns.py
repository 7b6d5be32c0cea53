"""Entering a named network namespace (ip netns) before any socket or rule is made, and
finding a vif's ifindex there, through pyroute2 (Python 3.11 has no ``os.setns``)."""

from __future__ import annotations

import os

from xfgate.errors import ConfigError, PrerequisiteError

NETNS_RUN_DIR = "/run/netns"


def enter_netns(name: str) -> None:
    """Move this process into /run/netns/NAME. Empty name: stay where we are."""
    if not name:
        return
    from pyroute2 import netns

    path = os.path.join(NETNS_RUN_DIR, name)
    try:
        netns.setns(path, flags=0)  # flags=0: never create it
    except FileNotFoundError:
        raise ConfigError(
            f"network namespace {name!r} does not exist ({path}): is the domain's lab up?"
        ) from None
    except PermissionError:
        raise PrerequisiteError(f"cannot open {path}: run as root") from None
    except OSError as e:
        raise PrerequisiteError(f"setns({path}) failed: {e.strerror or e} (need root)") from None


def ifindex(name: str) -> int:
    """The ifindex of an interface in the current namespace, with a clear error if absent."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
    if not found:
        raise ConfigError(
            f"interface {name!r} not found in this network namespace: is the domain running"
            " and its vif name right in the domains file?"
        )
    return int(found[0])
