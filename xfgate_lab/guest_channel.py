"""The lab-only control channel into a guest: its second UART (/dev/ttyS1), exposed by qemu as
a unix socket. For tests and `xfgate-lab exec/truth` only, never for xfgate's own decisions.

Framing (see guest/init): request ``ID TIMEOUT BASE64(CMD)\\n``; reply ``@@XFB ID@@``, the
output in base64, ``@@XFE ID RC@@``. qemu serves one client at a time and the guest runs one
command at a time, so callers are serialized by a lock file.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import os
import re
import socket
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from xfgate.errors import GuestNotRunning
from xfgate_lab.errors import LabError

MAX_REPLY_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class GuestResult:
    returncode: int
    output: bytes


def encode_request(request_id: str, command: str, guest_timeout: int) -> bytes:
    # The leading newline ends any partial line left in the guest's tty by an aborted caller.
    b64 = base64.b64encode(command.encode()).decode()
    return f"\n{request_id} {guest_timeout} {b64}\n".encode()


def parse_reply(buffer: bytes, request_id: str) -> GuestResult | None:
    """The reply to request_id if the buffer holds all of it, else None. Replies to other
    (earlier, abandoned) requests are ignored. "@@XFB" starts a plain reply, "@@XFZ" a
    gzipped one (bounded to MAX_REPLY_BYTES once decompressed)."""
    marks = {f"@@XF{k} {request_id}@@".encode(): k == "Z" for k in "BZ"}
    found = [(buffer.find(m), m, z) for m, z in marks.items()]
    found = [f for f in found if f[0] >= 0]
    if not found:
        return None
    start, begin, gzipped = min(found)
    end = re.compile(rb"@@XFE " + re.escape(request_id.encode()) + rb" (\d+)@@")
    m = end.search(buffer, start)
    if m is None:
        return None
    body = buffer[start + len(begin) : m.start()]
    try:
        output = base64.b64decode(b"".join(body.split()), validate=True)
        if gzipped:
            inflate = zlib.decompressobj(wbits=31)
            output = inflate.decompress(output, MAX_REPLY_BYTES)
            if inflate.unconsumed_tail:
                raise LabError(f"guest reply exceeds {MAX_REPLY_BYTES} bytes once unzipped")
    except (binascii.Error, zlib.error) as e:
        raise LabError(f"garbled reply from the guest control channel: {e}") from e
    return GuestResult(int(m.group(1)), output)


@contextmanager
def _exclusive(lock_path: Path, deadline: float) -> Iterator[None]:
    with lock_path.open("a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabError(
                        f"control channel busy (lock {lock_path} held by another caller)"
                    ) from None
                time.sleep(0.05)
        yield


def run_in_guest(
    ctl_socket: Path,
    lock_path: Path,
    command: str,
    timeout: float = 30.0,
    domain: int = 0,
    wait: float = 0.0,
) -> GuestResult:
    """Runs ``sh -c command`` as root in the guest; output is stdout+stderr together.
    The guest kills the command after ``timeout`` s (timeout <= 0: no guest-side limit, for
    short trusted scripts); the host gives up a few seconds later, or after `wait` s when
    that is longer (a long trusted script on a crowded guest)."""
    if not ctl_socket.exists():
        raise GuestNotRunning(domain or str(ctl_socket), f"no control socket {ctl_socket}")
    guest_timeout = max(0, int(timeout + 0.999))
    deadline = time.monotonic() + max(timeout, 10.0, wait) + 10.0
    request_id = f"xf{os.getpid():x}{time.monotonic_ns():x}"
    with _exclusive(lock_path, deadline), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5.0)
        try:
            s.connect(str(ctl_socket))
            s.sendall(encode_request(request_id, command, guest_timeout))
        except OSError as e:
            raise GuestNotRunning(domain or str(ctl_socket), f"control channel: {e}") from e
        buffer = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LabError(
                    f"guest did not answer on its control channel within {timeout:.0f} s "
                    f"(command: {command[:80]!r})"
                )
            s.settimeout(min(left, 1.0))
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise GuestNotRunning(domain or str(ctl_socket), "control channel closed")
            buffer += chunk
            if len(buffer) > MAX_REPLY_BYTES:
                raise LabError(f"guest reply exceeds {MAX_REPLY_BYTES} bytes")
            result = parse_reply(buffer, request_id)
            if result is not None:
                return result
