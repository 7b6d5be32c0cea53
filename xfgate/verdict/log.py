"""Per-packet verdict log: one JSON object per line, to a file or stdout, buffered, sampled.

Sampling keeps 1 of every N accepts; drops and internal errors are always written, since
those are what an operator investigates. A file log may rotate by size, as logging's
RotatingFileHandler does: past ``max_bytes`` FILE becomes FILE.1 (FILE.1 FILE.2, ... up to
``backups``, the oldest dropped), so the log never holds more than (backups + 1) x max_bytes
plus one flush.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

FIELDS = (
    "time",
    "domain",
    "vif",
    "direction",
    "proto",
    "src",
    "sport",
    "dst",
    "dport",
    "pid",
    "uid",
    "comm",
    "verdict",
    "reason",
    "source",
    "latency_us",
)


class VerdictLog:
    def __init__(
        self,
        stream: TextIO,
        sample: int = 1,
        flush_every: int = 64,
        flush_interval: float = 1.0,
        close_stream: bool = False,
        path: Path | None = None,
        max_bytes: int = 0,
        backups: int = 3,
    ) -> None:
        if sample < 1:
            raise ValueError("log sample must be >= 1")
        self._stream = stream
        self._sample = sample
        self._flush_every = flush_every
        self._flush_interval = flush_interval
        self._close_stream = close_stream
        self._buffer: list[str] = []
        self._seen = 0
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()
        self.written = 0
        self.errors = 0
        self.rotations = 0
        if max_bytes < 0 or backups < 1:
            raise ValueError("log rotation: max_bytes >= 0 and backups >= 1")
        self._path = path
        self._max_bytes = max_bytes if path is not None else 0
        self._backups = backups
        self._size = _size(path) if path is not None else 0

    @classmethod
    def open(cls, target: str, sample: int = 1, max_bytes: int = 0, backups: int = 3) -> VerdictLog:
        """``-`` is stdout; anything else a file appended to (line-buffered JSON), rotated
        past `max_bytes` (0: never)."""
        if target == "-":
            return cls(sys.stdout, sample)
        try:
            stream = open(target, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        except OSError as e:
            from xfgate.errors import ConfigError

            raise ConfigError(f"cannot open verdict log {target}: {e}") from e
        return cls(
            stream,
            sample,
            close_stream=True,
            path=Path(target),
            max_bytes=max_bytes,
            backups=backups,
        )

    def record(self, entry: dict[str, Any], always: bool = False) -> None:
        with self._lock:
            self._seen += 1
            if not always and (self._seen - 1) % self._sample:
                return
            try:
                self._buffer.append(json.dumps(entry, separators=(",", ":")))
            except (TypeError, ValueError):
                self.errors += 1
                return
            now = time.monotonic()
            if (
                len(self._buffer) >= self._flush_every
                or now - self._last_flush >= self._flush_interval
            ):
                self._flush_locked(now)

    def flush(self) -> None:
        with self._lock:
            self._flush_locked(time.monotonic())

    def _flush_locked(self, now: float) -> None:
        self._last_flush = now
        if not self._buffer:
            return
        text = "\n".join(self._buffer) + "\n"
        try:
            if self._max_bytes and self._size and self._size + len(text) > self._max_bytes:
                self._rotate()
            self._stream.write(text)
            self._stream.flush()
            self._size += len(text.encode())
            self.written += len(self._buffer)
        except (OSError, ValueError):
            self.errors += len(self._buffer)  # a full disk must not stop the verdicts
        self._buffer.clear()

    def _rotate(self) -> None:
        """FILE -> FILE.1 -> ... -> FILE.<backups> (dropped), then a new FILE."""
        assert self._path is not None
        p = self._path
        self._stream.close()
        for i in range(self._backups - 1, 0, -1):
            older = p.with_name(f"{p.name}.{i}")
            if older.exists():
                os.replace(older, p.with_name(f"{p.name}.{i + 1}"))
        if p.exists():
            os.replace(p, p.with_name(f"{p.name}.1"))
        self._stream = open(p, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._size = 0
        self.rotations += 1

    def close(self) -> None:
        self.flush()
        if self._close_stream:
            try:
                self._stream.close()
            except OSError:
                self.errors += 1


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
