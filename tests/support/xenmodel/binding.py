"""How a Xen driver gets at libvmi: one `LibvmiBinding`, real or model, and no other difference.

`real_binding()` is what the driver uses in production: the installed wheel's Python package,
its cffi `ffi`/`lib`, and an ABI-mode view of the wheel's bundled .so for the exports its cdef
leaves out (notes, bug 7). `model_binding(host)` returns the same shape on the Xen model: the
same Python package sources loaded again over a model `_libvmi`, and the model's versions of
the extra exports behind the same cdef. A driver written as

    vmi = binding.libvmi.Libvmi(name, binding.libvmi.INIT_DOMAINNAME | binding.libvmi.INIT_EVENTS,
                                mode=binding.libvmi.VMIMode.XEN, partial=True)
    binding.extra.vmi_alloc_gfn(vmi.vmi, gfn)

runs unchanged on both. (Intended home: the Xen driver package; it lives here until the driver
exists, and `test_xenmodel_binding.py` keeps both shapes identical.)
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import itertools
import os
import sys
import types
from dataclasses import dataclass
from typing import Any

import cffi

from tests.support.xenmodel.host import XenHost
from tests.support.xenmodel.lib import FUNCTIONS, LibContext, ModelExtraLib, ModelLib
from tests.support.xenmodel.lib_slat import EXTRA_FUNCTIONS

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
_copies = itertools.count(1)


@dataclass(frozen=True)
class LibvmiBinding:
    libvmi: types.ModuleType  # the package: Libvmi, X86Reg, MSR, VMIMode, INIT_*, PageMode...
    event: types.ModuleType   # libvmi.event: IntEvent, MemEvent, RegEvent, EventResponse...
    ffi: Any                  # _libvmi.ffi (vmi_event_t fields, registers_t, casts)
    lib: Any                  # _libvmi.lib (constants, vmi_slat_set_domain_state, ...)
    extra_ffi: Any            # an FFI declaring EXTRA_CDEF
    extra: Any                # EXTRA_CDEF's functions (the .so's, or the model's)


def _extra_ffi() -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(EXTRA_CDEF)
    return ffi


def real_binding() -> LibvmiBinding:
    import _libvmi
    import libvmi
    import libvmi.event

    extra_ffi = _extra_ffi()
    site = os.path.dirname(os.path.dirname(libvmi.__file__))
    shared = sorted(glob.glob(os.path.join(site, "libvmi.libs", "libvmi-*.so*")))
    if not shared:
        raise ImportError("the libvmi wheel's bundled libvmi .so is missing")
    return LibvmiBinding(libvmi, libvmi.event, _libvmi.ffi, _libvmi.lib, extra_ffi,
                         extra_ffi.dlopen(shared[0]))


def model_binding(host: XenHost, instructions_per_ms: int = 200) -> LibvmiBinding:
    """The wheel's Python package running on the Xen model of `host`.

    Guest time advances only inside `listen(timeout)`: about `timeout * instructions_per_ms`
    instructions per vCPU (at least one quantum), less when an event comes first."""
    import _libvmi

    ctx = LibContext(host, _libvmi.ffi, instructions_per_ms)
    lib = ModelLib(ctx, _libvmi.lib, FUNCTIONS)
    fake = types.ModuleType("_libvmi")
    fake.ffi, fake.lib = _libvmi.ffi, lib
    package = _load_package_over(fake)
    return LibvmiBinding(package, package.event, _libvmi.ffi, lib, _extra_ffi(),
                         ModelExtraLib(ctx, EXTRA_FUNCTIONS))


def _load_package_over(fake_libvmi: types.ModuleType) -> types.ModuleType:
    """Execute the installed libvmi package's own sources again, importing `fake_libvmi` as
    `_libvmi`, under a private module name (the real `libvmi` stays untouched)."""
    spec = importlib.util.find_spec("libvmi")
    directory = list(spec.submodule_search_locations)[0]
    name = f"_xenmodel_libvmi_{next(_copies)}"
    saved = sys.modules.get("_libvmi")
    sys.modules["_libvmi"] = fake_libvmi
    try:
        copy_spec = importlib.util.spec_from_file_location(
            name, os.path.join(directory, "__init__.py"), submodule_search_locations=[directory])
        package = importlib.util.module_from_spec(copy_spec)
        sys.modules[name] = package
        copy_spec.loader.exec_module(package)
        package.event = importlib.import_module(f"{name}.event")
    finally:
        if saved is None:
            sys.modules.pop("_libvmi", None)
        else:
            sys.modules["_libvmi"] = saved
    return package
