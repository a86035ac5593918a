"""The shared pages laid out as Xen's own public headers lay them out (Debian's libxen-dev).

A C program built against ``xen/io/ring.h``, ``netif.h``, ``blkif.h``, ``console.h`` and
``xs_wire.h`` prints each struct's size, each field's offset and each ring's size in a page;
channels/ must agree on every one: a Linux netfront or blkfront, or Xen's xenstored, reading our
pages would read what we wrote. The 9pfs page has its own check (test_p9fs_wire.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from channels import blkif as B
from channels import bytering as R
from channels import netif as N
from channels.ring import HEADER_SIZE, PAGE_SIZE
from channels.xs_wire import XsType

HEADERS = Path("/usr/include/xen/io")

C_PROGRAM = r"""
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/io/ring.h>
#include <xen/io/netif.h>
#include <xen/io/blkif.h>
#include <xen/io/console.h>
#include <xen/io/xs_wire.h>
#define SIZE(t) printf("sizeof " #t " %zu\n", sizeof(t))
#define AT(t, f) printf(#t "." #f " %zu\n", offsetof(t, f))
#define VALUE(v) printf(#v " %ld\n", (long)(v))
int main(void) {
    AT(struct netif_tx_sring, ring); AT(struct blkif_sring, ring);
    VALUE(__CONST_RING_SIZE(netif_tx, 4096)); VALUE(__CONST_RING_SIZE(netif_rx, 4096));
    VALUE(__CONST_RING_SIZE(blkif, 4096));
    SIZE(union netif_tx_sring_entry); SIZE(union netif_rx_sring_entry);
    SIZE(union blkif_sring_entry);
    SIZE(struct netif_tx_request); SIZE(struct netif_tx_response);
    SIZE(struct netif_rx_request); SIZE(struct netif_rx_response);
    SIZE(struct netif_extra_info);
    AT(struct netif_tx_request, gref); AT(struct netif_tx_request, offset);
    AT(struct netif_tx_request, flags); AT(struct netif_tx_request, id);
    AT(struct netif_tx_request, size);
    AT(struct netif_rx_request, id); AT(struct netif_rx_request, gref);
    AT(struct netif_rx_response, id); AT(struct netif_rx_response, offset);
    AT(struct netif_rx_response, flags); AT(struct netif_rx_response, status);
    AT(struct netif_extra_info, type); AT(struct netif_extra_info, flags);
    AT(struct netif_extra_info, u.gso.size); AT(struct netif_extra_info, u.gso.type);
    AT(struct netif_extra_info, u.gso.features);
    VALUE(NETIF_RSP_DROPPED); VALUE(NETIF_RSP_ERROR); VALUE(NETIF_RSP_OKAY);
    VALUE(NETIF_RSP_NULL); VALUE(XEN_NETIF_EXTRA_TYPE_GSO); VALUE(XEN_NETIF_EXTRA_FLAG_MORE);
    VALUE(XEN_NETIF_NR_SLOTS_MIN);
    SIZE(struct blkif_request); SIZE(struct blkif_response);
    SIZE(struct blkif_request_segment); SIZE(struct blkif_request_discard);
    SIZE(struct blkif_request_indirect);
    AT(struct blkif_request, operation); AT(struct blkif_request, nr_segments);
    AT(struct blkif_request, handle); AT(struct blkif_request, id);
    AT(struct blkif_request, sector_number); AT(struct blkif_request, seg);
    AT(struct blkif_request_segment, gref); AT(struct blkif_request_segment, first_sect);
    AT(struct blkif_request_segment, last_sect);
    AT(struct blkif_response, id); AT(struct blkif_response, operation);
    AT(struct blkif_response, status);
    AT(struct blkif_request_discard, id); AT(struct blkif_request_discard, sector_number);
    AT(struct blkif_request_discard, nr_sectors);
    AT(struct blkif_request_indirect, indirect_op); AT(struct blkif_request_indirect, id);
    AT(struct blkif_request_indirect, sector_number);
    AT(struct blkif_request_indirect, handle);
    AT(struct blkif_request_indirect, indirect_grefs);
    VALUE(BLKIF_OP_READ); VALUE(BLKIF_OP_WRITE); VALUE(BLKIF_OP_FLUSH_DISKCACHE);
    VALUE(BLKIF_OP_DISCARD); VALUE(BLKIF_OP_INDIRECT); VALUE(BLKIF_RSP_EOPNOTSUPP);
    VALUE(BLKIF_RSP_ERROR); VALUE(BLKIF_RSP_OKAY);
    VALUE(BLKIF_MAX_SEGMENTS_PER_REQUEST); VALUE(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
    VALUE(VDISK_CDROM); VALUE(VDISK_REMOVABLE); VALUE(VDISK_READONLY);
    AT(struct xencons_interface, in); AT(struct xencons_interface, out);
    AT(struct xencons_interface, in_cons); AT(struct xencons_interface, in_prod);
    AT(struct xencons_interface, out_cons); AT(struct xencons_interface, out_prod);
    SIZE(struct xencons_interface);
    AT(struct xenstore_domain_interface, req); AT(struct xenstore_domain_interface, rsp);
    AT(struct xenstore_domain_interface, req_cons);
    AT(struct xenstore_domain_interface, req_prod);
    AT(struct xenstore_domain_interface, rsp_cons);
    AT(struct xenstore_domain_interface, rsp_prod);
    AT(struct xenstore_domain_interface, server_features);
    AT(struct xenstore_domain_interface, connection);
    AT(struct xenstore_domain_interface, error);
    SIZE(struct xenstore_domain_interface); SIZE(struct xsd_sockmsg);
    VALUE(XENSTORE_SERVER_FEATURE_RECONNECTION); VALUE(XENSTORE_SERVER_FEATURE_ERROR);
    VALUE(XENSTORE_CONNECTED); VALUE(XENSTORE_RECONNECT); VALUE(XENSTORE_ERROR_NONE);
    VALUE(XENSTORE_ERROR_COMM); VALUE(XENSTORE_ERROR_RINGIDX); VALUE(XENSTORE_ERROR_PROTO);
    VALUE(XS_DIRECTORY); VALUE(XS_READ); VALUE(XS_WATCH); VALUE(XS_TRANSACTION_START);
    VALUE(XS_INTRODUCE); VALUE(XS_RELEASE); VALUE(XS_WRITE); VALUE(XS_SET_PERMS);
    VALUE(XS_WATCH_EVENT); VALUE(XS_ERROR); VALUE(XS_RESET_WATCHES);
    VALUE(XENSTORE_PAYLOAD_MAX);
    return 0;
}
"""


def expected() -> dict[str, int]:
    """Every figure the program prints, as channels/ has it."""
    tx, rx, blk = N.TX_RING, N.RX_RING, B.BLK_RING
    segment = B.SEGMENT.size
    return {
        "struct netif_tx_sring.ring": HEADER_SIZE,
        "struct blkif_sring.ring": HEADER_SIZE,
        "__CONST_RING_SIZE(netif_tx, 4096)": tx.nr_ents(PAGE_SIZE),
        "__CONST_RING_SIZE(netif_rx, 4096)": rx.nr_ents(PAGE_SIZE),
        "__CONST_RING_SIZE(blkif, 4096)": blk.nr_ents(PAGE_SIZE),
        "sizeof union netif_tx_sring_entry": tx.slot_size,
        "sizeof union netif_rx_sring_entry": rx.slot_size,
        "sizeof union blkif_sring_entry": blk.slot_size,
        "sizeof struct netif_tx_request": tx.request.size,
        "sizeof struct netif_tx_response": tx.response.size,
        "sizeof struct netif_rx_request": rx.request.size,
        "sizeof struct netif_rx_response": rx.response.size,
        "sizeof struct netif_extra_info": N.EXTRA.size,
        # "<IHHHH": gref, offset, flags, id, size
        "struct netif_tx_request.gref": 0,
        "struct netif_tx_request.offset": 4,
        "struct netif_tx_request.flags": 6,
        "struct netif_tx_request.id": 8,
        "struct netif_tx_request.size": 10,
        # "<HxxI": id, pad, gref
        "struct netif_rx_request.id": 0,
        "struct netif_rx_request.gref": 4,
        # "<HHHh": id, offset, flags, status
        "struct netif_rx_response.id": 0,
        "struct netif_rx_response.offset": 2,
        "struct netif_rx_response.flags": 4,
        "struct netif_rx_response.status": 6,
        # "<BBHBxH": type, flags, gso.size, gso.type, pad, gso.features
        "struct netif_extra_info.type": 0,
        "struct netif_extra_info.flags": 1,
        "struct netif_extra_info.u.gso.size": 2,
        "struct netif_extra_info.u.gso.type": 4,
        "struct netif_extra_info.u.gso.features": 6,
        "NETIF_RSP_DROPPED": N.NETIF_RSP_DROPPED,
        "NETIF_RSP_ERROR": N.NETIF_RSP_ERROR,
        "NETIF_RSP_OKAY": N.NETIF_RSP_OKAY,
        "NETIF_RSP_NULL": N.NETIF_RSP_NULL,
        "XEN_NETIF_EXTRA_TYPE_GSO": N.XEN_NETIF_EXTRA_TYPE_GSO,
        "XEN_NETIF_EXTRA_FLAG_MORE": N.XEN_NETIF_EXTRA_FLAG_MORE,
        "XEN_NETIF_NR_SLOTS_MIN": N.XEN_NETIF_NR_SLOTS_MIN,
        "sizeof struct blkif_request": blk.request.size,
        "sizeof struct blkif_response": blk.response.size,
        "sizeof struct blkif_request_segment": segment,
        # These two are read from a whole slot (DISCARD_SLOT, INDIRECT_SLOT pad to it); in C
        # each ends at its last field, rounded up to its 8-byte alignment.
        "sizeof struct blkif_request_discard": 24 + 8,
        "sizeof struct blkif_request_indirect": _align8(28 + 4 * 8),
        # "<BBH4xQQ" + segments: operation, nr_segments, handle, pad, id, sector, seg[]
        "struct blkif_request.operation": 0,
        "struct blkif_request.nr_segments": 1,
        "struct blkif_request.handle": 2,
        "struct blkif_request.id": 8,
        "struct blkif_request.sector_number": 16,
        "struct blkif_request.seg": 24,
        # "IBB2x": gref, first_sect, last_sect, pad
        "struct blkif_request_segment.gref": 0,
        "struct blkif_request_segment.first_sect": 4,
        "struct blkif_request_segment.last_sect": 5,
        # "<QBxh4x": id, operation, pad, status
        "struct blkif_response.id": 0,
        "struct blkif_response.operation": 8,
        "struct blkif_response.status": 10,
        # "<BBH4xQQQ80x": operation, flag, handle, pad, id, sector_number, nr_sectors
        "struct blkif_request_discard.id": 8,
        "struct blkif_request_discard.sector_number": 16,
        "struct blkif_request_discard.nr_sectors": 24,
        # "<BBH4xQQH2x8I52x": operation, indirect_op, nr_segments, pad, id, sector, handle,
        # pad, indirect_grefs[8]
        "struct blkif_request_indirect.indirect_op": 1,
        "struct blkif_request_indirect.id": 8,
        "struct blkif_request_indirect.sector_number": 16,
        "struct blkif_request_indirect.handle": 24,
        "struct blkif_request_indirect.indirect_grefs": 28,
        "BLKIF_OP_READ": B.BLKIF_OP_READ,
        "BLKIF_OP_WRITE": B.BLKIF_OP_WRITE,
        "BLKIF_OP_FLUSH_DISKCACHE": B.BLKIF_OP_FLUSH_DISKCACHE,
        "BLKIF_OP_DISCARD": B.BLKIF_OP_DISCARD,
        "BLKIF_OP_INDIRECT": B.BLKIF_OP_INDIRECT,
        "BLKIF_RSP_EOPNOTSUPP": B.BLKIF_RSP_EOPNOTSUPP,
        "BLKIF_RSP_ERROR": B.BLKIF_RSP_ERROR,
        "BLKIF_RSP_OKAY": B.BLKIF_RSP_OKAY,
        "BLKIF_MAX_SEGMENTS_PER_REQUEST": B.BLKIF_MAX_SEGMENTS_PER_REQUEST,
        "BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST": B.BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
        "VDISK_CDROM": B.VDISK_CDROM,
        "VDISK_REMOVABLE": B.VDISK_REMOVABLE,
        "VDISK_READONLY": B.VDISK_READONLY,
        "struct xencons_interface.in": R.XENCONS_IN_OFFSET,
        "struct xencons_interface.out": R.XENCONS_OUT_OFFSET,
        "struct xencons_interface.in_cons": R.XENCONS_IN_CONS_OFFSET,
        "struct xencons_interface.in_prod": R.XENCONS_IN_PROD_OFFSET,
        "struct xencons_interface.out_cons": R.XENCONS_OUT_CONS_OFFSET,
        "struct xencons_interface.out_prod": R.XENCONS_OUT_PROD_OFFSET,
        "sizeof struct xencons_interface": R.XENCONS_INTERFACE_SIZE,
        "struct xenstore_domain_interface.req": R.XENSTORE_REQ_OFFSET,
        "struct xenstore_domain_interface.rsp": R.XENSTORE_RSP_OFFSET,
        "struct xenstore_domain_interface.req_cons": R.XENSTORE_REQ_CONS_OFFSET,
        "struct xenstore_domain_interface.req_prod": R.XENSTORE_REQ_PROD_OFFSET,
        "struct xenstore_domain_interface.rsp_cons": R.XENSTORE_RSP_CONS_OFFSET,
        "struct xenstore_domain_interface.rsp_prod": R.XENSTORE_RSP_PROD_OFFSET,
        "struct xenstore_domain_interface.server_features": R.XENSTORE_SERVER_FEATURES_OFFSET,
        "struct xenstore_domain_interface.connection": R.XENSTORE_CONNECTION_OFFSET,
        "struct xenstore_domain_interface.error": R.XENSTORE_ERROR_OFFSET,
        "sizeof struct xenstore_domain_interface": R.XENSTORE_INTERFACE_SIZE,
        "sizeof struct xsd_sockmsg": 16,
        "XENSTORE_SERVER_FEATURE_RECONNECTION": R.XENSTORE_SERVER_FEATURE_RECONNECTION,
        "XENSTORE_SERVER_FEATURE_ERROR": R.XENSTORE_SERVER_FEATURE_ERROR,
        "XENSTORE_CONNECTED": R.XENSTORE_CONNECTED,
        "XENSTORE_RECONNECT": R.XENSTORE_RECONNECT,
        "XENSTORE_ERROR_NONE": R.XENSTORE_ERROR_NONE,
        "XENSTORE_ERROR_COMM": R.XENSTORE_ERROR_COMM,
        "XENSTORE_ERROR_RINGIDX": R.XENSTORE_ERROR_RINGIDX,
        "XENSTORE_ERROR_PROTO": R.XENSTORE_ERROR_PROTO,
        "XS_DIRECTORY": XsType.DIRECTORY,
        "XS_READ": XsType.READ,
        "XS_WATCH": XsType.WATCH,
        "XS_TRANSACTION_START": XsType.TRANSACTION_START,
        "XS_INTRODUCE": XsType.INTRODUCE,
        "XS_RELEASE": XsType.RELEASE,
        "XS_WRITE": XsType.WRITE,
        "XS_SET_PERMS": XsType.SET_PERMS,
        "XS_WATCH_EVENT": XsType.WATCH_EVENT,
        "XS_ERROR": XsType.ERROR,
        "XS_RESET_WATCHES": XsType.RESET_WATCHES,
        "XENSTORE_PAYLOAD_MAX": 4096,
    }


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


def test_the_slot_structs_fill_a_slot() -> None:
    assert B.DISCARD_SLOT.size == B.INDIRECT_SLOT.size == B.BLK_RING.slot_size


def xen_headers_or_skip() -> None:
    """Where scripts/setup.sh ran (CI) the headers and a compiler must be there: fail, not
    skip, so that CI never passes without comparing."""
    missing = [
        what
        for what, there in (
            ("Xen's public headers (libxen-dev)", (HEADERS / "ring.h").exists()),
            ("a C compiler", shutil.which("cc") is not None),
        )
        if not there
    ]
    if missing and os.environ.get("CI"):
        pytest.fail(f"missing: {', '.join(missing)} (scripts/setup.sh installs them)")
    if missing:
        pytest.skip(f"missing: {', '.join(missing)} (scripts/setup.sh installs them)")


def test_every_shared_page_is_laid_out_as_xens_headers_lay_it_out(tmp_path: Path) -> None:
    xen_headers_or_skip()
    source, binary = tmp_path / "layout.c", tmp_path / "layout"
    source.write_text(C_PROGRAM)
    built = subprocess.run(["cc", "-o", str(binary), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    theirs = {
        name: int(value) for name, value in (line.rsplit(" ", 1) for line in out.splitlines())
    }
    ours = expected()
    assert set(theirs) == set(ours), "the program and the table must name the same figures"
    differ = {name: (ours[name], theirs[name]) for name in ours if ours[name] != theirs[name]}
    assert not differ, f"ours, Xen's: {differ}"
