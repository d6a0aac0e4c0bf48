"""What GDB is told when a request fails: every exception to one RSP error reply, in one place.

A malformed packet is the client's fault and gets `E16` (EINVAL); the conversation goes on. What the
machine or the policy refused gets the reply GDB makes the most of: `E.text` where GDB prints the
text (resume packets, register writes, Z), else an errno-style `Exx`. Anything else is a bug in
vmigdb: it is logged with its traceback as an internal error (`vmigdb.errors.log_internal_error`)
and answered `Eff` (no errno means it), so a bug never passes for a malformed packet.

What GDB 13 prints for an `E.text` reply (tests/e2e/test_no_run_control.py): to a resume,
"warning: Remote failure reply: E.text", then the stop where the machine stands; to `P`/`G`,
'Could not write register "rax"; remote failure reply 'E.text''; to `Z`, only "Cannot insert
breakpoint N." (the text is dropped); to `M`/`X`, "Cannot access memory at address ...". An
`E.text` reply to `m`, `g` or `p` would be decoded as hex, so those get `Exx` only.

| exception | reply |
|---|---|
| `PacketError`: the packet does not parse, or its arguments are out of range | `E16` (EINVAL) |
| `MemoryFault` | `E0e` (EFAULT) |
| `Unsupported` (e.g. `UnsupportedBreakpoint`): the driver cannot do it at all | `E.text` |
| `StealthRefused`: `--stealth strict` refused a visible mechanism | `E.text` |
| `RegisterWriteRefused`: a value no vCPU could hold (reserved RFLAGS bits...) | `E.text` |
| `NotNow`: the hypervisor cannot at this stop, and says what to do | `E.text` |
| `BreakpointLimitError` | `E1c` (ENOSPC) |
| `DriverError`: the hypervisor refused | `E05` (EIO) |
| anything else: a bug | `Eff` |
"""

from __future__ import annotations

import logging

from vmigdb.debugger.breakpoints import BreakpointLimitError
from vmigdb.debugger.model import MemoryFault, RegisterWriteRefused
from vmigdb.debugger.policy import StealthRefused
from vmigdb.errors import log_internal_error
from vmigdb.hv.base import DriverError, NotNow, Unsupported

log = logging.getLogger("vmigdb.rsp")

EINVAL = b"E16"
EFAULT = b"E0e"
EIO = b"E05"
ENOSPC = b"E1c"
ESRCH = b"E03"
INTERNAL = b"Eff"  # a bug in vmigdb, logged with its traceback


class PacketError(Exception):
    """The packet is malformed or its arguments are out of range."""


def text_reply(message: str) -> bytes:
    """`E.message`: an error GDB prints as text where it prints any (no '$', '#' or '*' in it)."""
    clean = message.replace("$", "").replace("#", "").replace("*", "").replace("}", "")
    return b"E." + clean.encode("utf-8", "replace")


def error_reply(exc: BaseException, payload: bytes) -> bytes:
    """The reply for a request (`payload`) that raised `exc`. See the module docstring."""
    if isinstance(exc, PacketError):
        log.info("malformed packet %r: %s", payload[:64], exc)
        return EINVAL
    if isinstance(exc, MemoryFault):
        return EFAULT
    if isinstance(exc, StealthRefused):
        log.warning("%s", exc)
        return text_reply(str(exc))
    if isinstance(exc, RegisterWriteRefused):
        log.warning("register write %r %s", payload[:64], exc)
        return text_reply(str(exc))
    if isinstance(exc, Unsupported):
        log.info("refused %r: %s", payload[:64], exc)
        return text_reply(f"vmigdb: {exc}")
    if isinstance(exc, NotNow):
        log.info("refused %r: %s", payload[:64], exc)
        return text_reply(f"vmigdb: {exc}")
    if isinstance(exc, BreakpointLimitError):
        log.warning("%s", exc)
        return ENOSPC
    if isinstance(exc, DriverError):
        log.warning("hypervisor refused %r: %s", payload[:64], exc)
        return EIO
    log_internal_error(log, f"answering {payload[:64]!r}", exc)
    return INTERNAL
