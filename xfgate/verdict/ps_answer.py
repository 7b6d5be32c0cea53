"""A gate's answer to `xfgate ps` (op "ps" on its control socket, issue 10).

Answered on a thread of its own (`control.ControlServer` slow ops: one request at a time),
off the packet path and the control thread (`status`/`block` answer meanwhile): the gate's
last refresh state made current for the request (xfgate.vmi.current: every task_struct, fd
table header and fd array, file and sock read again, only what changed decoded), rendered from
per-entry caches, sent as the reply's body (control.BodyReply). The source's lock is held only
to take the plan (the boot checked, the state to start from): lookups of the packet path go on
during the walk.
The answer says where it came from: ``"source": "gate"``, the gate's pid, when the guest was
read, how old the state it started from was, whether it was complete.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from xfgate.config import DomainConfig
from xfgate.errors import ConfigError, ControlError
from xfgate.verdict.control import BodyReply
from xfgate.verdict.engine import LockedOwnerSource
from xfgate.vmi.current import CurrentPlan, CurrentReader, PsRenderer

# How long a request waits for the source (a refresh holds it for ms; a full walk's install
# for less than a second on the crowd): then the operator is told, and `ps --walk` remains.
PS_LOCK_WAIT = 5.0
FORMATS = ("json", "table")


@dataclasses.dataclass
class PsAnswerer:
    """A domain's `ps` answers: its reader (memo of files and socks) and renderer (cached
    entries), used by one slow-op thread at a time."""

    cfg: DomainConfig
    source: LockedOwnerSource
    reader: CurrentReader = dataclasses.field(default_factory=CurrentReader)
    renderer: PsRenderer = dataclasses.field(default_factory=PsRenderer)

    def answer(self, req: dict[str, Any]) -> BodyReply:
        fmt = req.get("format", "json")
        if fmt not in FORMATS:
            raise ConfigError(f"ps: format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        pid, uid = _optional_int(req, "pid"), _optional_int(req, "uid")
        self._check_domain(req.get("domain"))
        if not callable(getattr(self.source.inner, "current_plan", None)):
            raise ControlError(
                f"the gate of domain {self.cfg.id} does not read guest memory:"
                " use `xfgate ps --walk`"
            )
        start = time.monotonic()
        try:
            plan: CurrentPlan = self.source.locked(
                lambda src: src.current_plan(),  # type: ignore[attr-defined]
                PS_LOCK_WAIT,
            )
        except TimeoutError as e:
            raise ControlError(f"ps: the gate's view is busy ({e}): try again") from None
        current = self.reader.read(plan)
        counts = dataclasses.asdict(current.counts)
        meta: dict[str, Any] = {
            "source": "gate",
            "gate": {
                "pid": os.getpid(),
                "domain": self.cfg.id,
                "name": self.cfg.name,
                "complete": current.complete,
                "problems": current.problems,
                "read_at": round(current.walked_at, 3),
                "age_seconds": 0.0,
                "base_age_seconds": round(current.base_age, 3),
                "counts": counts,
            },
        }
        meta["gate"]["age_seconds"] = round(time.time() - current.walked_at, 3)
        render = time.perf_counter()
        if fmt == "table":
            text = self.renderer.table_text(current, pid, uid) + "\n"
        else:
            text = self.renderer.json_text(current, meta, pid, uid) + "\n"
        gate = {**meta["gate"], "counts": {**counts}}
        gate["counts"]["render_ms"] = round((time.perf_counter() - render) * 1000, 2)
        gate["answer_ms"] = round((time.monotonic() - start) * 1000, 2)
        return BodyReply({"ok": True, "format": fmt, "source": "gate", "gate": gate}, text.encode())

    def _check_domain(self, want: Any) -> None:
        """The client's domain (id, name, memory path as its domains file says) must be
        this gate's: else it would print another guest's processes."""
        if want is None:
            return
        if not isinstance(want, dict):
            raise ConfigError(f"ps: domain must be an object, not {want!r}")
        mine = {"id": self.cfg.id, "name": self.cfg.name, "memory": self.cfg.memory.path}
        differ = {k: v for k, v in want.items() if k in mine and mine[k] != v}
        if differ:
            theirs = ", ".join(f"{k} {mine[k]!r}" for k in sorted(differ))
            raise ControlError(
                f"this gate serves another domain ({theirs}; asked for"
                f" {', '.join(f'{k} {v!r}' for k, v in sorted(differ.items()))})"
            )


def _optional_int(req: dict[str, Any], key: str) -> int | None:
    value = req.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"ps: {key} must be an integer, not {value!r}")
    return value
