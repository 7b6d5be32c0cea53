"""A minimal writer of the cpio "newc" format the kernel unpacks as an initramfs. Pure: entries
in, bytes out; deterministic (fixed mtime, inode numbers in entry order)."""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass

TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    path: str  # relative, no leading slash ("bin/busybox")
    mode: int  # full st_mode, e.g. stat.S_IFREG | 0o755
    data: bytes = b""  # file contents, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node

    @staticmethod
    def directory(path: str, perm: int = 0o755) -> CpioEntry:
        return CpioEntry(path, stat.S_IFDIR | perm)

    @staticmethod
    def file(path: str, data: bytes, perm: int = 0o644) -> CpioEntry:
        return CpioEntry(path, stat.S_IFREG | perm, data)

    @staticmethod
    def char_device(path: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        return CpioEntry(path, stat.S_IFCHR | perm, b"", (major, minor))

    @staticmethod
    def symlink(path: str, target: str) -> CpioEntry:
        return CpioEntry(path, stat.S_IFLNK | 0o777, target.encode())


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, e: CpioEntry, name_size: int) -> bytes:
    nlink = 2 if stat.S_ISDIR(e.mode) else 1
    # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    fields = (ino, e.mode, 0, 0, nlink, 0, len(e.data), 0, 0, *e.rdev, name_size, 0)
    return b"070701" + b"".join(f"{f:08X}".encode() for f in fields)


def cpio_newc(entries: Iterable[CpioEntry]) -> bytes:
    """The archive: each entry with uid/gid 0, then the trailer."""
    out = bytearray()
    for ino, e in enumerate([*entries, CpioEntry(TRAILER, 0)], start=1):
        name = e.path.lstrip("/").encode() + b"\0"
        if e.path != TRAILER and (not e.path.strip("/") or "\0" in e.path):
            raise ValueError(f"bad cpio path {e.path!r}")
        hdr = _header(ino if e.path != TRAILER else 0, e, len(name))
        out += hdr + name
        out += _pad4(len(hdr) + len(name))
        out += e.data + _pad4(len(e.data))
    return bytes(out)
