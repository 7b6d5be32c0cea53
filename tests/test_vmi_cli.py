"""`xfgate ps` end to end over a raw image of the synthetic guest, plus its pure formatters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.vmi_fakes import standard_guest
from xfgate.cli import main
from xfgate.config import DomainConfig, MemoryConfig, save_domains
from xfgate.vmi.cli import filter_document, format_table
from xfgate.vmi.profile_build import save_profile


@pytest.fixture
def fake_domain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    g = standard_guest()
    image = tmp_path / "guest.raw"
    image.write_bytes(g.buf)
    save_domains(
        {7: DomainConfig(7, "fake", ("vif7.0",), MemoryConfig("raw", str(image)))},
        tmp_path / "domains.toml",
    )
    monkeypatch.setenv("XFGATE_DOMAINS", str(tmp_path / "domains.toml"))
    profile = tmp_path / "profile.json"
    save_profile(g.profile, profile)
    return profile


def test_ps_json_and_filters(fake_domain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ps", "--domain", "7", "--json", "--profile", str(fake_domain)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [p["pid"] for p in doc["processes"]] == [1, 2, 100, 200, 300]
    assert (
        main(["ps", "--domain", "7", "--json", "--uid", "1000", "--profile", str(fake_domain)]) == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert [p["comm"] for p in doc["processes"]] == ["curl"]
    assert [(s["pid"], s["remote"], s["rport"]) for s in doc["sockets"]] == [
        (200, "2001:2::1", 443)
    ]


def test_ps_table(fake_domain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ps", "--domain", "7", "--pid", "100", "--profile", str(fake_domain)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["PID", "PPID", "UID", "COMM", "PROTO", "LOCAL", "REMOTE", "STATE"]
    assert [line.split()[4:] for line in lines[1:]] == [
        ["tcp", "0.0.0.0:80", "0.0.0.0:0", "LISTEN"],
        ["tcp6", "[::]:8080", "[::]:0", "LISTEN"],
        ["tcp", "198.18.1.1:80", "198.18.0.1:40000", "ESTABLISHED"],
    ]


def test_unknown_domain_and_missing_memory(
    fake_domain: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ps", "--domain", "3", "--profile", str(fake_domain)]) == 2
    assert "unknown domain 3" in capsys.readouterr().err
    (tmp_path / "guest.raw").unlink()
    assert main(["ps", "--domain", "7", "--profile", str(fake_domain)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_format_table_lists_processes_without_sockets() -> None:
    doc = {
        "processes": [{"pid": 5, "tgid": 5, "ppid": 1, "uid": 0, "euid": 0, "comm": "idle"}],
        "sockets": [],
    }
    assert format_table(doc).splitlines()[1].split() == ["5", "1", "0", "idle"]
    assert filter_document(doc, pid=6, uid=None) == {"processes": [], "sockets": []}


def test_a_loaded_profile_is_kept_out_of_the_cyclic_collector(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """load_domain_profile freezes what is alive (the profile's million objects): full
    collections no longer traverse them (a third of a crowded guest's walk)."""
    import gc

    from tests.vmi_fakes import synthetic_profile
    from xfgate.config import DomainConfig, MemoryConfig
    from xfgate.vmi import profile_build
    from xfgate.vmi.cli import load_domain_profile

    made = synthetic_profile()
    monkeypatch.setattr(profile_build, "load_profile", lambda path: made)
    gc.unfreeze()
    try:
        dom = DomainConfig(1, "f", (), MemoryConfig("raw", str(tmp_path / "m")))
        assert load_domain_profile(dom, "p.json", tmp_path) is made
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_json_lines_is_the_same_document_one_entry_a_line() -> None:
    from xfgate.vmi.cli import json_lines

    doc = {
        "processes": [{"pid": 1, "comm": "init"}, {"pid": 2, "comm": 'a "b"\n'}],
        "sockets": [],
        "other_sockets": [{"pid": 1, "fd": 3, "proto": "packet"}],
    }
    text = json_lines(doc)
    assert json.loads(text) == doc
    assert text.splitlines()[2] == '  {"pid": 1, "comm": "init"},'
    assert json.loads(json_lines({})) == {}
