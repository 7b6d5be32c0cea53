"""The policy file on disk: loaded keeping the last good policy, rewritten atomically, and an
audit log (JSON lines) of every change: block, unblock, expiry, reload, rejected reload."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xfgate.errors import ConfigError
from xfgate.service.policyfile import PolicyFileError, PolicySet, Rule, parse_policy, render_policy

log = logging.getLogger(__name__)

Signature = tuple[int, int, int]  # (inode, size, mtime_ns) of the file as last read or written


class PolicyStore:
    def __init__(
        self, path: Path, audit_path: Path | None, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = path
        self.audit_path = audit_path
        self._clock = clock
        self._lock = threading.Lock()  # changes come from the main loop and control threads
        self.policy = PolicySet()
        self.error = ""  # why the file on disk is not the policy in force ("" when it is)
        self._signature: Signature | None = None

    def _stat(self) -> Signature | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def changed_on_disk(self) -> bool:
        return self._stat() != self._signature

    def load(self) -> bool:
        """Read the file. A missing file is an empty policy; one that does not parse keeps the
        policy in force and sets ``error`` (file:line). True when the policy changed."""
        with self._lock:
            signature = self._stat()
            self._signature = signature
            try:
                text = self.path.read_text() if signature is not None else ""
                new = parse_policy(text, str(self.path))
            except (OSError, UnicodeDecodeError, PolicyFileError) as e:
                error = str(e)
                if error != self.error:
                    log.error("policy file rejected, the last good policy stays: %s", error)
                    self.audit({"op": "reload-rejected", "error": error})
                self.error = error
                return False
            self.error = ""
            if new == self.policy:
                return False
            self.audit(
                {"op": "reload", "rules": [r.to_dict() for r in new.rules], "file": str(self.path)}
            )
            self.policy = new
            return True

    def change(self, update: Callable[[PolicySet], PolicySet], entry: dict[str, Any]) -> PolicySet:
        """Apply `update` to the policy in force and write it to the file atomically; the
        audit log gets `entry`. Refused while the file on disk does not parse (the operator's
        edit would be overwritten)."""
        with self._lock:
            if self.error:
                raise ConfigError(f"the policy file does not parse; fix it first: {self.error}")
            new = update(self.policy)
            self._write(new)
            self.policy = new
            self.audit(entry)
            return new

    def expire(self, now: float) -> tuple[Rule, ...]:
        """Remove the rules whose time has come, write the file, log each; returns them."""
        with self._lock:
            gone = self.policy.expired(now)
            if not gone:
                return ()
            new = self.policy.without(r.key for r in gone)
            try:
                self._write(new)
            except ConfigError as e:  # the rule still ends in memory; the file catches up later
                log.error("%s", e)
            self.policy = new
            for r in gone:
                log.info("rule expired: %s", r.describe())
                self.audit({"op": "expire", "rule": r.to_dict()})
            return gone

    def _write(self, policy: PolicySet) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(render_policy(policy))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            dirfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise ConfigError(f"cannot write the policy file {self.path}: {e}") from e
        self._signature = self._stat()

    def audit(self, entry: dict[str, Any]) -> None:
        if self.audit_path is None:
            return
        line = json.dumps({"time": round(self._clock(), 3), **entry}, separators=(",", ":"))
        try:
            self.audit_path.parent.mkdir(parents=True, exist_ok=True)
            with self.audit_path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as e:
            log.error("cannot write the audit log %s: %s", self.audit_path, e)
