"""The running gate's control socket: `xfgate block|unblock|status` talk to it.

One unix stream socket per served domain, ``RUN_DIR/gate-D.sock`` (``--run-dir``, default
/run/xfgate), mode 0600. One JSON request line, one JSON reply line; a reply too big for a line
(`xfgate ps` of a crowded guest: megabytes) is a `BodyReply`: its line says ``"body_bytes": N``
and N bytes follow (at most MAX_REPLY_BODY). The server side is polled by the gate's own loop,
so a policy change never races a packet verdict.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xfgate.errors import ControlError, XfgateError

REQUEST_TIMEOUT = 2.0  # per request: reading it, and sending the reply (a body included)
MAX_REQUEST = 4096  # a request line (requests are small; replies are not)
MAX_REPLY_BODY = 1 << 28  # a reply's body: 256 MiB (the crowd's `ps`: ~3 MB)

__all__ = ["BodyReply", "ControlError", "ControlServer", "request", "request_body"]


@dataclass(frozen=True)
class BodyReply:
    """A reply with a body: its JSON line (`header`, which gets "body_bytes"), then `body`."""

    header: dict[str, Any]
    body: bytes


Handler = Callable[[dict[str, Any]], "dict[str, Any] | BodyReply"]


def socket_path(run_dir: Path, domain: int) -> Path:
    return run_dir / f"gate-{domain}.sock"


def service_socket(run_dir: Path) -> Path:
    """The socket of `xfgate serve` (every domain's policy and status)."""
    return run_dir / "serve.sock"


class ControlServer:
    def __init__(
        self,
        run_dir: Path,
        domain: int,
        handler: Handler,
        path: Path | None = None,
        slow_ops: frozenset[str] = frozenset(),
    ) -> None:
        """A domain's socket (``gate-D.sock``), or any other `path` (a service's own).

        Requests whose op is in `slow_ops` (`ps`: up to its 5 s walk bound) are answered on a
        thread of their own, one at a time (another meanwhile is refused as busy), so that
        `status`, `block` and `unblock` still answer at once (issue 9: control within 1 s)."""
        self.domain = domain
        self.path = path or socket_path(run_dir, domain)
        self._handler = handler
        self._slow_ops = slow_ops
        self._slow: threading.Thread | None = None
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
        conn.settimeout(REQUEST_TIMEOUT)
        try:
            request = json.loads(_read_line(conn))
            if not isinstance(request, dict):
                raise ValueError("request must be a JSON object")
        except (OSError, ValueError) as e:
            self._send(conn, {"ok": False, "error": f"bad request: {e}"})
            return
        if request.get("op") not in self._slow_ops:
            self._send(conn, self._answer(request))
            return
        if self._slow is not None and self._slow.is_alive():
            busy = f"busy: another {request.get('op')} request is being answered"
            self._send(conn, {"ok": False, "error": busy})
            return
        self._slow = threading.Thread(
            target=lambda: self._send(conn, self._answer(request)),
            name=f"xfgate-control-slow-{self.domain}",
            daemon=True,
        )
        self._slow.start()

    def _answer(self, request: dict[str, Any]) -> dict[str, Any] | BodyReply:
        try:
            return self._handler(request)
        except XfgateError as e:
            return {"ok": False, "error": str(e)}
        except (OSError, ValueError) as e:
            return {"ok": False, "error": f"bad request: {e}"}
        except Exception as e:  # a bug in a handler must not end the gate
            return {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}

    @staticmethod
    def _send(conn: socket.socket, reply: dict[str, Any] | BodyReply) -> None:
        """Send `reply` and close `conn`."""
        with conn, contextlib.suppress(OSError):
            if isinstance(reply, BodyReply):
                head = {**reply.header, "body_bytes": len(reply.body)}
                conn.sendall((json.dumps(head) + "\n").encode())
                conn.sendall(reply.body)
            else:
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
    return request_body(run_dir, domain, payload, timeout, path)[0]


def request_body(
    run_dir: Path,
    domain: int,
    payload: dict[str, Any],
    timeout: float = 10.0,
    path: Path | None = None,
) -> tuple[dict[str, Any], bytes]:
    """`request`, and the reply's body (b"" for a reply without one)."""
    who = f"gate of domain {domain}" if path is None else f"xfgate serve ({path})"
    path = path or socket_path(run_dir, domain)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    chunks: list[bytes] = []
    try:
        s.connect(str(path))
        s.sendall((json.dumps(payload) + "\n").encode())
        received = 0
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            received += len(chunk)
            if b"\n" in chunk:
                break
            if received > MAX_REPLY_BODY:
                raise ControlError(f"{who} sent a reply line of more than {received} bytes")
        data = b"".join(chunks)
        line, _, rest = data.partition(b"\n")
        reply = _reply(who, line)
        size = reply.get("body_bytes", 0)
        if not isinstance(size, int) or not 0 <= size <= MAX_REPLY_BODY:
            raise ControlError(f"{who} announced a body of {size!r} bytes")
        body = bytearray(rest[:size])
        while len(body) < size:
            chunk = s.recv(min(1 << 20, size - len(body)))
            if not chunk:
                raise ControlError(f"{who} sent {len(body)} of {size} body bytes")
            body += chunk
    except FileNotFoundError:
        raise ControlError(
            f"no gate runs for domain {domain} ({path} missing): start one with"
            f" `xfgate run --domain {domain}`"
        ) from None
    except OSError as e:
        raise ControlError(f"{who} did not answer on {path}: {e}") from None
    finally:
        s.close()
    if not reply.get("ok"):
        raise ControlError(f"{who}: {reply.get('error', 'refused')}")
    return reply, bytes(body)


def _reply(who: str, line: bytes) -> dict[str, Any]:
    try:
        reply = json.loads(line)
    except ValueError:
        raise ControlError(f"{who} sent a bad reply: {line[:200]!r}") from None
    if not isinstance(reply, dict):
        raise ControlError(f"{who} sent a bad reply: {line[:200]!r}")
    return reply


def running_domains(run_dir: Path) -> list[int]:
    out = []
    for p in sorted(run_dir.glob("gate-*.sock")):
        head = p.name[len("gate-") : -len(".sock")]
        if head.isdigit():
            out.append(int(head))
    return out
