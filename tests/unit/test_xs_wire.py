"""The store wire format: numbers, header layout, framing limits, payload strings, permissions."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from channels.errors import ProtocolViolation
from channels.xs_wire import (
    HEADER_SIZE,
    XENSTORE_PAYLOAD_MAX,
    XSD_ERRORS,
    Decoder,
    Message,
    Perm,
    XsErrno,
    XsType,
    encode,
    join_strings,
    split_strings,
)

XEN_TYPES = {
    "CONTROL": 0, "DIRECTORY": 1, "READ": 2, "GET_PERMS": 3, "WATCH": 4, "UNWATCH": 5,
    "TRANSACTION_START": 6, "TRANSACTION_END": 7, "INTRODUCE": 8, "RELEASE": 9,
    "GET_DOMAIN_PATH": 10, "WRITE": 11, "MKDIR": 12, "RM": 13, "SET_PERMS": 14,
    "WATCH_EVENT": 15, "ERROR": 16, "IS_DOMAIN_INTRODUCED": 17, "RESUME": 18, "SET_TARGET": 19,
    "RESTRICT": 20, "RESET_WATCHES": 21, "DIRECTORY_PART": 22, "GET_FEATURE": 23,
    "SET_FEATURE": 24, "GET_QUOTA": 25, "SET_QUOTA": 26,
}  # fmt: skip


def test_message_types_have_xens_names_and_numbers() -> None:
    assert {t.name: t.value for t in XsType} == XEN_TYPES


def test_error_names_are_xens_table_in_order() -> None:
    assert XSD_ERRORS == (
        "EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
        "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM",
    )  # fmt: skip
    assert XsErrno.EAGAIN.errno == 11


def test_header_is_four_little_endian_u32s_then_the_payload() -> None:
    data = encode(XsType.READ, b"/a\0", req_id=7, tx_id=3)

    assert HEADER_SIZE == 16
    assert data == struct.pack("<IIII", 2, 7, 3, 3) + b"/a\0"


def test_encode_allows_exactly_the_maximum_payload() -> None:
    encode(XsType.WRITE, b"x" * XENSTORE_PAYLOAD_MAX)
    with pytest.raises(ValueError, match="4097 bytes"):
        encode(XsType.WRITE, b"x" * (XENSTORE_PAYLOAD_MAX + 1))


def test_decoder_returns_every_complete_message_and_keeps_the_rest() -> None:
    first = encode(XsType.READ, b"/a\0", req_id=1)
    second = encode(XsType.WRITE, b"/b\0v", req_id=2, tx_id=9)
    decoder = Decoder()

    done = decoder.feed(first + second[:5])
    rest = decoder.feed(second[5:])

    assert done == [Message(XsType.READ, 1, 0, b"/a\0")]
    assert rest == [Message(XsType.WRITE, 2, 9, b"/b\0v")]
    assert decoder.buffered == 0


def test_decoder_accepts_one_byte_at_a_time() -> None:
    data = encode(XsType.DIRECTORY, b"/local\0", req_id=5)
    decoder = Decoder()

    messages = [m for b in data for m in decoder.feed(bytes([b]))]

    assert messages == [Message(XsType.DIRECTORY, 5, 0, b"/local\0")]


def test_a_payload_over_4096_is_a_protocol_violation_that_sticks() -> None:
    decoder = Decoder()
    with pytest.raises(ProtocolViolation, match="4097"):
        decoder.feed(struct.pack("<IIII", 2, 1, 0, XENSTORE_PAYLOAD_MAX + 1))
    with pytest.raises(ProtocolViolation):
        decoder.feed(encode(XsType.READ, b"/\0"))


def test_an_unknown_type_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation, match="unknown type 99"):
        Decoder().feed(struct.pack("<IIII", 99, 1, 0, 0))


@given(
    st.lists(
        st.tuples(
            st.sampled_from(list(XsType)),
            st.integers(0, 2**32 - 1),
            st.integers(0, 2**32 - 1),
            st.binary(max_size=300),
        ),
        max_size=8,
    ),
    st.lists(st.integers(1, 64), min_size=1, max_size=20),
)
def test_any_chunking_decodes_the_same_messages(
    specs: list[tuple[XsType, int, int, bytes]], cuts: list[int]
) -> None:
    messages = [Message(t, r, x, p) for t, r, x, p in specs]
    stream = b"".join(m.encode() for m in messages)
    decoder = Decoder()
    decoded: list[Message] = []
    pos = 0
    for cut in cuts * (len(stream) // sum(cuts) + 1):
        decoded += decoder.feed(stream[pos : pos + cut])
        pos += cut
    decoded += decoder.feed(stream[pos:])

    assert decoded == messages


def test_strings_are_nul_terminated_and_split_back() -> None:
    assert join_strings("/a", "token") == b"/a\0token\0"
    assert split_strings(b"/a\0token\0") == ["/a", "token"]
    assert split_strings(b"") == []
    assert split_strings(b"OK") == ["OK"]


@given(st.lists(st.binary().filter(lambda b: b"\0" not in b), min_size=1, max_size=5))
def test_strings_round_trip_any_bytes_without_raising(parts: list[bytes]) -> None:
    payload = b"".join(p + b"\0" for p in parts)

    assert join_strings(*split_strings(payload)) == payload


def test_perm_encodes_and_parses_the_wire_form() -> None:
    assert Perm(5, "r").encode() == "r5"
    assert Perm.parse("b0") == Perm(0, "b")
    assert [Perm.parse(p) for p in ("n1", "w32751")] == [Perm(1, "n"), Perm(32751, "w")]


@pytest.mark.parametrize(
    "text", ["", "r", "x1", "r-1", "r1a", "r32752", "r\uff11", "rr1", "r1234567"]
)
def test_perm_rejects_malformed_wire_forms(text: str) -> None:
    with pytest.raises(ValueError):
        Perm.parse(text)


def test_perm_rejects_bad_letters_and_reserved_domids() -> None:
    with pytest.raises(ValueError):
        Perm(1, "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Perm(0x7FF0, "r")
    assert Perm(1, "b").can_read and Perm(1, "b").can_write
    assert not Perm(1, "w").can_read and not Perm(1, "r").can_write
