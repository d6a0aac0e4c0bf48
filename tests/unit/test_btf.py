"""Tests of the BTF parser and of the build-time extraction of the guest kernel's BTF.

Synthetic blobs are assembled here byte by byte (one of every kind, bitfields, anonymous unions,
typedef chains) and checked for exact offsets and sizes; damaged blobs must raise BtfError and
nothing else. The last tests parse the BTF extracted from the demo guest's real kernel.
"""

from __future__ import annotations

import gzip
import random
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmigdb.guest.linux.btf import Btf, BtfError, Member, btf_from_memory
from vmigdb.images import btf_extract, kernel
from vmigdb.images.build import GuestImage, build_guest, default_cache_dir

KIND = {
    "int": 1,
    "ptr": 2,
    "array": 3,
    "struct": 4,
    "union": 5,
    "enum": 6,
    "fwd": 7,
    "typedef": 8,
    "volatile": 9,
    "const": 10,
    "restrict": 11,
    "func": 12,
    "func_proto": 13,
    "var": 14,
    "datasec": 15,
    "float": 16,
    "decl_tag": 17,
    "type_tag": 18,
    "enum64": 19,
}


@dataclass
class BtfWriter:
    """Builds a BTF blob: add types in id order (each add returns the new id), then `blob()`."""

    strings: bytearray = field(default_factory=lambda: bytearray(b"\0"))
    types: bytearray = field(default_factory=bytearray)
    count: int = 0

    def s(self, name: str) -> int:
        if not name:
            return 0
        offset = len(self.strings)
        self.strings += name.encode() + b"\0"
        return offset

    def add(
        self,
        kind: str,
        name: str = "",
        size_or_type: int = 0,
        *,
        vlen: int = 0,
        kind_flag: bool = False,
        extra: bytes = b"",
    ) -> int:
        info = KIND[kind] << 24 | vlen | kind_flag << 31
        self.types += struct.pack("<III", self.s(name), info, size_or_type) + extra
        self.count += 1
        return self.count

    def int_(self, name: str, size: int, bits: int | None = None, offset: int = 0, flags=0) -> int:
        encoding = flags << 24 | offset << 16 | (size * 8 if bits is None else bits)
        return self.add("int", name, size, extra=struct.pack("<I", encoding))

    def aggregate(self, kind: str, name: str, size: int, members, *, kind_flag=False) -> int:
        """members: (name, type id, bit offset[, bitfield size])"""
        extra = b""
        for m in members:
            offset = m[2] | (m[3] << 24 if kind_flag and len(m) > 3 else 0)
            extra += struct.pack("<III", self.s(m[0]), m[1], offset)
        return self.add(kind, name, size, vlen=len(members), kind_flag=kind_flag, extra=extra)

    def array(self, elem: int, index: int, nelems: int) -> int:
        return self.add("array", extra=struct.pack("<III", elem, index, nelems))

    def blob(self, *, magic: int = 0xEB9F, version: int = 1) -> bytes:
        header = struct.pack(
            "<HBBIIIII",
            magic,
            version,
            0,
            24,
            0,
            len(self.types),
            len(self.types),
            len(self.strings),
        )
        return header + bytes(self.types) + bytes(self.strings)


@dataclass
class Sample:
    btf: Btf
    blob: bytes
    ids: dict[str, int]


def build_sample() -> Sample:
    """A miniature kernel: ints, list_head, a task with a bitfield and anonymous union, typedefs,
    then one of every other kind."""
    w = BtfWriter()
    ids: dict[str, int] = {}
    ids["int"] = w.int_("int", 4, flags=1)
    ids["uint"] = w.int_("unsigned int", 4)
    ids["char"] = w.int_("char", 1, flags=2)
    ids["ulong"] = w.int_("long unsigned int", 8)
    lh_ptr = w.count + 2  # struct list_head refers to its pointer type, defined right after it
    ids["list_head"] = w.aggregate(
        "struct", "list_head", 16, [("next", lh_ptr, 0), ("prev", lh_ptr, 64)]
    )
    ids["list_head_ptr"] = w.add("ptr", "", ids["list_head"])
    assert ids["list_head_ptr"] == lh_ptr
    ids["comm"] = w.array(ids["char"], ids["int"], 16)
    # struct { long y; long z; } and union { int x; struct {...}; }, both anonymous
    ids["anon_struct"] = w.aggregate(
        "struct", "", 16, [("y", ids["ulong"], 0), ("z", ids["ulong"], 64)]
    )
    ids["anon_union"] = w.aggregate(
        "union", "", 16, [("x", ids["int"], 0), ("", ids["anon_struct"], 0)]
    )
    ids["task_ptr"] = w.count + 2
    ids["task_struct"] = w.aggregate(
        "struct",
        "task_struct",
        72,
        [
            ("__state", ids["uint"], 0),
            ("flag_a", ids["uint"], 32, 3),
            ("flag_b", ids["uint"], 35, 5),
            ("", ids["anon_union"], 64),
            ("comm", ids["comm"], 192),
            ("tasks", ids["list_head"], 320),
            ("real_parent", ids["task_ptr"], 448),
            ("pid", ids["int"], 512),
        ],
        kind_flag=True,
    )
    assert w.add("ptr", "", ids["task_struct"]) == ids["task_ptr"]
    # old-style bitfield (kind_flag clear): the int type carries width 4 and bit offset 2
    ids["u4"] = w.int_("u4", 4, bits=4, offset=2)
    ids["old"] = w.aggregate("struct", "old_bits", 4, [("lo", ids["u4"], 8)])
    # typedef chain: typedef const volatile unsigned int u32_t; typedef u32_t pid_like_t
    ids["volatile"] = w.add("volatile", "", ids["uint"])
    ids["const"] = w.add("const", "", ids["volatile"])
    ids["u32_t"] = w.add("typedef", "u32_t", ids["const"])
    ids["pid_like_t"] = w.add("typedef", "pid_like_t", ids["u32_t"])
    ids["lh_t"] = w.add("typedef", "lh_t", ids["list_head"])
    # nested path: struct mm_struct { struct { long pad; struct list_head pgd_list; } inner; ulong pgd; }
    ids["mm_inner"] = w.aggregate(
        "struct", "mm_inner", 24, [("pad", ids["ulong"], 0), ("pgd_list", ids["list_head"], 64)]
    )
    ids["mm_struct"] = w.aggregate(
        "struct", "mm_struct", 32, [("inner", ids["mm_inner"], 0), ("pgd", ids["ulong"], 192)]
    )
    # the remaining kinds, each followed by more types so a wrong trailing size would show
    ids["enum"] = w.add(
        "enum",
        "pid_type",
        4,
        vlen=2,
        extra=struct.pack("<IiIi", w.s("PIDTYPE_PID"), 0, w.s("PIDTYPE_MAX"), -1),
        kind_flag=True,
    )
    ids["fwd"] = w.add("fwd", "task_struct")  # a forward declaration of an existing struct
    ids["restrict"] = w.add("restrict", "", ids["list_head_ptr"])
    ids["func_proto"] = w.add(
        "func_proto",
        "",
        ids["int"],
        vlen=2,
        extra=struct.pack("<IIII", w.s("a"), ids["int"], w.s("b"), ids["char"]),
    )
    ids["func"] = w.add("func", "do_exit", ids["func_proto"])
    ids["var"] = w.add("var", "init_task", ids["task_struct"], extra=struct.pack("<I", 1))
    ids["datasec"] = w.add(
        "datasec", ".data", 72, vlen=1, extra=struct.pack("<III", ids["var"], 0, 72)
    )
    ids["float"] = w.add("float", "double", 8)
    ids["decl_tag"] = w.add("decl_tag", "user", ids["task_struct"], extra=struct.pack("<i", -1))
    ids["type_tag"] = w.add("type_tag", "percpu", ids["int"])
    ids["enum64"] = w.add(
        "enum64",
        "big",
        8,
        vlen=2,
        kind_flag=True,
        extra=struct.pack("<IIIIII", w.s("HUGE"), 0, 1, w.s("NEG"), 0xFFFFFFFE, 0xFFFFFFFF),
    )
    ids["last"] = w.aggregate("union", "last_one", 8, [("u", ids["ulong"], 0)])
    blob = w.blob()
    return Sample(Btf.parse(blob), blob, ids)


@pytest.fixture(scope="module")
def sample() -> Sample:
    return build_sample()


# ---- synthetic blobs: layout ------------------------------------------------------------------


def test_every_kind_is_indexed(sample: Sample) -> None:
    btf, ids = sample.btf, sample.ids
    assert len(btf) == ids["last"]
    expected = {
        "int": "int", "list_head_ptr": "ptr", "comm": "array", "task_struct": "struct",
        "anon_union": "union", "enum": "enum", "fwd": "fwd", "u32_t": "typedef",
        "volatile": "volatile", "const": "const", "restrict": "restrict", "func": "func",
        "func_proto": "func_proto", "var": "var", "datasec": "datasec", "float": "float",
        "decl_tag": "decl_tag", "type_tag": "type_tag", "enum64": "enum64", "last": "union",
    }  # fmt: skip
    for key, kind in expected.items():
        assert btf.kind(ids[key]) == kind, key
    assert set(expected.values()) | {"void"} >= {btf.kind(i) for i in range(len(btf) + 1)}
    assert btf.kind(0) == "void"
    assert btf.name(ids["last"]) == "last_one"  # every trailing size was right to get here
    assert btf.members("last_one") == [Member("u", ids["ulong"], 0, 0)]


def test_sizes(sample: Sample) -> None:
    btf, ids = sample.btf, sample.ids
    assert btf.size_of("int") == 4
    assert btf.size_of("char") == 1
    assert btf.size_of("long unsigned int") == 8
    assert btf.size_of("list_head") == 16
    assert btf.size_of("task_struct") == 72
    assert btf.size_of(ids["comm"]) == 16
    assert btf.size_of(ids["list_head_ptr"]) == 8
    assert btf.size_of("pid_like_t") == 4  # typedef -> typedef -> const -> volatile -> int
    assert btf.size_of(ids["var"]) == 72
    assert btf.size_of(ids["datasec"]) == 72
    assert btf.size_of("double") == 8
    assert btf.size_of(ids["type_tag"]) == 4
    assert btf.size_of(ids["enum64"]) == 8
    for no_size in ("func", "func_proto", "fwd"):
        with pytest.raises(BtfError):
            btf.size_of(ids[no_size])
    with pytest.raises(BtfError, match="void"):
        btf.size_of(0)


def test_resolve_and_targets(sample: Sample) -> None:
    btf, ids = sample.btf, sample.ids
    assert btf.resolve(ids["pid_like_t"]) == ids["uint"]
    assert btf.resolve(ids["type_tag"]) == ids["int"]
    assert btf.resolve(ids["task_struct"]) == ids["task_struct"]
    assert btf.resolve(0) == 0
    assert btf.target(ids["task_ptr"]) == ids["task_struct"]
    assert btf.target(ids["comm"]) == ids["char"]
    assert btf.nelems(ids["comm"]) == 16
    assert btf.target(ids["func"]) == ids["func_proto"]
    assert btf.int_encoding(ids["int"]) == (32, 0, 1)
    with pytest.raises(BtfError):
        btf.target(ids["int"])


def test_find(sample: Sample) -> None:
    btf, ids = sample.btf, sample.ids
    assert btf.find("task_struct") == ids["task_struct"]  # the struct wins over its fwd
    assert btf.find("task_struct", "fwd") == ids["fwd"]
    assert btf.find("u32_t") == ids["u32_t"]
    assert btf.find("do_exit", "func") == ids["func"]
    assert btf.find("init_task") == ids["var"]
    with pytest.raises(BtfError, match="'no_such_struct'"):
        btf.find("no_such_struct")
    with pytest.raises(BtfError, match="union named 'task_struct'"):
        btf.find("task_struct", "union")
    with pytest.raises(BtfError):
        btf.find("task")  # a prefix of a name is not a name
    with pytest.raises(BtfError):
        btf.find("ask_struct")  # nor a suffix nobody points at
    with pytest.raises(BtfError):
        btf.find("")


def test_members_and_bitfields(sample: Sample) -> None:
    btf, ids = sample.btf, sample.ids
    members = btf.members("task_struct")
    assert [m.name for m in members] == [
        "__state", "flag_a", "flag_b", "", "comm", "tasks", "real_parent", "pid",
    ]  # fmt: skip
    assert members[1] == Member("flag_a", ids["uint"], 32, 3)
    assert members[2] == Member("flag_b", ids["uint"], 35, 5)
    assert members[0].bitfield_size == 0
    # old-style bitfield: offset 8 plus the int's own offset 2, width from the int
    assert btf.members("old_bits") == [Member("lo", ids["u4"], 10, 4)]
    assert btf.members(ids["task_struct"]) == members
    assert btf.members("lh_t") == btf.members("list_head")  # typedefs are followed
    with pytest.raises(BtfError):
        btf.members(ids["int"])


def test_offsets(sample: Sample) -> None:
    btf, ids = sample.btf, sample.ids
    assert btf.offset_of("list_head", "next") == 0
    assert btf.offset_of("list_head", "prev") == 8
    assert btf.offset_of("task_struct", "__state") == 0
    assert btf.offset_of("task_struct", "flag_b") == 4
    assert btf.offset_of("task_struct", "x") == 8  # inside the anonymous union
    assert btf.offset_of("task_struct", "z") == 16  # anonymous struct inside anonymous union
    assert btf.offset_of("task_struct", "comm") == 24
    assert btf.offset_of("task_struct", "tasks") == 40
    assert btf.offset_of("task_struct", "tasks.prev") == 48
    assert btf.offset_of("task_struct", "pid") == 64
    assert btf.offset_of("mm_struct", "inner.pgd_list.prev") == 16
    assert btf.offset_of("mm_struct", "pgd") == 24
    assert btf.offset_of("lh_t", "prev") == 8
    assert btf.member_type("task_struct", "comm") == ids["comm"]
    assert btf.member_type("task_struct", "z") == ids["ulong"]
    assert btf.member_type("task_struct", "real_parent") == ids["task_ptr"]
    assert btf.has_member("task_struct", "y")
    assert not btf.has_member("task_struct", "state")
    assert not btf.has_member("no_such", "pid")
    assert not btf.has_member("task_struct", "real_parent.pid")  # no walking through pointers


def test_offset_errors_name_struct_and_field(sample: Sample) -> None:
    btf = sample.btf
    with pytest.raises(BtfError, match=r"task_struct has no member 'state'"):
        btf.offset_of("task_struct", "state")
    with pytest.raises(BtfError, match=r"task_struct\.tasks has no member 'nxt'"):
        btf.offset_of("task_struct", "tasks.nxt")
    with pytest.raises(BtfError, match=r"task_struct\.pid is a int"):
        btf.offset_of("task_struct", "pid.x")
    with pytest.raises(BtfError, match="'vm_area_struct'"):
        btf.offset_of("vm_area_struct", "vm_start")
    with pytest.raises(BtfError, match="struct or union named 'u32_t'"):
        btf.offset_of("u32_t", "x")
    with pytest.raises(BtfError, match="not a struct"):
        btf.members(sample.ids["u32_t"])


def test_enumerators(sample: Sample) -> None:
    btf = sample.btf
    assert btf.enumerators("pid_type") == {"PIDTYPE_PID": 0, "PIDTYPE_MAX": -1}
    assert btf.enumerators("big") == {"HUGE": 1 << 32, "NEG": -2}


def test_big_endian_blob() -> None:
    w = BtfWriter()
    w.int_("int", 4)
    little = w.blob()
    # swap every u32 of header (after magic/version/flags) and types; the string section is bytes
    header = struct.pack(">HBBIIIII", 0xEB9F, 1, 0, *struct.unpack_from("<IIIII", little, 4))
    types = b"".join(struct.pack(">I", v) for v in struct.unpack_from("<4I", little, 24))
    btf = Btf.parse(header + types + little[24 + 16 :])
    assert btf.kind(1) == "int"
    assert btf.size_of("int") == 4


# ---- malformed blobs --------------------------------------------------------------------------


def exercise(btf: Btf) -> None:
    """Call every query on every type; only BtfError may come out."""
    for type_id in range(-1, len(btf) + 3):
        for call in (
            btf.kind,
            btf.name,
            btf.resolve,
            btf.size_of,
            btf.members,
            btf.target,
            btf.nelems,
            btf.int_encoding,
            btf.enumerators,
        ):
            try:
                call(type_id)
            except BtfError:
                pass
    for name in ("task_struct", "list_head", "pid_type", "lh_t", "int"):
        for path in ("pid", "tasks.prev", "z", "prev"):
            try:
                btf.offset_of(name, path)
                btf.member_type(name, path)
            except BtfError:
                pass
            btf.has_member(name, path)
        try:
            btf.find(name)
        except BtfError:
            pass


def test_bad_magic_and_version(sample: Sample) -> None:
    w = BtfWriter()
    w.int_("int", 4)
    with pytest.raises(BtfError, match="magic"):
        Btf.parse(w.blob(magic=0x1234))
    with pytest.raises(BtfError, match="version 2"):
        Btf.parse(w.blob(version=2))
    with pytest.raises(BtfError, match="shorter than its header"):
        Btf.parse(b"\x9f\xeb\x01")
    with pytest.raises(BtfError):
        Btf.parse(b"")


def test_every_truncation_is_a_btf_error(sample: Sample) -> None:
    for length in range(len(sample.blob)):
        with pytest.raises(BtfError):
            Btf.parse(sample.blob[:length])


def test_type_records_that_do_not_fit(sample: Sample) -> None:
    blob = bytearray(sample.blob)
    # claim a shorter type section: the last record now overruns it
    struct.pack_into("<I", blob, 12, struct.unpack_from("<I", blob, 12)[0] - 4)
    with pytest.raises(BtfError, match="truncated"):
        Btf.parse(bytes(blob))
    # an unknown kind in the first record
    blob = bytearray(sample.blob)
    struct.pack_into("<I", blob, 24 + 4, 25 << 24)
    with pytest.raises(BtfError, match="unknown kind 25"):
        Btf.parse(bytes(blob))
    # a header length past the blob
    blob = bytearray(sample.blob)
    struct.pack_into("<I", blob, 4, len(blob) + 1)
    with pytest.raises(BtfError, match="header length"):
        Btf.parse(bytes(blob))


def test_type_id_and_string_out_of_range() -> None:
    w = BtfWriter()
    w.aggregate("struct", "broken", 8, [("a", 99, 0)])  # member of a type that does not exist
    w.aggregate("struct", "broken_kf", 8, [("a", 99, 0)], kind_flag=True)
    w.types += struct.pack("<III", 5000, KIND["typedef"] << 24, 1)  # name beyond the strings
    w.count += 1
    loop = w.add("typedef", "loop", w.count + 1)  # typedef loop -> loop2 -> loop
    w.add("typedef", "loop2", loop)
    btf = Btf.parse(w.blob())
    with pytest.raises(BtfError, match="99 out of range"):
        btf.members("broken")  # an old-style member's int type must be looked at
    assert btf.members("broken_kf") == [Member("a", 99, 0, 0)]
    with pytest.raises(BtfError, match="99 out of range"):
        btf.size_of(btf.member_type("broken_kf", "a"))
    with pytest.raises(BtfError, match="out of range"):
        btf.kind(len(btf) + 1)
    with pytest.raises(BtfError, match="string offset"):
        btf.name(3)
    with pytest.raises(BtfError, match="cycle"):
        btf.resolve(loop)
    with pytest.raises(BtfError):
        btf.size_of("loop2")
    exercise(btf)


def test_random_damage_raises_only_btf_error(sample: Sample) -> None:
    rng = random.Random(0xEB9F)
    for _ in range(400):
        blob = bytearray(sample.blob)
        for _ in range(rng.randint(1, 6)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        try:
            btf = Btf.parse(bytes(blob))
        except BtfError:
            continue
        exercise(btf)


# ---- reading from memory ----------------------------------------------------------------------


def test_btf_from_memory(sample: Sample) -> None:
    base = 0xFFFFFFFF82438070
    memory = sample.blob + b"\xcc" * 100  # __stop_BTF may sit past the blob's end
    reads: list[tuple[int, int]] = []

    def read(address: int, length: int) -> bytes:
        reads.append((address, length))
        offset = address - base
        assert 0 <= offset and offset + length <= len(memory)
        return memory[offset : offset + length]

    btf = btf_from_memory(read, base, base + len(memory))
    assert btf.offset_of("task_struct", "comm") == 24
    assert sum(length for _, length in reads[1:]) == len(sample.blob)  # header, then just the blob
    with pytest.raises(BtfError, match="more than __stop_BTF"):
        btf_from_memory(read, base, base + len(sample.blob) - 1)
    with pytest.raises(BtfError, match="empty"):
        btf_from_memory(read, base, base)
    with pytest.raises(BtfError, match="no BTF header"):
        btf_from_memory(lambda a, n: b"\0" * n, base, base + 100)


# ---- build-time extraction --------------------------------------------------------------------


def make_elf(sections: dict[str, bytes]) -> bytes:
    """A 64-bit little-endian ELF with the given sections (plus the null one and .shstrtab)."""
    names = b"\0"
    layout = []
    data = bytearray(64)
    for name, body in [*sections.items(), (".shstrtab", b"")]:
        name_off = len(names)
        names += name.encode() + b"\0"
        layout.append((name_off, len(data), body))
        data += body
    # .shstrtab's contents are only known now
    layout[-1] = (layout[-1][0], len(data), names)
    data += names
    shoff = len(data)
    data += bytes(64)  # the null section
    for name_off, offset, body in layout:
        data += struct.pack("<IIQQQQIIQQ", name_off, 1, 2, 0, offset, len(body), 0, 0, 1, 0)
    header = b"\x7fELF\x02\x01\x01" + bytes(9)
    header += struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, len(layout) + 1, len(layout)
    )
    data[:64] = header
    return bytes(data)


def make_bzimage(payload: bytes, size: int) -> bytes:
    setup_sects = 3
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x20F)
    struct.pack_into("<II", image, 0x248, 0x40, len(payload) + 4)
    image += bytes(0x40) + payload + struct.pack("<I", size) + b"\0" * 32
    return bytes(image)


def lz4_literal_block(data: bytes) -> bytes:
    """An LZ4 block holding `data` as one literal run (valid, if not compressed)."""
    n = len(data)
    if n < 15:
        return bytes([n << 4]) + data
    rest = n - 15
    return bytes([0xF0]) + b"\xff" * (rest // 255) + bytes([rest % 255]) + data


def test_lz4_block_matches_and_overlaps() -> None:
    # literals "abc", then a match at distance 3 of length 4+5=9 (overlapping), then literals "!"
    block = bytes([0x35]) + b"abc" + b"\x03\x00" + bytes([0x10]) + b"!"
    assert btf_extract.lz4_block(block) == b"abc" + b"abcabcabc" + b"!"
    # long literal and long match lengths use the 255-extension bytes
    literal = bytes(range(256)) * 2
    assert btf_extract.lz4_block(lz4_literal_block(literal)) == literal
    long_match = bytes([0x1F]) + b"z" + b"\x01\x00" + b"\xff\x05" + bytes([0x10]) + b"."
    assert btf_extract.lz4_block(long_match) == b"z" * (1 + 15 + 255 + 5 + 4) + b"."
    with pytest.raises(btf_extract.ExtractError):
        btf_extract.lz4_block(bytes([0x10]) + b"a" + b"\x05\x00")  # reaches before the block
    with pytest.raises(btf_extract.ExtractError):
        btf_extract.lz4_block(bytes([0x50]) + b"ab")  # truncated literals
    with pytest.raises(btf_extract.ExtractError):
        btf_extract.lz4_block(bytes([0x10]) + b"a" + b"\x01")  # truncated match offset


def lz4_legacy(data: bytes) -> bytes:
    out = struct.pack("<I", btf_extract.LZ4_LEGACY_MAGIC)
    for start in range(0, len(data), 1 << 16):
        block = lz4_literal_block(data[start : start + (1 << 16)])
        out += struct.pack("<I", len(block)) + block
    return out


@pytest.mark.parametrize("compression", ["lz4", "gzip", "xz"])
def test_extract_from_synthetic_bzimage(tmp_path: Path, sample: Sample, compression: str) -> None:
    import lzma

    elf = make_elf({".text": b"\x90" * 300, ".BTF": sample.blob, ".data": b"x" * 50})
    payload = {
        "lz4": lz4_legacy,
        "gzip": lambda d: gzip.compress(d, mtime=0),
        "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    }[compression](elf)
    vmlinuz = tmp_path / "vmlinuz-9.9.9-test"
    vmlinuz.write_bytes(make_bzimage(payload, len(elf)))
    name, decompressed = btf_extract.decompress_payload(
        btf_extract.bzimage_payload(vmlinuz.read_bytes())
    )
    assert (name, decompressed) == (compression, elf)
    assert btf_extract.extract_btf(vmlinuz) == sample.blob
    path = btf_extract.cached_btf(vmlinuz, "9.9.9-test")
    assert path == tmp_path / "btf-9.9.9-test.bin"
    assert path.read_bytes() == sample.blob
    path.write_bytes(b"kept")  # a cached blob is not extracted again
    assert btf_extract.cached_btf(vmlinuz, "9.9.9-test").read_bytes() == b"kept"


@pytest.mark.skipif(shutil.which("lz4") is None, reason="the lz4 command is not installed")
def test_lz4_decoder_agrees_with_the_lz4_command(tmp_path: Path) -> None:
    rng = random.Random(1)
    words = [bytes(rng.randrange(97, 123) for _ in range(rng.randint(1, 12))) for _ in range(200)]
    text = b" ".join(rng.choice(words) for _ in range(40_000))  # ~270 KB
    data = text * 34  # ~9 MB: two legacy blocks, the second partial
    done = subprocess.run(["lz4", "-l", "-c"], input=data, capture_output=True, check=True)
    assert btf_extract.lz4_legacy_decompress(done.stdout + b"\x12\x34\x56\x78") == data


def test_extraction_failures_never_fail_the_build(tmp_path: Path, caplog) -> None:
    vmlinuz = tmp_path / "vmlinuz-1"
    vmlinuz.write_bytes(b"not a kernel" * 100)
    assert btf_extract.cached_btf(vmlinuz, "1") is None
    assert "no BTF for kernel 1" in caplog.text
    elf = make_elf({".text": b"\x90"})
    vmlinuz.write_bytes(make_bzimage(gzip.compress(elf), len(elf)))
    with pytest.raises(btf_extract.ExtractError, match="no .BTF section"):
        btf_extract.extract_btf(vmlinuz)
    bogus = make_elf({".BTF": b"\x9f\xeb\x01\x00" + bytes(30)})
    vmlinuz.write_bytes(make_bzimage(gzip.compress(bogus), len(bogus)))
    with pytest.raises(btf_extract.ExtractError, match="does not parse"):
        btf_extract.extract_btf(vmlinuz)
    assert btf_extract.cached_btf(vmlinuz, "1") is None


def test_guest_image_keeps_positional_construction() -> None:
    image = GuestImage(Path("k"), Path("i"), "r")
    assert image.btf is None and image.programs is None


# ---- the real guest kernel --------------------------------------------------------------------


@pytest.fixture(scope="module")
def guest_btf() -> Btf:
    """The demo guest kernel's BTF, extracted at build time; skipped if no kernel is cached."""
    if not kernel.cached_kernels(default_cache_dir() / "kernels"):
        pytest.skip("the demo guest's kernel is not cached (run scripts/test or build_guest())")
    image = build_guest()
    assert image.btf is not None, f"no BTF was extracted from {image.kernel}"
    blob = image.btf.read_bytes()
    start = time.perf_counter()
    btf = Btf.parse(blob)
    btf.find("task_struct")
    elapsed = time.perf_counter() - start
    print(
        f"\nBTF of {image.release}: {len(blob)} bytes, {len(btf)} types, parsed in {elapsed:.3f}s"
    )  # a figure to read, not a timed assertion: these machines are noisy
    return btf


def test_guest_task_struct(guest_btf: Btf) -> None:
    btf = guest_btf
    size = btf.size_of("task_struct")
    for name in ("tasks", "pid", "tgid", "comm", "mm", "real_parent", "__state", "thread_pid"):
        assert btf.has_member("task_struct", name), name
        assert 0 <= btf.offset_of("task_struct", name) < size, name
    comm = btf.resolve(btf.member_type("task_struct", "comm"))
    assert btf.kind(comm) == "array" and btf.nelems(comm) == 16
    assert btf.size_of(btf.target(comm)) == 1
    assert btf.kind(btf.resolve(btf.member_type("task_struct", "mm"))) == "ptr"
    assert btf.kind(btf.resolve(btf.member_type("task_struct", "tasks"))) == "struct"
    assert btf.size_of(btf.member_type("task_struct", "pid")) == 4
    # the dotted path agrees with a walk of members()
    walked = {m.name: m.bit_offset // 8 for m in btf.members("task_struct") if m.name}
    for name in ("comm", "tasks", "pid", "tgid", "mm", "real_parent", "__state"):
        assert btf.offset_of("task_struct", name) == walked[name], name


def test_guest_other_structs(guest_btf: Btf) -> None:
    btf = guest_btf
    assert btf.size_of("list_head") == 16
    assert btf.offset_of("list_head", "next") == 0
    assert btf.offset_of("list_head", "prev") == 8
    assert btf.has_member("mm_struct", "pgd")
    assert btf.kind(btf.resolve(btf.member_type("mm_struct", "pgd"))) == "ptr"
    assert btf.offset_of("mm_struct", "pgd") < btf.size_of("mm_struct")
    assert btf.has_member("module", "list") and btf.has_member("module", "name")
    assert btf.offset_of("module", "list") < btf.offset_of("module", "name")
    assert btf.offset_of("task_struct", "tasks.next") == btf.offset_of("task_struct", "tasks")
    assert btf.enumerators("pid_type")["PIDTYPE_PID"] == 0
