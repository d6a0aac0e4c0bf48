"""The model's p2m/altp2m rules (as Xen applies them) and its guest page walk."""

from __future__ import annotations

import errno

import pytest

from tests.support.xenmodel.errors import XenError
from tests.support.xenmodel.p2m import INVALID_GFN, P2M, Perm
from tests.support.xenmodel.paging import Access, PageFault, Translation, walk

# A callback that raises is only a warning from cffi (it answers 0): make it a failure.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


def populated(*gfns: int, mode: str = "external") -> P2M:
    p2m = P2M(mode)
    for gfn in gfns:
        p2m.populate(gfn, 100 + gfn)
    return p2m


def test_altp2m_ops_need_altp2m_active_and_a_domain_built_for_it():
    p2m = populated(1)
    with pytest.raises(XenError) as err:
        p2m.create_view()
    assert err.value.errno == errno.EOPNOTSUPP
    with pytest.raises(XenError) as err:
        populated(1, mode="disabled").set_active(True)
    assert err.value.errno == errno.EINVAL


def test_a_view_copies_host_entries_lazily_with_its_default_access():
    p2m = populated(1, 2)
    p2m.set_active(True)
    view = p2m.create_view(Perm.RX)
    assert p2m.lookup(view, 1).mfn == 101 and p2m.lookup(view, 1).perm == Perm.RX
    assert p2m.lookup(0, 1).perm == Perm.RWX
    assert p2m.lookup(view, 7) is None


def test_change_gfn_remaps_in_one_view_and_reset_restores():
    p2m = populated(1, 2)
    p2m.set_active(True)
    view = p2m.create_view()
    p2m.change_gfn(view, 1, 2)
    assert p2m.lookup(view, 1).mfn == 102
    assert p2m.lookup(0, 1).mfn == 101 and p2m.lookup(None, 1).mfn == 101
    p2m.change_gfn(view, 1, INVALID_GFN)
    assert p2m.lookup(view, 1).mfn == 101
    with pytest.raises(XenError) as err:
        p2m.change_gfn(view, 1, 9)  # the new gfn must be backed
    assert err.value.errno == errno.ESRCH


def test_a_host_access_change_overwrites_a_remapped_entry_in_every_view():
    """p2m_altp2m_propagate_change: setting access on the host undoes a view's remapping."""
    p2m = populated(1, 2)
    p2m.set_active(True)
    view = p2m.create_view()
    p2m.change_gfn(view, 1, 2)
    p2m.set_perm(0, 1, Perm.RX)
    assert p2m.lookup(view, 1).mfn == 101 and p2m.lookup(view, 1).perm == Perm.RX


def test_dropping_a_remap_target_resets_the_whole_view():
    p2m = populated(1, 2, 3)
    p2m.set_active(True)
    view = p2m.create_view()
    p2m.change_gfn(view, 1, 3)
    p2m.set_perm(view, 2, Perm.X)
    p2m.depopulate(3)
    assert p2m.lookup(view, 1).mfn == 101
    assert p2m.lookup(view, 2).perm == Perm.RWX


def test_views_in_use_and_view_zero_cannot_be_destroyed():
    p2m = populated(1)
    p2m.set_active(True)
    view = p2m.create_view()
    for idx, in_use in ((0, False), (view, True)):
        with pytest.raises(XenError) as err:
            p2m.destroy_view(idx, in_use=in_use)
        assert err.value.errno == errno.EBUSY
    p2m.destroy_view(view, in_use=False)
    assert not p2m.valid_view(view)


def test_disabling_altp2m_drops_every_view():
    p2m = populated(1)
    p2m.set_active(True)
    view = p2m.create_view()
    p2m.set_active(False)
    assert not p2m.valid_view(view) and p2m.lookup(view, 1).mfn == 101


# --- page walk -------------------------------------------------------------------------------
def tables(entries: dict[int, int]):
    def read(pa: int) -> int:
        return entries.get(pa, 0)
    return read


PRESENT_RW = 0x3
USER = 0x4


def four_level(leaf: int, user: bool = True):
    bits = PRESENT_RW | (USER if user else 0)
    return tables({0x1000: 0x2000 | bits, 0x2000: 0x3000 | bits, 0x3000: 0x4000 | bits,
                   0x4000: leaf})


def test_walk_4k_and_2m_pages():
    result = walk(four_level(0x5000 | PRESENT_RW), 0x1000, 0x123, Access.READ, cpl=0, wp=True,
                  nxe=True)
    assert result == Translation(0x5123, True, False, True)
    large = tables({0x1000: 0x2000 | 3, 0x2000: 0x3000 | 3, 0x3000: 0x200000 | 0x83})
    result = walk(large, 0x1000, 0x12345, Access.FETCH, cpl=0, wp=True, nxe=True)
    assert result.gpa == 0x212345


def test_walk_faults_carry_the_architectural_error_code():
    read_only_nx = four_level(0x5000 | 0x1 | (1 << 63))
    assert walk(read_only_nx, 0x1000, 0, Access.WRITE, cpl=0, wp=True, nxe=True) == \
        PageFault(0, 0x3)
    assert walk(read_only_nx, 0x1000, 0, Access.FETCH, cpl=0, wp=True, nxe=True) == \
        PageFault(0, 0x11)
    supervisor = four_level(0x5000 | PRESENT_RW, user=False)
    assert walk(supervisor, 0x1000, 0, Access.READ, cpl=3, wp=True, nxe=True) == \
        PageFault(0, 0x5)
    absent = tables({})
    assert walk(absent, 0x1000, 0, Access.READ, cpl=3, wp=True, nxe=True) == PageFault(0, 0x4)

