"""ServeThread: serves its fd when readable, sleeps without a timeout when idle, stops at once."""

from __future__ import annotations

import os
import select
import threading
import time
from typing import Any

import pytest

from xfgate.verdict.runner import ServeThread


def test_serves_when_readable_and_stops_promptly() -> None:
    r, w = os.pipe()
    got: list[bytes] = []
    served = threading.Event()

    def serve() -> None:
        got.append(os.read(r, 16))
        served.set()

    t = ServeThread("t", r, serve)
    t.start()
    os.write(w, b"x")
    assert served.wait(5)
    started = time.monotonic()
    t.stop()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - started < 0.4
    assert got == [b"x"] and t.errors == 0
    os.close(r)
    os.close(w)


def test_idle_thread_does_not_wake(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    real = select.select

    def counting(*args: Any) -> Any:
        calls.append(args[3] if len(args) > 3 else None)
        return real(*args)

    monkeypatch.setattr(select, "select", counting)
    r, w = os.pipe()
    t = ServeThread("idle", r, lambda: None)
    t.start()
    time.sleep(1.3)
    t.stop()
    t.join(5)
    assert not t.is_alive()
    assert len(calls) == 1, calls  # one select, no timeout, until the stop woke it
    os.close(r)
    os.close(w)


def test_pipe_closed_after_run_and_stop_never_started_closes_it() -> None:
    before = len(os.listdir("/proc/self/fd"))
    r, w = os.pipe()
    t = ServeThread("x", r, lambda: None)
    t.start()
    t.stop()
    t.join(5)
    t.stop()  # again, after the thread ended: no write to a closed descriptor
    never = ServeThread("never", r, lambda: None)
    never.stop()
    os.close(r)
    os.close(w)
    assert len(os.listdir("/proc/self/fd")) == before
