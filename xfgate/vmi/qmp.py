"""A minimal synchronous QMP client: the QEMU monitor over its unix socket.

Enough for introspection: pause/resume, run state, vCPU control registers (CR3/CR4 through
`info registers`) and `dump-guest-memory`. Every call has a timeout; a dead QEMU is reported as
GuestNotRunning, a refused command as QmpError.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xfgate.errors import GuestNotRunning, QmpError

if TYPE_CHECKING:
    from xfgate.vmi.monitor import Monitor

DEFAULT_TIMEOUT = 5.0
MAX_REPLY = 16 << 20  # a QMP reply larger than this is a broken monitor, not data


@dataclass(frozen=True, slots=True)
class ControlRegisters:
    cr3: int
    cr4: int

    @property
    def la57(self) -> bool:
        """CR4.LA57 (bit 12): 5-level paging."""
        return bool(self.cr4 & (1 << 12))

    @property
    def kernel_root(self) -> int:
        """Physical address of the kernel's top-level page table. With PTI, CR3 may hold the
        user copy, which sits one page above the kernel's (bit 12): clear it."""
        return self.cr3 & 0x000FFFFFFFFFF000 & ~0x1000


@dataclass(slots=True)
class PauseRecord:
    """How long a `paused()` block kept the guest stopped (stop sent to cont acknowledged)."""

    seconds: float = 0.0
    was_running: bool = True


_CR_RE = re.compile(r"\bCR([34])=([0-9a-fA-F]+)")


def parse_control_registers(info_registers: str) -> ControlRegisters:
    """CR3 and CR4 of the first vCPU from `info registers` text."""
    found: dict[str, int] = {}
    for reg, value in _CR_RE.findall(info_registers):
        found.setdefault(reg, int(value, 16))
    if "3" not in found or "4" not in found:
        raise QmpError(f"`info registers` output has no CR3/CR4: {info_registers[:200]!r}")
    return ControlRegisters(cr3=found["3"], cr4=found["4"])


class QmpClient:
    """One QMP session. Not thread-safe: one command at a time."""

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT, domain: int | str = "") -> None:
        self.path = path
        self.timeout = timeout
        self.domain = domain or path
        self._sock: socket.socket | None = None
        self._buf = b""

    def __enter__(self) -> QmpClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        if self._sock is not None:
            return
        deadline = time.monotonic() + self.timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                raise GuestNotRunning(
                    self.domain, f"QEMU monitor {self.path} does not answer ({e.strerror})"
                ) from None
            except BlockingIOError as e:
                # QEMU's listen backlog is full: a client it has not accepted yet (or one that
                # just left, until QEMU's main loop reaps it). Retry within the timeout.
                sock.close()
                if time.monotonic() >= deadline:
                    raise QmpError(
                        f"QMP socket {self.path} accepts no connection within {self.timeout} s "
                        "(another client holds the monitor?)"
                    ) from e
                time.sleep(0.02)
            except OSError as e:
                sock.close()
                raise QmpError(f"cannot connect to QMP socket {self.path}: {e}") from e
        self._sock = sock
        self._buf = b""
        try:
            try:
                greeting = self._read_message()
            except QmpError:
                raise QmpError(
                    f"QMP {self.path} sent no greeting within {self.timeout} s: another client "
                    "holds the monitor (QEMU serves one QMP client at a time) or QEMU is hung"
                ) from None
            if "QMP" not in greeting:
                raise QmpError(f"{self.path} is not a QMP socket (greeting {greeting!r})")
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _read_message(self) -> dict[str, Any]:
        assert self._sock is not None
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError(f"QMP {self.path}: no reply within {self.timeout} s")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise QmpError(f"QMP {self.path}: no reply within {self.timeout} s") from None
            except OSError as e:
                self.close()
                raise GuestNotRunning(self.domain, f"QEMU monitor connection lost: {e}") from e
            if not chunk:
                self.close()
                raise GuestNotRunning(self.domain, "QEMU closed its monitor (QEMU exited?)")
            self._buf += chunk
            if len(self._buf) > MAX_REPLY:
                raise QmpError(f"QMP {self.path}: reply larger than {MAX_REPLY} bytes")
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError as e:
            raise QmpError(f"QMP {self.path}: malformed reply {line[:200]!r}") from e
        if not isinstance(msg, dict):
            raise QmpError(f"QMP {self.path}: unexpected reply {msg!r}")
        return msg

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command and return its `return` value; events in between are skipped."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as e:
            self.close()
            raise GuestNotRunning(self.domain, f"QEMU monitor connection lost: {e}") from e
        while True:
            msg = self._read_message()
            if "event" in msg:
                continue
            if "error" in msg:
                err = msg["error"]
                raise QmpError(f"QMP {command} failed: {err.get('class')}: {err.get('desc')}")
            if "return" in msg:
                return msg["return"]
            raise QmpError(f"QMP {command}: unexpected reply {msg!r}")

    def stop(self) -> None:
        self.execute("stop")

    def cont(self) -> None:
        self.execute("cont")

    def status(self) -> str:
        """The run state: "running", "paused", "shutdown", ..."""
        return str(self.execute("query-status").get("status", ""))

    def is_running(self) -> bool:
        return bool(self.execute("query-status").get("running", False))

    def human(self, command_line: str) -> str:
        return str(self.execute("human-monitor-command", {"command-line": command_line}))

    def control_registers(self) -> ControlRegisters:
        return parse_control_registers(self.human("info registers"))

    def dump_guest_memory(self, path: str, timeout: float = 120.0) -> None:
        """Write an ELF core of guest physical memory (paging=false: physical only)."""
        saved = self.timeout
        self.timeout = timeout
        try:
            self.execute(
                "dump-guest-memory", {"paging": False, "protocol": f"file:{path}", "detach": False}
            )
        finally:
            self.timeout = saved


@contextmanager
def paused(client: Monitor) -> Iterator[PauseRecord]:
    """Stop the guest for the block and resume it after, measuring the pause. A guest that was
    already paused is left paused (we did not stop it)."""
    record = PauseRecord()
    record.was_running = client.is_running()
    if not record.was_running:
        yield record
        return
    start = time.perf_counter()
    client.stop()
    try:
        yield record
    finally:
        client.cont()
        record.seconds = time.perf_counter() - start
