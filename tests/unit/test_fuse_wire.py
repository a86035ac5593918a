"""The FUSE protocol module: parsing what the kernel writes to /dev/fuse, and INIT.

The kernel is trusted, but the parser is the first code every request meets (and a native pump
may take its place later), so it is held to the same rule as the parsers of a peer's input:
any bytes give a Request or a Rejected, never an exception, and a Request is whole and within
the negotiated limits. The fuzz test runs ``HYPER_FUZZ_EXAMPLES`` cases when set.
"""

from __future__ import annotations

import errno
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domu.blkfront import fuse_wire as F


def message(opcode: int, args: bytes = b"", data: bytes = b"", unique: int = 7) -> bytes:
    size = F.IN_HEADER.size + len(args) + len(data)
    return F.IN_HEADER.pack(size, opcode, unique, F.FUSE_ROOT_ID, 0, 0, 1, 0, 0) + args + data


def read_in(offset: int, size: int) -> bytes:
    return F.READ_IN.pack(3, offset, size, 0, 0, os.O_RDONLY, 0)


def write_in(offset: int, size: int, flags: int = os.O_WRONLY) -> bytes:
    return F.WRITE_IN.pack(3, offset, size, 0, 0, flags, 0)


def test_a_read_and_a_write_parse_into_their_fields() -> None:
    assert F.parse(message(F.FUSE_READ, read_in(8192, 4096))) == F.Request(
        F.FUSE_READ, 7, F.FUSE_ROOT_ID, F.Read(3, 8192, 4096, os.O_RDONLY)
    )
    whole = message(F.FUSE_WRITE, write_in(512, 1024, os.O_DSYNC), bytes(1024))
    expected = F.Request(F.FUSE_WRITE, 7, F.FUSE_ROOT_ID, F.Write(3, 512, 1024, 0, os.O_DSYNC))
    assert F.parse(whole) == expected
    assert F.parse(whole[: F.HEAD_ROOM], len(whole)) == expected, "the data need not be there"


def test_an_opcode_without_a_parser_is_a_request_without_arguments() -> None:
    assert F.parse(message(F.FUSE_STATFS)) == F.Request(F.FUSE_STATFS, 7, F.FUSE_ROOT_ID, None)
    mkdir = F.parse(message(9, b"\x00" * 8))
    assert isinstance(mkdir, F.Request) and mkdir.args is None  # the server answers ENOSYS


def test_messages_that_are_not_whole_are_rejected_by_what_they_lack() -> None:
    short = F.parse(b"\x00" * 39)
    assert isinstance(short, F.Rejected) and short.unique is None, "no header: nobody to answer"
    lying = message(F.FUSE_READ, read_in(0, 4096))
    rejected = F.parse(lying, len(lying) + 8)
    assert isinstance(rejected, F.Rejected) and rejected.errno == errno.EIO
    cut = F.parse(message(F.FUSE_READ, read_in(0, 4096)[:20]))
    assert isinstance(cut, F.Rejected) and (cut.unique, cut.errno) == (7, errno.EINVAL)
    short_write = F.parse(message(F.FUSE_WRITE, write_in(0, 4096), bytes(4000)))
    assert isinstance(short_write, F.Rejected) and "carries 4000" in short_write.reason
    big = F.parse(message(F.FUSE_READ, read_in(0, F.MAX_READ + 4096)))
    assert isinstance(big, F.Rejected) and big.errno == errno.EINVAL
    smaller = F.parse(message(F.FUSE_READ, read_in(0, 8192)), max_read=4096)
    assert isinstance(smaller, F.Rejected), "the limit INIT set"


def init(major: int = 7, minor: int = 38, flags: int = (1 << 32) - 1) -> F.Init:
    parsed = F.parse(message(F.FUSE_INIT, F.INIT_IN.pack(major, minor, 65536, flags)))
    assert isinstance(parsed, F.Request) and isinstance(parsed.args, F.Init)
    return parsed.args


def test_init_wants_no_splice_no_cache_and_1_mib_requests() -> None:
    outcome = F.negotiate(init())
    assert outcome.done and outcome.payload is not None and outcome.max_pages == 256
    major, minor, readahead, flags, background, congestion, max_write, gran, pages, _, _ = (
        F.INIT_OUT.unpack(outcome.payload)
    )
    assert (major, minor, readahead) == (7, F.FUSE_KERNEL_MINOR_VERSION, 65536)
    assert flags == F.FUSE_ASYNC_READ | F.FUSE_BIG_WRITES | F.FUSE_ASYNC_DIO | F.FUSE_MAX_PAGES
    assert not flags & (F.FUSE_SPLICE_READ | F.FUSE_SPLICE_WRITE | F.FUSE_WRITEBACK_CACHE)
    assert not flags & F.FUSE_ATOMIC_O_TRUNC, "a truncation must reach us, to be ignored"
    assert (max_write, pages, background, congestion, gran) == (1 << 20, 256, 64, 48, 1)


def test_init_with_older_and_other_kernels() -> None:
    without_max_pages = F.negotiate(init(flags=F.FUSE_ASYNC_READ | F.FUSE_ASYNC_DIO))
    assert without_max_pages.max_pages == F.DEFAULT_MAX_PAGES
    assert without_max_pages.payload is not None
    assert F.INIT_OUT.unpack(without_max_pages.payload)[6] == F.DEFAULT_MAX_PAGES * 4096
    old = F.negotiate(init(minor=22, flags=0))
    assert old.payload is not None and len(old.payload) == F.FUSE_COMPAT_22_INIT_OUT_SIZE
    newer = F.negotiate(init(major=8))
    assert not newer.done and newer.payload is not None, "answer 7.x, wait for INIT again"
    assert F.INIT_OUT.unpack(newer.payload)[:2] == (7, F.FUSE_KERNEL_MINOR_VERSION)
    ancient = F.negotiate(init(major=6))
    assert ancient.payload is None and ancient.error == errno.EPROTO


# -- fuzzing -------------------------------------------------------------------------------------

_FIXED = {
    F.FUSE_INIT: F.INIT_IN.size,
    F.FUSE_GETATTR: F.GETATTR_IN.size,
    F.FUSE_SETATTR: F.SETATTR_IN.size,
    F.FUSE_OPEN: F.OPEN_IN.size,
    F.FUSE_READ: F.READ_IN.size,
    F.FUSE_WRITE: F.WRITE_IN.size,
    F.FUSE_RELEASE: F.RELEASE_IN.size,
    F.FUSE_FLUSH: F.FLUSH_IN.size,
    F.FUSE_FSYNC: F.FSYNC_IN.size,
    F.FUSE_FALLOCATE: F.FALLOCATE_IN.size,
    F.FUSE_INTERRUPT: F.INTERRUPT_IN.size,
}


def _well_formed(opcode: int, body: bytes, extlen: int) -> bytes:
    size = F.IN_HEADER.size + len(body) + extlen * 8
    header = F.IN_HEADER.pack(size, opcode, 9, 1, 0, 0, 0, extlen, 0)
    return header + body + bytes(extlen * 8)


_opcodes = st.one_of(st.sampled_from(sorted(_FIXED)), st.integers(0, 2**32 - 1))
_messages = st.one_of(
    st.binary(max_size=256),
    st.builds(_well_formed, _opcodes, st.binary(max_size=256), st.integers(0, 4)),
)


@settings(
    max_examples=int(os.environ.get("HYPER_FUZZ_EXAMPLES", 2000)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(_messages, st.integers(-2, 2), st.integers(4096, F.MAX_READ))
def test_any_bytes_parse_into_a_whole_request_or_a_rejection(
    raw: bytes, skew: int, max_read: int
) -> None:
    length = max(0, len(raw) + skew)
    parsed = F.parse(raw, length, max_read=max_read)
    if isinstance(parsed, F.Rejected):
        assert parsed.errno in (errno.EIO, errno.EINVAL)
        assert (parsed.unique is None) == (min(length, len(raw)) < F.IN_HEADER.size)
        return
    size, opcode, unique, _, _, _, _, extlen, _ = F.IN_HEADER.unpack_from(raw)
    assert (parsed.opcode, parsed.unique) == (opcode, unique) and size == length
    if opcode not in _FIXED:
        assert parsed.args is None
        return
    assert len(raw) >= F.IN_HEADER.size + _FIXED[opcode], "its arguments were all there"
    body = length - F.IN_HEADER.size - extlen * 8
    if isinstance(parsed.args, F.Write):
        assert parsed.args.size == body - F.WRITE_IN.size, "its data is all there"
    if isinstance(parsed.args, F.Read):
        assert parsed.args.size <= max_read
