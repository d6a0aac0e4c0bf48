"""altp2m views, shadow frames, and each page's EPT access in each view.

The guest runs in views of vmigdb's own, never in view 0 (the host p2m), which stays clean: the
original pages with no access restricted, where a trapped access is replayed for one MTF step.
- The home view holds the breakpoints of every address space; one scoped view per address space
  with breakpoints of its own holds those too (`Engine` moves a vCPU between them at CR3 writes).
- A page with breakpoints in a view is remapped there to a shadow frame: a copy of the page with
  0xCC at each breakpoint. Execution fetches the shadow; reads and writes trap (the view lets the
  gfn execute only) and are served from the original page in view 0.
- Other users ask to trap accesses to whole pages in every guest view (watchpoints, the
  exec-written catch); a page's access in a view is the union of every request (`Traps`).

Xen and libvmi rules this follows (libvmi notes; the Xen model cites the sources):
- access is set with `vmi_set_mem_event` under one generic handler (per-gfn events allow one per
  gfn across all views and cannot be mixed with generic ones); it is an export the wheel's cdef
  lacks (bug 7), reached through the binding's `extra`;
- `slat_change_gfn` gives the remapped entry the shadow frame's host access, and removing a
  remapping drops the entry: the access is set again after every remapping change;
- access is never set in view 0: a host p2m change overwrites the entry in every view that has
  one, undoing the remapping there;
- a shadow frame is never freed while views live: dropping a host frame inside a view's remapped
  range resets that whole view (p2m_altp2m_propagate_change). Frames are reused, and freed at
  teardown, once the views are gone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from vmigdb.hv.base import DriverError

log = logging.getLogger("vmigdb.hv.xen")

INVALID_GFN = 0xFFFF_FFFF_FFFF_FFFF
PAGE = 0x1000
R, W, X = 2, 4, 8  # VMI_MEMACCESS_R/W/X: the accesses that trap
N = 1  # VMI_MEMACCESS_N: nothing traps


class Views:
    def __init__(self, vmi: Any, binding: Any, handle: Any) -> None:
        self._vmi = vmi
        self._b = binding
        self._handle = handle  # the instance pointer, cast for the ABI-mode `extra` calls
        self.home: int | None = None
        self.scoped: dict[int, int] = {}  # page-table base -> its view
        self.shadow: dict[tuple[int, int], int] = {}  # (view, gfn) -> shadow frame
        self.plants: dict[tuple[int, int], dict[int, int]] = {}  # (view, gfn) -> {offset: users}
        self.frames: list[int] = []  # every shadow frame allocated
        self._spare: list[int] = []  # allocated, not in use
        self.traps = Traps(self._set_access, self.guest_views, self.remapped)

    # -- life -------------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.home is not None

    def activate(self) -> None:
        if self._b.lib.vmi_slat_set_domain_state(self._vmi.vmi, True) != 0:
            raise DriverError(
                'Xen refused to enable altp2m on the domain: create it with altp2m = "external"'
            )
        self.home = self._vmi.slat_create()

    def guest_views(self) -> list[int]:
        return ([self.home] if self.home is not None else []) + sorted(self.scoped.values())

    def view_for(self, cr3_base: int) -> int:
        assert self.home is not None
        return self.scoped.get(cr3_base, self.home)

    def create_scoped(self, cr3_base: int) -> int:
        view = self._vmi.slat_create()
        self.scoped[cr3_base] = view
        self.traps.fill(view)
        return view

    def teardown(self) -> None:
        """Views, remappings and shadow frames gone, altp2m off. Every vCPU must be in view 0."""
        for view in self.guest_views():
            self._vmi.slat_destroy(view)
        self.home = None
        self.scoped.clear()
        self.shadow.clear()
        self.plants.clear()
        self.traps.forget()
        for gfn in self.frames:
            if self._b.extra.vmi_free_gfn(self._handle, gfn) != 0:
                log.error("libvmi could not free shadow frame %#x", gfn)
        self.frames.clear()
        self._spare.clear()
        if self._b.lib.vmi_slat_set_domain_state(self._vmi.vmi, False) != 0:
            log.error("Xen refused to disable altp2m on the domain")

    # -- breakpoints ------------------------------------------------------------------------------

    def planted(self, view: int, gfn: int, offset: int) -> bool:
        return offset in self.plants.get((view, gfn), {})

    def plant(self, view: int, gfn: int, offset: int) -> None:
        offsets = self.plants.setdefault((view, gfn), {})
        offsets[offset] = offsets.get(offset, 0) + 1
        if (view, gfn) not in self.shadow:
            frame = self._spare.pop() if self._spare else self._allocate()
            self.shadow[(view, gfn)] = frame
            self._copy(view, gfn)
            self._vmi.slat_change_gfn(view, gfn, frame)
            self.traps.remapped(view, gfn)
        elif offsets[offset] == 1:
            self._copy(view, gfn)

    def unplant(self, view: int, gfn: int, offset: int) -> None:
        offsets = self.plants.get((view, gfn), {})
        if offset not in offsets:
            return
        offsets[offset] -= 1
        if offsets[offset]:
            return
        del offsets[offset]
        if offsets:
            self._copy(view, gfn)
            return
        del self.plants[(view, gfn)]
        frame = self.shadow.pop((view, gfn))
        self._vmi.slat_change_gfn(view, gfn, INVALID_GFN)
        self._spare.append(frame)
        self.traps.remapped(view, gfn)

    def remapped(self, view: int, gfn: int) -> bool:
        return (view, gfn) in self.shadow

    def shadowed(self, gfn: int) -> bool:
        return any(g == gfn for _, g in self.shadow)

    def refresh(self, gfn: int) -> None:
        """The original page changed (a guest or debugger write): copy it again to its shadows."""
        for view, g in list(self.shadow):
            if g == gfn:
                self._copy(view, gfn)

    def _copy(self, view: int, gfn: int) -> None:
        page = bytearray(self._vmi.read_pa(gfn * PAGE, PAGE)[0])
        for offset in self.plants[(view, gfn)]:
            page[offset] = 0xCC
        self._vmi.write_pa(self.shadow[(view, gfn)] * PAGE, bytes(page))

    def _allocate(self) -> int:
        gfn = self._b.extra.vmi_get_next_available_gfn(self._handle)
        if self._b.extra.vmi_alloc_gfn(self._handle, gfn) != 0:
            raise DriverError(f"Xen could not populate a shadow frame at gfn {gfn:#x}")
        self.frames.append(gfn)
        return gfn

    # -- access -------------------------------------------------------------------------------------

    def effective(self, view: int, gfn: int) -> int:
        """The accesses that trap on `gfn` in `view` (R/W/X bits)."""
        return self.traps.effective(view, gfn)

    def _set_access(self, view: int, gfn: int, access: int) -> None:
        if view == 0:
            raise AssertionError("access is never set in view 0 (it would undo remappings)")
        if self._b.extra.vmi_set_mem_event(self._handle, gfn, access, view) != 0:
            raise DriverError(f"libvmi could not set the access of gfn {gfn:#x} in view {view}")


class Traps:
    """Each page's EPT access in each guest view: what every user of the page asks to trap."""

    def __init__(
        self,
        set_access: Callable[[int, int, int], None],
        views: Callable[[], list[int]],
        is_remapped: Callable[[int, int], bool],
    ) -> None:
        self._set_access = set_access
        self._views = views
        self._is_remapped = is_remapped
        self._wants: dict[int, dict[str, int]] = {}  # gfn -> {user: R/W/X bits}, every guest view
        self._applied: dict[tuple[int, int], int] = {}  # (view, gfn) -> access set (N if absent)

    def want(self, gfn: int, user: str, bits: int) -> None:
        """`user` traps `bits` on `gfn` in every guest view (0: no longer)."""
        wants = self._wants.setdefault(gfn, {})
        if bits:
            wants[user] = bits
        else:
            wants.pop(user, None)
            if not wants:
                del self._wants[gfn]
        for view in self._views():
            self.apply(view, gfn)

    def wanted(self, gfn: int, user: str) -> int:
        return self._wants.get(gfn, {}).get(user, 0)

    def effective(self, view: int, gfn: int) -> int:
        bits = 0
        for value in self._wants.get(gfn, {}).values():
            bits |= value
        if self._is_remapped(view, gfn):
            bits |= R | W  # the shadow is for execution only
        return bits

    def remapped(self, view: int, gfn: int) -> None:
        """A remapping changed: the entry's access is the host's again (nothing traps)."""
        self._applied.pop((view, gfn), None)
        self.apply(view, gfn)

    def apply(self, view: int, gfn: int) -> None:
        access = self.effective(view, gfn) or N
        if self._applied.get((view, gfn), N) != access:
            self._set_access(view, gfn, access)
            if access == N:
                self._applied.pop((view, gfn), None)
            else:
                self._applied[(view, gfn)] = access

    def fill(self, view: int) -> None:
        """A new view: every page's wanted access there."""
        for gfn in list(self._wants):
            self.apply(view, gfn)

    def trapped_pages(self) -> int:
        return len({gfn for _, gfn in self._applied})

    def forget(self) -> None:
        self._wants.clear()
        self._applied.clear()
