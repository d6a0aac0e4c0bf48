"""Run control: resuming the machine, and how each hypervisor stop is interpreted.

A stop is reported when GDB would want it: its step finished, its breakpoint was hit (in scope, with
a true condition), a watchpoint fired, ^C, a catchpoint wants it (a system call, an exec, a module
load, a dying kernel: `CatchpointTable`; or an event the hypervisor caught), or the scoped process
is exiting. Everything else (a hit in another process, a false condition, a catchpoint hook's
hit that is not for GDB, a range-stepping exit not yet reached, a step QEMU lost) is handled here
by stepping or running on, without a GDB round trip.

Theory of operation: `resume(actions)` drops stale breakpoints from the hypervisor, forgets the
stopped state's caches and runs the vCPUs; `running` is True until `poll()` or `halt()` returns a
`StopEvent`. Between a resume and the stop GDB sees, the guest may run several times on vmigdb's own
account (`_drive`): what GDB asked for (`_request`) is kept apart from what the driver was last asked
to do (`_driving`). `RunControl` is the only owner of that state, of the range step in flight and of
the lost-step bookkeeping; registers and memory belong to `MachineState`, the scope to `ScopeWatch`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.debugger.breakpoints import (
    Breakpoint,
    BreakpointLimitError,
    BreakpointTable,
    ConditionError,
)
from vmigdb.debugger.catchpoints import CatchpointTable, CatchStop
from vmigdb.debugger.events import SIGINT, SIGTRAP, StopEvent, StopReason
from vmigdb.debugger.model import Action, ActiveRange, MemoryFault, RangeStep, cr3_base
from vmigdb.debugger.policy import StealthPolicy, StealthRefused
from vmigdb.debugger.range_step import plan_range
from vmigdb.debugger.scope import ScopeWatch
from vmigdb.debugger.state import MachineState
from vmigdb.debugger.stepping import may_stay_put
from vmigdb.errors import log_internal_error
from vmigdb.hv.base import (
    BreakpointType,
    Driver,
    DriverError,
    DriverStop,
    MachineGone,
    Unsupported,
)

log = logging.getLogger("vmigdb.debugger")

_MAX_LOST_STEP_RETRIES = 3
RANGE = "range"  # the owner name of range-stepping exits among vmigdb's own breakpoints


class RunControl:
    def __init__(
        self,
        driver: Driver,
        state: MachineState,
        breakpoints: BreakpointTable,
        policy: StealthPolicy,
        scope: ScopeWatch,
        catchpoints: CatchpointTable,
        on_run: Callable[[], None] = lambda: None,
    ) -> None:
        self._driver = driver
        self._state = state
        self._breakpoints = breakpoints
        self._policy = policy
        self._scope = scope
        self._catchpoints = catchpoints
        self._on_run = on_run  # other caches of guest state to drop when the guest runs
        self._cpus = driver.cpus()
        self.running = False
        self.last_stop: StopEvent | None = None
        self._request: dict[int, Action] = {}  # what GDB asked for at the last resume
        self._driving: dict[int, str] = {}  # what the driver was last asked to do
        self._range: ActiveRange | None = None
        self._rips_at_resume: dict[int, int] = {}
        self._lost_step_retries = 0
        self._interrupt_requested = False  # GDB's ^C: the next stop is reported, whatever it is
        # A stop GDB has not seen yet, reported at its next resume without running (the machine
        # was put in another state while stopped: a snapshot was loaded).
        self._arrived: StopEvent | None = None

    # -- requests ---------------------------------------------------------------------------------

    def resume(self, actions: dict[int, Action]) -> StopEvent | None:
        """Run: `actions` maps vCPU to 'c', 's' or a `RangeStep`; vCPUs not named stay stopped.
        Returns a stop instead of running when one is due first (see `arrive`).

        :raises Unsupported: if the driver has no run control (or cannot step, for 's').
        """
        if self._arrived is not None:
            event, self._arrived = self._arrived, None
            self.last_stop = event
            return event
        if not self._driver.capabilities.run_control:
            raise Unsupported(f"the {self._driver.name} driver cannot run the guest")
        if self.running:
            raise DriverError("the machine is already running")
        if any(action != "c" for action in actions.values()):
            self._use_single_step()
        self._range = None
        for cpu, action in actions.items():
            if isinstance(action, RangeStep):
                self._range = self._start_range(cpu, action)
        self._catchpoints.resuming(self._scope.current)
        self._breakpoints.sync()
        self._request = dict(actions)
        self._drive({cpu: self._first_move(cpu, act) for cpu, act in actions.items()})
        return None

    def arrive(self, event: StopEvent) -> None:
        """The stopped machine is now in another state (a snapshot loaded): GDB, which cannot be
        told outside a stop reply, gets `event` at its next resume, and no guest code runs."""
        if self.running:
            raise DriverError("internal: the machine changed state while running")
        self._range = None
        self._request = {}
        self.last_stop = event
        self._arrived = event

    def interrupt(self) -> None:
        if self.running:
            self._interrupt_requested = True
            self._driver.interrupt()

    def poll(self) -> StopEvent | None:
        """Call when the driver's stop fd is readable. None: nothing for GDB (yet)."""
        try:
            stop = self._driver.poll_stop()
        except MachineGone:
            raise
        except DriverError as exc:
            # The hypervisor did not run as asked (e.g. refused the resume): the machine is
            # stopped, and GDB, waiting for a stop, is told so with the reason.
            log.warning("%s", exc)
            self.running = False
            cpu = self._cpus[0]
            message = f"vmigdb: the guest did not run as asked: {exc}"
            regs = self._state.registers(cpu)
            return self._report(
                StopEvent(StopReason.SIGNAL, cpu, SIGTRAP, None, None, regs, message)
            )
        return None if stop is None else self._handle(stop)

    def halt(self, timeout: float = 10.0) -> StopEvent:
        """Stop a running machine now (at attach). Returns the stop, whatever caused it.

        A machine that never ran (a dump, or a driver that hands over a stopped guest) has not
        stopped anywhere yet: its stop is the first vCPU, where it stands.
        """
        if not self.running:
            if self.last_stop is None:
                cpu = self._cpus[0]
                regs = self._state.registers(cpu)
                self.last_stop = StopEvent(StopReason.SIGNAL, cpu, SIGTRAP, None, None, regs)
            return self.last_stop
        self.interrupt()
        while True:
            event = self._handle(self._driver.wait_stop(timeout))
            if event is not None:
                return event

    def forget_range(self) -> None:
        """Drop a range step's exit breakpoints (at detach)."""
        self._breakpoints.release_internal(RANGE)

    # -- driving ----------------------------------------------------------------------------------

    def _first_move(self, cpu: int, action: Action) -> str:
        """A planned range step starts running at once, unless its first instruction holds a
        breakpoint or only a step can tell where it goes: one VM stop fewer per `next`, and no
        single-step right after the breakpoint changes the plan made (QEMU 7.2 handles those
        badly: see `_lost_step`)."""
        if action == "c":
            # A vCPU stopped on a breakpoint of vmigdb's own (a death hook) steps off it first:
            # continuing would hit it again at once. Only a vCPU whose registers this stop has
            # read can be standing on one.
            regs = self._state.cached_registers(cpu)
            if regs is not None and self._breakpoints.internal_at(regs["rip"]):
                return "s"
            return "c"
        rng = self._range
        if isinstance(action, RangeStep) and rng is not None and rng.cpu == cpu and rng.plan:
            rip = self._state.registers(cpu)["rip"]
            if rip not in rng.plan.step_points and not self._breakpoints.installed_at(rip):
                return "c"
        return "s"

    def _use_single_step(self) -> None:
        """Ask the stealth policy before any step (raises StealthRefused in strict mode)."""
        mechanism = self._driver.capabilities.single_step
        if mechanism is None:
            raise Unsupported(f"the {self._driver.name} driver cannot single-step")
        self._policy.use("single-step", mechanism)

    def _drive(self, actions: dict[int, str], *, retry: bool = False) -> None:
        """Ask the driver to run; remembers what was asked, for the step checks at the stop."""
        if "s" in actions.values():
            self._use_single_step()  # vmigdb's own steps (step-over, range stepping) count too
        if not retry:
            self._lost_step_retries = 0
            self._rips_at_resume = {
                cpu: self._state.registers(cpu)["rip"] for cpu, act in actions.items() if act == "s"
            }
        self._driving = dict(actions)
        self._run()

    def _run(self) -> None:
        self._state.forget()
        self._on_run()
        self._driver.resume(self._driving)
        self.running = True

    # -- stops ------------------------------------------------------------------------------------

    def _handle(self, stop: DriverStop) -> StopEvent | None:
        """Interpret one hypervisor stop: report it to GDB, or go on by ourselves (None).

        Whatever goes wrong while interpreting it, a machine that is stopped is reported stopped:
        GDB is never left waiting for a stop that already happened.
        """
        try:
            return self._interpret(stop)
        except (StealthRefused, Unsupported) as exc:
            # Going on by ourselves needed a mechanism the policy refuses, or the driver lacks
            # (e.g. a step off a filtered hit without single-step): let GDB see this stop.
            message = str(exc)
        except MachineGone:
            raise
        except DriverError as exc:
            if self.running:
                raise  # it failed after the guest was running again: its stop will come
            log.warning("while handling a stop: %s", exc)
            message = f"vmigdb: the hypervisor failed while handling this stop ({exc})"
        except Exception as exc:  # noqa: BLE001 - a bug: GDB gets the stop rather than a hang
            log_internal_error(log, f"interpreting {stop}", exc)
            if self.running:
                return None  # the guest runs again; its next stop reaches GDB as usual
            message = f"vmigdb: internal error ({type(exc).__name__}: {exc}); see vmigdb's log"
        self.running = False
        cpu = stop.cpu if stop.cpu in self._cpus else self._cpus[0]
        try:
            regs: RegisterFile | None = self._state.registers(cpu)
        except DriverError:
            regs = None
        return self._report(StopEvent(StopReason.SIGNAL, cpu, SIGTRAP, None, None, regs, message))

    def _interpret(self, stop: DriverStop) -> StopEvent | None:
        self.running = False
        self._state.forget()
        if stop.exited is not None:
            return self._report(StopEvent(StopReason.EXITED, None, stop.signal, None, stop.exited))
        cpu = stop.cpu if stop.cpu in self._cpus else self._cpus[0]
        regs = self._state.registers(cpu)
        if stop.watch is not None:
            return self._report(StopEvent(StopReason.WATCH, cpu, SIGTRAP, stop.watch, None, regs))
        if stop.catch is not None:  # a catchpoint the hypervisor serves itself
            message = stop.message or f"vmigdb: catchpoint {stop.catch}"
            return self._report(
                StopEvent(StopReason.CATCH, cpu, SIGTRAP, None, None, regs, message)
            )
        if stop.signal == SIGINT:
            return self._report(StopEvent(StopReason.INTERRUPT, cpu, SIGINT, None, None, regs))
        if self._driving.get(cpu) == "s" and stop.signal == SIGTRAP:
            if self._lost_step(cpu, regs["rip"]):
                self._lost_step_retries += 1
                log.info(
                    "QEMU lost a single-step at %#x on CPU#%d; stepping again", regs["rip"], cpu - 1
                )
                return self._go_on(cpu, regs, self._driving, retry=True)
            if self._request.get(cpu) == "s":
                return self._report(StopEvent(StopReason.STEP, cpu, SIGTRAP, None, None, regs))
            return self._after_own_step(cpu, regs)
        return self._on_trap(cpu, regs, stop.signal or SIGTRAP)

    def _after_own_step(self, cpu: int, regs: RegisterFile) -> StopEvent | None:
        """A step vmigdb took by itself (range stepping, or stepping off a filtered hit)."""
        rip = regs["rip"]
        # the stepping process's own step only: the vCPU may be running another process that
        # was just stepped off one of vmigdb's breakpoints (which is no exit from the range)
        rng = self._range if self._range is not None and self._range.owns(cpu, regs) else None
        if rng is not None and not rng.contains(rip):
            return self._report(StopEvent(StopReason.STEP, cpu, SIGTRAP, None, None, regs))
        if self._breakpoints.at(rip):  # execution reached a GDB breakpoint
            event = self._breakpoint_hit(cpu, regs)
            if event is not None:
                return event
        if self._catchpoints.at(rip):  # or a catchpoint's hook: the step did not run it yet
            event = self._catch(cpu, regs)
            if event is not None:
                return event
        if rng is not None and (rng.plan is None or rip in rng.plan.step_points):
            return self._go_on(cpu, regs, self._with(cpu, "s"))
        if self._breakpoints.installed_at(rip):
            # continuing from a breakpoint would hit it again at once
            return self._go_on(cpu, regs, {cpu: "s"})
        return self._go_on(cpu, regs, self._with(cpu, "c"))

    def _on_trap(self, cpu: int, regs: RegisterFile, signal: int) -> StopEvent | None:
        """A vCPU that was running stopped on a trap: a breakpoint, ours, or unexplained."""
        rip = regs["rip"]
        rng = self._range
        ours = self._breakpoints.at(rip)
        internal = self._breakpoints.internal_at(rip)  # before a catchpoint moves its hooks
        if ours:
            event = self._breakpoint_hit(cpu, regs)
            if event is not None:
                return event
        if self._catchpoints.at(rip):
            event = self._catch(cpu, regs)
            if event is not None:
                return event
        if self._scope.exiting(rip, regs):
            scope = self._scope.current
            assert scope is not None
            self._scope.set(None)
            message = (
                f"vmigdb: process {scope.pid} ({scope.comm}) is exiting; "
                "the scope is the whole machine again"
            )
            event = StopEvent(StopReason.SIGNAL, cpu, SIGTRAP, None, None, regs, message)
            return self._report(event)
        if self._breakpoints.internal_at(rip, RANGE) and rng is not None and rng.owns(cpu, regs):
            if not rng.contains(rip):
                return self._report(StopEvent(StopReason.STEP, cpu, SIGTRAP, None, None, regs))
            # an instruction whose destination only a step tells
            return self._go_on(cpu, regs, self._with(cpu, "s"))
        if not ours and not internal:
            return self._report(StopEvent(StopReason.SIGNAL, cpu, signal, None, None, regs))
        return self._go_on(cpu, regs, {cpu: "s"})  # not for GDB: step off it, then go on

    def _catch(self, cpu: int, regs: RegisterFile) -> StopEvent | None:
        """A vCPU at a catchpoint's hook: the catchpoint's stop, as GDB will see it, or None."""
        stop = self._catchpoints.hit(cpu, regs)
        if stop is None:
            return None
        return self._report(self._catch_event(cpu, regs, stop))

    def _catch_event(self, cpu: int, regs: RegisterFile, stop: CatchStop) -> StopEvent:
        if stop.set_scope:
            self._scope.set(stop.scope)
        if stop.view is not None:
            self._state.set_view(cpu, stop.view)
            regs = stop.view.registers
        elif stop.orig_rax is not None:
            self._state.set_orig_rax(cpu, stop.orig_rax)
        return StopEvent(
            StopReason.CATCH,
            cpu,
            SIGTRAP,
            None,
            None,
            regs,
            stop.message,
            syscall=stop.syscall,
            libraries_changed=stop.libraries_changed,
            libraries_only=stop.libraries_only,
        )

    def _with(self, cpu: int, action: str) -> dict[int, str]:
        """GDB's requested actions as driver actions, with `cpu` doing `action`."""
        actions = {c: "s" if a == "s" else "c" for c, a in self._request.items()}
        actions[cpu] = action
        return actions

    def _breakpoint_hit(self, cpu: int, regs: RegisterFile) -> StopEvent | None:
        """GDB breakpoints at rip: report unless each is out of scope or has only false conditions.

        The scope check (CR3 base) happens here, inside vmigdb: a hit in another process resumes
        the guest without a GDB round trip.
        """
        space = cr3_base(regs["cr3"])
        hits = [
            bp
            for bp in self._breakpoints.at(regs["rip"])
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
        context = ConditionContext(self._state, cpu, regs)
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
        warnings = self._policy.take_warnings()
        if warnings:
            message = f"{event.message}\n{warnings}" if event.message else warnings
            event = replace(event, message=message)
        if self._range is not None:
            self._breakpoints.release_internal(RANGE)
            self._range = None
        self._request = {}
        self._interrupt_requested = False
        self.last_stop = event
        return event

    # -- range stepping ---------------------------------------------------------------------------

    def _start_range(self, cpu: int, step: RangeStep) -> ActiveRange:
        """Plan a range step and place its exit breakpoints; without a plan, every step is taken."""
        regs = self._state.registers(cpu)
        plan = None
        try:
            code = self._state.read_memory(cpu, step.start, step.end - step.start)
            plan = plan_range(code, step.start, step.end)
            if plan is not None:
                for address in plan.exits | plan.step_points:
                    self._breakpoints.add_internal(address, RANGE)
        except (MemoryFault, BreakpointLimitError, DriverError) as exc:
            log.info("range %#x-%#x: stepping each instruction (%s)", step.start, step.end, exc)
            self._breakpoints.release_internal(RANGE)
            plan = None
        return ActiveRange(cpu, step.start, step.end, plan, cr3_base(regs["cr3"]))

    def _lost_step(self, cpu: int, rip: int) -> bool:
        """QEMU reported a step that did not move an instruction that cannot stay put: step again.
        Seen right after a breakpoint change (QEMU 7.2) and, rarely, with none (QEMU 10's
        multi-threaded TCG, the soak: `push $0x33` in entry_SYSCALL_64)."""
        if rip != self._rips_at_resume.get(cpu) or self._lost_step_retries >= _MAX_LOST_STEP_RETRIES:
            return False
        try:
            code = self._state.read_memory(cpu, rip, 16)
        except MemoryFault:
            return False
        return not may_stay_put(code, rip)

    def _go_on(
        self, cpu: int, regs: RegisterFile, actions: dict[int, str], *, retry: bool = False
    ) -> StopEvent | None:
        """Run on by ourselves, not reporting this stop, unless GDB asked to interrupt meanwhile:
        then this stop is the interrupt's (a ^C is never lost to a storm of filtered hits)."""
        if self._interrupt_requested:
            return self._report(StopEvent(StopReason.INTERRUPT, cpu, SIGINT, None, None, regs))
        self._drive(actions, retry=retry)
        return None


class ConditionContext:
    """What a target-side condition may read: the hitting vCPU's registers and memory."""

    def __init__(self, state: MachineState, cpu: int, regs: RegisterFile) -> None:
        self._state = state
        self._cpu = cpu
        self._regs = regs

    def register(self, regnum: int) -> int:
        return int.from_bytes(self._regs.raw(regnum), "little")

    def read_memory(self, address: int, size: int) -> bytes:
        data = self._state.read_memory(self._cpu, address, size)
        if len(data) != size:
            raise MemoryFault(address + len(data), "not mapped")
        return data
