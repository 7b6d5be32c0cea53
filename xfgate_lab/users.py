"""Who is using a lab right now: one file per live process (a pytest session, a benchmark)
in the run dir. Whoever brought the lab up tears it down only when nobody else is using it,
so concurrent test sessions sharing the default lab do not pull it from under each other."""

from __future__ import annotations

import os
from pathlib import Path

from xfgate_lab.layout import LabLayout


def users_dir(layout: LabLayout) -> Path:
    return layout.run_dir / "users"


def register_user(layout: LabLayout, pid: int | None = None) -> Path:
    d = users_dir(layout)
    d.mkdir(parents=True, exist_ok=True)
    path = d / str(pid or os.getpid())
    path.touch()
    return path


def unregister_user(layout: LabLayout, pid: int | None = None) -> None:
    (users_dir(layout) / str(pid or os.getpid())).unlink(missing_ok=True)


def live_users(layout: LabLayout, exclude: int | None = None) -> list[int]:
    """Registered pids still alive (entries of dead processes are dropped)."""
    alive = []
    try:
        entries = list(users_dir(layout).iterdir())
    except OSError:
        return []
    for entry in entries:
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if Path(f"/proc/{pid}").exists():
            if pid != exclude:
                alive.append(pid)
        else:
            entry.unlink(missing_ok=True)
    return sorted(alive)
