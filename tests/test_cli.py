"""The command-line edge: env defaults of the path options, no environment writes, logging,
and `xfgate status` rendered as a pure function."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from xfgate.cli import build_parser, configure_logging, main
from xfgate.config import DEFAULT_CACHE_DIR, DEFAULT_DOMAINS_FILE, DEFAULT_RUN_DIR
from xfgate.verdict.cli import gate_options, render_status, status_error
from xfgate.verdict.options import GateMode


def test_path_options_default_to_the_environment_then_the_fixed_paths() -> None:
    args = build_parser({}).parse_args(["status"])
    assert (args.domains_file, args.run_dir, args.cache_dir) == (
        DEFAULT_DOMAINS_FILE,
        DEFAULT_RUN_DIR,
        DEFAULT_CACHE_DIR,
    )
    env = {"XFGATE_DOMAINS": "/e/d.toml", "XFGATE_RUN_DIR": "/e/run", "XFGATE_CACHE": "/e/c"}
    args = build_parser(env).parse_args(["status"])
    assert (args.domains_file, args.run_dir, args.cache_dir) == (
        Path("/e/d.toml"),
        Path("/e/run"),
        Path("/e/c"),
    )
    args = build_parser(env).parse_args(["--domains-file", "/f.toml", "--run-dir", "/r", "status"])
    assert (args.domains_file, args.run_dir) == (Path("/f.toml"), Path("/r"))


def test_gate_options_carry_the_paths(tmp_path: Path) -> None:
    argv = ["--domains-file", str(tmp_path / "d.toml"), "--run-dir", str(tmp_path), "run"]
    args = build_parser({}).parse_args([*argv, "--domain", "3", "--mode", "poll"])
    opts = gate_options(args)
    assert opts.domains_file == tmp_path / "d.toml" and opts.run_dir == tmp_path
    assert opts.mode is GateMode.POLL and opts.domains == (3,)


def test_domains_file_option_is_passed_down_not_written_to_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("XFGATE_DOMAINS", raising=False)
    missing = tmp_path / "none.toml"
    assert main(["--domains-file", str(missing), "ps", "--domain", "4"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and err.startswith("xfgate: error: ")
    assert "XFGATE_DOMAINS" not in os.environ


def test_status_with_no_gate_and_with_gates() -> None:
    assert render_status([]) == "no gate is running"
    gate = {
        "domain": 1,
        "name": "guest1",
        "vifs": ["vif1.0"],
        "pid": 42,
        "mode": "queue",
        "queue_num": 101,
        "policy": {"block_uids": [1001]},
        "stats": {
            "packets": 10,
            "accepted": 7,
            "dropped": 3,
            "settled": 5,
            "errors": 0,
            "latency_us_avg": 80.5,
        },
        "blocked_ports": ["tcp/2222"],
        "kernel": {"fastpath_accept": 4, "fastpath_drop": 2, "set_drop": 1, "queued": 10},
    }
    dead = {"domain": 2, "error": status_error(2, "no answer", stale_socket=True)}
    assert render_status([gate, dead]).splitlines() == [
        'domain 1 (guest1, vif1.0): pid 42, mode queue, queue 101, policy {"block_uids": [1001]}',
        "  packets 10 accepted 7 dropped 3 settled 5 errors 0 avg 80.5 us; blocked ports tcp/2222",
        "  kernel fast path: accepted 4 dropped 2 set-dropped 1 queued 10",
        "domain 2: no answer (stale socket: the gate died; its kernel rules stay until the next"
        " start or `xfgate cleanup --domain 2`)",
    ]
    no_kernel = {**gate, "kernel": {}, "blocked_ports": []}
    assert render_status([no_kernel]).splitlines()[1].endswith("blocked ports -")
    assert len(render_status([no_kernel]).splitlines()) == 2
    assert status_error(3, "no answer", stale_socket=False) == "no answer"
    degraded = {**no_kernel, "degraded": "incomplete walk: step bound"}
    assert render_status([degraded]).splitlines()[2] == "  degraded: incomplete walk: step bound"


def test_logging_levels_and_format(capsys: pytest.CaptureFixture[str]) -> None:
    log = logging.getLogger("xfgate.verdict.runner")
    configure_logging()
    log.debug("hidden")
    log.info("gate ready")
    log.warning("careful")
    assert capsys.readouterr().err.splitlines() == [
        "xfgate: gate ready",
        "xfgate: warning: careful",
    ]
    configure_logging(verbose=True)
    log.debug("shown")
    assert capsys.readouterr().err == "xfgate: shown\n"
    configure_logging(quiet=True)
    log.info("hidden")
    log.error("bad")
    assert capsys.readouterr().err == "xfgate: error: bad\n"
    configure_logging()
