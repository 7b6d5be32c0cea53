"""The QMP client against a scripted monitor on a unix socket (the real one: test_vmi_lab)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from xfgate.errors import GuestNotRunning, QmpError
from xfgate.vmi.qmp import QmpClient, paused

Reply = Callable[[dict[str, object]], list[dict[str, object]]]


def _serve(path: Path, reply: Reply, greet: bool = True) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            if greet:
                conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            buf = b""
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    for msg in reply(json.loads(line)):
                        conn.sendall(json.dumps(msg).encode() + b"\n")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


class FakeQemu:
    def __init__(self) -> None:
        self.running = True
        self.log: list[str] = []

    def __call__(self, req: dict[str, object]) -> list[dict[str, object]]:
        cmd = str(req["execute"])
        self.log.append(cmd)
        if cmd == "stop":
            self.running = False
            return [{"event": "STOP"}, {"return": {}}]
        if cmd == "cont":
            self.running = True
            return [{"return": {}}, {"event": "RESUME"}]
        if cmd == "query-status":
            return [
                {
                    "return": {
                        "running": self.running,
                        "status": "running" if self.running else "paused",
                    }
                }
            ]
        if cmd == "human-monitor-command":
            return [
                {
                    "return": "RIP=ffffffff81000000\nCR0=80050033 CR2=0 "
                    "CR3=000000000ab01000 CR4=00371ef0\n"
                }
            ]
        if cmd == "qmp_capabilities":
            return [{"return": {}}]
        return [
            {"error": {"class": "CommandNotFound", "desc": f"The command {cmd} has not been found"}}
        ]


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "qmp.sock"


def test_negotiates_pauses_and_reads_registers(sock_path: Path) -> None:
    qemu = FakeQemu()
    _serve(sock_path, qemu)
    with QmpClient(str(sock_path), timeout=2) as qmp:
        with paused(qmp) as rec:
            assert qmp.status() == "paused"
        assert qmp.is_running() and rec.was_running and rec.seconds > 0
        regs = qmp.control_registers()
        assert (regs.cr3, regs.la57, regs.kernel_root) == (0xAB01000, True, 0xAB00000)
        with pytest.raises(QmpError, match="CommandNotFound"):
            qmp.execute("frobnicate")
    assert (
        qemu.log[0] == "qmp_capabilities" and qemu.log.count("stop") == qemu.log.count("cont") == 1
    )


def test_paused_leaves_an_already_paused_guest_paused(sock_path: Path) -> None:
    qemu = FakeQemu()
    qemu.running = False
    _serve(sock_path, qemu)
    with QmpClient(str(sock_path), timeout=2) as qmp, paused(qmp) as rec:
        pass
    assert not rec.was_running and "cont" not in qemu.log


def test_dead_qemu_is_guest_not_running(sock_path: Path) -> None:
    with pytest.raises(GuestNotRunning, match="does not answer"):
        QmpClient(str(sock_path)).connect()
    _serve(sock_path, lambda req: [])  # accepts, greets, then never answers
    qmp = QmpClient(str(sock_path), timeout=0.3)
    with pytest.raises(QmpError, match=r"no reply within 0\.3 s"):
        qmp.connect()


def test_silent_monitor_says_it_may_be_busy(sock_path: Path) -> None:
    _serve(sock_path, FakeQemu(), greet=False)
    with pytest.raises(QmpError, match="one QMP client at a time"):
        QmpClient(str(sock_path), timeout=0.3).connect()


def test_monitor_closing_mid_command(sock_path: Path) -> None:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(sock_path))
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        conn.sendall(b'{"QMP": {}}\n')
        conn.recv(4096)
        conn.sendall(b'{"return": {}}\n')
        conn.recv(4096)
        conn.close()  # QEMU exits
        srv.close()

    threading.Thread(target=run, daemon=True).start()
    with QmpClient(str(sock_path), timeout=2) as qmp, pytest.raises(GuestNotRunning, match="QEMU"):
        qmp.status()
