"""Guest processes in debugger terms: list them, pick one as the debugging scope.

The OS knowledge comes from the guest's `GuestOS` (for Linux: tasks from BTF offsets, address
spaces from mm->pgd); this module turns it into what the debugger needs: a `ProcessScope` with the
page-table base to filter breakpoints on and a hook that tells when the process exits.
"""

from __future__ import annotations

from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.debugger.guest_view import GuestView
from vmigdb.debugger.model import ProcessScope
from vmigdb.guest.base import GuestError, Module, Process


class ProcessNotFound(Exception):
    """No process (or more than one) answers to what the user named; the message says which."""


def list_processes(guest: GuestView) -> list[Process]:
    """Every process of the guest, from its own task list.

    :raises GuestUnavailable: if the OS is not understood
    :raises GuestError: if the list cannot be read
    """
    return guest.os().processes()


def list_modules(guest: GuestView) -> list[Module]:
    """:raises GuestUnavailable, GuestError:"""
    return guest.os().modules()


def scope_for(guest: GuestView, which: str) -> ProcessScope:
    """The scope for a pid or a process name (unique).

    :raises ProcessNotFound, GuestUnavailable, GuestError:
    """
    guest_os = guest.os()
    if which.isascii() and which.isdigit():
        found = guest_os.find_process(int(which))
        if found is None:
            raise ProcessNotFound(f"no process with pid {which}")
        process = found
    else:
        named = guest_os.find_processes(which)
        if not named:
            raise ProcessNotFound(f"no process named {which!r}")
        if len(named) > 1:
            pids = ", ".join(str(p.pid) for p in named)
            raise ProcessNotFound(
                f"{len(named)} processes are named {which!r} (pids {pids}): pick one by pid"
            )
        process = named[0]
    if process.cr3 is None:
        raise ProcessNotFound(
            f"{process.comm} (pid {process.pid}) is a kernel thread: it has no address space of "
            "its own"
        )
    pid = process.pid

    def is_exiting(regs: RegisterFile) -> bool:
        """At the exit hook in its address space: is it the process itself, not one thread?"""
        try:
            current = guest_os.current_process(regs)
        except GuestError:
            return False  # cannot tell: the watch stays
        return current is not None and current.pid == pid

    return ProcessScope(pid, process.comm, process.cr3, guest_os.process_exit_hook(), is_exiting)
