"""What a gate is asked to do: its mode and options, as the command line hands them over."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from xfgate.config import DEFAULT_CACHE_DIR, DEFAULT_DOMAINS_FILE, DEFAULT_RUN_DIR
from xfgate.verdict.policy import Policy, Verdict


class GateMode(enum.StrEnum):
    QUEUE = "queue"  # a verdict per new flow (NFQUEUE)
    POLL = "poll"  # the thesis's baseline: DROP rules from a walk every --interval seconds


@dataclass(frozen=True)
class GateOptions:
    domains: tuple[int, ...]
    policy: Policy
    mode: GateMode = GateMode.QUEUE
    interval: float = 5.0  # poll mode: seconds between walks
    queue_num: int | None = None
    queue_bypass: bool = False
    on_error: Verdict | None = None
    log_target: str | None = None
    log_sample: int = 1
    log_max_bytes: int = 0  # rotate the verdict log file past this size (0: never)
    log_backups: int = 3  # rotated files kept (FILE.1 ... FILE.N)
    persist_blocks: bool = False  # with release_on_exit: keep the sets
    # False (default): a stopping gate leaves its chains, sets and queue rules in the kernel.
    release_on_exit: bool = False
    fastpath: bool = True
    # A packet thread using > 25 % of a core, mostly on drops (a flood), runs at this nice (0: off).
    flood_nice: int = 10
    # ... and uses at most this share of one core while it floods (0: no cap).
    flood_cpu: float = 0.05
    refresh_interval: float = 2.0
    cache_ttl: float = 10.0
    negative_ttl: float = 1.0
    domains_file: Path = DEFAULT_DOMAINS_FILE
    libvirt_uri: str = ""  # where ids not in the domains file are looked up ("": nowhere)
    profile: str | None = None  # profile file; default: built/cached for the domain's kernel
    run_dir: Path = DEFAULT_RUN_DIR  # control sockets, poll-mode rule logs
    cache_dir: Path = DEFAULT_CACHE_DIR  # kernel assets and profiles
