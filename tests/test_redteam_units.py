"""The red-team harness and the flood benchmark without a lab: pcap counting, probe commands,
refusals, the tables."""

from __future__ import annotations

import struct
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from bench.flood import FloodRun, flood_script, render, summarize
from xfgate.errors import PrerequisiteError
from xfgate_lab import redteam
from xfgate_lab.errors import LabError
from xfgate_lab.redteam import Probe, count_pcap, probes, render_table


def pcap_bytes(n: int, order: str = "<", cut_last: bool = False) -> bytes:
    data = struct.pack(order + "IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    for i in range(n):
        body = bytes(60)
        data += struct.pack(order + "IIII", i, 0, len(body), len(body)) + body
    return data[:-10] if cut_last else data


@pytest.mark.parametrize("order", ["<", ">"])
def test_count_pcap(tmp_path: Path, order: str) -> None:
    p = tmp_path / "x.pcap"
    for n in (0, 1, 7):
        p.write_bytes(pcap_bytes(n, order))
        assert count_pcap(p) == n
    p.write_bytes(pcap_bytes(3, order, cut_last=True))  # the stop cut the last record
    assert count_pcap(p) == 3


def test_count_pcap_refuses_what_is_not_a_capture(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="no capture file"):
        count_pcap(tmp_path / "missing.pcap")
    (tmp_path / "short").write_bytes(b"abc")
    with pytest.raises(LabError, match="not a pcap"):
        count_pcap(tmp_path / "short")
    (tmp_path / "text").write_bytes(b"x" * 100)
    with pytest.raises(LabError, match="magic"):
        count_pcap(tmp_path / "text")


def test_missing_tcpdump_raises_never_counts_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(PrerequisiteError, match="tcpdump"):
        redteam.start_capture("nonexistent-netns", "tcp", tmp_path / "x.pcap")


def test_probe_commands() -> None:
    table = probes(1)
    mptcp = table["mptcp"].guest_command()
    assert mptcp.startswith("su -s /bin/sh mallory -c ")
    assert "/bin/xfprobe mptcp 198.18.0.1 2301 10" in mptcp
    raw = table["raw-tcp"].guest_command()
    assert raw == "/bin/xfprobe --as-uid 1001 raw-tcp 8080 198.18.0.1 2308 10"
    spawn = table["spawn"]
    assert spawn.waits_for_gate
    assert "echo $$ > /tmp/xfr-spawn.ppid" in spawn.guest_command()
    assert spawn.gate_args == ("--block-pid", "{parent_pid}")
    assert table["rename"].gate_args == ("--block-exe", "/bin/xfprobe")


def test_probe_ports_are_the_red_teams_own() -> None:
    """Not the workload spray's 2222/5353: the counts are the probe's alone."""
    for p in probes(1).values():
        bpf = p.bpf.replace("and not tcp dst port 2222", "")  # the flood's: the spray left out
        assert "2222" not in bpf and "5353" not in bpf, p
        assert "2222" not in p.args and "5353" not in p.args, p


def test_root_probe_refuses_a_uid_0_block() -> None:
    with pytest.raises(ValueError, match="uid 0"):
        Probe("x", ("raw-tcp",), "tcp", as_root=True, gate_args=("--block-uid", "0"))
    Probe("x", ("raw-tcp",), "tcp", as_root=True)  # the default block (uid 1001) is fine


def test_render_table() -> None:
    text = render_table(
        [
            {
                "probe": "mptcp",
                "packets_out": 10,
                "http": {"8080": [6, 6], "8000": [6, 5]},
                "gate_error": "",
                "status": {"polls": 40, "slow": 3, "max_s": 2.5},
                "gate_args": ["--block-uid", "1001"],
                "output": "xfprobe mptcp: 10 attempts, 0 connected",
            }
        ]
    )
    assert "| mptcp | `--block-uid 1001` | 10 | 6/6 | 5/6 |" in text
    assert "3/40 polls over 1 s" in text


def test_flood_summary_and_script() -> None:
    def run(flood: bool, avg: float, ok: float) -> FloodRun:
        return FloodRun(flood, 1, ok, avg, 0.5, 100, int(ok), 0, True, 1000 if flood else 0)

    s = summarize([run(False, 2.0, 100.0), run(True, 3.0, 98.0)])
    assert s["1"]["conn_time_ratio"] == pytest.approx(1.5)
    assert s["1"]["success_pct_on"] == 98.0
    assert "| 1 | 100.0 | 98.0 | 2.00 | 3.00 | 1.50 | 1000 |" in render({"by_domain": s}, 100)
    bare = replace(run(True, 2.5, 99.0), gated=False)
    s = summarize([run(False, 2.0, 100.0), run(True, 3.0, 98.0), bare])
    assert s["1"]["conn_time_ratio"] == pytest.approx(1.5)  # the no-gate run is not in it
    assert s["1"]["gate_vs_nogate_under_flood"] == pytest.approx(1.2)
    assert "| 1 | 99.0 | 2.50 | 1.20 |" in render({"by_domain": s}, 100)
    starved = summarize([run(False, 2.0, 100.0), run(True, 0.0, 0.0)])
    assert "| 0.0 | 2.00 | 0.00 | - (no reply) |" in render({"by_domain": starved}, 100)
    runs = [
        asdict(replace(run(False, 2.0, 100.0), load=1.5)),
        asdict(replace(run(True, 3.0, 98.0), load=2.0)),
        asdict(replace(bare, load=2.5)),
    ]
    table = render({"by_domain": summarize([]), "runs": runs}, 100)
    assert (
        "| 0 | 1 | 100.0 % / 2.0 ms (load 1.5) | 98.0 % / 3.0 ms (load 2.0) "
        "| 99.0 % / 2.5 ms (load 2.5) | 1.20 |" in table
    )
    script = flood_script(13, procs=2)
    assert script.count("timeout 18 su -s /bin/sh mallory -c") == 2
    assert "xfprobe flood 198.18.0.1 13 500000" in script
