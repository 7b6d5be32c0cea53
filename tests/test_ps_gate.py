"""`xfgate ps` answered by a running gate (issue 10), on fakes: the request's walk makes the
gate's quiet view current (what the quiet refresh misses, it finds), the document equals a
full walk's, the control protocol carries a body of megabytes, the client prints the gate's
answer without importing the walk, and falls back to walking when no gate answers.
tests/test_crowd_lab.py runs the same through a real gate on the crowded guest."""

from __future__ import annotations

import dataclasses
import json
import os
import select
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.vmi_fakes import FakeGuest, counters_profile, fake_domain, lports_of, spray_and_web
from xfgate.config import save_domains
from xfgate.errors import ControlError
from xfgate.flow import Owner
from xfgate.inet import IPProto
from xfgate.verdict import control
from xfgate.verdict.engine import LockedOwnerSource
from xfgate.verdict.ps_answer import PsAnswerer
from xfgate.vmi.cli import json_lines
from xfgate.vmi.current import CurrentReader, PsRenderer
from xfgate.vmi.introspect import GuestIntrospector, ps_document

FOREVER = 1e9  # no read or cross-check slice in any refresh of these tests


def _blocked_1001(owner: Owner) -> bool:
    return owner.uid == 1001


def _gate_introspector(g: FakeGuest) -> GuestIntrospector:
    """An introspector refreshed as the gate refreshes it: a full walk, then a quiet one."""
    gi = GuestIntrospector(fake_domain(), g.profile, memory=g.memory)
    gi.read_seconds = gi.check_seconds = FOREVER
    gi.refresh_view(_blocked_1001)
    gi.refresh_view(_blocked_1001)
    assert gi.crosscheck.quiet_refreshes == 1
    return gi


def _truth(gi: GuestIntrospector) -> str:
    """The document of a full walk from scratch (what `xfgate ps --walk` prints)."""
    fresh = GuestIntrospector(fake_domain(), gi.profile, memory=gi.memory)
    return json_lines(ps_document(fresh.walk()))


def _ports(answer: str, pid: int) -> set[int]:
    return {s["lport"] for s in json.loads(answer)["sockets"] if s["pid"] == pid}


def _current(gi: GuestIntrospector, reader: CurrentReader, renderer: PsRenderer) -> str:
    return renderer.json_text(reader.read(gi.current_plan()), {})


def test_a_socket_the_quiet_refresh_misses_is_in_the_gate_answer() -> None:
    """web (uid 1000, not watched) opens a socket without forking: no counter moves, its
    task_struct does not change, the quiet refresh trusts its table. The ps request reads
    every fd table's header and array again: the new socket is there."""
    g, _spray, web, _lsk = spray_and_web(counters_profile())
    with _gate_introspector(g) as gi:
        reader, renderer = CurrentReader(), PsRenderer()
        assert _current(gi, reader, renderer) == _truth(gi)
        sk = g.new_sock(IPProto.UDP, 7, "198.18.1.1", 40123, "198.18.0.1", 53, sk_uid=1000)
        g.add_fd(web, 9, sk)
        view = gi.refresh_view(_blocked_1001)
        assert 40123 not in lports_of(view, 500)  # the quiet refresh: seen late
        answer = _current(gi, reader, renderer)
        assert _ports(answer, 500) == {8080, 40123} and answer == _truth(gi)
        current = reader.read(gi.current_plan())
        assert current.complete and current.counts.tables_decoded == 1
        assert current.counts.socks_decoded == 0  # the second request: nothing else decoded
        g.put_fd(g.task_at(web).fd_array, 9, 0)  # closed again
        assert _ports(_current(gi, reader, renderer), 500) == {8080}


def test_the_table_equals_format_table_of_the_document_as_entries_change() -> None:
    """The gate's table (per-process lines kept while the entries and column widths are the
    same) is format_table of the walk's document, also after a change that widens a column
    and with a filter in between."""
    from xfgate.vmi.cli import filter_document, format_table

    g, _spray, web, _lsk = spray_and_web(counters_profile())
    with _gate_introspector(g) as gi:
        reader, renderer = CurrentReader(), PsRenderer()

        def walked(pid: int | None = None, uid: int | None = None) -> str:
            fresh = GuestIntrospector(fake_domain(), gi.profile, memory=gi.memory)
            return format_table(filter_document(ps_document(fresh.walk()), pid, uid))

        assert renderer.table_text(reader.read(gi.current_plan())) == walked()
        assert renderer.table_text(reader.read(gi.current_plan()), uid=1000) == walked(uid=1000)
        sk = g.new_sock(IPProto.TCP, 1, "2001:2::1:1", 41234, "2001:2:ffff::1234", 4433)
        g.add_fd(web, 11, sk)
        assert renderer.table_text(reader.read(gi.current_plan())) == walked()
        assert renderer.table_text(reader.read(gi.current_plan())) == walked()


def test_changes_in_place_are_in_the_gate_answer() -> None:
    """What no fd array shows: a bind() in place (the sock's bytes), and a file whose socket
    now holds another sock (the file and socket reused at the same addresses for a new
    socket): each read again, decoded again."""
    g, spray, _web, lsk = spray_and_web(counters_profile())
    with _gate_introspector(g) as gi:
        reader, renderer = CurrentReader(), PsRenderer()
        _current(gi, reader, renderer)
        g.w(lsk + g.off("sock_common", "skc_num"), "<H", 8081)
        answer = _current(gi, reader, renderer)
        assert _ports(answer, 500) == {8081}
        assert answer == _truth(gi)
        file = g.read_q(g.task_at(spray).fd_array + 3 * 8)
        socket = g.read_q(file + g.off("file", "private_data"))
        sk_of_spray = g.read_q(socket + g.off("socket", "sk"))
        other = g.new_sock(IPProto.TCP, 1, "198.18.1.1", 33999, "198.18.0.1", 2222, sk_uid=1001)
        # As the kernel does it: the old sock orphaned (sock_orphan: sk_socket NULL), the
        # socket grafted to the new one (sock_graft: both ends).
        g.w(sk_of_spray + g.off("sock", "sk_socket"), "<Q", 0)
        g.w(socket + g.off("socket", "sk"), "<Q", other)
        g.w(other + g.off("sock", "sk_socket"), "<Q", socket)
        answer = _current(gi, reader, renderer)
        assert _ports(answer, 400) == {33999}
        assert answer == _truth(gi)


def test_a_file_reused_as_another_kind_is_in_the_gate_answer() -> None:
    """The same struct file in the same fd slot (the fd array's bytes unchanged), now no
    socket: no longer listed."""
    g, spray, _web, _lsk = spray_and_web(counters_profile())
    with _gate_introspector(g) as gi:
        reader, renderer = CurrentReader(), PsRenderer()
        assert _ports(_current(gi, reader, renderer), 400) == {33000}
        file = g.read_q(g.task_at(spray).fd_array + 3 * 8)
        g.w(file + g.off("file", "f_op"), "<Q", g.sym("socket_file_ops") + 0x100)
        answer = _current(gi, reader, renderer)
        assert _ports(answer, 400) == set() and answer == _truth(gi)


def test_unreadable_memory_makes_an_incomplete_answer_that_says_so() -> None:
    g, spray, _web, _lsk = spray_and_web(counters_profile())
    with _gate_introspector(g) as gi:
        reader = CurrentReader()
        reader.read(gi.current_plan())
        file = g.read_q(g.task_at(spray).fd_array + 3 * 8)
        g.w(file + g.off("file", "private_data"), "<Q", 0x1234)  # no kernel pointer
        current = reader.read(gi.current_plan())
        assert not current.complete and current.problems
        assert "out of range" in current.problems[-1]


@contextmanager
def _control_server(
    run_dir: Path,
    handler: Callable[[dict[str, Any]], Any],
    slow_ops: frozenset[str] = frozenset(),
) -> Iterator[control.ControlServer]:
    server = control.ControlServer(run_dir, 1, handler, slow_ops=slow_ops)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([server], [], [], 0.05)
            if ready:
                server.serve_one()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_the_control_protocol_carries_a_body_of_megabytes(tmp_path: Path) -> None:
    body = b"".join(b"%08d\n" % i for i in range(600_000))  # 5.4 MB
    with _control_server(tmp_path, lambda req: control.BodyReply({"ok": True}, body)):
        reply, got = control.request_body(tmp_path, 1, {"op": "ps"})
    assert got == body and reply["body_bytes"] == len(body)
    with _control_server(tmp_path, lambda req: {"ok": True, "x": 1}):
        assert control.request_body(tmp_path, 1, {"op": "status"}) == ({"ok": True, "x": 1}, b"")


def test_a_slow_ps_does_not_hold_up_status_or_block(tmp_path: Path) -> None:
    """Issue 9: control requests answer within a second under any load. A `ps` may take its
    whole 5 s walk bound: it runs on its own thread, one at a time (a second one is refused
    as busy), while `status` answers at once."""
    release = threading.Event()

    def handler(req: dict[str, Any]) -> dict[str, Any] | control.BodyReply:
        if req["op"] == "ps":
            release.wait(10)
            return control.BodyReply({"ok": True}, b"ps body")
        return {"ok": True, "op": req["op"]}

    with _control_server(tmp_path, handler, slow_ops=frozenset({"ps"})):
        got: list[tuple[dict[str, Any], bytes]] = []
        slow = threading.Thread(
            target=lambda: got.append(control.request_body(tmp_path, 1, {"op": "ps"}))
        )
        slow.start()
        try:
            assert control.request(tmp_path, 1, {"op": "status"}, timeout=1.0)["op"] == "status"
            with pytest.raises(ControlError, match="busy"):
                control.request(tmp_path, 1, {"op": "ps"}, timeout=1.0)
            assert control.request(tmp_path, 1, {"op": "block"}, timeout=1.0)["op"] == "block"
        finally:
            release.set()
            slow.join(5)
        assert got and got[0][1] == b"ps body"


def test_the_gate_answers_ps_through_its_control_socket(tmp_path: Path) -> None:
    """The request path of a gate: PsAnswerer over the gate's LockedOwnerSource behind the
    control socket; the client's ps_from_gate prints it, says where it came from."""
    g, _spray, web, _lsk = spray_and_web(counters_profile())
    with _gate_introspector(g) as gi:
        answerer = PsAnswerer(fake_domain(), LockedOwnerSource(gi))
        sk = g.new_sock(IPProto.TCP, 10, "0.0.0.0", 9090, "0.0.0.0", 0, sk_uid=1000)
        g.add_fd(web, 7, sk)
        gi.refresh_view(_blocked_1001)  # quiet: misses it
        with _control_server(tmp_path, answerer.answer):
            reply, body = control.request_body(tmp_path, 1, {"op": "ps", "uid": 1000})
            doc = json.loads(body)
            assert reply["source"] == doc["source"] == "gate"
            assert reply["gate"]["pid"] == os.getpid() and reply["gate"]["complete"]
            assert {p["uid"] for p in doc["processes"]} == {1000}
            assert _ports(body.decode(), 500) == {8080, 9090}
            reply, body = control.request_body(tmp_path, 1, {"op": "ps", "format": "table"})
            assert "0.0.0.0:9090" in body.decode() and body.decode().startswith("PID")
            with pytest.raises(ControlError, match="format"):
                control.request_body(tmp_path, 1, {"op": "ps", "format": "yaml"})
            domains = tmp_path / "domains.toml"
            save_domains({1: fake_domain()}, domains)
            out = _client(tmp_path, domains, "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["source"] == "gate"
        assert "from the gate (pid" in out.stderr
        # The walk's machinery was not imported by the client (lazy imports).
        assert "walk modules: none" in out.stderr


def test_no_gate_a_gate_that_cannot_answer_or_serves_another_guest_means_a_walk(
    tmp_path: Path,
) -> None:
    from argparse import Namespace

    from xfgate.vmi.cli import ps_from_gate

    domains = tmp_path / "domains.toml"
    save_domains({1: fake_domain()}, domains)
    args = Namespace(domain="1", run_dir=tmp_path, json=True, pid=None, uid=None)
    args.domains_file, args.libvirt_uri = domains, "none"
    assert ps_from_gate(args) is None  # no socket
    with _control_server(tmp_path, lambda req: {"ok": False, "error": "unknown operation"}):
        assert ps_from_gate(args) is None
    # A gate behind the same run directory that serves another guest (another lab's domain 1)
    # refuses: its answer would list another guest's processes.
    g, _spray, _web, _lsk = spray_and_web(counters_profile())
    with _gate_introspector(g) as gi:
        other = dataclasses.replace(fake_domain(), name="other")
        answerer = PsAnswerer(other, LockedOwnerSource(gi))
        with _control_server(tmp_path, answerer.answer):
            with pytest.raises(ControlError, match="another domain"):
                want = {"id": 1, "name": "fake", "memory": fake_domain().memory.path}
                control.request_body(tmp_path, 1, {"op": "ps", "domain": want})
            assert ps_from_gate(args) is None


def _client(run_dir: Path, domains: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`xfgate ps --domain 1` in a new process; it reports the walk modules it imported."""
    code = (
        "import sys\n"
        "from xfgate.cli import main\n"
        f"rc = main(['--run-dir', {str(run_dir)!r}, '--domains-file', {str(domains)!r},"
        f" 'ps', '--domain', '1', *{list(extra)!r}])\n"
        "walk = sorted(m for m in sys.modules if m in ('xfgate.vmi.linux', "
        "'xfgate.vmi.introspect', 'xfgate.vmi.profile_build', 'xfgate.vmi.paging'))\n"
        "print('walk modules:', ', '.join(walk) or 'none', file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
