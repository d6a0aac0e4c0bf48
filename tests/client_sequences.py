"""The packets IDA Pro and radare2/rizin send, as read from their public documentation and code,
replayed by the unit tests (a session over the fake machine) and the end-to-end tests (the demo
guest over TCP). Neither client can run on these machines.

radare2 (radareorg/radare2 at b281ec86, shlr/gdb/src/gdbclient/core.c, xml.c, responses.c,
common.c; libr/debug/p/debug_gdb.c) and rizin (rizinorg/rizin at f82993a3,
subprojects/rzgdb/src/gdbclient/core.c: the same packets) connect with
    +                                  (an ack, then a short wait for anything the stub sends)
    qSupported:multiprocess+;qRelocInsn+;xmlRegisters=i386
                                       (PacketSize is capped at 2048: 0x400-byte m reads)
    QStartNoAckMode                    (when offered)
    qC                                 (QC<tid>, else "no qC")
    vCont?                             (each listed action is then sent as vCont;ACTION[:tid])
    Hg<tid>                            (gdbr_select; p<pid>.<tid> only with multiprocess)
    Hc-1
    qXfer:features:read:target.xml:<off>,<pkt_sz-2>   (until a reply starts with l)
then, to debug: `?`, `g`, `qXfer:exec-file:read::<off>,<pkt_sz>`, `qOffsets`,
`m<addr>,400` for whole chunks and `m<16 hex digits>,<n>` for the tail (zero-padded address),
`vCont;s:<tid>` (step), `vCont;c` (continue, every thread), `Z0,<addr>,1` / `z0` (breakpoints),
`Z1` (hardware), `Z2`/`Z3`/`Z4,<addr>,1` (watchpoints), `qRcmd,<hex>` (`=!` commands), `D`.
A stop reply may be preceded by `O` packets, which radare2 reports as "no stop" (vmigdb sends
console text before a stop only for scope exits and warnings).

IDA Pro's Remote GDB debugger (Hex-Rays' documentation: "Remote GDB Debugger", "Remote GDB
Debugger options", "Debugging with QEMU"; the notes of shared/notes/rsp-x86_64.md): a bare
`qSupported` or `qSupported:xmlRegisters=i386,arm,mips`, `!` (extended mode, optional),
`QStartNoAckMode`, target.xml in `0,fff` chunks, `?`, `qfThreadInfo`/`qsThreadInfo`, `Hg<tid>`
and `g` (with "Max packet size" -1, IDA takes the `g` reply's length as the packet size and
splits memory reads to fit it), `m`/`M`, `Z0`/`Z1` (software / hardware breakpoints; the stop must
report the breakpoint's own address, "Software breakpoints at EIP+1" unchecked as for QEMU),
`Z2`..`Z4` reported as `watch:ADDR`, `Hc<tid>` with `c`/`s` (or `vCont`), `qRcmd` for its
"send_dbg_command" and the command line, `D` to detach (its "terminate" sends `k`, which powers
the guest off).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable

# The first 24 registers, in GDB's amd64 order, which IDA expects.
GDB_AMD64_ORDER = (
    "rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15 rip eflags cs ss ds es fs gs"
).split()

Request = Callable[[bytes], bytes]


def read_xfer(request: Request, prefix: bytes, chunk: int) -> bytes:
    """A qXfer object read the way radare2 and IDA do: offset advances by what came back."""
    data = b""
    while True:
        reply = request(prefix + b"%x,%x" % (len(data), chunk))
        assert reply[:1] in (b"m", b"l"), reply[:40]
        data += reply[1:]
        if reply[:1] == b"l":
            return data


def check_target_xml(document: bytes) -> list[str]:
    """The target description parses, says x86-64 and lists GDB's amd64 registers first."""
    root = ET.fromstring(document)
    assert root.findtext("architecture") == "i386:x86-64"
    names = [reg.get("name") for reg in root.iter("reg")]
    assert names[: len(GDB_AMD64_ORDER)] == GDB_AMD64_ORDER
    return names


def radare2_connect(request: Request) -> dict[str, object]:
    """radare2's gdbr_connect after the first ack; returns what it learned."""
    supported = request(b"qSupported:multiprocess+;qRelocInsn+;xmlRegisters=i386")
    features = dict(
        item.split(b"=", 1) if b"=" in item else (item[:-1], item[-1:])
        for item in supported.split(b";")
    )
    pkt_sz = min(int(features[b"PacketSize"], 16), 2048)
    assert features.get(b"qXfer:features:read") == b"+"
    assert b"multiprocess" not in features  # thread ids are plain numbers then
    assert request(b"QStartNoAckMode") == b"OK"
    qc = request(b"qC")
    assert re.fullmatch(rb"QC[0-9a-f]+", qc), qc
    tid = int(qc[2:], 16)
    vcont = request(b"vCont?")
    actions = set(vcont.split(b";")[1:])
    assert {b"c", b"s"} <= actions, vcont
    assert request(b"Hg%x" % tid) == b"OK"
    assert request(b"Hc-1") == b"OK"
    names = check_target_xml(read_xfer(request, b"qXfer:features:read:target.xml:", pkt_sz - 2))
    return {"pkt_sz": pkt_sz, "tid": tid, "registers": names, "vcont": actions}


def radare2_read(request: Request, addr: int, length: int, pkt_sz: int) -> bytes:
    """gdbr_read_memory_page: whole chunks as m%x,%x, the tail with a zero-padded address."""
    data_sz = pkt_sz // 2
    out = b""
    for i in range(length // data_sz):
        out += bytes.fromhex(request(b"m%x,%x" % (addr + i * data_sz, data_sz)).decode())
    tail = length % data_sz
    if tail:
        start = addr + length - tail
        out += bytes.fromhex(request(b"m%016x,%x" % (start, tail)).decode())
    return out


def ida_connect(request: Request, *, bare_qsupported: bool) -> dict[str, object]:
    """IDA's start of a session; returns what it learned."""
    supported = request(
        b"qSupported" if bare_qsupported else b"qSupported:xmlRegisters=i386,arm,mips"
    )
    assert b"qXfer:features:read+" in supported and b"QStartNoAckMode+" in supported
    assert request(b"!") == b""  # no extended mode: IDA goes on with plain remote
    assert request(b"QStartNoAckMode") == b"OK"
    names = check_target_xml(read_xfer(request, b"qXfer:features:read:target.xml:", 0xFFF))
    stop = request(b"?")
    assert re.match(rb"T[0-9a-f]{2}thread:[0-9a-f]+;", stop), stop
    threads = request(b"qfThreadInfo")
    assert threads.startswith(b"m") and request(b"qsThreadInfo") == b"l"
    tids = [int(t, 16) for t in threads[1:].split(b",")]
    assert request(b"Hg%x" % tids[0]) == b"OK"
    g = request(b"g")
    assert re.fullmatch(rb"[0-9a-f]+", g)
    # "Max packet size" -1: the g reply's length is the packet size; reads are split to fit.
    return {"registers": names, "tids": tids, "max_read": len(g) // 2}
