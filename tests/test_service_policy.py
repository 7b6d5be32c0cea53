"""The policy file: parse, validate (file:line), render, expiry by a clock value, the store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xfgate.errors import ConfigError
from xfgate.service.policyfile import (
    PolicyFileError,
    PolicySet,
    make_rule,
    parse_duration,
    parse_policy,
    render_policy,
)
from xfgate.service.store import PolicyStore
from xfgate.verdict.policy import Verdict

T0 = 1_800_000_000.0

GOOD = """\
unknown = "drop"

[[rule]]
domain = 1
uid = 1001
until = 2027-01-15T08:00:30Z
reason = "spray"
by = "alice"

[[rule]]
domain = 2
port = "tcp/23"

[[rule]]
domain = 1
exe = "/tmp/spray"
"""


def test_parse_good_file_and_policy_per_domain() -> None:
    p = parse_policy(GOOD, "p.toml")
    assert p.unknown is Verdict.DROP
    assert len(p.rules) == 3
    (uid_rule,) = [r for r in p.rules if r.kind == "uid"]
    until = uid_rule.until
    assert until is not None and uid_rule.reason == "spray" and uid_rule.by == "alice"
    d1 = p.policy_for(1, until - 1)
    assert d1.block_uids == {1001} and d1.block_exes == {"/tmp/spray"}
    assert d1.unknown is Verdict.DROP
    assert p.policy_for(1, until).block_uids == frozenset()  # ends at its time, not after
    assert p.policy_for(2, 0).block_ports == {(6, 23)}
    assert p.policy_for(3, 0).blocks_anything is False


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[[rule]]\ndomain = 1\nuid = -3\n", "p.toml:1: rule 1"),
        ("\n\n[[rule]]\ndomain = 1\nuid = 5\n[[rule]]\ndomain = 1\ncolour = 3\n", "p.toml:6"),
        ("[[rule]]\ndomain = 1\nuid = 5\npid = 3\n", "exactly one"),
        ('[[rule]]\ndomain = 1\nport = "tcp/99999"\n', "p.toml:1"),
        ('[[rule]]\ndomain = 1\nexe = "spray"\n', "absolute path"),
        ("[[rule]]\ndomain = 1\nuid = 1\nuntil = 2027-01-01T00:00:00\n", "time zone"),
        ("[[rule]]\ndomain = 1\nuid = 1\n[[rule]]\ndomain = 1\nuid = 1\n", "p.toml:4: rule 2"),
        ("x = [\n1,\n", "p.toml:"),
        ('unknown = "maybe"\n', "accept or drop"),
    ],
)
def test_bad_files_name_file_and_line(text: str, where: str) -> None:
    with pytest.raises(PolicyFileError) as e:
        parse_policy(text, "p.toml")
    assert where in str(e.value)


def test_render_parses_back() -> None:
    p = parse_policy(GOOD, "p.toml")
    p2 = p.with_rule(make_rule(3, "comm", "spray", T0, 1800.5, "why", "bob"))
    again = parse_policy(render_policy(p2), "r.toml")
    assert again == p2


def test_block_replaces_same_key_and_expiry_from_clock() -> None:
    p = PolicySet().with_rule(make_rule(1, "uid", "1001", T0, 60))
    p = p.with_rule(make_rule(1, "uid", "01001", T0, 120, "longer"))
    assert len(p.rules) == 1 and p.rules[0].until == T0 + 120
    assert p.next_expiry(T0) == T0 + 120
    assert p.expired(T0 + 119) == () and len(p.expired(T0 + 120)) == 1
    assert p.without([p.rules[0].key]).rules == ()


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("30m", 1800), ("1h30m", 5400), ("2d", 172800)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "30", "m30", "1x", "-5m", "1h x"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)


def test_store_keeps_last_good_and_writes_atomically(tmp_path: Path) -> None:
    path, audit = tmp_path / "policy.toml", tmp_path / "audit.jsonl"
    now = [T0]
    store = PolicyStore(path, audit, clock=lambda: now[0])
    assert store.load() is False and store.policy.rules == ()  # missing file: empty policy
    store.change(
        lambda p: p.with_rule(make_rule(1, "uid", "1001", now[0], 30, "spray", "alice")),
        {"op": "block"},
    )
    assert parse_policy(path.read_text()).rules == store.policy.rules
    assert not store.changed_on_disk()  # our own write is not an outside change
    path.write_text(path.read_text() + "[[rule]]\ndomain = x\n")
    assert store.changed_on_disk()
    assert store.load() is False
    assert "policy.toml:" in store.error and len(store.policy.rules) == 1  # last good kept
    with pytest.raises(ConfigError, match="does not parse"):
        store.change(lambda p: p, {"op": "block"})
    path.write_text(render_policy(PolicySet()))
    assert store.load() is True and store.error == "" and store.policy.rules == ()
    store.change(lambda p: p.with_rule(make_rule(2, "pid", "7", now[0], 10)), {"op": "block"})
    assert store.expire(T0 + 9.9) == ()
    gone = store.expire(T0 + 10)
    assert [r.value for r in gone] == ["7"]
    assert parse_policy(path.read_text()).rules == ()  # the file forgets it too
    ops = [json.loads(line)["op"] for line in audit.read_text().splitlines()]
    assert ops == ["block", "reload-rejected", "reload", "block", "expire"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
