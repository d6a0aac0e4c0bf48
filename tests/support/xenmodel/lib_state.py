"""State of one model libvmi instance (`struct vmi_instance`), and C-call helpers.

The model `lib` receives exactly what the real cffi `lib` would: Python ints for integer
parameters, cdata for pointers (from the real `_libvmi.ffi`). `c_int` reproduces cffi's refusal
of non-integers (an `X86Reg` member passed where `reg_t` is expected is a TypeError there too).
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any

from tests.support.xenmodel.domain import Domain

log = logging.getLogger("xenmodel.libvmi")

def c_int(value: Any, bits: int = 64, signed: bool = False, what: str = "integer") -> int:
    """Convert like cffi does for an integer parameter: TypeError or OverflowError, no coercion."""
    if isinstance(value, float) or not hasattr(value, "__index__"):
        raise TypeError(f"an integer is required (got {type(value).__name__} for {what})")
    number = operator.index(value)
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if not low <= number <= high:
        raise OverflowError(f"integer {number} does not fit '{what}'")
    return number


def errprint(message: str) -> None:
    """libvmi's errprint: what the real library writes to stderr on this path."""
    log.error("libvmi: %s", message)


@dataclass
class XenEvents:
    """xen_events_t: which monitors this instance turned on (libvmi/driver/xen)."""

    monitor_singlestep_on: bool = False
    monitor_intr_on: bool = False
    monitor_cr_on: dict[int, bool] = field(default_factory=lambda: {0: False, 3: False, 4: False})
    monitor_msr_on: bool = False
    monitor_debug_on: bool = False


@dataclass
class Instance:
    """struct vmi_instance, as far as the Xen driver and the event code use it."""

    domain: Domain
    init_flags: int
    mode: int
    handle: Any                       # the cdata the Python wrapper holds as `self.vmi`
    keepalive: list[Any] = field(default_factory=list)
    page_mode: int = 0
    max_physical_address: int = 0
    shutting_down: bool = False
    # libvmi/events.c tables, keyed as libvmi keys them; values are vmi_event_t cdata
    interrupt_events: dict[int, Any] = field(default_factory=dict)
    mem_events_on_gfn: dict[int, Any] = field(default_factory=dict)
    mem_events_generic: dict[int, Any] = field(default_factory=dict)
    reg_events: dict[int, Any] = field(default_factory=dict)
    msr_events: dict[int, Any] = field(default_factory=dict)
    ss_events: dict[int, Any] = field(default_factory=dict)
    debug_event: Any = None
    clear_events: dict[int, Any] = field(default_factory=dict)
    event_callback: bool = False
    xen: XenEvents | None = None      # None until events are initialised

    @property
    def events(self) -> bool:
        return self.xen is not None
