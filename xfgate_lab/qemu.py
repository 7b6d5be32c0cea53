"""QEMU for a lab guest: the command line (pure), starting it daemonized, stopping it by pid."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from xfgate.errors import ConfigError, PrerequisiteError
from xfgate_lab.errors import LabError

QEMU = "qemu-system-x86_64"
# QEMU's own default model for `pc` (4-level paging). `max` enables everything TCG can
# emulate, LA57 included: a stock Debian kernel then runs with 5-level paging.
DEFAULT_CPU = "qemu64"
# Guest RAM: "shared" is a memory-backend-file share=on in /dev/shm (the qemu-shm backend reads
# the file); "anonymous" is plain `-m` (QEMU's own anonymous memory, as operators run guests:
# the qemu-process backend reads it from the QEMU process).
MEMORY_MODES = ("shared", "anonymous")
_CPU_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class GuestSpec:
    """Everything that differs between two lab guests' command lines."""

    domain: int
    kernel: Path
    initrd: Path
    ram_path: Path
    ram_mb: int
    vif: str
    mac: str
    serial_log: Path
    ctl_socket: Path
    qmp_socket: Path
    pidfile: Path
    cpu: str = DEFAULT_CPU
    memory: str = "shared"
    crowd: str = ""  # "TASKS,SOCKETS": the guest's init starts that crowd (xfgate_lab.crowd)


def kernel_append(domain: int, crowd: str = "") -> str:
    # KASLR stays on (Debian's default): no nokaslr. panic=-1 + -no-reboot: a panic stops qemu.
    line = f"console=ttyS0 panic=-1 loglevel=4 xfgate.domain={domain}"
    return f"{line} xfgate.crowd={crowd}" if crowd else line


def qemu_argv(spec: GuestSpec) -> list[str]:
    """The qemu command line. RAM is a shared file (file offset = guest physical address) or,
    with memory "anonymous", QEMU's own memory as a stock QEMU has it."""
    size = f"{spec.ram_mb}M"
    if spec.memory == "shared":
        ram = [
            "-object", f"memory-backend-file,id=mem,size={size},mem-path={spec.ram_path},share=on",
            "-machine", "pc,memory-backend=mem",
        ]  # fmt: skip
    elif spec.memory == "anonymous":
        ram = ["-machine", "pc"]
    else:
        raise ConfigError(f"guest memory {spec.memory!r} unknown (one of {MEMORY_MODES})")
    return [
        QEMU,
        "-name", f"guest{spec.domain}",
        "-accel", "tcg",  # KVM-PVM on these hosts hangs a stock kernel
        "-cpu", check_cpu_model(spec.cpu),
        "-smp", "1",
        "-m", size,
        *ram,
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", kernel_append(spec.domain, spec.crowd),
        "-netdev", f"tap,id=n0,ifname={spec.vif},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=n0,mac={spec.mac}",
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        "-serial", f"file:{spec.serial_log}",
        # Second UART: the lab-only control channel (/dev/ttyS1 in the guest).
        "-serial", f"unix:{spec.ctl_socket},server=on,wait=off",
        "-qmp", f"unix:{spec.qmp_socket},server=on,wait=off",
        "-no-reboot",
        "-daemonize",
        "-pidfile", str(spec.pidfile),
    ]  # fmt: skip


def check_cpu_model(cpu: str) -> str:
    """A QEMU CPU model name (no feature list: `+la57` style flags are not offered)."""
    if not _CPU_RE.match(cpu):
        raise ConfigError(
            f"CPU model {cpu!r} invalid: a QEMU model name such as {DEFAULT_CPU} or max "
            "(see `qemu-system-x86_64 -cpu help`)"
        )
    return cpu


def start_qemu(spec: GuestSpec, netns: str, timeout: float = 30.0) -> int:
    """Starts qemu inside ``netns`` (where its tap is) and returns its pid."""
    argv = ["ip", "netns", "exec", netns, *qemu_argv(spec)]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise PrerequisiteError(f"{e.filename} not found: run scripts/bootstrap.sh") from e
    except subprocess.TimeoutExpired as e:
        raise LabError(f"qemu for guest{spec.domain} did not daemonize in {timeout:.0f} s") from e
    if r.returncode != 0:
        raise LabError(f"qemu for guest{spec.domain} failed to start:\n{r.stderr.strip()[-2000:]}")
    try:
        return int(spec.pidfile.read_text().strip())
    except (OSError, ValueError) as e:
        raise LabError(f"qemu started but its pidfile {spec.pidfile} is unreadable: {e}") from e


def is_our_qemu(pid: int, ram_path: Path, pidfile: Path | None = None) -> bool:
    """pid is alive and is the qemu using ram_path, or (anonymous RAM) writing `pidfile`
    (a recycled pid is someone else's)."""
    if pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if QEMU.encode() not in cmdline:
        return False
    if f"mem-path={ram_path},".encode() in cmdline:
        return True
    return pidfile is not None and f"\0-pidfile\0{pidfile}\0".encode() in cmdline


def stop_qemu(pid: int, ram_path: Path, grace: float = 5.0, pidfile: Path | None = None) -> bool:
    """SIGTERM, then SIGKILL after ``grace`` s. False if pid was not our qemu (left alone)."""
    if not is_our_qemu(pid, ram_path, pidfile):
        return False
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not is_our_qemu(pid, ram_path, pidfile):
                return True
            time.sleep(0.05)
    raise LabError(f"qemu pid {pid} survived SIGKILL (stuck in the kernel?)")
