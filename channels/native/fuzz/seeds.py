"""Seed inputs for netpump_fuzz.c, blkpump_fuzz.c and fusepump_fuzz.c: honest traffic, which
the fuzzer then mutates.

``python3 seeds.py DIR`` writes DIR/<TARGET>.corpus/seed-N for each pump, in the input layout
its harness describes: mode, four indices, (backends) the grant entries, the slots, the
pages' first bytes, (netback rx) the frame.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

POOL_PAGES, GREF_BASE = 1, 8
HEAD = bytes.fromhex(
    "ffffffffffff 00163e000001 0800 4500 0054 0000 4000 4006 0000 0a000002 0a000001"
    "0001 0002 00000000 00000000 5010 ffff 0000 0000"
)
ENTRIES = b"".join(struct.pack("<HHI", 1, 0, i) for i in range(POOL_PAGES))
RO_ENTRIES = b"".join(struct.pack("<HHI", 5, 0, i) for i in range(POOL_PAGES))


def tx_slot(gref: int, offset: int, flags: int, rid: int, size: int) -> bytes:
    return struct.pack("<IHHHH", gref, offset, flags, rid, size)


def gso_extra(size: int = 1448) -> bytes:
    return struct.pack("<BBHBxHxxxx", 1, 0, size, 1, 0)


def layout(
    indices: tuple[int, int, int, int], entries: bytes, slots: list[bytes], tail: bytes
) -> bytes:
    return (
        b"\0"
        + struct.pack("<IIII", *indices)
        + entries
        + bytes([len(slots)])
        + b"".join(slots)
        + tail
    )


def netback_tx() -> list[bytes]:
    pages = HEAD.ljust(256, b"\0") * 2
    return [
        layout((0, 0, 0, 0), RO_ENTRIES, [tx_slot(8, 0, 0, 1, len(HEAD))], pages),
        layout(
            (5, 5, 5, 0),
            RO_ENTRIES,
            [
                tx_slot(8, 0, 1 | 4 | 8, 1, 3000),
                gso_extra(),
                tx_slot(8, 0, 4, 2, 1000),
                tx_slot(8, 100, 0, 3, 1000),
            ],
            pages,
        ),
        layout(
            (250, 250, 250, 0),
            RO_ENTRIES,
            [tx_slot(8 + i % 8, 0, 4, i, 4096) for i in range(12)] + [tx_slot(8, 0, 0, 12, 100)],
            pages,
        ),
    ]


def netback_rx() -> list[bytes]:
    posted = [struct.pack("<HxxI", i, GREF_BASE + i % POOL_PAGES) for i in range(40)]
    vnet_plain = bytes(10)
    vnet_gso = struct.pack("<BBHHHH", 1, 1, 54, 1448, 34, 16)
    return [
        layout((0, 0, 0, 0), ENTRIES, posted, vnet_plain + HEAD + bytes(100)),
        layout((7, 7, 7, 0), ENTRIES, posted, vnet_gso + HEAD + bytes(20000)),
        layout((0, 0, 0, 0), ENTRIES, posted, vnet_plain + HEAD + bytes(9000)),
    ]


def netfront_tx() -> list[bytes]:
    return [
        layout(
            (0, 0, 0, 0), b"", [struct.pack("<Hh", i, 0).ljust(12, b"\0") for i in range(5)], b""
        ),
        layout((3, 3, 3, 0), b"", [struct.pack("<Hh", 0, 1).ljust(12, b"\0")], b""),
    ]


def netfront_rx() -> list[bytes]:
    one = [struct.pack("<HHHh", 0, 0, 0, len(HEAD))]
    gso = [
        struct.pack("<HHHh", 0, 0, 4 | 8, 4096),
        struct.pack("<HHHh", 1, 1448, 1, 0),
        struct.pack("<HHHh", 2, 0, 4, 4096),
        struct.pack("<HHHh", 3, 0, 0, 500),
    ]
    pages = HEAD.ljust(256, b"\0") * 4
    return [layout((0, 0, 0, 0), b"", one, pages), layout((9, 9, 9, 0), b"", gso, pages)]


def blk_request(op: int, rid: int, sector: int, segments: list[tuple[int, int, int]]) -> bytes:
    """A classic blkif request slot (channels/blkif.py's layout)."""
    flat = b"".join(struct.pack("<IBB2x", *seg) for seg in segments)
    return (struct.pack("<BBH4xQQ", op, len(segments), 0, rid, sector) + flat).ljust(112, b"\0")


def blk_indirect(op: int, rid: int, sector: int, count: int, page: int) -> bytes:
    return struct.pack("<BBH4xQQH2xI", 6, op, count, rid, sector, 0, page).ljust(112, b"\0")


def blkback() -> list[bytes]:
    descriptors = b"".join(struct.pack("<IBB2x", GREF_BASE, 0, 7) for _ in range(4))
    whole, part = (GREF_BASE, 0, 7), (GREF_BASE, 2, 5)
    return [
        layout((0, 0, 0, 0), ENTRIES, [blk_request(0, 1, 0, [whole])], b""),
        layout(
            (30, 30, 30, 0),
            ENTRIES,
            [blk_request(1, 2, 8, [whole, part]), blk_request(0, 3, 16, [part] * 11)],
            b"",
        ),
        layout((5, 5, 5, 0), ENTRIES, [blk_indirect(1, 4, 0, 4, GREF_BASE)], descriptors),
        layout(
            (0, 0, 0, 0),
            RO_ENTRIES,
            [blk_indirect(0, 5, 32, 4, GREF_BASE), blk_request(1, 6, 40, [whole])],
            descriptors,
        ),
    ]


def fuse_message(opcode: int, offset: int, size: int, flags: int = 2, data: bytes = b"") -> bytes:
    """A FUSE READ or WRITE as the kernel sends it (fuse_wire's layouts), with its length."""
    args = struct.pack("<QQIIQII", 0, offset, size, 0, 0, flags, 0)
    head = struct.pack("<IIQQIIIHH", 80 + len(data), opcode, 2, 1, 0, 0, 0, 0, 0)
    message = head + args + data
    return struct.pack("<H", len(message)) + message


def blk_response(rid: int, op: int, status: int = 0) -> bytes:
    return struct.pack("<QBxh4x", rid, op, status)


def fusefront() -> list[bytes]:
    read, write = fuse_message(15, 0, 4096), fuse_message(16, 4096, 4096, data=bytes(4096))
    dsync = fuse_message(16, 0, 1024, flags=2 | 0o10000, data=bytes(1024))
    both = struct.pack("<BIB", 0, 0, 2) + read + write
    return [
        both + struct.pack("<B", 2) + blk_response(0, 0) + blk_response(1, 1),
        both + struct.pack("<B", 2) + blk_response(1, 1, -1) + blk_response(0, 6),
        struct.pack("<BIB", 8 | 16, 0, 1) + dsync + struct.pack("<B", 1) + blk_response(0, 1),
        struct.pack("<BIB", 1, 7, 1) + read + struct.pack("<B", 1) + blk_response(0, 0),
    ]


def main(out: Path) -> None:
    for target, seeds in (
        ("NETBACK_TX", netback_tx()),
        ("NETBACK_RX", netback_rx()),
        ("NETFRONT_TX", netfront_tx()),
        ("NETFRONT_RX", netfront_rx()),
        ("BLKBACK", blkback()),
        ("FUSEFRONT", fusefront()),
    ):
        corpus = out / f"{target}.corpus"
        corpus.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds):
            (corpus / f"seed-{i}").write_bytes(seed)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
