"""A bounded HTTP GET, run inside a namespace by `ip netns exec ... python -m xfgate_lab.probe`
(a socket belongs to the netns of the process that creates it). Exit 0 and the body on stdout
when the server answered 200.

    python -m xfgate_lab.probe HOST PORT [TIMEOUT]
"""

from __future__ import annotations

import http.client
import sys


def http_get(host: str, port: int, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)  # no proxy: direct only
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read(65536)
    finally:
        conn.close()


def main(argv: list[str]) -> int:
    host, port = argv[0], int(argv[1])
    timeout = float(argv[2]) if len(argv) > 2 else 3.0
    try:
        status, body = http_get(host, port, timeout)
    except OSError as e:
        print(f"probe {host} {port}: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(body.decode(errors="replace"))
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
