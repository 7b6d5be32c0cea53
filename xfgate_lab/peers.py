"""The client namespace's side of the workload, one small bounded program:
TCP 2222 accept+close (the attacker's target), UDP 5353 sink, TCP 7000 long-lived connections
(held open, input discarded). Listens on [::] (dual stack) inside the client netns only.
Counters go to a JSON stats file once a second, so tests can see the guest's traffic arrive.

    python -m xfgate_lab.peers --stats FILE [--max-seconds N]
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

SPRAY_TCP_PORT = 2222
SPRAY_UDP_PORT = 5353
KEEPALIVE_TCP_PORT = 7000
MAX_HELD = 64  # held port-7000 connections; beyond that, the oldest is closed
MAX_EVENTS_PER_SECOND = 2000  # the loop sleeps once it handled this many events in a second


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--max-seconds", type=float, default=7 * 24 * 3600.0)
    args = parser.parse_args()
    serve(args.stats, args.max_seconds)


if __name__ == "__main__":
    main()
