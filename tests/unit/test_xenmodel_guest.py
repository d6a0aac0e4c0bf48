"""The demo guest runs on the model's machine as a guest would on hardware (no monitor)."""

from __future__ import annotations

import pytest

from tests.support.xenmodel import XenHost, build_demo_image
from tests.support.xenmodel.guest.image import KTEXT_GFN, checksum
from tests.support.xenmodel.guest.x86 import PAGE

# A callback that raises is only a warning from cffi (it answers 0): make it a failure.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


def booted(**switches):
    domain = XenHost().create_domain("guest", build_demo_image(**switches))
    return domain


def test_loops_call_func_on_both_vcpus_and_checksum_matches():
    domain = booted(checksum=1)
    domain.run(60_000)
    assert not domain.crashed
    for cpu in (0, 1):
        runs = domain.read_u64("sum_runs", cpu)
        assert runs > 0
        assert domain.read_u64("func_calls", cpu) >= runs
        assert domain.read_u64("sum_mismatch", cpu) == 0
        assert domain.read_u64("sum_last", cpu) == domain.read_u64("sum_expected")
    assert domain.read_u64("unexpected_count") == 0


def test_checksum_sees_a_byte_changed_in_the_code_page():
    """The control for the stealth tests: a 0xCC in the page does change the guest's sum."""
    domain = booted(checksum=1)
    domain.run(20_000)
    assert domain.read_u64("sum_mismatch", 0) == 0
    last_byte = domain.image.sym("func").pa | (PAGE - 1)  # padding: never executed
    domain.write_pa(last_byte, b"\x00")
    domain.run(20_000)
    assert domain.read_u64("sum_mismatch", 0) > 0
    assert domain.read_u64("sum_last", 0) != domain.read_u64("sum_expected")


def test_guest_int3_reaches_its_handler_through_the_idt():
    domain = booted(int3=1, int3_mask=1)
    domain.run(8_000)
    iterations = domain.read_u64("iterations", 0)
    executed = (iterations + 1) // 2  # int3 runs when the count is even, after the increment
    assert domain.read_u64("bp_count") in (executed - 1, executed, executed + 1)
    assert domain.read_u64("bp_count") > 3
    assert domain.read_u64("bp_last_rip") == domain.image.sym("after_int3").va
    assert domain.read_u64("db_count") == 0 and domain.read_u64("unexpected_count") == 0


def test_jit_page_runs_the_code_just_written():
    domain = booted(jit=1)
    domain.run(20_000)
    seq = domain.read_u64("jit_seq")
    assert seq > 3
    assert domain.read_u64("jit_result") in (seq, seq - 1)


def test_user_routine_runs_in_both_address_spaces():
    domain = booted(user=1)
    domain.run(8_000)
    rounds = domain.read_u64("user_rounds")
    assert rounds > 3
    a = int.from_bytes(domain.read_pa(domain.image.sym("user_data_a").pa, 8), "little")
    b = int.from_bytes(domain.read_pa(domain.image.sym("user_data_b").pa, 8), "little")
    assert rounds <= a <= rounds + 1 and rounds <= b <= rounds + 1
    assert domain.read_u64("unexpected_count") == 0


def test_lstar_is_written_at_boot_and_rewritten():
    domain = booted(lstar=1, lstar_mask=3)
    domain.run(20_000)
    assert domain.read_u64("lstar_writes") > 2
    assert domain.vcpus[0].reg("msr_lstar") == domain.image.sym("syscall_entry").va


def test_image_checksum_matches_the_python_one():
    image = build_demo_image()
    page = image.pages[KTEXT_GFN]
    assert len(page) == PAGE
    expected = int.from_bytes(image.pages[0x30][0x180:0x188], "little")
    assert checksum(page) == expected


def test_unknown_switch_is_refused():
    with pytest.raises(ValueError, match="unknown guest switch"):
        build_demo_image(nonsense=1)


def test_a_ring3_int3_is_delivered_to_the_ring0_handler_and_returns():
    domain = booted(user=1)
    domain.write_pa(domain.image.sym("user_int3_b").pa, (1).to_bytes(8, "little"))
    domain.run(8_000)
    rounds = domain.read_u64("user_rounds")
    assert rounds > 3 and domain.read_u64("bp_count") in (rounds, rounds + 1)
    assert domain.read_u64("bp_last_rip") == domain.image.sym("user_int3").va + 1
    assert domain.read_u64("unexpected_count") == 0
