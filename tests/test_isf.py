"""ISF export from hand-assembled BTF, import into a Profile, files, and hostile ISF documents."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from tests.btf_fakes import BtfBuilder, sample_kernel
from xfgate.errors import ProfileError
from xfgate.vmi import isf
from xfgate.vmi.btf import parse_btf

BANNER = "Linux version 6.1.0-99-test (nobody@example) (gcc) #1 SMP\n"
SYMBOLS = {
    "init_task": 0xFFFFFFFF82A1AA40,
    "linux_banner": 0xFFFFFFFF82000100,
    "_text": 1 << 64 - 1,
}


def sample_isf() -> dict[str, Any]:
    b, _ = sample_kernel()
    return isf.isf_from_btf(
        parse_btf(b.blob()),
        SYMBOLS,
        BANNER,
        {"init_task": "task_struct", "missing_symbol": "task_struct", "_text": "no_such_struct"},
        {"name": "vmlinuz-test", "sha256": "ab" * 8},
    )


def test_export_is_valid_isf_6_2() -> None:
    import jsonschema  # volatility3 reports every document valid when jsonschema is missing
    from volatility3 import schemas

    doc = sample_isf()
    assert doc["metadata"]["format"] == "6.2.0"
    assert schemas.validate(doc, use_cache=False)
    broken = copy.deepcopy(doc)
    broken["user_types"]["sock"]["fields"]["sk_uid"]["type"] = {"kind": "struct"}  # no name
    with pytest.raises(jsonschema.ValidationError):
        schemas.validate(broken, use_cache=False)


def test_anonymous_members_are_flagged_and_named_types_kept() -> None:
    doc = sample_isf()
    fields = doc["user_types"]["sock_common"]["fields"]
    anonymous = [name for name, f in fields.items() if f.get("anonymous")]
    assert len(anonymous) == 2
    assert fields["skc_family"] == {
        "offset": 16,
        "type": {"kind": "base", "name": "short unsigned int"},
    }
    # typedef'd anonymous struct takes the typedef's name; typedef chains are resolved
    assert doc["user_types"]["sock"]["fields"]["sk_uid"]["type"] == {
        "kind": "struct",
        "name": "kuid_t",
    }
    addr_struct = next(
        name for name, ut in doc["user_types"].items() if "skc_daddr" in ut["fields"]
    )
    assert addr_struct.startswith("unnamed_")
    assert doc["user_types"][addr_struct]["fields"]["skc_daddr"]["type"] == {
        "kind": "base",
        "name": "unsigned int",
    }


def test_pointers_arrays_bitfields_and_enums_as_isf_wants() -> None:
    doc = sample_isf()
    task = doc["user_types"]["task_struct"]["fields"]
    assert task["comm"] == {
        "offset": 24,
        "type": {"kind": "array", "count": 16, "subtype": {"kind": "base", "name": "char"}},
    }
    assert task["__state"]["type"] == {"kind": "enum", "name": "task_state"}
    assert doc["enums"]["task_state"]["constants"] == {"RUNNING": 0, "DEAD": -1}
    assert doc["enums"]["task_state"]["base"] == "int"
    assert task["flags"] == {
        "offset": 40,
        "type": {
            "kind": "bitfield",
            "bit_position": 0,
            "bit_length": 3,
            "type": {"kind": "base", "name": "unsigned int"},
        },
    }
    assert task["exiting"]["type"]["bit_position"] == 3
    next_ptr = doc["user_types"]["list_head"]["fields"]["next"]["type"]
    assert next_ptr == {"kind": "pointer", "subtype": {"kind": "struct", "name": "list_head"}}
    assert doc["base_types"]["pointer"]["size"] == 8
    assert doc["base_types"]["char"]["kind"] == "char"


def test_symbols_carry_types_and_the_banner_bytes() -> None:
    doc = sample_isf()
    syms = doc["symbols"]
    assert syms["init_task"] == {
        "address": 0xFFFFFFFF82A1AA40,
        "type": {"kind": "struct", "name": "task_struct"},
    }
    assert "type" not in syms["_text"]  # no such struct: no type
    assert "missing_symbol" not in syms
    assert base64.b64decode(syms["linux_banner"]["constant_data"]) == BANNER.encode() + b"\0"
    assert syms["linux_banner"]["address"] == 0xFFFFFFFF82000100


def test_import_flattens_anonymous_members() -> None:
    p = isf.profile_from_isf(sample_isf())
    assert p.release == "6.1.0-99-test"
    assert p.banner == BANNER
    assert p.offset("sock_common", "skc_dport") == 12
    assert p.offset("sock_common", "skc_num") == 14
    assert p.offset("sock_common", "skc_rcv_saddr") == 4
    assert p.offset("sock", "__sk_common.skc_num") == 14
    assert p.offset("sock", "sk_uid") == 32
    assert p.offset("sock", "sk_uid.val") == 32
    uid = p.member("sock", "sk_uid")
    assert (uid.type_name, uid.size) == ("struct kuid_t", 4)
    assert p.member("task_struct", "comm").type_name == "array"
    assert p.member("task_struct", "comm").size == 16
    assert p.member("task_struct", "tasks").type_name == "struct list_head"
    assert p.member("list_head", "next").type_name == "pointer"
    assert p.member("task_struct", "__state").type_name == "enum task_state"
    assert not any(name.startswith("unnamed_field") for name in p.struct("sock_common").members)
    assert p.symbol_types == {"init_task": "task_struct"}
    assert p.symbol("_text") == 1 << 64 - 1


def test_import_bitfields_as_byte_and_bit() -> None:
    p = isf.profile_from_isf(sample_isf())
    reuse = p.member("sock_common", "skc_reuse")
    port = p.member("sock_common", "skc_reuseport")
    assert (reuse.offset, reuse.bit_offset, reuse.bit_size, reuse.size) == (19, 0, 4, 1)
    assert (port.offset, port.bit_offset, port.bit_size) == (19, 4, 1)
    exiting = p.member("task_struct", "exiting")
    assert (exiting.offset, exiting.bit_offset, exiting.bit_size) == (40, 3, 1)


def test_signed_addresses_for_libvmi_round_trip() -> None:
    from volatility3 import schemas

    doc = sample_isf()
    signed = isf.with_signed_addresses(doc)
    assert signed["symbols"]["init_task"]["address"] == 0xFFFFFFFF82A1AA40 - (1 << 64)
    assert signed["symbols"]["init_task"]["type"] == doc["symbols"]["init_task"]["type"]
    assert doc["symbols"]["init_task"]["address"] == 0xFFFFFFFF82A1AA40  # input untouched
    assert schemas.validate(signed, use_cache=False)
    assert isf.profile_from_isf(signed) == isf.profile_from_isf(doc)


@pytest.mark.parametrize("name", ["profile.json", "profile.json.xz"])
def test_file_round_trip(tmp_path: Path, name: str) -> None:
    doc = sample_isf()
    written = isf.write_isf(doc, tmp_path / name)
    assert written == (tmp_path / name).stat().st_size
    assert isf.read_isf(tmp_path / name) == json.loads(json.dumps(doc))
    assert isf.load_isf_profile(tmp_path / name) == isf.profile_from_isf(doc)


def test_unreadable_and_foreign_documents_are_profile_errors(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read ISF"):
        isf.read_isf(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ProfileError, match="cannot read ISF"):
        isf.read_isf(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ProfileError, match="top level"):
        isf.read_isf(tmp_path / "list.json")
    with pytest.raises(ProfileError, match="no 'user_types'"):
        isf.profile_from_isf({"metadata": {}, "base_types": {}, "symbols": {}})
    doc = sample_isf()
    del doc["symbols"]["linux_banner"]
    with pytest.raises(ProfileError, match="linux_banner"):
        isf.profile_from_isf(doc)


def test_cyclic_anonymous_members_in_a_hostile_isf_are_bounded() -> None:
    doc = copy.deepcopy(sample_isf())
    doc["user_types"]["loop"] = {
        "kind": "struct",
        "size": 8,
        "fields": {
            "x": {"offset": 0, "anonymous": True, "type": {"kind": "struct", "name": "loop"}}
        },
    }
    with pytest.raises(ProfileError, match="nested too deep"):
        isf.profile_from_isf(doc)


def test_pointer_cycle_through_typedefs_in_btf_is_bounded() -> None:
    b = BtfBuilder()
    b.ref("PTR", 2)
    b.ref("TYPEDEF", 1, "loop_t")
    b.struct_("holder", 8, [("p", 1, 0, 0)])
    with pytest.raises(ProfileError, match="nesting deeper"):
        isf.isf_from_btf(parse_btf(b.blob()), {}, BANNER)


def test_forward_declared_only_struct_gets_an_empty_user_type() -> None:
    b = BtfBuilder()
    fwd = b.raw("FWD", "opaque", 0, 0)
    ptr = b.ref("PTR", fwd)
    b.struct_("holder", 8, [("p", ptr, 0, 0)])
    doc = isf.isf_from_btf(parse_btf(b.blob()), {}, BANNER)
    assert doc["user_types"]["opaque"] == {"kind": "struct", "size": 0, "fields": {}}


def test_duplicate_struct_names_get_distinct_isf_names() -> None:
    b = BtfBuilder()
    i = b.int_("int", 4, signed=True)
    first = b.struct_("dup", 4, [("a", i, 0, 0)])
    second = b.struct_("dup", 8, [("a", i, 0, 0), ("b", i, 32, 0)])
    names = isf.user_type_names(parse_btf(b.blob()))
    assert names[first] == "dup" and names[second] == f"dup_{second}"
