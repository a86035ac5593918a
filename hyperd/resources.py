"""Every shared-memory object and doorbell semaphore in the system is made here, by hyperd.

Names are unguessable (128 random bits) and carry the owning domain's id so that `hyperctl
cleanup` and the tests can recognise them: ``hyper.d<domid>.<kind>.<token>`` in /dev/shm, and
``sem.hyper.d<domid>.<kind>.<token>`` and ``fifo.hyper.d<domid>.<kind>.<token>`` for a doorbell's
semaphore and FIFO (channels/doorbell.py). Names alone are not the protection: each
object is owned by root with mode 0660 and the group of the one domU that uses it (a domain's
host ids are private to it, see channels/ids.py), so only dom0 (root) and that domU can open it.

A domU never sees the host's /dev/shm. Its /dev/shm is its *view*: the directory
``/dev/shm/hyper.d<domid>``, root's, mode 0710 with the domain's group, which holds a second
link to each of its objects under the same name. There the domain opens them by name (glibc's
``sem_open`` and ``shm_open`` look in /dev/shm) but can create, rename or remove nothing, so
nothing it does there outlives it; dom0 opens the first links, in /dev/shm itself. No domain
can tear down its peer's live ring.

An object two domUs share (a guest's device served by a driver domain, hyperd/devlinks.py) is
held by one of them, keeps that one's group, and names the other's group in an access ACL entry;
it is linked into both views. Still root's: neither domain can change who may open it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from channels.doorbell import create_doorbell, unlink_doorbell
from channels.ids import host_gid
from channels.shm import create_segment, unlink_segment

SHM_DIR = Path("/dev/shm")
PREFIX = "hyper."


def shm_path(name: str) -> Path:
    return SHM_DIR / name


def sem_path(name: str) -> Path:
    return SHM_DIR / f"sem.{name}"


def bell_paths(name: str) -> tuple[Path, Path]:
    """A doorbell's two objects: its semaphore and its FIFO."""
    return sem_path(name), SHM_DIR / f"fifo.{name}"


def view_dir(domid: int) -> Path:
    """Domain ``domid``'s /dev/shm: links to its own objects, and nothing it can add to."""
    return SHM_DIR / f"{PREFIX}d{domid}"


#: The kernel's POSIX ACL xattr (include/uapi/linux/posix_acl_xattr.h): a version, then
#: (tag, perm, id) entries in tag order. Written directly rather than through libacl: one
#: setxattr per object on hyperd's path, and a fixed layout of five entries.
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_USER_OBJ, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x04, 0x08, 0x10, 0x20
_RW, _NONE, _NO_ID = 6, 0, 0xFFFFFFFF


def allow_group(path: Path, gid: int) -> None:
    """Let ``gid`` read and write ``path`` besides its owner and group (mode 0660 stays the
    rest of the ACL)."""
    entries = [
        (_USER_OBJ, _RW, _NO_ID),
        (_GROUP_OBJ, _RW, _NO_ID),
        (_GROUP, _RW, gid),
        (_MASK, _RW, _NO_ID),
        (_OTHER, _NONE, _NO_ID),
    ]
    value = struct.pack("<I", _ACL_VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)
    os.setxattr(path, _ACL_XATTR, value)


@dataclass
class Resources:
    """What one domain holds: released together when the domain dies. A domU's objects are
    linked into its view as they are made (``open_view`` first); one it shares with another
    domU is linked into that one's view too (``peers``)."""

    domid: int
    segments: set[str] = field(default_factory=set)
    doorbells: set[str] = field(default_factory=set)
    #: The other domU that opens an object, by the object's name.
    peers: dict[str, int] = field(default_factory=dict)

    @property
    def view(self) -> Path | None:
        """The domain's /dev/shm, or None for dom0, which uses the host's."""
        return view_dir(self.domid) if self.domid != 0 else None

    def open_view(self) -> None:
        """Make the domain's view: root's, traversable by the domain's group alone."""
        if self.view is None:
            return
        remove(self.view)  # one a killed hypervisor left, were there one
        self.view.mkdir(mode=0o700)
        os.chown(self.view, 0, host_gid(self.domid))
        os.chmod(self.view, 0o710)

    def _name(self, kind: str) -> str:
        return f"{PREFIX}d{self.domid}.{kind}.{secrets.token_hex(16)}"

    def new_segment(self, kind: str, size: int, peer: int = 0) -> str:
        """A new shared-memory object that this domain and ``peer`` open (dom0: root opens
        everything; another domU: see the module's doc)."""
        name = self._name(kind)
        create_segment(name, size, mode=0o660)
        self.segments.add(name)
        self._share(name, peer, self.drop_segment)
        return name

    def new_doorbell(self, kind: str, peer: int = 0) -> str:
        """A new doorbell (semaphore and FIFO) that this domain and ``peer`` open."""
        name = self._name(kind)
        create_doorbell(name, mode=0o660)
        self.doorbells.add(name)
        self._share(name, peer, self.drop_doorbell)
        return name

    def counterpart(self, a: int, b: int) -> int:
        """Of two domains sharing an object we hold, the one that is not us."""
        return b if self.domid == a else a

    def _objects(self, name: str) -> tuple[Path, ...]:
        """An object's entries in /dev/shm: a segment's one, a doorbell's semaphore and FIFO."""
        return bell_paths(name) if name in self.doorbells else (shm_path(name),)

    def _views(self, peer: int | None) -> list[Path]:
        """The views an object is linked into: ours (dom0 has none) and its peer's."""
        return [v for v in (self.view, None if peer is None else view_dir(peer)) if v]

    def _share(self, name: str, peer: int, drop: Callable[[str], None]) -> None:
        """Our group on the object, its links, and ``peer``'s ACL entry and link if it is
        another domU; on failure the object goes (``drop``)."""
        other = peer if peer not in (0, self.domid) else None
        if other is not None:
            self.peers[name] = other
        try:
            for path in self._objects(name):
                os.chown(path, 0, host_gid(self.domid))
                for view in self._views(other):
                    os.link(path, view / path.name)
                if other is not None:
                    allow_group(path, host_gid(other))
        except OSError:
            drop(name)
            raise

    def reshare(self, name: str, peer: int) -> None:
        """An object we hold goes from the domU it was shared with to ``peer``, which serves
        its device now (a driver domain that came back, hyperd/evtchn.py): out of the old
        one's view (gone with it, if it died) and its ACL entry, into ``peer``'s."""
        old = self.peers.pop(name, None)
        for path in self._objects(name):
            if old is not None:
                (view_dir(old) / path.name).unlink(missing_ok=True)
            if peer not in (0, self.domid):
                with contextlib.suppress(FileExistsError):
                    os.link(path, view_dir(peer) / path.name)
                allow_group(path, host_gid(peer))
        if peer not in (0, self.domid):
            self.peers[name] = peer

    def drop_segment(self, name: str) -> None:
        if name in self.segments:
            self._unlink_views(name)
            self.segments.discard(name)
            unlink_segment(name)

    def drop_doorbell(self, name: str) -> None:
        if name in self.doorbells:
            self._unlink_views(name)
            self.doorbells.discard(name)
            unlink_doorbell(name)

    def _unlink_views(self, name: str) -> None:
        """An object's links in our view and in its peer's (gone already if the peer died);
        the peer is forgotten with it."""
        views = self._views(self.peers.pop(name, None))
        for path in self._objects(name):
            for view in views:
                (view / path.name).unlink(missing_ok=True)

    def release(self) -> None:
        for name in list(self.segments):
            self.drop_segment(name)
        for name in list(self.doorbells):
            self.drop_doorbell(name)
        if self.view is not None:
            remove(self.view)

    def paths(self) -> set[Path]:
        """Where this domain's objects are in /dev/shm: the objects, their links (in its view
        and in its peers'), its view."""
        found = {self.view} if self.view is not None else set()
        for name in self.segments | self.doorbells:
            objects = self._objects(name)
            found.update(objects)
            for view in self._views(self.peers.get(name)):
                found.update(view / path.name for path in objects)
        return found

    def to_dict(self) -> dict[str, Any]:
        """For hyperd's state file (hyperd/state.py)."""
        return {
            "domid": self.domid,
            "segments": sorted(self.segments),
            "doorbells": sorted(self.doorbells),
            "peers": dict(sorted(self.peers.items())),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Resources:
        """The record ``to_dict`` wrote; the objects it names are already in /dev/shm."""
        peers = {str(name): int(peer) for name, peer in data["peers"].items()}
        return cls(int(data["domid"]), set(data["segments"]), set(data["doorbells"]), peers)


def leftovers() -> list[Path]:
    """Every hyper entry in /dev/shm and in the domains' views, live or not, whatever its type
    (for cleanup, reconciliation and the leak checks)."""
    found = sorted(
        p
        for p in SHM_DIR.iterdir()
        if p.name.startswith((PREFIX, f"sem.{PREFIX}", f"fifo.{PREFIX}"))
    )
    inside = []
    for path in found:
        if path.is_dir() and not path.is_symlink():
            try:
                inside += sorted(path.iterdir())
            except OSError:
                continue
    return found + inside


def remove(path: Path) -> str | None:
    """Remove ``path`` whatever it is (a directory with all it holds, a symlink itself, never
    what it points to); None if it is gone, else why not (which the caller reports: one stray
    entry must not stop the removal of the others)."""
    try:
        mode = path.lstat().st_mode
        if stat.S_ISDIR(mode):
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    return None
