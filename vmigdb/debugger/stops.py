"""How the debugger interprets each hypervisor stop: report it to GDB, or go on by itself.

A stop is reported when GDB would want it: its step finished, its breakpoint was hit (in scope, with
a true condition), a watchpoint fired, ^C, or the scoped process is exiting. Everything else (a hit
in another process, a false condition, a range-stepping exit not yet reached, a step QEMU lost) is
handled here by stepping or running on, without a GDB round trip.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.debugger.breakpoints import Breakpoint, BreakpointLimitError, ConditionError
from vmigdb.debugger.events import SIGINT, SIGTRAP, StopEvent, StopReason
from vmigdb.debugger.model import ActiveRange, MemoryFault, RangeStep, cr3_base
from vmigdb.debugger.policy import StealthRefused
from vmigdb.debugger.range_step import plan_range
from vmigdb.debugger.stepping import may_stay_put
from vmigdb.errors import log_internal_error
from vmigdb.hv.base import BreakpointType, DriverError, DriverStop

if TYPE_CHECKING:
    from vmigdb.debugger.engine import Debugger

log = logging.getLogger("vmigdb.debugger")

_MAX_LOST_STEP_RETRIES = 3


class StopHandling:
    """The stop pipeline of `Debugger` (a mixin: it works on the debugger's own state)."""

    # -- stops ------------------------------------------------------------------------------------

    def _handle(self, stop: DriverStop) -> StopEvent | None:
        """Interpret one hypervisor stop: report it to GDB, or go on by ourselves (None)."""
        try:
            return self._interpret(stop)
        except StealthRefused as exc:
            # Going on by ourselves needed a mechanism the policy refuses: let GDB see this stop.
            cpu = stop.cpu if stop.cpu in self._cpus else self._cpus[0]
            regs = self.registers(cpu)
            return self._report(
                StopEvent(StopReason.SIGNAL, cpu, SIGTRAP, None, None, regs, str(exc))
            )
        except DriverError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: GDB gets the stop rather than a hang
            log_internal_error(log, f"interpreting {stop}", exc)
            self.running = False
            cpu = stop.cpu if stop.cpu in self._cpus else self._cpus[0]
            message = f"vmigdb: internal error ({type(exc).__name__}: {exc}); see vmigdb's log"
            return self._report(
                StopEvent(StopReason.SIGNAL, cpu, SIGTRAP, None, None, None, message)
            )

    def _interpret(self, stop: DriverStop) -> StopEvent | None:
        self.running = False
        self._regs.clear()
        self.translator.flush()
        if stop.exited is not None:
            return self._report(StopEvent(StopReason.EXITED, None, stop.signal, None, stop.exited))
        cpu = stop.cpu if stop.cpu in self._cpus else self._cpus[0]
        regs = self.registers(cpu)
        if stop.watch is not None:
            return self._report(StopEvent(StopReason.WATCH, cpu, SIGTRAP, stop.watch, None, regs))
        if stop.signal == SIGINT:
            return self._report(StopEvent(StopReason.INTERRUPT, cpu, SIGINT, None, None, regs))
        if self._driving.get(cpu) == "s" and stop.signal == SIGTRAP:
            if self._lost_step(cpu, regs["rip"]):
                return None
            if self._request.get(cpu) == "s":
                return self._report(StopEvent(StopReason.STEP, cpu, SIGTRAP, None, None, regs))
            return self._after_own_step(cpu, regs)
        return self._on_trap(cpu, regs, stop.signal or SIGTRAP)

    def _after_own_step(self, cpu: int, regs: RegisterFile) -> StopEvent | None:
        """A step vmigdb took by itself (range stepping, or stepping off a filtered hit)."""
        rip = regs["rip"]
        rng = self._range if self._range is not None and self._range.cpu == cpu else None
        if rng is not None and not rng.contains(rip):
            return self._report(StopEvent(StopReason.STEP, cpu, SIGTRAP, None, None, regs))
        if self.breakpoints.at(rip):  # execution reached a GDB breakpoint
            event = self._breakpoint_hit(cpu, regs)
            if event is not None:
                return event
        if rng is not None and (rng.plan is None or rip in rng.plan.step_points):
            self._drive(self._with(cpu, "s"))
        elif self.breakpoints.installed_at(rip):
            self._drive({cpu: "s"})  # continuing from a breakpoint would hit it again at once
        else:
            self._drive(self._with(cpu, "c"))
        return None

    def _on_trap(self, cpu: int, regs: RegisterFile, signal: int) -> StopEvent | None:
        """A vCPU that was running stopped on a trap: a breakpoint, ours, or unexplained."""
        rip = regs["rip"]
        rng = self._range
        if self.breakpoints.at(rip):
            event = self._breakpoint_hit(cpu, regs)
            if event is not None:
                return event
        elif self._scoped_process_exits(rip, regs):
            scope = self.scope
            assert scope is not None
            self.set_scope(None)
            message = (
                f"vmigdb: process {scope.pid} ({scope.comm}) is exiting; "
                "the scope is the whole machine again"
            )
            event = StopEvent(StopReason.SIGNAL, cpu, SIGTRAP, None, None, regs, message)
            return self._report(event)
        elif self.breakpoints.internal_at(rip, "range") and rng is not None and rng.owns(cpu, regs):
            if not rng.contains(rip):
                return self._report(StopEvent(StopReason.STEP, cpu, SIGTRAP, None, None, regs))
            self._drive(self._with(cpu, "s"))  # an instruction whose destination only a step tells
            return None
        elif not self.breakpoints.internal_at(rip):
            return self._report(StopEvent(StopReason.SIGNAL, cpu, signal, None, None, regs))
        self._drive({cpu: "s"})  # not for GDB: step off it, then go on as GDB asked
        return None

    def _with(self, cpu: int, action: str) -> dict[int, str]:
        """GDB's requested actions as driver actions, with `cpu` doing `action`."""
        actions = {c: "s" if a == "s" else "c" for c, a in self._request.items()}
        actions[cpu] = action
        return actions

    def _scoped_process_exits(self, rip: int, regs: RegisterFile) -> bool:
        scope = self.scope
        return (
            scope is not None
            and rip == scope.exit_hook
            and cr3_base(regs["cr3"]) == cr3_base(scope.cr3)
            and (scope.is_exiting is None or scope.is_exiting(regs))
        )

    def _breakpoint_hit(self, cpu: int, regs: RegisterFile) -> StopEvent | None:
        """GDB breakpoints at rip: report unless each is out of scope or has only false conditions.

        The scope check (CR3 base) happens here, inside vmigdb: a hit in another process resumes
        the guest without a GDB round trip.
        """
        space = cr3_base(regs["cr3"])
        hits = [
            bp
            for bp in self.breakpoints.at(regs["rip"])
            if bp.scope_cr3 is None or cr3_base(bp.scope_cr3) == space
        ]
        if not any(self._condition_holds(bp, cpu, regs) for bp in hits):
            return None
        software = any(bp.type == BreakpointType.SOFTWARE for bp in hits)
        reason = StopReason.SW_BREAK if software else StopReason.HW_BREAK
        return self._report(StopEvent(reason, cpu, SIGTRAP, None, None, regs))

    def _condition_holds(self, bp: Breakpoint, cpu: int, regs: RegisterFile) -> bool:
        if not bp.conditions:
            return True
        context = ConditionContext(self, cpu, regs)
        for condition in bp.conditions:
            try:
                if condition(context):
                    return True
            except ConditionError as exc:  # cannot tell: report, GDB evaluates it again
                log.info("condition at %#x could not be evaluated (%s); stopping", bp.addr, exc)
                return True
            except Exception as exc:  # noqa: BLE001 - a bug: report the hit, GDB decides
                log_internal_error(log, f"evaluating the condition at {bp.addr:#x}", exc)
                return True
        return False

    def _report(self, event: StopEvent) -> StopEvent:
        warnings = self.policy.take_warnings()
        if warnings:
            message = f"{event.message}\n{warnings}" if event.message else warnings
            event = replace(event, message=message)
        if self._range is not None:
            self.breakpoints.release_internal("range")
            self._range = None
        self._request = {}
        self.last_stop = event
        return event

    # -- range stepping ---------------------------------------------------------------------------

    def _start_range(self, cpu: int, step: RangeStep) -> ActiveRange:
        """Plan a range step and place its exit breakpoints; without a plan, every step is taken."""
        regs = self.registers(cpu)
        plan = None
        try:
            code = self.read_memory(cpu, step.start, step.end - step.start)
            plan = plan_range(code, step.start, step.end)
            if plan is not None:
                for address in plan.exits | plan.step_points:
                    self.breakpoints.add_internal(address, "range")
        except (MemoryFault, BreakpointLimitError, DriverError) as exc:
            log.info("range %#x-%#x: stepping each instruction (%s)", step.start, step.end, exc)
            self.breakpoints.release_internal("range")
            plan = None
        return ActiveRange(cpu, step.start, step.end, plan, cr3_base(regs["cr3"]))

    def _lost_step(self, cpu: int, rip: int) -> bool:
        """QEMU reported a step that did not move right after a breakpoint change: step again."""
        if (
            rip != self._rips_at_resume.get(cpu)
            or not self._bp_changed_before_resume
            or self._lost_step_retries >= _MAX_LOST_STEP_RETRIES
        ):
            return False
        try:
            code = self.read_memory(cpu, rip, 16)
        except MemoryFault:
            return False
        if may_stay_put(code, rip):
            return False
        self._lost_step_retries += 1
        log.info("QEMU lost a single-step at %#x on CPU#%d; stepping again", rip, cpu - 1)
        self._drive(self._driving, retry=True)
        return True


class ConditionContext:
    """What a target-side condition may read: the hitting vCPU's registers and memory."""

    def __init__(self, debugger: Debugger, cpu: int, regs: RegisterFile) -> None:
        self._debugger = debugger
        self._cpu = cpu
        self._regs = regs

    def register(self, regnum: int) -> int:
        return int.from_bytes(self._regs.raw(regnum), "little")

    def read_memory(self, address: int, size: int) -> bytes:
        data = self._debugger.read_memory(self._cpu, address, size)
        if len(data) != size:
            raise MemoryFault(address + len(data), "not mapped")
        return data
