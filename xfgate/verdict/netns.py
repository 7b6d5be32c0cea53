"""Entering a named network namespace (ip netns) before any socket or rule is made.

Python 3.11 has no os.setns: call libc's setns(2) through ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from xfgate.errors import ConfigError, PrerequisiteError

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"


def enter_netns(name: str) -> None:
    """Move this process into /run/netns/NAME. Empty name: stay where we are."""
    if not name:
        return
    path = os.path.join(NETNS_RUN_DIR, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(
            f"network namespace {name!r} does not exist ({path}): is the domain's lab up?"
        ) from None
    except PermissionError:
        raise PrerequisiteError(f"cannot open {path}: run as root") from None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise PrerequisiteError(f"setns({path}) failed: {os.strerror(err)} (need root)")
    finally:
        os.close(fd)


def ifindex(name: str) -> int:
    """The ifindex of an interface in the current namespace, with a clear error if absent."""
    try:
        return int(open(f"/sys/class/net/{name}/ifindex").read())
    except OSError:
        try:
            import socket

            return socket.if_nametoindex(name)
        except OSError:
            raise ConfigError(
                f"interface {name!r} not found in this network namespace: is the domain running"
                " and its vif name right in the domains file?"
            ) from None
