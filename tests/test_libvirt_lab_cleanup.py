"""The libvirt lab's `down` stops a capability-probing QEMU that a libvirtd killed while probing
leaves behind (found once by hand on this host), and nothing else."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from xfgate_lab import libvirt_lab
from xfgate_lab.lab import stop_pid
from xfgate_lab.qemu import QEMU

PROBE = ["-S", "-no-user-config", "-nodefaults", "-nographic", "-machine", "none,accel=tcg"]


def test_capability_probe_is_recognised_by_its_command_line() -> None:
    lib = libvirt_lab.LIBVIRT_QEMU_LIB_DIR
    probe = ["/usr/bin/qemu-system-x86_64", *PROBE, "-pidfile", f"{lib}/qmp-a1B2c3/qmp.pid"]
    assert libvirt_lab.is_capability_probe(probe)
    # A guest's QEMU, a pid file elsewhere, another program: not a probe.
    assert not libvirt_lab.is_capability_probe(
        [probe[0], "-machine", "pc", "-pidfile", f"{lib}/qmp-a1B2c3/qmp.pid"]
    )
    assert not libvirt_lab.is_capability_probe([*probe[:-1], "/tmp/qmp-a1B2c3/qmp.pid"])
    assert not libvirt_lab.is_capability_probe(["/bin/sleep", *probe[1:]])
    assert not libvirt_lab.is_capability_probe([])


@pytest.mark.lab
def test_a_real_probe_shaped_qemu_is_found_and_stopped() -> None:
    lib = libvirt_lab.LIBVIRT_QEMU_LIB_DIR
    if not lib.is_dir() or shutil.which(QEMU) is None:
        pytest.skip(f"{lib} or {QEMU} missing: run scripts/bootstrap.sh (libvirt-daemon-system)")
    d = Path(tempfile.mkdtemp(prefix="qmp-", dir=lib))
    pidfile = d / "qmp.pid"
    try:
        subprocess.run(
            [QEMU, *PROBE, "-pidfile", str(pidfile), "-daemonize"], check=True, timeout=30
        )
        pid = int(pidfile.read_text())
        assert pid in libvirt_lab.find_capability_probes()
        stop_pid(pid, lambda p: libvirt_lab.is_capability_probe(libvirt_lab._cmdline(p)))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and pid in libvirt_lab.find_capability_probes():
            time.sleep(0.05)
        assert pid not in libvirt_lab.find_capability_probes()
    finally:
        if pidfile.exists():
            pid = int(pidfile.read_text() or 0)
            if pid and libvirt_lab.is_capability_probe(libvirt_lab._cmdline(pid)):
                stop_pid(pid, lambda p: libvirt_lab.is_capability_probe(libvirt_lab._cmdline(p)))
        shutil.rmtree(d, ignore_errors=True)
