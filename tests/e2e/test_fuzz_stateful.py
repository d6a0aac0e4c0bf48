"""A stateful fuzzer: valid run control and malformed packets on one connection (issue 12).

test_fuzz_live sends malformed frames to a stopped guest. Here one connection gets a seeded stream
that mixes them with valid run control, so the guest runs, steps and stops under the junk:
`c`, `s`, `vCont;c`, `vCont;s:N`, `vCont;s:N;c`, `vCont;c:N`, `vCont;t:N;c`, ^C, `?`, `Hg`/`Hc`,
`g`, `m`, `qC`, `T`. Packets that arrive while the guest runs wait for its next stop (all-stop),
and may resume it again. What must hold, on a 2-vCPU guest:
- every PROBE_EVERY packets, a probe: ^C, repeated until the server answers a sentinel (queued
  resumes may legitimately run the guest again), then three requests (`qC`, `m`, `?`) whose
  replies must be the very next packets, in order: the server is alive and in step;
- every SESSION_PACKETS packets the fuzzing client vanishes (socket closed, no `D`): a fresh client
  connects, stops the guest, reads `g` (the full register file, values a CPU can hold) and
  detaches, within FRESH_TIMEOUT; the guest then runs on;
- vmigdb never loses step with QEMU's gdbstub (no "out of step" resync) and logs no internal
  error; at the end GDB still debugs the guest.
The default run sends ~1,650 packets; VMIGDB_SLOW=1 sends 20,000 (VMIGDB_FUZZ_PACKETS=N sets any
count, VMIGDB_FUZZ_SEED the seed).
"""

from __future__ import annotations

import os
import random
import re
import socket
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import pytest

from tests.e2e.conftest import Vm
from tests.e2e.test_fuzz_live import malformed
from tests.e2e.test_gdb_session import wait_ticker_advances
from vmigdb.arch.x86_64.registers import G_PACKET_SIZE, REGISTER_INDEX, split_g
from vmigdb.wire import codec

pytestmark = pytest.mark.e2e

SLOW = bool(os.environ.get("VMIGDB_SLOW"))
PACKETS = int(os.environ.get("VMIGDB_FUZZ_PACKETS", 20_000 if SLOW else 1_650))
SEED = int(os.environ.get("VMIGDB_FUZZ_SEED", "20261204"))
PROBE_EVERY = 110
SESSION_PACKETS = 550
PROBE_TIMEOUT = 90.0  # seconds: the guest may be running a queue of resumes on a loaded host
FRESH_TIMEOUT = 60.0
INTERRUPT = b"\x03"
SENTINEL_LEN = 29  # bytes the probe's sentinel `m` reads; the stream reads 8 or 64
# What vmigdb must never log, whatever a client sends.
NEVER_LOGGED = (
    "out of step",
    "resynchronis",
    "internal error",
    "Traceback",
    "could not stop the machine",
    "could not release",
    "hypervisor error",
    "socket.send() raised",
    "error while handling a stop",
)


def valid(rng: random.Random, kernel_addr: int) -> bytes:
    """One well-formed frame of run control or state query (threads 1 and 2 exist, 3 does not)."""
    n = rng.choice((1, 2, 1, 2, 3))
    if rng.random() < 0.08:
        return INTERRUPT
    payload = rng.choice(
        [
            b"c",
            b"s",
            b"vCont;c",
            b"vCont;s:%x" % n,
            b"vCont;s:%x;c" % n,
            b"vCont;c:%x" % n,
            b"vCont;t:%x;c" % n,
            b"?",
            b"Hg%x" % rng.choice((0, 1, 2, 3)),
            b"Hc%s" % rng.choice((b"-1", b"0", b"1", b"2")),
            b"g",
            b"m%x,%x" % (rng.choice((kernel_addr, 0, kernel_addr + 0x1000)), rng.choice((8, 64))),
            b"qC",
            b"T%x" % n,
            b"p10",
            b"qfThreadInfo",
        ]
    )
    return codec.encode_packet(payload)


class Client:
    """A raw RSP connection that reads packets as they come."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.decoder = codec.Decoder()
        self.pending: deque[bytes] = deque()

    def send(self, frame: bytes) -> None:
        self.sock.sendall(frame)

    def packet(self, payload: bytes) -> None:
        self.send(codec.encode_packet(payload))

    def next_packet(self, timeout: float) -> bytes | None:
        """The next packet from the server, or None if none came within `timeout`."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                return None
            if not data:
                raise ConnectionError("the server closed the connection")
            self.decoder.feed(data)
            self.pending += [e.data for e in self.decoder.events() if isinstance(e, codec.Packet)]
        return self.pending.popleft()

    def until(self, predicate, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            packet = self.next_packet(left)
            if packet is not None and predicate(packet):
                return packet
        raise TimeoutError

    def close(self) -> None:
        self.sock.close()


def is_stop_reply(packet: bytes) -> bool:
    return bool(re.fullmatch(rb"[TS][0-9a-f]{2}.*", packet, re.S))


@dataclass
class Stats:
    frames: Counter = field(default_factory=Counter)
    probes: int = 0
    probe_interrupts: int = 0  # extra ^C a probe needed (the guest was running queued resumes)
    slowest_probe: float = 0.0
    fresh_clients: int = 0
    refused: int = 0  # fresh connects refused while vmigdb still held the vanished client
    slowest_fresh: float = 0.0


def probe(client: Client, kernel_addr: int, stats: Stats, recent: deque) -> None:
    """^C until a sentinel is answered; then three requests answered in order, nothing between.

    The sentinel reads SENTINEL_LEN bytes, a length the stream never asks for, so its answer
    cannot be mistaken for the answer to a fuzzed packet (the stream sends `qC` itself).
    """
    started = time.monotonic()
    # '#00' closes a frame a truncated one left open (it then fails its checksum).
    client.send(b"#00" + INTERRUPT)
    client.packet(b"m%x,%x" % (kernel_addr, SENTINEL_LEN))
    deadline = started + PROBE_TIMEOUT
    while True:
        try:
            client.until(lambda p: re.fullmatch(rb"[0-9a-f]{%d}" % (2 * SENTINEL_LEN), p), 0.25)
            break
        except TimeoutError:
            assert time.monotonic() < deadline, (
                f"no answer to the sentinel within {PROBE_TIMEOUT:.0f} s; last frames sent: "
                f"{list(recent)}"
            )
            client.send(INTERRUPT)
            stats.probe_interrupts += 1
    # Stopped now, with everything sent before answered: the next replies must match exactly.
    client.packet(b"qC")
    client.packet(b"m%x,8" % kernel_addr)
    client.packet(b"?")
    got = [client.next_packet(30.0) for _ in range(3)]
    assert got[0] is not None and got[0].startswith(b"QC"), (got, list(recent))
    assert got[1] is not None and re.fullmatch(rb"[0-9a-f]{16}", got[1]), (got, list(recent))
    assert got[2] is not None and is_stop_reply(got[2]), (got, list(recent))
    assert client.next_packet(0.3) is None, ("a reply nobody asked for", list(recent))
    stats.probes += 1
    stats.slowest_probe = max(stats.slowest_probe, time.monotonic() - started)


def fresh_client(vm: Vm, stats: Stats) -> None:
    """Connect, stop the guest, read all registers, detach: the debugger is not lost."""
    started = time.monotonic()
    deadline = started + FRESH_TIMEOUT
    while True:
        client = Client(vm.port)
        try:
            client.packet(b"qSupported:multiprocess+;swbreak+;hwbreak+;vContSupported+")
            first = client.until(lambda p: True, max(1.0, deadline - time.monotonic()))
            if first.startswith(b"E.") and b"held by" in first:
                stats.refused += 1  # the vanished client's close is not processed yet
                assert time.monotonic() < deadline, f"still refused after {FRESH_TIMEOUT} s"
                time.sleep(0.5)
                continue
            assert b"PacketSize=" in first, first
            client.packet(b"?")
            stop = client.until(lambda p: True, deadline - time.monotonic())
            assert is_stop_reply(stop), stop
            client.packet(b"g")
            regs = client.until(lambda p: True, deadline - time.monotonic())
            assert re.fullmatch(rb"[0-9a-f]+", regs) and len(regs) == 2 * G_PACKET_SIZE, regs[:80]
            fields = split_g(bytes.fromhex(regs.decode()))
            rip, eflags, cs = (
                int.from_bytes(fields[REGISTER_INDEX[n]], "little") for n in ("rip", "eflags", "cs")
            )
            assert rip < 1 << 47 or rip >= 0xFFFF_8000_0000_0000, hex(rip)
            assert eflags & 2 and not eflags & ~0x3F7FD7, hex(eflags)  # no reserved bit set
            assert cs in (0x10, 0x33, 0x23), hex(cs)
            client.packet(b"D")
            assert client.until(lambda p: True, deadline - time.monotonic()) == b"OK"
        except TimeoutError:
            raise AssertionError(
                f"a fresh client could not stop the guest and read its registers within "
                f"{FRESH_TIMEOUT:.0f} s; vmigdb said: {vm.stderr()[-2000:]}"
            ) from None
        finally:
            client.close()
        break
    stats.fresh_clients += 1
    stats.slowest_fresh = max(stats.slowest_fresh, time.monotonic() - started)


@pytest.mark.timeout(1800 if SLOW else 900)
def test_run_control_and_junk_on_one_connection_never_lose_the_guest(vm: Vm) -> None:
    rng = random.Random(SEED)
    kernel_addr = vm.ksyms["__x64_sys_getpid"]
    stats = Stats()
    log_mark = len(vm.stderr())
    recent: deque[bytes] = deque(maxlen=16)
    sent = 0
    started = time.monotonic()
    while sent < PACKETS:
        client = Client(vm.port)
        client.packet(b"qSupported")
        client.until(lambda p: p.startswith(b"PacketSize"), 30)
        for i in range(min(SESSION_PACKETS, PACKETS - sent)):
            if rng.random() < 0.5:
                frame = malformed(rng)
                stats.frames["malformed"] += 1
            else:
                frame = valid(rng, kernel_addr)
                stats.frames["interrupt" if frame == INTERRUPT else "valid"] += 1
            recent.append(frame[:48])
            client.send(frame)
            sent += 1
            if (i + 1) % PROBE_EVERY == 0:
                probe(client, kernel_addr, stats, recent)
        client.close()  # vanish: no D, maybe with the guest running and packets queued
        fresh_client(vm, stats)
        wait_ticker_advances(vm, 60)
        assert vm.proc.poll() is None, vm.stderr()[-2000:]
    elapsed = time.monotonic() - started
    print(
        f"\n{sent} frames ({dict(stats.frames)}) in {elapsed:.0f} s, seed {SEED}; "
        f"{stats.probes} probes (slowest {stats.slowest_probe:.1f} s, {stats.probe_interrupts} "
        f"extra ^C), {stats.fresh_clients} fresh clients (slowest {stats.slowest_fresh:.1f} s, "
        f"{stats.refused} refused while the vanished one was being released)"
    )
    log = vm.stderr()[log_mark:]
    found = [line for line in log.splitlines() if any(bad in line for bad in NEVER_LOGGED)]
    assert found == [], "\n".join(found[:20])
    assert sent >= PACKETS and stats.probes >= PACKETS // PROBE_EVERY - 1
    out = vm.gdb("info registers rip", "stepi", "info registers rip", "detach")
    assert out.count("rip ") == 2 and "detached]" in out, out
    wait_ticker_advances(vm)
