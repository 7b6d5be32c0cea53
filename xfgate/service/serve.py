"""`xfgate serve`: one process per host gating every domain a DomainSource lists.

The service is a `Gate` (xfgate/verdict/runner.py) that it grows and shrinks: each domain keeps
its own queue, packet thread, control thread, refresher and owner source there, so one domain's
flood or hostile memory never delays another's decisions. Around it the service adds, on the
gate's main loop:

- discovery: the DomainSource is polled; a domain that appears (and whose VM is alive) is gated
  with the policy file's rules for it; one that disappears or whose VM stopped is let go
  (stop-not-release: its chains and sets stay in the kernel until a gate binds it again);
- the policy file (xfgate/service/store.py): reloaded on SIGHUP or when it changes on disk,
  rules expired at their time, changes from `xfgate block|unblock` written back atomically;
  a rule for a domain not gated waits for it;
- its own control socket ``RUN_DIR/serve.sock`` (block, unblock, unknown, status of all);
- a lock ``RUN_DIR/serve.lock``: a second service on the host is refused;
- metrics (xfgate/service/metrics.py) and systemd's notify protocol (READY, WATCHDOG).
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from xfgate.config import DomainConfig, load_domains
from xfgate.errors import ConfigError, XfgateError
from xfgate.service.metrics import MetricsServer, ServiceInfo
from xfgate.service.policyfile import (
    KINDS,
    DomainRef,
    PolicySet,
    Rule,
    domain_ref,
    make_rule,
    parse_duration,
)
from xfgate.service.sdnotify import Notifier
from xfgate.service.store import PolicyStore
from xfgate.verdict import control
from xfgate.verdict.options import GateOptions
from xfgate.verdict.policy import Policy, Verdict
from xfgate.verdict.runner import Gate, OwnerSourceFactory

log = logging.getLogger(__name__)
DEAD_STRIKES = 2  # discovery rounds a gated VM must look stopped in before it is let go

# Lists the domains to gate now. Called from the service's main loop every discovery interval;
# an exception keeps the domains gated as they are (a half-written domains file is no reason
# to let go of every guest). The domains file's is the default; libvirt's plugs in here.
DomainSource = Callable[[], Sequence[DomainConfig]]
# Why a domain's VM is not running ("" when it is): a stopped VM is let go.
Liveness = Callable[[DomainConfig], str]
# Whether a domain's VM is gone for good, so that its kernel rules go with it (see vm_gone).
Gone = Callable[[DomainConfig], bool]
LET_GO_KEPT = 32  # domains let go, remembered for `status`


def domains_file_source(path: Path) -> DomainSource:
    def source() -> Sequence[DomainConfig]:
        return list(load_domains(path).values())

    return source


def vm_liveness(cfg: DomainConfig) -> str:
    from xfgate.errors import GuestNotRunning
    from xfgate.vmi.liveness import require_running

    try:
        require_running(cfg)
    except GuestNotRunning as e:
        return str(e)
    return ""


def domain_keys(cfg: DomainConfig) -> frozenset[DomainRef]:
    """Every way a policy rule can name this domain: its id, its name, its libvirt UUID."""
    keys: set[DomainRef] = {cfg.id}
    if cfg.name and not cfg.name.isdigit():
        keys.add(cfg.name)
    if cfg.libvirt is not None:
        keys.add(cfg.libvirt.uuid.lower())
        if cfg.libvirt.name and not cfg.libvirt.name.isdigit():
            keys.add(cfg.libvirt.name)
    return frozenset(keys)


def vm_gone(cfg: DomainConfig) -> bool:
    """A libvirt domain whose QEMU exited: its taps are gone, and its runtime id will not come
    back (libvirt gives a new one at each start). Its kernel rules are released: left behind,
    they would meet a later tap of the same name (libvirt reuses `vnetN`) and queue that
    domain's packets to a queue nobody reads. A domains-file domain keeps its id across
    restarts: its rules stay (stop-not-release) and are adopted when it comes back."""
    from xfgate.hypervisor.libvirt import is_qemu_of
    from xfgate.vmi.liveness import qemu_cmdline

    if cfg.libvirt is None or cfg.libvirt.pid <= 0:
        return False
    return not is_qemu_of(qemu_cmdline(cfg.libvirt.pid), cfg.libvirt.uuid)


def lock_path(run_dir: Path) -> Path:
    return run_dir / "serve.lock"


class ServiceLock:
    """An exclusive flock on RUN_DIR/serve.lock, held for the service's life (the kernel
    drops it when the process dies: no stale lock)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = lock_path(run_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            os.close(self._fd)
            raise ConfigError(
                f"another `xfgate serve` runs on this host (pid {holder or '?'}, lock"
                f" {self.path}): one service gates every domain; use `xfgate status`"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True)
class ServeOptions:
    gate: GateOptions  # its domains and policy are ignored: the source and the file give them
    policy_path: Path
    audit_path: Path | None = None
    metrics: str | None = None  # ADDR:PORT
    discover_interval: float = 2.0
    notify_socket: str = ""
    watchdog_usec: int = 0


class Service:
    def __init__(
        self,
        options: ServeOptions,
        domain_source: DomainSource,
        owner_source_factory: OwnerSourceFactory | None = None,
        liveness: Liveness = vm_liveness,
        clock: Callable[[], float] = time.time,
        gone: Gone = vm_gone,
    ) -> None:
        self.options = options
        self._domain_source = domain_source
        self._liveness = liveness
        self._gone = gone
        self._clock = clock
        self.gate = Gate(options.gate, owner_source_factory)
        self.store = PolicyStore(options.policy_path, options.audit_path, clock)
        self.notifier = Notifier(options.notify_socket, options.watchdog_usec)
        self._lock = threading.RLock()  # the store's policy -> the gate's domains
        self._hup = False
        self._next_discovery = 0.0
        self.listed: dict[int, DomainConfig] = {}  # what the source listed last
        self._dead: dict[int, int] = {}  # gated domains whose VM looked stopped: times in a row
        self.pending: dict[int, str] = {}  # listed, not gated: why
        self.let_go: dict[int, dict[str, Any]] = {}  # domains let go: what, when, why
        self._service_lock: ServiceLock | None = None
        self._control: control.ControlServer | None = None
        self._metrics: MetricsServer | None = None
        self.started = 0.0

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        run_dir = self.options.gate.run_dir
        self._service_lock = ServiceLock(run_dir)
        try:
            self.store.load()
            if self.store.error:
                raise ConfigError(f"policy file: {self.store.error}")
            if self.options.metrics:
                self._metrics = MetricsServer(self.options.metrics, self.gate, self.info)
            self._control = control.ControlServer(
                run_dir, -1, self.handle, path=control.service_socket(run_dir)
            )
            self.gate.readers[self._control.fileno()] = self._control.serve_one
            self.gate.tick_hooks.append(self.tick)
            self.gate.policy_hook = self._domain_policy_request
            self.started = self._clock()
            self.discover()
        except BaseException:
            self.stop()
            raise
        gated = ", ".join(str(d) for d in sorted(self.gate.domains)) or "none yet"
        self.notifier.ready(f"gating domains {gated}")

    def run(self, until: Callable[[], bool] | None = None) -> None:
        old = signal.signal(signal.SIGHUP, self._on_hup)
        try:
            self.gate.serve(until)
        finally:
            signal.signal(signal.SIGHUP, old)

    def stop(self) -> None:
        self.notifier.stopping()
        with self._lock:
            self.gate.stop()
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._service_lock is not None:
            self._service_lock.release()
            self._service_lock = None

    def _on_hup(self, *_: Any) -> None:
        self._hup = True

    # --- the main loop's work -------------------------------------------------------------

    def tick(self) -> None:
        now = self._clock()
        if self._hup or self.store.changed_on_disk():
            if self._hup:
                log.info("SIGHUP: reloading the policy file %s", self.store.path)
            self._hup = False
            if self.store.load():
                self.apply()
        if self.store.expire(now):
            self.apply()
        if time.monotonic() >= self._next_discovery:
            self.discover()
        self.notifier.watchdog(self.healthy())

    def healthy(self) -> bool:
        """Every gated domain's threads alive (else the watchdog stops being fed)."""
        return all(t.is_alive() for dg in self.gate.domains.values() for t in dg.threads)

    def discover(self) -> None:
        """Gate the domains the source lists and that run; let go of the others."""
        self._next_discovery = time.monotonic() + self.options.discover_interval
        try:
            listed = {c.id: c for c in self._domain_source()}
        except Exception as e:
            log.warning("domain source failed, domains stay as they are: %s", e)
            return
        self.listed = listed
        with self._lock:
            for d in sorted(set(self.gate.domains)):
                cfg = listed.get(d)
                why = "it left the domain list" if cfg is None else self._liveness(cfg)
                if cfg is not None and why:
                    # A VM that looks stopped must look so twice in a row: a monitor slow to
                    # answer once is no reason to unbind (unsettled flows drop meanwhile).
                    self._dead[d] = self._dead.get(d, 0) + 1
                    if self._dead[d] < DEAD_STRIKES:
                        log.warning("domain %d: %s (checking again)", d, why)
                        continue
                self._dead.pop(d, None)
                if cfg is not None and not why and cfg != self.gate.domains[d].cfg:
                    why = "its configuration changed"
                if why:
                    self._let_go(
                        d, why, release=cfg is None and self._gone(self.gate.domains[d].cfg)
                    )
            for d in list(self.pending):
                if d not in listed:
                    del self.pending[d]
            for d, cfg in sorted(listed.items()):
                if d not in self.gate.domains:
                    self._take_on(cfg, set(listed))

    def _let_go(self, domain: int, why: str, release: bool) -> None:
        cfg = self.gate.domains[domain].cfg
        name = cfg.name + (f", libvirt {cfg.libvirt.uuid}" if cfg.libvirt is not None else "")
        if release:
            what = "its QEMU exited: its kernel rules are released"
        else:
            what = "its rules stay in the kernel"
        log.info("domain %d (%s): letting go (%s); %s", domain, name, why, what)
        self.gate.remove_domain(domain, release=release)
        self.let_go.pop(domain, None)
        self.let_go[domain] = {
            "name": cfg.name,
            "uuid": cfg.libvirt.uuid.lower() if cfg.libvirt is not None else "",
            "why": why,
            "released": release,
            "at": round(self._clock(), 3),
        }
        while len(self.let_go) > LET_GO_KEPT:
            del self.let_go[next(iter(self.let_go))]

    def _take_on(self, cfg: DomainConfig, listed: set[int]) -> None:
        why = self._liveness(cfg)
        if not why:
            try:
                if self.gate.firewall is None:
                    self.gate.open(cfg.netns)
                    self.gate.clean_leftovers(keep=listed)
                policy = self.store.policy.policy_for(domain_keys(cfg), self._clock())
                self.gate.add_domain(cfg, policy)
            except XfgateError as e:
                why = str(e)
        if why:
            if self.pending.get(cfg.id) != why:
                log.warning("domain %d: not gated yet: %s", cfg.id, why)
            self.pending[cfg.id] = why
            return
        self.pending.pop(cfg.id, None)
        self.let_go.pop(cfg.id, None)
        rules = self.store.policy.active(domain_keys(cfg), self._clock())
        how = f", libvirt {cfg.libvirt.uuid}" if cfg.libvirt is not None else ""
        log.info(
            "domain %d (%s%s): gated, %d rule(s)%s",
            cfg.id,
            cfg.name,
            how,
            len(rules),
            "".join(f"; {r.describe()}" for r in rules),
        )

    def apply(self) -> None:
        """Put the policy file's rules in force in every gated domain whose policy changed."""
        now = self._clock()
        with self._lock:
            for d, dg in list(self.gate.domains.items()):
                current = dg.engine.policy
                new = self.store.policy.policy_for(domain_keys(dg.cfg), now)
                if replace(new, version=current.version) != current:
                    self.gate.set_policy(d, replace(new, version=current.version + 1))
                    log.info("domain %d: policy now %s", d, _summary(new))

    # --- control ----------------------------------------------------------------------

    def _domain_policy_request(self, domain: int, req: dict[str, Any]) -> dict[str, Any]:
        return self.handle({**req, "domain": domain})

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "status":
            return {"ok": True, **self.status()}
        if op in ("block", "unblock"):
            return self._change(str(op), req)
        if op == "unknown":
            verdict = Verdict(str(req.get("value")))
            entry = {"op": "unknown", "value": verdict.value, "by": str(req.get("by", ""))}
            self.store.change(lambda p: replace(p, unknown=verdict), entry)
            self.apply()
            return {"ok": True, "unknown": verdict.value}
        raise ConfigError(f"unknown control operation {op!r}")

    def rule_domain(self, spec: object) -> DomainRef:
        """The `domain` a rule asked for by `spec` is written with: an id stays an id, but the
        runtime id of a domain found through libvirt becomes its UUID (a libvirt domain gets
        a new id each time it starts: a rule by id would not follow it)."""
        if spec is None or spec == "":
            raise ConfigError("give --domain")
        if isinstance(spec, str) and spec.strip().isdigit():
            spec = int(spec)
        ref = domain_ref(spec)
        if isinstance(ref, int):
            cfg = self.listed.get(ref)
            if cfg is not None and cfg.libvirt is not None:
                return cfg.libvirt.uuid.lower()
        return ref

    def _same_domain(self, ref: DomainRef) -> frozenset[DomainRef]:
        """`ref` and every other key of the listed domains it names (unblock by name finds a
        rule written by UUID, and the other way round)."""
        keys: set[DomainRef] = {ref}
        for cfg in self.listed.values():
            if ref in domain_keys(cfg):
                keys |= domain_keys(cfg)
        return frozenset(keys)

    def _gated_for(self, ref: DomainRef) -> list[int]:
        return [d for d, dg in sorted(self.gate.domains.items()) if ref in domain_keys(dg.cfg)]

    def _change(self, op: str, req: dict[str, Any]) -> dict[str, Any]:
        domain = self.rule_domain(req.get("domain"))
        kind, value = str(req.get("kind")), str(req.get("value"))
        if kind not in KINDS:
            raise ConfigError(f"unknown rule kind {kind!r} ({', '.join(KINDS)})")
        by = str(req.get("by", ""))
        now = self._clock()
        if op == "block":
            duration = parse_duration(str(req["for"])) if req.get("for") else None
            rule = make_rule(domain, kind, value, now, duration, str(req.get("reason", "")), by)
            self.store.change(
                lambda p: p.with_rule(rule), {"op": "block", "rule": rule.to_dict(), "by": by}
            )
            log.info("block: %s (by %s)", rule.describe(), by or "?")
            result: dict[str, Any] = {"rule": rule.to_dict()}
        else:
            normal = make_rule(domain, kind, value, now).value
            keys = self._same_domain(domain)
            olds = [r for r in self.store.policy.rules if r.kind == kind and r.value == normal]
            olds = [r for r in olds if r.applies_to(keys)]
            if not olds:
                raise ConfigError(f"no rule blocks {kind} {value} in domain {domain}")
            self.store.change(
                lambda p: p.without(r.key for r in olds),
                {"op": "unblock", "rule": olds[0].to_dict(), "by": by},
            )
            for old in olds:
                log.info("unblock: %s (by %s)", old.describe(), by or "?")
            result = {"rule": olds[0].to_dict()}
        self.apply()
        with self._lock:
            gated = self._gated_for(domain)
            dg = self.gate.domains.get(gated[0]) if gated else None
            policy = dg.engine.policy if dg else self.store.policy.policy_for(domain, now)
        result["waiting"] = "" if gated else self._waiting_reason(domain)
        result["gated"] = gated
        return {"ok": True, "policy": policy.to_dict(), **result}

    def _waiting_reason(self, ref: DomainRef) -> str:
        for d, why in sorted(self.pending.items()):
            cfg = self.listed.get(d)
            if d == ref or (cfg is not None and ref in domain_keys(cfg)):
                return f"domain {ref} is not gated yet: {why}"
        return f"domain {ref} is not in the domain list: the rule waits for it"

    def _waiting(self, now: float) -> list[Rule]:
        gated = [domain_keys(dg.cfg) for dg in self.gate.domains.values()]
        return [r for r in self.store.policy.rules if not any(r.applies_to(k) for k in gated)]

    def info(self) -> ServiceInfo:
        pol = self.store.policy
        now = self._clock()
        with self._lock:
            keys = {d: domain_keys(dg.cfg) for d, dg in self.gate.domains.items()}
            waiting = len(self._waiting(now))
        return ServiceInfo(
            rules={d: len(pol.active(k, now)) for d, k in keys.items()},
            waiting=waiting,
            policy_error=bool(self.store.error),
        )

    def status(self) -> dict[str, Any]:
        now = self._clock()
        pol = self.store.policy
        with self._lock:
            domains = []
            for _, dg in sorted(self.gate.domains.items()):
                s = self.gate.status(dg)
                s["uuid"] = dg.cfg.libvirt.uuid.lower() if dg.cfg.libvirt is not None else ""
                s["rules"] = [r.to_dict() for r in pol.active(domain_keys(dg.cfg), now)]
                domains.append(s)
            waiting = [
                {**r.to_dict(), "why": self._waiting_reason(r.domain)} for r in self._waiting(now)
            ]
        return {
            "service": {
                "pid": os.getpid(),
                "since": round(self.started, 3),
                "policy_file": str(self.store.path),
                "policy_error": self.store.error,
                "metrics": self._metrics.address if self._metrics else "",
                "pending": {str(d): why for d, why in sorted(self.pending.items())},
                "let_go": {str(d): v for d, v in self.let_go.items()},
            },
            "domains": domains,
            "waiting": waiting,
        }


def _summary(policy: Policy) -> str:
    d = policy.to_dict()
    parts = [f"{k[len('block_') :]} {v}" for k, v in d.items() if k.startswith("block_") and v]
    return ", ".join(parts) or "nothing blocked"


def service_running(run_dir: Path) -> bool:
    return control.answers(control.service_socket(run_dir))


def run_service(
    options: ServeOptions,
    domain_source: DomainSource,
    until: Callable[[], bool] | None = None,
    owner_source_factory: OwnerSourceFactory | None = None,
) -> int:
    service = Service(options, domain_source, owner_source_factory)
    try:
        service.start()
        service.run(until)
    finally:
        service.stop()
    return 0


__all__ = ["DomainSource", "PolicySet", "ServeOptions", "Service", "run_service"]
