"""The benchmark harness end to end on the lab (smoke profile: about a minute). It proves the
harness works and that its leak benchmark can tell polling from the per-packet gate; the numbers
themselves are not asserted (timing belongs in bench/, beside its baseline)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.gate import running_gate
from bench.outgoing import client_server, run_connload
from xfgate.config import DomainConfig
from xfgate_lab.layout import layout_from_env

pytestmark = pytest.mark.lab


def test_smoke_profile_runs_every_part(lab_domain: DomainConfig, tmp_path: Path) -> None:
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--profile", "smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for config in ("none", "gate", "poll-3"):
        figures = summary["thesis"][f"{config}@150"]
        assert figures["valid_runs"] == 1, (config, figures)
        assert 0 < figures["conn_time_avg"] < 1000
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    for config in ("out-none", "out-gate"):  # the outgoing sweep (bench.outgoing)
        figures = summary["sweep_outgoing"][f"{config}@300"]
        assert figures["valid_runs"] == 1 and figures["success_pct"] > 90, (config, figures)
    assert "out gate/none" in (out / "results.md").read_text()
    assert "full_walk" in summary["micro"]["vmi_bench"]
    assert "cache_hit" in summary["micro"]["verdict_bench"]["decision"]
    leaks = {x["config"]: x for x in summary["leak"]}
    assert leaks["gate"]["packets_out"] == 0  # per packet: not even the first SYN
    assert leaks["poll-3"]["syns_out"] >= 1  # polling cannot see short-lived connections
    assert "| gate |" in (out / "results.md").read_text()
    flood = summary["flood"]["by_domain"]["1"]  # issue 9's flood beside its flood-free run
    assert flood["flood_opened"] > 0, flood
    assert flood["success_pct_off"] > 90, flood
    assert "### Flood" in (out / "results.md").read_text()


def test_outgoing_load_goes_through_the_gate(lab_domain: DomainConfig, tmp_path: Path) -> None:
    """The outgoing sweep measures gated traffic: the same connload run gets every reply with
    the sweep's rule (--block-uid 1001) and none when its own uid (1000) is blocked."""
    with client_server(tmp_path):
        replies = {}
        for uid in (1001, 1000):
            args = ("--block-uid", str(uid))
            with running_gate(lab_domain.id, "gate", args, tmp_path / f"gate-{uid}.log"):
                result, text = run_connload(lab_domain.id, 50, 50)
            replies[uid] = result.replies
            assert result.connections == 50, text
    assert replies == {1001: 50, 1000: 0}


def test_outgoing_churn_never_lets_the_blocked_spray_out(
    lab_domain: DomainConfig, tmp_path: Path
) -> None:
    """Attack probe: uid 1000's outgoing churn (connload at 400 conn/s: socks freed and
    reallocated by the slab hundreds of times a second, the resolver's answers later "repaired
    from the walk") while uid 1001's spray (~2 TCP + 2 UDP/s) runs. A sock address resolved to
    uid 1000 and then reused for the spray's socket must never let the spray out."""
    layout = layout_from_env()
    with (
        client_server(tmp_path),
        running_gate(lab_domain.id, "gate", ("--block-uid", "1001"), tmp_path / "gate.log"),
    ):
        time.sleep(1.5)  # the peers write their statistics once a second
        before = json.loads(layout.peers_stats_path.read_text())
        result, text = run_connload(lab_domain.id, 400, 4000)
        time.sleep(1.5)
        after = json.loads(layout.peers_stats_path.read_text())
    assert after["updated"] > before["updated"], "peer statistics are not updating"
    assert result.replies > 0, text
    spray = {k: after[k] - before[k] for k in ("tcp2222_accepted", "udp5353_datagrams")}
    assert spray == {"tcp2222_accepted": 0, "udp5353_datagrams": 0}, (
        spray,
        (tmp_path / "gate.log").read_text()[-2000:],
    )
