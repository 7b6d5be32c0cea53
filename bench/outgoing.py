"""The httperf sweep for outgoing connections (issue 10: the attack direction).

httperf is not in the guest: the guest's static ``connload`` (xfgate_lab/guest/connload.c)
opens connections at a fixed offered rate, one HTTP/1.0 request and reply each, as uid 1000
(``web``, not the blocked uid), to a ``fastweb`` (the lab's static epoll server, compiled for the
host from the same source) in the client namespace, and prints httperf's own lines: one parser,
one table for both directions. Every run is bounded: connload bounds itself in count, rate,
open connections and time; the guest kills it after its planned duration plus slack; the
server runs under ``timeout`` and is stopped by its pid.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from bench.httperf import HttperfResult, parse_httperf
from xfgate.errors import PrerequisiteError
from xfgate_lab.cli import guest_exec
from xfgate_lab.layout import CLIENT_V4, layout_from_env

log = logging.getLogger(__name__)

SERVER_PORT = 8400  # fastweb in the client namespace (the lab's peers use 2222, 5353, 7000)
GUEST_USER = "web"  # uid 1000: the gate's rule blocks uid 1001, not this one
CONN_TIMEOUT_MS = 5000  # per connection, like httperf's --timeout=5
SERVER_LIFETIME_S = 3600  # the server's own bound; it is stopped by pid long before


def connload_command(rate: float, conns: int, port: int = SERVER_PORT) -> str:
    """Guest shell: one bounded connload run as uid 1000."""
    inner = shlex.join(
        ["connload", str(CLIENT_V4), str(port), f"{rate:g}", str(conns), str(CONN_TIMEOUT_MS)]
    )
    return f"su -s /bin/sh {GUEST_USER} -c {shlex.quote(inner)}"


def run_connload(
    domain: int, rate: float, conns: int, *, slack_s: float = 30.0
) -> tuple[HttperfResult, str]:
    """One outgoing run from the guest; a run the guest had to kill is marked invalid."""
    limit = conns / rate + CONN_TIMEOUT_MS / 1000 + slack_s
    result = guest_exec(layout_from_env(), domain, connload_command(rate, conns), timeout=limit)
    text = result.output.decode(errors="replace")
    if "Total:" not in text:
        log.warning("connload in domain %d: exit %d: %s", domain, result.returncode, text[-300:])
    return parse_httperf(text, expected_conns=conns, timed_out=result.returncode in (124, 137)), (
        text
    )


def build_fastweb(out_dir: Path) -> Path:
    """The lab's static epoll server, compiled for the host from the guest's source."""
    src = resources.files("xfgate_lab") / "guest" / "fastweb.c"
    binary = out_dir / "fastweb"
    with tempfile.TemporaryDirectory() as tmp:
        c = Path(tmp) / "fastweb.c"
        c.write_bytes(src.read_bytes())
        r = subprocess.run(
            ["gcc", "-static", "-O2", "-o", str(binary), str(c)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    if r.returncode != 0:
        raise PrerequisiteError(f"gcc -static fastweb.c failed (needs gcc, libc6-dev): {r.stderr}")
    return binary


@contextmanager
def client_server(out_dir: Path, port: int = SERVER_PORT) -> Iterator[int]:
    """fastweb listening on the client namespace's :port; yields its pid, always stopped."""
    binary = build_fastweb(out_dir)
    client = layout_from_env().client_netns
    argv = ["ip", "netns", "exec", client, "timeout", str(SERVER_LIFETIME_S), str(binary)]
    with (out_dir / "fastweb.log").open("ab") as logf:
        proc = subprocess.Popen([*argv, str(port)], stdout=logf, stderr=logf)
    try:
        yield proc.pid
    finally:
        proc.terminate()  # timeout(1) passes SIGTERM on to fastweb
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
