"""What a session advertises and serves, probed once from the driver's declared capabilities.

The Rust gdbstub crate's pattern: one probe gates both what `qSupported` and `vCont?` advertise and
which packets are served. A packet whose feature the driver lacks is not passed to the debugger:
it gets the refusal GDB handles best (see `Session`), never a hang.

What GDB 13 does with a refusal (its `remote.c`, and measured: tests/e2e/test_no_run_control.py):
- a resume (`c`, `s`, `vCont`): an `E` reply in place of the stop reply ends the wait with
  "warning: Remote failure reply: E.<text>" and a stop; the empty reply would be "Invalid remote
  reply" and a wait that never ends;
- `Z0`: the empty reply makes GDB write 0xcc into guest memory itself (seen: `X...,1:\xcc`); an
  `E` reply makes it say "Cannot insert breakpoint N." instead (the text is dropped);
- `M`/`X`: the empty reply counts as success; an `E` reply is "Cannot access memory at address";
- `P`/`G`: `E.<text>` is printed ("Could not write register ...; remote failure reply ...").
So every refusal of an action is `E.<text>`, and only `vCont?` (a question) gets the empty reply.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmigdb.hv.base import BreakpointType, Capabilities
from vmigdb.rsp.errors import text_reply

PACKET_SIZE = 0x20000  # advertised; GDB then reads up to PACKET_SIZE/2 bytes per `m`

_CANNOT = {
    "run_control": "run the guest (continue, step or stop it)",
    "catch_syscalls": "catch system calls (it has no run control or breakpoints)",
    "single_step": "single-step",
    "sw_breakpoint": "set software breakpoints",
    "hw_breakpoint": "set hardware breakpoints",
    "watchpoint": "set watchpoints",
    "memory_write": "write guest memory",
    "register_write": "write registers",
}
_BREAKPOINT_FEATURES = {
    BreakpointType.SOFTWARE: "sw_breakpoint",
    BreakpointType.HARDWARE: "hw_breakpoint",
    BreakpointType.WRITE_WATCH: "watchpoint",
    BreakpointType.READ_WATCH: "watchpoint",
    BreakpointType.ACCESS_WATCH: "watchpoint",
}


@dataclass(frozen=True, slots=True)
class Features:
    driver: str  # the driver's name, for refusals
    run_control: bool
    single_step: bool  # run control and a single-step mechanism
    sw_breakpoint: bool
    hw_breakpoint: bool
    watchpoint: bool
    memory_write: bool
    register_write: bool

    @classmethod
    def probe(cls, driver: str, caps: Capabilities) -> Features:
        return cls(
            driver=driver,
            run_control=caps.run_control,
            single_step=caps.run_control and caps.single_step is not None,
            sw_breakpoint=caps.sw_breakpoint is not None,
            hw_breakpoint=caps.hw_breakpoint is not None,
            watchpoint=caps.watchpoint is not None,
            memory_write=caps.memory_write is not None,
            register_write=caps.register_write,
        )

    @property
    def catch_syscalls(self) -> bool:
        """GDB's catch syscall (QCatchSyscalls): served by breakpoints of vmigdb's own on the
        guest kernel's system-call paths."""
        return self.run_control and self.sw_breakpoint

    @property
    def conditional_breakpoints(self) -> bool:
        """Target-side conditions: a false hit is stepped over and the guest runs on."""
        return (self.sw_breakpoint or self.hw_breakpoint) and self.single_step

    def q_supported(self) -> bytes:
        features = [
            b"PacketSize=%x" % PACKET_SIZE,
            b"QStartNoAckMode+",
            b"qXfer:features:read+",
            b"qXfer:threads:read+",
            b"qXfer:exec-file:read+",
            b"qXfer:libraries-svr4:read+",
        ]
        if self.sw_breakpoint:
            features.append(b"swbreak+")
        if self.hw_breakpoint:
            features.append(b"hwbreak+")
        if self.run_control:
            features.append(b"vContSupported+")
        if self.conditional_breakpoints:
            features.append(b"ConditionalBreakpoints+")
        if self.catch_syscalls:
            features.append(b"QCatchSyscalls+")
        return b";".join(features)

    def v_cont(self) -> bytes:
        """The reply to `vCont?`: empty (vCont unsupported) without run control. GDB uses vCont
        only when c, C, s and S are all offered; else it falls back to c/s, refused alike."""
        if not self.run_control:
            return b""
        return b"vCont;c;C;s;S;t;r" if self.single_step else b"vCont;c;C;t"

    def breakpoint_feature(self, type: BreakpointType) -> str:
        return _BREAKPOINT_FEATURES[type]

    def serves(self, feature: str) -> bool:
        return bool(getattr(self, feature))

    def refusal(self, feature: str) -> bytes:
        """The `E.` reply for a packet that needs `feature`, which the driver lacks."""
        if feature == "single_step" and not self.run_control:
            feature = "run_control"  # the bigger reason
        return text_reply(f"vmigdb: the {self.driver} driver cannot {_CANNOT[feature]}")
