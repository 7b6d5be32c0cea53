"""The running gate's control socket: `xfgate block|unblock|status` talk to it.

One unix stream socket per served domain, ``RUN_DIR/gate-D.sock`` (``--run-dir``, default
/run/xfgate), mode 0600. One JSON request line, one JSON reply line. The server side is polled by
the gate's own loop, so a policy change never races a packet verdict.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xfgate.errors import ControlError, XfgateError

REQUEST_TIMEOUT = 2.0
MAX_REQUEST = 4096

__all__ = ["ControlError", "ControlServer", "request"]

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def socket_path(run_dir: Path, domain: int) -> Path:
    return run_dir / f"gate-{domain}.sock"


def service_socket(run_dir: Path) -> Path:
    """The socket of `xfgate serve` (every domain's policy and status)."""
    return run_dir / "serve.sock"


class ControlServer:
    def __init__(
        self, run_dir: Path, domain: int, handler: Handler, path: Path | None = None
    ) -> None:
        """A domain's socket (``gate-D.sock``), or any other `path` (a service's own)."""
        self.domain = domain
        self.path = path or socket_path(run_dir, domain)
        self._handler = handler
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if answers(self.path):
                what = f"a gate for domain {domain}" if path is None else f"{self.path}'s owner"
                raise ControlError(
                    f"{what} is already running ({self.path}):"
                    " stop it first, or use `xfgate block|unblock` to change its policy"
                )
            self.path.unlink()  # left by a gate that died
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(str(self.path))
        finally:
            os.umask(old)
        self.sock.listen(8)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def serve_one(self) -> None:
        """Accept and answer one pending client (call when the socket is readable)."""
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(REQUEST_TIMEOUT)
            try:
                request = json.loads(_read_line(conn))
                if not isinstance(request, dict):
                    raise ValueError("request must be a JSON object")
                reply = self._handler(request)
            except XfgateError as e:
                reply = {"ok": False, "error": str(e)}
            except (OSError, ValueError) as e:
                reply = {"ok": False, "error": f"bad request: {e}"}
            except Exception as e:  # a bug in a handler must not end the gate
                reply = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
            with contextlib.suppress(OSError):
                conn.sendall((json.dumps(reply) + "\n").encode())

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data and len(data) < MAX_REQUEST:
        chunk = conn.recv(MAX_REQUEST)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


def answers(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def request(
    run_dir: Path,
    domain: int,
    payload: dict[str, Any],
    timeout: float = 10.0,
    path: Path | None = None,
) -> dict[str, Any]:
    """One request to domain's gate (or to the socket at `path`), its reply; ControlError if
    none answers or it refuses."""
    who = f"gate of domain {domain}" if path is None else f"xfgate serve ({path})"
    path = path or socket_path(run_dir, domain)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        s.sendall((json.dumps(payload) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except FileNotFoundError:
        raise ControlError(
            f"no gate runs for domain {domain} ({path} missing): start one with"
            f" `xfgate run --domain {domain}`"
        ) from None
    except OSError as e:
        raise ControlError(f"{who} did not answer on {path}: {e}") from None
    finally:
        s.close()
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError:
        raise ControlError(f"{who} sent a bad reply: {data[:200]!r}") from None
    if not reply.get("ok"):
        raise ControlError(f"{who}: {reply.get('error', 'refused')}")
    return reply


def running_domains(run_dir: Path) -> list[int]:
    out = []
    for p in sorted(run_dir.glob("gate-*.sock")):
        head = p.name[len("gate-") : -len(".sock")]
        if head.isdigit():
            out.append(int(head))
    return out
