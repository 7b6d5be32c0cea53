"""`xfgate-lab up | down | status`: the demo lab's life cycle. Orchestration only; the pieces
(assets, network, qemu, control channel) live in their own modules.

The lab's state (what it created: pids, names, kernel) is a JSON file in its run dir, written
before anything is created, so `down` can always find and remove a half-built lab.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xfgate.config import (
    DomainConfig,
    KernelConfig,
    MemoryConfig,
    QmpConfig,
    load_domains,
    save_domains,
)
from xfgate.errors import PrerequisiteError, XfgateError
from xfgate.vmi.profile_build import build_profile_files
from xfgate_lab import libvirt_lab
from xfgate_lab import namespaces as labnet
from xfgate_lab.assets import KernelAssets, ensure_assets, resolve_kernel_package
from xfgate_lab.crowd import Crowd, guest_ram_mb
from xfgate_lab.errors import LabError
from xfgate_lab.guest_channel import run_in_guest
from xfgate_lab.layout import (
    GUEST_RAM_MB,
    MAX_DOMAINS,
    LabLayout,
    cache_dir_from_env,
    guest_mac,
    guest_v4,
    guest_v6,
    vif_name,
)
from xfgate_lab.qemu import (
    DEFAULT_CPU,
    MEMORY_MODES,
    GuestSpec,
    check_cpu_model,
    is_our_qemu,
    start_qemu,
    stop_qemu,
)

Log = Callable[[str], None]
READY_MARK = "XFGATE-READY"
CROWD_FAILED_MARK = "XFGATE-CROWD-FAILED"
SERVICE_PORTS_V4 = (80, 8080, 8000)
SERVICE_PORT_V6 = 9000
REQUIRED_PROGRAMS = ("qemu-system-x86_64", "ip", "iptables", "apt-get", "dpkg-deb", "modinfo")
# Programs `up` does not need but a gate or a benchmark in the lab does -> who needs them.
OPTIONAL_PROGRAMS = {
    "iptables-legacy": "a gate (xfgate run)",
    "ipset": "a gate (xfgate run)",
    "conntrack": "a gate (xfgate run)",
    "httperf": "the benchmarks (python -m bench)",
}
DEFAULT_BOOT_TIMEOUT = 90.0
HYPERVISORS = ("qemu", "libvirt")  # qemu: the lab starts QEMU itself; libvirt: through libvirtd
# comm -> how many processes of the workload carry it (guest/init starts them).
WORKLOAD_COMMS = {"httpd": 3, "fastweb": 1, "spray": 1, "keeper": 1}
WORKLOAD_CHECK = "for c in " + " ".join(WORKLOAD_COMMS) + '; do echo "$c $(pidof $c)"; done'


# ---- prerequisites ---------------------------------------------------------------------------


def prerequisite_problems(euid: int, which: Callable[[str], str | None]) -> list[str]:
    """What is missing to run a lab, as actionable sentences (pure: inputs injected)."""
    problems = []
    if euid != 0:
        problems.append(
            "must run as root (the lab creates network namespaces, taps and /dev/shm files)"
        )
    missing = [p for p in REQUIRED_PROGRAMS if which(p) is None]
    if missing:
        problems.append(f"missing program(s): {', '.join(missing)}; run scripts/bootstrap.sh")
    return problems


def prerequisite_warnings(which: Callable[[str], str | None]) -> list[str]:
    """What the lab can do without but its users need (pure: inputs injected)."""
    return [
        f"{prog} not found: {needed_by} will not work in this lab; run scripts/bootstrap.sh"
        for prog, needed_by in OPTIONAL_PROGRAMS.items()
        if which(prog) is None
    ]


def check_prerequisites() -> list[str]:
    """The gate's contract (`xfgate.verdict.fastpath.check_prerequisites`): raise on what makes
    the lab impossible; return warnings for what makes it less useful."""
    problems = prerequisite_problems(os.geteuid(), shutil.which)
    if problems:
        raise PrerequisiteError("; ".join(problems))
    return prerequisite_warnings(shutil.which)


# ---- state -----------------------------------------------------------------------------------


@dataclass
class LabState:
    prefix: str
    domains: list[int]
    kernel_package: str = ""
    kernel_release: str = ""
    cpu: str = DEFAULT_CPU  # QEMU CPU model; `max` gives the guest 5-level paging (LA57)
    memory: str = "shared"  # guest RAM: shared file (qemu-shm) or anonymous (qemu-process)
    assets: str = ""
    phase: str = "starting"  # starting | up
    peers_pid: int = 0
    qemu_pids: dict[str, int] = field(default_factory=dict)  # JSON keys are strings
    domains_file: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    crowd: str = ""  # "TASKS,SOCKETS" each guest runs (`up --crowd`), "" for none
    ram_mb: int = GUEST_RAM_MB
    hypervisor: str = "qemu"  # qemu | libvirt
    daemon_pids: dict[str, int] = field(default_factory=dict)  # libvirt: libvirtd, virtlogd

    def qemu_pid(self, domain: int) -> int:
        return self.qemu_pids.get(str(domain), 0)


def read_state(layout: LabLayout) -> LabState | None:
    try:
        data = json.loads(layout.state_path.read_text())
        return LabState(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        raise LabError(
            f"lab state {layout.state_path} is unreadable ({e}): run `xfgate-lab down --force`"
        ) from e


def write_state(layout: LabLayout, state: LabState) -> None:
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = layout.state_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    os.replace(tmp, layout.state_path)


LOCK_ATTEMPTS = 100


@contextmanager
def lab_lock(layout: LabLayout) -> Iterator[None]:
    """One up/down at a time per lab (tests in parallel sessions share the default lab).

    The lock is a flock on the run dir itself, so no lock file outlives the lab: on release
    the holder removes the run dir if it is empty (what `down` leaves). A waiter may then hold
    a lock on a removed directory; it sees that the path no longer names the inode it locked
    and starts again on the new one, so two holders never overlap on the same lab.
    """
    for _ in range(LOCK_ATTEMPTS):
        layout.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(layout.run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:  # removed by a releasing holder between mkdir and open
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _names_same_inode(fd, layout.run_dir):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    else:
        raise LabError(
            f"could not lock {layout.run_dir}: it was removed and recreated "
            f"{LOCK_ATTEMPTS} times in a row (another process looping `lab up/down`?)"
        )
    try:
        yield
    finally:
        with suppress(OSError):  # not empty (the lab is up) or already gone: keep it
            layout.run_dir.rmdir()
        os.close(fd)


def _names_same_inode(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def clear_dir(path: Path) -> bool:
    """Removes what `path` contains (not `path` itself: it carries the lab's lock).
    True if there was anything."""
    try:
        entries = list(path.iterdir())
    except FileNotFoundError:
        return False
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return bool(entries)


# ---- processes we own ------------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def is_our_peers(pid: int, layout: LabLayout) -> bool:
    args = _cmdline(pid) if pid > 0 else []
    return "xfgate_lab.peers" in args and str(layout.peers_stats_path) in args


def find_lab_qemus(layout: LabLayout) -> dict[int, Path]:
    """qemu pid -> RAM file, for every qemu whose RAM file carries this lab's prefix or (with
    anonymous RAM) whose pidfile is in this lab's run dir (also finds orphans a crashed `up`
    never recorded)."""
    pattern = re.compile(r"mem-path=(/dev/shm/" + re.escape(layout.prefix) + r"-guest\d+\.mem),")
    pidfile = re.compile(re.escape(str(layout.run_dir)) + r"/guest(\d+)/qemu\.pid")
    found = {}
    for pid in _pids():
        args = _cmdline(pid)
        if args and args[0].endswith("qemu-system-x86_64"):
            for i, a in enumerate(args):
                m = pattern.search(a + ",") if "mem-path=" in a else None
                if m:
                    found[pid] = Path(m.group(1))
                p = pidfile.fullmatch(a) if i and args[i - 1] == "-pidfile" else None
                if p and pid not in found:
                    found[pid] = layout.ram_path(int(p.group(1)))
    return found


def is_lab_qemu(layout: LabLayout, domain: int, pid: int) -> bool:
    """pid is the lab's qemu of `domain` (either memory mode)."""
    return is_our_qemu(pid, layout.ram_path(domain), layout.pidfile(domain))


def guest_alive(layout: LabLayout, state: LabState, domain: int) -> bool:
    """The guest's QEMU runs (and is ours: a recycled pid is someone else's)."""
    pid = state.qemu_pid(domain)
    if state.hypervisor == "libvirt":
        return libvirt_lab.is_our_domain_qemu(pid, layout, domain)
    return is_lab_qemu(layout, domain, pid)


def find_lab_peers(layout: LabLayout) -> list[int]:
    return [pid for pid in _pids() if is_our_peers(pid, layout)]


def stop_pid(pid: int, still_ours: Callable[[int], bool], grace: float = 3.0) -> None:

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 3.0)):
        if not still_ours(pid):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and still_ours(pid):
            time.sleep(0.05)


def start_peers(layout: LabLayout) -> int:
    log = layout.peers_log_path.open("ab")
    argv = ["ip", "netns", "exec", layout.client_netns, sys.executable, "-m", "xfgate_lab.peers"]
    argv += ["workload", "--stats", str(layout.peers_stats_path)]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
        env=python_env(),
    )
    log.close()
    # `ip netns exec` execs the program: proc.pid is the peers process itself.
    return proc.pid


def read_peer_stats(layout: LabLayout) -> dict[str, Any]:
    try:
        data = json.loads(layout.peers_stats_path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ---- readiness -------------------------------------------------------------------------------


def serial_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no serial log)"
    return "\n".join(text.splitlines()[-lines:])


def python_env() -> dict[str, str]:
    """Environment for our own modules run as `python -m` inside a namespace: importable even
    from a checkout that is not installed."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{root}:{path}" if path else root}


def client_http_get(layout: LabLayout, host: str, port: int, timeout: float = 3.0) -> str | None:
    """Body of http://host:port/ fetched from inside the client netns, or None."""
    argv = [sys.executable, "-m", "xfgate_lab.peers", "http-get", host, str(port)]
    argv += ["--timeout", str(timeout)]
    try:
        r = subprocess.run(
            ["ip", "netns", "exec", layout.client_netns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout + 10,
            env=python_env(),
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None
    return r.stdout if r.returncode == 0 else None


def service_endpoints(domain: int) -> list[tuple[str, int]]:
    v4 = str(guest_v4(domain))
    return [(v4, p) for p in SERVICE_PORTS_V4] + [(str(guest_v6(domain)), SERVICE_PORT_V6)]


def wait_guest_ready(
    layout: LabLayout, domain: int, alive: Callable[[], bool], deadline: float, log: Log
) -> None:
    """Until the guest's init says READY and every service answers the client; bounded."""
    serial = layout.serial_log(domain)
    pending = service_endpoints(domain)
    ready_seen = False

    def fail(why: str) -> LabError:
        return LabError(f"guest{domain} {why}. Last lines of {serial}:\n{serial_tail(serial)}")

    while pending:
        if time.monotonic() > deadline:
            waiting = f"services {pending}" if ready_seen else "its init to say READY"
            raise fail(f"not ready in time (waiting for {waiting})")
        if not alive():
            raise fail("stopped: qemu exited (kernel panic or bad command line?)")
        if not ready_seen:
            text = ""
            with suppress(OSError):
                text = serial.read_text(errors="replace")
            if CROWD_FAILED_MARK in text:
                raise fail("could not start its crowd")
            ready_seen = READY_MARK in text
            if not ready_seen:
                time.sleep(0.2)
                continue
        host, port = pending[0]
        if client_http_get(layout, host, port, timeout=2.0) is not None:
            pending.pop(0)
        else:
            time.sleep(0.2)
    endpoints = ", ".join(f"{h}:{p}" for h, p in service_endpoints(domain))
    log(f"guest{domain}: services answering on {endpoints}")


# ---- domains file ----------------------------------------------------------------------------


def domain_config(
    layout: LabLayout, domain: int, qemu_pid: int, assets: KernelAssets, memory: str = "shared"
) -> DomainConfig:
    """The domains file entry of a lab guest. With anonymous RAM it is what an operator writes
    for a stock QEMU: backend qemu-process, the QMP socket, no RAM path and no vifs (xfgate
    asks QEMU for its taps)."""
    if memory == "anonymous":
        return DomainConfig(
            id=domain,
            name=f"guest{domain}",
            vifs=(),
            memory=MemoryConfig(backend="qemu-process", path=""),
            qmp=QmpConfig(socket=str(layout.qmp_socket(domain))),
            kernel=KernelConfig(
                package=assets.package, release=assets.release, assets=str(assets.dir)
            ),
            netns=layout.dom0_netns,
            addresses=(str(guest_v4(domain)), str(guest_v6(domain))),
        )
    return DomainConfig(
        id=domain,
        name=f"guest{domain}",
        vifs=(vif_name(domain),),
        memory=MemoryConfig(backend="qemu-shm", path=str(layout.ram_path(domain))),
        qmp=QmpConfig(socket=str(layout.qmp_socket(domain)), pid=qemu_pid),
        kernel=KernelConfig(package=assets.package, release=assets.release, assets=str(assets.dir)),
        netns=layout.dom0_netns,
        addresses=(str(guest_v4(domain)), str(guest_v6(domain))),
    )


def is_lab_domain(layout: LabLayout, dom: DomainConfig) -> bool:
    if dom.memory.backend == "qemu-process":
        return dom.qmp is not None and dom.qmp.socket.startswith(f"{layout.run_dir}/guest")
    return dom.memory.path.startswith(f"/dev/shm/{layout.prefix}-guest")


# ---- up / down / status ----------------------------------------------------------------------


@dataclass(frozen=True)
class UpResult:
    already_up: bool
    state: LabState
    domains: tuple[DomainConfig, ...]


def health_problems(
    layout: LabLayout,
    state: LabState,
    want_domains: int,
    want_package: str | None,
    want_cpu: str | None = None,
    want_memory: str | None = None,
    want_crowd: str = "",
    want_hypervisor: str | None = None,
) -> list[str]:
    """Why a recorded lab is not fully up as requested (empty list: healthy)."""
    problems = []
    if state.phase != "up":
        problems.append(f"the previous `lab up` did not finish (phase {state.phase})")
    if state.domains != list(range(1, want_domains + 1)):
        problems.append(f"it runs domains {state.domains}, {want_domains} requested")
    if want_package and want_package != state.kernel_package:
        problems.append(f"it runs {state.kernel_package}, {want_package} requested")
    if want_cpu and want_cpu != state.cpu:
        problems.append(f"its guests have CPU model {state.cpu}, {want_cpu} requested")
    if want_memory and want_memory != state.memory:
        problems.append(f"its guests have {state.memory} RAM, {want_memory} requested")
    if want_crowd != state.crowd:
        problems.append(
            f"its guests run crowd {state.crowd or 'none'}, {want_crowd or 'none'} requested"
        )
    if want_hypervisor and want_hypervisor != state.hypervisor:
        problems.append(f"its guests run under {state.hypervisor}, {want_hypervisor} requested")
    for name, pid in state.daemon_pids.items():
        if not libvirt_lab.is_our_daemon(pid, layout):
            problems.append(f"{name} (pid {pid}) is not running")
    for ns in (layout.dom0_netns, layout.client_netns):
        if not labnet.netns_exists(ns):
            problems.append(f"netns {ns} is gone")
    if not is_our_peers(state.peers_pid, layout):
        problems.append("the client peers process is gone")
    for d in state.domains:
        if not guest_alive(layout, state, d):
            problems.append(f"qemu of guest{d} (pid {state.qemu_pid(d)}) is not running")
    if problems:
        return problems
    # Liveness over the control channel, not the network: tests may well be dropping the
    # guest's packets on purpose, and that must not make `up` restart a shared lab.
    for d in state.domains:
        try:
            r = run_in_guest(layout.ctl_socket(d), layout.ctl_lock(d), WORKLOAD_CHECK, 10.0, d)
            missing = workload_missing(r.output.decode(errors="replace"))
        except XfgateError as e:
            problems.append(f"guest{d} does not answer on its control channel ({e})")
            continue
        if missing:
            problems.append(f"guest{d}'s workload lacks {', '.join(missing)}")
    return problems


def workload_missing(pidof_output: str) -> list[str]:
    """Workload processes absent from WORKLOAD_CHECK's output ("comm pid pid..." lines)."""
    counts = {}
    for line in pidof_output.splitlines():
        comm, *pids = line.split()
        counts[comm] = len(pids)
    return [
        f"{want - counts.get(comm, 0)} {comm}"
        for comm, want in WORKLOAD_COMMS.items()
        if counts.get(comm, 0) < want
    ]


def foreign_leftovers(layout: LabLayout) -> list[str]:
    names = [ns for ns in (layout.dom0_netns, layout.client_netns) if labnet.netns_exists(ns)]
    return [f"netns {ns}" for ns in names]


def lab_up(
    layout: LabLayout,
    domains: int = 1,
    kernel_package: str | None = None,
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
    force: bool = False,
    log: Log = print,
    cpu: str = DEFAULT_CPU,
    memory: str = "shared",
    crowd: Crowd | None = None,
    ram_mb: int | None = None,
    hypervisor: str = "qemu",
) -> UpResult:
    """Brings the lab up (or finds it healthy as requested). `cpu` is the guests' QEMU CPU
    model: the default keeps 4-level paging, `max` turns 5-level paging (LA57) on. `memory`
    "anonymous" starts the guests with QEMU's own RAM (no shared file), as stock QEMU does.
    `crowd` starts that many tasks and sockets in each guest (RAM sized to hold them, or
    `ram_mb`, refused with the size needed when that or the host's memory is too small).
    `hypervisor` libvirt runs the guests as libvirt domains (xfgate_lab/libvirt_lab.py)."""
    if hypervisor not in HYPERVISORS:
        raise LabError(f"--hypervisor must be one of {', '.join(HYPERVISORS)}, got {hypervisor}")
    if hypervisor == "libvirt" and (crowd is not None or ram_mb is not None):
        raise LabError("--crowd and --ram-mb are for --hypervisor qemu only")
    for warning in check_prerequisites():
        log(f"warning: {warning}")
    check_cpu_model(cpu)
    if memory not in MEMORY_MODES:
        raise LabError(f"--memory must be one of {', '.join(MEMORY_MODES)}, got {memory!r}")
    if not 1 <= domains <= MAX_DOMAINS:
        raise LabError(f"--domains must be 1..{MAX_DOMAINS}, got {domains}")
    ram = guest_ram_mb(crowd, ram_mb, host_available_mb() // domains)
    if crowd is not None:
        boot_timeout += crowd.boot_seconds()
    want_package = resolve_kernel_package(kernel_package, log) if kernel_package else None
    with lab_lock(layout):
        state = read_state(layout)
        if state is not None:
            problems = health_problems(
                layout,
                state,
                domains,
                want_package,
                cpu,
                memory,
                crowd.spec if crowd else "",
                hypervisor,
            )
            if state.ram_mb != ram:
                problems.append(f"its guests have {state.ram_mb} MiB of RAM, {ram} requested")
            if not problems:
                what = (
                    f"domains {state.domains}, {state.kernel_package}, CPU {state.cpu}, "
                    f"{state.memory} RAM"
                )
                log(f"lab {layout.prefix} already up: {what}")
                return UpResult(True, state, lab_domain_configs(layout, state))
            log(
                "lab is not fully up (" + "; ".join(problems) + "): tearing it down, starting again"
            )
            _down_locked(layout, force=True, log=log)
        else:
            leftovers = foreign_leftovers(layout)
            if leftovers and not force:
                raise LabError(
                    f"{', '.join(leftovers)} exist(s) but no lab state ({layout.state_path}): "
                    "not created by `xfgate-lab up`, or by a crashed one. Remove with "
                    f"`xfgate-lab down --force` (prefix {layout.prefix}) or pick another "
                    "lab with --prefix/$XFGATE_LAB_PREFIX"
                )
            if leftovers or find_lab_qemus(layout) or libvirt_lab.find_lab_daemons(layout):
                log("removing leftovers of an earlier lab")
                _down_locked(layout, force=True, log=log)
        guests = GuestSetup(cpu, crowd.spec if crowd else "", ram, memory)
        return _up_locked(
            layout, domains, want_package or kernel_package, boot_timeout, log, guests, hypervisor
        )


def lab_domain_configs(layout: LabLayout, state: LabState) -> tuple[DomainConfig, ...]:
    """The lab's domains as recorded in the domains file it was brought up with (not the one
    $XFGATE_DOMAINS names now: a caller may point it elsewhere); a libvirt lab's, as its
    libvirt shows them."""
    if state.hypervisor == "libvirt":
        return libvirt_lab.domain_configs(layout, state.domains)
    known = load_domains(Path(state.domains_file) if state.domains_file else layout.domains_path)
    return tuple(known[d] for d in state.domains if d in known and is_lab_domain(layout, known[d]))


def _up_locked(
    layout: LabLayout,
    domains: int,
    package: str | None,
    boot_timeout: float,
    log: Log,
    guests: GuestSetup,
    hypervisor: str = "qemu",
) -> UpResult:
    """Assets, then network and peers, guests, profile, readiness, the domains file: each a
    named step; any failure tears down what was started."""
    t0 = time.monotonic()
    assets = ensure_assets(package, log)
    t_assets = time.monotonic()
    state = _new_state(layout, domains, assets, guests)
    state.hypervisor = hypervisor
    write_state(layout, state)
    try:
        _start_network_and_peers(layout, state)
        if hypervisor == "libvirt":
            state.daemon_pids = libvirt_lab.start_daemons(layout, log)
            write_state(layout, state)
        for d in state.domains:
            _start_guest(layout, state, d, assets, guests, log)
        t_started = time.monotonic()
        _build_profile(assets, log)
        _wait_guests_ready(layout, state, t_started + boot_timeout, log)
        t_ready = time.monotonic()
    except BaseException:
        log("lab up failed: tearing down what was started")
        _down_locked(layout, force=True, log=lambda _m: None)
        raise
    if hypervisor == "libvirt":
        configs = libvirt_lab.domain_configs(layout, state.domains)
    else:
        configs = _record_domains(layout, state, assets)
    state.phase = "up"
    state.timings = {
        "assets_s": round(t_assets - t0, 2),
        "start_to_ready_s": round(t_ready - t_assets, 2),
        "qemu_to_ready_s": round(t_ready - t_started, 2),
        "total_s": round(time.monotonic() - t0, 2),
    }
    write_state(layout, state)
    log(
        f"lab {layout.prefix} up in {state.timings['total_s']:.1f} s "
        f"(assets {state.timings['assets_s']:.1f} s, network+boot+services "
        f"{state.timings['start_to_ready_s']:.1f} s); "
        + (
            f"libvirt {libvirt_lab.libvirt_uri(layout)}"
            if hypervisor == "libvirt"
            else f"domains file {layout.domains_path}"
        )
    )
    return UpResult(False, state, configs)


@dataclass(frozen=True)
class GuestSetup:
    """What every guest of one `up` is given: CPU model, crowd ("" none), RAM size and kind."""

    cpu: str = DEFAULT_CPU
    crowd: str = ""
    ram_mb: int = GUEST_RAM_MB
    memory: str = "shared"  # or "anonymous": QEMU's own RAM, read by the qemu-process backend


def host_available_mb() -> int:
    """MemAvailable of the host, MiB (0 when unreadable: then any size is refused)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _new_state(
    layout: LabLayout, domains: int, assets: KernelAssets, guests: GuestSetup
) -> LabState:
    """A fresh run dir holding the state of a lab that is starting."""
    state = LabState(
        prefix=layout.prefix,
        domains=list(range(1, domains + 1)),
        kernel_package=assets.package,
        kernel_release=assets.release,
        assets=str(assets.dir),
        cpu=guests.cpu,
        memory=guests.memory,
        domains_file=str(layout.domains_path),
        crowd=guests.crowd,
        ram_mb=guests.ram_mb,
    )
    clear_dir(layout.run_dir)
    write_state(layout, state)
    return state


def _start_network_and_peers(layout: LabLayout, state: LabState) -> None:
    labnet.create_network(layout)
    state.peers_pid = start_peers(layout)
    write_state(layout, state)


def guest_spec(
    layout: LabLayout, domain: int, assets: KernelAssets, guests: GuestSetup
) -> GuestSpec:
    return GuestSpec(
        domain=domain,
        kernel=assets.vmlinuz,
        initrd=assets.initramfs,
        ram_path=layout.ram_path(domain),
        ram_mb=guests.ram_mb,
        vif=vif_name(domain),
        mac=guest_mac(domain),
        serial_log=layout.serial_log(domain),
        ctl_socket=layout.ctl_socket(domain),
        qmp_socket=layout.qmp_socket(domain),
        pidfile=layout.pidfile(domain),
        cpu=guests.cpu,
        memory=guests.memory,
        crowd=guests.crowd,
    )


def _start_guest(
    layout: LabLayout,
    state: LabState,
    domain: int,
    assets: KernelAssets,
    guests: GuestSetup,
    log: Log,
) -> None:
    """The guest's tap on the bridge and its QEMU, recorded in the state at once."""
    layout.guest_dir(domain).mkdir(parents=True, exist_ok=True)
    if state.hypervisor == "libvirt":
        state.qemu_pids[str(domain)] = libvirt_lab.start_domain(layout, domain, assets, guests.cpu)
        write_state(layout, state)
        log(f"guest{domain}: libvirt domain, qemu pid {state.qemu_pid(domain)}, CPU {guests.cpu}")
        return
    layout.ram_path(domain).unlink(missing_ok=True)
    labnet.add_vif(layout, vif_name(domain))
    spec = guest_spec(layout, domain, assets, guests)
    state.qemu_pids[str(domain)] = start_qemu(spec, layout.dom0_netns)
    write_state(layout, state)
    crowd = f", crowd {guests.crowd}" if guests.crowd else ""
    log(
        f"guest{domain}: qemu pid {state.qemu_pid(domain)}, CPU {guests.cpu}, "
        f"{guests.ram_mb} MiB {guests.memory} RAM{crowd}, booting {assets.release}"
    )


def _build_profile(assets: KernelAssets, log: Log) -> None:
    """The introspection profile of this kernel (BTF + kallsyms, ~5 s once per kernel build,
    then cached): built on the other core while the guests boot under TCG, so that the first
    `xfgate ps` or gate start does not pay for it."""
    built = build_profile_files(assets.dir, cache_dir_from_env())
    log(f"profile {built.profile_path.name} ({'cached' if built.from_cache else 'built'})")


def _wait_guests_ready(layout: LabLayout, state: LabState, deadline: float, log: Log) -> None:
    for d in state.domains:
        wait_guest_ready(layout, d, _alive_check(layout, state, d), deadline, log)


def _alive_check(layout: LabLayout, state: LabState, domain: int) -> Callable[[], bool]:
    return lambda: guest_alive(layout, state, domain)


def _record_domains(
    layout: LabLayout, state: LabState, assets: KernelAssets
) -> tuple[DomainConfig, ...]:
    """Writes the lab's domains into the domains file, keeping every domain not of this lab."""
    configs = tuple(
        domain_config(layout, d, state.qemu_pid(d), assets, state.memory) for d in state.domains
    )
    known = {
        k: v for k, v in load_domains(layout.domains_path).items() if not is_lab_domain(layout, v)
    }
    known.update({c.id: c for c in configs})
    save_domains(known, layout.domains_path)
    return configs


def lab_down(layout: LabLayout, force: bool = False, log: Log = print) -> list[str]:
    with lab_lock(layout):
        return _down_locked(layout, force, log)


def _down_locked(layout: LabLayout, force: bool, log: Log) -> list[str]:
    """Removes everything the lab may have created; returns what it removed. Idempotent."""
    state = read_state(layout) if layout.state_path.exists() else None
    removed: list[str] = []
    if state is None and not force:
        leftovers = foreign_leftovers(layout)
        if leftovers:
            raise LabError(
                f"{', '.join(leftovers)} exist(s) but no lab state ({layout.state_path}): "
                "refusing to delete what this lab did not record; use `xfgate-lab down --force`"
            )
    removed += libvirt_lab.down(layout, state.domains if state else [], stop_pid)
    qemus = find_lab_qemus(layout)
    if state is not None:
        for d in state.domains:
            pid = state.qemu_pid(d)
            if pid and is_lab_qemu(layout, d, pid):
                qemus[pid] = layout.ram_path(d)
    for pid, ram in sorted(qemus.items()):
        pidfile = layout.pidfile(int(ram.stem.rsplit("guest", 1)[1]))
        if stop_qemu(pid, ram, pidfile=pidfile):
            removed.append(f"qemu pid {pid}")
    peers = set(find_lab_peers(layout))
    if state is not None and is_our_peers(state.peers_pid, layout):
        peers.add(state.peers_pid)
    for pid in sorted(peers):
        stop_pid(pid, lambda p: is_our_peers(p, layout))
        removed.append(f"peers pid {pid}")
    for ns in (layout.dom0_netns, layout.client_netns):
        if labnet.delete_netns(ns):
            removed.append(f"netns {ns}")
    for ram in sorted(Path("/dev/shm").glob(f"{layout.prefix}-guest*.mem")):
        ram.unlink(missing_ok=True)
        removed.append(str(ram))
    domains_file = Path(state.domains_file) if state and state.domains_file else None
    for path in {domains_file or layout.domains_path, layout.domains_path}:
        known = load_domains(path)
        ours = [k for k, v in known.items() if is_lab_domain(layout, v)]
        if ours:
            save_domains({k: v for k, v in known.items() if k not in ours}, path)
            removed.append(f"domains {ours} from {path}")
    if clear_dir(layout.run_dir):
        removed.append(str(layout.run_dir))
    if layout.legacy_lock_path.exists():  # left by versions that locked a file beside run_dir
        layout.legacy_lock_path.unlink(missing_ok=True)
        removed.append(str(layout.legacy_lock_path))
    log(f"lab {layout.prefix} down" + (f": removed {', '.join(removed)}" if removed else ""))
    return removed


def lab_status(layout: LabLayout) -> dict[str, Any]:
    """What is up, for `lab status` (text and --json)."""
    state = read_state(layout)
    netns = {ns: labnet.netns_exists(ns) for ns in (layout.dom0_netns, layout.client_netns)}
    if state is None:
        return {
            "prefix": layout.prefix,
            "status": "down" if not any(netns.values()) else "foreign",
            "netns": netns,
            "domains": [],
        }
    domains = []
    for d in state.domains:
        pid = state.qemu_pid(d)
        domains.append(
            {
                "id": d,
                "name": f"guest{d}",
                "qemu_pid": pid,
                "running": guest_alive(layout, state, d),
                "vif": vif_name(d) if state.hypervisor == "qemu" else "(libvirt's vnetN)",
                "addresses": [str(guest_v4(d)), str(guest_v6(d))],
                "ram": str(layout.ram_path(d)) if state.memory == "shared" else "anonymous",
                "qmp": str(layout.qmp_socket(d)),
                "serial_log": str(layout.serial_log(d)),
            }
        )
    healthy = (
        state.phase == "up"
        and all(netns.values())
        and is_our_peers(state.peers_pid, layout)
        and all(x["running"] for x in domains)
    )
    return {
        "prefix": layout.prefix,
        "status": "up" if healthy else "broken",
        "phase": state.phase,
        "kernel_package": state.kernel_package,
        "kernel_release": state.kernel_release,
        "cpu": state.cpu,
        "memory": state.memory,
        "hypervisor": state.hypervisor,
        "libvirt_uri": libvirt_lab.libvirt_uri(layout) if state.hypervisor == "libvirt" else "",
        "daemon_pids": state.daemon_pids,
        "assets": state.assets,
        "netns": netns,
        "peers_pid": state.peers_pid,
        "peers_running": is_our_peers(state.peers_pid, layout),
        "peer_stats": read_peer_stats(layout),
        "domains_file": state.domains_file,
        "domains": domains,
        "timings": state.timings,
    }


def lab_domain_ids(layout: LabLayout) -> Sequence[int]:
    state = read_state(layout)
    return state.domains if state else []
