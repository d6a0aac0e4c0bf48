"""Helpers for tests that act on the model as a driver would."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.support.xenmodel.binding import LibvmiBinding, model_binding
from tests.support.xenmodel.domain import Domain
from tests.support.xenmodel.guest import build_demo_image
from tests.support.xenmodel.host import XenHost


class Response:
    """A callback's return value: libvmi.event.EventResponse is a plain Enum whose members do
    not OR (notes, bug 8), and the wheel returns `.value` -- so an object with `.value`."""

    def __init__(self, *flags: Any) -> None:
        self.value = 0
        for flag in flags:
            self.value |= flag.value if hasattr(flag, "value") else int(flag)


@dataclass
class Attached:
    host: XenHost
    domain: Domain
    binding: LibvmiBinding
    vmi: Any

    @property
    def L(self):  # noqa: N802 - short names for the libvmi package and its event module
        return self.binding.libvmi

    @property
    def E(self):  # noqa: N802
        return self.binding.event

    def sym(self, name: str):
        return self.domain.image.sym(name)

    def listen_until(self, predicate, limit: int = 200, timeout: int = 50) -> int:
        """listen(timeout) until `predicate()` holds; returns the number of listens."""
        for count in range(1, limit + 1):
            self.vmi.listen(timeout)
            if predicate():
                return count
        raise AssertionError(f"condition not reached after {limit} listens")


def attach(vcpus: int = 2, *, events: bool = True, altp2m: str = "external",
           instructions_per_ms: int = 200, **switches: int) -> Attached:
    """A fresh host with the demo guest (`switches` set its cfg_* words), opened with the
    Python libvmi API the way the Xen driver opens a domain."""
    host = XenHost()
    domain = host.create_domain("guest", build_demo_image(vcpus, **switches), altp2m=altp2m)
    binding = model_binding(host, instructions_per_ms)
    L = binding.libvmi  # noqa: N806
    flags = L.INIT_DOMAINNAME | (L.INIT_EVENTS if events else 0)
    vmi = L.Libvmi("guest", flags, mode=L.VMIMode.XEN, partial=True)
    vmi.init_paging(0)
    return Attached(host, domain, binding, vmi)
