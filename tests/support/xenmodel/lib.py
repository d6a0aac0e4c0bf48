"""`ModelLib`: the stand-in for the wheel's compiled `_libvmi.lib`, backed by the Xen model.

The real Python package (libvmi/libvmi.py, libvmi/event.py) is loaded unchanged on top of it
(binding.py), so every name, signature, enum and bug of the wheel's Python layer is the real
one; only the C library underneath is modelled. Constants come from the real `lib`; functions
the model does not provide raise `NotModelled` when called, naming themselves.
"""

from __future__ import annotations

import functools
from typing import Any

from tests.support.xenmodel import lib_access, lib_core, lib_events, lib_listen, lib_slat
from tests.support.xenmodel.errors import NotModelled
from tests.support.xenmodel.host import XenHost
from tests.support.xenmodel.lib_state import Instance

FUNCTIONS = {**lib_core.FUNCTIONS, **lib_access.FUNCTIONS, **lib_events.FUNCTIONS,
             **lib_listen.FUNCTIONS, **lib_slat.FUNCTIONS}


class LibContext:
    """What the model's C functions share: the host, the real ffi, and live instances."""

    def __init__(self, host: XenHost, ffi: Any, instructions_per_ms: int) -> None:
        self.host = host
        self.ffi = ffi
        self.instructions_per_ms = instructions_per_ms
        self.instances: dict[int, Instance] = {}
        self.functions: dict[str, Any] = {}

    def new_instance(self, domain, init_flags: int, mode: int) -> Instance:
        anchor = self.ffi.new("char[16]")  # a real address to stand for struct vmi_instance
        handle = self.ffi.cast("vmi_instance_t", anchor)
        inst = Instance(domain, init_flags, mode, handle, keepalive=[anchor])
        self.instances[self._address(handle)] = inst
        return inst

    def instance(self, vmi: Any) -> Instance | None:
        """The instance behind a `vmi_instance_t` (or any pointer cdata, e.g. from an ABI-mode
        FFI, or an int address); None for NULL or a destroyed instance."""
        if vmi is None or (not isinstance(vmi, int) and not vmi):
            return None
        return self.instances.get(self._address(vmi))

    def forget(self, inst: Instance) -> None:
        self.instances.pop(self._address(inst.handle), None)

    def call(self, name: str, *args: Any) -> Any:
        return self.functions[name](self, *args)

    def _address(self, pointer: Any) -> int:
        if isinstance(pointer, int):
            return pointer
        return int(self.ffi.cast("uintptr_t", pointer))


def _not_modelled(name: str):
    def call(*_args: Any) -> Any:
        raise NotModelled(f"{name} is not provided by the Xen model")
    call.__name__ = name
    return call


class ModelLib:
    """Attribute-compatible with `_libvmi.lib` for the names a Xen driver uses."""

    def __init__(self, ctx: LibContext, real_lib: Any, functions: dict[str, Any]) -> None:
        self._ctx = ctx
        self._real = real_lib
        self._functions = functions
        ctx.functions.update(functions)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name in self._functions:
            bound = functools.partial(self._functions[name], self._ctx)
            setattr(self, name, bound)
            return bound
        value = getattr(self._real, name)  # AttributeError exactly where the real lib has none
        if isinstance(value, int) or name == "generic_event_callback":
            return value  # constants, and the wheel's own extern "Python" trampoline
        return _not_modelled(name)

    def __dir__(self) -> list[str]:
        return sorted(set(dir(self._real)) | set(self._functions))


class ModelExtraLib:
    """Stands in for `FFI().dlopen(<the wheel's libvmi .so>)` with `EXTRA_CDEF` declared."""

    def __init__(self, ctx: LibContext, functions: dict[str, Any]) -> None:
        self._ctx = ctx
        self._functions = functions
        ctx.functions.update(functions)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name not in self._functions:
            raise AttributeError(name)
        bound = functools.partial(self._functions[name], self._ctx)
        setattr(self, name, bound)
        return bound
