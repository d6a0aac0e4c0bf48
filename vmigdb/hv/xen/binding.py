"""How the Xen driver reaches libvmi: one `LibvmiBinding` object, and no global `import libvmi`.

A binding is the libvmi wheel's Python package (`libvmi`, `libvmi.event`), its cffi `ffi` and `lib`,
and `extra`: the exports of the wheel's bundled libvmi .so that its cdef leaves out
(vmi_set_mem_event, vmi_alloc_gfn...; libvmi notes, bug 7), reached through an ABI-mode dlopen of
that .so. The driver uses only what its binding holds -- the classes too, since another binding is
another copy of the package -- so the same driver code runs on the installed wheel over real Xen
(`real_binding`) and on anything else of the same shape.

`load_binding` is what `vmigdb xen` calls. `VMIGDB_XEN_BINDING=module:function` names a function
returning a binding to use instead (the test suite points it at its Xen model); without it, the
machine must be a Xen dom0, and if it is not, the error says what is missing.
"""

from __future__ import annotations

import ctypes.util
import glob
import importlib
import os
from dataclasses import dataclass
from typing import Any

from vmigdb.errors import SetupError

BINDING_ENV = "VMIGDB_XEN_BINDING"

# Exported by the wheel's libvmi .so but absent from its cdef (bug 7): declared for ABI mode.
EXTRA_CDEF = """
int vmi_set_mem_event(void *vmi, uint64_t gfn, uint8_t access, uint16_t slat_id);
int vmi_alloc_gfn(void *vmi, uint64_t gfn);
int vmi_free_gfn(void *vmi, uint64_t gfn);
uint64_t vmi_get_next_available_gfn(void *vmi);
int vmi_slat_control(void *vmi, bool state);
int vmi_slat_state(void *vmi, bool *state);
int vmi_stop_single_step_vcpu(void *vmi, void *event, uint32_t vcpu);
int vmi_shutdown_single_step(void *vmi);
"""

PRIVCMD = ("/dev/xen/privcmd", "/proc/xen/privcmd")


@dataclass(frozen=True)
class LibvmiBinding:
    libvmi: Any  # the package: Libvmi, X86Reg, MSR, VMIMode, INIT_*, LibvmiError...
    event: Any  # libvmi.event: IntEvent, MemEvent, RegEvent, SingleStepEvent, EventResponse...
    ffi: Any  # _libvmi.ffi (vmi_event_t fields, casts)
    lib: Any  # _libvmi.lib (constants, vmi_slat_set_domain_state...)
    extra_ffi: Any  # an FFI declaring EXTRA_CDEF
    extra: Any  # EXTRA_CDEF's functions


def extra_ffi() -> Any:
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(EXTRA_CDEF)
    return ffi


def real_binding() -> LibvmiBinding:
    """The installed libvmi wheel, plus an ABI-mode view of its bundled .so (bug 7)."""
    import _libvmi
    import libvmi
    import libvmi.event

    ffi = extra_ffi()
    site = os.path.dirname(os.path.dirname(libvmi.__file__))
    shared = sorted(glob.glob(os.path.join(site, "libvmi.libs", "libvmi-*.so*")))
    if not shared:
        raise ImportError("the libvmi wheel's bundled libvmi .so is missing")
    return LibvmiBinding(libvmi, libvmi.event, _libvmi.ffi, _libvmi.lib, ffi, ffi.dlopen(shared[0]))


def xen_missing() -> str | None:
    """Why this machine cannot reach Xen through libvmi (None: it looks like a Xen dom0)."""
    missing = []
    if not any(os.path.exists(path) for path in PRIVCMD):
        missing.append("no /dev/xen/privcmd (vmigdb xen runs in a Xen dom0, as root)")
    if ctypes.util.find_library("xenctrl") is None:
        missing.append("no libxenctrl.so for libvmi to load (Debian: apt-get install xen-utils)")
    if not missing:
        return None
    return "Xen is not available on this machine: " + "; ".join(missing)


def load_binding() -> LibvmiBinding:
    """The binding `vmigdb xen` uses (see the module docstring). :raises SetupError:"""
    hook = os.environ.get(BINDING_ENV)
    if hook:
        module, sep, name = hook.partition(":")
        if not sep:
            raise SetupError(f"{BINDING_ENV} must be module:function, not {hook!r}")
        return getattr(importlib.import_module(module), name)()
    reason = xen_missing()
    if reason is not None:
        raise SetupError(reason)
    try:
        return real_binding()
    except ImportError as exc:
        raise SetupError(f"the libvmi wheel cannot be loaded: {exc}") from None
