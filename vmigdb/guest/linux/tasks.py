"""Linux tasks (processes and threads), read out of guest memory the way drgn's helpers read them.

Every offset comes from the guest kernel's BTF (`LinuxGuest.btf`) and every address from its
kallsyms, so nothing here is tied to one kernel version. Where the kernel's layout drifted, the
fallbacks are inline with the commit that changed it. Memory is only ever read.

Theory of operation:

- ``init_task`` is the head of the circular list ``task_struct.tasks`` that links every thread
  group leader (``for_each_process()``, include/linux/sched/signal.h). `for_each_task` walks it;
  ``init_task`` itself (pid 0, ``swapper/0``) is the head, not an entry, so, like ``ps``, it is
  not listed.
- A leader's threads hang off ``signal->thread_head`` through ``task_struct.thread_node``
  (``for_each_thread()``), or, on kernels that predate it, ``task_struct.thread_group``.
- Each task is read with one memory read spanning every field used (about 3 KiB); the next list
  pointer comes out of the same bytes.
- The layout (offsets, sizes, which variant of each field) is derived once per guest and kept in
  ``guest.memory.cache`` (drgn's ``prog.cache``).
- A walk stops with `GuestError` after `MAX_LIST_ENTRIES` entries or on a pointer that cannot be
  a kernel list node, so a corrupted (or racing) list cannot loop forever.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from vmigdb.guest.base import GuestError
from vmigdb.guest.linux.guest import LinuxGuest
from vmigdb.guest.linux.kernel import FaultError
from vmigdb.guest.linux.structs import (
    MAX_LIST_ENTRIES,
    field_offset,
    field_size,
    guest_btf,
    symbol_address,
)

__all__ = [
    "MAX_LIST_ENTRIES",
    "GuestError",
    "Task",
    "current_task",
    "find_task",
    "find_tasks",
    "for_each_task",
    "read_task",
    "task_cr3",
    "task_pgd",
]

_U64 = (1 << 64) - 1
_KERNEL_HALF = 1 << 63
# CR3 bits that are not the page-table base: PCID (bits 0-11) and, with page-table isolation,
# bit 12, which selects the user half of the 8 KiB PGD pair (arch/x86/entry/calling.h,
# PTI_USER_PGTABLE_BIT). Bits 52-63 hold the NOFLUSH flag and such.
CR3_PGD_MASK = 0x000F_FFFF_FFFF_E000
_CACHE_KEY = "tasks.layout"
# Used only when the kernel has no task_state_array symbol: fs/proc/array.c's letters, in bit
# order, identical from v4.14 (TASK_IDLE reported as "I") to at least v6.15.
_STATE_CHARS = "RSDTtXZPI"
_TASK_NOLOAD = 0x400  # include/linux/sched.h; TASK_IDLE = TASK_UNINTERRUPTIBLE | TASK_NOLOAD
_STATE_ENTRY = re.compile(r"([A-Za-z]) \(")  # "R (running)", "S (sleeping)", ...


@dataclass(frozen=True, slots=True)
class Task:
    """One task (a thread; the leader of a thread group is a process), as read at one moment.

    :ivar address: ``struct task_struct *``.
    :ivar pid: ``task->pid``, the thread id (global pid namespace).
    :ivar tgid: ``task->tgid``, the process id.
    :ivar ppid: ``task->real_parent->tgid``, as ``ps`` reports it (0 for pids 0, 1 and 2).
    :ivar comm: ``task->comm``, the executable name, at most 15 characters.
    :ivar mm: ``struct mm_struct *``; 0 for kernel threads (and for zombies).
    :ivar state: One letter, as in ``ps``: R running, S sleeping, D disk sleep, T stopped,
        t traced, X dead, Z zombie, P parked, I idle kernel thread.
    :ivar is_thread_leader: ``task->group_leader == task``.
    """

    address: int
    pid: int
    tgid: int
    ppid: int
    comm: str
    mm: int
    state: str
    is_thread_leader: bool


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where each field used lives, relative to ``span_start`` (the lowest offset read)."""

    span_start: int
    span_len: int
    tasks: int
    pid: int
    tgid: int
    real_parent: int
    group_leader: int
    mm: int
    comm: int
    comm_len: int
    state: int
    state_size: int
    exit_state: int
    signal: int | None  # task_struct.signal, with thread_head/thread_node
    thread_node: int | None
    thread_group: int | None  # before v6.7
    tgid_abs: int  # task_struct.tgid, for real_parent->tgid reads
    tasks_abs: int  # task_struct.tasks, for list heads and container_of()
    thread_head_abs: int | None  # signal_struct.thread_head
    thread_node_abs: int | None
    thread_group_abs: int | None
    mm_pgd: int  # mm_struct.pgd
    state_chars: str


def _state_chars(guest: LinuxGuest) -> str:
    """The ``ps`` letters by bit number, from the kernel's own ``task_state_array``.

    fs/proc/array.c: ``static const char * const task_state_array[] = { "R (running)", ... }``,
    one entry per TASK_REPORT bit plus "I (idle)"; drgn's ``task_state_to_char`` reads it the same
    way. Without that symbol (or if it reads oddly), the letters of v4.14 to v6.15.
    """
    sym = guest.symbols.lookup("task_state_array")
    if sym is None:
        return _STATE_CHARS
    chars = []
    try:
        for i in range(16):
            pointer = guest.memory.u64(sym.address + 8 * i)
            if not pointer & _KERNEL_HALF:
                break
            match = _STATE_ENTRY.match(guest.memory.string(pointer, 32))
            if match is None:
                break
            chars.append(match.group(1))
    except FaultError:
        pass
    text = "".join(chars)
    return text if text.startswith("RSD") and "P" in text else _STATE_CHARS


def _layout(guest: LinuxGuest) -> _Layout:
    cached = guest.memory.cache.get(_CACHE_KEY)
    if cached is not None:
        return cached
    btf = guest_btf(guest)
    ts = "task_struct"
    off = {name: field_offset(btf, ts, name) for name in ("tasks", "pid", "tgid", "comm", "mm")}
    off["real_parent"] = field_offset(btf, ts, "real_parent")
    off["group_leader"] = field_offset(btf, ts, "group_leader")
    off["exit_state"] = field_offset(btf, ts, "exit_state")
    # Since Linux kernel commit 2f064a59a11f ("sched: Change task_struct::state") (in v5.14) the
    # state is "unsigned int __state"; before, it was "volatile long state".
    state_name = "__state" if btf.has_member(ts, "__state") else "state"
    off["state"] = field_offset(btf, ts, state_name)
    state_size = field_size(btf, ts, state_name)
    comm_len = field_size(btf, ts, "comm")
    # Threads: since Linux kernel commit 0c740d0afc3b ("introduce for_each_thread() to replace
    # the buggy while_each_thread()") (in v3.14) a thread group is signal->thread_head, linked
    # through task_struct.thread_node; commit 8e1f385104ac ("kill task_struct->thread_group")
    # (in v6.7) removed the older ring through task_struct.thread_group.
    signal = thread_node = thread_group = thread_head = None
    if btf.has_member(ts, "thread_node") and btf.has_member("signal_struct", "thread_head"):
        signal = field_offset(btf, ts, "signal")
        thread_node = field_offset(btf, ts, "thread_node")
        thread_head = field_offset(btf, "signal_struct", "thread_head")
        off["signal"] = signal
        off["thread_node"] = thread_node
    elif btf.has_member(ts, "thread_group"):
        thread_group = field_offset(btf, ts, "thread_group")
        off["thread_group"] = thread_group
    else:
        raise GuestError("BTF has neither task_struct.thread_node nor task_struct.thread_group")
    sizes = {name: field_size(btf, ts, state_name if name == "state" else name) for name in off}
    for name in ("pid", "tgid", "exit_state"):  # pid_t and int: 4 bytes in every version
        if sizes[name] != 4:
            raise GuestError(f"BTF says task_struct.{name} is {sizes[name]} bytes, not 4")
    start = min(off.values())
    end = max(o + sizes[name] for name, o in off.items())
    rel = {name: o - start for name, o in off.items()}
    layout = _Layout(
        span_start=start,
        span_len=end - start,
        tasks=rel["tasks"],
        pid=rel["pid"],
        tgid=rel["tgid"],
        real_parent=rel["real_parent"],
        group_leader=rel["group_leader"],
        mm=rel["mm"],
        comm=rel["comm"],
        comm_len=comm_len,
        state=rel["state"],
        state_size=state_size,
        exit_state=rel["exit_state"],
        signal=rel.get("signal"),
        thread_node=rel.get("thread_node"),
        thread_group=rel.get("thread_group"),
        tgid_abs=off["tgid"],
        tasks_abs=off["tasks"],
        thread_head_abs=thread_head,
        thread_node_abs=thread_node,
        thread_group_abs=thread_group,
        mm_pgd=field_offset(btf, "mm_struct", "pgd"),
        state_chars=_state_chars(guest),
    )
    guest.memory.cache[_CACHE_KEY] = layout
    return layout


def _u(data: bytes, offset: int, size: int = 8) -> int:
    return int.from_bytes(data[offset : offset + size], "little")


def _state_letter(layout: _Layout, state: int, exit_state: int) -> str:
    """``task_state_to_char()`` (include/linux/sched.h, fs/proc/array.c), as drgn computes it.

    TASK_REPORT covers the bits below the last "real" letter (P in v4.14+); a letter's index is
    ``fls(state & TASK_REPORT)``. TASK_IDLE (TASK_UNINTERRUPTIBLE | TASK_NOLOAD) reads "I".
    """
    chars = layout.state_chars
    last = max(i for i, c in enumerate(chars) if c in "RSDTtXZP")
    bits = (state | exit_state) & ((1 << last) - 1)
    letter = chars[bits.bit_length()]
    if letter == "D" and (state & ~bits) == _TASK_NOLOAD and "I" in chars:
        return "I"
    return letter


def _parse(guest: LinuxGuest, layout: _Layout, address: int, data: bytes) -> Task:
    state = _u(data, layout.state, layout.state_size)
    exit_state = _u(data, layout.exit_state, 4)
    parent = _u(data, layout.real_parent)
    ppid = 0
    if parent and parent != address:
        try:
            ppid = guest.memory.u32(parent + layout.tgid_abs)
        except FaultError:
            ppid = 0
    comm = data[layout.comm : layout.comm + layout.comm_len].split(b"\0", 1)[0]
    return Task(
        address=address,
        pid=_u(data, layout.pid, 4),
        tgid=_u(data, layout.tgid, 4),
        ppid=ppid,
        comm=comm.decode("utf-8", "replace"),
        mm=_u(data, layout.mm),
        state=_state_letter(layout, state, exit_state),
        is_thread_leader=_u(data, layout.group_leader) == address,
    )


def _read_span(guest: LinuxGuest, layout: _Layout, address: int) -> bytes:
    return guest.memory.read(address + layout.span_start, layout.span_len)


def read_task(guest: LinuxGuest, address: int) -> Task:
    """The task at *address*.

    :param address: ``struct task_struct *``
    :raises FaultError: if the task cannot be read
    :raises GuestError: if BTF lacks a field used
    """
    layout = _layout(guest)
    return _parse(guest, layout, address, _read_span(guest, layout, address))


def _check_node(node: int, where: str) -> None:
    if not node & _KERNEL_HALF or node & 7:
        raise GuestError(f"{where}: list pointer {node:#x} is not a kernel address (corrupted?)")


def _entries(
    guest: LinuxGuest, layout: _Layout, head: int, member: int, member_rel: int, what: str
) -> Iterator[tuple[int, bytes]]:
    """``list_for_each_entry(task, head, member)``: (task address, its span bytes) per entry.

    The next pointer is taken from the span read for the entry itself: one read per task.
    """
    node = guest.memory.u64(head)
    for _ in range(MAX_LIST_ENTRIES):
        if node == head:
            return
        _check_node(node, what)
        address = node - member
        data = _read_span(guest, layout, address)
        yield address, data
        node = _u(data, member_rel)
    raise GuestError(f"{what}: more than {MAX_LIST_ENTRIES} entries (corrupted list?)")


def _threads(
    guest: LinuxGuest, layout: _Layout, leader: int, data: bytes
) -> Iterator[tuple[int, bytes]]:
    """Addresses of the other threads of *leader*'s group (leader excluded), for_each_thread()."""
    if layout.thread_node is not None:
        assert layout.signal is not None and layout.thread_head_abs is not None
        assert layout.thread_node_abs is not None
        signal = _u(data, layout.signal)
        if not signal:
            return  # a reaped task: nothing left to walk
        head = signal + layout.thread_head_abs
        member, rel = layout.thread_node_abs, layout.thread_node
    else:
        assert layout.thread_group is not None and layout.thread_group_abs is not None
        head = leader + layout.thread_group_abs  # a ring through every thread, leader included
        member, rel = layout.thread_group_abs, layout.thread_group
    what = f"threads of task {leader:#x}"
    for address, thread_data in _entries(guest, layout, head, member, rel, what):
        if address != leader:
            yield address, thread_data


def for_each_task(guest: LinuxGuest, *, threads: bool = False) -> Iterator[Task]:
    """Every thread group leader (process), in ``init_task.tasks`` order; with *threads*, each
    leader followed by its other threads.

    >>> [t.comm for t in for_each_task(guest)][:2]
    ['init', 'kthreadd']

    ``init_task`` (pid 0, the list head) is not listed, as in ``ps``; use `find_task` (pid 0).
    Read with the guest stopped for a consistent list: a running guest may change it mid-walk.

    :raises GuestError: if BTF lacks ``task_struct`` fields, the kernel has no ``init_task``
        symbol, or a list is corrupted (not a kernel pointer, more than `MAX_LIST_ENTRIES`)
    :raises FaultError: if a list entry cannot be read
    """
    layout = _layout(guest)
    head = symbol_address(guest, "init_task") + layout.tasks_abs
    for address, data in _entries(guest, layout, head, layout.tasks_abs, layout.tasks, "tasks"):
        yield _parse(guest, layout, address, data)
        if threads:
            for thread, thread_data in _threads(guest, layout, address, data):
                yield _parse(guest, layout, thread, thread_data)


def find_task(guest: LinuxGuest, pid: int) -> Task | None:
    """The task (thread) whose ``pid`` is *pid*, or None. Pid 0 is ``init_task`` (``swapper/0``).

    Walks every thread (drgn looks the pid up in the pid hash; a walk needs fewer structures).

    :raises GuestError, FaultError: as `for_each_task`
    """
    if pid == 0:
        return read_task(guest, symbol_address(guest, "init_task"))
    for task in for_each_task(guest, threads=True):
        if task.pid == pid:
            return task
    return None


def find_tasks(guest: LinuxGuest, name: str, *, threads: bool = False) -> list[Task]:
    """Every process (with *threads*, every thread) whose ``comm`` is *name*.

    :raises GuestError, FaultError: as `for_each_task`
    """
    return [t for t in for_each_task(guest, threads=threads) if t.comm == name]


def task_pgd(guest: LinuxGuest, task: Task) -> int | None:
    """``task->mm->pgd``: the kernel virtual address of the process's top-level page table, or
    None for a kernel thread (no mm).

    :raises FaultError: if the mm cannot be read
    :raises GuestError: if BTF has no ``mm_struct.pgd``
    """
    mm = task.mm
    if not mm:
        return None
    return guest.memory.u64(mm + _layout(guest).mm_pgd)


def task_cr3(guest: LinuxGuest, task: Task) -> int | None:
    """Physical address of the process's page tables: what CR3 holds while it runs in the kernel.

    ``phys_addr_t task_cr3(struct task_struct *task)`` = ``__pa(task->mm->pgd)``. With page-table
    isolation the user-mode CR3 is this plus 0x1000 (the user half of the PGD pair), and with
    PCID the low 12 bits carry an ASID: compare ``cr3 & CR3_PGD_MASK`` with this value. Either
    half maps all of user space, so this one serves to read the process's memory.

    :return: None for a kernel thread (it borrows ``active_mm``).
    :raises FaultError: if the mm or its pgd cannot be translated
    """
    pgd = task_pgd(guest, task)
    if pgd is None:
        return None
    return guest.memory.translate(pgd)


def _percpu_current(guest: LinuxGuest) -> int:
    """Per-CPU offset (address in the per-CPU section) of the current task pointer."""
    cached = guest.memory.cache.get("tasks.current_task")
    if cached is not None:
        return cached
    # A per-CPU variable "current_task" up to v6.1 and again since v6.15 (commit "x86/percpu:
    # Move current_task to percpu hot section"); from commit e57ef2ed97c1 ("x86: Put hot per CPU
    # variables into a struct") (in v6.2) until then, pcpu_hot.current_task.
    sym = guest.symbols.lookup("current_task")
    if sym is not None:
        offset = sym.address
    else:
        hot = guest.symbols.lookup("pcpu_hot")
        if hot is None:
            raise GuestError("kernel has neither a current_task nor a pcpu_hot symbol")
        offset = hot.address + field_offset(guest_btf(guest), "pcpu_hot", "current_task")
    guest.memory.cache["tasks.current_task"] = offset
    return offset


def current_task(guest: LinuxGuest, gs_base: int, k_gs_base: int, cs: int) -> Task | None:
    """The task a vCPU is running, from its ``GS_BASE``, ``KERNEL_GS_BASE`` and ``CS``.

    ``this_cpu_read(current_task)`` is ``%gs:current_task``: the per-CPU variable at the CPU's
    per-CPU base. In kernel mode (``cs & 3 == 0``) that base is in ``GS_BASE``; in user mode the
    kernel's base waits in ``KERNEL_GS_BASE`` until ``swapgs``. In the few instructions of kernel
    entry and exit before/after ``swapgs`` CS says kernel but GS is still the user's, so a base
    that is not a kernel address is passed over for the other one.

    :return: None if neither base is a kernel address or the pointer there cannot be read
        (early boot, a vCPU not yet started).
    :raises GuestError: if the kernel has no ``current_task`` / ``pcpu_hot`` symbol
    """
    offset = _percpu_current(guest)
    bases = [gs_base, k_gs_base] if cs & 3 == 0 else [k_gs_base, gs_base]
    for base in bases:
        if not base & _KERNEL_HALF:
            continue
        try:
            address = guest.memory.u64((base + offset) & _U64)
        except FaultError:
            return None
        if not address & _KERNEL_HALF:
            return None
        try:
            return read_task(guest, address)
        except FaultError:
            return None
    return None
