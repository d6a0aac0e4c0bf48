"""`--time auto` on a QEMU before 10 with several vCPUs: the trial's verdict from what each vCPU
was seen doing."""

from __future__ import annotations

from vmigdb.hv.qemu.trial import UNDECIDED_AFTER_S, WINDOW_S, judge

CPUS = [1, 2]


def test_every_vcpu_seen_resting_keeps_icount() -> None:
    verdict = judge(CPUS, {1, 2}, 3.0, 5.0)
    assert verdict is not None and verdict.keep and "every vCPU came up" in verdict.why


def test_nothing_is_decided_while_the_guest_is_still_in_firmware() -> None:
    assert judge(CPUS, set(), None, 30.0) is None
    assert judge(CPUS, {1, 2}, None, 30.0) is None  # firmware's HLT says nothing of the kernel


def test_vcpus_are_given_time_to_come_up_and_rest() -> None:
    assert judge(CPUS, {2}, WINDOW_S - 1, 40.0) is None


def test_a_vcpu_never_seen_resting_ends_the_trial_naming_it() -> None:
    verdict = judge([1, 2, 3], {1, 3}, WINDOW_S, 40.0)
    assert verdict is not None and not verdict.keep
    assert verdict.why.startswith("CPU#1 never rested in HLT") and "CPU#2" not in verdict.why


def test_a_guest_that_never_pages_leaves_icount_as_it_was() -> None:
    verdict = judge(CPUS, set(), None, UNDECIDED_AFTER_S)
    assert verdict is not None and verdict.keep and "nothing to judge" in verdict.why
