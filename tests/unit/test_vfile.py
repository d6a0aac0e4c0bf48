"""vFile host I/O serves only the files the debugger offers, with GDB's fileio replies."""

from __future__ import annotations

import struct

from vmigdb.rsp.vfile import VFileServer
from vmigdb.wire import codec

ELF = bytes(range(256)) * 40  # has '#', '$', '}' and '*' bytes: pread data must be escaped


def server() -> VFileServer:
    return VFileServer({"/vmigdb/vmlinux-test": ELF}.get)


def hexname(name: str) -> bytes:
    return codec.encode_hex(name.encode())


def test_open_pread_fstat_close_round_trip() -> None:
    vf = server()
    assert vf.handle(b"setfs:0") == b"F0"
    fd_reply = vf.handle(b"open:" + hexname("/vmigdb/vmlinux-test") + b",0,0")
    assert fd_reply.startswith(b"F") and not fd_reply.startswith(b"F-")
    fd = fd_reply[1:]
    data = b""
    while True:
        reply = vf.handle(b"pread:%s,1000,%x" % (fd, len(data)))
        count, _, body = reply[1:].partition(b";")
        chunk = codec.unescape_binary(body)
        assert len(chunk) == int(count, 16)
        if not chunk:
            break
        data += chunk
    assert data == ELF
    stat = vf.handle(b"fstat:" + fd)
    size, _, body = stat[1:].partition(b";")
    raw = codec.unescape_binary(body)
    assert int(size, 16) == len(raw) == 64
    assert struct.unpack(">Q", raw[28:36])[0] == len(ELF)  # st_size, big-endian, GDB's layout
    assert struct.unpack(">I", raw[8:12])[0] & 0o170000 == 0o100000  # a regular file
    assert vf.handle(b"close:" + fd) == b"F0"
    assert vf.handle(b"close:" + fd) == b"F-1,9"  # EBADF


def test_nothing_else_on_the_host_is_reachable() -> None:
    vf = server()
    assert vf.handle(b"open:" + hexname("/etc/passwd") + b",0,0") == b"F-1,2"  # ENOENT
    assert vf.handle(b"open:" + hexname("/vmigdb/vmlinux-test") + b",1,0") == b"F-1,1e"  # EROFS
    assert vf.handle(b"pwrite:3,0,abc") == b"F-1,1e"
    assert vf.handle(b"unlink:" + hexname("/vmigdb/vmlinux-test")) == b"F-1,1e"


def test_malformed_requests_get_einval() -> None:
    vf = server()
    assert vf.handle(b"open:zz,0,0") == b"F-1,16"
    assert vf.handle(b"pread:3,-1,0") == b"F-1,16"
    assert vf.handle(b"pread:3") == b"F-1,16"
    assert vf.handle(b"fstat:") == b"F-1,16"
