"""httperf, run and parsed: the thesis's load generator.

``parse_httperf`` is pure (text in, numbers out) and keeps every figure httperf prints, so a
result table never depends on which lines a benchmark happened to look at. ``run_httperf`` wraps
the tool in a hard timeout: past FD_SETSIZE open connections httperf can spin forever at 100 % CPU
ignoring SIGINT (lab notes), so it is sent SIGINT, then SIGKILL, and the run is marked invalid.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

from xfgate.errors import PrerequisiteError


@dataclass(frozen=True)
class HttperfResult:
    connections: int = 0
    requests: int = 0
    replies: int = 0
    test_duration_s: float = 0.0
    conn_rate: float = 0.0
    # Connection time [ms]: min avg max median stddev, and the connect part.
    conn_time_min: float = 0.0
    conn_time_avg: float = 0.0
    conn_time_max: float = 0.0
    conn_time_median: float = 0.0
    conn_time_stddev: float = 0.0
    connect_ms: float = 0.0
    reply_rate_min: float = 0.0
    reply_rate_avg: float = 0.0
    reply_rate_max: float = 0.0
    reply_rate_stddev: float = 0.0
    reply_rate_samples: int = 0
    response_ms: float = 0.0
    status_2xx: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    timed_out: bool = False
    problems: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["valid"] = self.valid
        d["problems"] = list(self.problems)
        return d


_NUM = r"([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"

_PATTERNS: dict[str, str] = {
    "totals": rf"Total: connections {_NUM} requests {_NUM} replies {_NUM} test-duration {_NUM} s",
    "conn_rate": rf"Connection rate: {_NUM} conn/s",
    "conn_time": (
        rf"Connection time \[ms\]: min {_NUM} avg {_NUM} max {_NUM} median {_NUM} stddev {_NUM}"
    ),
    "connect": rf"Connection time \[ms\]: connect {_NUM}",
    "reply_rate": (
        rf"Reply rate \[replies/s\]: min {_NUM} avg {_NUM} max {_NUM} stddev {_NUM} "
        rf"\({_NUM} samples\)"
    ),
    "reply_time": rf"Reply time \[ms\]: response {_NUM}",
    "status": rf"Reply status: 1xx={_NUM} 2xx={_NUM}",
}

_ERROR_KINDS = (
    "total",
    "client-timo",
    "socket-timo",
    "connrefused",
    "connreset",
    "fd-unavail",
    "addrunavail",
    "ftab-full",
    "other",
)


def parse_httperf(text: str, *, expected_conns: int = 0, timed_out: bool = False) -> HttperfResult:
    """Every figure of one httperf run. A run that hung, ran out of file descriptors, or did
    not complete its connections is kept but marked invalid (``problems``), never averaged."""
    found: dict[str, tuple[float, ...]] = {}
    for key, pattern in _PATTERNS.items():
        m = re.search(pattern, text)
        if m:
            found[key] = tuple(float(g) for g in m.groups())
    errors: dict[str, int] = {}
    for kind in _ERROR_KINDS:
        m = re.search(rf"Errors:.*?\b{re.escape(kind)} (\d+)", text)
        if m:
            errors[kind] = int(m.group(1))
    problems: list[str] = []
    if timed_out:
        problems.append("httperf hung and was killed after its hard timeout")
    if "totals" not in found:
        problems.append("no 'Total:' line: httperf did not finish")
    if errors.get("fd-unavail", 0):
        problems.append(f"fd-unavail {errors['fd-unavail']}: client ran out of file descriptors")
    totals = found.get("totals", (0, 0, 0, 0))
    if expected_conns and int(totals[0]) < expected_conns and "totals" in found:
        problems.append(f"only {int(totals[0])} of {expected_conns} connections were made")
    ct = found.get("conn_time", (0, 0, 0, 0, 0))
    rr = found.get("reply_rate", (0, 0, 0, 0, 0))
    return HttperfResult(
        connections=int(totals[0]),
        requests=int(totals[1]),
        replies=int(totals[2]),
        test_duration_s=totals[3],
        conn_rate=found.get("conn_rate", (0.0,))[0],
        conn_time_min=ct[0],
        conn_time_avg=ct[1],
        conn_time_max=ct[2],
        conn_time_median=ct[3],
        conn_time_stddev=ct[4],
        connect_ms=found.get("connect", (0.0,))[0],
        reply_rate_min=rr[0],
        reply_rate_avg=rr[1],
        reply_rate_max=rr[2],
        reply_rate_stddev=rr[3],
        reply_rate_samples=int(rr[4]),
        response_ms=found.get("reply_time", (0.0,))[0],
        status_2xx=int(found.get("status", (0, 0))[1]),
        errors=errors,
        timed_out=timed_out,
        problems=tuple(problems),
    )


def httperf_argv(
    server: str, port: int, rate: float, num_conns: int, uri: str = "/", timeout_s: float = 5.0
) -> list[str]:
    """The thesis's workload: `rate` new connections per second, one call each."""
    return [
        "httperf",
        "--hog",
        f"--server={server}",
        f"--port={port}",
        f"--uri={uri}",
        f"--rate={rate:g}",
        f"--num-conns={num_conns}",
        "--num-calls=1",
        f"--timeout={timeout_s:g}",
    ]


def run_httperf(
    netns: str,
    server: str,
    port: int,
    rate: float,
    num_conns: int,
    *,
    slack_s: float = 30.0,
) -> tuple[HttperfResult, str]:
    """Run httperf inside `netns` with a hard timeout of the planned duration plus `slack_s`."""
    if shutil.which("httperf") is None:
        raise PrerequisiteError("httperf is not installed: run scripts/bootstrap.sh (apt httperf)")
    limit = num_conns / rate + slack_s
    argv = [
        "ip",
        "netns",
        "exec",
        netns,
        "timeout",
        "-s",
        "INT",
        "-k",
        "5",
        f"{limit:.0f}",
        *httperf_argv(server, port, rate, num_conns),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit + 15)
    # timeout(1) exits 124 when it had to send the signal.
    timed_out = proc.returncode in (124, 137)
    text = proc.stdout + proc.stderr
    return parse_httperf(text, expected_conns=num_conns, timed_out=timed_out), text
