"""p9back's data path against a hostile 9pfs frontend, and p9front's client against the real
backend, over real shared memory and doorbells (tests/unit/p9rings.py).

A protocol violation (an index past the ring's size, an index of the backend's that the
frontend moved, a message size below the header or above msize) must fail that device once
(``on_fatal``) and nothing else: a second device on the same share keeps answering. What fits
the framing but is wrong (an unknown message, a body that does not decode, an unknown fid) is
answered Rlerror, and the device goes on.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from channels import p9fs as P
from channels.ring import MASK32, RING_FIGURES
from domu.p9front.client import P9Client
from tests.unit.p9rings import P9Link

MakeLink = Callable[..., P9Link]


@pytest.fixture
def share(tmp_path: Path) -> Iterator[int]:
    (tmp_path / "hello.txt").write_bytes(b"from the host\n")
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    yield fd
    os.close(fd)


@pytest.fixture
def make_link(share: int) -> Iterator[MakeLink]:
    with contextlib.ExitStack() as stack:
        yield lambda **kwargs: P9Link(stack, share, **kwargs)


def rpc(link: P9Link, tag: int, message: P.Message) -> P.Message:
    link.send_raw(P.encode(tag, message))
    got_tag, reply = P.decode(link.reply())
    assert got_tag == tag
    return reply


def session(link: P9Link) -> None:
    assert rpc(link, 0xFFFF, P.Tversion(8192, P.VERSION_9P2000_L)) == P.Rversion(
        8192, P.VERSION_9P2000_L
    )
    assert isinstance(rpc(link, 1, P.Tattach(0, P.NOFID, "", "", 0)), P.Rattach)


def assert_serving(link: P9Link) -> None:
    client = link.client()
    client.version(8192)
    client.attach(0)
    client.walk(0, 1, ["hello.txt"])
    client.lopen(1, P.P9_DOTL_RDONLY)
    assert client.read(1, 0, 100) == b"from the host\n"


# -- violations fail the device, and only it ------------------------------------------------------


def test_out_prod_past_the_ring_disconnects_the_device_and_the_other_keeps_serving(
    make_link: MakeLink,
) -> None:
    victim, other = make_link(), make_link()
    cons = int(victim.intf.out_cons[0])
    victim.intf.out_prod[0] = (cons + victim.front_out.size + 1) & MASK32
    victim.bell.notify()
    assert victim.fatal_event.wait(10)
    assert len(victim.fatal) == 1 and "impossible indices" in victim.fatal[0]
    assert not other.fatal
    assert_serving(other)


def test_a_frontend_moving_the_backends_in_prod_disconnects_the_device(make_link: MakeLink) -> None:
    link = make_link()
    session(link)
    link.intf.in_prod[0] = 12345  # the backend's index: the frontend may not write it
    link.send_raw(P.encode(2, P.Tclunk(0)))
    assert link.fatal_event.wait(10)
    assert "moved under us" in link.fatal[0]


@pytest.mark.parametrize("size", [0, 3, P.HEADER_SIZE - 1, 8193, 0xFFFFFFFF])
def test_a_message_size_outside_header_and_msize_disconnects_the_device(
    make_link: MakeLink, size: int
) -> None:
    link, other = make_link(), make_link()
    session(link)  # msize 8192 from now on
    link.send_raw(struct.pack("<IBH", size, P.Tclunk.TYPE, 1) + bytes(4))
    assert link.fatal_event.wait(10)
    assert f"a message of {size} bytes" in link.fatal[0]
    assert_serving(other)


# -- in-band errors are answered, and the device goes on -------------------------------------------


def test_unknown_messages_bad_bodies_and_unknown_fids_are_answered_rlerror(
    make_link: MakeLink,
) -> None:
    link = make_link()
    session(link)
    link.send_raw(struct.pack("<IBH", P.HEADER_SIZE + 2, 250, 7) + b"xx")  # no such type
    assert P.decode(link.reply()) == (7, P.Rlerror(errno.EOPNOTSUPP))
    walk = P.encode(8, P.Twalk(0, 1, ("a",)))
    bad = walk[:-3] + struct.pack("<H", 60000) + b"a"  # a name longer than its message
    link.send_raw(bad)
    assert P.decode(link.reply()) == (8, P.Rlerror(errno.EINVAL))
    assert rpc(link, 9, P.Tread(4242, 0, 10)) == P.Rlerror(errno.EBADF)
    assert not link.fatal
    assert link.counters.errors == 3


def test_an_oversized_read_count_is_clamped_to_msize(make_link: MakeLink, tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * 20000)
    link = make_link()
    session(link)
    assert rpc(link, 2, P.Twalk(0, 1, ("big",))) == P.Rwalk((rpc_qid(link, "big"),))
    assert isinstance(rpc(link, 3, P.Tlopen(1, P.P9_DOTL_RDONLY)), P.Rlopen)
    reply = rpc(link, 4, P.Tread(1, 0, 0xFFFFFFFF))
    assert isinstance(reply, P.Rread)
    assert len(reply.data) == 8192 - P.RREAD_HEADER


def rpc_qid(link: P9Link, name: str) -> P.Qid:
    st = os.stat(name, dir_fd=link.server.root_fd, follow_symlinks=False)
    return P.Qid(P.QTFILE, int(st.st_mtime_ns) & 0xFFFFFFFF, st.st_ino)


# -- the client over the real backend -----------------------------------------------------------


def test_client_and_server_round_trip_through_the_flex_rings(
    make_link: MakeLink, tmp_path: Path
) -> None:
    client = make_link(order=2).client()
    assert client.version(1 << 20) == P.xen_flex_ring_size(2)  # clamped to the ring
    client.attach(0)
    client.walk(0, 1, [])
    data = bytes(range(256)) * 100  # several Twrites' worth, wrapping the rings
    client.lcreate(1, "made.bin", P.P9_DOTL_RDWR, 0o644)
    done = 0
    while done < len(data):
        done += client.write(1, done, data[done : done + client.msize - P.IOHDRSZ])
    client.clunk(1)
    assert (tmp_path / "made.bin").read_bytes() == data
    client.walk(0, 2, ["made.bin"])
    client.lopen(2, P.P9_DOTL_RDONLY)
    back = b""
    while chunk := client.read(2, len(back), 1 << 20):
        back += chunk
    assert back == data
    with pytest.raises(OSError) as caught:
        client.walk(0, 3, ["no-such-file"])
    assert caught.value.errno == errno.ENOENT


def test_a_client_whose_backend_answers_an_unknown_tag_is_broken(make_link: MakeLink) -> None:
    link = make_link()
    broken: list[str] = []
    link.device.stop()  # the test plays the backend from here
    in_ring = P.FlexRing(
        link.in_pages,  # the backend's role on the same pages
        link.intf.in_cons,
        link.intf.in_prod,
        producer=True,
        name="evil backend",
    )
    client = P9Client(
        link.front_in, link.front_out, link.bell, name="victim", on_broken=broken.append
    )
    in_ring.write(P.encode(77, P.Rclunk()))
    link.bell.kick()
    with pytest.raises(OSError) as caught:
        client.attach(0)
    assert caught.value.errno == errno.EIO
    assert client.broken is not None and "tag 77" in client.broken
    client.close()


def test_a_stopped_device_lets_its_pools_be_unmapped(
    share: int, caplog: pytest.LogCaptureFixture
) -> None:
    """p9back's stop drops every view it had of the frontend's pages (its rings' and their
    interface pages'), so the grant mapper unmaps the pools at once, not at exit."""
    with contextlib.ExitStack() as stack:
        link = P9Link(stack, share)
        assert_serving(link)
        stack.callback(link.front_in.close)  # the test's frontend lets go of its own too
        stack.callback(link.front_out.close)
    assert "views still exported" not in caplog.text
    mapped = Path("/proc/self/maps").read_text()
    assert link.tag not in mapped  # every pool unmapped now, not at exit


def test_the_ring_figures_count_each_request_reply_and_kick(make_link: MakeLink) -> None:
    link = make_link()
    assert_serving(link)  # version, attach, walk, lopen, read: five requests
    counted = dict(zip(RING_FIGURES, link.figures.tolist(), strict=True))
    assert (counted["requests"], counted["responses"]) == (5, 5)
    # A flex ring has no event index: a kick for each request taken and each reply written.
    assert (counted["notify_sent"], counted["notify_suppressed"]) == (10, 0)
    assert counted["wakeups"] >= 1
