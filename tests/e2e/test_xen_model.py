"""Real GDB 13 against `vmigdb xen` serving a domain of the Xen model (issue 15).

The guest's own code is the witness: it checksums its code page, counts its int3 and #DB
handlers, writes code into a page and runs it, rewrites LSTAR, and runs the same user code in two
address spaces. GDB reads those counters; the model's state (views, events, frames) is read from
vmigdb at the end. No Xen host exists here: this is the model, not Xen (see the README).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs

from tests.e2e.xenmodel import XenModelVm, printed
from tests.support.xenmodel.guest.image import JIT_GFN, KTEXT_GFN, TEXT_BASE
from tests.support.xenmodel.guest.x86 import MSR_LSTAR

pytestmark = pytest.mark.e2e


@pytest.fixture
def launch(tmp_path: Path) -> Iterator:
    started: list[XenModelVm] = []

    def start(**kwargs) -> XenModelVm:
        vm = XenModelVm(tmp_path, **kwargs)
        started.append(vm)
        return vm

    yield start
    for vm in started:
        vm.stop()


def u64(vm: XenModelVm, name: str, index: int = 0) -> str:
    return f"*(unsigned long *){vm.sym(name) + 8 * index:#x}"


def assert_clean(state: dict) -> None:
    """Nothing of the debugger left in the domain."""
    assert state["views"] == [] and not state["altp2m_active"]
    assert state["vcpu_views"] == [None] * len(state["vcpu_views"])
    assert state["registered"] == {"int3": 0, "singlestep": 0, "registers": 0, "memory": 0}
    assert state["intercepts"] == {"int3": False, "singlestep": False, "debug": False, "cr": [],
                                   "msrs": []}
    assert state["extra_frames"] == [] and state["restricted_host_pages"] == []
    assert not any(state["single_step"])
    assert state["pause_count"] == 0 and state["waiting"] == [] and state["wedged"] == []
    assert state["crashed"] is None and state["counters"]["unexpected_count"] == 0


def test_breakpoint_hits_on_both_vcpus_and_the_guest_checksum_never_sees_it(launch) -> None:
    vm = launch(vcpus=2, checksum=1)
    func = vm.sym("func")
    show = (f'printf "STOP rip=%lx r15=%lx thread=%x runs0=%lx runs1=%lx mismatch0=%lx '
            f'mismatch1=%lx last0=%lx last1=%lx expected=%lx\\n", $rip, $r15, $_thread, '
            f'{u64(vm, "sum_runs", 0)}, {u64(vm, "sum_runs", 1)}, {u64(vm, "sum_mismatch", 0)}, '
            f'{u64(vm, "sum_mismatch", 1)}, {u64(vm, "sum_last", 0)}, {u64(vm, "sum_last", 1)}, '
            f'{u64(vm, "sum_expected")}')
    out = vm.gdb(f"break *{func:#x}", *(["continue", show] * 8), f"x/8xb {func:#x}")
    stops = printed(out, "STOP")
    assert len(stops) == 8, out
    for stop in stops:
        assert stop["rip"] == func and stop["r15"] == stop["thread"] - 1  # the vCPU that hit
    assert {stop["thread"] for stop in stops} == {1, 2}
    first, last = stops[0], stops[-1]
    for cpu in (0, 1):
        assert last[f"runs{cpu}"] >= first[f"runs{cpu}"] + 2  # it checksummed its code meanwhile
        assert last[f"mismatch{cpu}"] == 0 and last[f"last{cpu}"] == last["expected"]
    offset = func - TEXT_BASE - KTEXT_GFN * 0x1000
    original = vm.image.pages[KTEXT_GFN][offset : offset + 8]
    assert "\t".join(f"0x{byte:02x}" for byte in original) in out  # GDB reads the original too
    assert_clean(vm.state())


def test_the_guests_own_int3_reaches_its_handler_exactly_once(launch) -> None:
    """Breakpoints of ours before the guest's int3 (func, same page) and right after it; the
    guest's handler counts its #BPs. (Not on the int3 itself: GDB skips a breakpoint that sits on
    an int3 of the program's own by moving the PC past it, with any stub.)"""
    vm = launch(vcpus=2, int3=1, int3_mask=0)
    show = (f'printf "STOP rip=%lx thread=%x iter=%lx bp=%lx\\n", $rip, $_thread, '
            f'{u64(vm, "iterations", 0)}, {u64(vm, "bp_count")}')
    out = vm.gdb(f"break *{vm.sym('func'):#x}", f"break *{vm.sym('after_int3'):#x}",
                 *(["continue", show] * 12),
                 f'printf "END last=%lx db=%lx\\n", {u64(vm, "bp_last_rip")}, '
                 f'{u64(vm, "db_count")}')
    stops = [stop for stop in printed(out, "STOP") if stop["thread"] == 1]
    at_func = [s["iter"] - s["bp"] for s in stops if s["rip"] == vm.sym("func")]
    after = [s["iter"] - s["bp"] for s in stops if s["rip"] == vm.sym("after_int3")]
    assert len(at_func) >= 2 and len(after) >= 2, out
    # Every iteration ran its int3 once and the handler counted it exactly once: never
    # swallowed, never twice.
    assert len(set(at_func + after)) == 1, stops
    assert stops[-1]["iter"] >= stops[0]["iter"] + 2
    end = printed(out, "END")[0]
    assert end["last"] == vm.sym("after_int3") and end["db"] == 0
    assert_clean(vm.state())


def reference_steps(vm: XenModelVm, start: int, count: int, return_to: int) -> list[int]:
    """RIPs after each of `count` instructions from `start` (straight code, one `ret`), decoded
    from the image's bytes, independently of the model."""
    disasm = Cs(CS_ARCH_X86, CS_MODE_64)
    page = vm.image.pages[KTEXT_GFN]
    rip, path = start, []
    for _ in range(count):
        offset = rip - TEXT_BASE - KTEXT_GFN * 0x1000
        insn = next(disasm.disasm(page[offset : offset + 16], rip))
        rip = return_to if insn.mnemonic == "ret" else rip + insn.size
        path.append(rip)
    return path


def test_stepi_moves_one_instruction_by_mtf_without_tf_or_db(launch) -> None:
    vm = launch(vcpus=2)
    func = vm.sym("func")
    show = (f'printf "AT rip=%lx eflags=%lx thread=%x calls0=%lx calls1=%lx db=%lx\\n", $rip, '
            f'$eflags, $_thread, {u64(vm, "func_calls", 0)}, {u64(vm, "func_calls", 1)}, '
            f'{u64(vm, "db_count")}')
    out = vm.gdb(f"break *{func:#x}", "continue", "delete", show, *(["stepi", show] * 5))
    stops = printed(out, "AT")
    assert len(stops) == 6, out
    thread = stops[0]["thread"]
    return_to = vm.sym("loop0" if thread == 1 else "main1") + 5
    assert [s["rip"] for s in stops[1:]] == reference_steps(vm, func, 5, return_to)
    assert all(s["thread"] == thread for s in stops)
    assert all(not s["eflags"] & 0x100 for s in stops)  # TF never set
    assert all(s["db"] == 0 for s in stops)  # no #DB reached the guest
    calls = f"calls{thread - 1}"
    assert stops[1][calls] == stops[0][calls] + 1  # the stepped `inc` ran exactly once
    assert_clean(vm.state())


def test_write_and_read_watchpoints_fire_on_their_access_only(launch) -> None:
    vm = launch(vcpus=2)
    counter = vm.sym("iterations") + 8  # vCPU1's counter; the page holds all the others
    switch = vm.sym("cfg_jit")  # read by vCPU0's loop only
    show = 'printf "STOP pc=%lx thread=%x\\n", $pc, $_thread'
    out = vm.gdb("set debug remote 1", f"watch *(long *){counter:#x}",
                 *(["continue", show] * 3), "delete",
                 f"rwatch *(long *){switch:#x}", *(["continue", show] * 2))
    stops = printed(out, "STOP")
    assert len(stops) == 5, out[-3000:]
    disasm = Cs(CS_ARCH_X86, CS_MODE_64)

    def after(symbol: str, skip: int) -> int:
        """The address after the `skip`+1-th instruction from `symbol`."""
        start = vm.sym(symbol)
        offset = start - TEXT_BASE - KTEXT_GFN * 0x1000
        insns = list(disasm.disasm(vm.image.pages[KTEXT_GFN][offset : offset + 64], start))
        return insns[skip].address + insns[skip].size

    for stop in stops[:3]:  # after `inc qword ptr [iterations + r15*8]` in main1, on CPU#1
        assert stop == {"pc": after("main1", 1), "thread": 2}
    values = [int(v) for v in __import__("re").findall(r"New value = (\d+)", out)]
    assert len(values) == 3 and values[1] == values[0] + 1 and values[2] == values[1] + 1
    assert out.count(f"watch:{counter:x}") == 3 and "rwatch:" in out
    start = vm.sym("loop0")  # after vCPU0's `cmp qword ptr [cfg_jit], 0` (RIP-relative)
    offset = start - TEXT_BASE - KTEXT_GFN * 0x1000
    cmp_jit = next(
        insn.address + insn.size
        for insn in disasm.disasm(vm.image.pages[KTEXT_GFN][offset : offset + 0x80], start)
        if insn.mnemonic == "cmp" and "rip" in insn.op_str
        and insn.address + insn.size + int(insn.op_str.split("+ ")[1].split("]")[0], 16) == switch
    )
    for stop in stops[3:]:
        assert stop == {"pc": cmp_jit, "thread": 1}
    assert out.count(f"rwatch:{switch:x}") == 2
    assert "Hardware read watchpoint" in out and "Value = 0" in out
    assert_clean(vm.state())


def test_a_cr3_scoped_breakpoint_on_shared_code_fires_only_in_its_address_space(launch) -> None:
    vm = launch(vcpus=2, user=1)
    cr3_a, cr3_b = vm.image.cr3_a, vm.image.cr3_b
    entry = vm.sym("user_entry")  # the same code page in both address spaces
    show = (f'printf "STOP rip=%lx cr3=%lx thread=%x rounds=%lx\\n", $rip, $cr3, $_thread, '
            f'{u64(vm, "user_rounds")}')
    out = vm.gdb(f"monitor process cr3={cr3_b:#x}", f"break *{entry:#x}",
                 *(["continue", show] * 3), "monitor info", "monitor stealth")
    stops = printed(out, "STOP")
    assert len(stops) == 3, out
    assert all(s["rip"] == entry and s["cr3"] == cr3_b and s["thread"] == 1 for s in stops)
    assert stops[2]["rounds"] >= stops[0]["rounds"] + 2  # space A ran it in between, unstopped
    assert f"address space {cr3_b:#x}" in out  # monitor info: the scoped view
    assert "driver: xen (libvmi 3.7.1" in out and "CR3 write" in out
    stealth = out[out.index("driver: xen\n"):]  # monitor stealth: each mechanism, honestly
    assert "software breakpoint: altp2m split view" in stealth
    assert stealth.count("VISIBLE to the guest") == 2  # memory writes you ask for; the TSC
    assert "xen-tsc" not in stealth or "the guest's TSC while vmigdb holds" in stealth
    state = vm.state()
    hits = [(cpu, rip, cr3) for cpu, rip, cr3 in state["int3_requests"] if rip == entry]
    # Not filtered after the fact: in space A the breakpoint never even trapped.
    assert len(hits) == 3 and all(cr3 == cr3_b for _, _, cr3 in hits), hits
    assert cr3_a != cr3_b
    assert_clean(state)


def test_catch_msr_write_stops_on_the_lstar_wrmsr(launch) -> None:
    vm = launch(vcpus=1, lstar=1, lstar_mask=3)
    entry = vm.sym("syscall_entry")
    out = vm.gdb("monitor catch msr-write", "continue",
                 f'printf "STOP pc=%lx writes=%lx\\n", $pc, {u64(vm, "lstar_writes")}',
                 "monitor catch")
    stop = printed(out, "STOP")[0]
    assert f"wrote MSR LSTAR ({MSR_LSTAR:#x}): {entry:#x} -> {entry:#x}" in out, out
    assert vm.sym("rewrite_lstar") < stop["pc"] <= vm.sym("rewrite_lstar") + 0x20
    assert "msr-write: on" in out
    assert_clean(vm.state())


def test_catch_exec_written_stops_at_the_first_instruction_of_the_written_page(launch) -> None:
    vm = launch(vcpus=1, jit=1)
    page = TEXT_BASE + JIT_GFN * 0x1000
    show = f'printf "STOP pc=%lx seq=%lx\\n", $pc, {u64(vm, "jit_seq")}'
    out = vm.gdb("monitor catch exec-written", *(["continue", show, "x/2i $pc"] * 2))
    stops = printed(out, "STOP")
    assert len(stops) == 2 and all(s["pc"] == page for s in stops), out
    assert stops[1]["seq"] == stops[0]["seq"] + 1  # written again, stopped again
    for stop in stops:  # the code the guest just wrote: mov eax, seq; ret
        assert f"mov    $0x{stop['seq']:x},%eax" in out
    assert "written since it last ran" in out
    assert_clean(vm.state())


def test_detach_after_everything_leaves_no_view_event_or_frame(launch) -> None:
    vm = launch(vcpus=2, user=1, checksum=1, lstar=1, lstar_mask=3)
    out = vm.gdb(
        f"break *{vm.sym('func'):#x}", "continue", "stepi",
        f"monitor process cr3={vm.image.cr3_b:#x}", f"break *{vm.sym('user_entry'):#x}",
        "monitor process all", f"watch *(long *){vm.sym('iterations'):#x}",
        "monitor catch msr-write", "monitor catch exec-written", "continue", "monitor info",
    )
    assert "altp2m views" in out and "shadow frames: " in out, out
    before = vm.state()
    assert_clean(before)
    after = vm.state()
    assert after["requests"] == before["requests"]  # not one event since
    assert after["counters"]["iterations"][0] > before["counters"]["iterations"][0]
    assert_clean(vm.stop())
