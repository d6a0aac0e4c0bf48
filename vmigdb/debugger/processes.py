"""Guest processes in debugger terms: list them, pick one as the debugging scope.

The OS knowledge comes from `guest.linux` (tasks from BTF offsets, address spaces from mm->pgd);
this module turns it into what the debugger needs: a `ProcessScope` with the page-table base to
filter breakpoints on and a hook that tells when the process exits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.debugger.model import ProcessScope
from vmigdb.guest.linux import modules, tasks

if TYPE_CHECKING:
    from vmigdb.debugger.engine import Debugger

EXIT_HOOK = "do_exit"  # every task leaves through it, in its own address space


class ProcessNotFound(Exception):
    """No process (or more than one) answers to what the user named; the message says which."""


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    ppid: int
    comm: str
    cr3: int | None  # physical address of its page tables; None for kernel threads
    state: str


def list_processes(debugger: Debugger) -> list[ProcessInfo]:
    """Every process of the guest, from its own task list. :raises GuestUnavailable:"""
    linux = debugger.guest.linux()
    return [
        ProcessInfo(t.pid, t.ppid, t.comm, tasks.task_cr3(linux, t), t.state)
        for t in tasks.for_each_task(linux)
    ]


def list_modules(debugger: Debugger) -> list[modules.Module]:
    """:raises GuestUnavailable:"""
    return modules.modules(debugger.guest.linux())


def scope_for(debugger: Debugger, which: str) -> ProcessScope:
    """The scope for a pid or a process name (unique). :raises ProcessNotFound, GuestUnavailable:"""
    linux = debugger.guest.linux()
    if which.isdigit():
        task = tasks.find_task(linux, int(which))
        if task is None:
            raise ProcessNotFound(f"no process with pid {which}")
    else:
        found = [t for t in tasks.find_tasks(linux, which) if t.is_thread_leader]
        if not found:
            raise ProcessNotFound(f"no process named {which!r}")
        if len(found) > 1:
            pids = ", ".join(str(t.pid) for t in found)
            raise ProcessNotFound(
                f"{len(found)} processes are named {which!r} (pids {pids}): pick one by pid"
            )
        task = found[0]
    cr3 = tasks.task_cr3(linux, task)
    if cr3 is None:
        raise ProcessNotFound(
            f"{task.comm} (pid {task.pid}) is a kernel thread: it has no address space of its own"
        )
    hook = linux.symbols.lookup(EXIT_HOOK)
    pid = task.pid

    def is_exiting(regs: RegisterFile) -> bool:
        """At the exit hook in its address space: is it the process itself, not one thread?"""
        current = tasks.current_task(linux, regs["gs_base"], regs["k_gs_base"], regs["cs"])
        return current is not None and current.pid == pid

    return ProcessScope(pid, task.comm, cr3, hook.address if hook else None, is_exiting)
