"""The BTF reader over hand-assembled blobs: every kind, bitfields, chains, hostile input."""

from __future__ import annotations

import random
import struct

import pytest

from tests.btf_fakes import BtfBuilder, sample_kernel
from xfgate.errors import ProfileError
from xfgate.vmi import isf
from xfgate.vmi.btf import Kind, parse_btf


def test_every_kind_parses_with_its_fields() -> None:
    b, ids = sample_kernel()
    btf = parse_btf(b.blob())
    assert len(btf) == b.count + 1
    assert btf.type(0).name == "void"
    u32 = btf.type(ids["u32"])
    assert (u32.kind, u32.name, u32.size) == (Kind.INT, "unsigned int", 4)
    assert u32.int_info is not None and u32.int_info.bits == 32
    assert btf.type(ids["int"]).int_info.encoding & 1  # type: ignore[union-attr]
    assert btf.type(ids["list_head_ptr"]).ref == ids["list_head_fwd"]
    comm = btf.type(ids["comm"])
    assert comm.array is not None and (comm.array.elem_type_id, comm.array.nelems) == (
        ids["char"],
        16,
    )
    enum = btf.type(ids["task_state"])
    assert [(v.name, v.value) for v in enum.enum_values] == [("RUNNING", 0), ("DEAD", -1)]
    big = btf.type(ids["big"])
    assert [(v.name, v.value) for v in big.enum_values] == [("HUGE", 1 << 40), ("NEG", -2)]
    assert btf.type(ids["list_head_fwd"]).kind == Kind.FWD
    proto = btf.type(ids["proto"])
    assert proto.kind == Kind.FUNC_PROTO and proto.ref == 0 and proto.size == ids["int"]
    assert [p.name for p in proto.params] == ["task"]
    assert btf.type(ids["func"]).ref == ids["proto"]
    assert btf.type(ids["float"]).size == 8
    var = btf.type(ids["var"])
    assert (var.kind, var.ref, var.extra) == (Kind.VAR, ids["task_struct"], 1)
    sec = btf.type(ids["datasec"])
    assert sec.secinfos[0].type_id == ids["var"] and sec.secinfos[0].size == 64
    tag = btf.type(ids["tag"])
    assert (tag.kind, tag.ref, tag.extra) == (Kind.DECL_TAG, ids["task_struct"], 1)
    for name in ("type_tag", "volatile", "restrict", "const_char"):
        assert btf.type(ids[name]).kind in (
            Kind.TYPE_TAG,
            Kind.VOLATILE,
            Kind.RESTRICT,
            Kind.CONST,
        )
    assert {t.kind for t in btf.types} == set(Kind)  # the sample covers every kind


def test_bitfield_members_decode_kind_flag_offsets() -> None:
    b, ids = sample_kernel()
    btf = parse_btf(b.blob())
    sk = {m.name: m for m in btf.type(ids["sock_common"]).members}
    assert btf.type(ids["sock_common"]).kind_flag
    assert (sk["skc_reuse"].bit_offset, sk["skc_reuse"].bitfield_size) == (152, 4)
    assert (sk["skc_reuseport"].bit_offset, sk["skc_reuseport"].bitfield_size) == (156, 1)
    assert (sk["skc_state"].bit_offset, sk["skc_state"].bitfield_size) == (144, 0)
    sock = btf.type(ids["sock"])
    assert not sock.kind_flag and sock.members[1].bit_offset == 256


def test_strip_follows_typedef_chains_and_sizes_arrays() -> None:
    b, ids = sample_kernel()
    btf = parse_btf(b.blob())
    assert btf.strip(ids["__be32"]).id == ids["u32"]
    assert btf.strip(ids["kuid_t"]).id == ids["anon_kuid"]
    assert btf.type_size(ids["comm"]) == 16
    assert btf.type_size(ids["list_head_ptr"]) == 8
    assert btf.type_size(ids["sock"]) == 40
    assert btf.type_size(ids["proto"]) == 0
    assert [t.id for t in btf.find("sock", Kind.STRUCT)] == [ids["sock"]]


def test_typedef_cycle_is_a_bounded_error() -> None:
    b = BtfBuilder()
    b.ref("TYPEDEF", 2, "a")
    b.ref("TYPEDEF", 1, "b")
    btf = parse_btf(b.blob())
    with pytest.raises(ProfileError, match="chain longer"):
        btf.strip(1)


def test_array_of_itself_is_a_bounded_error() -> None:
    b = BtfBuilder()
    b.array(1, 1, 2)
    with pytest.raises(ProfileError, match="nesting deeper"):
        parse_btf(b.blob()).type_size(1)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda blob: b"\x00\x00" + blob[2:], "not a BTF blob"),
        (lambda blob: blob[:2] + b"\x02" + blob[3:], "version 2"),
        (lambda blob: blob[:10], "shorter than its header"),
        (lambda blob: blob[:-5], "runs past the blob"),
        (lambda blob: blob[:-1] + b"x", "not NUL-terminated"),
        (lambda blob: blob[:4] + struct.pack("<I", 2) + blob[8:], "header length"),
    ],
)
def test_malformed_blobs_name_the_problem(mutate: object, message: str) -> None:
    b, _ = sample_kernel()
    with pytest.raises(ProfileError, match=message):
        parse_btf(mutate(b.blob()))  # type: ignore[operator]


def test_dangling_type_id_is_rejected() -> None:
    b = BtfBuilder()
    b.int_("int", 4, signed=True)
    b.struct_("s", 8, [("x", 1, 0, 0), ("y", 99, 32, 0)])
    with pytest.raises(ProfileError, match="refers to type 99"):
        parse_btf(b.blob())


def test_unknown_kind_and_bad_name_offset_are_rejected() -> None:
    b = BtfBuilder()
    b.types += struct.pack("<III", 0, 25 << 24, 0)
    b.count += 1
    with pytest.raises(ProfileError, match="unknown kind 25"):
        parse_btf(b.blob())
    b = BtfBuilder()
    b.types += struct.pack("<III", 9999, 1 << 24, 4) + struct.pack("<I", 32)
    b.count += 1
    with pytest.raises(ProfileError, match="name offset 9999"):
        parse_btf(b.blob())


def test_struct_whose_members_run_past_the_section_is_rejected() -> None:
    b = BtfBuilder()
    b.int_("int", 4)
    b.raw("STRUCT", "s", 500, 8, struct.pack("<III", 0, 1, 0))  # claims 500 members, has 1
    with pytest.raises(ProfileError, match="runs past the type section"):
        parse_btf(b.blob())


def test_random_corruption_never_escapes_as_another_exception() -> None:
    """Guest RAM is attacker-controlled: any mutation parses, exports to ISF and imports, or
    fails with ProfileError."""
    b, _ = sample_kernel()
    pristine = b.blob()
    rng = random.Random(20261126)
    failures = 0
    for _ in range(3000):
        blob = bytearray(pristine)
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(blob))
            blob[pos] = rng.randrange(256)
        if rng.random() < 0.2:
            del blob[rng.randrange(len(blob)) :]
        try:
            btf = parse_btf(bytes(blob))
            for t in btf.types:  # walks over whatever parsed stay bounded too
                btf.type_size(t.id)
            isf.profile_from_isf(isf.isf_from_btf(btf, {}, "Linux version 6.1.0-x (f) #1\n"))
        except ProfileError:
            failures += 1
    assert (
        0 < failures < 3000
    )  # both outcomes happen: the mutations are neither all fatal nor inert
