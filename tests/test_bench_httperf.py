"""httperf output parsing (pure). Sample texts are httperf 0.9.0's format."""

from __future__ import annotations

from bench.httperf import httperf_argv, parse_httperf

GOOD = """\
httperf --hog --client=0/1 --server=198.18.1.1 --port=8000 --uri=/ --rate=150 --send-buffer=4096 \
--recv-buffer=16384 --num-conns=1000 --num-calls=1
Maximum connect burst length: 1

Total: connections 1000 requests 1000 replies 1000 test-duration 6.661 s

Connection rate: 150.1 conn/s (6.7 ms/conn, <=2 concurrent connections)
Connection time [ms]: min 0.4 avg 0.9 max 11.2 median 0.5 stddev 1.0
Connection time [ms]: connect 0.3
Connection length [replies/conn]: 1.000

Request rate: 150.1 req/s (6.7 ms/req)
Request size [B]: 62.0

Reply rate [replies/s]: min 149.8 avg 150.0 max 150.2 stddev 0.1 (31 samples)
Reply time [ms]: response 0.5 transfer 0.0
Reply size [B]: header 65.0 content 12.0 footer 0.0 (total 77.0)
Reply status: 1xx=0 2xx=998 3xx=0 4xx=2 5xx=0

CPU time [s]: user 1.83 system 4.81 (user 27.5% system 72.2% total 99.7%)
Net I/O: 26.7 KB/s (0.2*10^6 bps)

Errors: total 3 client-timo 1 socket-timo 0 connrefused 2 connreset 0
Errors: fd-unavail 0 addrunavail 0 ftab-full 0 other 0
"""


def test_parses_every_figure() -> None:
    r = parse_httperf(GOOD, expected_conns=1000)
    assert (r.connections, r.requests, r.replies) == (1000, 1000, 1000)
    assert r.test_duration_s == 6.661
    assert r.conn_rate == 150.1
    assert (r.conn_time_min, r.conn_time_avg, r.conn_time_max) == (0.4, 0.9, 11.2)
    assert (r.conn_time_median, r.conn_time_stddev) == (0.5, 1.0)
    assert r.connect_ms == 0.3
    assert (r.reply_rate_min, r.reply_rate_avg, r.reply_rate_max) == (149.8, 150.0, 150.2)
    assert r.reply_rate_samples == 31
    assert r.response_ms == 0.5
    assert r.status_2xx == 998
    assert r.errors["client-timo"] == 1 and r.errors["connrefused"] == 2
    assert r.errors["total"] == 3 and r.errors["fd-unavail"] == 0
    assert r.valid


def test_fd_unavail_marks_run_invalid() -> None:
    text = GOOD.replace("fd-unavail 0", "fd-unavail 17")
    r = parse_httperf(text)
    assert not r.valid
    assert any("fd-unavail 17" in p for p in r.problems)


def test_hung_run_is_invalid_even_without_output() -> None:
    r = parse_httperf("", timed_out=True)
    assert not r.valid
    assert len(r.problems) == 2  # killed, and no Total line


def test_short_run_is_invalid() -> None:
    r = parse_httperf(GOOD, expected_conns=5000)
    assert any("1000 of 5000" in p for p in r.problems)


def test_argv_is_the_thesis_workload() -> None:
    argv = httperf_argv("198.18.1.1", 80, 150, 100000)
    assert "--rate=150" in argv and "--num-conns=100000" in argv and "--num-calls=1" in argv
