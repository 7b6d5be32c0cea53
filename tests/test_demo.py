"""The README's demo command tells the truth: run it on the lab and check what it shows."""

from __future__ import annotations

import subprocess
import sys

import pytest

from xfgate.config import DomainConfig

pytestmark = pytest.mark.lab


def test_demo_blocks_the_attacker_and_keeps_the_web_servers(lab_domain: DomainConfig) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "xfgate_lab.demo", "--keep"],
        capture_output=True,
        text=True,
        timeout=480,
        check=False,
    )
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-2000:]
    received = [line for line in out.splitlines() if "the client received" in line]
    assert len(received) == 3, out
    assert "received 0 connections and 0 datagrams" not in received[0]  # attacking before
    assert "received 0 connections and 0 datagrams" in received[1]  # nothing after the block
    after_block = out.split("Stop user 1001")[1].split("Block root")[0]
    assert "198.18.1.1:80: answers" in after_block and "198.18.1.1:8080: answers" in after_block
    live = out.split("Block root")[1].split("$ xfgate unblock")[0]
    assert "198.18.1.1:80: NO ANSWER" in live and "198.18.1.1:8080: answers" in live
    # The verdict log names the blocked owner: by its holder, or (a blocked uid's new socket,
    # answered without a walk) by its creator.
    assert "'uid': 1001, 'comm': 'spray'" in out or "sk_uid 1001 (the creator) blocked" in out
    stopped = out.split("5. Stop the gate")[1].split("6. Release")[0]
    assert "XFGATE-1" in stopped  # a stopped gate leaves its enforcement in the kernel
    assert "received 0 connections and 0 datagrams" in received[2]  # and it still drops
    released = out.split("6. Release")[1].split("7. xfgate as a service")[0]
    assert "XFGATE" not in released  # cleanup leaves nothing of the gate
    service = out.split("7. xfgate as a service")[1]
    assert "while blocked, spray got out 0 connections and 0 datagrams" in service
    assert 'xfgate_decisions_total{domain="1"' in service  # metrics over HTTP
    assert "across the restart, spray got out 0 connections and 0 datagrams" in service
    assert "'value': '1001'" in service.split("8. Restart")[1]  # the rule survived
    expired = service.split("9. The block ends")[1]
    assert '"op":"expire"' in expired
    assert "after the expiry, spray got out 0 connections and 0 datagrams" not in expired
