"""Per-packet verdict log: one JSON object per line, to a file or stdout, buffered, sampled.

Sampling keeps 1 of every N accepts; drops and internal errors are always written, since
those are what an operator investigates.
"""

from __future__ import annotations

import json
import sys
import threading
import time
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

    @classmethod
    def open(cls, target: str, sample: int = 1) -> VerdictLog:
        """``-`` is stdout; anything else a file appended to (line-buffered JSON)."""
        if target == "-":
            return cls(sys.stdout, sample)
        try:
            stream = open(target, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        except OSError as e:
            from xfgate.errors import ConfigError

            raise ConfigError(f"cannot open verdict log {target}: {e}") from e
        return cls(stream, sample, close_stream=True)

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
        try:
            self._stream.write("\n".join(self._buffer) + "\n")
            self._stream.flush()
            self.written += len(self._buffer)
        except (OSError, ValueError):
            self.errors += len(self._buffer)  # a full disk must not stop the verdicts
        self._buffer.clear()

    def close(self) -> None:
        self.flush()
        if self._close_stream:
            try:
                self._stream.close()
            except OSError:
                self.errors += 1
