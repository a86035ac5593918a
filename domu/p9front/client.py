"""p9front's 9P2000.L client over one 9pfs ring (channels/p9fs.py).

Any number of threads call it at once (the FUSE server's). Each call takes a free tag (at most
``MAX_TAGS`` requests outstanding; a caller past that waits for one), writes its whole request
into the ``out`` ring under a lock (waiting for room if the backend is behind), notifies the
backend and waits for its reply. One reader thread sleeps on the ring's event channel, with a
timeout that heals a lost wakeup; on each wakeup it copies every whole reply out of ``in`` once,
hands each to the caller waiting on its tag, notifies the backend (``in_cons`` moved) and wakes
writers waiting for room (the backend moved ``out_cons``). Nothing polls.

The backend is not trusted either (xen-split-driver.md §1.8): a reply whose size is below the
header or above msize, that does not decode, names a tag with no request outstanding, or is of
another type than its request's answer (or Rlerror), and any impossible ring index, break the
client: every waiting and later call fails with EIO, and ``on_broken`` is told once why.
Rlerror is ``OSError(ecode)`` (an ecode outside 1..4095 is EIO).
"""

from __future__ import annotations

import errno
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from channels import p9fs as P
from channels.errors import ProtocolViolation

log = logging.getLogger(__name__)

MAX_TAGS = 64
HEAL_TIMEOUT = 5.0
R = TypeVar("R", bound=P.Message)


class Channel(Protocol):
    """What the client needs of an event channel (EventChannel, DoorbellPair)."""

    def wait(self, timeout: float | None) -> bool: ...

    def notify(self) -> None: ...

    def kick(self) -> None: ...


@dataclass
class _Call:
    done: threading.Event = field(default_factory=threading.Event)
    reply: P.Message | None = None
    expect: type[P.Message] = P.Rlerror


class P9Client:
    def __init__(
        self,
        in_ring: P.FlexRing,
        out: P.FlexRing,
        channel: Channel,
        *,
        name: str,
        on_broken: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.in_ring, self.out, self.channel = in_ring, out, channel
        self.name = name
        self.on_broken = on_broken
        self.msize = min(in_ring.size, out.size)  # until Tversion says less
        self.broken: str | None = None
        self._closed = False
        self._lock = threading.Lock()  # tags, calls, broken, closed
        self._room = threading.Condition(self._lock)  # a tag freed, or out has room
        self._calls: dict[int, _Call] = {}
        self._write_lock = threading.Lock()  # one writer in the out ring at a time
        self._fids = itertools.count(1)  # 0 is the root's
        self._free_fids: list[int] = []
        self._reader = threading.Thread(target=self._read_loop, name=f"{name} reader", daemon=True)
        self._reader.start()

    # -- the session ----------------------------------------------------------------------------

    def version(self, msize: int) -> int:
        reply = self.call(P.Tversion(min(msize, self.msize), P.VERSION_9P2000_L), P.Rversion)
        if reply.version != P.VERSION_9P2000_L or not 4096 <= reply.msize <= self.msize:
            self._break(f"Rversion {reply.version!r} msize {reply.msize}")
            raise OSError(errno.EIO, "9pfs: version refused")
        self.msize = reply.msize
        return reply.msize

    def attach(self, fid: int = 0) -> P.Qid:
        return self.call(P.Tattach(fid, P.NOFID, "", "", P.NOFID), P.Rattach).qid

    def new_fid(self) -> int:
        with self._lock:
            return self._free_fids.pop() if self._free_fids else next(self._fids)

    def forget_fid(self, fid: int) -> None:
        """Give back a fid the server never made (a walk to it failed)."""
        with self._lock:
            self._free_fids.append(fid)

    def clunk(self, fid: int) -> None:
        try:
            self.call(P.Tclunk(fid), P.Rclunk)
        finally:
            with self._lock:
                self._free_fids.append(fid)

    def close(self) -> None:
        """Stop the reader; calls waiting fail with EIO."""
        with self._lock:
            self._closed = True
            self._fail_all()
        self.channel.kick()
        self._reader.join(HEAL_TIMEOUT)

    # -- calls ----------------------------------------------------------------------------------

    def call(self, request: P.Message, expect: type[R]) -> R:
        """Send ``request`` and wait for its reply (OSError from an Rlerror, EIO if broken)."""
        tag, call = self._take_tag(expect)
        try:
            raw = P.encode(tag, request)
            if len(raw) > self.msize:
                raise OSError(errno.EMSGSIZE, f"a {len(raw)}-byte request past msize")
            self._send(raw)
            call.done.wait()
        finally:
            with self._lock:
                self._calls.pop(tag, None)
                self._room.notify_all()
        reply = call.reply
        if isinstance(reply, P.Rlerror):
            code = reply.ecode if 0 < reply.ecode < 4096 else errno.EIO
            raise OSError(code, f"9pfs {type(request).__name__}")
        if not isinstance(reply, expect):
            raise OSError(errno.EIO, f"9pfs: {self.broken or 'closed'}")
        return reply

    def _take_tag(self, expect: type[P.Message]) -> tuple[int, _Call]:
        with self._room:
            while True:
                self._check()
                if len(self._calls) < MAX_TAGS:
                    tag = next(t for t in range(MAX_TAGS) if t not in self._calls)
                    call = self._calls[tag] = _Call(expect=expect)
                    return tag, call
                self._room.wait(HEAL_TIMEOUT)

    def _check(self) -> None:
        if self.broken is not None or self._closed:
            raise OSError(errno.EIO, f"9pfs: {self.broken or 'closed'}")

    def _send(self, raw: bytes) -> None:
        with self._write_lock:
            while True:
                with self._room:
                    self._check()
                    try:
                        if self.out.write(raw):
                            break
                    except ProtocolViolation as exc:
                        self._break_locked(str(exc))
                        continue
                    self._room.wait(HEAL_TIMEOUT)  # the reader wakes us when the backend reads
        self.channel.notify()

    # -- the reader -----------------------------------------------------------------------------

    def _read_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed or self.broken is not None:
                    return
                self._room.notify_all()  # the backend may have made room in out
            try:
                got = self._drain()
            except ProtocolViolation as exc:
                self._break(str(exc))
                return
            if not got:
                self.channel.wait(HEAL_TIMEOUT)

    def _drain(self) -> bool:
        """Take every whole reply queued in ``in``; False if there was none."""
        got = False
        while True:
            queued = self.in_ring.available()
            if queued < P.HEADER_SIZE:
                break
            size = P.parse_header(self.in_ring.peek(P.HEADER_SIZE))[0]
            if not P.HEADER_SIZE <= size <= min(self.msize, self.in_ring.size):
                raise ProtocolViolation(f"{self.name}: a reply of {size} bytes")
            if queued < size:
                break
            self._deliver(self.in_ring.read(size))
            got = True
        if got:
            self.channel.notify()  # in_cons moved
        return got

    def _deliver(self, raw: bytes) -> None:
        try:
            tag, reply = P.decode(raw)
        except P.P9Error as exc:
            raise ProtocolViolation(f"{self.name}: a reply that does not decode: {exc}") from None
        with self._lock:
            call = self._calls.get(tag)
            if call is None or call.done.is_set():
                raise ProtocolViolation(f"{self.name}: a reply for tag {tag}, not outstanding")
            if not isinstance(reply, call.expect | P.Rlerror):
                raise ProtocolViolation(f"{self.name}: {type(reply).__name__} for tag {tag}")
            call.reply = reply
            call.done.set()

    def _break(self, reason: str) -> None:
        with self._lock:
            self._break_locked(reason)

    def _break_locked(self, reason: str) -> None:
        if self.broken is not None:
            return
        self.broken = reason
        log.warning("%s: backend broke the protocol: %s", self.name, reason)
        self._fail_all()
        threading.Thread(target=self.on_broken, args=(reason,), daemon=True).start()

    def _fail_all(self) -> None:
        for call in self._calls.values():
            call.done.set()  # reply None: EIO
        self._room.notify_all()

    # -- 9P2000.L, one method per request -------------------------------------------------------

    def walk(self, fid: int, newfid: int, names: Sequence[str]) -> tuple[P.Qid, ...]:
        return self.call(P.Twalk(fid, newfid, tuple(names)), P.Rwalk).qids

    def lopen(self, fid: int, flags: int) -> tuple[P.Qid, int]:
        reply = self.call(P.Tlopen(fid, flags), P.Rlopen)
        return reply.qid, reply.iounit

    def lcreate(self, fid: int, name: str, flags: int, mode: int, gid: int = 0) -> P.Qid:
        return self.call(P.Tlcreate(fid, name, flags, mode, gid), P.Rlcreate).qid

    def read(self, fid: int, offset: int, count: int) -> bytes:
        count = min(count, self.msize - P.IOHDRSZ)
        data = self.call(P.Tread(fid, offset, count), P.Rread).data
        if len(data) > count:
            self._break(f"Rread of {len(data)} bytes for {count}")
            raise OSError(errno.EIO, "9pfs: read past its count")
        return data

    def write(self, fid: int, offset: int, data: bytes) -> int:
        count = self.call(P.Twrite(fid, offset, data), P.Rwrite).count
        if count > len(data):
            self._break(f"Rwrite of {count} bytes for {len(data)}")
            raise OSError(errno.EIO, "9pfs: wrote past its count")
        return count

    def getattr(self, fid: int) -> P.Rgetattr:
        return self.call(P.Tgetattr(fid, P.P9_GETATTR_BASIC), P.Rgetattr)

    def setattr(self, fid: int, valid: int, **fields: int) -> None:
        values = {
            "mode": 0,
            "uid": 0,
            "gid": 0,
            "size": 0,
            "atime_sec": 0,
            "atime_nsec": 0,
            "mtime_sec": 0,
            "mtime_nsec": 0,
            **fields,
        }
        self.call(P.Tsetattr(fid, valid, **values), P.Rsetattr)

    def readdir(self, fid: int, offset: int) -> list[P.Dirent]:
        data = self.call(P.Treaddir(fid, offset, self.msize - P.READDIRHDRSZ), P.Rreaddir).data
        try:
            return P.unpack_dirents(data)
        except P.P9Error as exc:
            self._break(f"Rreaddir: {exc}")
            raise OSError(errno.EIO, "9pfs: bad directory entries") from None

    def mkdir(self, dfid: int, name: str, mode: int, gid: int = 0) -> P.Qid:
        return self.call(P.Tmkdir(dfid, name, mode, gid), P.Rmkdir).qid

    def unlinkat(self, dfid: int, name: str, flags: int = 0) -> None:
        self.call(P.Tunlinkat(dfid, name, flags), P.Runlinkat)

    def renameat(self, olddfid: int, oldname: str, newdfid: int, newname: str) -> None:
        self.call(P.Trenameat(olddfid, oldname, newdfid, newname), P.Rrenameat)

    def statfs(self, fid: int) -> P.Rstatfs:
        return self.call(P.Tstatfs(fid), P.Rstatfs)

    def fsync(self, fid: int, datasync: bool) -> None:
        self.call(P.Tfsync(fid, int(datasync)), P.Rfsync)

    def symlink(self, dfid: int, name: str, target: str, gid: int = 0) -> P.Qid:
        return self.call(P.Tsymlink(dfid, name, target, gid), P.Rsymlink).qid

    def readlink(self, fid: int) -> str:
        return self.call(P.Treadlink(fid), P.Rreadlink).target
