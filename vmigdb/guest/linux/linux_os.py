"""Linux behind the OS-awareness interface (`vmigdb.guest.base.GuestOS`).

The knowledge lives in the helpers (`tasks`, `modules`, `symbol_file`) over a `LinuxGuest`; this
class only answers the interface's questions with them.
"""

from __future__ import annotations

from functools import cached_property

from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.guest.base import DeathHook, GuestError, GuestOS, Module, Process, Symbol
from vmigdb.guest.linux import dying, modules, symbol_file, tasks
from vmigdb.guest.linux.guest import LinuxGuest
from vmigdb.guest.linux.identify import find_kernel
from vmigdb.guest.linux.kernel import ReadPhys

EXIT_HOOK = "do_exit"  # every task leaves through it, in its own address space
_BANNER = "linux_banner"  # "Linux version <release> ...": where it is and what it says


class LinuxOS(GuestOS):
    kind = "Linux"

    def __init__(self, guest: LinuxGuest) -> None:
        self.guest = guest

    @classmethod
    def attach(cls, read_phys: ReadPhys, ram_ranges: list[tuple[int, int]]) -> LinuxOS:
        """:raises GuestError: (KernelNotFound, KallsymsNotFound...) with a one-line reason."""
        return cls(LinuxGuest.attach(read_phys, ram_ranges))

    @staticmethod
    def kernel_page_tables(
        read_phys: ReadPhys, ram_ranges: list[tuple[int, int]]
    ) -> tuple[int, bool]:
        """``(init_top_pgt's physical address, 5-level paging)``, from VMCOREINFO in RAM: what
        translates kernel addresses in a memory image saved without registers.
        :raises GuestError: (KernelNotFound) with a one-line reason."""
        kernel = find_kernel(read_phys, ram_ranges)
        return kernel.kernel_cr3, kernel.la57

    # -- the instance -----------------------------------------------------------------------------

    def fingerprint(self) -> tuple[int, bytes]:
        banner = self.guest.symbols.lookup(_BANNER)
        if banner is None:
            raise GuestError(f"the kernel has no {_BANNER}")
        return banner.address, self.guest.memory.read(banner.address, 64)

    def refresh(self) -> None:
        self.guest.refresh()

    def describe(self) -> list[tuple[str, str]]:
        kernel = self.guest.kernel
        lines = [("guest", f"Linux {kernel.release}")]
        text = self.guest.symbols.lookup("_text")
        where = (
            f"; kernel image at physical {kernel.kernel_image_pa(text.address):#x}" if text else ""
        )
        lines.append(("KASLR offset", f"{kernel.kaslr_offset:#x} (virtual){where}"))
        lines.append(("symbols", f"{len(self.guest.symbols)} (kallsyms, read from guest memory)"))
        return lines

    # -- symbols ----------------------------------------------------------------------------------

    def lookup_symbol(self, name: str) -> Symbol | None:
        return self.guest.symbols.lookup(name)

    @property
    def exec_file_name(self) -> str:
        return symbol_file.exec_file_name(self.guest)

    @cached_property
    def symbol_elf(self) -> bytes:
        return symbol_file.symbol_elf(self.guest)

    # -- processes --------------------------------------------------------------------------------

    def _process(self, task: tasks.Task) -> Process:
        cr3 = tasks.task_cr3(self.guest, task)
        return Process(task.pid, task.ppid, task.comm, cr3, task.state, task.is_thread_leader)

    def processes(self) -> list[Process]:
        return [self._process(t) for t in tasks.for_each_task(self.guest)]

    def find_process(self, pid: int) -> Process | None:
        task = tasks.find_task(self.guest, pid)
        return None if task is None else self._process(task)

    def find_processes(self, name: str) -> list[Process]:
        found = tasks.find_tasks(self.guest, name)
        return [self._process(t) for t in found if t.is_thread_leader]

    def current_process(self, regs: RegisterFile) -> Process | None:
        task = tasks.current_task(self.guest, regs["gs_base"], regs["k_gs_base"], regs["cs"])
        return None if task is None else self._process(task)

    def process_exit_hook(self) -> int | None:
        hook = self.guest.symbols.lookup(EXIT_HOOK)
        return hook.address if hook is not None else None

    # -- modules ----------------------------------------------------------------------------------

    def modules(self) -> list[Module]:
        return [Module(m.name, m.base, m.size) for m in modules.modules(self.guest)]

    # -- health -----------------------------------------------------------------------------------

    def death_hooks(self) -> list[DeathHook]:
        return dying.death_hooks(self.guest)

    def describe_death(self, hook: DeathHook, regs: RegisterFile, cpu_name: str) -> str:
        return dying.describe_death(self.guest, hook, regs, cpu_name)
