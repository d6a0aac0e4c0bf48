"""A file's pages in the guest's page cache: the bytes of a mapped file a process has not touched.

A process's page tables map only the pages it has used; the rest of a mapped file (a library's
symbol tables, its unwind tables) may still be in guest memory, in the page cache, where any
process reading the file would find it. ``file->f_mapping->i_pages`` is an XArray
(lib/xarray.c) from page index to ``struct page *``: ``xa_head`` is the entry itself for index 0,
or a node (``xa_is_node``: low bits 10, above 4096) whose ``slots[64]`` each cover
``1 << shift`` indices; entries with bit 0 set are values (swap or shadow entries: the page is
not in memory), and sibling entries (internal, below 62) point to the slot holding a large folio.
The page's physical frame is its index in the ``vmemmap`` array (``vmemmap_base``, x86-64's
CONFIG_SPARSEMEM_VMEMMAP): ``pfn = (page - vmemmap_base) / sizeof(struct page)``.

A special mapping has no file: its pages are the kernel's own, listed in its
``vm_special_mapping.pages`` (``special_mapping_fault`` maps page ``pgoff`` of them), which
`special_page` reads the same way. x86's vDSO has a fault handler instead (``vdso_fault``): its
pages are the image the kernel carries, ``mm->context.vdso_image->data`` (`vdso_page`).

Read-only, bounded (at most `MAX_LEVELS` node levels), and None whenever the page is not there.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmigdb.guest.base import GuestError
from vmigdb.guest.linux.btf import BtfError
from vmigdb.guest.linux.guest import LinuxGuest
from vmigdb.guest.linux.kernel import FaultError
from vmigdb.guest.linux.structs import field_offset, guest_btf

__all__ = ["file_page", "special_page", "vdso_page"]

PAGE = 0x1000
MAX_LEVELS = 8
_CACHE_KEY = "pagecache.layout"
_KERNEL_HALF = 1 << 63


@dataclass(frozen=True, slots=True)
class _Layout:
    f_mapping: int
    i_pages: int  # address_space.i_pages (struct xarray)
    xa_head: int
    node_shift: int
    node_slots: int
    chunk: int  # XA_CHUNK_SIZE
    page_size: int  # sizeof(struct page)
    page_index: int  # page.index (a folio's first index)
    special_pages: int  # vm_special_mapping.pages
    vmemmap_base: int


def _layout(guest: LinuxGuest) -> _Layout | None:
    cached = guest.memory.cache.get(_CACHE_KEY, False)
    if cached is not False:
        return cached
    layout = None
    base = guest.symbols.lookup("vmemmap_base")
    if base is not None:
        try:
            btf = guest_btf(guest)
            layout = _Layout(
                f_mapping=field_offset(btf, "file", "f_mapping"),
                i_pages=field_offset(btf, "address_space", "i_pages"),
                xa_head=field_offset(btf, "xarray", "xa_head"),
                node_shift=field_offset(btf, "xa_node", "shift"),
                node_slots=field_offset(btf, "xa_node", "slots"),
                chunk=btf.nelems(btf.resolve(btf.member_type("xa_node", "slots"))),
                page_size=btf.size_of("page"),
                page_index=field_offset(btf, "page", "index"),
                special_pages=field_offset(btf, "vm_special_mapping", "pages"),
                vmemmap_base=guest.memory.u64(base.address),
            )
        except (GuestError, BtfError):
            layout = None
    guest.memory.cache[_CACHE_KEY] = layout
    return layout


def _lookup(guest: LinuxGuest, layout: _Layout, xarray: int, index: int) -> int | None:
    """``xa_load(xarray, index)`` for a page cache: the ``struct page *`` (of the folio holding
    the index), or None."""
    mem = guest.memory
    entry = mem.u64(xarray + layout.xa_head)
    if not (entry & 3 == 2 and entry > 4096) and index:
        return None  # a single entry covers index 0 only
    for level in range(MAX_LEVELS):
        if entry & 3 != 2 or entry <= 4096:  # not a node
            break
        node = entry - 2
        shift = mem.u8(node + layout.node_shift)
        if level == 0 and index >> shift >= layout.chunk:
            return None  # beyond what the tree covers
        offset = (index >> shift) & (layout.chunk - 1)
        entry = mem.u64(node + layout.node_slots + 8 * offset)
        if entry & 3 == 2 and entry >> 2 < layout.chunk - 1:  # a sibling: the folio is there
            entry = mem.u64(node + layout.node_slots + 8 * (entry >> 2))
    else:
        return None
    if not entry or entry & 1 or not entry & _KERNEL_HALF:
        return None  # empty, or a value entry (swapped out, or a shadow of an evicted page)
    return entry


def file_page(guest: LinuxGuest, file: int, index: int) -> int | None:
    """Physical address of page `index` of ``struct file *file`` if it is in the page cache.

    :raises FaultError: if the mapping cannot be read
    """
    layout = _layout(guest)
    if layout is None or not file:
        return None
    mem = guest.memory
    mapping = mem.u64(file + layout.f_mapping)
    if not mapping & _KERNEL_HALF:
        return None
    try:
        page = _lookup(guest, layout, mapping + layout.i_pages, index)
        if page is None:
            return None
        first = mem.u64(page + layout.page_index)  # a large folio's first index
    except FaultError:
        return None
    if page < layout.vmemmap_base:
        return None
    pfn = (page - layout.vmemmap_base) // layout.page_size
    if 0 <= index - first < 512:
        pfn += index - first
    return pfn * PAGE


MAX_SPECIAL_PAGES = 64


def special_page(guest: LinuxGuest, mapping: int, index: int) -> int | None:
    """Physical address of page `index` of a special mapping (``struct vm_special_mapping *``),
    or None.

    :raises FaultError: if the mapping cannot be read
    """
    layout = _layout(guest)
    if layout is None or not mapping or not 0 <= index < MAX_SPECIAL_PAGES:
        return None
    mem = guest.memory
    pages = mem.u64(mapping + layout.special_pages)
    if not pages & _KERNEL_HALF:
        return None  # it has a fault handler instead ([vvar])
    for i in range(index + 1):
        page = mem.u64(pages + 8 * i)
        if not page:
            return None  # the list ends before that page
    if page < layout.vmemmap_base:
        return None
    return (page - layout.vmemmap_base) // layout.page_size * PAGE


def vdso_page(guest: LinuxGuest, mm: int, index: int) -> int | None:
    """Physical address of page `index` of the vDSO of ``struct mm_struct *mm`` (x86), or None.

    :raises FaultError: if the mm cannot be read
    """
    try:
        btf = guest_btf(guest)
        image_at = field_offset(btf, "mm_struct", "context.vdso_image")
        data_at = field_offset(btf, "vdso_image", "data")
        size_at = field_offset(btf, "vdso_image", "size")
    except GuestError:
        return None
    mem = guest.memory
    image = mem.u64(mm + image_at)
    if not image & _KERNEL_HALF:
        return None
    data, size = mem.u64(image + data_at), mem.u64(image + size_at)
    if not data & _KERNEL_HALF or not 0 <= index < size // PAGE:
        return None
    return mem.translate(data + index * PAGE)
