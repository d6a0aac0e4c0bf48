"""BPF Type Format (BTF): the kernel's own description of its types, read for struct layouts.

vmigdb takes every offset it needs (``task_struct.comm``, ``mm_struct.pgd``, ``module.list``, ...)
from the guest kernel's BTF (CONFIG_DEBUG_INFO_BTF=y), so nothing is hard-coded per kernel version.

Why our own parser: no pure-Python BTF reader is kept on PyPI, and drgn (which reads BTF well) needs
a whole ``drgn.Program`` over a core dump or live kernel plus its native library. The format is small
(include/uapi/linux/btf.h, Documentation/bpf/btf.rst), so this module reads it directly.

Theory of operation:
- ``Btf.parse`` checks the header and walks the type section once with ``struct.unpack_from``,
  recording where each type starts (type ids are 1-based; 0 is ``void``). Every kind's trailing data
  is sized so the walk lands exactly on the section's end, or the blob is rejected.
- Names, members and layouts are decoded only when asked for, then cached: a full vmlinux BTF
  (~5 MB, ~100k types) is indexed in well under a second.
- Anything malformed (bad magic, truncation, a type id or string offset out of range, a cycle of
  typedefs) raises ``BtfError``, never ``IndexError`` or ``struct.error``.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from vmigdb.guest.base import GuestError

__all__ = ["Btf", "BtfError", "Member", "btf_from_memory"]

BTF_MAGIC = 0xEB9F
BTF_VERSION = 1
HEADER_LEN = 24  # struct btf_header as of version 1; hdr_len may grow, fields after it are ignored
TYPE_LEN = 12  # struct btf_type: name_off, info, size/type
MAX_DEPTH = 64  # typedef chains and nested anonymous members deeper than this mean a cycle

# Kind number -> (name, fixed trailing bytes, trailing bytes per vlen entry).
KINDS: dict[int, tuple[str, int, int]] = {
    1: ("int", 4, 0),  # u32 encoding: bits 0-7 nr_bits, 16-23 bit offset, 24-27 flags
    2: ("ptr", 0, 0),
    3: ("array", 12, 0),  # struct btf_array: type, index_type, nelems
    4: ("struct", 0, 12),  # struct btf_member: name_off, type, offset
    5: ("union", 0, 12),
    6: ("enum", 0, 8),  # struct btf_enum: name_off, s32 val
    7: ("fwd", 0, 0),
    8: ("typedef", 0, 0),
    9: ("volatile", 0, 0),
    10: ("const", 0, 0),
    11: ("restrict", 0, 0),
    12: ("func", 0, 0),
    13: ("func_proto", 0, 8),  # struct btf_param: name_off, type
    14: ("var", 4, 0),  # struct btf_var: linkage
    15: ("datasec", 0, 12),  # struct btf_var_secinfo: type, offset, size
    16: ("float", 0, 0),
    17: ("decl_tag", 4, 0),  # struct btf_decl_tag: component_idx
    18: ("type_tag", 0, 0),
    19: ("enum64", 0, 12),  # struct btf_enum64: name_off, val_lo32, val_hi32
}
_FIXED = [0] * 32
_PER = [0] * 32
_VALID = [False] * 32
for _k, (_n, _f, _p) in KINDS.items():
    _FIXED[_k], _PER[_k], _VALID[_k] = _f, _p, True
del _k, _n, _f, _p

_QUALIFIERS = frozenset({"typedef", "const", "volatile", "restrict", "type_tag"})
_SIZED = frozenset({"int", "struct", "union", "enum", "enum64", "float", "datasec"})
_AGGREGATES = frozenset({"struct", "union"})
# find(name) without a kind: complete definitions first, declarations last.
_FIND_ORDER = (
    "struct",
    "union",
    "typedef",
    "enum",
    "enum64",
    "int",
    "float",
    "func",
    "var",
    "datasec",
    "fwd",
)


class BtfError(GuestError):
    """The BTF blob is malformed, or it has no type / member by the name asked for."""


@dataclass(frozen=True, slots=True)
class Member:
    """One member of a struct or union: ``name`` is "" for an anonymous struct/union member."""

    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int  # 0 unless a bitfield


class Btf:
    """A parsed BTF blob. Type ids are 1-based; 0 is ``void``. Pointers are ``pointer_size`` bytes."""

    pointer_size = 8  # BTF does not record it; vmigdb debugs x86-64 guests

    def __init__(self, blob: bytes, endian: str, types: tuple[int, int], strings: tuple[int, int]):
        self._blob = blob
        self._endian = endian
        self._t3 = struct.Struct(endian + "III").unpack_from
        self._u32 = struct.Struct(endian + "I").unpack_from
        self._types_start, self._types_end = types
        self._str_start, self._str_end = strings
        self._offsets = array("Q")  # blob offset of type id i+1
        self._name_offs = array("I")  # name_off of type id i+1
        self._by_name_off: dict[int, list[int]] | None = None
        self._found: dict[str, list[int]] = {}
        self._members: dict[int, list[Member]] = {}
        self._paths: dict[tuple[int, str], tuple[int, int]] = {}

    # ---- parsing --------------------------------------------------------------------------------

    @classmethod
    def parse(cls, blob: bytes) -> Btf:
        """Check the header and index every type.

        :raises BtfError: bad magic or version, sections outside the blob, a truncated or unknown
            type record
        """
        blob = bytes(blob)
        if len(blob) < HEADER_LEN:
            raise BtfError(f"BTF blob of {len(blob)} bytes is shorter than its header")
        magic = int.from_bytes(blob[:2], "little")
        if magic == BTF_MAGIC:
            endian = "<"
        elif magic == int.from_bytes(BTF_MAGIC.to_bytes(2, "big"), "little"):
            endian = ">"
        else:
            raise BtfError(f"not BTF: magic {magic:#06x}, expected {BTF_MAGIC:#06x}")
        _, version, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            endian + "HBBIIIII", blob
        )
        if version != BTF_VERSION:
            raise BtfError(f"BTF version {version} is not supported (only {BTF_VERSION})")
        if hdr_len < HEADER_LEN or hdr_len > len(blob):
            raise BtfError(f"BTF header length {hdr_len} is invalid for a {len(blob)}-byte blob")
        types = (hdr_len + type_off, hdr_len + type_off + type_len)
        strings = (hdr_len + str_off, hdr_len + str_off + str_len)
        for what, (start, end) in (("type", types), ("string", strings)):
            if end > len(blob):
                raise BtfError(
                    f"BTF {what} section [{start:#x}, {end:#x}) runs past the blob's end "
                    f"({len(blob):#x}): truncated"
                )
        if str_len and blob[strings[0]] != 0:
            raise BtfError("BTF string section does not start with the empty string")
        btf = cls(blob, endian, types, strings)
        btf._index()
        return btf

    def _index(self) -> None:
        """One pass over the type section: remember where each type record starts."""
        blob, unpack = self._blob, struct.Struct(self._endian + "II").unpack_from
        fixed, per, valid = _FIXED, _PER, _VALID
        pos, end = self._types_start, self._types_end
        starts: list[int] = []
        names: list[int] = []
        while pos < end:
            if pos + TYPE_LEN > end:
                raise BtfError(f"BTF type {len(starts) + 1} is truncated at offset {pos:#x}")
            name_off, info = unpack(blob, pos)
            kind = (info >> 24) & 0x1F
            if not valid[kind]:
                raise BtfError(f"BTF type {len(starts) + 1} has unknown kind {kind}")
            starts.append(pos)
            names.append(name_off)
            pos += TYPE_LEN + fixed[kind] + (info & 0xFFFF) * per[kind]
        if pos != end:
            raise BtfError(f"BTF type {len(starts)} runs past the type section's end: truncated")
        self._offsets.extend(starts)
        self._name_offs.extend(names)

    # ---- raw access -----------------------------------------------------------------------------

    def __len__(self) -> int:
        """The number of types, not counting ``void``; valid ids are 0..len(btf)."""
        return len(self._offsets)

    def _record(self, type_id: int) -> tuple[int, int, int, int]:
        """(blob offset, kind number, info, size-or-type) of a type; BtfError if the id is bad."""
        if not isinstance(type_id, int) or not 0 < type_id <= len(self._offsets):
            raise BtfError(f"BTF type id {type_id} out of range (1..{len(self._offsets)})")
        pos = self._offsets[type_id - 1]
        _, info, size = self._t3(self._blob, pos)
        return pos, (info >> 24) & 0x1F, info, size

    def _string(self, offset: int) -> str:
        start = self._str_start + offset
        if not 0 <= offset < self._str_end - self._str_start:
            raise BtfError(f"BTF string offset {offset:#x} out of range")
        end = self._blob.find(b"\0", start, self._str_end)
        if end < 0:
            raise BtfError(f"BTF string at offset {offset:#x} is not terminated")
        return self._blob[start:end].decode("utf-8", "replace")

    def name(self, type_id: int) -> str:
        """The type's own name ("" for anonymous types and for ``void``)."""
        if type_id == 0:
            return ""
        pos = self._record(type_id)[0]
        return self._string(self._u32(self._blob, pos)[0])

    def kind(self, type_id: int) -> str:
        """ "struct", "int", "ptr", ... (the BTF_KIND_* name in lower case); "void" for id 0."""
        if type_id == 0:
            return "void"
        return KINDS[self._record(type_id)[1]][0]

    # ---- lookups --------------------------------------------------------------------------------

    def _ids_named(self, name: str) -> list[int]:
        """Every type id named ``name``, in id order.

        Rather than decode ~100k names up front, search the string section for ``name\\0`` (in C,
        via bytes.find) and map each hit's offset to the types whose name_off points there.
        """
        ids = self._found.get(name)
        if ids is not None:
            return ids
        if self._by_name_off is None:
            by_name_off: dict[int, list[int]] = {}
            for type_id, name_off in enumerate(self._name_offs, 1):
                if name_off:
                    by_name_off.setdefault(name_off, []).append(type_id)
            self._by_name_off = by_name_off
        needle = name.encode() + b"\0"
        blob, start, end = self._blob, self._str_start, self._str_end
        ids = []
        if name:
            hit = blob.find(needle, start + 1, end)
            while hit >= 0:
                ids.extend(self._by_name_off.get(hit - start, ()))
                hit = blob.find(needle, hit + 1, end)
        ids.sort()
        self._found[name] = ids
        return ids

    def find(self, name: str, kind: str | None = None) -> int:
        """The type id named ``name`` (of ``kind`` if given, e.g. "struct").

        Without a kind, a struct or union wins over a typedef, and a forward declaration comes last.

        :raises BtfError: if no such type exists
        """
        ids = self._ids_named(name)
        if kind is not None:
            for type_id in ids:
                if self.kind(type_id) == kind:
                    return type_id
            raise BtfError(f"no BTF {kind} named {name!r}")
        if ids:
            by_kind: dict[str, int] = {}
            for type_id in ids:
                by_kind.setdefault(self.kind(type_id), type_id)
            for wanted in _FIND_ORDER:
                if wanted in by_kind:
                    return by_kind[wanted]
            return ids[0]
        raise BtfError(f"no BTF type named {name!r}")

    def target(self, type_id: int) -> int:
        """The type a ptr, typedef, qualifier, var, func or decl_tag refers to; an array's element.

        :raises BtfError: for kinds that refer to no other type
        """
        pos, kind, _, size_or_type = self._record(type_id)
        name = KINDS[kind][0]
        if name == "array":
            return self._u32(self._blob, pos + TYPE_LEN)[0]
        if name in _SIZED or name == "fwd":
            raise BtfError(f"BTF {name} (type {type_id}) refers to no other type")
        return size_or_type

    def nelems(self, type_id: int) -> int:
        """The element count of an array type."""
        pos, kind, _, _ = self._record(type_id)
        if KINDS[kind][0] != "array":
            raise BtfError(f"BTF type {type_id} is a {KINDS[kind][0]}, not an array")
        return self._u32(self._blob, pos + TYPE_LEN + 8)[0]

    def resolve(self, type_id: int) -> int:
        """Strip typedef, const, volatile, restrict and type_tag down to the underlying type."""
        for _ in range(MAX_DEPTH):
            if type_id == 0 or self.kind(type_id) not in _QUALIFIERS:
                return type_id
            type_id = self.target(type_id)
        raise BtfError(f"BTF typedef/qualifier chain deeper than {MAX_DEPTH} (a cycle?)")

    def _type_id(self, type_or_name: int | str) -> int:
        return self.find(type_or_name) if isinstance(type_or_name, str) else type_or_name

    def size_of(self, type_or_name: int | str) -> int:
        """``sizeof`` the type, in bytes.

        :raises BtfError: for void, functions and forward declarations, which have no size
        """
        type_id = self._type_id(type_or_name)
        for _ in range(MAX_DEPTH):
            type_id = self.resolve(type_id)
            if type_id == 0:
                raise BtfError("void has no size")
            _, kind, _, size = self._record(type_id)
            name = KINDS[kind][0]
            if name in _SIZED:
                return size
            if name == "ptr":
                return self.pointer_size
            if name == "var":
                type_id = self.target(type_id)
                continue
            if name == "array":
                count = self.nelems(type_id)
                return count * self.size_of(self.target(type_id)) if count else 0
            raise BtfError(f"BTF {name} {self.name(type_id)!r} (type {type_id}) has no size")
        raise BtfError(f"BTF type nesting deeper than {MAX_DEPTH} (a cycle?)")

    def int_encoding(self, type_id: int) -> tuple[int, int, int]:
        """(nr_bits, bit offset, flags) of an int type; flags: 1 signed, 2 char, 4 bool."""
        pos, kind, _, _ = self._record(type_id)
        if KINDS[kind][0] != "int":
            raise BtfError(f"BTF type {type_id} is a {KINDS[kind][0]}, not an int")
        encoding = self._u32(self._blob, pos + TYPE_LEN)[0]
        return encoding & 0xFF, (encoding >> 16) & 0xFF, (encoding >> 24) & 0x0F

    def enumerators(self, type_or_name: int | str) -> dict[str, int]:
        """An enum's (or enum64's) names and values, signed when the type says so."""
        type_id = self.resolve(self._type_id(type_or_name))
        pos, kind, info, _ = self._record(type_id)
        name, signed = KINDS[kind][0], bool(info >> 31)
        if name not in ("enum", "enum64"):
            raise BtfError(f"BTF type {type_id} is a {name}, not an enum")
        values: dict[str, int] = {}
        pos += TYPE_LEN
        for _ in range(info & 0xFFFF):
            if name == "enum":
                name_off, value = self._pair(pos)
                bits, pos = 32, pos + 8
            else:
                name_off, lo, hi = self._t3(self._blob, pos)
                value, bits, pos = lo | hi << 32, 64, pos + 12
            if signed and value >> (bits - 1):
                value -= 1 << bits
            values[self._string(name_off)] = value
        return values

    def _pair(self, pos: int) -> tuple[int, int]:
        return self._u32(self._blob, pos)[0], self._u32(self._blob, pos + 4)[0]

    # ---- structs and unions ---------------------------------------------------------------------

    def _aggregate(self, struct: int | str) -> int:
        if isinstance(struct, str):
            ids = self._ids_named(struct)
            found = [i for i in ids if self.kind(self.resolve(i)) in _AGGREGATES]
            if not found:
                raise BtfError(f"no BTF struct or union named {struct!r}")
            struct = found[0]
        type_id = self.resolve(struct)
        if self.kind(type_id) not in _AGGREGATES:
            raise BtfError(f"BTF type {struct} is a {self.kind(type_id)}, not a struct or union")
        return type_id

    def members(self, struct: int | str) -> list[Member]:
        """The members of a struct or union (by id or name; typedefs are followed), in order.

        Bit offsets come straight from BTF; for old-style bitfields (the struct's kind_flag clear)
        the int type's own bit offset and width are folded in.
        """
        type_id = self._aggregate(struct)
        cached = self._members.get(type_id)
        if cached is not None:
            return list(cached)
        pos, _, info, _ = self._record(type_id)
        kind_flag = bool(info >> 31)
        members: list[Member] = []
        pos += TYPE_LEN
        for _ in range(info & 0xFFFF):
            name_off, member_type, offset = self._t3(self._blob, pos)
            pos += 12
            if kind_flag:
                bit_offset, bitfield_size = offset & 0xFFFFFF, offset >> 24
            else:
                bit_offset, bitfield_size = offset, 0
                base = self.resolve(member_type)
                if base and self.kind(base) == "int":
                    nr_bits, int_offset, _ = self.int_encoding(base)
                    if int_offset or nr_bits != self.size_of(base) * 8:
                        bit_offset, bitfield_size = bit_offset + int_offset, nr_bits
            members.append(Member(self._string(name_off), member_type, bit_offset, bitfield_size))
        self._members[type_id] = members
        return list(members)

    def _lookup(self, type_id: int, field: str, depth: int = 0) -> tuple[int, int] | None:
        """(bit offset, type id) of ``field`` in the aggregate, looking into anonymous members."""
        if depth > MAX_DEPTH:
            raise BtfError(f"anonymous members nested deeper than {MAX_DEPTH} (a cycle?)")
        for member in self.members(type_id):
            if member.name == field:
                return member.bit_offset, member.type_id
        for member in self.members(type_id):
            if not member.name:
                inner = self.resolve(member.type_id)
                if self.kind(inner) in _AGGREGATES:
                    found = self._lookup(inner, field, depth + 1)
                    if found is not None:
                        return member.bit_offset + found[0], found[1]
        return None

    def _path(self, struct: str, path: str) -> tuple[int, int]:
        """(bit offset, type id) of a dotted member path, cached."""
        type_id = self._aggregate(struct)
        key = (type_id, path)
        cached = self._paths.get(key)
        if cached is not None:
            return cached
        bits, current, walked = 0, type_id, []
        for field in path.split("."):
            inner = self.resolve(current)
            if self.kind(inner) not in _AGGREGATES:
                raise BtfError(
                    f"{struct}.{'.'.join(walked)} is a {self.kind(inner)}, "
                    f"so it has no member {field!r}"
                )
            found = self._lookup(inner, field)
            if found is None:
                where = ".".join([struct, *walked])
                raise BtfError(f"BTF struct {where} has no member {field!r}")
            bits += found[0]
            current = found[1]
            walked.append(field)
        self._paths[key] = (bits, current)
        return bits, current

    def offset_of(self, struct: str, path: str) -> int:
        """Byte offset of ``path`` ("a" or "a.b.c") in ``struct``, seeing through anonymous
        struct/union members. For a bitfield, the byte holding its first bit.

        :raises BtfError: naming the struct and the field, if either is absent
        """
        return self._path(struct, path)[0] // 8

    def member_type(self, struct: str, path: str) -> int:
        """The type id of the member at ``path`` (unresolved: a typedef stays a typedef)."""
        return self._path(struct, path)[1]

    def has_member(self, struct: str, path: str) -> bool:
        """Whether ``struct`` has ``path``; False also when the struct itself is absent."""
        try:
            self._path(struct, path)
        except BtfError:
            return False
        return True


def btf_from_memory(read: Callable[[int, int], bytes], start: int, stop: int) -> Btf:
    """Read and parse the kernel's BTF from memory, between the symbols ``__start_BTF`` and
    ``__stop_BTF``.

    :param read: ``read(address, length) -> bytes`` over guest-virtual memory
    :raises BtfError: if the range is empty or the bytes there are not BTF
    """
    if stop <= start:
        raise BtfError(f"empty BTF range [{start:#x}, {stop:#x})")
    header = bytes(read(start, HEADER_LEN))
    if len(header) < HEADER_LEN or int.from_bytes(header[:2], "little") != BTF_MAGIC:
        raise BtfError(f"no BTF header at {start:#x}")
    hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from("<IIIII", header, 4)
    size = hdr_len + max(type_off + type_len, str_off + str_len)
    if size > stop - start:
        raise BtfError(f"BTF at {start:#x} claims {size} bytes, more than __stop_BTF allows")
    chunk = 1 << 20
    data = bytearray()
    while len(data) < size:
        part = read(start + len(data), min(chunk, size - len(data)))
        if not part:
            raise BtfError(f"short read of BTF at {start + len(data):#x}")
        data += part
    return Btf.parse(bytes(data))
