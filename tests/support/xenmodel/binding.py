"""The Xen model's libvmi binding: the same `LibvmiBinding` shape the Xen driver gets in production.

`vmigdb.hv.xen.binding.real_binding()` is the installed wheel's Python package, its cffi `ffi`/`lib`,
and an ABI-mode view of the wheel's bundled .so for the exports its cdef leaves out (notes, bug 7).
`model_binding(host)` returns the same shape on the Xen model: the same Python package sources
loaded again over a model `_libvmi`, and the model's versions of the extra exports behind the same
cdef. The driver runs unchanged on both; `test_xenmodel_binding.py` keeps the shapes identical.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import sys
import types

from tests.support.xenmodel.host import XenHost
from tests.support.xenmodel.lib import FUNCTIONS, LibContext, ModelExtraLib, ModelLib
from tests.support.xenmodel.lib_slat import EXTRA_FUNCTIONS
from vmigdb.hv.xen.binding import EXTRA_CDEF, LibvmiBinding, extra_ffi, real_binding

__all__ = ["EXTRA_CDEF", "LibvmiBinding", "model_binding", "real_binding"]

_copies = itertools.count(1)


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
    return LibvmiBinding(package, package.event, _libvmi.ffi, lib, extra_ffi(),
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
