"""GDB agent expressions: target-side breakpoint conditions, evaluated by vmigdb itself.

When the stub advertises ``ConditionalBreakpoints+``, GDB compiles each breakpoint condition to
agent bytecode (GDB manual, appendix "Agent Expressions"; opcodes in ``gdbsupport/ax.def``) and
sends it with the breakpoint: ``Z0,addr,kind;X<len>,<hex>``. Several breakpoints at one address
give several conditions; GDB 13 writes the ``;`` only once (``;X9,..X9,..``), gdbserver accepts
both that and ``;X..;X..``, and so does `parse_conditions`. At each hit vmigdb evaluates the
conditions against the stopped vCPU and reports the stop only if one is non-zero or one fails to
evaluate (GDB then evaluates the condition itself): `should_report`.

The machine is gdbserver's (``gdbserver/ax.cc``): a stack of 64-bit values, two's complement
arithmetic with wrap-around, big-endian operands in the bytecode, ``if_goto``/``goto`` to a 16-bit
absolute offset, ``reg`` with a 16-bit *remote* register number (GDB translates through the target
description, so it is vmigdb's canonical regnum, see `vmigdb.arch.x86_64.registers.REGISTERS`),
little-endian memory (x86). Shift counts use their low 6 bits, as x86 hardware does for
gdbserver's C shifts. Floating-point opcodes exist but GDB never emits them (it refuses to compile
float conditions); they fail to evaluate, like in gdbserver. Trace opcodes are no-ops here (they
collect data for tracepoints), keeping their stack effect. ``getv``/``setv`` use the optional
*variables* mapping of `evaluate` (trace state variables), and fail without it.

Values on the stack are ints in ``[0, 2**64)``; `evaluate` returns the top of the stack that way
(GDB only tests it against zero).

`evaluate` is a tight loop over the code bytes with an if/elif chain ordered by how often GDB
emits each opcode (``reg``, ``ext``, ``const8``, ``equal``, ``end`` first). Malformed code never
crashes it: stack underflow, truncated operands, running past the end, unknown opcodes, memory or
register read failures and division by zero all raise `AgentError`. `AgentExpr.validate` finds the
static problems once, when the breakpoint is inserted (including stack underflow, by GDB's own
stack-height analysis).
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from vmigdb.wire import codec

__all__ = [
    "MAX_EXPR_LENGTH",
    "OPCODES",
    "STACK_LIMIT",
    "AgentError",
    "AgentExpr",
    "EvalContext",
    "OpInfo",
    "evaluate",
    "parse_conditions",
    "should_report",
]

log = logging.getLogger("vmigdb.agent")

STACK_LIMIT = 1024
"""Most values the stack may hold (gdbserver allows 99; GDB's conditions need a handful).

`AgentExpr.validate` checks it on every path; `evaluate` at ``end`` and at backward jumps, the
only way to grow the stack without bound (straight-line code pushes at most one value per
instruction)."""

MAX_EXPR_LENGTH = 0x10000
"""Longest accepted expression: jump offsets are 16 bits, so longer code could not be GDB's."""

_M64 = (1 << 64) - 1
_SIGN64 = 1 << 63


class AgentError(Exception):
    """An agent expression is malformed or failed to evaluate.

    :ivar address: The guest address that could not be read, when that was the failure.
    """

    def __init__(self, message: str, *, address: int | None = None) -> None:
        super().__init__(message)
        self.address = address


class OpInfo(NamedTuple):
    """One opcode: GDB's name and the bytes of operand that follow it in the code."""

    name: str
    operand_size: int


# gdbsupport/ax.def. printf's operands are variable (nargs:1, length:2, format): size 3 here
# is its fixed part. 0x31 ("invalid2") is a placeholder in GDB's table, not an opcode.
OPCODES: dict[int, OpInfo] = {
    0x01: OpInfo("float", 0),
    0x02: OpInfo("add", 0),
    0x03: OpInfo("sub", 0),
    0x04: OpInfo("mul", 0),
    0x05: OpInfo("div_signed", 0),
    0x06: OpInfo("div_unsigned", 0),
    0x07: OpInfo("rem_signed", 0),
    0x08: OpInfo("rem_unsigned", 0),
    0x09: OpInfo("lsh", 0),
    0x0A: OpInfo("rsh_signed", 0),
    0x0B: OpInfo("rsh_unsigned", 0),
    0x0C: OpInfo("trace", 0),
    0x0D: OpInfo("trace_quick", 1),
    0x0E: OpInfo("log_not", 0),
    0x0F: OpInfo("bit_and", 0),
    0x10: OpInfo("bit_or", 0),
    0x11: OpInfo("bit_xor", 0),
    0x12: OpInfo("bit_not", 0),
    0x13: OpInfo("equal", 0),
    0x14: OpInfo("less_signed", 0),
    0x15: OpInfo("less_unsigned", 0),
    0x16: OpInfo("ext", 1),
    0x17: OpInfo("ref8", 0),
    0x18: OpInfo("ref16", 0),
    0x19: OpInfo("ref32", 0),
    0x1A: OpInfo("ref64", 0),
    0x1B: OpInfo("ref_float", 0),
    0x1C: OpInfo("ref_double", 0),
    0x1D: OpInfo("ref_long_double", 0),
    0x1E: OpInfo("l_to_d", 0),
    0x1F: OpInfo("d_to_l", 0),
    0x20: OpInfo("if_goto", 2),
    0x21: OpInfo("goto", 2),
    0x22: OpInfo("const8", 1),
    0x23: OpInfo("const16", 2),
    0x24: OpInfo("const32", 4),
    0x25: OpInfo("const64", 8),
    0x26: OpInfo("reg", 2),
    0x27: OpInfo("end", 0),
    0x28: OpInfo("dup", 0),
    0x29: OpInfo("pop", 0),
    0x2A: OpInfo("zero_ext", 1),
    0x2B: OpInfo("swap", 0),
    0x2C: OpInfo("getv", 2),
    0x2D: OpInfo("setv", 2),
    0x2E: OpInfo("tracev", 2),
    0x2F: OpInfo("tracenz", 0),
    0x30: OpInfo("trace16", 2),
    0x32: OpInfo("pick", 1),
    0x33: OpInfo("rot", 0),
    0x34: OpInfo("printf", 3),
}
"""Every opcode of GDB 13's agent, by value."""

_FLOAT_OPS = frozenset((0x01, 0x1B, 0x1C, 0x1D, 0x1E, 0x1F))
_IF_GOTO, _GOTO, _END, _PICK, _PRINTF = 0x20, 0x21, 0x27, 0x32, 0x34

# (consumed, produced) for the stack-height analysis: gdbserver's behaviour where ax.def's
# table is loose (tracev pushes nothing; pick and printf are handled apart).
_STACK_EFFECT: dict[int, tuple[int, int]] = {
    **{op: (2, 1) for op in range(0x02, 0x0C)},
    0x0C: (2, 0),
    0x0D: (1, 1),
    0x0E: (1, 1),
    **{op: (2, 1) for op in (0x0F, 0x10, 0x11, 0x13, 0x14, 0x15)},
    0x12: (1, 1),
    **{op: (1, 1) for op in range(0x16, 0x20)},
    0x01: (0, 0),
    _IF_GOTO: (1, 0),
    _GOTO: (0, 0),
    **{op: (0, 1) for op in (0x22, 0x23, 0x24, 0x25, 0x26)},
    _END: (1, 1),
    0x28: (1, 2),
    0x29: (1, 0),
    0x2A: (1, 1),
    0x2B: (2, 2),
    0x2C: (0, 1),
    0x2D: (1, 1),
    0x2E: (0, 0),
    0x2F: (2, 0),
    0x30: (1, 1),
    0x33: (3, 3),
}

_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_U64 = struct.Struct(">Q").unpack_from

# ext n / zero_ext n for n < 64: mask of the kept bits, the sign bit, the bits sign extension sets.
_MASK = tuple((1 << n) - 1 for n in range(64))
_SIGN = (0,) + tuple(1 << (n - 1) for n in range(1, 64))
_HIGH = tuple(_M64 ^ m for m in _MASK)


class EvalContext(Protocol):
    """What an expression reads: the stopped vCPU's registers and guest memory."""

    def register(self, regnum: int) -> int:
        """Register *regnum* (GDB's remote number = vmigdb's canonical one) as unsigned int.

        Wider registers (xmm, st) may be returned whole; the expression sees the low 64 bits.
        Any exception becomes an `AgentError`.
        """
        ...

    def read_memory(self, address: int, size: int) -> bytes:
        """*size* bytes at *address*; any exception becomes an `AgentError` with the address."""
        ...


_HEXLEN = re.compile(rb"[0-9a-fA-F]{1,8}")


@dataclass(frozen=True, slots=True)
class AgentExpr:
    """One agent expression: its bytecode, as GDB sent it."""

    code: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.code, bytes):
            object.__setattr__(self, "code", bytes(self.code))

    @classmethod
    def parse_condition(cls, text: bytes) -> AgentExpr:
        """Parse ``<hexlen>,<hexbytes>``, the part of a Z packet after ``;X``.

        :raises ValueError: if the length is not 1-8 hex digits, is zero or over
            `MAX_EXPR_LENGTH`, or the bytes are not exactly that many strict hex pairs.
        """
        head, sep, body = bytes(text).partition(b",")
        if not sep or _HEXLEN.fullmatch(head) is None:
            raise ValueError(f"bad agent expression length in {bytes(text[:40])!r}")
        length = int(head, 16)
        if not 0 < length <= MAX_EXPR_LENGTH:
            raise ValueError(f"agent expression length {length} out of range")
        if len(body) != 2 * length:
            raise ValueError(f"agent expression of {length} bytes has {len(body)} hex digits")
        return cls(codec.decode_hex(body))

    def instructions(self) -> list[tuple[int, int, int | bytes | None]]:
        """Decode linearly: ``(offset, opcode, operand)`` per instruction.

        The operand is an int (big-endian) or None; for printf it is the raw
        ``nargs, length, format`` bytes.

        :raises AgentError: on an unknown opcode or an operand running past the end.
        """
        code = self.code
        out: list[tuple[int, int, int | bytes | None]] = []
        pc = 0
        while pc < len(code):
            op = code[pc]
            info = OPCODES.get(op)
            if info is None:
                raise AgentError(f"unknown opcode {op:#04x} at offset {pc}")
            size = info.operand_size
            if op == _PRINTF and pc + 4 <= len(code):
                size += _U16(code, pc + 2)[0]
            if pc + 1 + size > len(code):
                raise AgentError(f"truncated operand of {info.name} at offset {pc}")
            operand: int | bytes | None = None
            if op == _PRINTF:
                operand = code[pc + 1 : pc + 1 + size]
                if size == 3 or operand[-1] != 0:
                    raise AgentError(f"printf at offset {pc}: format is not NUL-terminated")
            elif size:
                operand = int.from_bytes(code[pc + 1 : pc + 1 + size], "big")
            out.append((pc, op, operand))
            pc += 1 + size
        return out

    def validate(self) -> None:
        """Check the code statically, as GDB's ``ax_reqs`` does for what it compiles.

        Every opcode known and whole; jump targets on instruction boundaries; no path that
        underflows the stack, grows it past `STACK_LIMIT`, reaches a join point with two
        different stack heights or falls off the end; ``end`` reached with a value to return.
        Unreachable code is decoded but not analysed. Floating-point opcodes pass (they are
        well formed) and fail when evaluated.

        :raises AgentError: describing the first problem found.
        """
        if not self.code:
            raise AgentError("empty agent expression")
        if len(self.code) > MAX_EXPR_LENGTH:
            raise AgentError(f"agent expression longer than {MAX_EXPR_LENGTH} bytes")
        insns = self.instructions()
        at = {offset: (op, operand) for offset, op, operand in insns}
        following = {insns[i][0]: insns[i + 1][0] for i in range(len(insns) - 1)}
        heights: dict[int, int] = {0: 0}
        work = [0]
        while work:
            pc = work.pop()
            height = heights[pc]
            op, operand = at[pc]
            name = OPCODES[op].name
            if op == _PICK:
                assert isinstance(operand, int)
                consumed, produced = operand + 1, operand + 2
            elif op == _PRINTF:
                assert isinstance(operand, bytes)
                consumed, produced = operand[0] + 2, 0
            else:
                consumed, produced = _STACK_EFFECT[op]
            if height < consumed:
                raise AgentError(f"stack underflow at offset {pc} ({name})")
            height += produced - consumed
            if height > STACK_LIMIT:
                raise AgentError(f"stack overflow at offset {pc} ({name})")
            if op == _END:
                continue
            successors = []
            if op in (_IF_GOTO, _GOTO):
                assert isinstance(operand, int)
                if operand not in at:
                    raise AgentError(
                        f"{name} at offset {pc} jumps to {operand}, "
                        + ("past the end" if operand >= len(self.code) else "inside an instruction")
                    )
                successors.append(operand)
            if op != _GOTO:
                if pc not in following:
                    raise AgentError(f"{name} at offset {pc} runs past the end: no end")
                successors.append(following[pc])
            for nxt in successors:
                seen = heights.get(nxt)
                if seen is None:
                    heights[nxt] = height
                    work.append(nxt)
                elif seen != height:
                    raise AgentError(
                        f"stack height {height} and {seen} meet at offset {nxt} (from {pc})"
                    )

    def disassemble(self) -> str:
        """The code in the format of GDB's ``maint agent-eval`` (one ``%3d  name operand`` line
        per instruction; 8-byte operands printed signed, as GDB does).

        :raises AgentError: if the code does not decode.
        """
        lines = []
        for offset, op, operand in self.instructions():
            line = f"{offset:3d}  {OPCODES[op].name}"
            if isinstance(operand, int):
                if OPCODES[op].operand_size == 8 and operand & _SIGN64:
                    operand -= 1 << 64
                line += f" {operand}"
            elif isinstance(operand, bytes):
                line += f" {operand[0]} {operand[3:-1].decode('latin-1')!r}"
            lines.append(line)
        return "\n".join(lines)


def parse_conditions(text: bytes) -> tuple[AgentExpr, ...]:
    """Parse the conditions of a Z packet: everything after the ``;`` that follows ``kind``.

    Accepts GDB's ``X<len>,<hex>X<len>,<hex>...`` and gdbserver's tolerated
    ``X<len>,<hex>;X<len>,<hex>...``.

    :raises ValueError: on anything else, including breakpoint commands (``cmds:``).
    """
    text = bytes(text)
    out: list[AgentExpr] = []
    pos = 0
    while pos < len(text):
        if out and text[pos] == 0x3B:  # ';' between conditions
            pos += 1
        if text.startswith(b"cmds:", pos):
            raise ValueError("breakpoint commands (cmds:) are not supported")
        if not text.startswith(b"X", pos):
            raise ValueError(f"expected X<len>,<bytecode> at {text[pos : pos + 20]!r}")
        comma = text.find(b",", pos)
        if comma < 0:
            raise ValueError(f"missing ',' in condition {text[pos : pos + 20]!r}")
        head = text[pos + 1 : comma]
        if _HEXLEN.fullmatch(head) is None:
            raise ValueError(f"bad agent expression length {head[:20]!r}")
        end = comma + 1 + 2 * int(head, 16)
        if end > len(text):
            raise ValueError("condition bytecode shorter than its length")
        out.append(AgentExpr.parse_condition(text[pos + 1 : end]))
        pos = end
    if not out:
        raise ValueError("no condition")
    return tuple(out)


def _stuck(code: bytes, pc: int) -> AgentError:
    """Explain an IndexError/struct.error raised by the instruction at *pc*."""
    if pc >= len(code):
        return AgentError(
            f"no instruction at offset {pc}: ran past the end (missing end, or a jump out of range)"
        )
    op = code[pc]
    info = OPCODES.get(op, OpInfo(f"opcode {op:#04x}", 0))
    size = info.operand_size
    if op == _PRINTF and pc + 4 <= len(code):
        size += _U16(code, pc + 2)[0]
    if pc + 1 + size > len(code):
        return AgentError(f"truncated operand of {info.name} at offset {pc}")
    return AgentError(f"stack underflow at offset {pc} ({info.name})")


def _signed_divmod(a: int, b: int) -> tuple[int, int]:
    """C99 division of two 64-bit two's complement values: quotient truncated toward zero."""
    if a & _SIGN64:
        a -= 1 << 64
    if b & _SIGN64:
        b -= 1 << 64
    q = abs(a) // abs(b)
    if (a < 0) != (b < 0):
        q = -q
    return q & _M64, (a - q * b) & _M64


def _loop_check(budget: int, code_length: int, max_steps: int, depth: int) -> int:
    """Charge a backward jump: one loop iteration runs at most *code_length* instructions."""
    budget -= code_length
    if budget < 0:
        raise AgentError(f"more than {max_steps} steps (a loop that does not end?)")
    if depth > STACK_LIMIT:
        raise AgentError(f"stack overflow ({depth} values)")
    return budget


def evaluate(
    expr: AgentExpr,
    ctx: EvalContext,
    *,
    max_steps: int = 100_000,
    variables: MutableMapping[int, int] | None = None,
) -> int:
    """Run *expr* against *ctx* and return the value on top of the stack at ``end``.

    :param max_steps: Bound on the instructions executed. Code without backward jumps (all
        GDB compiles) runs each instruction at most once and is not counted; each backward jump
        is charged the code length, an upper bound of one loop iteration, so a loop stops after
        at most *max_steps* + code length instructions. The stack limit is checked there too.
    :param variables: Trace state variables by number, for ``getv``/``setv``; ``setv`` stores
        into it.
    :return: An int in ``[0, 2**64)``; non-zero means the condition holds.
    :raises AgentError: if the code is malformed or cannot be evaluated (memory or register not
        readable, division by zero, floating point, too many steps, stack overflow).
    """
    code = expr.code
    stack: list[int] = []
    push = stack.append
    pop = stack.pop
    register = ctx.register
    read = ctx.read_memory
    mask64 = _M64
    sign64 = _SIGN64
    budget = max_steps
    pc = 0
    # Each branch leaves pc at the instruction's start until nothing more can raise, so an
    # IndexError (stack underflow, code too short) is explained by `_stuck(code, pc)`.
    try:
        while True:
            op = code[pc]
            if op == 0x26:  # reg
                regnum = (code[pc + 1] << 8) | code[pc + 2]
                try:
                    value = register(regnum) & mask64
                except Exception as exc:
                    raise AgentError(f"cannot read register {regnum}: {exc}") from exc
                push(value)
                pc += 3
            elif op == 0x16:  # ext
                bits = code[pc + 1]
                if bits < 64:
                    value = stack[-1] & _MASK[bits]
                    if value & _SIGN[bits]:
                        value |= _HIGH[bits]
                    stack[-1] = value
                else:
                    stack[-1]  # noqa: B018 - an underflow check, as for every other opcode
                pc += 2
            elif op == 0x22:  # const8
                push(code[pc + 1])
                pc += 2
            elif op == 0x13:  # equal
                value = pop()
                stack[-1] = 1 if stack[-1] == value else 0
                pc += 1
            elif op == 0x27:  # end
                if len(stack) > STACK_LIMIT:
                    raise AgentError(f"stack overflow ({len(stack)} values)")
                return stack[-1]
            elif op == 0x2A:  # zero_ext
                bits = code[pc + 1]
                if bits < 64:
                    stack[-1] &= _MASK[bits]
                else:
                    stack[-1]  # noqa: B018
                pc += 2
            elif op == 0x20:  # if_goto
                target = (code[pc + 1] << 8) | code[pc + 2]
                if pop():
                    if target <= pc:
                        budget = _loop_check(budget, len(code), max_steps, len(stack))
                    pc = target
                else:
                    pc += 3
            elif op == 0x21:  # goto
                target = (code[pc + 1] << 8) | code[pc + 2]
                if target <= pc:
                    budget = _loop_check(budget, len(code), max_steps, len(stack))
                pc = target
            elif op == 0x14:  # less_signed
                value = pop() ^ sign64
                stack[-1] = 1 if (stack[-1] ^ sign64) < value else 0
                pc += 1
            elif op == 0x2B:  # swap
                stack[-1], stack[-2] = stack[-2], stack[-1]
                pc += 1
            elif op == 0x0E:  # log_not
                stack[-1] = 0 if stack[-1] else 1
                pc += 1
            elif op == 0x15:  # less_unsigned
                value = pop()
                stack[-1] = 1 if stack[-1] < value else 0
                pc += 1
            elif op == 0x23:  # const16
                push((code[pc + 1] << 8) | code[pc + 2])
                pc += 3
            elif op == 0x24:  # const32
                push(_U32(code, pc + 1)[0])
                pc += 5
            elif op == 0x25:  # const64
                push(_U64(code, pc + 1)[0])
                pc += 9
            elif 0x17 <= op <= 0x1A:  # ref8 ref16 ref32 ref64
                address = stack[-1]
                size = 1 << (op - 0x17)
                try:
                    data = read(address, size)
                except Exception as exc:
                    raise AgentError(
                        f"cannot read {size} bytes at {address:#x}: {exc}", address=address
                    ) from exc
                if len(data) != size:
                    raise AgentError(
                        f"read of {size} bytes at {address:#x} returned {len(data)}",
                        address=address,
                    )
                stack[-1] = int.from_bytes(data, "little")
                pc += 1
            elif op == 0x0F:  # bit_and
                value = pop()
                stack[-1] &= value
                pc += 1
            elif op == 0x10:  # bit_or
                value = pop()
                stack[-1] |= value
                pc += 1
            elif op == 0x11:  # bit_xor
                value = pop()
                stack[-1] ^= value
                pc += 1
            elif op == 0x12:  # bit_not
                stack[-1] ^= mask64
                pc += 1
            elif op == 0x02:  # add
                value = pop()
                stack[-1] = (stack[-1] + value) & mask64
                pc += 1
            elif op == 0x03:  # sub
                value = pop()
                stack[-1] = (stack[-1] - value) & mask64
                pc += 1
            elif op == 0x04:  # mul
                value = pop()
                stack[-1] = (stack[-1] * value) & mask64
                pc += 1
            elif 0x05 <= op <= 0x08:  # div_signed div_unsigned rem_signed rem_unsigned
                value = stack[-1]
                dividend = stack[-2]
                if not value:
                    raise AgentError(f"division by zero at offset {pc}")
                pop()
                if op == 0x05:
                    stack[-1] = _signed_divmod(dividend, value)[0]
                elif op == 0x06:
                    stack[-1] = dividend // value
                elif op == 0x07:
                    stack[-1] = _signed_divmod(dividend, value)[1]
                else:
                    stack[-1] = dividend % value
                pc += 1
            elif op == 0x09:  # lsh
                value = pop()
                stack[-1] = (stack[-1] << (value & 63)) & mask64
                pc += 1
            elif op == 0x0A:  # rsh_signed
                value = pop()
                top = stack[-1]
                if top & sign64:
                    top -= 1 << 64
                stack[-1] = (top >> (value & 63)) & mask64
                pc += 1
            elif op == 0x0B:  # rsh_unsigned
                value = pop()
                stack[-1] >>= value & 63
                pc += 1
            elif op == 0x28:  # dup
                push(stack[-1])
                pc += 1
            elif op == 0x29:  # pop
                pop()
                pc += 1
            elif op == 0x32:  # pick
                push(stack[-1 - code[pc + 1]])
                pc += 2
            elif op == 0x33:  # rot: a b c => c a b
                stack[-3], stack[-2], stack[-1] = stack[-1], stack[-3], stack[-2]
                pc += 1
            elif op == 0x2C or op == 0x2D:  # getv setv
                number = (code[pc + 1] << 8) | code[pc + 2]
                if op == 0x2D:
                    value = stack[-1]
                    if variables is None:
                        raise AgentError(f"setv: trace state variable {number} not available")
                    variables[number] = value
                else:
                    if variables is None or number not in variables:
                        raise AgentError(f"getv: trace state variable {number} not available")
                    push(variables[number] & mask64)
                pc += 3
            elif op == 0x0C or op == 0x2F:  # trace tracenz: pop address and size
                stack[-2]  # noqa: B018
                del stack[-2:]
                pc += 1
            elif op == 0x0D:  # trace_quick
                stack[-1]  # noqa: B018
                code[pc + 1]  # noqa: B018
                pc += 2
            elif op == 0x30:  # trace16
                stack[-1]  # noqa: B018
                code[pc + 2]  # noqa: B018
                pc += 3
            elif op == 0x2E:  # tracev
                code[pc + 2]  # noqa: B018
                pc += 3
            elif op == 0x34:  # printf: nargs, length, format; pops fn, channel and the args
                nargs = code[pc + 1]
                length = _U16(code, pc + 2)[0]
                if length == 0 or code[pc + 3 + length] != 0:
                    raise AgentError(f"printf at offset {pc}: format is not NUL-terminated")
                if len(stack) < nargs + 2:
                    raise IndexError
                del stack[len(stack) - nargs - 2 :]
                pc += 4 + length
            elif op in _FLOAT_OPS:
                raise AgentError(
                    f"floating-point opcode {OPCODES[op].name} at offset {pc} is not supported"
                )
            else:
                raise AgentError(f"unknown opcode {op:#04x} at offset {pc}")
    except (IndexError, struct.error):
        raise _stuck(code, pc) from None


def should_report(
    conditions: Iterable[AgentExpr], ctx: EvalContext, *, max_steps: int = 100_000
) -> bool:
    """Whether a breakpoint hit with these conditions must be reported to GDB.

    True when there is no condition, when one is non-zero, or when one fails to evaluate (GDB
    then evaluates it itself and decides). Conditions are evaluated in order, lazily.
    """
    any_condition = False
    for expr in conditions:
        any_condition = True
        try:
            if evaluate(expr, ctx, max_steps=max_steps):
                return True
        except AgentError as exc:
            log.debug("breakpoint condition failed (%s); reporting the stop to GDB", exc)
            return True
    return not any_condition
