"""The benchmark harness end to end on the lab (smoke profile: about a minute). It proves the
harness works and that its leak benchmark can tell polling from the per-packet gate; the numbers
themselves are not asserted (timing belongs in bench/, beside its baseline)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from xfgate.config import DomainConfig

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
