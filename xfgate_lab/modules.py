"""Kernel modules the guest needs (the NIC), in load order. The Debian package ships no
modules.dep, so dependencies come from each module's own ``depends`` field (modinfo)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

from xfgate_lab.errors import LabError

# virtio_pci is the transport (not a dependency of virtio_net, but needed to find the device).
NIC_MODULES = ("virtio_pci", "virtio_net")


def module_name(path_or_name: str) -> str:
    """Canonical module name: basename without .ko[.xz|.zst|.gz], '-' as '_'."""
    name = path_or_name.rsplit("/", 1)[-1]
    for ext in (".xz", ".zst", ".gz"):
        name = name.removesuffix(ext)
    return name.removesuffix(".ko").replace("-", "_")


def parse_depends(text: str) -> tuple[str, ...]:
    """modinfo -F depends output ("a,b-c" or empty) to canonical names."""
    return tuple(module_name(d) for d in text.strip().split(",") if d.strip())


def module_load_order(
    roots: Iterable[str], depends: Callable[[str], Iterable[str]], builtin: frozenset[str]
) -> list[str]:
    """Modules to insmod, dependencies first (depth-first post-order), built-ins skipped.
    Raises LabError on a dependency cycle."""
    order: list[str] = []
    done: set[str] = set()
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in done or name in builtin:
            return
        if name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(name) :], name])
            raise LabError(f"kernel module dependency cycle: {cycle}")
        visiting.append(name)
        for dep in depends(name):
            visit(dep)
        visiting.pop()
        done.add(name)
        order.append(name)

    for root in roots:
        visit(module_name(root))
    return order


def index_modules(modules_root: Path) -> dict[str, Path]:
    """Canonical name -> .ko path under lib/modules/RELEASE."""
    return {module_name(p.name): p for p in sorted(modules_root.rglob("*.ko*"))}


def parse_builtin(text: str) -> frozenset[str]:
    """modules.builtin ("kernel/drivers/virtio/virtio.ko" per line) to canonical names."""
    return frozenset(module_name(line.strip()) for line in text.splitlines() if line.strip())


def modinfo_depends(path: Path) -> tuple[str, ...]:
    try:
        out = subprocess.run(
            ["modinfo", "-F", "depends", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise LabError(f"modinfo failed on {path}: {e} (is the kmod package installed?)") from e
    return parse_depends(out)


def nic_modules(modules_root: Path, roots: Iterable[str] = NIC_MODULES) -> list[Path]:
    """The .ko files to load, in order, for a kernel tree's lib/modules/RELEASE."""
    index = index_modules(modules_root)
    builtin_file = modules_root / "modules.builtin"
    builtin = parse_builtin(builtin_file.read_text()) if builtin_file.exists() else frozenset()

    def depends(name: str) -> tuple[str, ...]:
        if name not in index:
            raise LabError(
                f"kernel module {name} is neither in {modules_root} nor built in: "
                "this kernel package cannot drive the lab's virtio NIC"
            )
        return modinfo_depends(index[name])

    return [index[n] for n in module_load_order(roots, depends, builtin)]
