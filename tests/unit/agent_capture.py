"""Capture the agent-expression bytecode GDB itself compiles for breakpoint conditions.

A tiny fake RSP stub (one thread, plain sockets, `vmigdb.wire.codec` framing) advertises
``ConditionalBreakpoints+``, serves vmigdb's own target.xml, answers ``g``/``m`` with zeros and
records every ``Z`` packet. Real GDB, in batch mode with a small Python script, connects to it,
sets ``break *ADDR if EXPR`` for each expression at its own address (plus a few shared-address
and ``hbreak`` cases), runs ``maint agent-eval EXPR`` to keep GDB's own disassembly and any
compile error, then ``continue``s: GDB inserts the breakpoints with their conditions (``Z0,addr,
kind;X<len>,<hex>``), the stub answers the ``vCont`` with a stop, and GDB detaches.

    .venv/bin/python -m tests.unit.agent_capture          # print the capture as JSON
    .venv/bin/python -m tests.unit.agent_capture --write  # refresh CAPTURE_PATH

The stored capture (`CAPTURE_PATH`) lets the unit tests run without GDB; `test_agent.py`
recaptures live when GDB is present and compares.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from vmigdb.arch.x86_64.registers import G_PACKET_SIZE
from vmigdb.rsp.target_xml import target_xml, xfer_slice
from vmigdb.wire import codec

CAPTURE_PATH = Path(__file__).parent / "data" / "agent" / "gdb13_conditions.json"
GDB = os.environ.get("VMIGDB_TEST_GDB", "/usr/bin/gdb")
BASE_ADDRESS = 0x401000
ADDRESS_STRIDE = 0x10

QSUPPORTED = (
    b"PacketSize=4000;ConditionalBreakpoints+;swbreak+;hwbreak+;vContSupported+;"
    b"qXfer:features:read+"
)

# Each expression gets its own breakpoint address (BASE_ADDRESS + i * ADDRESS_STRIDE), so each
# Z packet carries exactly one condition.
EXPRESSIONS: tuple[str, ...] = (
    # the brief's list
    "$rdi == 5",
    "$rdi != 0 && $rsi < 10",
    "$rax > 0x100 || $rbx == -1",
    "(int)$rdi < -3",
    "(unsigned char)$rcx == 0xff",
    "*(int *)0x1000 == 42",
    "*(long *)($rsp + 8) == 7",
    "*(short *)0x2000 < 0",
    "($rdi & 0xf0) >> 4 == 3",
    "$rdi * 3 - $rsi / 2 == 1",
    "$rdi % 7 == 2",
    "!$rdi",
    "~$rdi == 0",
    "$rdi ^ $rsi",
    "$rdi << 2 == 20",
    "$eflags & 0x40",
    "$cs == 0x10",
    "$cr3 != 0",
    "$rip == 0x401000",
    "(char)$rdi == 'a'",
    "$rdi >= 5 ? $rsi == 1 : $rsi == 2",
    "*(char *)$rdi == 0",
    "$rdi == 1 || $rdi == 2 || $rdi == 3",
    # more opcodes and operand widths
    "(unsigned long)$rdi / 3 == 5",
    "(unsigned long)$rdi % 3 == 1",
    "(unsigned long)$rdi >> 60 == 0xf",
    "$rdi >> 60 == -1",
    "(unsigned int)$rdi < 5",
    "(unsigned int)$rdi > 0x80000000",
    "$rdi | $rsi",
    "-$rdi == 5",
    "$rdi <= -2",
    "$rdi > 3 && $rdi < 10",
    "$rdi == 0x1234",
    "$rdi == 0x12345678",
    "$rdi == 0x123456789abcdef0",
    "$rdi == -0x123456789",
    "(short)$rdi == -2",
    "(unsigned short)$rdi == 0xfffe",
    "(signed char)$rdi < 0",
    "*(unsigned char *)0x3000 == 0x80",
    "*(unsigned long long *)0x3000 == 0x8877665544332211",
    "*(unsigned short *)0x3000 == 0x2211",
    "*(int *)*(long *)$rsp == 1",
    "$rdi * $rsi == -6",
    "$rdi / -2 == -3",
    "$rdi % -3 == -1",
    "(unsigned int)$rdi * 2 == 0",
    "((int)$rdi >> 1) == -1",
    "$pc == 0x401000",
    "$sp == 0x7000",
    "$fp != 0",
    "$r15 + $r8 == 0",
    "$mxcsr == 0x1f80",
    "$fs_base != 0",
    "$gs_base == 0xffff888000000000",
    "$k_gs_base == 0",
    "$efer & 0x500",
    "$cr0 & 1",
    "$ss == 0x18",
    "$fctrl == 0x37f",
    "$rdi == 5 && $rsi == 6 || $rdx == 7",
    "($rdi == 5) + ($rsi == 6) == 2",
    "$rdi == 5 ? 1 : 0",
    "$rdi ? $rsi : $rdx",
    "!($rdi && $rsi)",
    "sizeof(int) == 4",
    "$rdi == 3, $rsi == 4",
    "$tv == 3",
    "($tv = $rdi) == 3",
    # likely refused: floats, pseudo-registers, wide registers, host-only values
    "(unsigned int)$eflags & 0x40",
    "(long)$cr0 & 1",
    "(unsigned long)$mxcsr == 0x1f80",
    "(char)$rdi == 97",
    "$rdi == 'a'",
    "*(unsigned int *)($rsp + 4 * $rdi) == 3",
    "((int *)0x1000)[2] == 5",
    "((int *)$rdi)[2] == 5",
    "*((int *)0x1000 + 2) == 5",
    "*(long *)$rsp + *(long *)($rsp + 8) == 0",
    "$rdi + 1 > $rdi",
    "(unsigned long)$rdi < (unsigned long)$rsi",
    "$rdi < 5U",
    "$rdi < 5UL",
    "$rdi == $rsi",
    "($rdi & (1L << 63)) != 0",
    "(unsigned char)*(char *)$rsi == 0xe9",
    "(int)$rdi / (int)$rsi == 2",
    "(unsigned int)$rdi + 1 == 0",
    "$xmm0.v4_int32[0] == 1",
    "$xmm0.uint128 == 0",
    "$st0 > 1",
    "$eax == 1",
    "$al == 1",
    "(float)$rdi > 1.5",
    "$cvar == 1",
    "$_thread == 1",
)

# Several breakpoints at one address: GDB sends one Z0 with one ;X per condition.
SHARED_ADDRESS = 0x402000
SHARED_EXPRESSIONS: tuple[str, ...] = ("$rdi == 1", "$rsi == 2", "$rdx == 3")
# A hardware breakpoint with a condition: Z1 carries ;X too.
HBREAK_ADDRESS = 0x403000
HBREAK_EXPRESSION = "$rdi == 9"

_GDB_SCRIPT = r"""
import json
import gdb

with open(CONFIG_PATH) as f:
    cfg = json.load(f)
gdb.execute("set confirm off")
gdb.execute("set pagination off")
gdb.execute("set width 0")
gdb.execute("tvariable $tv = 7")
gdb.execute("set $cvar = 1")
gdb.execute("target remote 127.0.0.1:%d" % cfg["port"], to_string=True)
out = []
for case in cfg["cases"]:
    entry = {"expr": case["expr"], "address": case["address"], "command": case["command"]}
    try:
        entry["disasm"] = gdb.execute("maint agent-eval " + case["expr"], to_string=True)
    except gdb.error as exc:
        entry["compile_error"] = str(exc)
    try:
        gdb.execute("%s *%#x if %s" % (case["command"], case["address"], case["expr"]),
                    to_string=True)
    except gdb.error as exc:
        entry["break_error"] = str(exc)
    out.append(entry)
gdb.execute("continue", to_string=True)
with open(cfg["out"], "w") as f:
    json.dump(out, f)
gdb.execute("detach", to_string=True)
"""


class FakeStub:
    """A one-connection RSP stub that records Z packets; runs in a daemon thread."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.z_packets: list[bytes] = []
        self.log: list[bytes] = []
        self.error: BaseException | None = None
        self._xml = target_xml().encode()
        self._thread = threading.Thread(target=self._run, name="agent-capture-stub", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        self.listener.close()

    def _run(self) -> None:
        try:
            self.listener.settimeout(30)
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(30)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._serve(conn)
        except BaseException as exc:  # reported by capture()
            self.error = exc

    def _serve(self, conn: socket.socket) -> None:
        decoder = codec.Decoder()
        while True:
            data = conn.recv(65536)
            if not data:
                return
            decoder.feed(data)
            for event in decoder.events():
                if not isinstance(event, codec.Packet):
                    continue
                self.log.append(event.data)
                reply = self.reply(event.data)
                if reply is None:
                    conn.sendall(b"+")
                    return
                # Ack and reply in one write: two small writes would wait out delayed ACKs.
                conn.sendall(b"+" + codec.encode_packet(reply))

    def reply(self, pkt: bytes) -> bytes | None:
        """The reply payload for one packet; None closes the connection."""
        if pkt.startswith(b"qSupported"):
            return QSUPPORTED
        if pkt.startswith(b"qXfer:features:read:target.xml:"):
            offset, length = (int(x, 16) for x in pkt.rsplit(b":", 1)[1].split(b","))
            return codec.escape_binary(xfer_slice(self._xml, offset, length))
        if pkt == b"?":
            return b"T05thread:1;"
        if pkt == b"g":
            return b"00" * G_PACKET_SIZE
        if pkt.startswith(b"m"):
            length = int(pkt.split(b",")[1], 16)
            return b"00" * length
        if pkt == b"qfThreadInfo":
            return b"m1"
        if pkt == b"qsThreadInfo":
            return b"l"
        if pkt.startswith((b"Hg", b"Hc", b"T")):
            return b"OK"
        if pkt == b"qC":
            return b"QC1"
        if pkt == b"qAttached":
            return b"1"
        if pkt == b"vCont?":
            return b"vCont;c;C;s;S"
        if pkt.startswith(b"vCont;"):
            return b"T05thread:1;"
        if pkt.startswith(b"Z"):
            self.z_packets.append(pkt)
            return b"OK"
        if pkt.startswith(b"z"):
            return b"OK"
        if pkt == b"D" or pkt.startswith((b"D;", b"vKill", b"k")):
            return None if pkt == b"k" else b"OK"
        return b""


def _cases() -> list[dict]:
    cases = [
        {"expr": e, "address": BASE_ADDRESS + i * ADDRESS_STRIDE, "command": "break"}
        for i, e in enumerate(EXPRESSIONS)
    ]
    cases += [
        {"expr": e, "address": SHARED_ADDRESS, "command": "break"} for e in SHARED_EXPRESSIONS
    ]
    cases.append({"expr": HBREAK_EXPRESSION, "address": HBREAK_ADDRESS, "command": "hbreak"})
    return cases


# GDB 13 puts one ';' before the first condition only: ";X3,aabbccX2,ddee" (gdbserver accepts
# both that and ";X..;X..").
_Z_RE = re.compile(rb"Z([01]),([0-9a-f]+),([0-9a-f]+)(?:;((?:X[0-9a-f]+,[0-9a-f]*)+))?")


def parse_z(packet: bytes) -> tuple[int, int, list[str]]:
    """``(type, address, [hex bytecode, ...])`` of one recorded Z0/Z1 packet."""
    m = _Z_RE.fullmatch(packet)
    if m is None:
        raise ValueError(f"unexpected Z packet {packet!r}")
    conds = []
    for part in (m.group(4) or b"").split(b"X")[1:]:
        length, _, hexbytes = part.partition(b",")
        if len(hexbytes) != 2 * int(length, 16):
            raise ValueError(f"length mismatch in {packet!r}")
        conds.append(hexbytes.decode())
    return int(m.group(1)), int(m.group(2), 16), conds


def _gdb_version(gdb: str) -> str:
    out = subprocess.run([gdb, "--version"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0]


def capture(gdb: str = GDB, timeout: float = 60) -> dict:
    """Run GDB against the fake stub and return the capture (see `CAPTURE_PATH` for the shape).

    Each entry of ``cases`` has ``expr``, ``address``, ``command``, ``disasm`` (``maint
    agent-eval`` output, when GDB compiled it), ``compile_error`` (when it did not),
    ``break_error`` (when ``break`` itself failed) and ``bytecode``: the hex of the ``;X``
    condition GDB sent for that address (None if it sent the Z packet without one).
    ``shared`` is the list of conditions of the shared-address Z packet, in packet order.
    """
    stub = FakeStub()
    stub.start()
    with tempfile.TemporaryDirectory(prefix="agent-capture-") as tmp:
        cfg_path = Path(tmp, "cfg.json")
        out_path = Path(tmp, "out.json")
        script = Path(tmp, "capture.py")
        cases = _cases()
        cfg_path.write_text(json.dumps({"port": stub.port, "cases": cases, "out": str(out_path)}))
        script.write_text(f"CONFIG_PATH = {str(cfg_path)!r}\n" + _GDB_SCRIPT)
        proc = subprocess.run(
            [gdb, "-nx", "-batch", "-x", str(script)],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        stub.join(10)
        if stub.error is not None:
            raise RuntimeError(f"fake stub failed: {stub.error!r}") from stub.error
        if not out_path.exists():
            raise RuntimeError(f"GDB did not finish the capture:\n{proc.stdout}\n{proc.stderr}")
        entries = json.loads(out_path.read_text())
    by_address: dict[tuple[int, int], list[str]] = {}
    for pkt in stub.z_packets:
        ztype, address, conds = parse_z(pkt)
        by_address[(ztype, address)] = conds  # the last insertion wins (GDB may re-send)
    for entry in entries:
        if entry["address"] == SHARED_ADDRESS:
            continue
        ztype = 1 if entry["command"] == "hbreak" else 0
        conds = by_address.get((ztype, entry["address"]))
        if conds is None and "break_error" not in entry:
            raise RuntimeError(f"no Z packet for {entry['expr']!r}")
        entry["bytecode"] = conds[0] if conds else None
    return {
        "gdb": _gdb_version(gdb),
        "cases": entries,
        "shared": by_address.get((0, SHARED_ADDRESS), []),
        "z_packets": sorted({p.decode() for p in stub.z_packets}),
    }


def main(argv: list[str]) -> int:
    if shutil.which(GDB) is None:
        print(f"{GDB} not found", file=sys.stderr)
        return 1
    result = capture()
    text = json.dumps(result, indent=1) + "\n"
    if "--write" in argv:
        CAPTURE_PATH.parent.mkdir(parents=True, exist_ok=True)
        CAPTURE_PATH.write_text(text)
        print(f"wrote {CAPTURE_PATH}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
