"""Names, paths and addresses of one lab instance: pure values, no I/O.

The default instance uses the names other parts of xfgate and the README document
(netns ``xfgate-dom0``/``xfgate-client``, run dir ``/run/xfgate/lab``, RAM files
``/dev/shm/xfgate-guestD.mem``). ``$XFGATE_LAB_PREFIX``
(or ``--prefix``) gives a second, private instance that can coexist with it, e.g. for a test
that tears its lab down.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from xfgate.config import DEFAULT_CACHE_DIR, DEFAULT_DOMAINS_FILE
from xfgate.errors import ConfigError

DEFAULT_PREFIX = "xfgate"
MAX_DOMAINS = 254
BRIDGE = "xenbr0"
# The client netns's end of the veth is eth0; the dom0 end is a bridge port.
CLIENT_IFACE = "eth0"
DOM0_CLIENT_PORT = "vclient0"
CLIENT_V4 = IPv4Address("198.18.0.1")
CLIENT_V6 = IPv6Address("2001:2::1")
V4_PREFIXLEN = 16
V6_PREFIXLEN = 64
GUEST_RAM_MB = 256
RUN_ROOT = Path("/run/xfgate")

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9-]{0,11}$")


def guest_v4(domain: int) -> IPv4Address:
    return IPv4Address(f"198.18.1.{check_domain_id(domain)}")


def guest_v6(domain: int) -> IPv6Address:
    # "2001:2::1:D" with D written as-is (so domain 1 is 2001:2::1:1, as documented).
    return IPv6Address(f"2001:2::1:{check_domain_id(domain)}")


def guest_mac(domain: int) -> str:
    return f"52:54:00:12:01:{check_domain_id(domain):02x}"


def vif_name(domain: int) -> str:
    return f"vif{check_domain_id(domain)}.0"


def check_domain_id(domain: int) -> int:
    if not 1 <= domain <= MAX_DOMAINS:
        raise ConfigError(f"lab domain ids are 1..{MAX_DOMAINS}, got {domain}")
    return domain


@dataclass(frozen=True)
class LabLayout:
    prefix: str = DEFAULT_PREFIX
    run_root: Path = RUN_ROOT  # another root only for tests of the run dir's life cycle
    # The domains file `up` writes the lab's domains into; None: $XFGATE_DOMAINS, else the
    # product's default (the command line's choice; tests pass their own file instead).
    domains_file: Path | None = None

    def __post_init__(self) -> None:
        if not _PREFIX_RE.match(self.prefix):
            raise ConfigError(
                f"lab prefix {self.prefix!r} invalid: lowercase letter first, then up to 11 "
                "of [a-z0-9-] (it becomes part of namespace and file names)"
            )

    @property
    def domains_path(self) -> Path:
        return self.domains_file if self.domains_file is not None else domains_file_from_env()

    @property
    def dom0_netns(self) -> str:
        return f"{self.prefix}-dom0"

    @property
    def client_netns(self) -> str:
        return f"{self.prefix}-client"

    @property
    def run_dir(self) -> Path:
        # Everything under xfgate's own /run dir; a private lab gets lab-PREFIX beside it.
        name = "lab" if self.prefix == DEFAULT_PREFIX else f"lab-{self.prefix}"
        return self.run_root / name

    @property
    def legacy_lock_path(self) -> Path:
        # Where earlier versions kept a lock file (it outlived the lab): removed by `down`.
        # The lock is now a flock on run_dir itself (lab.lab_lock).
        return self.run_root / f"{self.run_dir.name}.lock"

    @property
    def state_path(self) -> Path:
        return self.run_dir / "lab.json"

    @property
    def peers_stats_path(self) -> Path:
        return self.run_dir / "peers.json"

    @property
    def peers_log_path(self) -> Path:
        return self.run_dir / "peers.log"

    def guest_dir(self, domain: int) -> Path:
        return self.run_dir / f"guest{check_domain_id(domain)}"

    def ram_path(self, domain: int) -> Path:
        return Path("/dev/shm") / f"{self.prefix}-guest{check_domain_id(domain)}.mem"

    def qmp_socket(self, domain: int) -> Path:
        return self.guest_dir(domain) / "qmp.sock"

    def ctl_socket(self, domain: int) -> Path:
        return self.guest_dir(domain) / "ctl.sock"

    def ctl_lock(self, domain: int) -> Path:
        return self.guest_dir(domain) / "ctl.lock"

    def serial_log(self, domain: int) -> Path:
        return self.guest_dir(domain) / "serial.log"

    def pidfile(self, domain: int) -> Path:
        return self.guest_dir(domain) / "qemu.pid"


def layout_from_env(prefix: str | None = None) -> LabLayout:
    """The given prefix, else $XFGATE_LAB_PREFIX, else the default instance."""
    return LabLayout(prefix or os.environ.get("XFGATE_LAB_PREFIX") or DEFAULT_PREFIX)


# The harness's own environment: the lab, bench and tests find the product's paths here and
# pass them down; the product itself reads none of these variables.
def domains_file_from_env() -> Path:
    """$XFGATE_DOMAINS, else the product's default domains file."""
    return Path(os.environ.get("XFGATE_DOMAINS", str(DEFAULT_DOMAINS_FILE)))


def cache_dir_from_env() -> Path:
    """$XFGATE_CACHE, else the product's default cache directory."""
    return Path(os.environ.get("XFGATE_CACHE", str(DEFAULT_CACHE_DIR)))
