"""Where a Linux kernel goes when it dies, and what it says there: for `monitor catch panic`.

Every oops on x86 passes through `__die(const char *str, struct pt_regs *regs, long err)`
(arch/x86/kernel/dumpstack.c) before it prints "Oops: <str>", and every panic through
`panic(const char *fmt, ...)` (kernel/panic.c; since v6.9 also `vpanic`, which `panic` calls). A
breakpoint at each entry stops the guest the moment it starts dying, with the dying vCPU's
registers: the oops message and the faulting instruction are read from the arguments.
"""

from __future__ import annotations

import logging

from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.guest.base import DeathHook, GuestError
from vmigdb.guest.linux.guest import LinuxGuest
from vmigdb.guest.linux.structs import field_offset
from vmigdb.guest.linux.tasks import current_task

log = logging.getLogger("vmigdb.guest.linux")

# (symbol, kind), most specific first; `oops_enter` stands in for `__die` where it is missing.
_HOOKS = (("__die", "oops"), ("oops_enter", "oops"), ("panic", "panic"))


def death_hooks(guest: LinuxGuest) -> list[DeathHook]:
    """The kernel's oops and panic entry points present in this kernel."""
    hooks: list[DeathHook] = []
    kinds: set[str] = set()
    for name, kind in _HOOKS:
        if kind in kinds:
            continue
        symbol = guest.symbols.lookup(name)
        if symbol is not None:
            hooks.append(DeathHook(symbol.address, name, kind))
            kinds.add(kind)
    return hooks


def _string(guest: LinuxGuest, address: int, limit: int = 120) -> str:
    try:
        data = guest.memory.read(address, limit)
    except GuestError:
        return "?"
    return data.split(b"\0", 1)[0].decode("utf-8", "replace").strip()


def _where(guest: LinuxGuest, address: int) -> str:
    found = guest.symbols.symbolize(address)
    if found is None:
        return f"{address:#x}"
    symbol, offset = found
    return f"{symbol.name}+{offset:#x}"


def describe_death(guest: LinuxGuest, hook: DeathHook, regs: RegisterFile, cpu_name: str) -> str:
    """One line naming what is happening, from the hook's arguments (rdi, rsi)."""
    who = ""
    try:
        task = current_task(guest, regs["gs_base"], regs["k_gs_base"], regs["cs"])
        if task is not None:
            who = f", pid {task.pid} ({task.comm})"
    except GuestError as exc:
        log.debug("no current task at the death hook: %s", exc)
    if hook.kind == "panic":
        message = _string(guest, regs["rdi"]) if hook.symbol == "panic" else ""
        return f"the guest kernel panics: {message or '(no message)'} on {cpu_name}{who}"
    text = _string(guest, regs["rdi"]) if hook.symbol == "__die" else ""
    at = ""
    if hook.symbol == "__die":
        try:
            ip_offset = field_offset(guest.btf, "pt_regs", "ip")
            ip = int.from_bytes(guest.memory.read(regs["rsi"] + ip_offset, 8), "little")
            at = f" at {_where(guest, ip)}"
        except GuestError as exc:
            log.debug("no faulting ip at __die: %s", exc)
    return f"the guest kernel oopses: {text or 'oops'}{at} on {cpu_name}{who}"
