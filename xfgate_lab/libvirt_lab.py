"""The lab's guests under libvirt (`xfgate-lab up --hypervisor libvirt`): the lab's own libvirt
daemon and its TCG domains `guest1`, `guest2`, ...

No systemd: `up` runs libvirtd (and virtlogd, which libvirt's QEMU driver logs through) itself,
daemonized inside the lab's dom0 network namespace (`nsenter --net`, so the taps libvirt creates,
`vnetN`, are on the lab bridge and have no route out), its sockets in the lab's run dir (the URI
is `qemu:///system?socket=RUN_DIR/libvirt/libvirt-sock`). Its pid files are in the run dir too,
and `down` stops both by pid. The domains are transient (`virDomainCreateXML`): nothing is
written to /etc/libvirt, and destroying one removes it. Their RAM is QEMU's own anonymous memory
(no memory-backend-file): the domains are found through libvirt, never written into the domains
file.

libvirt keeps the state of a privileged daemon in fixed places (/run/libvirt/qemu,
/var/lib/libvirt/qemu, /var/log/libvirt/qemu): one libvirt lab at a time per host, and none
while the host's own libvirt daemon runs. `up` checks both.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

from xfgate.config import DomainConfig
from xfgate.errors import XfgateError
from xfgate.hypervisor.libvirt import LibvirtHost, find_qemu_pid, is_qemu_of
from xfgate.hypervisor.libvirt_xml import KernelMetadata, metadata_xml
from xfgate_lab.assets import KernelAssets
from xfgate_lab.errors import LabError
from xfgate_lab.layout import (
    BRIDGE,
    GUEST_RAM_MB,
    MAX_DOMAINS,
    LabLayout,
    guest_mac,
    guest_v4,
    guest_v6,
)
from xfgate_lab.qemu import QEMU, check_cpu_model, kernel_append

Log = Callable[[str], None]
LIBVIRTD = "/usr/sbin/libvirtd"
VIRTLOGD = "/usr/sbin/virtlogd"
UUID_NAMESPACE = uuid.UUID("3b5bb1c6-5d1f-4c55-9d0a-7f0b7c1c2a10")
DAEMON_START_TIMEOUT = 20.0
LIBVIRT_LOG_DIR = Path("/var/log/libvirt/qemu")
LIBVIRT_RUN_DIR = Path("/run/libvirt")
# libvirt's QEMU driver probes QEMU's capabilities with a QEMU of its own, daemonized with its pid
# file in a private dir of the driver's libDir (src/qemu/qemu_process.c, qemuProcessQMPInit:
# "<libDir>/qmp-XXXXXX/qmp.pid"); a libvirtd killed while probing leaves it running.
LIBVIRT_QEMU_LIB_DIR = Path("/var/lib/libvirt/qemu")


def libvirt_dir(layout: LabLayout) -> Path:
    return layout.run_dir / "libvirt"


def libvirt_uri(layout: LabLayout) -> str:
    return f"qemu:///system?socket={libvirt_dir(layout) / 'libvirt-sock'}"


def domain_name(domain: int) -> str:
    return f"guest{domain}"


def domain_uuid(layout: LabLayout, domain: int) -> str:
    """Stable per lab and guest: `down` finds a crashed `up`'s QEMU by it."""
    return str(uuid.uuid5(UUID_NAMESPACE, f"{layout.prefix}/guest{domain}"))


def daemon_config(layout: LabLayout) -> str:
    d = libvirt_dir(layout)
    return "\n".join(
        [
            f'unix_sock_dir = "{d}"',
            'unix_sock_group = "root"',
            'unix_sock_ro_perms = "0700"',
            'unix_sock_rw_perms = "0700"',
            'auth_unix_ro = "none"',
            'auth_unix_rw = "none"',
            f'log_outputs = "3:file:{d / "libvirtd.log"}"',
            "",
        ]
    )


def domain_xml(layout: LabLayout, domain: int, assets: KernelAssets, cpu: str) -> str:
    """A transient TCG domain: the demo kernel + initramfs, a virtio NIC on the lab bridge, the
    console to a file and the lab's control channel on a second UART (unix socket). QEMU runs
    as root with no relabelling, so the shared kernel cache is never chowned."""
    addresses = (str(guest_v4(domain)), str(guest_v6(domain)))
    meta = metadata_xml(KernelMetadata(assets.package, assets.release, str(assets.dir)), addresses)
    return f"""<domain type='qemu'>
  <name>{domain_name(domain)}</name>
  <uuid>{domain_uuid(layout, domain)}</uuid>
  <metadata>{meta}</metadata>
  <memory unit='MiB'>{GUEST_RAM_MB}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{assets.vmlinuz}</kernel>
    <initrd>{assets.initramfs}</initrd>
    <cmdline>{kernel_append(domain)}</cmdline>
  </os>
  <cpu mode='custom' match='exact' check='none'>
    <model fallback='forbid'>{check_cpu_model(cpu)}</model>
  </cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
  <devices>
    <emulator>/usr/bin/{QEMU}</emulator>
    <interface type='bridge'>
      <source bridge='{BRIDGE}'/>
      <mac address='{guest_mac(domain)}'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='{layout.serial_log(domain)}'/><target port='0'/>
    </serial>
    <serial type='unix'>
      <source mode='bind' path='{layout.ctl_socket(domain)}'/><target port='1'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


# ---- daemons -------------------------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_our_daemon(pid: int, layout: LabLayout) -> bool:
    """pid runs libvirtd or virtlogd with this lab's pid file (a recycled pid is not ours)."""
    args = _cmdline(pid) if pid > 0 else []
    return (
        bool(args)
        and Path(args[0]).name in ("libvirtd", "virtlogd")
        and any(a.startswith(str(libvirt_dir(layout))) for a in args)
    )


def foreign_daemons(layout: LabLayout) -> list[str]:
    """libvirt daemons on this host that are not this lab's: they share libvirt's fixed state
    directories with ours."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        args = _cmdline(int(entry))
        name = Path(args[0]).name if args else ""
        if name in ("libvirtd", "virtqemud", "virtlogd") and not is_our_daemon(int(entry), layout):
            found.append(f"{Path(args[0]).name} pid {entry}")
    return found


def _read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def start_daemons(layout: LabLayout, log: Log) -> dict[str, int]:
    """virtlogd and libvirtd, daemonized in the dom0 netns; their pids, once libvirt answers."""
    foreign = foreign_daemons(layout)
    if foreign:
        raise LabError(
            f"another libvirt runs on this host ({', '.join(foreign)}): libvirt keeps a system "
            "daemon's state in fixed directories, so the libvirt lab needs the host to itself"
        )
    for prog in (LIBVIRTD, VIRTLOGD):
        if not Path(prog).exists():
            raise LabError(f"{prog} not found: run scripts/bootstrap.sh (libvirt-daemon-system)")
    d = libvirt_dir(layout)
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "libvirtd.conf"
    conf.write_text(daemon_config(layout))
    netns = f"--net=/run/netns/{layout.dom0_netns}"
    pids = {}
    for name, argv in (
        ("virtlogd", [VIRTLOGD, "-d", "-p", str(d / "virtlogd.pid")]),
        ("libvirtd", [LIBVIRTD, "-d", "-f", str(conf), "-p", str(d / "libvirtd.pid")]),
    ):
        r = subprocess.run(
            ["nsenter", netns, *argv], capture_output=True, text=True, timeout=30, check=False
        )
        if r.returncode != 0:
            raise LabError(f"{name} did not start: {r.stderr.strip()[-1000:]}")
        pids[name] = _wait_pid(d / f"{name}.pid", name)
    _wait_libvirt(layout)
    log(f"libvirt daemons up in netns {layout.dom0_netns}: {pids}; URI {libvirt_uri(layout)}")
    return pids


def _wait_pid(path: Path, name: str) -> int:
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    while time.monotonic() < deadline:
        pid = _read_pid(path)
        if pid:
            return pid
        time.sleep(0.1)
    raise LabError(f"{name} wrote no pid file {path} within {DAEMON_START_TIMEOUT:.0f} s")


def _wait_libvirt(layout: LabLayout) -> None:
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with LibvirtHost(libvirt_uri(layout)) as host:
                host.all_domains()
                return
        except Exception as e:
            last = e
            time.sleep(0.2)
    tail = (
        (libvirt_dir(layout) / "libvirtd.log").read_text(errors="replace")[-1500:]
        if (libvirt_dir(layout) / "libvirtd.log").exists()
        else ""
    )
    raise LabError(f"libvirtd does not answer at {libvirt_uri(layout)}: {last}\n{tail}")


# ---- domains -------------------------------------------------------------------------------------


def start_domain(layout: LabLayout, domain: int, assets: KernelAssets, cpu: str) -> int:
    """Creates the transient domain; its QEMU pid."""
    layout.guest_dir(domain).mkdir(parents=True, exist_ok=True)
    xml = domain_xml(layout, domain, assets, cpu)
    ET.fromstring(xml)  # ours: a syntax error is a bug here, not a libvirt message later
    with LibvirtHost(libvirt_uri(layout)) as host:
        try:
            host.conn.createXML(xml, 0)
        except host.api.libvirt.libvirtError as e:
            raise LabError(f"libvirt refused guest{domain}: {e}") from e
    pid = find_qemu_pid(domain_uuid(layout, domain), domain_name(domain))
    if not pid:
        raise LabError(f"guest{domain} was created but no QEMU with its UUID runs")
    return pid


def is_our_domain_qemu(pid: int, layout: LabLayout, domain: int) -> bool:
    return pid > 0 and is_qemu_of(_cmdline(pid), domain_uuid(layout, domain))


def our_uuids(layout: LabLayout) -> dict[str, int]:
    return {domain_uuid(layout, d): d for d in range(1, MAX_DOMAINS + 1)}


def find_lab_daemons(layout: LabLayout) -> dict[int, str]:
    """pid -> name of every libvirtd/virtlogd of this lab (also a crashed `up`'s)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and is_our_daemon(int(entry), layout):
            found[int(entry)] = Path(_cmdline(int(entry))[0]).name
    return found


def find_lab_qemus(layout: LabLayout) -> dict[int, int]:
    """pid -> guest number of every QEMU started for this lab's domains (one /proc scan)."""
    uuids = our_uuids(layout)
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        args = _cmdline(int(entry))
        if not args or "qemu" not in Path(args[0]).name:
            continue
        for flag, value in itertools.pairwise(args):
            if flag == "-uuid" and value.lower() in uuids:
                found[int(entry)] = uuids[value.lower()]
    return found


def is_capability_probe(args: list[str]) -> bool:
    """args (a command line) are libvirt's capability-probing QEMU: `-machine none` and a pid
    file in a `qmp-*` dir of the system driver's libDir."""
    if not args or "qemu" not in Path(args[0]).name:
        return False
    pidfile = next((v for f, v in itertools.pairwise(args) if f == "-pidfile"), "")
    machine = next((v for f, v in itertools.pairwise(args) if f == "-machine"), "")
    path = Path(pidfile)
    return (
        machine.split(",")[0] == "none"
        and path.name == "qmp.pid"
        and path.parent.name.startswith("qmp-")
        and path.parent.parent == LIBVIRT_QEMU_LIB_DIR
    )


def find_capability_probes() -> list[int]:
    """pids of libvirt capability-probing QEMUs (anyone's: call only when no foreign daemon
    runs, since the lab shares the system driver's directories)."""
    return [
        int(e) for e in os.listdir("/proc") if e.isdigit() and is_capability_probe(_cmdline(int(e)))
    ]


def domain_configs(layout: LabLayout, domains: list[int]) -> tuple[DomainConfig, ...]:
    """The lab's domains as xfgate finds them through libvirt."""
    with LibvirtHost(libvirt_uri(layout)) as host:
        out = []
        for d in domains:
            dom = host.lookup(domain_uuid(layout, d))
            if dom is None:
                raise LabError(f"libvirt at {libvirt_uri(layout)} has no guest{d}")
            out.append(host.domain_config(dom))
    return tuple(out)


def down(
    layout: LabLayout, domains: list[int], stop: Callable[[int, Callable[[int], bool]], None]
) -> list[str]:
    """Everything libvirt-side a libvirt lab may have left: its domains (destroyed through its
    daemon), their QEMUs (by pid if the daemon is gone), the daemons, libvirt's domain logs."""
    daemons = find_lab_daemons(layout)
    removed: list[str] = []
    uuids = our_uuids(layout)
    seen = set(domains)
    if any(name == "libvirtd" for name in daemons.values()):
        try:
            with LibvirtHost(libvirt_uri(layout)) as host:
                for dom in host.all_domains():
                    d = uuids.get(dom.UUIDString().lower())
                    if d is None:
                        continue
                    seen.add(d)
                    try:
                        # A transient domain is gone once destroyed: ask first.
                        persistent = dom.isPersistent()  # a test's defined, shut-off domain
                        if dom.isActive():
                            dom.destroy()
                        if persistent:
                            dom.undefine()
                        removed.append(f"libvirt domain {domain_name(d)}")
                    except host.api.libvirt.libvirtError as e:  # its QEMU is stopped by pid
                        removed.append(f"libvirt domain {domain_name(d)} (destroy: {e})")
        except XfgateError:
            pass  # a daemon that does not answer: its QEMUs are stopped by pid below
    for pid, d in sorted(find_lab_qemus(layout).items()):
        stop(pid, _qemu_check(layout, d))
        removed.append(f"qemu pid {pid} (guest{d})")
        seen.add(d)
    for pid, name in sorted(daemons.items(), key=lambda x: x[1] != "libvirtd"):
        stop(pid, lambda p: is_our_daemon(p, layout))
        removed.append(f"{name} pid {pid}")
    if libvirt_dir(layout).exists() and not foreign_daemons(layout):
        # Left by a libvirtd of ours that died while probing (this lab ran libvirt and no other
        # libvirt daemon runs on the host: the probe is ours).
        for pid in find_capability_probes():
            stop(pid, lambda p: is_capability_probe(_cmdline(p)))
            removed.append(f"qemu pid {pid} (libvirt capability probe)")
    if daemons or seen:
        removed += remove_domain_logs(sorted(seen))
    if daemons and not foreign_daemons(layout) and LIBVIRT_RUN_DIR.exists():
        # The runtime dir of daemons none of which runs any more (ours created it; the next
        # daemon recreates it). /var/lib/libvirt and /var/cache/libvirt are the package's.
        shutil.rmtree(LIBVIRT_RUN_DIR, ignore_errors=True)
        removed.append(str(LIBVIRT_RUN_DIR))
    return removed


def _qemu_check(layout: LabLayout, domain: int) -> Callable[[int], bool]:
    return lambda pid: is_our_domain_qemu(pid, layout, domain)


def remove_domain_logs(domains: list[int]) -> list[str]:
    """libvirt's per-domain QEMU logs (a fixed directory for a system daemon)."""
    removed = []
    for d in domains:
        path = LIBVIRT_LOG_DIR / f"{domain_name(d)}.log"
        if path.exists():
            path.unlink(missing_ok=True)
            removed.append(str(path))
    return removed
