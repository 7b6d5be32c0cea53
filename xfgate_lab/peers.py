"""The labs' traffic peer: one small module, each command bounded in time, run inside a
namespace with `ip netns exec ... python -m xfgate_lab.peers COMMAND` (a socket belongs to the
netns of the process that creates it).

    workload --stats FILE [--max-seconds N]   the QEMU lab's client side of the guest workload:
        TCP 2222 accept+close (the attacker's target), UDP 5353 sink, TCP 7000 long-lived
        connections (held open, input discarded), on [::] (dual stack); counters go to a JSON
        stats file once a second, so tests can see the guest's traffic arrive.
    serve tcp:PORT|udp:PORT... [--lifetime S]  echo servers (v4 and v6), for the netlab.
    connect tcp|udp HOST PORT [--count N]      send and wait for each echo; exit 0 if all came.
    hold HOST PORT                             one long-lived TCP connection driven by stdin.
    http-get HOST PORT [--timeout S]           a bounded GET; exit 0 and the body if 200.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import select
import selectors
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

SPRAY_TCP_PORT = 2222
SPRAY_UDP_PORT = 5353
KEEPALIVE_TCP_PORT = 7000
MAX_HELD = 64  # held port-7000 connections; beyond that, the oldest is closed
MAX_EVENTS_PER_SECOND = 2000  # the loop sleeps once it handled this many events in a second
MAX_PEER_LIFETIME = 300.0  # bound of the echo peers


@dataclass
class PeerStats:
    started: float
    updated: float = 0.0
    tcp2222_accepted: int = 0
    udp5353_datagrams: int = 0
    udp5353_bytes: int = 0
    tcp7000_accepted: int = 0
    tcp7000_open: int = 0
    tcp7000_last_peer: str = ""


def listener(kind: int, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET6, kind)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    if kind == socket.SOCK_STREAM:
        s.listen(128)
    s.setblocking(False)
    return s


def write_stats(path: Path, stats: PeerStats) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(stats)))
    os.replace(tmp, path)


def serve(stats_path: Path, max_seconds: float) -> None:
    stop = False

    def on_term(_sig: int, _frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    spray_tcp = listener(socket.SOCK_STREAM, SPRAY_TCP_PORT)
    spray_udp = listener(socket.SOCK_DGRAM, SPRAY_UDP_PORT)
    keep_tcp = listener(socket.SOCK_STREAM, KEEPALIVE_TCP_PORT)
    sel = selectors.DefaultSelector()
    for s in (spray_tcp, spray_udp, keep_tcp):
        sel.register(s, selectors.EVENT_READ)
    held: list[socket.socket] = []
    now = time.time()
    stats = PeerStats(started=now)
    end = time.monotonic() + max_seconds
    next_write = 0.0
    window_start, window_events = time.monotonic(), 0
    while not stop and time.monotonic() < end:
        for key, _ in sel.select(timeout=0.5):
            window_events += 1
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                if sock is spray_tcp:
                    conn, _addr = spray_tcp.accept()
                    conn.close()
                    stats.tcp2222_accepted += 1
                elif sock is spray_udp:
                    data = spray_udp.recv(65536)
                    stats.udp5353_datagrams += 1
                    stats.udp5353_bytes += len(data)
                elif sock is keep_tcp:
                    conn, addr = keep_tcp.accept()
                    conn.setblocking(False)
                    if len(held) >= MAX_HELD:
                        old = held.pop(0)
                        sel.unregister(old)
                        old.close()
                    held.append(conn)
                    sel.register(conn, selectors.EVENT_READ)
                    stats.tcp7000_accepted += 1
                    stats.tcp7000_last_peer = str(addr[0])
                elif not sock.recv(65536):
                    sel.unregister(sock)
                    held.remove(sock)
                    sock.close()
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                if sock in held:
                    sel.unregister(sock)
                    held.remove(sock)
                    sock.close()
        stats.tcp7000_open = len(held)
        mono = time.monotonic()
        if mono - window_start >= 1.0:
            window_start, window_events = mono, 0
        elif window_events > MAX_EVENTS_PER_SECOND:
            time.sleep(max(0.0, 1.0 - (mono - window_start)))
        if mono >= next_write:
            stats.updated = time.time()
            write_stats(stats_path, stats)
            next_write = mono + 1.0
    stats.updated = time.time()
    write_stats(stats_path, stats)


# --- echo peers (the netlab) ------------------------------------------------------------


def _serve(specs: list[str], lifetime: float) -> None:
    """Echo on tcp:PORT / udp:PORT (v4 and v6) until killed or `lifetime` passes."""
    socks: dict[socket.socket, str] = {}
    for spec in specs:
        proto, port = spec.split(":")
        for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
            s = socket.socket(fam, kind)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr, int(port)))
            if proto == "tcp":
                s.listen(128)
            socks[s] = proto
    print("ready", flush=True)
    conns: set[socket.socket] = set()
    end = time.monotonic() + min(lifetime, MAX_PEER_LIFETIME)
    while time.monotonic() < end:
        ready, _, _ = select.select([*socks, *conns], [], [], 0.5)
        for s in ready:
            try:
                if s in conns:
                    data = s.recv(65536)
                    if data:
                        s.sendall(data)
                    else:
                        conns.discard(s)
                        s.close()
                elif socks[s] == "tcp":
                    conn, _ = s.accept()
                    conns.add(conn)
                else:
                    data, peer = s.recvfrom(65536)
                    s.sendto(data, peer)
            except OSError:
                conns.discard(s)


def _connect(proto: str, host: str, port: int, timeout: float, count: int, gap: float) -> int:
    """Send `count` messages and wait for each echo; prints ok/fail per message."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    good = 0
    with socket.socket(fam, kind) as s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))
        except OSError as e:
            print(f"fail connect {e}", flush=True)
            return 1
        for i in range(count):
            try:
                s.send(b"x%d\n" % i)
                s.recv(100)
                good += 1
                print("ok", flush=True)
            except OSError as e:
                print(f"fail {e}", flush=True)
            if gap:
                time.sleep(gap)
    return 0 if good == count else 1


def _hold(proto: str, host: str, port: int, lifetime: float, timeout: float) -> None:
    """Keep one TCP connection open; on each line on stdin send it (a literal backslash-n
    becomes a newline) and print "ok" once any answer arrives, else "fail ..."."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        print("connected", flush=True)
        end = time.monotonic() + min(lifetime, MAX_PEER_LIFETIME)
        while time.monotonic() < end:
            line = sys.stdin.readline()
            if not line:
                return
            try:
                s.send(line.replace("\\n", "\n").encode())
                print("ok" if s.recv(100) else "fail closed", flush=True)
            except OSError as e:
                print(f"fail {e}", flush=True)


def http_get(host: str, port: int, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)  # no proxy: direct only
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read(65536)
    finally:
        conn.close()


def _http_get(host: str, port: int, timeout: float) -> int:
    try:
        status, body = http_get(host, port, timeout)
    except OSError as e:
        print(f"http-get {host} {port}: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(body.decode(errors="replace"))
    return 0 if status == 200 else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xfgate_lab.peers", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("workload", help="the QEMU lab's client side of the guest workload")
    w.add_argument("--stats", type=Path, required=True)
    w.add_argument("--max-seconds", type=float, default=7 * 24 * 3600.0)
    s = sub.add_parser("serve", help="echo servers")
    s.add_argument("specs", nargs="+")
    s.add_argument("--lifetime", type=float, default=120.0)
    c = sub.add_parser("connect", help="send, wait for each echo")
    c.add_argument("proto", choices=("tcp", "udp"))
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--timeout", type=float, default=2.0)
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--gap", type=float, default=0.0)
    h = sub.add_parser("hold", help="one long-lived TCP connection driven by stdin")
    h.add_argument("host")
    h.add_argument("port", type=int)
    h.add_argument("--lifetime", type=float, default=60.0)
    h.add_argument("--timeout", type=float, default=3.0)
    g = sub.add_parser("http-get", help="a bounded HTTP GET")
    g.add_argument("host")
    g.add_argument("port", type=int)
    g.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    if args.cmd == "workload":
        serve(args.stats, args.max_seconds)
        return 0
    if args.cmd == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            _serve(args.specs, args.lifetime)
        return 0
    if args.cmd == "hold":
        _hold("tcp", args.host, args.port, args.lifetime, args.timeout)
        return 0
    if args.cmd == "http-get":
        return _http_get(args.host, args.port, args.timeout)
    return _connect(args.proto, args.host, args.port, args.timeout, args.count, args.gap)


if __name__ == "__main__":
    sys.exit(main())
