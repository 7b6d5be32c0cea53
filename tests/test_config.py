"""The domains file: round trip, and errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from xfgate.config import (
    DomainConfig,
    KernelConfig,
    MemoryConfig,
    QmpConfig,
    get_domain,
    load_domains,
    save_domains,
)
from xfgate.errors import ConfigError, DomainNotFound


def sample(dom_id: int = 1) -> DomainConfig:
    return DomainConfig(
        id=dom_id,
        name=f"guest{dom_id}",
        vifs=(f"vif{dom_id}.0",),
        memory=MemoryConfig("qemu-shm", f"/dev/shm/xfgate-guest{dom_id}.mem"),
        qmp=QmpConfig("/run/xfgate/lab/qmp.sock", 42),
        kernel=KernelConfig("linux-image-6.1.0-56-amd64", "6.1.0-56-amd64", "/var/cache/x"),
        netns="xfgate-dom0",
        addresses=("198.18.1.1",),
    )


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "domains.toml"
    save_domains({1: sample(1), 2: sample(2)}, path)
    loaded = load_domains(path)
    assert loaded == {1: sample(1), 2: sample(2)}
    assert get_domain(2, path) == sample(2)


def test_missing_file_is_empty_and_unknown_domain_says_what_exists(tmp_path: Path) -> None:
    path = tmp_path / "none.toml"
    assert load_domains(path) == {}
    with pytest.raises(DomainNotFound, match=r"unknown domain 7 .*xfgate-lab up"):
        get_domain(7, path)
    save_domains({1: sample(1)}, path)
    with pytest.raises(DomainNotFound, match="known domains: 1"):
        get_domain(7, path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[domain]\n", "not valid TOML"),
        ("[[domain]]\nname='x'\n", "missing key 'id'"),
        ("[[domain]]\nid=1\n", "missing key 'memory'"),
        ("[[domain]]\nid=1\nmemory={backend='floppy', path='/x'}\n", "backend 'floppy' unknown"),
        ("[[domain]]\nid='one'\n", "'id' must be int"),
        (
            "[[domain]]\nid=1\nmemory={backend='raw',path='/x'}\n"
            "[[domain]]\nid=1\nmemory={backend='raw',path='/y'}\n",
            "appears twice",
        ),
        (
            "[[domain]]\nid=1\nvifs='vif1.0'\nmemory={backend='raw',path='/x'}\n",
            "list of interface",
        ),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "domains.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_domains(path)
