"""A process's memory map (its VMAs), read out of guest memory the way /proc/PID/maps prints it.

An ``mm_struct`` holds its ``vm_area_struct``s in a maple tree (``mm->mm_mt``) since v6.1 (see
`maple`), before that in a list through ``vma->vm_next`` from ``mm->mmap``. Each line follows
``show_map_vma()`` (fs/proc/task_mmu.c): ``vm_start``, ``vm_end``, the permission letters from
``vm_flags`` (VM_READ, VM_WRITE, VM_EXEC, VM_MAYSHARE: include/linux/mm.h, unchanged since
2.6), the file offset (``vm_pgoff`` pages), the file's device and inode
(``file->f_inode->i_sb->s_dev``, ``->i_ino``) and its name (`dpath`), or a name the kernel gives:
a special mapping's own (``[vdso]``, ``[vvar]``: ``vm_special_mapping.name``), ``[heap]`` for the
VMA around ``mm->start_brk``/``mm->brk``, ``[stack]`` for the one holding ``mm->start_stack``,
``[anon:NAME]`` for anonymous memory named with prctl(PR_SET_VMA) (shared memory named that way,
``[anon_shmem:NAME]`` since v6.7, is shown by its file name). The vsyscall page (``[vsyscall]``) comes
last when the kernel maps it (``get_gate_vma()``).

Offsets come from BTF and addresses from kallsyms. Read with the guest stopped: a running guest
changes the tree under the walk.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmigdb.guest.base import GuestError, Mapping
from vmigdb.guest.linux import dpath
from vmigdb.guest.linux.guest import LinuxGuest
from vmigdb.guest.linux.kernel import FaultError
from vmigdb.guest.linux.maple import maple_entries
from vmigdb.guest.linux.structs import MAX_LIST_ENTRIES, field_offset, guest_btf
from vmigdb.guest.linux.tasks import Task

__all__ = ["Vma", "mappings", "special_name", "task_vmas"]

VM_READ, VM_WRITE, VM_EXEC, VM_MAYSHARE = 0x1, 0x2, 0x4, 0x80
PAGE_SHIFT = 12
_MINOR_BITS = 20  # MINORBITS: the kernel's dev_t is major << 20 | minor
_CACHE_KEY = "vmas.layout"
_KERNEL_HALF = 1 << 63


@dataclass(frozen=True, slots=True)
class Vma:
    """One ``struct vm_area_struct``, as read.

    :ivar file: ``struct file *`` (0 for anonymous memory).
    """

    address: int
    start: int
    end: int
    flags: int
    pgoff: int
    file: int
    ops: int
    private: int
    anon_name: int


@dataclass(frozen=True, slots=True)
class _Layout:
    size: int
    start: int
    end: int
    mm: int
    flags: int
    pgoff: int
    file: int
    ops: int
    private: int
    anon_name: int | None
    next: int | None  # vm_next, before v6.1
    mm_mt: int | None
    mm_mmap: int | None
    start_brk: int
    brk: int
    start_stack: int
    f_inode: int
    i_sb: int
    i_ino: int
    s_dev: int
    special_name: int  # vm_special_mapping.name
    anon_name_name: int | None  # anon_vma_name.name


def _layout(guest: LinuxGuest) -> _Layout:
    cached = guest.memory.cache.get(_CACHE_KEY)
    if cached is not None:
        return cached
    btf = guest_btf(guest)
    v = "vm_area_struct"
    has_anon = btf.has_member(v, "anon_name")
    layout = _Layout(
        size=btf.size_of(v),
        start=field_offset(btf, v, "vm_start"),
        end=field_offset(btf, v, "vm_end"),
        mm=field_offset(btf, v, "vm_mm"),
        flags=field_offset(btf, v, "vm_flags"),
        pgoff=field_offset(btf, v, "vm_pgoff"),
        file=field_offset(btf, v, "vm_file"),
        ops=field_offset(btf, v, "vm_ops"),
        private=field_offset(btf, v, "vm_private_data"),
        anon_name=field_offset(btf, v, "anon_name") if has_anon else None,
        next=field_offset(btf, v, "vm_next") if btf.has_member(v, "vm_next") else None,
        mm_mt=field_offset(btf, "mm_struct", "mm_mt") if btf.has_member("mm_struct", "mm_mt")
        else None,
        mm_mmap=field_offset(btf, "mm_struct", "mmap") if btf.has_member("mm_struct", "mmap")
        else None,
        start_brk=field_offset(btf, "mm_struct", "start_brk"),
        brk=field_offset(btf, "mm_struct", "brk"),
        start_stack=field_offset(btf, "mm_struct", "start_stack"),
        f_inode=field_offset(btf, "file", "f_inode"),
        i_sb=field_offset(btf, "inode", "i_sb"),
        i_ino=field_offset(btf, "inode", "i_ino"),
        s_dev=field_offset(btf, "super_block", "s_dev"),
        special_name=field_offset(btf, "vm_special_mapping", "name"),
        anon_name_name=field_offset(btf, "anon_vma_name", "name") if has_anon else None,
    )  # fmt: skip
    if layout.mm_mt is None and (layout.mm_mmap is None or layout.next is None):
        raise GuestError(
            "BTF has neither mm_struct.mm_mt nor mm_struct.mmap/vm_area_struct.vm_next"
        )
    guest.memory.cache[_CACHE_KEY] = layout
    return layout


def _u(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 8], "little")


def _read_vma(guest: LinuxGuest, layout: _Layout, address: int) -> tuple[Vma, int, bytes]:
    data = guest.memory.read(address, layout.size)
    vma = Vma(
        address=address,
        start=_u(data, layout.start),
        end=_u(data, layout.end),
        flags=_u(data, layout.flags),
        pgoff=_u(data, layout.pgoff),
        file=_u(data, layout.file),
        ops=_u(data, layout.ops),
        private=_u(data, layout.private),
        anon_name=_u(data, layout.anon_name) if layout.anon_name is not None else 0,
    )
    return vma, _u(data, layout.mm), data


def task_vmas(guest: LinuxGuest, mm: int) -> list[Vma]:
    """The VMAs of ``struct mm_struct *mm``, by address.

    :raises GuestError: if BTF lacks a field used or a structure is implausible (a VMA of
        another mm, an empty or unaligned range: the guest changed it under the walk, or it is
        corrupted)
    :raises FaultError: if a structure cannot be read
    """
    layout = _layout(guest)
    out: list[Vma] = []
    if layout.mm_mt is not None:
        seen: set[int] = set()
        for _first, _last, entry in maple_entries(guest, mm + layout.mm_mt):
            if entry in seen:
                continue
            seen.add(entry)
            out.append(_checked(guest, layout, entry, mm))
    else:
        assert layout.mm_mmap is not None and layout.next is not None
        node = guest.memory.u64(mm + layout.mm_mmap)
        for _ in range(MAX_LIST_ENTRIES):
            if not node:
                break
            vma = _checked(guest, layout, node, mm)
            out.append(vma)
            node = guest.memory.u64(node + layout.next)
        else:
            raise GuestError(f"mm {mm:#x}: more than {MAX_LIST_ENTRIES} VMAs (corrupted list?)")
    out.sort(key=lambda v: v.start)
    return out


def _checked(guest: LinuxGuest, layout: _Layout, address: int, mm: int) -> Vma:
    if not address & _KERNEL_HALF or address & 7:
        raise GuestError(f"mm {mm:#x}: VMA pointer {address:#x} is not a kernel address")
    vma, owner, _ = _read_vma(guest, layout, address)
    if owner != mm or vma.start >= vma.end or (vma.start | vma.end) & 0xFFF:
        raise GuestError(
            f"mm {mm:#x}: VMA {address:#x} [{vma.start:#x}, {vma.end:#x}) is not one of its own "
            "(the guest changed it, or it is corrupted)"
        )
    return vma


def _perms(flags: int) -> str:
    return (
        ("r" if flags & VM_READ else "-")
        + ("w" if flags & VM_WRITE else "-")
        + ("x" if flags & VM_EXEC else "-")
        + ("s" if flags & VM_MAYSHARE else "p")
    )


def _special_ops(guest: LinuxGuest) -> int | None:
    symbol = guest.symbols.lookup("special_mapping_vmops")
    return symbol.address if symbol is not None else None


def special_name(guest: LinuxGuest, vma: Vma) -> str | None:
    """A special mapping's name (``[vdso]``, ``[vvar]``), None for any other VMA.

    :raises FaultError: if the mapping cannot be read
    """
    special = _special_ops(guest)
    if special is None or vma.ops != special or not vma.private:
        return None
    layout = _layout(guest)
    return guest.memory.string(guest.memory.u64(vma.private + layout.special_name), 64)


def _anon_name(guest: LinuxGuest, layout: _Layout, vma: Vma) -> str | None:
    if not vma.anon_name or layout.anon_name_name is None:
        return None
    return guest.memory.string(vma.anon_name + layout.anon_name_name, 80)


def _mapping(guest: LinuxGuest, layout: _Layout, vma: Vma, mm_fields: tuple[int, int, int],
             special_ops: int | None) -> Mapping:  # fmt: skip
    mem = guest.memory
    start_brk, brk, start_stack = mm_fields
    dev, ino, offset, name = (0, 0), 0, 0, ""
    if vma.file:
        inode = mem.u64(vma.file + layout.f_inode)
        raw_dev = mem.u32(mem.u64(inode + layout.i_sb) + layout.s_dev)
        dev = (raw_dev >> _MINOR_BITS, raw_dev & ((1 << _MINOR_BITS) - 1))
        ino = mem.u64(inode + layout.i_ino)
        offset = vma.pgoff << PAGE_SHIFT
        # anon_name shares a union with the file's interval-tree node before v6.7 (commit
        # d09e8ca6cb93, "mm: anonymous shared memory naming"): a file mapping's name is its path.
        name = dpath.file_path(guest, vma.file)
    elif special_ops is not None and vma.ops == special_ops and vma.private:
        name = mem.string(mem.u64(vma.private + layout.special_name), 64)
    elif vma.start <= brk and vma.end >= start_brk:
        name = "[heap]"
    elif vma.start <= start_stack <= vma.end:
        name = "[stack]"
    else:
        anon = _anon_name(guest, layout, vma)
        if anon is not None:
            name = f"[anon:{anon}]"
    return Mapping(vma.start, vma.end, _perms(vma.flags), offset, dev, ino, name)


def _gate(guest: LinuxGuest, layout: _Layout) -> Mapping | None:
    """The vsyscall page (``get_gate_vma()``), listed last when the kernel maps it."""
    mode = guest.symbols.lookup("vsyscall_mode")
    gate = guest.symbols.lookup("gate_vma")
    if mode is None or gate is None:
        return None
    try:
        none = guest_btf(guest).enumerators("vsyscall_mode").get("NONE")
    except Exception:  # noqa: BLE001 - no such enum in BTF: cannot tell, list nothing
        return None
    if none is None or guest.memory.u32(mode.address) == none:
        return None
    vma, _, _ = _read_vma(guest, layout, gate.address)
    return Mapping(vma.start, vma.end, _perms(vma.flags), 0, (0, 0), 0, "[vsyscall]")


def mappings(guest: LinuxGuest, task: Task) -> list[Mapping]:
    """/proc/PID/maps for `task`, one `Mapping` per line.

    :raises GuestError: if the task has no address space (a kernel thread), or as `task_vmas`
    :raises FaultError: if a structure cannot be read
    """
    if not task.mm:
        raise GuestError(f"{task.comm} (pid {task.pid}) is a kernel thread: it has no memory map")
    layout = _layout(guest)
    mem = guest.memory
    fields = (
        mem.u64(task.mm + layout.start_brk),
        mem.u64(task.mm + layout.brk),
        mem.u64(task.mm + layout.start_stack),
    )
    special = _special_ops(guest)
    out = [_mapping(guest, layout, vma, fields, special) for vma in task_vmas(guest, task.mm)]
    try:
        gate = _gate(guest, layout)
    except FaultError:
        gate = None
    if gate is not None:
        out.append(gate)
    return out
