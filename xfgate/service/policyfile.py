"""The host's policy as data: a TOML file of block rules per domain, each with an optional expiry.

Pure: parsing, validation, rendering and expiry take text and a clock value as arguments and
never touch a file (``xfgate/service/store.py`` reads and writes it). Format::

    # xfgate policy: one [[rule]] per block; written by `xfgate block`, editable by hand
    unknown = "accept"                     # optional: verdict when an owner cannot be known

    [[rule]]
    domain = 1                             # an id, or a name or UUID: "web01" (see below)
    uid = 1001                             # exactly one of uid, pid, exe, comm, sk_uid, port
    until = 2026-11-30T05:30:00Z           # optional: the rule ends then (UTC)
    reason = "spraying 198.18.0.0/15"      # optional
    by = "alice"                           # optional: who set it
    set = 2026-11-30T05:00:00Z             # optional: when

``pid`` blocks the process and its descendants; ``port`` is ``tcp/23`` or ``udp/53``; ``exe`` an
absolute guest path. What a rule can block is what ``xfgate/verdict/policy.py`` enforces.

``domain`` is an integer id (a domains-file id) or a string: a domain's name or UUID. A string
rule is in force in every gated domain of that name or UUID, from the moment it appears (a
libvirt domain's runtime id changes each time it starts; its name and UUID do not). UUIDs are
compared in lower case; a string of digits is refused (write the integer).
"""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import tomli_w

from xfgate.errors import ConfigError
from xfgate.verdict.policy import Policy, Verdict

KINDS = ("uid", "pid", "exe", "comm", "sk_uid", "port")
INT_KINDS = ("uid", "pid", "sk_uid")
RULE_KEYS = frozenset(KINDS) | {"domain", "until", "reason", "by", "set"}
MAX_TEXT = 512  # reason / by
MAX_RULES = 10_000
_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
MAX_DOMAIN_NAME = 256
# A rule's domain: an id, or a domain's name or UUID (lower case), stable across restarts.
DomainRef = int | str


def domain_ref(value: object) -> DomainRef:
    """A rule's `domain` as the policy keeps it, or ConfigError."""
    if isinstance(value, bool):
        raise ConfigError("domain: an integer id, or a name or UUID string")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"domain must be >= 0, got {value}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"domain: an integer id, or a name or UUID string, got {value!r}")
    text = value.strip()
    if not text or len(text) > MAX_DOMAIN_NAME or any(ord(c) < 32 for c in text):
        raise ConfigError(f"domain: a name of 1 to {MAX_DOMAIN_NAME} printable characters")
    if text.isdigit():
        raise ConfigError(f"domain: write the id {text} as an integer, not a string")
    return text.lower() if _UUID.match(text) else text


def _ref_order(ref: DomainRef) -> tuple[bool, int, str]:
    return (True, 0, ref) if isinstance(ref, str) else (False, ref, "")


class PolicyFileError(ConfigError):
    """The policy file does not parse or validate; the message names file:line."""


@dataclass(frozen=True)
class RuleKey:
    domain: DomainRef
    kind: str
    value: str

    def order(self) -> tuple[tuple[bool, int, str], str, str]:
        return (_ref_order(self.domain), self.kind, self.value)


@dataclass(frozen=True)
class Rule:
    domain: DomainRef
    kind: str
    value: str  # normalized text (ints as decimal)
    until: float | None = None  # epoch seconds; None: no expiry
    reason: str = ""
    by: str = ""
    set_at: float | None = None

    @property
    def key(self) -> RuleKey:
        return RuleKey(self.domain, self.kind, self.value)

    def expired(self, now: float) -> bool:
        return self.until is not None and self.until <= now

    def applies_to(self, keys: Collection[DomainRef]) -> bool:
        """Whether the rule names a domain known by any of `keys` (its id, name, UUID)."""
        return self.domain in keys

    def describe(self) -> str:
        until = f" until {iso(self.until)}" if self.until is not None else ""
        reason = f" ({self.reason})" if self.reason else ""
        return f"domain {self.domain} {self.kind} {self.value}{until}{reason}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"domain": self.domain, "kind": self.kind, "value": self.value}
        if self.until is not None:
            d["until"] = iso(self.until)
        if self.reason:
            d["reason"] = self.reason
        if self.by:
            d["by"] = self.by
        if self.set_at is not None:
            d["set"] = iso(self.set_at)
        return d


@dataclass(frozen=True)
class PolicySet:
    """Every rule of the host, by key (a second block of the same key replaces the first)."""

    rules: tuple[Rule, ...] = ()
    unknown: Verdict = Verdict.ACCEPT
    _by_key: dict[RuleKey, Rule] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_key = {r.key: r for r in self.rules}  # the last rule of a key wins
        ordered = sorted(by_key, key=RuleKey.order)
        object.__setattr__(self, "rules", tuple(by_key[k] for k in ordered))
        object.__setattr__(self, "_by_key", by_key)

    def get(self, key: RuleKey) -> Rule | None:
        return self._by_key.get(key)

    def with_rule(self, rule: Rule) -> PolicySet:
        validate_rule(rule)
        kept = tuple(r for r in self.rules if r.key != rule.key)
        if len(kept) >= MAX_RULES:
            raise ConfigError(f"too many rules (at most {MAX_RULES})")
        return replace(self, rules=(*kept, rule))

    def without(self, keys: Iterable[RuleKey]) -> PolicySet:
        gone = set(keys)
        return replace(self, rules=tuple(r for r in self.rules if r.key not in gone))

    def domains(self) -> set[DomainRef]:
        return {r.domain for r in self.rules}

    def active(self, domain: DomainRef | Collection[DomainRef], now: float) -> tuple[Rule, ...]:
        """The rules in force at `now` for a domain known by `domain` (one id/name/UUID, or
        all of a domain's keys)."""
        keys = _keys(domain)
        return tuple(r for r in self.rules if r.applies_to(keys) and not r.expired(now))

    def expired(self, now: float) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.expired(now))

    def next_expiry(self, now: float) -> float | None:
        times = [r.until for r in self.rules if r.until is not None and r.until > now]
        return min(times) if times else None

    def policy_for(self, domain: DomainRef | Collection[DomainRef], now: float) -> Policy:
        """The verdict engine's policy for `domain` at time `now`: expired rules left out."""
        policy = Policy(unknown=self.unknown)
        for r in self.active(domain, now):
            policy = policy.changed("block", r.kind, r.value)
        return replace(policy, version=0)


def _keys(domain: DomainRef | Collection[DomainRef]) -> Collection[DomainRef]:
    return {domain} if isinstance(domain, int | str) else domain


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_duration(text: str) -> float:
    """``30m``, ``2h``, ``1h30m``, ``90s``, ``1d``, ``2w`` to seconds (> 0)."""
    t = text.strip().lower()
    pos, total = 0, 0
    for m in _DURATION.finditer(t):
        if m.start() != pos and t[pos : m.start()].strip():
            break
        total += int(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if not t or t[pos:].strip() or total <= 0:
        raise ConfigError(f"duration {text!r}: write e.g. 90s, 30m, 2h, 1h30m, 1d")
    return float(total)


def validate_rule(rule: Rule) -> None:
    """Raise ConfigError unless the verdict policy can enforce this rule."""
    if domain_ref(rule.domain) != rule.domain:
        raise ConfigError(f"domain {rule.domain!r}: not in its normal form")
    if rule.kind not in KINDS:
        raise ConfigError(f"unknown rule kind {rule.kind!r} ({', '.join(KINDS)})")
    Policy().changed("block", rule.kind, rule.value)  # the verdict policy's own validation
    for name, text in (("reason", rule.reason), ("by", rule.by)):
        if len(text) > MAX_TEXT or any(c in text for c in "\n\r\0"):
            raise ConfigError(f"{name}: one line of at most {MAX_TEXT} characters")


def make_rule(
    domain: DomainRef,
    kind: str,
    value: str,
    now: float,
    duration: float | None = None,
    reason: str = "",
    by: str = "",
) -> Rule:
    """A new rule set at `now`, ending `duration` seconds later (None: no end)."""
    if kind in INT_KINDS:
        try:
            value = str(int(value))
        except ValueError:
            raise ConfigError(f"{kind} must be an integer, got {value!r}") from None
    until = now + duration if duration is not None else None
    rule = Rule(domain_ref(domain), kind, value, until, reason, by, now)
    validate_rule(rule)
    return rule


def _rule_lines(text: str) -> list[int]:
    """The line number of each ``[[rule]]`` header, in order."""
    return [
        i for i, line in enumerate(text.splitlines(), 1) if re.match(r"\s*\[\[\s*rule\s*\]\]", line)
    ]


def _tomllib_line(e: tomllib.TOMLDecodeError) -> int:
    m = re.search(r"line (\d+)", str(e))
    return int(m.group(1)) if m else 1


def _time(value: object, what: str) -> float:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ConfigError(f"{what}: give a time zone (e.g. 2026-11-30T05:30:00Z)")
        return value.timestamp()
    raise ConfigError(f"{what}: a TOML date-time with a time zone, got {value!r}")


def _rule_from_table(t: Mapping[str, Any]) -> Rule:
    unknown_keys = sorted(set(t) - RULE_KEYS)
    if unknown_keys:
        raise ConfigError(f"unknown key(s) {', '.join(unknown_keys)}")
    if "domain" not in t:
        raise ConfigError("domain: an id, a name or a UUID is required")
    domain = domain_ref(t["domain"])
    kinds = [k for k in KINDS if k in t]
    if len(kinds) != 1:
        raise ConfigError(f"exactly one of {', '.join(KINDS)} per rule, got {len(kinds)}")
    kind = kinds[0]
    raw = t[kind]
    if kind in INT_KINDS and (not isinstance(raw, int) or isinstance(raw, bool)):
        raise ConfigError(f"{kind}: an integer is required, got {raw!r}")
    if kind not in INT_KINDS and not isinstance(raw, str):
        raise ConfigError(f"{kind}: a string is required, got {raw!r}")
    texts = {}
    for name in ("reason", "by"):
        v = t.get(name, "")
        if not isinstance(v, str):
            raise ConfigError(f"{name}: a string is required")
        texts[name] = v
    until = _time(t["until"], "until") if "until" in t else None
    set_at = _time(t["set"], "set") if "set" in t else None
    rule = Rule(domain, kind, str(raw), until, texts["reason"], texts["by"], set_at)
    validate_rule(rule)
    return rule


def parse_policy(text: str, path: str = "<policy>") -> PolicySet:
    """The policy in `text`, or PolicyFileError naming ``path:line`` and what is wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyFileError(f"{path}:{_tomllib_line(e)}: not valid TOML: {e}") from None
    extra = sorted(set(data) - {"rule", "unknown"})
    if extra:
        raise PolicyFileError(f"{path}:1: unknown top-level key(s) {', '.join(extra)}")
    try:
        unknown = Verdict(data.get("unknown", "accept"))
    except ValueError:
        raise PolicyFileError(f"{path}:1: unknown must be accept or drop") from None
    tables = data.get("rule", [])
    if not isinstance(tables, list):
        raise PolicyFileError(f"{path}:1: rule must be an array of tables ([[rule]])")
    if len(tables) > MAX_RULES:
        raise PolicyFileError(f"{path}:1: too many rules (at most {MAX_RULES})")
    lines = _rule_lines(text)
    rules: dict[RuleKey, Rule] = {}
    for i, t in enumerate(tables):
        line = lines[i] if i < len(lines) else 1
        try:
            rule = _rule_from_table(t)
        except ConfigError as e:
            raise PolicyFileError(f"{path}:{line}: rule {i + 1}: {e}") from None
        if rule.key in rules:
            raise PolicyFileError(
                f"{path}:{line}: rule {i + 1}: duplicates an earlier rule"
                f" ({rule.kind} {rule.value} of domain {rule.domain})"
            )
        rules[rule.key] = rule
    return PolicySet(tuple(rules.values()), unknown)


def render_policy(policy: PolicySet) -> str:
    """The TOML text of `policy`; ``parse_policy(render_policy(p))`` gives `p` back."""
    tables = []
    for r in sorted(policy.rules, key=lambda r: r.key.order()):
        t: dict[str, Any] = {"domain": r.domain}
        t[r.kind] = int(r.value) if r.kind in INT_KINDS else r.value
        if r.until is not None:
            t["until"] = dt.datetime.fromtimestamp(r.until, dt.UTC)
        if r.reason:
            t["reason"] = r.reason
        if r.by:
            t["by"] = r.by
        if r.set_at is not None:
            t["set"] = dt.datetime.fromtimestamp(r.set_at, dt.UTC)
        tables.append(t)
    head = "# xfgate policy: one [[rule]] per block; `xfgate block|unblock` rewrite this file\n"
    # One [[rule]] header per table (tomli_w would write short arrays inline, without the
    # header lines that error messages point at).
    parts = [head + tomli_w.dumps({"unknown": policy.unknown.value})]
    parts += ["[[rule]]\n" + tomli_w.dumps(t) for t in tables]
    return "\n".join(parts)
