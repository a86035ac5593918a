"""A hostile domU kernel: floods its store connection and storms its doorbells.

``python -m tests.hostile_guest --domid N --seconds S`` (root), used by
tests/integration/test_storms.py and bench/storm.py. The caller stops the domain's own kernel
(SIGSTOP) and puts this process in the domain's cgroup first, so that it acts as that kernel
would if it were hostile, with the same pages, the same doorbells and the same CPU limits:

1. **Fill the store quota.** Write 2 KiB values under ``data/flood/`` until the store answers
   ENOSPC, then register watches until E2BIG, reading the replies (so that the store did the
   work).
2. **Never read again.** Send directory listings of ``data/flood`` (4 KiB replies) without ever
   taking a reply, until the request ring stays full.
3. **Storm.** Post every doorbell of the domain (its frontends', its backends', the store's and
   the console's) in a tight loop: S seconds, reported, then on until killed.

With ``--journal`` it plays issue 12's journal amplification instead (``journal_flood``):
200 children with 3 KB names under its ``data/``, ``data`` rewritten 100 times, children with
1 KB values added until the store answers ENOSPC, then those values rewritten for S seconds.

Progress goes to stdout, one line per phase; the caller starts it with a line on stdin. Exit
status 1 (and a line saying why) if the store did not behave as a store. ``start`` does all of
the caller's part.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from channels.bytering import XENSTORE_PAGE_SIZE, xenstore_rings
from channels.shm import attach
from channels.xs_wire import Decoder, Message, XsType, encode, join_strings
from hyperd import cgroup
from tests.raw_bell import RawBell

REPO = Path(__file__).resolve().parents[1]
REPLY_TIMEOUT = 10.0
BATCH = 16  # requests in flight while filling (the store stops reading past 20 unanswered)
VALUE = b"x" * 2048


class Page:
    """The domain's store page, taken over from its stopped kernel."""

    def __init__(self, domid: int) -> None:
        [segment] = Path("/dev/shm").glob(f"hyper.d{domid}.store.*")
        self.segment = attach(segment.name)
        assert len(self.segment.buf) >= XENSTORE_PAGE_SIZE
        self.req, self.rsp = xenstore_rings(self.segment.buf)
        self.rsp.read()  # whatever the kernel left unread is not ours
        self.doorbells = [
            RawBell(p.name.removeprefix("sem."))
            for p in Path("/dev/shm").glob(f"sem.hyper.d{domid}.evtchn*")
        ]
        self.decoder = Decoder()
        self.next_id = 1 << 20  # far from the kernel's ids

    def ring_all(self) -> None:
        for bell in self.doorbells:
            bell.ring()

    def send(self, msg_type: XsType, payload: bytes, wait: float = REPLY_TIMEOUT) -> bool:
        """Write one request, as room comes (a 2 KiB value is more than the 1 KiB ring holds);
        False if the ring stayed full for ``wait`` seconds (part of it may be in)."""
        data = memoryview(encode(msg_type, payload, req_id=self.next_id))
        self.next_id += 1
        stuck_since = time.monotonic()
        while data:
            written = self.req.write(data)
            if written:
                data = data[written:]
                stuck_since = time.monotonic()
                self.ring_all()
            elif time.monotonic() - stuck_since > wait:
                return False
            else:
                time.sleep(0.001)
        return True

    def replies(self, count: int) -> list[Message]:
        """Wait for ``count`` replies (watch events are skipped)."""
        got: list[Message] = []
        deadline = time.monotonic() + REPLY_TIMEOUT
        while len(got) < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"hostile guest: {len(got)} of {count} store replies came")
            data = self.rsp.read()
            if not data:
                time.sleep(0.001)
                continue
            self.ring_all()  # we read: the relay may write more
            got += [m for m in self.decoder.feed(data) if m.type != XsType.WATCH_EVENT]
        return got


def fill(page: Page, domid: int, msg_type: XsType, error: str) -> int:
    """Send requests in batches until one is refused with ``error``; how many succeeded."""
    done = 0
    for start in range(0, 100_000, BATCH):
        payloads = []
        for i in range(start, start + BATCH):
            path = f"/local/domain/{domid}/data/flood/{i}"
            if msg_type == XsType.WRITE:  # the value is not NUL-terminated
                payloads.append(join_strings(path) + VALUE)
            else:
                payloads.append(join_strings(path, f"t{i}"))
        ok, refused = batch(page, payloads, msg_type)
        done += ok
        if error in refused:
            return done
        if refused:
            raise SystemExit(f"hostile guest: {msg_type.name} refused with {refused[0]}")
    raise SystemExit(f"hostile guest: no {error} after 100000 {msg_type.name} requests")


def batch(
    page: Page, payloads: list[bytes], msg_type: XsType = XsType.WRITE
) -> tuple[int, list[str]]:
    """Send each payload, BATCH in flight; (how many succeeded, the errors of the others)."""
    ok, errors = 0, []
    for start in range(0, len(payloads), BATCH):
        chunk = payloads[start : start + BATCH]
        for payload in chunk:
            if not page.send(msg_type, payload):
                raise SystemExit("hostile guest: the store stopped reading")
        for reply in page.replies(len(chunk)):
            if reply.type == msg_type:
                ok += 1
            else:
                errors.append(reply.strings()[0])
    return ok, errors


# -- --journal: what made the store's journal grow to 117 MB (issue 12) -------------------------

# A child's name: with /local/domain/<domid>/data/ in front, a path of about 3 KB, near the most
# a path may be (3072); with a 1000-byte value, a WRITE of at most 4 KiB, the most one may be.
NAME_BYTES = 2980
SMALL_VALUE = 1000


def child(domid: int, i: int) -> bytes:
    return join_strings(f"/local/domain/{domid}/data/{i:04d}" + "n" * NAME_BYTES)


def journal_flood(page: Page, domid: int, seconds: float) -> None:
    """Each step is one line on stdout; the store must take every write but the quota's."""
    sent = 0

    def written(payloads: list[bytes], *, refused: str | None = None) -> int:
        nonlocal sent
        ok, errors = batch(page, payloads)
        sent += sum(map(len, payloads))
        if any(e != refused for e in errors):
            raise SystemExit(f"hostile guest: WRITE refused with {errors[0]}")
        return ok

    children = written([child(domid, i) for i in range(200)])
    print(f"children={children}", flush=True)
    data = join_strings(f"/local/domain/{domid}/data")
    rewrites = written([data + str(i).encode() for i in range(100)])
    print(f"rewrote data={rewrites}", flush=True)

    nodes = children
    value = b"v" * SMALL_VALUE
    while True:
        payloads = [child(domid, nodes + i) + value for i in range(BATCH)]
        ok = written(payloads, refused="ENOSPC")
        nodes += ok
        if ok < len(payloads):
            break
        if nodes > 100_000:
            raise SystemExit(f"hostile guest: no ENOSPC after {nodes} nodes")
    print(f"quota nodes={nodes} refused=ENOSPC", flush=True)

    writes = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = str(writes % 10).encode() * SMALL_VALUE  # the same size: no more quota
        payloads = [
            child(domid, children + (writes + i) % (nodes - children)) + value for i in range(BATCH)
        ]
        writes += written(payloads)
    print(f"rewrote values={writes} bytes={sent}", flush=True)


def start(domid: int, kernel_pid: int, seconds: float, *options: str) -> subprocess.Popen[str]:
    """Stop domain ``domid``'s kernel and run this in its place, in its cgroup, with
    ``options`` (``--journal``). Returns the process; reading its lines from ``stdout`` is the
    caller's part."""
    os.kill(kernel_pid, signal.SIGSTOP)
    argv = [f"--domid={domid}", f"--seconds={seconds}", *options]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.hostile_guest", *argv],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    cgroup.open_hierarchy().open(f"dom{domid}").attach(proc.pid)
    assert proc.stdin is not None
    proc.stdin.write("go\n")  # now that it is charged to the domain
    proc.stdin.flush()
    return proc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tests.hostile_guest")
    parser.add_argument("--domid", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True, help="how long to storm")
    parser.add_argument("--journal", action="store_true", help="flood the store's journal")
    args = parser.parse_args(argv)
    sys.stdin.readline()  # the caller has put us in the domain's cgroup
    page = Page(args.domid)
    if args.journal:
        journal_flood(page, args.domid, args.seconds)
        return 0

    nodes = fill(page, args.domid, XsType.WRITE, "ENOSPC")
    watches = fill(page, args.domid, XsType.WATCH, "E2BIG")
    print(f"filled nodes={nodes} watches={watches}", flush=True)

    unread = 0
    listing = join_strings(f"/local/domain/{args.domid}/data/flood")
    while page.send(XsType.DIRECTORY, listing, wait=1.0):
        unread += 1
    print(f"unread requests={unread}", flush=True)

    print("storming", flush=True)
    rings = 0
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        for _ in range(1000):
            page.ring_all()
        rings += 1000 * len(page.doorbells)
    print(f"stormed doorbells={len(page.doorbells)} rings={rings}", flush=True)
    while True:  # on, until killed: the caller measures the first S seconds
        page.ring_all()


if __name__ == "__main__":
    sys.exit(main())
