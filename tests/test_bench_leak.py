"""Leak benchmark's pure parts: counter rules and their parsing."""

from __future__ import annotations

from bench.leak import CHAIN, LEAK_PORT, attempts_script, counting_rules, parse_counters

LISTING = f"""\
Chain {CHAIN} (1 references)
    pkts      bytes target     prot opt in     out     source               destination
       7      420            tcp  --  *      *       198.18.1.1           0.0.0.0/0            tcp dpt:{LEAK_PORT} flags:0x17/0x02 /* syn */
      12      720            tcp  --  *      *       198.18.1.1           0.0.0.0/0            tcp dpt:{LEAK_PORT} /* all */
"""  # noqa: E501


def test_parse_counters() -> None:
    assert parse_counters(LISTING) == (12, 7)
    assert parse_counters("") == (0, 0)


def test_rules_count_only_the_guests_packets_to_the_leak_port() -> None:
    rules = counting_rules("198.18.1.1")
    assert rules[0] == ["-N", CHAIN]
    assert all("198.18.1.1" in r for r in rules[1:3])
    assert rules[-1][:3] == ["-I", "INPUT", "1"]


def test_attempts_run_as_the_blocked_user_and_are_bounded() -> None:
    script = attempts_script(5)
    assert script.startswith("su -s /bin/sh mallory")
    assert "-lt 5" in script and "timeout 1 nc" in script
