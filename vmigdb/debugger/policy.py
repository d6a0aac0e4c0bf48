"""The stealth policy: which mechanisms the guest could see, and whether vmigdb may use them.

Each driver declares, per mechanism, whether the guest could observe it (`hv.base.Mechanism`). The
debugger asks the policy before it uses one:
- `strict` refuses any visible mechanism, with a message that says why (GDB gets an error reply
  and `monitor stealth` explains), instead of silently falling back;
- `default` prefers invisible mechanisms, uses a visible one only when nothing else can do the job,
  and warns once per mechanism (on GDB's console, with the next stop).
Run-control jobs (breakpoints, watchpoints, steps) stop the guest or change how its code is
translated, so they are only as invisible as the driver's guest time: a job passes the policy for
its own mechanism and for `Capabilities.guest_time` (TCG: visible under --time host, where the
retranslation they cause shows in RDTSC timing). A driver whose every stop shows whatever the
mechanism (KVM's TSC runs on while stopped) declares that in `extra` instead: listed, not gated,
since there is no invisible alternative to prefer. The policy also records what is in use, so
`monitor stealth` can tell the truth.
"""

from __future__ import annotations

import enum

from vmigdb.hv.base import Capabilities, Mechanism

# The jobs whose use shows in guest time when the driver's guest time is visible.
TIMED_JOBS = frozenset(
    {
        "software breakpoint",
        "hardware breakpoint",
        "watchpoint",
        "single-step",
        "software breakpoint (fallback)",
    }
)
GUEST_TIME = "guest time"
MAX_REFUSALS = 5


class StealthMode(enum.Enum):
    DEFAULT = "default"
    STRICT = "strict"


class StealthRefused(Exception):
    """A visible mechanism was needed and the policy is strict; the message says why."""


class StealthPolicy:
    def __init__(self, mode: StealthMode, capabilities: Capabilities) -> None:
        self.mode = mode
        self._caps = capabilities
        self.in_use: dict[str, Mechanism] = {}  # job -> mechanism, as used so far
        self._warned: set[str] = set()
        self._pending: list[str] = []
        # What strict refused, newest last: GDB does not print the text of a refused Z packet
        # ("Cannot insert breakpoint"), so `monitor stealth` says it.
        self.refusals: list[str] = []

    def use(self, job: str, mechanism: Mechanism) -> None:
        """Record that `job` is done with `mechanism`; raises StealthRefused if it may not be."""
        time = self._caps.guest_time if job in TIMED_JOBS else None
        if time is not None:
            self._allow(job, time)
        self._allow(job, mechanism)
        if time is not None:
            self.in_use[GUEST_TIME] = time
        self.in_use[job] = mechanism

    def record(self, job: str, mechanism: Mechanism | None) -> None:
        """Record a job the user asked for in so many words (reads, writes): never refused."""
        if mechanism is not None:
            self.in_use[job] = mechanism

    def _allow(self, job: str, mechanism: Mechanism) -> None:
        if mechanism.guest_visible:
            if self.mode is StealthMode.STRICT:
                reason = (
                    f"{job} would need {mechanism.description}, which the guest can see "
                    f"({mechanism.why}); refused by --stealth strict"
                )
                if reason in self.refusals:
                    self.refusals.remove(reason)
                self.refusals = [*self.refusals[-(MAX_REFUSALS - 1) :], reason]
                raise StealthRefused(reason)
            if mechanism.key not in self._warned:
                self._warned.add(mechanism.key)
                self._pending.append(
                    f"vmigdb: warning: {job} uses {mechanism.description}, which the guest can "
                    f"see ({mechanism.why}); --stealth strict would refuse it"
                )

    def take_warnings(self) -> str | None:
        """Warnings not yet shown to GDB, as one console message."""
        if not self._pending:
            return None
        text, self._pending = "\n".join(self._pending), []
        return text

    def describe(self) -> list[str]:
        """`monitor stealth`: the mode, then every mechanism the driver declares."""
        lines = [f"stealth: {self.mode.value}"]
        for job, mechanism in self._caps.all():
            visible = "VISIBLE to the guest" if mechanism.guest_visible else "invisible"
            limit = f", {mechanism.limit} slots" if mechanism.limit else ""
            used = "in use" if self.in_use.get(job) == mechanism else "available"
            lines.append(f"  {job}: {mechanism.description}{limit} — {visible}, {used}")
            if mechanism.why:
                lines.append(f"      ({mechanism.why})")
        if self.refusals:
            lines.append("refused (newest last):")
            lines += [f"  {reason}" for reason in self.refusals]
        return lines
