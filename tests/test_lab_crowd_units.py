"""The crowd option of `xfgate-lab up` (xfgate_lab/crowd.py): parsing, sizing, refusals."""

from __future__ import annotations

import pytest

from xfgate_lab import crowd
from xfgate_lab.errors import LabError
from xfgate_lab.qemu import kernel_append


def test_parse_and_size_a_crowd() -> None:
    c = crowd.parse_crowd("2000,20000")
    assert (c.tasks, c.sockets, c.spec) == (2000, 20000, "2000,20000")
    assert c.ram_mb() % 64 == 0 and c.ram_mb() > crowd.BASE_RAM_MB
    assert crowd.parse_crowd("10,40").ram_mb() >= crowd.BASE_RAM_MB
    assert "xfgate.crowd=2000,20000" in kernel_append(1, c.spec)
    assert "xfgate.crowd" not in kernel_append(1)


@pytest.mark.parametrize("text", ["", "2000", "2000,", "a,b", "1,10", "2000,1", "99999,10"])
def test_bad_crowd_specs_are_refused(text: str) -> None:
    with pytest.raises(LabError):
        crowd.parse_crowd(text)


def test_too_few_sockets_for_the_workers_says_how_many() -> None:
    with pytest.raises(LabError, match=r"SOCKETS >= \d+"):
        crowd.parse_crowd("2000,100")


def test_ram_that_cannot_hold_the_crowd_is_refused_with_the_size_needed() -> None:
    c = crowd.parse_crowd("2000,20000")
    need = c.ram_mb()
    assert crowd.guest_ram_mb(c, None, 100_000) == need
    assert crowd.guest_ram_mb(c, need + 64, 100_000) == need + 64
    with pytest.raises(LabError, match=f"needs {need} MiB"):
        crowd.guest_ram_mb(c, 256, 100_000)
    with pytest.raises(LabError, match=f"needs {need} MiB of guest RAM; the host has 300"):
        crowd.guest_ram_mb(c, None, 300)
    assert crowd.guest_ram_mb(None, None, 100_000) == crowd.BASE_RAM_MB
