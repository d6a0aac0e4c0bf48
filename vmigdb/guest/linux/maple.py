"""Reading a maple tree (lib/maple_tree.c) out of guest memory: the VMAs of an mm since v6.1.

Since Linux kernel commit d4af56c5c7c6 ("mm: start tracking VMAs with maple tree") (in v6.1) an
``mm_struct``'s VMAs live in ``mm->mm_mt``, a B-tree of ranges: ``ma_root`` is either an entry
itself or an encoded node pointer. An encoded node (``struct maple_enode *``) is a ``maple_node``
address (256-byte aligned) with its type in bits 3-6; the root one has bit 1 set as well
(``xa_is_node``: the low two bits are 10 and the value is above 4096). Node types
(``enum maple_type``): ``maple_dense``, ``maple_leaf_64``, ``maple_range_64``,
``maple_arange_64``; the first two are leaves. Inside the
tree an internal node's slots hold child nodes only, encoded the same way without the root bit
(``mt_mk_node``: node | type << 3 | 4). A
``range_64`` node has 15 pivots and 16 slots, an ``arange_64`` node 9 pivots, 10 slots and gaps;
slot ``i`` covers ``(pivot[i-1], pivot[i]]``, the last used one up to the node's own maximum, and
a pivot of 0 past the first slot ends the node's data (``mas_data_end``). Counts and offsets come
from BTF, not constants.

The walk is read-only and bounded: at most `MAX_NODES` nodes and `MAX_HEIGHT` levels, so a tree
changing under the walk (the guest runs) or a corrupted one cannot loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from vmigdb.guest.base import GuestError
from vmigdb.guest.linux.btf import BtfError
from vmigdb.guest.linux.guest import LinuxGuest
from vmigdb.guest.linux.structs import field_offset, guest_btf

__all__ = ["MAX_NODES", "maple_entries"]

MAX_NODES = 1 << 16
MAX_HEIGHT = 31  # MAPLE_HEIGHT_MAX
_CACHE_KEY = "maple.layout"
_NODE_ALIGN_MASK = 0xFF  # MAPLE_NODE_MASK
_TYPE_SHIFT = 3  # MAPLE_NODE_TYPE_SHIFT
_TYPE_MASK = 0x0F  # MAPLE_NODE_TYPE_MASK
_KERNEL_HALF = 1 << 63
_MAX_INDEX = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class _NodeLayout:
    pivot: int  # offset of pivot[]
    pivots: int  # number of pivots
    slot: int  # offset of slot[]
    slots: int


@dataclass(frozen=True, slots=True)
class _Layout:
    ma_root: int
    node_size: int
    leaf_types: frozenset[int]
    nodes: dict[int, _NodeLayout]  # maple_type value -> layout


def _array(btf, struct: str, member: str) -> tuple[int, int]:
    """(offset, element count) of an array member of `struct`."""
    offset = field_offset(btf, struct, member)
    try:
        count = btf.nelems(btf.resolve(btf.member_type(struct, member)))
    except BtfError:
        raise GuestError(f"BTF: {struct}.{member} is not an array") from None
    return offset, count


def _layout(guest: LinuxGuest) -> _Layout:
    cached = guest.memory.cache.get(_CACHE_KEY)
    if cached is not None:
        return cached
    btf = guest_btf(guest)
    try:
        types = btf.enumerators("maple_type")
        node_size = btf.size_of("maple_node")
    except BtfError:
        raise GuestError("BTF has no enum maple_type or struct maple_node") from None
    r_pivot, r_pivots = _array(btf, "maple_range_64", "pivot")
    r_slot, r_slots = _array(btf, "maple_range_64", "slot")
    a_pivot, a_pivots = _array(btf, "maple_arange_64", "pivot")
    a_slot, a_slots = _array(btf, "maple_arange_64", "slot")
    range64 = _NodeLayout(r_pivot, r_pivots, r_slot, r_slots)
    nodes = {
        types["maple_leaf_64"]: range64,
        types["maple_range_64"]: range64,
        types["maple_arange_64"]: _NodeLayout(a_pivot, a_pivots, a_slot, a_slots),
    }
    layout = _Layout(
        ma_root=field_offset(btf, "maple_tree", "ma_root"),
        node_size=node_size,
        leaf_types=frozenset({types["maple_dense"], types["maple_leaf_64"]}),
        nodes=nodes,
    )
    guest.memory.cache[_CACHE_KEY] = layout
    return layout


def _is_node(entry: int) -> bool:
    return entry & 3 == 2 and entry > 4096  # xa_is_node()


def maple_entries(guest: LinuxGuest, tree: int) -> Iterator[tuple[int, int, int]]:
    """``(first index, last index, entry)`` of every non-empty range of the maple tree at `tree`,
    in index order (``mt_for_each``).

    :param tree: ``struct maple_tree *``
    :raises GuestError: if BTF lacks the maple-tree types, or the tree is corrupted (an unknown
        node type, more than `MAX_NODES` nodes)
    :raises FaultError: if a node cannot be read
    """
    layout = _layout(guest)
    mem = guest.memory
    root = mem.u64(tree + layout.ma_root)
    if not root:
        return
    if not _is_node(root):
        yield 0, 0, root  # a single entry at index 0 (mas_root_expand not yet needed)
        return
    budget = [MAX_NODES]
    yield from _walk(guest, layout, root, 0, _MAX_INDEX, budget, 0)


def _walk(
    guest: LinuxGuest,
    layout: _Layout,
    enode: int,
    low: int,
    high: int,
    budget: list[int],
    depth: int,
) -> Iterator[tuple[int, int, int]]:
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_HEIGHT:
        raise GuestError(
            f"maple tree: more than {MAX_NODES} nodes or {MAX_HEIGHT} levels (corrupted?)"
        )
    kind = (enode >> _TYPE_SHIFT) & _TYPE_MASK
    node = enode & ~_NODE_ALIGN_MASK
    shape = layout.nodes.get(kind)
    if shape is None or not node & _KERNEL_HALF:
        raise GuestError(f"maple tree: node {enode:#x} has an unknown type {kind}")
    raw = guest.memory.read(node, layout.node_size)
    pivots = [int.from_bytes(raw[shape.pivot + 8 * i : shape.pivot + 8 * i + 8], "little")
              for i in range(shape.pivots)]  # fmt: skip
    leaf = kind in layout.leaf_types
    start = low
    for i in range(shape.slots):
        if i < shape.pivots:
            pivot = pivots[i]
            if pivot == 0 and i > 0:
                break  # the end of this node's data
            last = min(pivot, high)
        else:
            last = high
        entry = int.from_bytes(raw[shape.slot + 8 * i : shape.slot + 8 * i + 8], "little")
        if entry:
            if leaf:
                if entry & 3 != 2:  # xa_is_internal(): a marker (XA_ZERO_ENTRY...), not an entry
                    yield start, last, entry
            else:  # an internal node's slots hold child nodes only
                yield from _walk(guest, layout, entry, start, last, budget, depth + 1)
        if last >= high:
            break
        start = last + 1
