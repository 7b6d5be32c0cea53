"""A compact side cache of a cached profile's JSON: the parsed document kept as ``marshal``.

A crowded guest's ``xfgate ps`` spent 0.14 s parsing the 6.5 MB profile JSON (88k symbols, 10k
structs); ``marshal`` loads the same document in a fraction of that (each struct's entry stays
JSON text until a walker asks for that struct). The side file lives beside
the JSON (``<name>.json.marshal``) and is keyed by the JSON's own bytes: its header names a
digest of them, so a JSON that changed (rebuilt, replaced, edited) never gets a stale document,
its side file is simply rewritten.

``marshal`` is not safe against crafted input, so a side file is trusted only when we could have
written it: a regular file (no symlink followed), owned by this process's effective uid, mode
0600 (no group or other bits). Anything else is ignored and the JSON is parsed as before; a side
file that fails to load is ignored too. Writing is best effort (an unwritable cache dir, e.g. an
operator reading root's cache, costs nothing but the speed-up).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import marshal
import os
import stat
import sys
from pathlib import Path
from typing import Any

from xfgate.errors import ProfileError
from xfgate.vmi import isf

log = logging.getLogger(__name__)

SUFFIX = ".marshal"
MAGIC = b"xfgate-marshal-1\0"
# marshal's format follows the interpreter: a file written by another one is not read.
TAG = sys.implementation.cache_tag.encode() if sys.implementation.cache_tag else b"none"
XZ_MAGIC = b"\xfd7zXZ\x00"
MAX_SIDE_BYTES = 1 << 28  # a 6.1 profile's document is ~8 MB as marshal


def side_path(json_path: Path) -> Path:
    return json_path.with_name(json_path.name + SUFFIX)


def _header(digest: bytes) -> bytes:
    return MAGIC + TAG + b"\0" + digest


def _digest(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


def side_form(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with each struct's entry kept as its compact JSON text: a walker decodes the
    ~20 structs it uses (``LazyStructs``), and loading skips building ~500k member objects."""
    structs = doc.get("structs")
    if not isinstance(structs, dict):
        return doc
    packed = {name: json.dumps(entry, separators=(",", ":")) for name, entry in structs.items()}
    return {**doc, "structs": packed}


def trusted(st: os.stat_result) -> bool:
    """A side file this process could have written: regular, ours, 0600 (no group/other)."""
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_uid == os.geteuid()
        and stat.S_IMODE(st.st_mode) & 0o077 == 0
    )


def _read_side(path: Path, digest: bytes) -> dict[str, Any] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not trusted(st) or st.st_size > MAX_SIDE_BYTES:
            log.debug("profile side cache %s not trusted (owner/mode/size): ignored", path)
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_SIDE_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    header = _header(digest)
    if not data.startswith(header):
        return None  # another JSON's, or another interpreter's
    try:
        doc = marshal.loads(memoryview(data)[len(header) :])
    except (EOFError, ValueError, TypeError):
        return None
    return doc if isinstance(doc, dict) else None


def _write_side(path: Path, digest: bytes, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        payload = marshal.dumps(side_form(doc))
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(_header(digest))
                f.write(payload)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except (OSError, ValueError) as e:
        log.debug("profile side cache %s not written: %s", path, e)
        with contextlib.suppress(OSError):
            tmp.unlink()


def read_profile_json(path: Path, keep_format: str) -> dict[str, Any]:
    """The JSON document in ``path`` (``ProfileError`` if unreadable or not an object), from
    its trusted side cache when that was written from the same bytes; a document whose
    ``format`` is ``keep_format`` gets a (re)written side cache."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ProfileError(f"cannot read profile {path}: {e}") from e
    if raw[:6] == XZ_MAGIC:
        return isf.read_isf(path)  # a compressed ISF: no side cache
    digest = _digest(raw)
    side = side_path(path)
    doc = _read_side(side, digest)
    if doc is not None:
        return doc
    try:
        parsed = json.loads(raw)
    except ValueError as e:
        raise ProfileError(f"cannot read profile {path}: {e}") from e
    if not isinstance(parsed, dict):
        raise ProfileError(f"{path} is not a profile document (top level is not an object)")
    if parsed.get("format") == keep_format:
        _write_side(side, digest, parsed)
    return parsed
