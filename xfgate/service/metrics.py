"""Prometheus metrics of a gate, per domain, read from the gate's own counters at each scrape.

Nothing is counted twice: the collector turns the engine's and refresher's counters
(``EngineStats``, the kernel's queue counters, the introspector's pause records) into metric
families when Prometheus scrapes, so the packet path pays only for the counters it already kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from xfgate.errors import ConfigError
from xfgate.verdict.engine import LATENCY_BOUNDS_NS
from xfgate.verdict.runner import DomainGate, Gate, _degraded, queue_counters

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceInfo:
    rules: dict[int, int]  # domain -> rules in force
    waiting: int  # rules for domains not gated
    policy_error: bool  # the policy file on disk does not parse


def _pauses(dg: DomainGate) -> list[float]:
    records = getattr(dg.source.inner, "pause_records", None)
    return list(records) if isinstance(records, list) else []


class GateCollector(Collector):
    def __init__(self, gate: Gate, info: Callable[[], ServiceInfo]) -> None:
        self._gate = gate
        self._info = info

    def collect(self) -> Iterator[Metric]:
        d = "domain"
        decisions = CounterMetricFamily(
            "xfgate_decisions",
            "Verdicts given, by verdict and answer source",
            labels=[d, "verdict", "source"],
        )
        settled = CounterMetricFamily("xfgate_settled", "Verdicts settled in conntrack", labels=[d])
        errors = CounterMetricFamily(
            "xfgate_errors", "Internal errors (on-error verdict)", labels=[d]
        )
        latency = HistogramMetricFamily(
            "xfgate_decision_latency_seconds", "Time to decide one queued packet", labels=[d]
        )
        qdrops = CounterMetricFamily(
            "xfgate_queue_drops",
            "Packets the kernel dropped on the domain's NFQUEUE (queue full, or netlink ENOBUFS)",
            labels=[d, "where"],
        )
        qwait = GaugeMetricFamily(
            "xfgate_queue_waiting", "Packets waiting in the queue", labels=[d]
        )
        walks = CounterMetricFamily("xfgate_walks", "Full guest walks by the refresher", labels=[d])
        walk_s = GaugeMetricFamily(
            "xfgate_last_walk_seconds", "Duration of the last full guest walk", labels=[d]
        )
        pauses = CounterMetricFamily(
            "xfgate_guest_pauses",
            "Times the gate paused the guest for a consistent read",
            labels=[d],
        )
        pause_s = CounterMetricFamily(
            "xfgate_guest_pause_seconds", "Time the guest spent paused by the gate", labels=[d]
        )
        degraded = GaugeMetricFamily(
            "xfgate_degraded", "1 while the domain's view of the guest is degraded", labels=[d]
        )
        lookups_off = GaugeMetricFamily(
            "xfgate_degraded_lookups",
            "1 while socket hash lookups are off (answers from the last walk only)",
            labels=[d],
        )
        rules = GaugeMetricFamily("xfgate_policy_rules", "Policy rules in force", labels=[d])
        queues = queue_counters()
        for dom, dg in sorted(self._gate.domains.items()):
            label = str(dom)
            st = dg.engine.stats
            for (verdict, source), n in sorted(dict(st.by_verdict_source).items()):
                decisions.add_metric([label, verdict, source], n)
            settled.add_metric([label], st.settled)
            errors.add_metric([label], st.errors)
            buckets: list[tuple[str, float]] = []
            cumulative = 0
            counts = list(st.latency_counts)
            for bound, n in zip(LATENCY_BOUNDS_NS, counts, strict=False):
                cumulative += n
                buckets.append((repr(bound / 1e9), cumulative))
            buckets.append(("+Inf", sum(counts)))
            latency.add_metric([label], buckets, st.latency_ns_total / 1e9)
            q: dict[str, Any] = queues.get(dg.layout.queue_num, {})
            qdrops.add_metric([label, "kernel"], q.get("queue_dropped", 0))
            qdrops.add_metric([label, "netlink"], q.get("user_dropped", 0))
            qwait.add_metric([label], q.get("waiting", 0))
            ref = dg.refresher
            walks.add_metric([label], ref.walks if ref else 0)
            walk_s.add_metric([label], (ref.last_walk_ms if ref else 0.0) / 1000)
            p = _pauses(dg)
            pauses.add_metric([label], len(p))
            pause_s.add_metric([label], sum(p))
            degraded.add_metric([label], 1 if _degraded(dg) else 0)
            lookups_off.add_metric([label], 1 if dg.engine.degraded else 0)
        info = self._info()
        for dom, n in sorted(info.rules.items()):
            rules.add_metric([str(dom)], n)
        yield from (decisions, settled, errors, latency, qdrops, qwait, walks, walk_s)
        yield from (pauses, pause_s, degraded, lookups_off, rules)
        yield GaugeMetricFamily("xfgate_domains", "Domains gated", value=len(self._gate.domains))
        yield GaugeMetricFamily(
            "xfgate_rules_waiting", "Rules for domains not gated (they wait)", value=info.waiting
        )
        yield GaugeMetricFamily(
            "xfgate_policy_file_error",
            "1 while the policy file does not parse (the last good policy stays)",
            value=1 if info.policy_error else 0,
        )


def parse_address(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``[v6]:PORT``, ``:PORT`` for all addresses) to (addr, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ConfigError(f"--metrics {text!r}: write ADDR:PORT, e.g. 127.0.0.1:9469")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)


class MetricsServer:
    """The HTTP endpoint (``/metrics``), started before any domain is gated: a taken port is
    an error at start, not a silent loss of metrics."""

    def __init__(self, address: str, gate: Gate, info: Callable[[], ServiceInfo]) -> None:
        from prometheus_client.exposition import start_http_server

        host, port = parse_address(address)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GateCollector(gate, info))
        try:
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            raise ConfigError(
                f"--metrics {address}: cannot listen ({e.strerror or e}): is the port taken"
                " (another xfgate serve, or another exporter)? choose another with --metrics"
            ) from None
        self.port = int(self._server.server_address[1])  # the one bound (ADDR:0 picks one)
        self.address = f"{host}:{self.port}"
        log.info("metrics on http://%s/metrics", self.address)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
