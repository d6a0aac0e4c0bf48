"""Where the Linux kernel passes when a process makes a system call, executes a program, or a
module loads: addresses for the debugger's own breakpoints, and what the registers say there.

System calls (x86-64, arch/x86/entry/common.c): ``entry_SYSCALL_64`` saves the caller's registers
as a ``struct pt_regs`` on the task's kernel stack and calls ``do_syscall_64(regs, nr)``, which
runs the handler for ``nr`` (``sys_call_table[nr]``, e.g. ``__x64_sys_openat(regs)``; since the
2024 branch-history fix through ``x64_sys_call``'s switch, to the same functions). Every handler
takes ``regs`` in rdi, and so does ``do_syscall_64``: a breakpoint on a handler stops only that
system call (every other one runs at full speed), one on ``do_syscall_64`` stops them all. The
caller's arguments are ``regs->di, si, dx, r10, r8, r9``, its number ``regs->orig_ax``.

Exec: ``load_elf_binary`` (fs/binfmt_elf.c) ends by calling ``start_thread(regs, new_ip,
new_sp)`` (arch/x86/kernel/process_64.c), once the new program and its loader are mapped, the
task's name and memory are the new ones (CR3 too) and before it returns to user mode at
``new_ip``: the first instruction the new program runs.

Module loads: ``load_module`` (kernel/module/main.c) ends with ``do_init_module(mod)``, a
``noinline`` function entered with the module on the module list (MODULE_STATE_COMING), its
symbols in ``mod->kallsyms`` (init ones included), and ``mod->init`` not yet called.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.guest.base import ExecEvent, GuestError, ModuleLoad, SyscallFrame
from vmigdb.guest.linux import dpath, modules, tasks
from vmigdb.guest.linux.guest import LinuxGuest
from vmigdb.guest.linux.kernel import FaultError
from vmigdb.guest.linux.structs import field_offset, guest_btf, symbol_address

__all__ = [
    "NEVER_RETURN",
    "exec_event",
    "exec_hook",
    "module_load_event",
    "module_load_hook",
    "syscall_frame",
    "syscall_hooks",
]

DISPATCH = "do_syscall_64"
SYSCALL_TABLE = "sys_call_table"
EXEC_HOOK = "start_thread"
MODULE_HOOK = "do_init_module"
# x86-64 system calls that never come back to the instruction after the `syscall` instruction
# (arch/x86/entry/syscalls/syscall_64.tbl): rt_sigreturn, exit, exit_group.
NEVER_RETURN = frozenset({15, 60, 231})
MAX_SYSCALL = 1024  # the table is __NR_syscalls long (about 460): a bound, not a size
# GDB's names for the saved registers -> struct pt_regs members (arch/x86/include/asm/ptrace.h)
PT_REGS = {
    "r15": "r15", "r14": "r14", "r13": "r13", "r12": "r12", "rbp": "bp", "rbx": "bx",
    "r11": "r11", "r10": "r10", "r9": "r9", "r8": "r8", "rax": "ax", "rcx": "cx", "rdx": "dx",
    "rsi": "si", "rdi": "di", "orig_rax": "orig_ax", "rip": "ip", "cs": "cs",
    "eflags": "flags", "rsp": "sp", "ss": "ss",
}  # fmt: skip
_KERNEL_HALF = 1 << 63
_CACHE_KEY = "hooks.pt_regs"


@dataclass(frozen=True, slots=True)
class _PtRegs:
    size: int
    offsets: dict[str, int]  # GDB name -> offset


def _pt_regs(guest: LinuxGuest) -> _PtRegs:
    cached = guest.memory.cache.get(_CACHE_KEY)
    if cached is not None:
        return cached
    btf = guest_btf(guest)
    layout = _PtRegs(
        btf.size_of("pt_regs"),
        {gdb: field_offset(btf, "pt_regs", member) for gdb, member in PT_REGS.items()},
    )
    guest.memory.cache[_CACHE_KEY] = layout
    return layout


def syscall_hooks(guest: LinuxGuest, numbers: frozenset[int] | None) -> list[int]:
    """The handlers of system calls `numbers` (several numbers may share one, e.g. the
    not-implemented ones), or the dispatcher every system call passes for None.

    :raises GuestError: if the kernel has no such symbol, or a number has no handler
    """
    if numbers is None:
        return [symbol_address(guest, DISPATCH)]
    table = symbol_address(guest, SYSCALL_TABLE)
    out: list[int] = []
    for number in sorted(numbers):
        if not 0 <= number < MAX_SYSCALL:
            raise GuestError(f"no system call {number}")
        try:
            handler = guest.memory.u64(table + 8 * number)
        except FaultError:
            raise GuestError(f"system call {number} is past the kernel's table") from None
        if not handler & _KERNEL_HALF or guest.symbols.symbolize(handler) is None:
            raise GuestError(f"system call {number} has no handler in this kernel")
        if handler not in out:
            out.append(handler)
    return out


def syscall_frame(guest: LinuxGuest, regs: RegisterFile) -> SyscallFrame | None:
    """At a `syscall_hooks` address: the caller's registers (``*(struct pt_regs *)rdi``).

    None if rdi does not hold the saved registers of a 64-bit user-mode caller (CS is not the
    user code segment), e.g. a handler called from inside the kernel.

    :raises FaultError: if the saved registers cannot be read
    """
    layout = _pt_regs(guest)
    frame = regs["rdi"]
    if not frame & _KERNEL_HALF:
        return None
    raw = guest.memory.read(frame, layout.size)
    values = {
        name: int.from_bytes(raw[offset : offset + 8], "little")
        for name, offset in layout.offsets.items()
    }
    if values["cs"] & 3 != 3 or values["rip"] & _KERNEL_HALF:
        return None
    number = values["orig_rax"]
    slots = {name: frame + offset for name, offset in layout.offsets.items()}
    return SyscallFrame(number, values, slots, number not in NEVER_RETURN, frame)


def _current(guest: LinuxGuest, regs: RegisterFile) -> tasks.Task | None:
    return tasks.current_task(guest, regs["gs_base"], regs["k_gs_base"], regs["cs"])


def exec_hook(guest: LinuxGuest) -> int:
    """:raises GuestError: if the kernel has no ``start_thread``"""
    return symbol_address(guest, EXEC_HOOK)


def exe_path(guest: LinuxGuest, mm: int) -> str:
    """``d_path(mm->exe_file)``, or "" when it has none. :raises GuestError, FaultError:"""
    file = guest.memory.u64(mm + field_offset(guest_btf(guest), "mm_struct", "exe_file"))
    return dpath.file_path(guest, file) if file else ""


def exec_event(guest: LinuxGuest, regs: RegisterFile) -> ExecEvent | None:
    """At ``start_thread(regs, new_ip, new_sp)``: the exec'ing task and where it will start.

    :raises GuestError, FaultError: if the task cannot be read
    """
    task = _current(guest, regs)
    if task is None or not task.mm:
        return None
    cr3 = tasks.task_cr3(guest, task)
    if cr3 is None:
        return None
    path = exe_path(guest, task.mm)
    return ExecEvent(task.tgid, task.comm, path, regs["rsi"], cr3)


def module_load_hook(guest: LinuxGuest) -> int:
    """:raises GuestError: if the kernel has no ``do_init_module`` (CONFIG_MODULES=n)"""
    return symbol_address(guest, MODULE_HOOK)


def module_load_event(guest: LinuxGuest, regs: RegisterFile) -> ModuleLoad | None:
    """At ``do_init_module(mod)``: the module (rdi) and its init function (``mod->init``).

    :raises GuestError, FaultError: if the module cannot be read
    """
    address = regs["rdi"]
    if not address & _KERNEL_HALF:
        return None
    for module in modules.modules(guest):
        if module.address == address:
            init = guest.memory.u64(address + field_offset(guest_btf(guest), "module", "init"))
            return ModuleLoad(module.name, module.base, module.size, init)
    return None
