"""A private, throw-away network lab for the verdict engine's tests and benchmarks.

Three namespaces, no route out of them: ``<prefix>-d`` ("dom0": bridge + the guest's vif, where
the gate runs), ``<prefix>-g`` (a stand-in guest behind ``vif9.0``, a veth) and ``<prefix>-c``
(the client). Addresses from 198.18.0.0/15 and 2001:2::/48 only.

Also a tiny traffic peer (``python -m xfgate_lab.netlab serve|connect|udp``) with bounded
lifetimes, run inside a namespace with ``ip netns exec``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

GUEST4, CLIENT4 = "198.18.9.2", "198.18.9.1"
GUEST6, CLIENT6 = "2001:2:0:9::2", "2001:2:0:9::1"
DOMAIN = 9
VIF = "vif9.0"
# The optional second guest (domain 8), for a gate serving two domains.
GUEST8_4, GUEST8_6, VIF8 = "198.18.9.3", "2001:2:0:9::3", "vif8.0"
MAX_PEER_LIFETIME = 300.0


def sh(argv: list[str], timeout: float = 20.0, check: bool = True) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc.stdout


@dataclass(frozen=True)
class NetLab:
    prefix: str
    workdir: Path

    @property
    def dom0(self) -> str:
        return f"{self.prefix}-d"

    @property
    def guest(self) -> str:
        return f"{self.prefix}-g"

    @property
    def client(self) -> str:
        return f"{self.prefix}-c"

    @property
    def guest8(self) -> str:
        return f"{self.prefix}-g8"

    @property
    def domains_file(self) -> Path:
        return self.workdir / "domains.toml"

    @property
    def run_dir(self) -> Path:
        return self.workdir / "run"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "XFGATE_DOMAINS": str(self.domains_file),
            "XFGATE_RUN_DIR": str(self.run_dir),
        }

    def ns(self, name: str, argv: list[str], timeout: float = 20.0, check: bool = True) -> str:
        return sh(["ip", "netns", "exec", name, *argv], timeout, check)

    def python(self, name: str, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", name, sys.executable, "-m", "xfgate_lab.netlab", *args]


def _domain_toml(domain: int, name: str, vif: str, netns: str, addrs: tuple[str, str]) -> str:
    return (
        "[[domain]]\n"
        f"id = {domain}\n"
        f'name = "{name}"\n'
        f'vifs = ["{vif}"]\n'
        f'netns = "{netns}"\n'
        f'addresses = ["{addrs[0]}", "{addrs[1]}"]\n'
        "[domain.memory]\n"
        'backend = "raw"\n'
        'path = "/dev/null"\n'
    )


def create(prefix: str, workdir: Path, second_guest: bool = False) -> NetLab:
    lab = NetLab(prefix, workdir)
    destroy(lab)
    workdir.mkdir(parents=True, exist_ok=True)
    lab.run_dir.mkdir(exist_ok=True)
    d, g, c = lab.dom0, lab.guest, lab.client
    for n in (d, g, c):
        sh(["ip", "netns", "add", n])
        sh(["ip", "-n", n, "link", "set", "lo", "up"])
    sh(["ip", "-n", d, "link", "add", "xfbr0", "type", "bridge", "stp_state", "0"])
    sh(["ip", "-n", d, "link", "set", "xfbr0", "type", "bridge", "forward_delay", "0"])
    sh(["ip", "-n", d, "link", "add", VIF, "type", "veth", "peer", "name", "eth0", "netns", g])
    sh(["ip", "-n", d, "link", "add", "cl0", "type", "veth", "peer", "name", "eth0", "netns", c])
    for port in (VIF, "cl0"):
        sh(["ip", "-n", d, "link", "set", port, "master", "xfbr0", "up"])
    sh(["ip", "-n", d, "link", "set", "xfbr0", "up"])
    for n, a4, a6 in ((g, GUEST4, GUEST6), (c, CLIENT4, CLIENT6)):
        sh(["ip", "-n", n, "addr", "add", f"{a4}/24", "dev", "eth0"])
        sh(["ip", "-n", n, "addr", "add", f"{a6}/64", "dev", "eth0", "nodad"])
        sh(["ip", "-n", n, "link", "set", "eth0", "up"])
    toml = _domain_toml(DOMAIN, f"{prefix}-guest", VIF, d, (GUEST4, GUEST6))
    if second_guest:
        g8 = lab.guest8
        sh(["ip", "netns", "add", g8])
        sh(
            [
                "ip",
                "-n",
                d,
                "link",
                "add",
                VIF8,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                g8,
            ]
        )
        sh(["ip", "-n", d, "link", "set", VIF8, "master", "xfbr0", "up"])
        sh(["ip", "-n", g8, "addr", "add", f"{GUEST8_4}/24", "dev", "eth0"])
        sh(["ip", "-n", g8, "addr", "add", f"{GUEST8_6}/64", "dev", "eth0", "nodad"])
        sh(["ip", "-n", g8, "link", "set", "eth0", "up"])
        sh(["ip", "-n", g8, "link", "set", "lo", "up"])
        toml += _domain_toml(8, f"{prefix}-guest8", VIF8, d, (GUEST8_4, GUEST8_6))
    lab.domains_file.write_text(toml)
    return lab


def destroy(lab: NetLab) -> None:
    for n in (lab.dom0, lab.guest, lab.client, lab.guest8):
        if os.path.exists(f"/run/netns/{n}"):
            sh(["ip", "netns", "del", n], check=False)


# --- the traffic peer ---------------------------------------------------------------------


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netlab")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("specs", nargs="+")
    s.add_argument("--lifetime", type=float, default=120.0)
    c = sub.add_parser("connect")
    c.add_argument("proto", choices=("tcp", "udp"))
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--timeout", type=float, default=2.0)
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--gap", type=float, default=0.0)
    h = sub.add_parser("hold")
    h.add_argument("host")
    h.add_argument("port", type=int)
    h.add_argument("--lifetime", type=float, default=60.0)
    h.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    if args.cmd == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            _serve(args.specs, args.lifetime)
        return 0
    if args.cmd == "hold":
        _hold("tcp", args.host, args.port, args.lifetime, args.timeout)
        return 0
    return _connect(args.proto, args.host, args.port, args.timeout, args.count, args.gap)


if __name__ == "__main__":
    sys.exit(main())
