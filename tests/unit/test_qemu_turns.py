"""turns.py against a model of QEMU's single icount thread (accel/tcg/tcg-accel-ops-rr.c): after
a ^C the loop points at the vCPU after the interrupted one; a vCPU in HLT is passed over; a
vCPU resumed at a breakpoint on its own pc stops before executing anything, and the loop stays
at the vCPU that stopped."""

from __future__ import annotations

import pytest

from vmigdb.hv.qemu.turns import TurnView, give_turn_back


class RoundRobin:
    def __init__(self, pcs: dict[int, int], halted: set[int] = frozenset(), held: set[int] = ()):
        self.cpus = sorted(pcs)
        self.pcs = dict(pcs)
        self.halted = set(halted)
        self.breakpoints = set(held)
        self.held = set(held)
        self.pointer = self.cpus[0]
        self.packets: list[bytes] = []
        self.runs_away: set[int] = set()  # vCPUs that take an interrupt and leave their pc
        self.lands_on: dict[int, int] = {}  # ...and stop at a breakpoint of the user's there

    def interrupt(self, running: int) -> None:
        """A ^C while `running` runs: the loop moves on to the next vCPU."""
        self.pointer = self.cpus[(self.cpus.index(running) + 1) % len(self.cpus)]

    def view(self) -> TurnView:
        return TurnView(
            cpus=lambda: list(self.cpus),
            registers=lambda cpu: {"rip": self.pcs[cpu], "halted": cpu in self.halted},
            halted=lambda regs: regs["halted"],
            request=self.request,
            held=lambda pc: pc in self.held,
            zero_stop=self.zero_stop,
        )

    def request(self, packet: bytes) -> bytes:
        self.packets.append(packet)
        verb, rest = packet[:2], packet[3:]
        pc = int(rest.split(b",")[0], 16)
        if verb == b"Z0":
            self.breakpoints.add(pc)
        elif verb == b"z0":
            self.breakpoints.discard(pc)
        return b"OK"

    def zero_stop(self, packet: bytes, timeout: float) -> int | None:
        self.packets.append(packet)
        allowed = self.cpus if packet == b"vCont;c" else [int(packet.split(b":")[1], 16)]
        start = self.cpus.index(self.pointer)
        for cpu in self.cpus[start:] + self.cpus[:start]:
            if cpu not in allowed or cpu in self.halted:
                continue
            if cpu in self.lands_on:
                self.pcs[cpu] = self.lands_on.pop(cpu)
                self.pointer = cpu
                return cpu
            if cpu in self.runs_away:
                self.pcs[cpu] += 0x100  # its turn, spent elsewhere
                continue
            if self.pcs[cpu] in self.breakpoints:
                self.pointer = cpu
                return cpu
        return None


@pytest.mark.parametrize("interrupted", [1, 2, 3])
def test_the_loop_points_at_the_interrupted_vcpu_again(interrupted: int) -> None:
    qemu = RoundRobin({1: 0x1000, 2: 0x2000, 3: 0x3000})
    qemu.interrupt(interrupted)
    assert give_turn_back(qemu.view()) == interrupted
    assert qemu.pointer == interrupted
    assert qemu.breakpoints == set()  # every breakpoint it placed is gone


def test_a_vcpu_in_hlt_between_them_is_passed_over() -> None:
    qemu = RoundRobin({1: 0x1000, 2: 0x2000, 3: 0x3000}, halted={2})
    qemu.interrupt(1)
    assert give_turn_back(qemu.view()) == 1
    assert qemu.pointer == 1


def test_nothing_is_done_when_one_vcpu_at_most_runs() -> None:
    qemu = RoundRobin({1: 0x1000, 2: 0x2000}, halted={2})
    qemu.interrupt(1)
    assert give_turn_back(qemu.view()) is None
    assert qemu.packets == []


def test_a_breakpoint_of_the_users_on_a_pc_is_used_and_kept() -> None:
    qemu = RoundRobin({1: 0x1000, 2: 0x2000}, held={0x2000})
    qemu.interrupt(2)
    assert give_turn_back(qemu.view()) == 2
    assert qemu.breakpoints == {0x2000}
    assert b"Z0,2000,1" not in qemu.packets and b"z0,2000,1" not in qemu.packets


def test_a_vcpu_that_runs_off_on_an_interrupt_ends_it() -> None:
    qemu = RoundRobin({1: 0x1000, 2: 0x2000})
    qemu.interrupt(1)
    qemu.runs_away = {2}  # the loop's next vCPU takes an interrupt: its turn is spent
    assert give_turn_back(qemu.view()) is None
    assert qemu.pointer == 1  # which leaves the loop at the interrupted one anyway
    assert qemu.packets.count(b"vCont;c") == 1 and qemu.breakpoints == set()


def test_a_refused_breakpoint_ends_it_with_nothing_left_behind() -> None:
    qemu = RoundRobin({1: 0x1000, 2: 0x2000})
    answers = iter([b"OK", b"E22"])
    placed = qemu.request

    def request(packet: bytes) -> bytes:
        if packet.startswith(b"Z0"):
            answer = next(answers)
            if answer != b"OK":
                return answer
        return placed(packet)

    view = qemu.view()
    view = TurnView(**{**{f: getattr(view, f) for f in view.__slots__}, "request": request})
    assert give_turn_back(view) is None
    assert qemu.breakpoints == set() and not any(p.startswith(b"vCont") for p in qemu.packets)


def test_a_vcpu_that_ran_into_another_breakpoint_ends_it_there() -> None:
    qemu = RoundRobin({1: 0x1000, 2: 0x2000}, held={0x2400})
    qemu.interrupt(1)
    qemu.lands_on = {2: 0x2400}  # an interrupt, then a breakpoint of the user's in its handler
    assert give_turn_back(qemu.view()) is None
    assert qemu.packets.count(b"vCont;c") == 1 and not any(b"vCont;c:" in p for p in qemu.packets)
    assert qemu.breakpoints == {0x2400}
