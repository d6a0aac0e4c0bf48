"""`monitor catch`: one command for every catchpoint kind of the session.

Guest-side kinds (panic, exec, module; syscall, which GDB's own `catch syscall` sets, and the
library watch that follows the process scope) and the driver's own kinds (Xen's msr-write,
exec-written) are all in the debugger's `CatchpointTable`; this module only parses the user's
words for each and words its answers. `monitor catch KIND off` disarms any kind.
"""

from __future__ import annotations

from collections.abc import Callable

from vmigdb.debugger.catch_exec import CatchExecError
from vmigdb.debugger.catch_module import CatchModuleError
from vmigdb.debugger.driver_catch import DriverCatch
from vmigdb.debugger.engine import Debugger
from vmigdb.hv.base import DriverError


class CatchUsage(Exception):
    """The user's words do not make a catch command; the message says why."""


class CatchCommand:
    def __init__(self, debugger: Debugger, scope_cr3: Callable[[str], int]) -> None:
        self._debugger = debugger
        self._scope_cr3 = scope_cr3  # a process's page tables from PID or cr3=ADDR

    def run(self, args: list[str]) -> str:
        """:raises CatchUsage: with what was wrong"""
        dbg = self._debugger
        if not args:
            return self._list()
        kind, rest = args[0], args[1:]
        if kind == "panic":
            if rest not in (["on"], ["off"]):
                raise CatchUsage("usage: monitor catch panic on|off")
            dbg.health.enabled = rest == ["on"]
            return f"panic: {dbg.health.arm()}"
        if kind == "exec":
            return self._exec(rest)
        if kind == "module":
            return self._module(rest)
        catchpoint = dbg.catchpoints.get(kind)
        if kind == "syscall" and catchpoint is not None:
            return f"syscall: {catchpoint.status()} (GDB's catch syscall sets it)"
        if kind == "libraries" and catchpoint is not None:
            return f"libraries: {catchpoint.status()} (it follows the process scope)"
        if isinstance(catchpoint, DriverCatch):
            return self._driver_catch(catchpoint, rest)
        kinds = ", ".join(c.kind for c in dbg.catchpoints.kinds())
        raise CatchUsage(f"no catchpoint {kind!r}; there are: {kinds}")

    def _list(self) -> str:
        lines = []
        for catchpoint in self._debugger.catchpoints.kinds():
            if isinstance(catchpoint, DriverCatch):
                scope = " [PID|cr3=ADDR]" if catchpoint.scoped else ""
                lines.append(f"{catchpoint.kind}{scope}: {catchpoint.status()}")
                lines.append(f"    ({catchpoint.help})")
            else:
                lines.append(f"{catchpoint.kind}: {catchpoint.status()}")
        return "\n".join(lines)

    def _exec(self, args: list[str]) -> str:
        catch = self._debugger.exec_catch
        if args == ["off"]:
            catch.clear()
            return f"exec: {catch.status()}"
        if len(args) != 1:
            raise CatchUsage("usage: monitor catch exec NAME|off (a program's name or path)")
        try:
            return f"exec: {catch.arm(args[0])}"
        except CatchExecError as exc:
            raise CatchUsage(f"exec: {exc}") from None

    def _module(self, args: list[str]) -> str:
        catch = self._debugger.module_catch
        if args == ["off"]:
            catch.clear()
            return f"module: {catch.status()}"
        if len(args) > 1:
            raise CatchUsage("usage: monitor catch module [NAME]|off")
        try:
            return f"module: {catch.arm(args[0] if args else None)}"
        except CatchModuleError as exc:
            raise CatchUsage(f"module: {exc}") from None

    def _driver_catch(self, catchpoint: DriverCatch, args: list[str]) -> str:
        """`monitor catch KIND [on|off] [PID|cr3=ADDR]` for a kind the driver serves."""
        name, rest = catchpoint.kind, list(args)
        on = True
        if rest and rest[0] in ("on", "off"):
            on = rest.pop(0) == "on"
        if len(rest) > 1 or (rest and not on):
            scope = " [PID|cr3=ADDR]" if catchpoint.scoped else ""
            raise CatchUsage(f"usage: monitor catch {name} [on|off]{scope}")
        try:
            scope_cr3 = self._scope_cr3(rest[0]) if rest else None
            return f"{name}: {catchpoint.set(on, scope_cr3)}"
        except DriverError as exc:
            raise CatchUsage(f"{name}: {exc}") from None
