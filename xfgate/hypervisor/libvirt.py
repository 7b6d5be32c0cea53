"""Domains an operator runs under libvirt: found by name, UUID or id, turned into a
DomainConfig (QEMU pid, taps from the live XML, the netns holding them), and their monitor.

The monitor is libvirt's own QMP passthrough (`virDomainQemuMonitorCommand`, HMP through its
HMP flag), not `virt-qemu-qmp-proxy`: libvirtd already owns the domain's only QMP socket, the
passthrough needs no extra process or socket per domain and is serialized with libvirt's own
monitor jobs; its price is that libvirt marks the domain "tainted: custom-monitor" in its log.
Pause and resume go through the libvirt API (`suspend`/`resume`) so that libvirt's state, its
events and other management tools see what happened, and it is never tainted by them.

`libvirt-python` is optional: a host with only the domains file never imports it, and a host
without it (or without a running daemon) gets a sentence saying so, never a traceback.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xfgate.config import (
    DEFAULT_LIBVIRT_URI,
    DomainConfig,
    KernelConfig,
    LibvirtConfig,
    MemoryConfig,
)
from xfgate.errors import ConfigError, GuestNotRunning, PrerequisiteError, QmpError
from xfgate.hypervisor.libvirt_xml import DomainXml, parse_domain_xml
from xfgate.vmi.qmp import ControlRegisters, parse_control_registers

log = logging.getLogger("xfgate.libvirt")

DEFAULT_URI = DEFAULT_LIBVIRT_URI
UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
)
# virDomainState -> the run state QMP's query-status would name (what QmpClient.status says).
STATE_NAMES = {
    0: "nostate",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutdown",
    5: "shutoff",
    6: "guest-panicked",
    7: "suspended",
}
LIVE_STATES = ("running", "blocked", "paused")
MAX_PROC_SCAN = 1 << 16  # /proc entries looked at when searching a domain's QEMU
HMP_FLAG = 1  # VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP


@dataclass(frozen=True)
class LibvirtApi:
    """The two modules of libvirt-python (injected: tests give fakes)."""

    libvirt: Any
    libvirt_qemu: Any


def load_api() -> LibvirtApi:
    try:
        import libvirt
        import libvirt_qemu
    except ImportError as e:
        raise PrerequisiteError(
            "libvirt support needs the Python module libvirt (Debian: python3-libvirt; PyPI: "
            f"libvirt-python, built against libvirt-dev), which is not installed ({e})"
        ) from e
    # libvirt prints every error to stderr by default; ours carry it in their message.
    libvirt.registerErrorHandler(_quiet, None)
    return LibvirtApi(libvirt, libvirt_qemu)


def _quiet(_ctx: object, _err: object) -> None:
    return None


def is_uuid(spec: str) -> bool:
    return bool(UUID_RE.match(spec))


def state_name(state: int) -> str:
    return STATE_NAMES.get(state, f"state{state}")


def _err_text(e: BaseException) -> str:
    get = getattr(e, "get_error_message", None)
    text = get() if callable(get) else None
    return str(text or e)


# ---- the QEMU process and its network namespace -----------------------------------------------


def _cmdline(proc: Path, pid: int) -> list[str]:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_qemu_of(cmdline: list[str], uuid: str) -> bool:
    """The command line is a QEMU started for the domain with this UUID (libvirt passes
    `-uuid`); a recycled pid is someone else's."""
    if not cmdline or "qemu" not in Path(cmdline[0]).name:
        return False
    for flag, value in itertools.pairwise(cmdline):
        if flag == "-uuid" and value.lower() == uuid.lower():
            return True
    return False


def find_qemu_pid(
    uuid: str,
    name: str,
    run_dirs: tuple[Path, ...] = (Path("/run/libvirt/qemu"),),
    proc: Path = Path("/proc"),
) -> int:
    """The pid of the domain's QEMU: libvirt's pid file (NAME.pid in its run dir), checked
    against /proc; else a bounded scan of /proc for the QEMU with `-uuid UUID`. 0: none."""
    for run_dir in run_dirs:
        try:
            pid = int((run_dir / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            continue
        if is_qemu_of(_cmdline(proc, pid), uuid):
            return pid
    try:
        entries = os.listdir(proc)
    except OSError:
        return 0
    for entry in entries[:MAX_PROC_SCAN]:
        if entry.isdigit() and is_qemu_of(_cmdline(proc, int(entry)), uuid):
            return int(entry)
    return 0


def netns_of(pid: int, netns_dir: Path = Path("/run/netns"), proc: Path = Path("/proc")) -> str:
    """The named network namespace the process lives in, where its taps are; "" when it has
    no name and is the caller's own. The name comes first: the answer must not change when
    the caller itself enters that namespace (`xfgate serve` does, to reach the bridge, and
    compares each discovery's configuration with the last). A namespace with no name under
    /run/netns, not the caller's, cannot be entered by name: an error."""
    try:
        target = os.stat(proc / str(pid) / "ns" / "net")
        own = os.stat(proc / "self" / "ns" / "net")
    except OSError as e:
        raise GuestNotRunning(pid, f"cannot see QEMU pid {pid}'s network namespace: {e}") from e
    try:
        names = sorted(os.listdir(netns_dir))
    except OSError:
        names = []
    for name in names[:4096]:
        try:
            st = os.stat(netns_dir / name)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            return name
    if (target.st_dev, target.st_ino) == (own.st_dev, own.st_ino):
        return ""
    raise ConfigError(
        f"QEMU pid {pid} runs in a network namespace with no name under {netns_dir}: "
        f"name it (`ip netns attach NAME {pid}`) so that xfgate can reach its taps"
    )


# ---- the host: one connection to libvirt --------------------------------------------------------


@dataclass(frozen=True)
class LibvirtDomainView:
    """One domain as libvirt shows it (`xfgate domains`)."""

    name: str
    uuid: str
    runtime_id: int
    state: str
    pid: int
    taps: tuple[str, ...]


class LibvirtHost:
    """A connection to a libvirt daemon. Context manager; every libvirt failure becomes an
    XfgateError naming the URI."""

    def __init__(
        self,
        uri: str = DEFAULT_URI,
        api: LibvirtApi | None = None,
        find_pid: Callable[[str, str], int] | None = None,
        find_netns: Callable[[int], str] | None = None,
    ) -> None:
        self.uri = uri
        self.api = api or load_api()
        self.find_pid = find_pid or find_qemu_pid
        self.find_netns = find_netns or netns_of
        try:
            self.conn = self.api.libvirt.open(uri)
        except self.api.libvirt.libvirtError as e:
            raise PrerequisiteError(
                f"libvirt at {uri} does not answer ({_err_text(e)}): is its daemon (libvirtd or "
                "virtqemud) running, and is this the right --libvirt-uri?"
            ) from e
        if self.conn is None:
            raise PrerequisiteError(f"libvirt at {uri}: the connection could not be opened")

    def __enter__(self) -> LibvirtHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception as e:
            log.debug("libvirt close: %s", e)

    def lookup(self, spec: str) -> Any | None:
        """The virDomain named by a UUID, a name or a runtime id; None if libvirt has none."""
        lv = self.api.libvirt
        attempts: list[Callable[[], Any]] = []
        if is_uuid(spec):
            attempts.append(lambda: self.conn.lookupByUUIDString(spec))
        if spec.isdigit():
            attempts.append(lambda: self.conn.lookupByID(int(spec)))
        attempts.append(lambda: self.conn.lookupByName(spec))
        for attempt in attempts:
            try:
                return attempt()
            except lv.libvirtError as e:
                if e.get_error_code() != lv.VIR_ERR_NO_DOMAIN:
                    raise PrerequisiteError(f"libvirt at {self.uri}: {_err_text(e)}") from e
        return None

    def all_domains(self) -> list[Any]:
        try:
            return list(self.conn.listAllDomains(0))
        except self.api.libvirt.libvirtError as e:
            raise PrerequisiteError(f"libvirt at {self.uri}: {_err_text(e)}") from e

    def describe(self, dom: Any) -> tuple[DomainXml, str]:
        """The domain's live XML and its state name."""
        lv = self.api.libvirt
        try:
            state, _reason = dom.state(0)
            xml = parse_domain_xml(dom.XMLDesc(0))
        except lv.libvirtError as e:
            raise PrerequisiteError(f"libvirt at {self.uri}: {_err_text(e)}") from e
        return xml, state_name(state)

    def view(self, dom: Any) -> LibvirtDomainView:
        xml, state = self.describe(dom)
        pid = self.find_pid(xml.uuid, xml.name) if state in LIVE_STATES else 0
        return LibvirtDomainView(xml.name, xml.uuid, xml.runtime_id, state, pid, xml.taps)

    def domain_config(self, dom: Any) -> DomainConfig:
        """What xfgate needs to gate and introspect a running libvirt domain."""
        xml, state = self.describe(dom)
        return build_domain_config(self.uri, xml, state, self.find_pid, self.find_netns)


def build_domain_config(
    uri: str,
    xml: DomainXml,
    state: str,
    find_pid: Callable[[str, str], int],
    find_netns: Callable[[int], str],
) -> DomainConfig:
    """The DomainConfig of a libvirt domain (pure but for the two injected look-ups)."""
    if state not in LIVE_STATES:
        raise GuestNotRunning(
            xml.name, f"libvirt at {uri} says it is {state} (`virsh start {xml.name}`)"
        )
    pid = find_pid(xml.uuid, xml.name)
    if pid <= 0:
        raise GuestNotRunning(xml.name, f"libvirt says {state}, but no QEMU with -uuid {xml.uuid}")
    if not xml.taps:
        raise ConfigError(
            f"libvirt domain {xml.name} has no network interface with a host device "
            "(<interface><target dev=.../>): nothing to gate"
        )
    return DomainConfig(
        id=xml.runtime_id,
        name=xml.name,
        vifs=xml.taps,
        # The guest's RAM is the QEMU process's own anonymous memory (no share=on file).
        memory=MemoryConfig(backend="qemu-process", path=""),
        qmp=None,
        kernel=KernelConfig(xml.kernel.package, xml.kernel.release, xml.kernel.assets),
        netns=find_netns(pid),
        addresses=xml.addresses,
        libvirt=LibvirtConfig(uri=uri, uuid=xml.uuid, name=xml.name, pid=pid),
    )


# ---- the monitor ---------------------------------------------------------------------------------


class LibvirtMonitor:
    """The QEMU monitor of a libvirt domain, through libvirt (conforms to vmi.monitor.Monitor).

    libvirt has no per-call timeout: a monitor call waits for libvirt's job lock (its own
    bound, 30 s by default) and then fails with "cannot acquire state change lock", reported
    here as a busy monitor."""

    def __init__(self, uri: str, uuid: str, api: LibvirtApi | None = None) -> None:
        self.uri = uri
        self.uuid = uuid
        self._api = api
        self._host: LibvirtHost | None = None
        self._dom: Any = None
        self._open()  # an unknown UUID or a daemon that does not answer: an error now

    def _open(self) -> LibvirtHost:
        host = LibvirtHost(self.uri, self._api)
        dom = host.lookup(self.uuid)
        if dom is None:
            host.close()
            raise GuestNotRunning(self.uuid, f"libvirt at {self.uri} has no domain with this UUID")
        self._host, self._dom = host, dom
        return host

    @property
    def host(self) -> LibvirtHost:
        # Closed by a `with` block's end (as a QmpClient is): the next use connects again, so
        # one monitor object serves a backend for its whole life, like a QMP socket path does.
        return self._host if self._host is not None else self._open()

    @property
    def dom(self) -> Any:
        """The virDomain on the current connection."""
        _ = self.host
        return self._dom

    def __enter__(self) -> LibvirtMonitor:
        _ = self.host
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._host is not None:
            self._host.close()
            self._host = None

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        lv = self.host.api.libvirt
        try:
            return fn()
        except lv.libvirtError as e:
            code, text = e.get_error_code(), _err_text(e)
            if code == lv.VIR_ERR_OPERATION_INVALID or code == lv.VIR_ERR_NO_DOMAIN:
                raise GuestNotRunning(self.uuid, f"{what}: {text}") from e
            if code == lv.VIR_ERR_OPERATION_TIMEOUT or "state change lock" in text:
                raise QmpError(
                    f"{what}: the monitor of {self.uuid} is busy (libvirt holds it for another "
                    f"job): {text}"
                ) from e
            raise QmpError(f"{what} through libvirt at {self.host.uri}: {text}") from e

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        qemu = self.host.api.libvirt_qemu
        text = self._call(
            f"QMP {command}", lambda: qemu.qemuMonitorCommand(self.dom, json.dumps(msg), 0)
        )
        try:
            reply = json.loads(text)
        except (TypeError, ValueError) as e:
            raise QmpError(f"QMP {command}: libvirt returned no JSON: {str(text)[:200]!r}") from e
        if not isinstance(reply, dict):
            raise QmpError(f"QMP {command}: unexpected reply {reply!r:.200}")
        if "error" in reply:
            err = reply["error"]
            raise QmpError(
                f"QMP {command} refused: {err.get('desc', err) if isinstance(err, dict) else err}"
            )
        return reply.get("return")

    def human(self, command_line: str) -> str:
        qemu = self.host.api.libvirt_qemu
        out = self._call(
            f"HMP {command_line!r}",
            lambda: qemu.qemuMonitorCommand(self.dom, command_line, HMP_FLAG),
        )
        return str(out)

    def stop(self) -> None:
        self._call("suspend", self.dom.suspend)

    def cont(self) -> None:
        self._call("resume", self.dom.resume)

    def status(self) -> str:
        state, _reason = self._call("state", lambda: self.dom.state(0))
        return state_name(int(state))

    def is_running(self) -> bool:
        # BLOCKED is a running domain whose vCPUs wait on a resource: a pause must be undone.
        return self.status() in ("running", "blocked")

    def control_registers(self) -> ControlRegisters:
        return parse_control_registers(self.human("info registers"))
