"""`vmigdb xen` on the Xen model: the binding hook and a view of the model's state from outside.

The e2e tests run the real CLI (`python -m vmigdb xen --domain NAME`) with
`VMIGDB_XEN_BINDING=tests.support.xenmodel.launch:binding` and the model described by
`VMIGDB_XENMODEL` (JSON: name, vcpus, switches for `build_demo_image`, instructions_per_ms,
quantum, state). The driver cannot tell: it gets a `LibvmiBinding` like any other.

`state` names a file where the model's state is written as JSON: when vmigdb receives SIGUSR1 (at
its event thread's next `listen`, the only thread that touches the model) and when it exits.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import threading
from typing import Any

from tests.support.xenmodel.binding import model_binding
from tests.support.xenmodel.guest import build_demo_image
from tests.support.xenmodel.host import XenHost
from tests.support.xenmodel.p2m import Perm
from tests.support.xenmodel.vmevent import Reason
from vmigdb.hv.xen.binding import LibvmiBinding

CONFIG_ENV = "VMIGDB_XENMODEL"
PER_VCPU = ("iterations", "func_calls", "sum_mismatch", "sum_runs")
COUNTERS = ("bp_count", "db_count", "unexpected_count", "jit_seq", "lstar_writes", "user_rounds")


def binding() -> LibvmiBinding:
    config = json.loads(os.environ.get(CONFIG_ENV, "{}"))
    host = XenHost()
    image = build_demo_image(config.get("vcpus", 2), **config.get("switches", {}))
    domain = host.create_domain(config.get("name", "guest"), image,
                                quantum=config.get("quantum", 500))
    result = model_binding(host, config.get("instructions_per_ms", 200))
    path = config.get("state")
    if path:
        _serve_state(result, domain, path)
    return result


def snapshot(binding: LibvmiBinding, domain) -> dict[str, Any]:
    """What a test checks of the model: views, events, frames, pauses, counters."""
    p2m = domain.p2m
    instances = binding.lib._ctx.instances.values()
    registered = {
        "int3": sum(len(i.interrupt_events) for i in instances),
        "singlestep": sum(len(i.ss_events) for i in instances),
        "registers": sum(len(i.reg_events) + len(i.msr_events) for i in instances),
        "memory": sum(len(i.mem_events_generic) + len(i.mem_events_on_gfn) for i in instances),
    }
    int3s = [(r.vcpu_id, r.regs["rip"], r.regs["cr3"]) for r in domain.log
             if r.reason is Reason.SOFTWARE_BREAKPOINT]
    return {
        "pause_count": domain.pause_count,
        "monitor_enabled": domain.monitor_enabled,
        "altp2m_active": p2m.active,
        "views": [idx for idx, view in enumerate(p2m.views) if view is not None],
        "vcpu_views": list(domain.views_in_use().values()),
        "single_step": [vcpu.single_step for vcpu in domain.vcpus],
        "intercepts": {"int3": domain.intercepts.int3, "singlestep": domain.intercepts.singlestep,
                       "debug": domain.intercepts.debug, "cr": sorted(domain.intercepts.cr),
                       "msrs": sorted(domain.intercepts.msrs)},
        "registered": registered,
        "extra_frames": sorted(gfn for gfn in p2m.host if gfn >= domain.image.ram_pages),
        "restricted_host_pages": sorted(gfn for gfn, e in p2m.host.items() if e.perm != Perm.RWX),
        "waiting": sorted(domain.waiting),
        "wedged": domain.wedged(),
        "crashed": domain.crashed,
        "requests": len(domain.log),
        "int3_requests": int3s[-500:],
        "counters": {name: [domain.read_u64(name, i) for i in range(len(domain.vcpus))]
                     for name in PER_VCPU} | {name: domain.read_u64(name) for name in COUNTERS},
    }


def _serve_state(binding: LibvmiBinding, domain, path: str) -> None:
    wanted = threading.Event()
    sequence = [0]

    def write() -> None:
        sequence[0] += 1
        state = snapshot(binding, domain) | {"sequence": sequence[0]}
        with open(path + ".tmp", "w") as out:
            json.dump(state, out)
        os.replace(path + ".tmp", path)

    lib = binding.lib
    listen = lib.vmi_events_listen

    def listen_and_report(vmi, timeout):
        status = listen(vmi, timeout)
        if wanted.is_set():
            wanted.clear()
            write()
        return status

    lib.vmi_events_listen = listen_and_report  # the package calls lib.vmi_events_listen
    signal.signal(signal.SIGUSR1, lambda *_: wanted.set())
    atexit.register(write)
