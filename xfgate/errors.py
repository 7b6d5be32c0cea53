"""One exception tree for xfgate. Every error an operator can meet says what to do about it.

Structured fields (address, symbol, domain, ...) let callers and tests act on the error without
parsing its message; ``str(err)`` is the actionable text shown by the CLI.
"""

from __future__ import annotations


class XfgateError(Exception):
    """Base of every error xfgate raises on purpose. The CLI prints it and exits 2."""

    exit_code = 2


class ConfigError(XfgateError):
    """Bad command-line arguments or a bad domains file."""


class PrerequisiteError(XfgateError):
    """Not root, a missing program, kernel module or package."""


class DomainNotFound(XfgateError):
    def __init__(
        self, domain: int | str, known: list[int] | None = None, path: str = "", detail: str = ""
    ) -> None:
        self.domain = domain
        self.known = known or []
        self.path = path
        where = f" in {path}" if path else ""
        hint = (
            f"known domains: {', '.join(map(str, self.known))}"
            if self.known
            else "no domains configured: start the demo guest with `xfgate-lab up`"
        )
        more = f"; {detail}" if detail else ""
        super().__init__(f"unknown domain {domain}{where} ({hint}){more}")


class GuestNotRunning(XfgateError):
    def __init__(self, domain: int | str, detail: str) -> None:
        self.domain = domain
        super().__init__(f"domain {domain} is not running: {detail}")


class QmpError(XfgateError):
    """The QEMU monitor did not answer or refused a command."""


class MemoryReadError(XfgateError):
    """A read of guest physical or virtual memory failed (out of range, unmapped, torn)."""

    def __init__(self, address: int, length: int, layer: str, reason: str = "") -> None:
        self.address = address
        self.length = length
        self.layer = layer
        self.reason = reason
        extra = f": {reason}" if reason else ""
        super().__init__(f"cannot read {length} bytes at {address:#x} from {layer}{extra}")


class TranslationError(MemoryReadError):
    """A guest virtual address has no mapping in the page tables."""

    def __init__(self, address: int, layer: str, reason: str = "not mapped") -> None:
        super().__init__(address, 1, layer, reason)


class ProfileError(XfgateError):
    """A kernel profile is missing, unreadable or lacks a needed symbol or member."""

    def __init__(self, message: str, symbol: str = "") -> None:
        self.symbol = symbol
        super().__init__(message)


class ProfileMismatch(ProfileError):
    """The guest runs a kernel other than the profile's (banner differs)."""

    def __init__(self, expected: str, found: str) -> None:
        self.expected = expected
        self.found = found
        super().__init__(
            f"profile is for {expected!r} but the guest runs {found!r}: "
            "build a profile for this kernel with `xfgate profile build`"
        )


class WalkError(XfgateError):
    """A walk over guest kernel structures hit its step/time bound or inconsistent data."""

    def __init__(
        self, what: str, reason: str, address: int = 0, issues: tuple[object, ...] = ()
    ) -> None:
        self.what = what
        self.reason = reason
        self.address = address
        self.issues = issues  # the structured records (xfgate.vmi.walk.WalkIssue) behind it
        at = f" at {address:#x}" if address else ""
        super().__init__(f"walk of {what} stopped{at}: {reason}")


class FirewallError(XfgateError):
    """iptables/ipset/conntrack could not be set up or cleaned."""


class QueueError(XfgateError):
    """The NFQUEUE could not be bound (already bound, not root, module missing)."""


class ControlError(XfgateError):
    """No running gate answers for a domain on its control socket, or it refused the request."""
