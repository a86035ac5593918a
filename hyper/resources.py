"""Every shared-memory object and doorbell semaphore in the system is made here, by hyperd.

Names are unguessable (128 random bits) and carry the owning domain's id so that `hyperctl
cleanup` and the tests can recognise them: ``hyper.d<domid>.<kind>.<token>`` in /dev/shm, and
``sem.hyper.d<domid>.<kind>.<token>`` for semaphores. Names alone are not the protection: each
object is owned by root with mode 0660 and the group of the one domU that uses it (a domain's
host ids are private to it, see domu/sandbox.py), so only dom0 (root) and that domU can open it,
and neither can unlink it, because /dev/shm is sticky and root owns the file. No domain can tear
down its peer's live ring.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from channels.doorbell import create_doorbell, unlink_doorbell
from channels.shm import create_segment, unlink_segment
from domu.sandbox import uid_base

SHM_DIR = Path("/dev/shm")
PREFIX = "hyper."


def shm_path(name: str) -> Path:
    return SHM_DIR / name


def sem_path(name: str) -> Path:
    return SHM_DIR / f"sem.{name}"


def host_gid(domid: int) -> int:
    """The host gid whose members may open a domain's objects: root's for dom0."""
    return 0 if domid == 0 else uid_base(domid)


def sharing_gid(a: int, b: int) -> int:
    """The group for an object two domains share. One end is always dom0 for now; a channel
    between two domUs (driver domains) would need an ACL naming both."""
    if a != 0 and b != 0 and a != b:
        raise PermissionError(f"domains {a} and {b}: channels between two domUs are not supported")
    return host_gid(a or b)


@dataclass
class Resources:
    """What one domain holds: released together when the domain dies."""

    domid: int
    segments: set[str] = field(default_factory=set)
    doorbells: set[str] = field(default_factory=set)

    def _name(self, kind: str) -> str:
        return f"{PREFIX}d{self.domid}.{kind}.{secrets.token_hex(16)}"

    def new_segment(self, kind: str, size: int, gid: int) -> str:
        name = self._name(kind)
        create_segment(name, size, mode=0o660)
        self.segments.add(name)
        os.chown(shm_path(name), 0, gid)
        return name

    def new_doorbell(self, kind: str, gid: int) -> str:
        name = self._name(kind)
        create_doorbell(name, mode=0o660)
        self.doorbells.add(name)
        os.chown(sem_path(name), 0, gid)
        return name

    def drop_segment(self, name: str) -> None:
        if name in self.segments:
            self.segments.discard(name)
            unlink_segment(name)

    def drop_doorbell(self, name: str) -> None:
        if name in self.doorbells:
            self.doorbells.discard(name)
            unlink_doorbell(name)

    def release(self) -> None:
        for name in list(self.segments):
            self.drop_segment(name)
        for name in list(self.doorbells):
            self.drop_doorbell(name)

    def paths(self) -> set[Path]:
        """Where this domain's objects are in /dev/shm."""
        return {shm_path(n) for n in self.segments} | {sem_path(n) for n in self.doorbells}

    def to_dict(self) -> dict[str, Any]:
        """For hyperd's state file (hyper/state.py)."""
        return {
            "domid": self.domid,
            "segments": sorted(self.segments),
            "doorbells": sorted(self.doorbells),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Resources:
        """The record ``to_dict`` wrote; the objects it names are already in /dev/shm."""
        return cls(int(data["domid"]), set(data["segments"]), set(data["doorbells"]))


def leftovers() -> list[Path]:
    """Every hyper object in /dev/shm, live or not (for cleanup and the leak checks)."""
    return sorted(
        p
        for p in SHM_DIR.iterdir()
        if p.name.startswith(PREFIX) or p.name.startswith(f"sem.{PREFIX}")
    )
