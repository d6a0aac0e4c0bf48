"""Tests for the sans-I/O RSP framing codec."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmigdb.wire.codec import (
    ACK,
    INTERRUPT,
    NACK,
    NEED_DATA,
    Corrupt,
    Decoder,
    Event,
    Notification,
    Packet,
    checksum,
    decode_hex,
    encode_hex,
    encode_packet,
    escape_binary,
    unescape_binary,
)

SMALL_MAX = 16


def frame(raw_payload: bytes, cs: int | None = None, lead: bytes = b"$") -> bytes:
    """A frame around an already-encoded payload, with its real checksum unless `cs` given."""
    value = checksum(raw_payload) if cs is None else cs
    return b"%b%b#%02x" % (lead, raw_payload, value)


def decode_whole(stream: bytes, max_packet: int = SMALL_MAX) -> list[Event]:
    dec = Decoder(max_packet)
    dec.feed(stream)
    return dec.events()


def decode_split(stream: bytes, cuts: list[int], max_packet: int = SMALL_MAX) -> list[Event]:
    dec = Decoder(max_packet)
    out: list[Event] = []
    prev = 0
    for cut in [*sorted(cuts), len(stream)]:
        dec.feed(stream[prev:cut])
        out += dec.events()
        prev = cut
    return out


def bad_cs(payload: bytes) -> bytes:
    return frame(payload, (checksum(payload) + 1) & 0xFF)


# (id, stream, expected events); decoded with max_packet=SMALL_MAX.
CASES: list[tuple[str, bytes, list[Event]]] = [
    ("empty", b"", []),
    ("ack-nack-interrupt", b"+-\x03", [ACK, NACK, INTERRUPT]),
    ("simple", b"$g#67", [Packet(b"g")]),
    ("empty payload", b"$#00", [Packet(b"")]),
    ("uppercase checksum", b"$qC#B4", [Packet(b"qC")]),
    ("notification", frame(b"Stop:T05", lead=b"%"), [Notification(b"Stop:T05")]),
    ("ack then packet", b"+" + frame(b"OK") + b"+", [ACK, Packet(b"OK"), ACK]),
    (
        "junk skipped",
        b"xyz\r\n" + frame(b"m0,4") + b"#\xff" + frame(b"c"),
        [
            Packet(b"m0,4"),
            Packet(b"c"),
        ],
    ),
    ("ctrl-c inside payload", frame(b"X0,1:\x03"), [Packet(b"X0,1:\x03")]),
    ("plus minus percent inside", frame(b"a+b-c%"), [Packet(b"a+b-c%")]),
    ("rle", frame(b'a*"'), [Packet(b"aaaaaa")]),
    ("rle zeros", frame(b"0* 1*!"), [Packet(b"0000" + b"11111")]),
    ("rle max count", frame(b"x*~"), [Packet(b"x" * 98)]),
    ("rle of star count", frame(b"a**"), [Packet(b"a" * 14)]),
    ("rle chained", frame(b"ab* * "), [Packet(b"a" + b"b" * 7)]),
    ("rle leading star", frame(b"*!ab"), [Corrupt("bad run-length encoding", frame(b"*!ab"))]),
    (
        "rle no count",
        frame(b"ab*") + frame(b"k"),
        [
            Corrupt("bad run-length encoding", frame(b"ab*")),
            Packet(b"k"),
        ],
    ),
    (
        "rle count too small",
        frame(b"a*\x1f"),
        [
            Corrupt("bad run-length encoding", frame(b"a*\x1f")),
        ],
    ),
    (
        "bad checksum then good",
        bad_cs(b"g") + frame(b"g"),
        [
            Corrupt("bad checksum", bad_cs(b"g")),
            Packet(b"g"),
        ],
    ),
    (
        "bad checksum digits",
        b"$g#zz" + frame(b"s"),
        [
            Corrupt("bad checksum digits", b"$g#zz"),
            Packet(b"s"),
        ],
    ),
    (
        "signed checksum digits",
        b"$g#+7" + frame(b"s"),
        [
            Corrupt("bad checksum digits", b"$g#+7"),
            Packet(b"s"),
        ],
    ),
    (
        "dollar in checksum resyncs",
        b"$g#" + frame(b"s"),
        [
            Corrupt("bad checksum digits", b"$g#"),
            Packet(b"s"),
        ],
    ),
    ("restart", b"$m10" + frame(b"g"), [Corrupt("restarted", b"$m10"), Packet(b"g")]),
    (
        "restart notification",
        b"%Stop" + frame(b"vStopped"),
        [
            Corrupt("restarted", b"%Stop"),
            Packet(b"vStopped"),
        ],
    ),
    ("max size ok", frame(b"x" * SMALL_MAX), [Packet(b"x" * SMALL_MAX)]),
    (
        "oversized then resync",
        frame(b"y" * (SMALL_MAX + 1)) + b"-" + frame(b"g"),
        [
            Corrupt("oversized", b"$" + b"y" * (SMALL_MAX + 1)),
            NACK,
            Packet(b"g"),
        ],
    ),
    (
        "oversized cut by dollar",
        b"$" + b"y" * 40 + frame(b"g"),
        [
            Corrupt("oversized", b"$" + b"y" * (SMALL_MAX + 1)),
            Packet(b"g"),
        ],
    ),
    (
        "oversized checked before rle",
        frame(b"a*~" * 6),
        [
            Corrupt("oversized", frame(b"a*~" * 6)[: SMALL_MAX + 2]),
        ],
    ),
    ("rle may expand past max", frame(b"a*~"), [Packet(b"a" * 98)]),
    ("hash outside frame is junk", b"#00" + frame(b"?"), [Packet(b"?")]),
    ("incomplete frame waits", b"$g#6", []),
    ("incomplete payload waits", b"+$m0,", [ACK]),
]


@pytest.mark.parametrize(("stream", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_table_whole(stream: bytes, expected: list[Event]) -> None:
    assert decode_whole(stream) == expected


@pytest.mark.parametrize(("stream", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_table_byte_at_a_time(stream: bytes, expected: list[Event]) -> None:
    assert decode_split(stream, list(range(len(stream)))) == expected


@given(st.data())
def test_table_random_splits(data: st.DataObject) -> None:
    _, stream, expected = data.draw(st.sampled_from(CASES))
    cuts = data.draw(st.lists(st.integers(0, len(stream))))
    assert decode_split(stream, cuts) == expected


def test_next_event_and_need_data() -> None:
    dec = Decoder()
    assert dec.next_event() is NEED_DATA
    dec.feed(b"$OK#9")
    assert dec.next_event() is NEED_DATA
    dec.feed(b"a+")
    assert dec.next_event() == Packet(b"OK")
    assert dec.next_event() is ACK
    assert dec.next_event() is NEED_DATA
    assert dec.buffered == 0


def test_check_checksums_off_accepts_wrong_sum_but_not_junk_digits() -> None:
    dec = Decoder(check_checksums=False)
    dec.feed(b"$g#00$g#zz")
    assert dec.events() == [Packet(b"g"), Corrupt("bad checksum digits", b"$g#zz")]


def test_default_max_packet_fits_large_register_reply() -> None:
    payload = b"ab" * 0x20000
    dec = Decoder()
    dec.feed(encode_packet(payload))
    assert dec.events() == [Packet(payload)]


def test_oversized_reported_before_frame_end_arrives() -> None:
    """A peer streaming garbage must not make the decoder buffer without bound."""
    dec = Decoder(max_packet=100)
    dec.feed(b"$" + b"z" * 1000)
    [event] = dec.events()
    assert isinstance(event, Corrupt) and event.reason == "oversized"
    assert len(event.raw) <= 64
    dec.feed(b"z" * 1000 + b"#00+")
    assert dec.events() == [ACK]
    assert dec.buffered == 0


def test_rle_checksum_is_over_raw_bytes() -> None:
    raw = b'a*"'
    stream = b"$%b#%02x" % (raw, sum(raw) & 0xFF)
    assert decode_whole(stream) == [Packet(b"aaaaaa")]
    expanded_sum = b"$%b#%02x" % (raw, sum(b"aaaaaa") & 0xFF)
    assert decode_whole(expanded_sum)[0] == Corrupt("bad checksum", expanded_sum)


def test_checksum_and_encode_packet() -> None:
    assert checksum(b"") == 0
    assert checksum(b"\xff\x02") == 1
    assert encode_packet(b"g") == b"$g#67"
    assert encode_packet(b"OK") == b"$OK#9a"
    assert encode_packet(b"") == b"$#00"


# Payload bytes a sender may put in a frame unescaped.
plain_payloads = st.binary(max_size=300).map(lambda b: b.translate(None, b"$#}*"))


@given(plain_payloads)
def test_encode_decode_round_trip(payload: bytes) -> None:
    assert decode_whole(encode_packet(payload), max_packet=4096) == [Packet(payload)]


@given(st.binary(max_size=300), st.lists(st.integers(0, 700)))
def test_binary_round_trip_through_frame(data: bytes, cuts: list[int]) -> None:
    stream = encode_packet(escape_binary(data)) * 2
    events = decode_split(stream, [c for c in cuts if c <= len(stream)], max_packet=4096)
    assert [unescape_binary(e.data) for e in events if isinstance(e, Packet)] == [data, data]


@given(st.binary())
def test_escape_round_trip(data: bytes) -> None:
    escaped = escape_binary(data)
    assert not set(escaped) & set(b"$#*")
    assert unescape_binary(escaped) == data


def test_escape_examples() -> None:
    assert escape_binary(b"a#b$c}d*") == b"a}\x03b}\x04c}]d}\x0a"
    assert unescape_binary(b"}]}}x") == b"}]x"
    assert unescape_binary(bytearray(b"plain")) == b"plain"


@pytest.mark.parametrize("bad", [b"}", b"abc}", b"}]}"])
def test_unescape_lone_trailing_escape_raises(bad: bytes) -> None:
    with pytest.raises(ValueError):
        unescape_binary(bad)


@given(st.binary())
def test_hex_round_trip(data: bytes) -> None:
    text = encode_hex(data)
    assert text == data.hex().encode()
    assert decode_hex(text) == data
    assert decode_hex(text.upper()) == data


@pytest.mark.parametrize("bad", [b"0", b"abc", b"0 ", b" 00", b"00 11", b"0g", b"+1", b"xx"])
def test_decode_hex_strict(bad: bytes) -> None:
    with pytest.raises(ValueError):
        decode_hex(bad)


# Streams built from protocol fragments hit interesting paths far more often than plain noise.
fragments = st.one_of(
    st.binary(max_size=8),
    st.sampled_from([b"$", b"%", b"#", b"*", b"}", b"+", b"-", b"\x03", b"#00", b"*!", b"*~"]),
    plain_payloads.map(encode_packet),
    st.binary(min_size=20, max_size=40).map(encode_packet),
)
streams = st.lists(fragments, max_size=30).map(b"".join)


@given(streams, st.lists(st.integers(0, 2000)))
def test_arbitrary_streams_never_raise_and_split_does_not_matter(
    stream: bytes, cuts: list[int]
) -> None:
    dec = Decoder(SMALL_MAX)
    events: list[Event] = []
    prev = 0
    for cut in [*sorted(c for c in cuts if c <= len(stream)), len(stream)]:
        dec.feed(stream[prev:cut])
        events += dec.events()
        assert dec.buffered <= SMALL_MAX + 3
        prev = cut
    assert events == decode_whole(stream)
    assert events == decode_split(stream, list(range(len(stream))))


@given(st.binary(max_size=4000), st.integers(1, 64))
def test_random_noise_stays_bounded(noise: bytes, max_packet: int) -> None:
    dec = Decoder(max_packet)
    for i in range(0, len(noise), 97):
        dec.feed(noise[i : i + 97])
        for event in dec.events():
            assert isinstance(event, Packet | Notification | Corrupt) or event in (
                ACK,
                NACK,
                INTERRUPT,
            )
        assert dec.buffered <= max_packet + 3
