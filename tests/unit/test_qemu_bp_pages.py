"""Markers that make QEMU translate a plugin breakpoint's page one instruction per block."""

from __future__ import annotations

from vmigdb.hv.qemu.bp_pages import PageMarkers, marker_in

# push %rbp; mov %rsp,%rbp; lea 0x1(%rdi),%rax; ret
CODE = bytes.fromhex("55" "4889e5" "488d4701" "c3")


def test_the_marker_is_inside_the_first_instruction_of_two_bytes_or_more() -> None:
    assert marker_in(CODE, 0x401000) == 0x401002  # not 0x401001: `mov` starts there
    assert marker_in(CODE[4:], 0x401004) == 0x401005


def test_no_marker_where_only_one_byte_instructions_remain_on_the_page() -> None:
    assert marker_in(bytes.fromhex("5590c3"), 0x401000) is None
    # The first long instruction starts on the next page: its second byte is no use.
    assert marker_in(bytes.fromhex("90" "4889e5"), 0x401FFF) is None


def test_a_page_keeps_its_marker_while_one_breakpoint_needs_it() -> None:
    markers = PageMarkers()
    assert markers.needs(0x401000)
    markers.add(0x401000, 0x401002)
    assert not markers.needs(0x401010)
    markers.add(0x401010, None)
    assert markers.is_marker(0x401002) and not markers.is_marker(0x401000)
    assert markers.remove(0x401000) is None  # 0x401010 still needs it
    assert markers.remove(0x401010) == 0x401002
    assert list(markers.markers()) == []


def test_a_marker_the_guest_ran_into_is_never_put_back_on_its_page() -> None:
    markers = PageMarkers()
    markers.add(0x401000, 0x401002)
    markers.drop(0x401002)
    assert not markers.needs(0x401000) and not markers.is_marker(0x401002)
    assert markers.remove(0x401000) is None
