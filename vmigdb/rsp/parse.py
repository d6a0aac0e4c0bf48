"""Packet arguments, parsed and validated: every failure is a `PacketError` (E16).

A `ValueError` from deeper down is not a malformed packet but a bug; so the codec's errors are
caught here, where a packet's text is decoded, and nowhere else.
"""

from __future__ import annotations

from vmigdb.debugger.model import Action, RangeStep
from vmigdb.hv.base import BreakpointType
from vmigdb.rsp.agent import AgentError, AgentExpr, parse_conditions
from vmigdb.rsp.errors import PacketError
from vmigdb.wire import codec


def hex_number(text: bytes) -> int:
    """1-16 hex digits, as RSP writes numbers."""
    try:
        return codec.parse_hex_number(text)
    except ValueError as exc:
        raise PacketError(str(exc)) from None


def addr_len(text: bytes) -> tuple[int, int]:
    """`ADDR,LENGTH`."""
    addr, sep, length = text.partition(b",")
    if not sep:
        raise PacketError("expected ADDR,LENGTH")
    return hex_number(addr), hex_number(length)


def thread_id(text: bytes) -> int:
    """GDB thread ids: -1 all, 0 any, N; the multiprocess form pP.T is accepted too."""
    if text.startswith(b"p"):
        _, _, text = text[1:].partition(b".")
        if not text:
            return -1
    if text == b"-1":
        return -1
    return hex_number(text)


def hex_data(text: bytes) -> bytes:
    """Bytes written as hex digits, two per byte."""
    try:
        return codec.decode_hex(text)
    except ValueError as exc:
        raise PacketError(str(exc)) from None


def binary_data(text: bytes) -> bytes:
    """Bytes written with `}` escapes (X packets)."""
    try:
        return codec.unescape_binary(text)
    except ValueError as exc:
        raise PacketError(str(exc)) from None


def breakpoint_args(args: bytes) -> tuple[BreakpointType, int, int, tuple[AgentExpr, ...]]:
    """Z/z arguments `TYPE,ADDR,KIND[;X...]`: Z0/Z1 may carry target-side conditions, validated
    here (GDB's agent bytecode, evaluated by vmigdb when the breakpoint is hit)."""
    head, sep_cond, rest = args.partition(b";")
    kind, sep, span = head.partition(b",")
    if not sep or len(kind) != 1 or kind not in b"01234":
        raise PacketError(f"bad breakpoint type {kind!r}")
    addr, length = addr_len(span)
    if addr >= 1 << 64 or not 0 < length <= 16:
        raise PacketError("bad breakpoint address or kind")
    type = BreakpointType(int(kind))
    if not sep_cond:
        return type, addr, length, ()
    if type.is_watchpoint:
        raise PacketError("conditions are for breakpoints")
    try:
        exprs = parse_conditions(rest)
    except (ValueError, AgentError) as exc:
        raise PacketError(f"bad condition: {exc}") from None
    for expr in exprs:
        try:
            expr.validate()
        except AgentError as exc:
            raise PacketError(f"bad condition bytecode: {exc}") from None
    return type, addr, length, exprs


def v_cont_actions(args: bytes, cpus: list[int]) -> dict[int, Action]:
    """What follows `vCont;`: the action of each vCPU that runs (`t` ones stay stopped)."""
    actions: dict[int, Action] = {}
    default: Action | None = None
    for item in args.split(b";"):
        verb, _, tid = item.partition(b":")
        action = _v_cont_action(verb)
        if tid:
            cpu = thread_id(tid)
            if cpu != -1 and cpu not in cpus:
                raise PacketError(f"no thread {cpu}")
            for target in cpus if cpu == -1 else [cpu]:
                actions.setdefault(target, action)  # the leftmost action applies
        elif default is None:
            default = action
    if (
        isinstance(default, RangeStep)
        or sum(isinstance(a, RangeStep) for a in actions.values()) > 1
    ):
        raise PacketError("a range step is for one thread, named")
    if default is not None:
        for cpu in cpus:
            actions.setdefault(cpu, default)
    runnable = {cpu: act for cpu, act in actions.items() if act != "t"}
    if not runnable:
        raise PacketError("vCont with nothing to run")
    return runnable


def _v_cont_action(verb: bytes) -> Action:
    """c, s, t, CSIG, SSIG (a signal means nothing to a whole VM: checked, ignored), rSTART,END."""
    if verb in (b"c", b"s", b"t"):
        return verb.decode()
    if verb[:1] in (b"C", b"S") and len(verb) > 1:
        hex_number(verb[1:])
        return verb[:1].lower().decode()
    if verb[:1] == b"r":
        start, end = addr_len(verb[1:])
        if end <= start:
            raise PacketError("empty range")
        return RangeStep(start, end)
    raise PacketError(f"unsupported vCont action {verb!r}")


def legacy_resume_args(args: bytes, with_signal: bool) -> None:
    """`c`/`s` take only an address (deprecated, never sent by GDB: refused); `C`/`S` a signal."""
    if not with_signal:
        if args:
            raise PacketError("c/s with an address is not supported")
        return
    sig, _, addr = args.partition(b";")
    hex_number(sig)  # a signal number: meaningless for a whole VM, checked and ignored
    if addr:
        raise PacketError("C/S with an address is not supported")
