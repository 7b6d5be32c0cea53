"""systemd's notify protocol, written directly: one datagram to $NOTIFY_SOCKET (sd_notify(3)).

The socket path comes from the command line layer (xfgate/cli.py reads the environment); an
empty path (not started by systemd) makes every call a no-op.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, notify_socket: str, watchdog_usec: int = 0) -> None:
        self._address = notify_socket
        if notify_socket.startswith("@"):  # abstract namespace
            self._address = "\0" + notify_socket[1:]
        # Ping at half the watchdog period, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec > 0 else 0.0
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` lines; False if there is no socket or it refused."""
        if not self._address:
            return False
        data = "\n".join(fields).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            try:
                s.connect(self._address)
                s.sendall(data)
            except OSError as e:
                log.warning("sd_notify to %s failed: %s", self._address.lstrip("\0"), e)
                return False
        return True

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def stopping(self) -> None:
        with contextlib.suppress(Exception):
            self.notify("STOPPING=1")

    def watchdog(self, healthy: bool, now: float | None = None) -> None:
        """Ping the watchdog when due, only while `healthy` (a stuck gate gets restarted)."""
        if not self.watchdog_interval or not healthy:
            return
        t = time.monotonic() if now is None else now
        if t - self._last_ping >= self.watchdog_interval:
            self._last_ping = t
            self.notify("WATCHDOG=1")
