"""The Xen host: the domains a libvmi instance can open, by name or id."""

from __future__ import annotations

from tests.support.xenmodel.domain import Domain
from tests.support.xenmodel.guest.image import GuestImage


class XenHost:
    def __init__(self) -> None:
        self.domains: dict[str, Domain] = {}
        self._next_domid = 1

    def create_domain(self, name: str, image: GuestImage, **options) -> Domain:
        """Build a domain (running, not paused). Options: altp2m ("external" by default, or
        "disabled", "mixed", "limited"), quantum, spare_frames."""
        if name in self.domains:
            raise ValueError(f"domain {name!r} exists")
        domain = Domain(name, self._next_domid, image, **options)
        self._next_domid += 1
        self.domains[name] = domain
        return domain

    def by_name(self, name: str) -> Domain | None:
        return self.domains.get(name)

    def by_id(self, domid: int) -> Domain | None:
        return next((d for d in self.domains.values() if d.domid == domid), None)
