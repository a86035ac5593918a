"""9pfs on the wire: the interface page against Xen's own header, the flex ring's arithmetic and
its hostile indices, and the 9P2000.L codec (round trips, and lengths a peer lies about)."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from channels import p9fs as P
from channels.errors import ProtocolViolation
from channels.ring import MASK32, PAGE_SIZE
from tests.unit.test_xen_headers import xen_headers_or_skip

C_PROGRAM = r"""
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/io/ring.h>
#include <xen/io/9pfs.h>
#define F(field) printf(#field " %zu %zu\n", offsetof(struct xen_9pfs_data_intf, field), \
                        sizeof(((struct xen_9pfs_data_intf *)0)->field))
int main(void) {
    F(in_cons); F(in_prod); F(out_cons); F(out_prod); F(ring_order);
    printf("ref %zu %zu\n", offsetof(struct xen_9pfs_data_intf, ref), sizeof(grant_ref_t));
    printf("sizeof %zu 0\n", sizeof(struct xen_9pfs_data_intf));
    for (int order = 0; order <= 9; order++)
        printf("flex%d %lu 0\n", order, (unsigned long)XEN_FLEX_RING_SIZE(order));
    return 0;
}
"""


def test_the_interface_page_matches_xens_header(tmp_path: Path) -> None:
    xen_headers_or_skip()
    source, binary = tmp_path / "layout.c", tmp_path / "layout"
    source.write_text(C_PROGRAM)
    subprocess.run(["cc", "-o", str(binary), str(source)], check=True, capture_output=True)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    c = {name: (int(a), int(b)) for name, a, b in (line.split() for line in out.splitlines())}
    assert c["in_cons"] == (P.IN_CONS_OFFSET, 4)
    assert c["in_prod"] == (P.IN_PROD_OFFSET, 4)
    assert c["out_cons"] == (P.OUT_CONS_OFFSET, 4)
    assert c["out_prod"] == (P.OUT_PROD_OFFSET, 4)
    assert c["ring_order"] == (P.RING_ORDER_OFFSET, 4)
    assert c["ref"] == (P.REF_OFFSET, 4)
    assert c["sizeof"][0] == P.REF_OFFSET  # ref[] is a flexible array
    for order in range(10):
        assert c[f"flex{order}"][0] == P.xen_flex_ring_size(order)


# -- the interface page and the flex rings --------------------------------------------------------


def make_ring(order: int = 1) -> tuple[P.DataIntf, list[memoryview]]:
    intf = P.DataIntf.init(memoryview(bytearray(PAGE_SIZE)), order, list(range(1 << order)))
    return intf, [memoryview(bytearray(PAGE_SIZE)) for _ in range(1 << order)]


def test_the_frontend_writes_order_and_refs_and_the_backend_reads_them_once() -> None:
    intf = P.DataIntf.init(memoryview(bytearray(PAGE_SIZE)), 3, [100 + i for i in range(8)])
    assert intf.read_layout(max_order=6) == (3, tuple(range(100, 108)))
    with pytest.raises(ProtocolViolation, match="above max-ring-page-order"):
        intf.read_layout(max_order=2)
    struct.pack_into("<I", intf.page, P.RING_ORDER_OFFSET, 0xFFFFFFFF)
    with pytest.raises(ProtocolViolation):
        intf.read_layout(max_order=9)


def test_bytes_written_across_the_end_of_the_ring_read_back_whole() -> None:
    intf, pages = make_ring(order=1)  # two pages: 4 KiB each way, one page per ring
    back_in, back_out = P.flex_rings(intf, pages, backend=True, name="back")
    front_in, front_out = P.flex_rings(intf, pages, backend=False, name="front")
    size = front_out.size
    assert size == P.xen_flex_ring_size(1) == PAGE_SIZE
    for round_ in range(5):  # 3000 bytes a time: every round but the first wraps somewhere
        data = bytes((round_ + i) % 251 for i in range(3000))
        assert front_out.write(data)
        assert back_out.available() == 3000
        assert back_out.read(3000) == data
        assert back_in.write(data[::-1])
        assert front_in.read(3000) == data[::-1]
    assert front_out.free() == size


def test_a_write_that_does_not_fit_writes_nothing() -> None:
    intf, pages = make_ring(order=1)
    _, front_out = P.flex_rings(intf, pages, backend=False, name="front")
    assert front_out.write(b"x" * 4000)
    assert not front_out.write(b"y" * 100)
    assert front_out.free() == 96


def test_indices_that_wrap_past_2_to_the_32_are_harmless() -> None:
    intf, pages = make_ring(order=1)
    for view in (intf.in_cons, intf.in_prod, intf.out_cons, intf.out_prod):
        view[0] = MASK32 - 10
    _, back_out = P.flex_rings(intf, pages, backend=True, name="back")
    _, front_out = P.flex_rings(intf, pages, backend=False, name="front")
    assert front_out.write(b"abcdefghijklmnopqrstuvwxyz")
    assert int(intf.out_prod[0]) == 15
    assert back_out.read(26) == b"abcdefghijklmnopqrstuvwxyz"


def test_a_producer_index_past_the_ring_breaks_it_for_good() -> None:
    intf, pages = make_ring(order=1)
    _, back_out = P.flex_rings(intf, pages, backend=True, name="back")
    intf.out_prod[0] = PAGE_SIZE + 1
    with pytest.raises(ProtocolViolation, match="impossible indices"):
        back_out.available()
    intf.out_prod[0] = 0
    with pytest.raises(ProtocolViolation):
        back_out.available()  # still broken
    assert back_out.broken


def test_a_peer_moving_our_own_index_breaks_the_ring() -> None:
    intf, pages = make_ring(order=1)
    back_in, _ = P.flex_rings(intf, pages, backend=True, name="back")
    intf.in_prod[0] = 7  # the frontend wrote the backend's index
    with pytest.raises(ProtocolViolation, match="moved under us"):
        back_in.write(b"reply")


# -- the codec ------------------------------------------------------------------------------------

QID = P.Qid(P.QTDIR, 3, 0x1234_5678_9ABC)
EXAMPLES: list[P.Message] = [
    P.Tversion(65536, "9P2000.L"),
    P.Rversion(8192, "9P2000.L"),
    P.Tattach(0, P.NOFID, "user", "", 1000),
    P.Rattach(QID),
    P.Twalk(0, 1, ("a", "b", "ünïcödé", "\udcff-raw-byte")),
    P.Rwalk((QID, QID)),
    P.Tlopen(1, P.P9_DOTL_RDWR | P.P9_DOTL_TRUNC),
    P.Rlopen(QID, 8168),
    P.Tlcreate(1, "new", P.P9_DOTL_WRONLY, 0o644, 1000),
    P.Rlcreate(QID, 8168),
    P.Tread(1, 1 << 40, 4096),
    P.Rread(b"\x00\xff" * 100),
    P.Twrite(1, 7, b"data"),
    P.Rwrite(4),
    P.Tclunk(1),
    P.Rclunk(),
    P.Tgetattr(1, P.P9_GETATTR_BASIC),
    P.Rgetattr(0x7FF, QID, 0o100644, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17),
    P.Tsetattr(1, P.P9_ATTR_SIZE, 0, 0, 0, 10, 0, 0, 0, 0),
    P.Rsetattr(),
    P.Treaddir(1, 0, 8000),
    P.Rreaddir(P.Dirent(QID, 1, 4, ".").pack()),
    P.Tmkdir(0, "dir", 0o755, 0),
    P.Rmkdir(QID),
    P.Tunlinkat(0, "dir", P.AT_REMOVEDIR),
    P.Runlinkat(),
    P.Trenameat(0, "a", 0, "b"),
    P.Rrenameat(),
    P.Tstatfs(0),
    P.Rstatfs(P.V9FS_MAGIC, 4096, 1, 2, 3, 4, 5, 6, 255),
    P.Tfsync(1, 1),
    P.Rfsync(),
    P.Tsymlink(0, "l", "/etc/shadow", 0),
    P.Rsymlink(QID),
    P.Treadlink(1),
    P.Rreadlink("target"),
    P.Rlerror(2),
    P.Tflush(5),
    P.Rflush(),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: P.Message) -> None:
    raw = P.encode(42, message)
    assert P.parse_header(raw) == (len(raw), message.TYPE, 42)
    assert P.decode(raw) == (42, message)


def test_every_declared_message_has_an_example() -> None:
    assert {type(m) for m in EXAMPLES} == set(P.MESSAGES.values())


def test_dirents_round_trip() -> None:
    entries = [P.Dirent(QID, i + 1, 8, f"file{i}") for i in range(50)]
    assert P.unpack_dirents(b"".join(e.pack() for e in entries)) == entries


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"\x07\x00\x00", "a message of 3 bytes"),
        (P.encode(1, P.Tclunk(1)) + b"x", "size field 11 on a 12-byte"),
        (P.HEADER.pack(7 + 2, 250, 1) + b"xx", "unknown message type 250"),
        (P.HEADER.pack(7 + 3, P.Tclunk.TYPE, 1) + b"abc", "u32: 4 bytes, 3 left"),
        (P.HEADER.pack(7 + 5, P.Tclunk.TYPE, 1) + b"abcde", "1 bytes after the last field"),
        (P.HEADER.pack(7 + 4, P.Rreadlink.TYPE, 1) + b"\xff\xff" + b"ab", "string: 65535"),
        (P.HEADER.pack(7 + 8, P.Rread.TYPE, 1) + b"\xff\xff\xff\x7f" + b"abcd", "data: 2147483647"),
    ],
)
def test_lengths_a_peer_lies_about_do_not_decode(raw: bytes, why: str) -> None:
    with pytest.raises(P.P9Error, match=why):
        P.decode(raw)


def test_a_walk_of_more_than_16_names_does_not_decode() -> None:
    body = struct.pack("<IIH", 0, 1, 17) + b"\x01\x00a" * 17
    with pytest.raises(P.P9Error, match="17 walk elements"):
        P.decode(P.HEADER.pack(7 + len(body), P.Twalk.TYPE, 3) + body)
    with pytest.raises(ValueError):
        P.encode(3, P.Twalk(0, 1, ("a",) * 17))


def test_a_dirent_running_past_its_data_does_not_decode() -> None:
    packed = P.Dirent(QID, 1, 8, "name").pack()
    with pytest.raises(P.P9Error):
        P.unpack_dirents(packed[:-1])


def test_decoding_copies_nothing_shared() -> None:
    raw = bytearray(P.encode(1, P.Twrite(1, 0, b"abcd")))
    _, message = P.decode(bytes(raw))
    raw[-4:] = b"XXXX"
    assert isinstance(message, P.Twrite) and message.data == b"abcd"
