"""Tasks and modules over a synthetic kernel: hand-built BTF plus sparse fake kernel memory.

Two layouts are built from the same description, so each version fallback is exercised:
``NEW`` (v6.1-like: ``__state``, ``thread_node``/``signal->thread_head``, ``module.mem[]``,
``mod_kallsyms.typetab``, ``pcpu_hot``) and ``OLD`` (v5.10-like: ``long state``,
``thread_group``, ``core_layout``, type letters in ``st_info``, a plain ``current_task``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest

from vmigdb.guest.linux import tasks as tasks_module
from vmigdb.guest.linux.btf import Btf
from vmigdb.guest.linux.kallsyms import Symbol, SymbolTable
from vmigdb.guest.linux.kernel import FaultError
from vmigdb.guest.linux.modules import Module, find_module, module_symbols, modules
from vmigdb.guest.linux.tasks import (
    GuestError,
    Task,
    current_task,
    find_task,
    find_tasks,
    for_each_task,
    read_task,
    task_cr3,
    task_pgd,
)

DIRECT = 0xFFFF_8880_0000_0000  # direct-map base of the fake kernel
IMAGE = 0xFFFF_FFFF_8200_0000  # where kernel-image variables live
PAGE = 0x1000

# ---- BTF ----------------------------------------------------------------------------------------


@dataclass
class BtfWriter:
    strings: bytearray = field(default_factory=lambda: bytearray(b"\0"))
    types: bytearray = field(default_factory=bytearray)
    count: int = 0

    def _s(self, name: str) -> int:
        if not name:
            return 0
        self.strings += name.encode() + b"\0"
        return len(self.strings) - len(name) - 1

    def add(self, kind: int, name: str, size_or_type: int, vlen: int = 0, extra=b"") -> int:
        self.types += struct.pack("<III", self._s(name), kind << 24 | vlen, size_or_type) + extra
        self.count += 1
        return self.count

    def int_(self, name: str, size: int) -> int:
        return self.add(1, name, size, extra=struct.pack("<I", size * 8))

    def ptr(self, target: int = 0) -> int:
        return self.add(2, "", target)

    def array(self, elem: int, index: int, n: int) -> int:
        return self.add(3, "", 0, extra=struct.pack("<III", elem, index, n))

    def struct(self, name: str, size: int, members: list[tuple[str, int, int]]) -> int:
        extra = b"".join(struct.pack("<III", self._s(m), t, off * 8) for m, t, off in members)
        return self.add(4, name, size, len(members), extra)

    def enum(self, name: str, values: dict[str, int]) -> int:
        extra = b"".join(struct.pack("<Ii", self._s(k), v) for k, v in values.items())
        return self.add(6, name, 4, len(values), extra)

    def blob(self) -> bytes:
        n, s = len(self.types), len(self.strings)
        header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, n, n, s)
        return header + bytes(self.types) + bytes(self.strings)


# task_struct offsets shared by both layouts (NEW/OLD differ in state and the thread links).
T = {
    "tasks": 0x80,
    "mm": 0x90,
    "exit_state": 0x98,
    "pid": 0xA0,
    "tgid": 0xA4,
    "real_parent": 0xA8,
    "group_leader": 0xB0,
    "threads": 0xC0,  # thread_node (NEW) or thread_group (OLD)
    "comm": 0xD0,
    "signal": 0xE0,
}
TASK_SIZE = 0x100
STATE = {"new": (0x18, 4), "old": (0x10, 8)}
MOD = {"state": 0, "list": 8, "name": 24, "mem": 0x50, "kallsyms": 0x110}
MODULE_MEMORY_SIZE = 0x40
PCPU_CURRENT = 0x1FDC0  # per-CPU offset of current_task / pcpu_hot


def build_btf(variant: str) -> Btf:
    w = BtfWriter()
    int_ = w.int_("int", 4)
    uint = w.int_("unsigned int", 4)
    long_ = w.int_("long", 8)
    char = w.int_("char", 1)
    void_p = w.ptr()
    list_head = w.struct("list_head", 16, [("next", void_p, 0), ("prev", void_p, 8)])
    comm = w.array(char, int_, 16)
    state_off, state_size = STATE[variant]
    members = [
        ("__state", uint, state_off) if variant == "new" else ("state", long_, state_off),
        ("tasks", list_head, T["tasks"]),
        ("mm", void_p, T["mm"]),
        ("exit_state", int_, T["exit_state"]),
        ("pid", int_, T["pid"]),
        ("tgid", int_, T["tgid"]),
        ("real_parent", void_p, T["real_parent"]),
        ("group_leader", void_p, T["group_leader"]),
        ("thread_node" if variant == "new" else "thread_group", list_head, T["threads"]),
        ("comm", comm, T["comm"]),
        ("signal", void_p, T["signal"]),
    ]
    w.struct("task_struct", TASK_SIZE, members)
    signal = [("nr_threads", int_, 8)] + (
        [("thread_head", list_head, 16)] if variant == "new" else []
    )
    w.struct("signal_struct", 64, signal)
    w.struct("mm_struct", 128, [("pgd", void_p, 72)])
    w.enum("module_state", {"MODULE_STATE_LIVE": 0, "MODULE_STATE_UNFORMED": 3})
    ks = [("symtab", void_p, 0), ("num_symtab", uint, 8), ("strtab", void_p, 16)]
    if variant == "new":
        ks.append(("typetab", void_p, 24))
    w.struct("mod_kallsyms", 32, ks)
    name = w.array(char, int_, 56)
    module = [
        ("state", int_, MOD["state"]),
        ("list", list_head, MOD["list"]),
        ("name", name, MOD["name"]),
        ("kallsyms", void_p, MOD["kallsyms"]),
    ]
    if variant == "new":
        w.enum("mod_mem_type", {"MOD_TEXT": 0, "MOD_DATA": 1, "MOD_RODATA": 2})
        mm = w.struct("module_memory", MODULE_MEMORY_SIZE, [("base", void_p, 0), ("size", uint, 8)])
        module.append(("mem", w.array(mm, int_, 3), MOD["mem"]))
        w.struct("pcpu_hot", 64, [("current_task", void_p, 0), ("cpu_number", int_, 12)])
    else:
        layout = w.struct("module_layout", 48, [("base", void_p, 0), ("size", uint, 8)])
        module.append(("core_layout", layout, MOD["mem"]))
    w.struct("module", 0x200, module)
    return Btf.parse(w.blob())


# ---- memory and guest ---------------------------------------------------------------------------


class FakeMemory:
    """Sparse kernel memory: pages exist once written; anything else faults."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}
        self.cache: dict = {}

    def write(self, va: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.pages.setdefault((va + i) // PAGE, bytearray(PAGE))[(va + i) % PAGE] = b

    def read(self, va: int, size: int) -> bytes:
        out = bytearray()
        for a in range(va, va + size):
            page = self.pages.get(a // PAGE)
            if page is None:
                raise FaultError(a)
            out.append(page[a % PAGE])
        return bytes(out)

    def u32(self, va: int) -> int:
        return int.from_bytes(self.read(va, 4), "little")

    def u64(self, va: int) -> int:
        return int.from_bytes(self.read(va, 8), "little")

    def string(self, va: int, max: int = 256) -> str:
        out = bytearray()
        while len(out) < max and (b := self.read(va + len(out), 1)) != b"\0":
            out += b
        return out.decode()

    def translate(self, va: int) -> int:
        self.read(va, 1)
        return va - DIRECT

    def flush(self) -> None:
        pass


class FakeGuest:
    def __init__(self, btf: Btf, memory: FakeMemory, symbols: list[Symbol]) -> None:
        self.btf = btf
        self.memory = memory
        self.symbols = SymbolTable(symbols)


@dataclass
class Spec:
    pid: int
    comm: str
    parent: int  # pid
    state: int = 1
    exit_state: int = 0
    mm: bool = False
    leader: int | None = None  # pid of the group leader; None: itself


def q(v: int) -> bytes:
    return struct.pack("<Q", v)


def link(mem: FakeMemory, head: int, nodes: list[int]) -> None:
    """A circular list_head list: head -> nodes... -> head."""
    ring = [head, *nodes]
    for i, node in enumerate(ring):
        mem.write(node, q(ring[(i + 1) % len(ring)]) + q(ring[i - 1]))


INIT_TASK = IMAGE + 0x10000
SPECS = [
    Spec(0, "swapper/0", 0, state=0),
    Spec(1, "init", 0, mm=True),
    Spec(2, "kthreadd", 0),
    Spec(3, "kworker/0:0", 2, state=0x402),  # TASK_IDLE
    Spec(4, "migration/0", 2, state=0x40),  # TASK_PARKED
    Spec(100, "app", 1, state=0, mm=True),
    Spec(101, "app-worker", 1, state=2, mm=True, leader=100),
    Spec(102, "app-io", 1, state=8, mm=True, leader=100),  # traced
    Spec(200, "defunct", 1, state=0x80, exit_state=0x20),  # zombie
    Spec(300, "stopped", 1, state=4, mm=True),
]


def build(variant: str) -> tuple[FakeGuest, dict[int, int]]:
    mem = FakeMemory()
    addr = {s.pid: INIT_TASK if s.pid == 0 else DIRECT + 0x100000 + s.pid * 0x1000 for s in SPECS}
    state_off, state_size = STATE[variant]
    groups: dict[int, list[int]] = {}
    for s in SPECS:
        groups.setdefault(s.leader if s.leader is not None else s.pid, []).append(s.pid)
    for s in SPECS:
        a = addr[s.pid]
        leader = s.leader if s.leader is not None else s.pid
        mem.write(a, bytes(TASK_SIZE))
        mem.write(a + state_off, s.state.to_bytes(state_size, "little"))
        mem.write(a + T["exit_state"], s.exit_state.to_bytes(4, "little"))
        mem.write(a + T["pid"], s.pid.to_bytes(4, "little") + leader.to_bytes(4, "little"))
        mem.write(a + T["real_parent"], q(addr[s.parent]) + q(addr[leader]))
        mem.write(a + T["comm"], s.comm.encode()[:15].ljust(16, b"\0"))
        if s.mm:
            mm = DIRECT + 0x800000 + leader * 0x200
            mem.write(mm, bytes(128))
            pgd = DIRECT + 0x4000000 + leader * 0x2000
            mem.write(mm + 72, q(pgd))
            mem.write(pgd, bytes(8))  # mapped, so it translates
            mem.write(a + T["mm"], q(mm))
    for leader, members in groups.items():
        signal = DIRECT + 0x900000 + leader * 0x100
        mem.write(signal, bytes(64))
        nodes = [addr[p] + T["threads"] for p in members]
        if variant == "new":
            for p in members:
                mem.write(addr[p] + T["signal"], q(signal))
            link(mem, signal + 16, nodes)
        else:
            ring = nodes  # thread_group: a ring with no separate head
            for i, node in enumerate(ring):
                mem.write(node, q(ring[(i + 1) % len(ring)]) + q(ring[i - 1]))
    leaders = [addr[p] + T["tasks"] for p in groups if p != 0]
    link(mem, INIT_TASK + T["tasks"], leaders)
    for p, members in groups.items():
        for m in members:
            if m != p:
                mem.write(addr[m] + T["tasks"], q(0xDEAD) + q(0xDEAD))  # threads are not on it

    symbols = [Symbol("init_task", INIT_TASK, "D")]
    if variant == "new":
        symbols.append(Symbol("pcpu_hot", PCPU_CURRENT, "A"))
        # fs/proc/array.c task_state_array: pointers to "R (running)", ...
        names = ["R (running)", "S (sleeping)", "D (disk sleep)", "T (stopped)"]
        names += ["t (tracing stop)", "X (dead)", "Z (zombie)", "P (parked)", "I (idle)"]
        table = IMAGE + 0x20000
        for i, text in enumerate(names):
            mem.write(table + 8 * i, q(IMAGE + 0x21000 + 32 * i))
            mem.write(IMAGE + 0x21000 + 32 * i, text.encode() + b"\0")
        mem.write(table + 8 * len(names), q(0))
        symbols.append(Symbol("task_state_array", table, "r"))
    else:
        symbols.append(Symbol("current_task", PCPU_CURRENT, "A"))
    build_modules(mem, symbols, variant)
    guest = FakeGuest(build_btf(variant), mem, symbols)
    return guest, addr


MODULES_HEAD = IMAGE + 0x30000
MOD_BASE = 0xFFFF_FFFF_C000_0000


def build_modules(mem: FakeMemory, symbols: list[Symbol], variant: str) -> None:
    """Three modules on the list, the middle one still UNFORMED."""
    symbols.append(Symbol("modules", MODULES_HEAD, "d"))
    addresses = []
    for i, (name, state) in enumerate((("virtio_net", 0), ("loading", 3), ("ext4", 0))):
        m = MOD_BASE + 0x100000 * (i + 1)
        addresses.append(m)
        mem.write(m, bytes(0x200))
        mem.write(m + MOD["state"], state.to_bytes(4, "little"))
        mem.write(m + MOD["name"], name.encode() + b"\0")
        text = MOD_BASE + 0x10000 * (i + 1)
        mem.write(m + MOD["mem"], q(text) + (0x3000 + i).to_bytes(4, "little"))
        if variant == "new":  # mem[MOD_DATA], which must not be taken for the text
            mem.write(m + MOD["mem"] + MODULE_MEMORY_SIZE, q(0x1111) + (7).to_bytes(4, "little"))
        ks = m + 0x180
        mem.write(m + MOD["kallsyms"], q(ks))
        syms = [
            ("", 0, 0, "?"),
            (f"{name}_init", text + 0x10, 0, "t"),
            ("shared", text + 0x40, 0, "T"),
        ]
        symtab, strtab, typetab = m + 0x1000, m + 0x2000, m + 0x3000
        strings = b"\0"
        for j, (sname, value, _, letter) in enumerate(syms):
            st_name = len(strings) if sname else 0
            if sname:
                strings += sname.encode() + b"\0"
            info = ord(letter) if variant == "old" else 0x12
            mem.write(symtab + 24 * j, struct.pack("<IBBHQQ", st_name, info, 0, 1, value, 8))
            mem.write(typetab + j, letter.encode())
        mem.write(strtab, strings)
        ptrs = q(symtab) + len(syms).to_bytes(8, "little") + q(strtab) + q(typetab)
        mem.write(ks, ptrs)
    link(mem, MODULES_HEAD, [a + MOD["list"] for a in addresses])


@pytest.fixture(params=["new", "old"])
def fake(request) -> tuple[FakeGuest, dict[int, int]]:
    return build(request.param)


# ---- tests --------------------------------------------------------------------------------------


def test_for_each_task_lists_leaders_in_list_order(fake) -> None:
    guest, addr = fake
    tasks = list(for_each_task(guest))
    assert [t.pid for t in tasks] == [1, 2, 3, 4, 100, 200, 300]
    init = tasks[0]
    assert init == Task(addr[1], 1, 1, 0, "init", init.mm, "S", True)
    assert init.mm
    by_pid = {t.pid: t for t in tasks}
    assert by_pid[2].ppid == 0 and by_pid[2].mm == 0
    assert by_pid[3].ppid == 2
    assert {p: by_pid[p].state for p in by_pid} == {
        1: "S",
        2: "S",
        3: "I",
        4: "P",
        100: "R",
        200: "Z",
        300: "T",
    }


def test_threads(fake) -> None:
    guest, addr = fake
    threads = list(for_each_task(guest, threads=True))
    assert [t.pid for t in threads] == [1, 2, 3, 4, 100, 101, 102, 200, 300]
    worker = threads[5]
    assert (worker.tgid, worker.ppid, worker.is_thread_leader) == (100, 1, False)
    assert [t.state for t in threads[4:7]] == ["R", "D", "t"]


def test_find_task_and_find_tasks(fake) -> None:
    guest, addr = fake
    assert find_task(guest, 102).comm == "app-io"  # type: ignore[union-attr]
    assert find_task(guest, 0).comm == "swapper/0"  # type: ignore[union-attr]
    assert find_task(guest, 4242) is None
    assert [t.pid for t in find_tasks(guest, "app")] == [100]
    assert find_tasks(guest, "app-worker") == []
    assert [t.pid for t in find_tasks(guest, "app-worker", threads=True)] == [101]
    assert read_task(guest, addr[300]).comm == "stopped"


def test_pgd_and_cr3(fake) -> None:
    guest, _ = fake
    app = find_task(guest, 101)
    assert task_pgd(guest, app) == DIRECT + 0x4000000 + 100 * 0x2000  # the leader's mm
    assert task_cr3(guest, app) == 0x4000000 + 100 * 0x2000
    kthreadd = find_task(guest, 2)
    assert task_pgd(guest, kthreadd) is None and task_cr3(guest, kthreadd) is None


def test_current_task_picks_the_per_cpu_base_by_mode(fake) -> None:
    guest, addr = fake
    kernel_base, user_gs = DIRECT + 0x1F000000, 0x7F00_0000_0000
    guest.memory.write(kernel_base + PCPU_CURRENT, q(addr[100]))
    # kernel mode: GS_BASE is the per-CPU base
    assert current_task(guest, kernel_base, user_gs, 0x10).pid == 100  # type: ignore[union-attr]
    # user mode: the kernel's base waits in KERNEL_GS_BASE
    assert current_task(guest, user_gs, kernel_base, 0x33).pid == 100  # type: ignore[union-attr]
    # kernel entry before swapgs: CS says kernel, GS is still the user's
    assert current_task(guest, user_gs, kernel_base, 0x10).pid == 100  # type: ignore[union-attr]
    assert current_task(guest, 0, 0, 0x10) is None
    guest.memory.write(kernel_base + PCPU_CURRENT, q(0))
    assert current_task(guest, kernel_base, 0, 0x10) is None


def test_modules(fake) -> None:
    guest, _ = fake
    mods = modules(guest)
    assert [m.name for m in mods] == ["virtio_net", "ext4"]  # UNFORMED one skipped
    assert mods[0] == Module("virtio_net", MOD_BASE + 0x100000, MOD_BASE + 0x10000, 0x3000)
    assert mods[1].base == MOD_BASE + 0x30000 and mods[1].size == 0x3002
    assert find_module(guest, "ext4") == mods[1]
    assert find_module(guest, "loading") is None
    assert module_symbols(guest, mods[1]) == [
        ("ext4_init", MOD_BASE + 0x30010, "t"),
        ("shared", MOD_BASE + 0x30040, "T"),
    ]


def test_missing_field_names_struct_and_field() -> None:
    guest, _ = build("new")
    w = BtfWriter()
    w.struct("task_struct", 8, [])
    guest.btf = Btf.parse(w.blob())
    with pytest.raises(GuestError, match=r"BTF has no field task_struct\.tasks"):
        list(for_each_task(guest))
    with pytest.raises(GuestError, match=r"BTF has no field module\.mem, module\.core_layout"):
        modules(guest)


def test_missing_symbol() -> None:
    guest, _ = build("old")
    guest.symbols = SymbolTable([s for s in guest.symbols if s.name != "init_task"])
    with pytest.raises(GuestError, match="no symbol 'init_task'"):
        list(for_each_task(guest))


def test_a_cycle_that_misses_the_head_is_cut(monkeypatch) -> None:
    guest, addr = build("new")
    # init -> kthreadd -> init -> ...: never back to init_task.tasks
    guest.memory.write(addr[2] + T["tasks"], q(addr[1] + T["tasks"]))
    monkeypatch.setattr(tasks_module, "MAX_LIST_ENTRIES", 500)
    with pytest.raises(GuestError, match="more than 500 entries"):
        list(for_each_task(guest))


def test_a_wild_pointer_is_a_guest_error() -> None:
    guest, addr = build("new")
    guest.memory.write(addr[2] + T["tasks"], q(0x4141_4141))
    with pytest.raises(GuestError, match="not a kernel address"):
        list(for_each_task(guest))


def test_an_unmapped_entry_is_a_fault() -> None:
    guest, addr = build("new")
    guest.memory.write(addr[2] + T["tasks"], q(DIRECT + 0x7770000))
    with pytest.raises(FaultError):
        list(for_each_task(guest))


def test_linux_behind_the_os_interface(fake) -> None:
    """`LinuxOS` answers the OS-awareness interface with the helpers above."""
    from tests.unit.fakes import default_registers, qemu_g
    from vmigdb.arch.x86_64.registers import RegisterFile
    from vmigdb.guest.base import Module as AnyModule
    from vmigdb.guest.base import Process
    from vmigdb.guest.linux.linux_os import LinuxOS

    guest, addr = fake
    linux = LinuxOS(guest)  # type: ignore[arg-type]
    assert [p.pid for p in linux.processes()] == [1, 2, 3, 4, 100, 200, 300]
    cr3 = 0x4000000 + 100 * 0x2000
    assert linux.find_process(100) == Process(100, 1, "app", cr3, "R", True)
    assert linux.find_process(101) == Process(101, 1, "app-worker", cr3, "D", False)
    assert linux.find_process(4242) is None
    kthreadd = linux.find_process(2)
    assert kthreadd is not None and kthreadd.cr3 is None
    assert [p.pid for p in linux.find_processes("app")] == [100]
    assert linux.find_processes("app-worker") == []  # a thread, not a process
    kernel_base = DIRECT + 0x1F000000
    guest.memory.write(kernel_base + PCPU_CURRENT, q(addr[101]))
    values = default_registers(1) | {"gs_base": kernel_base, "k_gs_base": 0, "cs": 0x10}
    regs = RegisterFile.from_qemu_g(qemu_g(values))
    assert linux.current_process(regs) == linux.find_process(101)
    assert linux.process_exit_hook() is None  # this kernel has no do_exit symbol
    assert linux.modules()[0] == AnyModule("virtio_net", MOD_BASE + 0x10000, 0x3000)
    assert linux.lookup_symbol("init_task") == Symbol("init_task", INIT_TASK, "D")
