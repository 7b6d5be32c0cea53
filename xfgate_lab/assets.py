"""The demo guest's boot assets, built from Debian packages into the cache, never installed.

Layout of ``assets_dir(package)`` (``$XFGATE_CACHE/kernels/<package>/``)::

    tree/                 the package, extracted with dpkg-deb -x (boot/, lib/modules/...)
    vmlinuz config System.map   symlinks into tree/boot (System.map is Debian's one-line stub)
    guest-bin/            fastweb, spray, keeper, xfprobe, crowd, connload: static, gcc -static
    initramfs.cpio.gz     busybox-static + workload + NIC modules in load order
    assets.json           manifest, written last: its presence means the build is complete
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from xfgate.errors import ConfigError, PrerequisiteError
from xfgate.vmi.kernel_image import elf_is_static, is_concrete_image_package
from xfgate_lab import modules
from xfgate_lab.cpio import CpioEntry, cpio_newc
from xfgate_lab.errors import LabError
from xfgate_lab.layout import cache_dir_from_env

DEFAULT_KERNEL_PACKAGE = "linux-image-amd64"  # Debian's meta-package: resolved to a concrete one
ASSETS_FORMAT = 1
GUEST_PROGRAMS = ("fastweb", "spray", "keeper", "xfprobe", "crowd", "connload")
# Libraries a guest program links beyond libc (xfprobe's thread-files probe uses pthreads).
GUEST_PROGRAM_LIBS: dict[str, tuple[str, ...]] = {
    "xfprobe": ("-lpthread",),
    "crowd": ("-lpthread",),
    "connload": ("-lm",),
}
GUEST_FILES = ("init", "passwd", "group", *(f"{p}.c" for p in GUEST_PROGRAMS))
_PACKAGE_NAME_RE = re.compile(r"^linux-image-[a-z0-9][a-z0-9.+-]*$")

Log = Callable[[str], None]


@dataclass(frozen=True)
class KernelAssets:
    package: str
    release: str
    dir: Path
    vmlinuz: Path
    config: Path
    system_map: Path
    initramfs: Path
    modules: tuple[str, ...]


def assets_dir(package: str) -> Path:
    """Where the assets of a concrete kernel package live (built or not)."""
    check_package_name(package)
    return cache_dir_from_env() / "kernels" / package


def check_package_name(name: str) -> str:
    if not _PACKAGE_NAME_RE.match(name):
        raise ConfigError(
            f"{name!r} is not a Debian kernel image package name "
            "(expected linux-image-..., e.g. linux-image-amd64 or linux-image-cloud-amd64)"
        )
    return name


def is_concrete_kernel_package(name: str) -> bool:
    """linux-image-6.1.0-56-amd64, linux-image-6.12.117+deb12-cloud-amd64 (the product's rule)."""
    return is_concrete_image_package(name)


def parse_apt_depends(text: str) -> list[str]:
    """`apt-cache depends` output to the package names after Depends: (alternatives too)."""
    names = []
    for line in text.splitlines():
        m = re.match(r"^\s*\|?Depends:\s*<?([^\s>]+)>?", line)
        if m:
            names.append(m.group(1))
    return names


def _run(
    argv: list[str], timeout: float, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
        )
    except FileNotFoundError as e:
        raise PrerequisiteError(f"{argv[0]} not found: run scripts/bootstrap.sh") from e
    except subprocess.TimeoutExpired as e:
        raise LabError(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from e


def _apt_depends(name: str) -> list[str] | None:
    """Dependencies of a package apt knows, None if it does not (one apt-cache call, ~1 s)."""
    r = _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", name], 60)
    return parse_apt_depends(r.stdout) if r.returncode == 0 and r.stdout.strip() else None


def resolve_kernel_package(name: str | None, log: Log = print) -> str:
    """A concrete linux-image package for a name or meta-package (linux-image-amd64 ->
    linux-image-6.1.0-56-amd64), running `apt-get update` once if apt does not know it."""
    name = check_package_name(name or DEFAULT_KERNEL_PACKAGE)
    if name.endswith("-dbg"):
        raise ConfigError(
            f"{name} holds debug symbols, not a kernel: name the image package "
            f"({name.removesuffix('-dbg')})"
        )
    if is_concrete_kernel_package(name) and load_manifest(assets_dir(name)) is not None:
        return name  # built before: no need to ask apt again
    depends = _apt_depends(name)
    if depends is None:
        log(f"apt does not know {name}: running apt-get update")
        _run(["apt-get", "update", "-q"], 300)
        depends = _apt_depends(name)
        if depends is None:
            raise LabError(
                f"no Debian package named {name!r}: choose a Debian 12 kernel image such as "
                "linux-image-amd64, linux-image-cloud-amd64 or linux-image-rt-amd64 "
                "(list them with `apt-cache search --names-only '^linux-image-.*-amd64$'`)"
            )
    seen = [name]
    while not is_concrete_kernel_package(seen[-1]):
        images = [d for d in depends or [] if d.startswith("linux-image-")]
        if not images or len(seen) > 4:
            raise LabError(
                f"{name!r} is neither a kernel image package nor a meta-package depending on "
                f"one (apt-cache depends gave {depends})"
            )
        seen.append(images[0])
        if not is_concrete_kernel_package(images[0]):
            depends = _apt_depends(images[0])
    if len(seen) > 1:
        log(f"{name} -> {seen[-1]}")
    return seen[-1]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # another build of the same package finishes first
        yield


def guest_sources() -> dict[str, bytes]:
    """The guest's package-data files (init script, users, C sources) by name."""
    base = resources.files("xfgate_lab") / "guest"
    return {name: (base / name).read_bytes() for name in GUEST_FILES}


def static_busybox() -> bytes:
    path = shutil.which("busybox") or "/bin/busybox"
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PrerequisiteError(
            f"busybox not found ({e}): install Debian's busybox-static (scripts/bootstrap.sh)"
        ) from e
    if not elf_is_static(data):
        raise PrerequisiteError(
            f"{path} is dynamically linked: the guest needs Debian's busybox-static"
        )
    return data


def inputs_digest(sources: dict[str, bytes], busybox: bytes, release: str) -> str:
    """What the initramfs is built from (the kernel tree itself never changes once extracted)."""
    h = hashlib.sha256(f"format {ASSETS_FORMAT}\nrelease {release}\n".encode())
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + sources[name])
    h.update(busybox)
    return h.hexdigest()


def compile_guest_programs(sources: dict[str, bytes], out_dir: Path) -> dict[str, bytes]:
    out_dir.mkdir(parents=True, exist_ok=True)
    binaries = {}
    with tempfile.TemporaryDirectory() as tmp:
        for prog in GUEST_PROGRAMS:
            src = Path(tmp) / f"{prog}.c"
            src.write_bytes(sources[f"{prog}.c"])
            out = out_dir / prog
            libs = list(GUEST_PROGRAM_LIBS.get(prog, ()))
            r = _run(["gcc", "-static", "-O2", "-Wall", "-o", str(out), str(src), *libs], 120)
            if r.returncode != 0:
                raise LabError(
                    f"gcc -static failed on {prog}.c (needs gcc and libc6-dev):\n{r.stderr[-2000:]}"
                )
            binaries[prog] = out.read_bytes()
    return binaries


def initramfs_entries(
    busybox: bytes,
    sources: dict[str, bytes],
    binaries: dict[str, bytes],
    module_files: list[tuple[str, bytes]],
) -> list[CpioEntry]:
    """The guest root: busybox, workload binaries, users, init and NIC modules (in order)."""
    dirs = ["bin", "sbin", "dev", "etc", "etc/xfgate", "lib", "lib/modules", "proc", "sys"]
    dirs += ["tmp", "run", "root", "usr", "usr/bin", "usr/sbin", "www"]
    entries = [CpioEntry.directory(d) for d in dirs]
    entries += [
        CpioEntry.char_device("dev/console", 5, 1),
        CpioEntry.file("bin/busybox", busybox, 0o755),
        CpioEntry.symlink("bin/sh", "busybox"),
        CpioEntry.symlink("bin/httpd", "busybox"),  # comm "httpd" for the web servers
        CpioEntry.file("init", sources["init"], 0o755),
        CpioEntry.file("etc/passwd", sources["passwd"]),
        CpioEntry.file("etc/group", sources["group"]),
        CpioEntry.file("etc/xfgate/modules", "".join(f"{n}\n" for n, _ in module_files).encode()),
    ]
    entries += [CpioEntry.file(f"bin/{p}", b, 0o755) for p, b in sorted(binaries.items())]
    entries += [CpioEntry.file(f"lib/modules/{n}.ko", b) for n, b in module_files]
    return entries


def _download_and_extract(package: str, dest: Path, log: Log) -> None:
    tmp = dest.parent / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"downloading {package} (apt-get download)")
    # As root, apt warns that it downloads unsandboxed (dir not owned by _apt): harmless.
    r = _run(["apt-get", "download", "-q", package], 600, cwd=tmp)
    debs = sorted(tmp.glob("*.deb"))
    if r.returncode != 0 or not debs:
        raise LabError(f"apt-get download {package} failed:\n{r.stderr[-2000:]}")
    log(f"extracting {debs[0].name}")
    r = _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "tree")], 600)
    if r.returncode != 0:
        raise LabError(f"dpkg-deb -x {debs[0]} failed:\n{r.stderr[-2000:]}")
    shutil.rmtree(dest, ignore_errors=True)
    (tmp / "tree").rename(dest)
    shutil.rmtree(tmp, ignore_errors=True)


def _kernel_release(tree: Path, package: str) -> str:
    images = sorted((tree / "boot").glob("vmlinuz-*"))
    if not images:
        raise LabError(f"{package} has no boot/vmlinuz-*: not a kernel image package")
    return images[0].name.removeprefix("vmlinuz-")


def _symlink(link: Path, target: Path) -> None:
    link.unlink(missing_ok=True)
    link.symlink_to(target.relative_to(link.parent))


def load_manifest(d: Path) -> dict[str, object] | None:
    try:
        data = json.loads((d / "assets.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == ASSETS_FORMAT else None


def _assets_from(d: Path, package: str, release: str, module_names: list[str]) -> KernelAssets:
    return KernelAssets(
        package=package,
        release=release,
        dir=d,
        vmlinuz=d / "vmlinuz",
        config=d / "config",
        system_map=d / "System.map",
        initramfs=d / "initramfs.cpio.gz",
        modules=tuple(module_names),
    )


def ensure_assets(package_name: str | None, log: Log = print) -> KernelAssets:
    """Build (or reuse) the assets of a kernel package; returns their paths."""
    package = resolve_kernel_package(package_name, log)
    d = assets_dir(package)
    with _locked(d.parent / f".{package}.lock"):
        tree = d / "tree"
        if not (tree / "boot").is_dir():
            d.mkdir(parents=True, exist_ok=True)
            _download_and_extract(package, tree, log)
        release = _kernel_release(tree, package)
        sources = guest_sources()
        busybox = static_busybox()
        digest = inputs_digest(sources, busybox, release)
        manifest = load_manifest(d)
        if manifest and manifest.get("inputs") == digest and (d / "initramfs.cpio.gz").exists():
            listed = manifest.get("modules")
            names = [str(n) for n in listed] if isinstance(listed, list) else []
            return _assets_from(d, package, release, names)
        module_paths = modules.nic_modules(tree / "lib" / "modules" / release)
        names = [modules.module_name(p.name) for p in module_paths]
        log(f"building initramfs for {package} (modules: {' '.join(names) or 'all built in'})")
        binaries = compile_guest_programs(sources, d / "guest-bin")
        module_files = [(n, p.read_bytes()) for n, p in zip(names, module_paths, strict=True)]
        archive = cpio_newc(initramfs_entries(busybox, sources, binaries, module_files))
        tmp = d / "initramfs.cpio.gz.tmp"
        tmp.write_bytes(gzip.compress(archive, compresslevel=6, mtime=0))
        tmp.rename(d / "initramfs.cpio.gz")
        _symlink(d / "vmlinuz", tree / "boot" / f"vmlinuz-{release}")
        _symlink(d / "config", tree / "boot" / f"config-{release}")
        _symlink(d / "System.map", tree / "boot" / f"System.map-{release}")
        (d / "assets.json").write_text(
            json.dumps(
                {
                    "format": ASSETS_FORMAT,
                    "package": package,
                    "release": release,
                    "modules": names,
                    "inputs": digest,
                },
                indent=2,
            )
        )
        return _assets_from(d, package, release, names)
