"""Unit tests of the lab's pure parts: truth parser, qemu command line, module order, cpio,
apt output parsing, control-channel framing, prerequisites. No root, no guest."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import os
import stat
import subprocess
import threading
import time
from ipaddress import IPv6Address
from pathlib import Path

import pytest

from xfgate.config import DomainConfig, MemoryConfig, save_domains
from xfgate.errors import ConfigError, ProfileError
from xfgate.vmi import kernel_image
from xfgate_lab import assets, cpio, guest_channel, lab, layout, modules, qemu, truth
from xfgate_lab.errors import LabError
from xfgate_lab.lab import prerequisite_problems, prerequisite_warnings, workload_missing

# Trimmed from a real guest's TRUTH_SCRIPT output (/proc of the lab guest, kernel 6.1), with
# an extra fd holding the same socket, a non-inet socket and a process that exited mid-listing.
RAW_TRUTH = (Path(__file__).parent / "test_lab_truth_raw.txt").read_text()


def test_truth_processes_from_status() -> None:
    t = truth.parse_truth(RAW_TRUTH)
    by_pid = {p.pid: p for p in t.processes}
    assert sorted(by_pid) == [1, 2, 100, 109, 112, 115]  # 130 lacks fields: left out
    assert by_pid[109] == truth.TruthProcess(109, 109, 1, 1001, 1001, "spray")
    assert (by_pid[115].uid, by_pid[115].euid) == (1002, 1003)
    assert by_pid[2].ppid == 0


def test_truth_sockets_joined_per_fd() -> None:
    t = truth.parse_truth(RAW_TRUTH)
    got = {(s.pid, s.fd): s for s in t.sockets}
    # 115 holds the same socket on two fds: listed once per (pid, fd); inode 7777 is not inet.
    assert sorted(got) == [(100, 3), (109, 3), (112, 3), (115, 3), (115, 7)]
    assert got[(100, 3)] == truth.TruthSocket(
        100, 3, "tcp", 4, "0.0.0.0", 80, "0.0.0.0", 0, "LISTEN"
    )
    assert got[(109, 3)].proto == "udp" and got[(109, 3)].state == "CLOSE"
    assert got[(109, 3)].lport == 0x8E74
    assert got[(112, 3)].local == "2001:2::1:1" and got[(112, 3)].family == 6
    assert got[(115, 7)].remote == "198.18.0.1" and got[(115, 7)].rport == 7000
    assert got[(115, 7)].state == "ESTABLISHED"
    # TIME_WAIT (inode 0) is held by nobody: absent.
    assert all(s.state != "TIME_WAIT" for s in t.sockets)


def test_truth_json_shape_is_exact() -> None:
    j = truth.parse_truth(RAW_TRUTH).to_json()
    assert set(j) == {"processes", "sockets"}
    assert set(j["processes"][0]) == {"pid", "tgid", "ppid", "uid", "euid", "comm"}
    assert set(j["sockets"][0]) == {
        "pid", "fd", "proto", "family", "local", "lport", "remote", "rport", "state",
    }  # fmt: skip
    assert j["sockets"] == sorted(j["sockets"], key=lambda s: (s["pid"], s["fd"]))


def test_truth_missing_section_is_an_error() -> None:
    with pytest.raises(LabError, match="lacks section"):
        truth.parse_truth(RAW_TRUTH.split("@@xftruth udp6")[0])


@pytest.mark.parametrize(
    ("hex_addr", "text"),
    [
        ("010012C6", "198.18.0.1"),
        ("00000000", "0.0.0.0"),
        ("02000120000000000000000001000100", "2001:2::1:1"),
        ("0000000000000000FFFF00000100007F", str(IPv6Address("::ffff:127.0.0.1"))),
    ],
)
def test_decode_proc_net_address(hex_addr: str, text: str) -> None:
    assert truth.decode_proc_net_address(hex_addr) == text


def test_proc_net_skips_junk_lines() -> None:
    assert truth.parse_proc_net("garbage\n  1: zz:zz\n", "tcp") == ()


def test_qemu_argv_essentials(tmp_path: Path) -> None:
    spec = qemu.GuestSpec(
        domain=2,
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd",
        ram_path=Path("/dev/shm/x-guest2.mem"),
        ram_mb=256,
        vif="vif2.0",
        mac=layout.guest_mac(2),
        serial_log=tmp_path / "serial.log",
        ctl_socket=tmp_path / "ctl.sock",
        qmp_socket=tmp_path / "qmp.sock",
        pidfile=tmp_path / "qemu.pid",
    )
    argv = qemu.qemu_argv(spec)
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64"
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert "mem-path=/dev/shm/x-guest2.mem,share=on" in joined
    assert "pc,memory-backend=mem" in argv
    assert "ifname=vif2.0" in joined and "virtio-net-pci" in joined
    assert "-daemonize" in argv and "-no-reboot" in argv and "-nodefaults" in argv
    append = argv[argv.index("-append") + 1]
    assert "nokaslr" not in append and "panic=-1" in append and "xfgate.domain=2" in append
    assert argv.count("-serial") == 2
    assert argv[argv.index("-cpu") + 1] == qemu.DEFAULT_CPU == "qemu64"  # QEMU's own default
    la57 = qemu.qemu_argv(dataclasses.replace(spec, cpu="max"))
    assert la57[la57.index("-cpu") + 1] == "max"
    for bad in ("", "max,+la57", "-m 1G", "max;reboot"):
        with pytest.raises(ConfigError, match="CPU model"):
            qemu.qemu_argv(dataclasses.replace(spec, cpu=bad))


def test_module_order_dependencies_first_builtins_skipped() -> None:
    deps = {
        "virtio_net": ["virtio_ring", "virtio", "net_failover"],
        "net_failover": ["failover"],
        "virtio_pci": ["virtio_ring", "virtio"],
        "virtio_ring": [],
        "failover": [],
    }
    order = modules.module_load_order(
        ["virtio_pci", "virtio-net"], lambda n: deps[n], frozenset({"virtio"})
    )
    assert order == ["virtio_ring", "virtio_pci", "failover", "net_failover", "virtio_net"]
    for name, ds in deps.items():
        for d in ds:
            if d != "virtio":
                assert order.index(d) < order.index(name)


def test_module_cycle_is_an_error() -> None:
    deps = {"a": ["b"], "b": ["a"]}
    with pytest.raises(LabError, match="cycle: a -> b -> a"):
        modules.module_load_order(["a"], lambda n: deps[n], frozenset())


def test_module_names() -> None:
    assert modules.parse_depends("virtio_ring,virtio,net-failover\n") == (
        "virtio_ring", "virtio", "net_failover",
    )  # fmt: skip
    assert modules.parse_depends("\n") == ()
    assert modules.module_name("kernel/drivers/net/virtio_net.ko.xz") == "virtio_net"
    assert "virtio" in modules.parse_builtin("kernel/drivers/virtio/virtio.ko\n")


def _gnu_cpio(args: list[str], archive: bytes, cwd: Path | None = None) -> str:
    """Debian's cpio (GNU), an independent reader of the newc format."""
    done = subprocess.run(
        ["cpio", "--quiet", *args], input=archive, cwd=cwd, capture_output=True, check=True
    )
    return done.stdout.decode()


def test_cpio_archive_is_what_gnu_cpio_unpacks(tmp_path: Path) -> None:
    entries = [
        cpio.CpioEntry.directory("bin"),
        cpio.CpioEntry.file("bin/x", b"hello", 0o755),
        cpio.CpioEntry.symlink("bin/sh", "x"),
        cpio.CpioEntry.char_device("dev/console", 5, 1),
    ]
    archive = cpio.cpio_newc(entries)
    assert _gnu_cpio(["-it"], archive).split() == ["bin", "bin/x", "bin/sh", "dev/console"]
    rows = [line.split() for line in _gnu_cpio(["-itvn"], archive).splitlines()]
    assert [tuple(r[:4]) for r in rows] == [  # mode, nlink, uid, gid
        ("drwxr-xr-x", "2", "0", "0"),
        ("-rwxr-xr-x", "1", "0", "0"),
        ("lrwxrwxrwx", "1", "0", "0"),
        ("crw-------", "1", "0", "0"),
    ]
    assert rows[1][4] == "5" and rows[2][-3:] == ["bin/sh", "->", "x"]
    assert rows[3][4:6] == ["5,", "1"] and rows[3][-1] == "dev/console"
    # Unpacked for real (a device node needs root: elsewhere only the rest).
    root = os.geteuid() == 0
    _gnu_cpio(
        ["-idm", "--no-absolute-filenames", *([] if root else ["bin", "bin/*"])], archive, tmp_path
    )
    assert (tmp_path / "bin").is_dir() and not (tmp_path / "bin").is_symlink()
    x = tmp_path / "bin" / "x"
    assert x.read_bytes() == b"hello" and stat.S_IMODE(x.stat().st_mode) == 0o755
    assert os.readlink(tmp_path / "bin" / "sh") == "x"
    if root:
        console = os.lstat(tmp_path / "dev" / "console")
        assert stat.S_ISCHR(console.st_mode) and stat.S_IMODE(console.st_mode) == 0o600
        assert (os.major(console.st_rdev), os.minor(console.st_rdev)) == (5, 1)
    with pytest.raises(ValueError):
        cpio.cpio_newc([cpio.CpioEntry.file("/", b"")])


def test_initramfs_has_workload_and_modules_in_order() -> None:
    src = assets.guest_sources()
    entries = assets.initramfs_entries(
        b"BB", src, {"spray": b"S"}, [("virtio_ring", b"R"), ("virtio_net", b"N")]
    )
    files = {e.path: e.data for e in entries}
    assert files["etc/xfgate/modules"] == b"virtio_ring\nvirtio_net\n"
    assert files["lib/modules/virtio_net.ko"] == b"N"
    assert b"mallory:x:1001:" in files["etc/passwd"] and b"ops:x:1002:" in files["etc/passwd"]
    assert files["init"].startswith(b"#!/bin/busybox sh")


def test_apt_depends_parsing() -> None:
    text = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n |Depends: <virt>\n"
    assert assets.parse_apt_depends(text) == ["linux-image-6.1.0-56-amd64", "virt"]
    assert assets.is_concrete_kernel_package("linux-image-6.1.0-56-cloud-amd64")
    assert not assets.is_concrete_kernel_package("linux-image-cloud-amd64")


# Every Debian 12 kernel image name (bookworm and its 6.12 series), as apt-cache lists them.
DEBIAN12_IMAGES = [
    f"linux-image-{abi}-{flavour}amd64{signed}"
    for abi in ("6.1.0-56", "6.1.0-57", "6.12.117+deb12", "6.12.43+deb12")
    for flavour in ("", "cloud-", "rt-")
    for signed in ("", "-unsigned")
]
DEBIAN12_METAS = {
    "linux-image-amd64": "linux-image-6.1.0-57-amd64",
    "linux-image-cloud-amd64": "linux-image-6.1.0-57-cloud-amd64",
    "linux-image-rt-amd64": "linux-image-6.1.0-57-rt-amd64",
    "linux-image-6.12-amd64": "linux-image-6.12.117+deb12-amd64",
    "linux-image-6.12-cloud-amd64": "linux-image-6.12.117+deb12-cloud-amd64",
    "linux-image-6.12-rt-amd64": "linux-image-6.12.117+deb12-rt-amd64",
}


@pytest.mark.parametrize("name", DEBIAN12_IMAGES)
def test_every_debian12_image_name_is_concrete(name: str) -> None:
    assert assets.check_package_name(name) == name
    assert assets.is_concrete_kernel_package(name)
    assert kernel_image.is_concrete_image_package(name)
    assert kernel_image.resolve_kernel_package(name) == name  # no apt call needed


@pytest.mark.parametrize("meta", sorted(DEBIAN12_METAS))
def test_debian12_meta_packages_resolve_to_their_image(
    meta: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not assets.is_concrete_kernel_package(meta)
    assert not kernel_image.is_concrete_image_package(meta)
    asked: list[str] = []

    def depends(name: str) -> list[str] | None:
        asked.append(name)
        return [DEBIAN12_METAS[name]] if name in DEBIAN12_METAS else None

    monkeypatch.setattr(assets, "_apt_depends", depends)
    monkeypatch.setattr(assets, "load_manifest", lambda _d: None)
    assert assets.resolve_kernel_package(meta, log=lambda _m: None) == DEBIAN12_METAS[meta]
    assert asked == [meta]


@pytest.mark.parametrize(
    "dbg", ["linux-image-6.12.117+deb12-amd64-dbg", "linux-image-6.12-cloud-amd64-dbg"]
)
def test_debug_symbol_packages_are_not_images(dbg: str) -> None:
    assert not kernel_image.is_concrete_image_package(dbg)
    with pytest.raises(ConfigError, match="debug symbols, not a kernel"):
        assets.resolve_kernel_package(dbg, log=lambda _m: None)
    with pytest.raises(ProfileError, match="debug symbols, not a kernel"):
        kernel_image.resolve_kernel_package(dbg)


@pytest.mark.parametrize("bad", ["vim", "linux-image-; rm -rf /", "", "LINUX-IMAGE-X"])
def test_bad_package_names_rejected_before_apt(bad: str) -> None:
    with pytest.raises(ConfigError, match="not a Debian kernel image package"):
        assets.check_package_name(bad)


def test_elf_is_static_on_real_binaries() -> None:
    assert kernel_image.elf_is_static(Path("/bin/busybox").read_bytes())
    assert not kernel_image.elf_is_static(Path("/bin/ls").read_bytes())
    assert not kernel_image.elf_is_static(b"#!/bin/sh\n")


def test_prerequisites() -> None:
    everything = prerequisite_problems(0, lambda p: f"/usr/bin/{p}")
    assert everything == []
    not_root = prerequisite_problems(1000, lambda p: f"/usr/bin/{p}")
    assert len(not_root) == 1 and "must run as root" in not_root[0]
    no_qemu = prerequisite_problems(0, lambda p: None if p.startswith("qemu") else p)
    assert len(no_qemu) == 1 and "qemu-system-x86_64" in no_qemu[0]
    assert prerequisite_warnings(lambda p: f"/usr/bin/{p}") == []
    no_httperf = prerequisite_warnings(lambda p: None if p == "httperf" else p)
    assert len(no_httperf) == 1 and "httperf not found: the benchmarks" in no_httperf[0]


def test_control_framing() -> None:
    req = guest_channel.encode_request("xf1a", "echo hi", 5)
    rid, tmo, b64 = req.decode().split()
    assert (rid, tmo, base64.b64decode(b64)) == ("xf1a", "5", b"echo hi")
    assert req.startswith(b"\n") and req.endswith(b"\n")
    out = base64.b64encode(b"line1\nline2\n")
    stale = b"@@XFB xf09@@\nb2xk\n@@XFE xf09 0@@\n"
    reply = stale + b"\r\n@@XFB xf1a@@\r\n" + out[:8] + b"\r\n" + out[8:] + b"\r\n@@XFE xf1a 3@@"
    assert guest_channel.parse_reply(reply[:-10], "xf1a") is None  # incomplete
    result = guest_channel.parse_reply(reply, "xf1a")
    assert result == guest_channel.GuestResult(3, b"line1\nline2\n")
    with pytest.raises(LabError, match="garbled"):
        guest_channel.parse_reply(b"@@XFB xf1a@@\n!!!\n@@XFE xf1a 0@@", "xf1a")


def test_guest_channel_gzipped_reply_is_unzipped_and_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = b"@@xftruth tcp\n" + b"0: 0100007F:4E20 00000000:0000 0A\n" * 1000
    body = base64.b64encode(gzip.compress(text))
    reply = b"@@XFZ xf1b@@\r\n" + body + b"\r\n@@XFE xf1b 0@@"
    assert guest_channel.parse_reply(reply, "xf1b") == guest_channel.GuestResult(0, text)
    monkeypatch.setattr(guest_channel, "MAX_REPLY_BYTES", 1000)
    with pytest.raises(LabError, match="unzipped"):
        guest_channel.parse_reply(reply, "xf1b")
    with pytest.raises(LabError, match="garbled"):
        guest_channel.parse_reply(b"@@XFZ xf1b@@\nb2xk\n@@XFE xf1b 0@@", "xf1b")


def test_layout_names_and_addresses() -> None:
    lay = layout.LabLayout()
    assert (lay.dom0_netns, lay.client_netns) == ("xfgate-dom0", "xfgate-client")
    assert lay.ram_path(1) == Path("/dev/shm/xfgate-guest1.mem")
    assert lay.run_dir == Path("/run/xfgate/lab")
    private = layout.LabLayout("xfgt1")
    assert private.run_dir == Path("/run/xfgate/lab-xfgt1") and private.dom0_netns == "xfgt1-dom0"
    assert private.legacy_lock_path == Path("/run/xfgate/lab-xfgt1.lock")
    assert str(layout.guest_v4(2)) == "198.18.1.2" and str(layout.guest_v6(2)) == "2001:2::1:2"
    assert layout.vif_name(3) == "vif3.0"
    with pytest.raises(ConfigError):
        layout.LabLayout("Bad Prefix")
    with pytest.raises(ConfigError):
        layout.guest_v4(0)


def test_workload_missing() -> None:
    full = "httpd 112 103 100\nfastweb 106\nspray 109\nkeeper 115\n"
    assert workload_missing(full) == []
    assert workload_missing("httpd 100\nfastweb\nspray 109\nkeeper 115\n") == [
        "2 httpd",
        "1 fastweb",
    ]
    assert len(workload_missing("")) == 4


# ---- lab state and lock (no root: a run root under tmp_path) ---------------------------------


def _lab_dom(lay: layout.LabLayout, domain: int) -> DomainConfig:
    return DomainConfig(
        id=domain,
        name=f"guest{domain}",
        vifs=(layout.vif_name(domain),),
        memory=MemoryConfig(backend="qemu-shm", path=str(lay.ram_path(domain))),
    )


def test_domains_of_an_up_lab_come_from_its_own_domains_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lay = layout.LabLayout("xfunit", run_root=tmp_path / "run")
    lab_file, other_file = tmp_path / "lab.toml", tmp_path / "other.toml"
    save_domains({1: _lab_dom(lay, 1), 2: _lab_dom(lay, 2)}, lab_file)
    # The current $XFGATE_DOMAINS holds a domain 1 of another lab (other RAM file).
    save_domains({1: _lab_dom(layout.LabLayout("xfother"), 1)}, other_file)
    monkeypatch.setenv("XFGATE_DOMAINS", str(other_file))
    state = lab.LabState(prefix=lay.prefix, domains=[1, 2], domains_file=str(lab_file))
    got = lab.lab_domain_configs(lay, state)
    assert [d.id for d in got] == [1, 2]
    assert got[0].memory.path == str(lay.ram_path(1))
    # A state of an older version without the file falls back to the current file; another
    # lab's domain of the same id is not taken for ours.
    assert lab.lab_domain_configs(lay, dataclasses.replace(state, domains_file="")) == ()


def test_state_without_cpu_reads_as_the_default(tmp_path: Path) -> None:
    lay = layout.LabLayout("xfunit", run_root=tmp_path)
    lay.run_dir.mkdir()
    lay.state_path.write_text('{"prefix": "xfunit", "domains": [1], "phase": "up"}')
    state = lab.read_state(lay)
    assert state is not None and state.cpu == qemu.DEFAULT_CPU
    state.cpu = "max"
    lab.write_state(lay, state)
    assert lab.read_state(lay) == state


def test_lock_leaves_nothing_once_the_run_dir_is_emptied(tmp_path: Path) -> None:
    lay = layout.LabLayout("xfunit", run_root=tmp_path)
    with lab.lab_lock(lay):
        (lay.run_dir / "guest1").mkdir()
        (lay.run_dir / "guest1" / "serial.log").write_text("x")
        (lay.run_dir / "lab.json").write_text("{}")
    assert lay.run_dir.is_dir()  # a lab that is up keeps its run dir
    with lab.lab_lock(lay):
        assert lab.clear_dir(lay.run_dir) is True
        assert lab.clear_dir(lay.run_dir) is False
    assert not lay.run_dir.exists()
    with lab.lab_lock(lay):  # an idle lock (e.g. `down` of a lab that is down) leaves nothing
        pass
    assert list(tmp_path.iterdir()) == []


def test_lock_excludes_across_removal_of_the_run_dir(tmp_path: Path) -> None:
    """A waiter that got the lock of a run dir removed meanwhile locks the new one: the two
    critical sections never overlap, and nothing is left at the end."""
    lay = layout.LabLayout("xfunit", run_root=tmp_path)
    inside: list[int] = []
    overlaps: list[tuple[int, int]] = []
    holding = threading.Event()

    def critical(n: int, fill: bool) -> None:
        with lab.lab_lock(lay):
            holding.set()
            inside.append(n)
            if len(inside) > 1:
                overlaps.append((inside[0], n))
            if fill:
                (lay.run_dir / "lab.json").write_text("{}")
            time.sleep(0.05)
            lab.clear_dir(lay.run_dir)  # a `down`: the release removes the run dir
            inside.remove(n)

    first = threading.Thread(target=critical, args=(0, True))
    first.start()
    assert holding.wait(5)
    others = [threading.Thread(target=critical, args=(n, n % 2 == 0)) for n in range(1, 6)]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(30)
    assert overlaps == [] and inside == []
    assert list(tmp_path.iterdir()) == []
