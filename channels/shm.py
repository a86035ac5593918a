"""POSIX shared-memory segments without the resource tracker hazard.

Before Python 3.13, every ``multiprocessing.shared_memory.SharedMemory`` object registers its
segment with the process's resource tracker, which *unlinks* the segment when that process
exits, even in a process that merely attached. A domain that attached a ring and then exited
would destroy the ring under its peer. So:

* only hyperd creates segments (:func:`create_segment`): it creates through ``SharedMemory``,
  immediately unregisters the name from the tracker, fixes the mode and closes its mapping;
  from then on the segment lives until :func:`unlink_segment` (hyperd's teardown or cleanup
  command), whatever process exits;
* every user, hyperd included, maps with :func:`attach`, a plain ``os.open`` + ``mmap`` of
  ``/dev/shm/<name>`` that the tracker never sees; or, a process that may not open the name
  (a data-path worker after it dropped privilege), with :func:`attach_fd` from the fd that one
  which may (dom0) opened with :func:`open_segment` and handed it.

Names are plain file names chosen by the caller (hyperd makes them unguessable); no ``/``.

Closing: :meth:`Segment.close` releases ``Segment.buf`` and unmaps. The rule is that callers
drop every view they derived from ``buf`` (slices, rings built on it, ``ctypes.from_buffer``
objects) before calling it. If some are still alive, ``close`` does not fail and nothing can
touch unmapped memory: ``mmap`` refuses to unmap while views are exported, so ``close`` logs a
warning and the mapping is unmapped when the last view is garbage-collected. A holder that
must know when that happens (a backend's grant mapper, counting the pools it still maps) asks
:meth:`Segment.unmap` instead, as often as it likes: it unmaps only once no view is left.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import stat
from multiprocessing import resource_tracker, shared_memory

from channels.errors import HyperError

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"


class ShmError(HyperError):
    """A segment that cannot be created or attached."""


def segment_path(name: str) -> str:
    """The file behind segment `name`."""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise ValueError(f"invalid shared memory segment name {name!r}")
    return os.path.join(SHM_DIR, name)


def create_segment(name: str, size: int, mode: int = 0o600) -> None:
    """Create the zero-filled segment `name` of `size` bytes with exactly `mode`."""
    path = segment_path(name)
    try:
        shm = shared_memory.SharedMemory(name=name, create=True, size=size)
    except FileExistsError as e:
        raise ShmError(f"shared memory segment {name}: already exists") from e
    except (OSError, ValueError) as e:
        raise ShmError(f"shared memory segment {name}: cannot create {size} bytes") from e
    try:
        # SharedMemory registered "/<name>"; left registered, this process's exit would unlink it.
        resource_tracker.unregister("/" + name, "shared_memory")
        os.chmod(path, mode)  # shm_open applied the umask to SharedMemory's fixed 0o600
    finally:
        shm.close()


def unlink_segment(name: str) -> None:
    """Remove segment `name`; existing mappings stay valid. A missing segment is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(segment_path(name))


class Segment:
    """A mapping of a shared-memory segment: ``buf`` (memoryview) of ``size`` bytes."""

    def __init__(self, name: str, mapping: mmap.mmap) -> None:
        self.name = name
        self.size = len(mapping)
        self.buf = memoryview(mapping)
        self._mmap: mmap.mmap | None = mapping

    def close(self) -> None:
        """Release ``buf`` and unmap (idempotent). Drop your views of ``buf`` first."""
        if self._mmap is None:
            return
        if not self.unmap():
            logger.warning(
                "shared memory segment %s: views still exported at close; "
                "unmapped when the last one is dropped",
                self.name,
            )
            self._mmap = None

    def unmap(self) -> bool:
        """Release ``buf`` and unmap, unless a view derived from it is still alive (``mmap``
        refuses then): True once unmapped. Otherwise the segment stays mapped, ``buf`` no
        longer usable, and ``unmap`` may be asked again."""
        if self._mmap is None:
            return True
        try:
            self.buf.release()
            self._mmap.close()
        except BufferError:
            return False
        self._mmap = None
        return True

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_segment(name: str) -> int:
    """An fd on the existing segment `name`, read-write: for a process that may open it by
    name to hand to one that may not (a data-path worker, once it has dropped privilege)."""
    path = segment_path(name)
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise ShmError(f"shared memory segment {name}: cannot open {path}: {e.strerror}") from e


def attach_fd(fd: int, name: str, size: int | None = None) -> Segment:
    """Map segment `name` from ``fd`` (an fd ``open_segment`` made; the caller still closes
    it), read-write, with the checks ``attach`` makes."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            raise ShmError(f"shared memory segment {name}: not a non-empty file")
        if size is not None and st.st_size != size:
            raise ShmError(f"shared memory segment {name}: {st.st_size} bytes, not {size}")
        mapping = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        raise ShmError(f"shared memory segment {name}: cannot map it: {e.strerror}") from e
    return Segment(name, mapping)


def attach(name: str, size: int | None = None) -> Segment:
    """Map the existing segment `name` read-write, invisibly to the resource tracker. With
    ``size``, the segment must hold exactly that many bytes (a peer that may write it may also
    have truncated it)."""
    fd = open_segment(name)
    try:
        return attach_fd(fd, name, size)
    finally:
        os.close(fd)  # the mapping keeps the segment referenced
