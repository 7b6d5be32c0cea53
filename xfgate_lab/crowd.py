"""`xfgate-lab up --crowd TASKS,SOCKETS`: a crowded guest for scale tests (pure values, no I/O).

The guest's init starts `crowd` (xfgate_lab/guest/crowd.c) with these numbers; the guest's RAM
is sized to hold them, and a crowd that cannot fit what the caller allows is refused with the
size it needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from xfgate_lab.errors import LabError

# Measured on the 6.1 lab guest: the base guest uses ~70 MiB of its 256; 2,000 crowd tasks
# and 20,000 sockets added ~120 MiB (191 MiB used). Per task (forked worker or thread: kernel
# stack, task_struct, page tables, touched user pages) and per socket (file, inode, sock,
# loopback buffers), with a margin for the page cache and the kernel's slack:
BASE_RAM_MB = 256
TASK_KIB = 96
SOCKET_KIB = 6
MAX_TASKS = 30000
MAX_SOCKETS = 300000
_SPEC_RE = re.compile(r"^(\d{1,6}),(\d{1,7})$")


@dataclass(frozen=True)
class Crowd:
    tasks: int
    sockets: int

    @property
    def spec(self) -> str:
        """As the kernel command line carries it (xfgate.crowd=TASKS,SOCKETS)."""
        return f"{self.tasks},{self.sockets}"

    def ram_mb(self) -> int:
        """Guest RAM that holds the lab's guest and this crowd, rounded up to 64 MiB."""
        need = BASE_RAM_MB + (self.tasks * TASK_KIB + self.sockets * SOCKET_KIB) // 1024
        return -(-need // 64) * 64

    def boot_seconds(self) -> float:
        """Extra time the guest needs to start the crowd under TCG (generous)."""
        return 30.0 + self.tasks * 0.03 + self.sockets * 0.01


def parse_crowd(text: str) -> Crowd:
    m = _SPEC_RE.match(text.strip())
    if m is None:
        raise LabError(f"--crowd {text!r}: expected TASKS,SOCKETS, e.g. 2000,20000")
    crowd = Crowd(int(m.group(1)), int(m.group(2)))
    if not 2 <= crowd.tasks <= MAX_TASKS or not 2 <= crowd.sockets <= MAX_SOCKETS:
        raise LabError(f"--crowd {text}: TASKS must be 2..{MAX_TASKS} and SOCKETS 2..{MAX_SOCKETS}")
    workers = _workers(crowd.tasks)
    if crowd.sockets - max(2, crowd.sockets // 10) < 2 * (workers - 1):
        raise LabError(
            f"--crowd {text}: {workers} workers need at least 2 sockets each: "
            f"SOCKETS >= {_min_sockets(workers)}"
        )
    return crowd


def _workers(tasks: int) -> int:
    """How many workers crowd.c starts for `tasks` (the same plan, see its main())."""
    workers, used = 0, 1
    while used < tasks:
        threaded = workers % 4 == 3 and tasks - used > 3
        used += 4 if threaded else 1
        workers += 1
    return workers


def _min_sockets(workers: int) -> int:
    n = 2 * workers
    while n - max(2, n // 10) < 2 * (workers - 1):
        n += 1
    return n


def guest_ram_mb(crowd: Crowd | None, requested_mb: int | None, available_mb: int) -> int:
    """The guest's RAM: `requested_mb` if given and enough, else what the crowd needs; refused
    (LabError naming the size needed) when the request or the host cannot hold it."""
    need = crowd.ram_mb() if crowd is not None else BASE_RAM_MB
    what = f"a crowd of {crowd.tasks} tasks and {crowd.sockets} sockets" if crowd else "the guest"
    if requested_mb is not None and requested_mb < need:
        raise LabError(f"--ram-mb {requested_mb} cannot hold {what}: it needs {need} MiB")
    size = requested_mb if requested_mb is not None else need
    if size > available_mb:
        raise LabError(
            f"{what} needs {size} MiB of guest RAM; the host has {available_mb} MiB available"
        )
    return size
