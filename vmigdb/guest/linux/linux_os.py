"""Linux behind the OS-awareness interface (`vmigdb.guest.base.GuestOS`).

The knowledge lives in the helpers (`tasks`, `modules`, `symbol_file`) over a `LinuxGuest`; this
class only answers the interface's questions with them.
"""

from __future__ import annotations

from functools import cached_property

from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.guest.base import (
    DeathHook,
    ExecEvent,
    GuestError,
    GuestOS,
    ImageInfo,
    Library,
    Mapping,
    Module,
    ModuleLoad,
    Process,
    Symbol,
    SyscallFrame,
)
from vmigdb.guest.linux import dying, hooks, modules, symbol_file, tasks, user_images, vmas
from vmigdb.guest.linux.guest import LinuxGuest
from vmigdb.guest.linux.identify import find_kernel
from vmigdb.guest.linux.kernel import ReadPhys

EXIT_HOOK = "do_exit"  # every task leaves through it, in its own address space
LOADER_HOOK = "_dl_debug_state"  # glibc's dynamic loader: r_debug.r_brk
_BANNER = "linux_banner"  # "Linux version <release> ...": where it is and what it says


class LinuxOS(GuestOS):
    kind = "Linux"

    def __init__(self, guest: LinuxGuest) -> None:
        self.guest = guest
        self._vmas: dict[int, list[vmas.Vma]] = {}  # mm -> its VMAs, until the guest runs

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
        self._vmas.clear()

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

    @cached_property
    def exec_elf(self) -> bytes:
        return symbol_file.kernel_elf(self.guest)

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

    # -- inside a process -------------------------------------------------------------------------

    def _task(self, pid: int) -> tasks.Task:
        task = tasks.find_task(self.guest, pid)
        if task is None:
            raise GuestError(f"no process with pid {pid}")
        if not task.mm:
            raise GuestError(f"{task.comm} (pid {pid}) is a kernel thread: it has no address space")
        return task

    def mappings(self, pid: int) -> list[Mapping]:
        return vmas.mappings(self.guest, self._task(pid))

    def libraries(self, pid: int | None) -> list[Library]:
        if pid is None:
            return [Library(m.name, m.base, (m.address,)) for m in modules.modules(self.guest)]
        task = self._task(pid)
        found = vmas.mappings(self.guest, task)
        return user_images.libraries(found, hooks.exe_path(self.guest, task.mm) or None)

    def library_elf(self, pid: int | None, library: Library) -> bytes:
        if pid is None:
            for module in modules.modules(self.guest):
                if (module.address,) == library.key:
                    return symbol_file.module_elf(self.guest, module)
            raise GuestError(f"module {library.path} is no longer loaded")
        task = self._task(pid)
        cr3 = tasks.task_cr3(self.guest, task)
        assert cr3 is not None  # _task refuses kernel threads
        return user_images.library_elf(
            self.guest, cr3, task.mm, vmas.task_vmas(self.guest, task.mm), library
        )

    def _process_memory(self, pid: int) -> tuple[int, int, list[vmas.Vma]]:
        task = self._task(pid)
        cr3 = tasks.task_cr3(self.guest, task)
        assert cr3 is not None  # _task refuses kernel threads
        found = self._vmas.get(task.mm)
        if found is None:
            found = self._vmas[task.mm] = vmas.task_vmas(self.guest, task.mm)
        return cr3, task.mm, found

    def library_symbol(self, pid: int, library: Library, name: str) -> int | None:
        cr3, mm, found = self._process_memory(pid)
        return user_images.symbol_address(self.guest, cr3, mm, found, library, name)

    def loader_hook(self, pid: int) -> int | None:
        """glibc's loader calls ``_dl_debug_state()`` (its ``r_debug.r_brk``) each time its list
        of objects changes, before (RT_ADD/RT_DELETE) and after (RT_CONSISTENT): GDB's own SVR4
        breakpoint. The loader is the object at ``AT_BASE``."""
        interpreter = self.image_info(pid).interpreter
        if interpreter is None:
            return None
        for library in self.libraries(pid):
            if library.base == interpreter:
                return self.library_symbol(pid, library, LOADER_HOOK)
        return None

    def read_unmapped(self, pid: int, address: int, size: int) -> bytes:
        try:
            cr3, mm, found = self._process_memory(pid)
            return user_images.UserMemory(self.guest, cr3, mm, found).read_some(address, size)
        except GuestError:
            return b""

    def image_info(self, pid: int) -> ImageInfo:
        task = self._task(pid)
        path = hooks.exe_path(self.guest, task.mm)
        found = vmas.mappings(self.guest, task)
        return user_images.image_info(self.guest, task.mm, path, found)

    # -- hooks --------------------------------------------------------------------------------------

    def syscall_hooks(self, numbers: frozenset[int] | None) -> list[int]:
        return hooks.syscall_hooks(self.guest, numbers)

    def syscall_frame(self, regs: RegisterFile) -> SyscallFrame | None:
        return hooks.syscall_frame(self.guest, regs)

    def exec_hook(self) -> int:
        return hooks.exec_hook(self.guest)

    def exec_event(self, regs: RegisterFile) -> ExecEvent | None:
        return hooks.exec_event(self.guest, regs)

    def module_load_hook(self) -> int:
        return hooks.module_load_hook(self.guest)

    def module_load_event(self, regs: RegisterFile) -> ModuleLoad | None:
        return hooks.module_load_event(self.guest, regs)

    # -- health -----------------------------------------------------------------------------------

    def death_hooks(self) -> list[DeathHook]:
        return dying.death_hooks(self.guest)

    def describe_death(self, hook: DeathHook, regs: RegisterFile, cpu_name: str) -> str:
        return dying.describe_death(self.guest, hook, regs, cpu_name)
