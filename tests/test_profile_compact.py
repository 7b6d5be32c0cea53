"""The profile's marshal side cache (xfgate.vmi.profile_compact): the same profile as the JSON,
rewritten when the JSON changes, never trusted unless written by us (owner, mode 0600)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.vmi_fakes import standard_guest
from xfgate.errors import ProfileError
from xfgate.vmi import profile_compact
from xfgate.vmi.profile import Profile
from xfgate.vmi.profile_build import load_profile, profile_to_dict, save_profile


def _same(a: Profile, b: Profile) -> None:
    assert profile_to_dict(a) == profile_to_dict(b)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Profile, Path]:
    profile = standard_guest().profile
    path = tmp_path / "profiles" / "6.1.0-test-0123456789abcdef.json"
    save_profile(profile, path)
    return profile, path


def test_first_load_writes_a_private_side_file_and_the_second_reads_it(
    saved: tuple[Profile, Path],
) -> None:
    profile, path = saved
    side = profile_compact.side_path(path)
    _same(load_profile(path), profile)
    st = side.stat()
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.geteuid()
    # Proof it is read: the JSON's bytes are kept, the side file's structs are changed (still
    # trusted, same digest): the loaded profile shows the side file's content.
    raw = side.read_bytes()
    assert raw.count(b"task_struct") >= 1
    doc = json.loads(path.read_bytes())
    doc["release"] = "from-the-side-file"
    profile_compact._write_side(side, profile_compact._digest(path.read_bytes()), doc)
    assert load_profile(path).release == "from-the-side-file"


def test_a_changed_json_is_never_answered_from_the_old_side_file(
    saved: tuple[Profile, Path],
) -> None:
    _profile, path = saved
    load_profile(path)
    doc = json.loads(path.read_bytes())
    doc["release"] = "rebuilt"
    path.write_text(json.dumps(doc))
    assert load_profile(path).release == "rebuilt"
    assert load_profile(path).release == "rebuilt"  # and from the rewritten side file


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o602])
def test_a_side_file_others_could_write_or_read_is_not_trusted(
    saved: tuple[Profile, Path], mode: int
) -> None:
    profile, path = saved
    side = profile_compact.side_path(path)
    doc = json.loads(path.read_bytes())
    doc["release"] = "planted"
    profile_compact._write_side(side, profile_compact._digest(path.read_bytes()), doc)
    os.chmod(side, mode)
    assert load_profile(path).release == profile.release


def test_a_symlinked_side_file_is_not_followed(saved: tuple[Profile, Path]) -> None:
    profile, path = saved
    elsewhere = path.parent / "elsewhere"
    doc = json.loads(path.read_bytes())
    doc["release"] = "planted"
    profile_compact._write_side(elsewhere, profile_compact._digest(path.read_bytes()), doc)
    profile_compact.side_path(path).symlink_to(elsewhere)
    assert load_profile(path).release == profile.release


def test_a_corrupt_side_file_falls_back_on_the_json(saved: tuple[Profile, Path]) -> None:
    profile, path = saved
    load_profile(path)
    side = profile_compact.side_path(path)
    raw = side.read_bytes()
    side.write_bytes(raw[: len(raw) // 2])  # same header, truncated marshal
    _same(load_profile(path), profile)


def test_a_corrupt_struct_entry_is_a_profile_error(saved: tuple[Profile, Path]) -> None:
    _profile, path = saved
    doc = json.loads(path.read_bytes())
    side_doc = profile_compact.side_form(doc)
    side_doc["structs"]["task_struct"] = "[not json"
    side = profile_compact.side_path(path)
    digest = profile_compact._digest(path.read_bytes())
    import marshal

    side.write_bytes(profile_compact._header(digest) + marshal.dumps(side_doc))
    os.chmod(side, 0o600)
    with pytest.raises(ProfileError, match="task_struct"):
        load_profile(path).struct("task_struct")


def test_an_unwritable_dir_still_loads(
    saved: tuple[Profile, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    profile, path = saved

    def refuse(*_a: object, **_k: object) -> int:
        raise PermissionError("read-only")

    monkeypatch.setattr(os, "open", refuse)
    _same(load_profile(path), profile)
    assert not profile_compact.side_path(path).exists()
