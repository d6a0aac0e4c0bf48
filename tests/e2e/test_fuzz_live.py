"""Thousands of malformed packets against a live guest: the server, QEMU and the guest all survive.

QEMU 7.2's own gdbstub segfaults on some of these (the three packets below in a row); vmigdb parses
every packet itself and only ever sends QEMU packets it composed. None of them may find a bug:
vmigdb logs each one as an internal error (answered `Eff`), and the test fails on either.
"""

from __future__ import annotations

import random
import socket
import time

import pytest

from tests.e2e.conftest import Vm
from tests.e2e.test_gdb_session import wait_ticker_advances
from vmigdb.errors import INTERNAL_ERROR
from vmigdb.rsp.errors import INTERNAL
from vmigdb.wire import codec

pytestmark = pytest.mark.e2e

QEMU_KILLERS = [b"D6-c699;b70;7,8", b"z0e3f3a99c", b"c3c3588d8"]
VERBS = [
    b"m",
    b"M",
    b"X",
    b"g",
    b"G",
    b"p",
    b"P",
    b"Z0,",
    b"Z1,",
    b"Z2,",
    b"z0,",
    b"H",
    b"T",
    b"qRcmd,",
    b"qXfer:features:read:",
    b"qXfer:threads:read::",
    b"qSupported:",
    b"vCont;",
    b"vCont;r",
    b"qThreadExtraInfo,",
    b"vFile:open:",
    b"vFile:pread:",
    b"vFile:fstat:",
    b"vFile:close:",
    b"qXfer:exec-file:read:",
    b"QStartNoAckMode",
    b"?",
    b"!",
]
RESUMING = (
    b"c",
    b"C",
    b"s",
    b"S",
    b"D",
    b"k",
    b"vKill",
    b"vCont;c",
    b"vCont;s",
    b"vCont;C",
    b"vCont;S",
    b"vCont;t",
)


def junk(rng: random.Random) -> bytes:
    pieces = [
        b"",
        b",",
        b":",
        b";",
        b"-1",
        b"ffffffffffffffffffff",
        b"0",
        b"1",
        b"=",
        b"xyz",
        b"}",
        b"*",
        b"#",
        b"$",
        b"\x03",
        b"\xff" * 3,
        b"80000000000",
        b"%",
    ]
    out = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 6)))
    return out + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 8)))


def malformed(rng: random.Random) -> bytes:
    """One malformed frame (raw bytes on the wire)."""
    kind = rng.randrange(7)
    if kind == 6:  # a read-only monitor command with junk arguments, hex-encoded as GDB sends it
        words = ["ps", "lsmod", "sym", "vtop", "info", "regs", "stealth", "help", "process"]
        line = rng.choice(words).encode() + b" " + junk(rng)
        if line.startswith(b"process"):
            line = b"process " + line[7:].replace(b" ", b"")  # scope changes stay harmless
        return codec.encode_packet(b"qRcmd," + codec.encode_hex(line))
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    if kind == 1:  # good framing, junk arguments after a real verb
        payload = rng.choice(VERBS) + junk(rng)
    elif kind == 2:
        payload = rng.choice(QEMU_KILLERS)
    elif kind == 3:  # bad checksum
        frame = codec.encode_packet(rng.choice(VERBS) + junk(rng))
        return frame[:-2] + b"%02x" % ((int(frame[-2:], 16) + 1) & 0xFF)
    elif kind == 4:  # truncated
        frame = codec.encode_packet(rng.choice(VERBS) + junk(rng))
        return frame[: rng.randrange(1, len(frame))]
    else:  # oversized
        return codec.encode_packet(b"m" + b"1" * rng.randrange(0x40000, 0x50000))
    payload = payload.replace(b"$", b"").replace(b"#", b"")
    if payload.startswith(RESUMING) and payload not in QEMU_KILLERS:
        payload = b"!" + payload  # a well-formed resume/detach/kill is not malformed
    return codec.encode_packet(payload)


def test_thousands_of_malformed_packets_leave_everything_working(vm: Vm) -> None:
    rng = random.Random(20261128)
    sent = 0
    internal: list[bytes] = []  # Eff replies: a bug vmigdb ran into
    with socket.create_connection(("127.0.0.1", vm.port), timeout=30) as sock:
        decoder = codec.Decoder()

        def sync() -> None:
            """Send qC and read until its answer: proves the server is alive and in step."""
            sock.sendall(b"$" + b"qC" + b"#b4")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                decoder.feed(sock.recv(1 << 20))
                for event in decoder.events():
                    if isinstance(event, codec.Packet) and event.data == INTERNAL:
                        internal.append(event.data)
                    if isinstance(event, codec.Packet) and event.data.startswith(b"QC"):
                        return
            raise AssertionError("server stopped answering")

        sock.sendall(codec.encode_packet(b"qSupported"))
        sync()
        for batch in range(400):
            frames = [malformed(rng) for _ in range(10)]
            # A truncated frame swallows what follows until the next '$': end each batch cleanly.
            sock.sendall(b"".join(frames) + b"#00")
            sent += len(frames)
            sync()
            if batch % 100 == 0 and batch:
                assert vm.proc.poll() is None
        sock.sendall(codec.encode_packet(b"D"))
    assert sent >= 4000
    assert vm.proc.poll() is None
    bugs = [line for line in vm.stderr().splitlines() if INTERNAL_ERROR in line]
    assert bugs == [] and internal == [], vm.stderr()[-4000:]
    out = vm.gdb("info registers rip", "stepi", "info registers rip", "detach")
    assert out.count("rip ") == 2, out
    wait_ticker_advances(vm)
