"""p9back's file server against a real temporary directory: what a share lets a domain do, and
what it never lets it reach (no root needed: openat2 with RESOLVE_BENEATH is unprivileged)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.p9back.server import P9Server
from channels import p9fs as P

MSIZE = 65536


class Session:
    """A server over ``share`` after Tversion and Tattach (fid 0 is the root)."""

    def __init__(self, share: Path, **kwargs: object) -> None:
        self.fd = os.open(share, os.O_PATH | os.O_DIRECTORY)
        self.server = P9Server(self.fd, max_msize=MSIZE, **kwargs)  # type: ignore[arg-type]
        assert self.ask(P.Tversion(MSIZE, P.VERSION_9P2000_L)) == P.Rversion(
            MSIZE, P.VERSION_9P2000_L
        )
        assert isinstance(self.ask(P.Tattach(0, P.NOFID, "", "", 0)), P.Rattach)

    def ask(self, request: P.Message) -> P.Message:
        """Through the wire format both ways, as the data path does."""
        tag, reply = P.decode(self.server.handle(P.encode(1, request)))
        assert tag == 1
        return reply

    def error(self, request: P.Message) -> int:
        reply = self.ask(request)
        assert isinstance(reply, P.Rlerror), reply
        return reply.ecode

    def open(self, fid: int, names: tuple[str, ...], flags: int = P.P9_DOTL_RDONLY) -> None:
        assert isinstance(self.ask(P.Twalk(0, fid, names)), P.Rwalk)
        assert isinstance(self.ask(P.Tlopen(fid, flags)), P.Rlopen)

    def close(self) -> None:
        self.server.close()
        os.close(self.fd)


@pytest.fixture
def share(tmp_path: Path) -> Path:
    root = tmp_path / "share"
    root.mkdir()
    (root / "hello.txt").write_bytes(b"from the host\n")
    (root / "shadow-link").symlink_to("/etc/shadow")
    (root / "etc-link").symlink_to("/etc")
    (root / "sub").mkdir()
    (tmp_path / "outside.txt").write_text("not shared")
    return root


@pytest.fixture
def rw(share: Path) -> Iterator[Session]:
    session = Session(share, readonly=False)
    yield session
    session.close()


@pytest.fixture
def ro(share: Path) -> Iterator[Session]:
    session = Session(share, readonly=True)
    yield session
    session.close()


# -- what a share does ----------------------------------------------------------------------------


def test_a_file_the_host_put_there_reads_back(rw: Session) -> None:
    rw.open(1, ("hello.txt",))
    assert rw.ask(P.Tread(1, 0, 4096)) == P.Rread(b"from the host\n")
    assert rw.ask(P.Tread(1, 14, 4096)) == P.Rread(b"")


def test_a_file_created_and_written_appears_on_the_host_with_the_same_bytes(
    rw: Session, share: Path
) -> None:
    data = os.urandom(50000)
    assert isinstance(rw.ask(P.Twalk(0, 1, ())), P.Rwalk)
    created = rw.ask(P.Tlcreate(1, "new.bin", P.P9_DOTL_RDWR, 0o6755, 0))
    assert isinstance(created, P.Rlcreate)
    for offset in range(0, len(data), 8192):
        chunk = data[offset : offset + 8192]
        assert rw.ask(P.Twrite(1, offset, chunk)) == P.Rwrite(len(chunk))
    assert isinstance(rw.ask(P.Tfsync(1, 0)), P.Rfsync)
    assert (share / "new.bin").read_bytes() == data
    assert (share / "new.bin").stat().st_mode & 0o7777 == 0o755  # no set-uid/gid on the host


def test_a_thousand_files_created_are_all_listed(rw: Session, share: Path) -> None:
    rw.ask(P.Tmkdir(0, "many", 0o755, 0))
    for i in range(1000):
        assert isinstance(rw.ask(P.Twalk(0, 1, ("many",))), P.Rwalk)
        assert isinstance(rw.ask(P.Tlcreate(1, f"f{i:04}", P.P9_DOTL_WRONLY, 0o644, 0)), P.Rlcreate)
        assert rw.ask(P.Tclunk(1)) == P.Rclunk()
    rw.open(2, ("many",))
    names: list[str] = []
    offset = 0
    while True:
        reply = rw.ask(P.Treaddir(2, offset, 4096))
        assert isinstance(reply, P.Rreaddir)
        entries = P.unpack_dirents(reply.data)
        if not entries:
            break
        names += (e.name for e in entries)
        offset = entries[-1].offset
    assert sorted(names) == sorted([".", "..", *os.listdir(share / "many")])
    assert len(names) == 1002


def test_mkdir_rename_unlink_symlink_readlink_setattr_and_statfs(rw: Session, share: Path) -> None:
    assert isinstance(rw.ask(P.Tmkdir(0, "d", 0o755, 0)), P.Rmkdir)
    assert isinstance(rw.ask(P.Tsymlink(0, "l", "hello.txt", 0)), P.Rsymlink)
    assert rw.ask(P.Twalk(0, 1, ("l",))) == P.Rwalk((rw_qid(share / "l"),))
    assert rw.ask(P.Treadlink(1)) == P.Rreadlink("hello.txt")
    assert rw.ask(P.Trenameat(0, "hello.txt", 0, "renamed.txt")) == P.Rrenameat()
    assert (share / "renamed.txt").read_bytes() == b"from the host\n"
    rw.ask(P.Twalk(0, 2, ("renamed.txt",)))
    truncate = P.Tsetattr(2, P.P9_ATTR_SIZE | P.P9_ATTR_MODE, 0o600, 0, 0, 4, 0, 0, 0, 0)
    assert rw.ask(truncate) == P.Rsetattr()
    assert (share / "renamed.txt").read_bytes() == b"from"
    assert (share / "renamed.txt").stat().st_mode & 0o777 == 0o600
    attr = rw.ask(P.Tgetattr(2, P.P9_GETATTR_BASIC))
    assert isinstance(attr, P.Rgetattr) and attr.size == 4
    assert rw.ask(P.Tunlinkat(0, "d", P.AT_REMOVEDIR)) == P.Runlinkat()
    assert rw.ask(P.Tunlinkat(0, "l", 0)) == P.Runlinkat()
    assert sorted(os.listdir(share)) == ["etc-link", "renamed.txt", "shadow-link", "sub"]
    statfs = rw.ask(P.Tstatfs(0))
    assert isinstance(statfs, P.Rstatfs) and statfs.type == P.V9FS_MAGIC


def rw_qid(path: Path) -> P.Qid:
    st = path.lstat()
    return P.Qid(P.QTSYMLINK, int(st.st_mtime_ns) & 0xFFFFFFFF, st.st_ino)


# -- a read-only share ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        P.Tlcreate(1, "x", P.P9_DOTL_RDWR, 0o644, 0),
        P.Tmkdir(1, "x", 0o755, 0),
        P.Tsymlink(1, "x", "y", 0),
        P.Tunlinkat(1, "hello.txt", 0),
        P.Trenameat(1, "hello.txt", 1, "x"),
        P.Tsetattr(1, P.P9_ATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0),
    ],
)
def test_a_read_only_share_refuses_every_change_with_erofs(
    ro: Session, share: Path, request_: P.Message
) -> None:
    before = sorted(os.listdir(share))
    ro.ask(P.Twalk(0, 1, ()))
    assert ro.error(request_) == errno.EROFS
    assert sorted(os.listdir(share)) == before


def test_a_read_only_share_opens_for_reading_only(ro: Session) -> None:
    ro.ask(P.Twalk(0, 1, ("hello.txt",)))
    assert ro.error(P.Tlopen(1, P.P9_DOTL_WRONLY)) == errno.EROFS
    assert ro.error(P.Tlopen(1, P.P9_DOTL_RDONLY | P.P9_DOTL_TRUNC)) == errno.EROFS
    assert isinstance(ro.ask(P.Tlopen(1, P.P9_DOTL_RDONLY)), P.Rlopen)


# -- what a share never reaches -------------------------------------------------------------------


def test_a_symlink_to_etc_shadow_is_never_opened(rw: Session) -> None:
    rw.ask(P.Twalk(0, 1, ("shadow-link",)))
    assert rw.error(P.Tlopen(1, P.P9_DOTL_RDONLY)) == errno.ELOOP
    # Its target is only a string, for the client's own namespace to resolve.
    assert rw.ask(P.Treadlink(1)) == P.Rreadlink("/etc/shadow")


def test_a_walk_through_a_symlink_leaving_the_share_stops_at_the_link(rw: Session) -> None:
    reply = rw.ask(P.Twalk(0, 1, ("etc-link", "shadow")))
    assert isinstance(reply, P.Rwalk) and len(reply.qids) == 1  # a partial walk: no fid made
    assert rw.error(P.Tclunk(1)) == errno.EBADF


def test_dotdot_at_the_root_stays_at_the_root(rw: Session, share: Path) -> None:
    root_qid = rw.ask(P.Tgetattr(0, P.P9_GETATTR_BASIC))
    assert isinstance(root_qid, P.Rgetattr)
    reply = rw.ask(P.Twalk(0, 1, ("..", "..", "..")))
    assert reply == P.Rwalk((root_qid.qid,) * 3)
    for names in (("..", "outside.txt"), ("sub", "..", "..", "outside.txt")):
        partial = rw.ask(P.Twalk(0, 2, names))  # stops short of outside.txt: no fid made
        assert isinstance(partial, P.Rwalk) and len(partial.qids) == len(names) - 1
        assert rw.error(P.Tclunk(2)) == errno.EBADF
    assert rw.error(P.Twalk(0, 2, ("outside.txt",))) == errno.ENOENT


@pytest.mark.parametrize("name", ["a/b", "", ".", "x\0y", "/etc"])
def test_walk_names_are_single_components(rw: Session, name: str) -> None:
    assert rw.error(P.Twalk(0, 1, (name,))) == errno.EINVAL


def test_created_names_are_single_components(rw: Session, share: Path) -> None:
    for name in ("../escape", "..", "a/b"):
        rw.ask(P.Twalk(0, 1, ()))
        assert rw.error(P.Tlcreate(1, name, P.P9_DOTL_RDWR, 0o644, 0)) == errno.EINVAL
        rw.ask(P.Tclunk(1))
    assert not (share.parent / "escape").exists()


# -- hostile fids and counts ----------------------------------------------------------------------


def test_unknown_fids_are_ebadf(rw: Session) -> None:
    for request in (P.Tread(99, 0, 1), P.Tclunk(99), P.Tgetattr(99, 0), P.Twalk(99, 100, ())):
        assert rw.error(request) == errno.EBADF


def test_a_fid_in_use_cannot_be_made_again(rw: Session) -> None:
    assert rw.error(P.Tattach(0, P.NOFID, "", "", 0)) == errno.EEXIST
    rw.ask(P.Twalk(0, 1, ()))
    assert rw.error(P.Twalk(0, 1, ())) == errno.EEXIST


def test_oversized_counts_are_clamped_to_msize(rw: Session, share: Path) -> None:
    (share / "big").write_bytes(b"z" * (2 * MSIZE))
    rw.open(1, ("big",))
    reply = rw.ask(P.Tread(1, 0, 0xFFFFFFFF))
    assert isinstance(reply, P.Rread) and len(reply.data) == MSIZE - P.RREAD_HEADER
    assert rw.error(P.Tread(1, 1 << 63, 10)) == errno.EINVAL
    rw.open(2, ())
    listing = rw.ask(P.Treaddir(2, 0, 0xFFFFFFFF))
    assert isinstance(listing, P.Rreaddir) and len(listing.data) < MSIZE


def test_too_many_fids_are_refused(share: Path) -> None:
    session = Session(share, readonly=False, max_fids=10, max_open=3)
    try:
        for fid in range(1, 10):
            assert isinstance(session.ask(P.Twalk(0, fid, ())), P.Rwalk)
        assert session.error(P.Twalk(0, 10, ())) == errno.EMFILE
        for fid in range(1, 4):
            assert isinstance(session.ask(P.Tlopen(fid, P.P9_DOTL_RDONLY)), P.Rlopen)
        assert session.error(P.Tlopen(4, P.P9_DOTL_RDONLY)) == errno.EMFILE
        assert session.ask(P.Tclunk(1)) == P.Rclunk()
        assert isinstance(session.ask(P.Twalk(0, 10, ())), P.Rwalk)
    finally:
        session.close()


def test_requests_before_tversion_are_refused(share: Path) -> None:
    fd = os.open(share, os.O_PATH | os.O_DIRECTORY)
    server = P9Server(fd, readonly=False, max_msize=MSIZE)
    try:
        assert server.answer(P.Tattach(0, P.NOFID, "", "", 0)) == P.Rlerror(errno.EPROTO)
        assert server.answer(P.Tversion(100, P.VERSION_9P2000_L)) == P.Rlerror(errno.EINVAL)
        assert server.answer(P.Tversion(1 << 30, "9P2000")) == P.Rversion(MSIZE, "unknown")
    finally:
        os.close(fd)
