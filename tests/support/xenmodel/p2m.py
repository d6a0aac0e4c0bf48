"""Second-level address translation: the host p2m and altp2m views, with Xen's rules.

Each gfn maps to a machine frame (mfn) and carries an access (R/W/X) that the guest's accesses
are checked against; a denied access is an EPT violation. With altp2m active every vCPU runs on
one of `NR_ALTP2M` views; a view is filled lazily from the host p2m and can remap a gfn to another
gfn's frame (slat_change_gfn) or restrict it (mem access per view). Rules follow Xen:
  - xen/arch/x86/hvm/hvm.c do_altp2m_op: every op but get/set_domain_state needs altp2m active
    (-EOPNOTSUPP); a domain built without altp2m (altp2m mode "disabled") refuses all (-EINVAL).
  - xen/arch/x86/mm/altp2m.c p2m_altp2m_get_or_propagate: a view copies a host entry on first
    use with the VIEW's default access; p2m_change_altp2m_gfn: old_gfn takes new_gfn's frame and
    access, new_gfn must be backed (-ESRCH), ~0 removes the remapping; p2m_destroy_altp2m_by_id:
    view 0 and views a vCPU is using are refused (-EBUSY); p2m_altp2m_propagate_change: a host
    change overwrites the entry in every view that has one, and dropping a host frame inside a
    view's remapped range resets that whole view.
  - xen/arch/x86/mm/mem_access.c p2m_set_mem_access: view 0 is the host p2m; an unbacked gfn in
    a view is skipped (-ESRCH turned into success).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from enum import IntFlag

from tests.support.xenmodel.errors import XenError

NR_ALTP2M = 10  # MAX_ALTP2M in xen/arch/x86/include/asm/p2m.h
INVALID_GFN = 0xFFFF_FFFF_FFFF_FFFF


class Perm(IntFlag):
    """What an EPT entry lets the guest do (xenmem_access_t without the automatic conversions)."""

    N = 0
    R = 1
    W = 2
    X = 4
    RW = R | W
    RX = R | X
    WX = W | X
    RWX = R | W | X


@dataclass
class Entry:
    mfn: int
    perm: Perm


@dataclass
class View:
    default_perm: Perm
    entries: dict[int, Entry] = field(default_factory=dict)
    min_remapped: int = INVALID_GFN
    max_remapped: int = 0

    def reset(self) -> None:
        self.entries.clear()
        self.min_remapped, self.max_remapped = INVALID_GFN, 0


class P2M:
    """The host p2m plus the altp2m views of one domain."""

    def __init__(self, altp2m_mode: str = "external") -> None:
        if altp2m_mode not in ("disabled", "mixed", "external", "limited"):
            raise ValueError(f"unknown altp2m mode {altp2m_mode!r}")
        self.altp2m_mode = altp2m_mode
        self.host: dict[int, Entry] = {}
        self.host_default = Perm.RWX
        self.active = False
        self.views: list[View | None] = [None] * NR_ALTP2M

    # --- host p2m -------------------------------------------------------------------------
    def populate(self, gfn: int, mfn: int) -> None:
        if gfn in self.host:
            raise XenError(errno.EEXIST, f"gfn {gfn:#x} is already populated")
        self.host[gfn] = Entry(mfn, self.host_default)
        self._propagate(gfn)

    def depopulate(self, gfn: int) -> int:
        """Drop a host frame; returns its mfn. Views that remapped near it are reset, as Xen does."""
        entry = self.host.pop(gfn, None)
        if entry is None:
            raise XenError(errno.EINVAL, f"gfn {gfn:#x} is not populated")
        for view in self._live_views():
            if view.min_remapped <= gfn <= view.max_remapped:
                view.reset()
            else:
                view.entries.pop(gfn, None)
        return entry.mfn

    def max_gfn(self) -> int:
        return max(self.host)

    def host_perm(self, gfn: int) -> Perm:
        return self.host[gfn].perm

    # --- altp2m ops -------------------------------------------------------------------------
    def set_active(self, state: bool) -> None:
        if self.altp2m_mode == "disabled":
            raise XenError(errno.EINVAL, "the domain was built without altp2m")
        if state and not self.active:
            self.views[0] = View(self.host_default)  # p2m_init_altp2m_by_id(d, 0)
        elif not state and self.active:
            self.views = [None] * NR_ALTP2M  # p2m_flush_altp2m
        self.active = state

    def create_view(self, default_perm: Perm = Perm.RWX) -> int:
        self._require_active()
        for idx, view in enumerate(self.views):
            if view is None:
                self.views[idx] = View(default_perm)
                return idx
        raise XenError(errno.EINVAL, "no free altp2m view")

    def destroy_view(self, idx: int, in_use: bool) -> None:
        self._require_active()
        if idx == 0 or idx >= NR_ALTP2M or self.views[idx] is None or in_use:
            raise XenError(errno.EBUSY, f"altp2m view {idx} cannot be destroyed")
        self.views[idx] = None

    def valid_view(self, idx: int) -> bool:
        return self.active and 0 <= idx < NR_ALTP2M and self.views[idx] is not None

    def change_gfn(self, idx: int, old_gfn: int, new_gfn: int) -> None:
        self._require_active()
        view = self._view(idx)
        if new_gfn == INVALID_GFN:
            view.entries.pop(old_gfn, None)
            return
        if self._effective(view, old_gfn) is None:
            raise XenError(errno.ESRCH, f"gfn {old_gfn:#x} is not backed")
        target = self._effective(view, new_gfn, populate=False, host_perm=True)
        if target is None:
            raise XenError(errno.ESRCH, f"gfn {new_gfn:#x} is not backed")
        view.entries[old_gfn] = Entry(target.mfn, target.perm)
        view.min_remapped = min(view.min_remapped, new_gfn)
        view.max_remapped = max(view.max_remapped, new_gfn)

    def set_perm(self, idx: int, gfn: int, perm: Perm) -> None:
        """xc_set_mem_access (idx 0: the host p2m) / xc_altp2m_set_mem_access (idx > 0)."""
        if idx == 0:
            entry = self.host.get(gfn)
            if entry is not None:
                entry.perm = perm
                self._propagate(gfn)
            return
        self._require_active()
        view = self._view(idx)
        entry = self._effective(view, gfn)
        if entry is not None:
            entry.perm = perm

    def reset_host_perms(self, perm: Perm) -> None:
        """xc_set_mem_access(rwx) over the whole host p2m, as libvmi does when it shuts down."""
        for gfn, entry in self.host.items():
            entry.perm = perm
            self._propagate(gfn)

    # --- translation --------------------------------------------------------------------------
    def lookup(self, idx: int | None, gfn: int) -> Entry | None:
        """The entry a vCPU on view `idx` (None: altp2m off, the host p2m) uses for `gfn`."""
        if idx is None or not self.active:
            return self.host.get(gfn)
        return self._effective(self._view(idx), gfn)

    def _effective(self, view: View, gfn: int, *, populate: bool = True,
                   host_perm: bool = False) -> Entry | None:
        entry = view.entries.get(gfn)
        if entry is not None:
            return entry
        host = self.host.get(gfn)
        if host is None:
            return None
        copy = Entry(host.mfn, host.perm if host_perm else view.default_perm)
        if populate:
            view.entries[gfn] = copy
        return copy

    def _propagate(self, gfn: int) -> None:
        host = self.host.get(gfn)
        for view in self._live_views():
            if gfn in view.entries and host is not None:
                view.entries[gfn] = Entry(host.mfn, host.perm)

    def _live_views(self) -> list[View]:
        return [view for view in self.views if view is not None]

    def _view(self, idx: int) -> View:
        if not 0 <= idx < NR_ALTP2M or self.views[idx] is None:
            raise XenError(errno.EINVAL, f"altp2m view {idx} does not exist")
        return self.views[idx]

    def _require_active(self) -> None:
        if not self.active:
            raise XenError(errno.EOPNOTSUPP, "altp2m is not active on the domain")
