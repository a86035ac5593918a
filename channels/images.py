"""Disk images and shared directories on the host: reached without a symlink, and changeable by
root and the device's owner alone.

An image is a guest's whole disk: whoever can write the file, or put another file in its place,
reads and writes that guest's data. So an image path is used only when

* no component of it is a symlink, neither the image nor any directory above it (a symlink
  another user controls points the path wherever they like, between any check and the open);
* the image and every directory above it belong to root or to the *owner*, the user who asked
  for the disk (hyperctl's caller: under sudo, the user who ran sudo);
* no group but root's and no other user can write the image, nor a directory above it unless
  the directory is sticky (in a sticky directory such as /tmp or /var/tmp, nobody can rename
  or remove another user's entry).

A missing image passes when the directories that exist pass: the toolstack creates it.

Three places check, each on what it is about to use: config validation on the path, lstat by
lstat from ``/`` (``check``, reads only, so ``--dry-run`` needs no root); the toolstack as it
creates a missing image (``create``: every directory opened below the one before with
``O_NOFOLLOW``, a missing one made root's and 0700, the image made root's and 0600 with
``O_EXCL``); and blkback as it opens the image (``open_image``, the same walk, each directory
and then the image checked on its own descriptor), because the path may have changed since it
was validated. Errors are :class:`ImageError`, one line naming the path and why.

A 9pfs share (a directory a domain sees at /mnt/<tag>) follows the same rules, with a
directory where the image was (``check(..., share=True)`` at validation, ``open_share`` in the
backend), but may itself belong to anyone: the backend serves it as its owner, never as root, and
never follows a symlink out of it, so its owner can do nothing through it that they could not do
without it. Only its parents must be root's or the asker's, so that nobody else can swap it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from channels.errors import BadInput

ROOT_UID = 0
ROOT_GID = 0
_DIRECTORY = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class ImageError(BadInput):
    """An image path that must not be used; the message names the path and the reason."""


def check(image: Path, owner: int, *, share: bool = False) -> os.stat_result | None:
    """The image's stat, or None when it does not exist (a directory above it may not
    either); ImageError when the path breaks a rule of the module docstring. ``image`` is
    absolute; with ``share`` it is a shared directory, not an image."""
    st: os.stat_result | None = None
    for at in (*reversed(image.parents), image):
        try:
            st = os.lstat(at)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ImageError(f"{image}: cannot check {at}: {exc.strerror}") from exc
        _check(image, at, st, owner, share)
    return st


def open_share(path: str | Path, owner: int) -> int:
    """An ``O_PATH`` descriptor on the shared directory ``path``, reached and checked as
    ``open_image`` reaches an image; ImageError if a rule is broken or it is missing."""
    path = Path(path)
    if not path.is_absolute() or path == Path("/"):
        raise ImageError(f"{path}: a share is an absolute path below /")
    parent = _open_directory(path, owner)
    try:
        fd = os.open(path.name, _DIRECTORY, dir_fd=parent)
    except OSError as exc:
        raise ImageError(_open_failure(path, path, parent, exc)) from exc
    finally:
        os.close(parent)
    try:
        _check(path, path, os.fstat(fd), owner, share=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_image(image: str | Path, flags: int, owner: int) -> int:
    """Open the existing ``image`` with ``flags`` (``O_RDONLY`` or ``O_RDWR``) without following
    any symlink, checking each directory and the image on its descriptor; ImageError if a rule
    is broken or the open fails."""
    image = Path(image)
    parent = _open_directory(image, owner)
    try:
        # O_NONBLOCK: a FIFO put in the image's place must not hang the opener.
        fd = os.open(
            image.name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent
        )
    except OSError as exc:
        raise ImageError(_open_failure(image, image, parent, exc)) from exc
    finally:
        os.close(parent)
    try:
        _check(image, image, os.fstat(fd), owner)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create(image: Path, size: int, owner: int) -> list[Path]:
    """Create the missing ``image``, sparse, of ``size`` bytes, root's and 0600, and every
    missing directory above it, root's and 0700, never through a symlink. What it made,
    directories first; nothing when the image exists and passes (someone made it meanwhile:
    it is used as it is). ImageError, having removed what it made, on failure."""
    made: list[Path] = []
    try:
        parent = _open_directory(image, owner, made)
        try:
            fd = os.open(image.name, _CREATE, 0o600, dir_fd=parent)
        except FileExistsError:
            _check(image, image, _lstat_below(parent, image), owner)
            return made
        except OSError as exc:
            raise ImageError(_open_failure(image, image, parent, exc)) from exc
        finally:
            os.close(parent)
        made.append(image)
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            raise ImageError(f"{image}: {exc.strerror}") from exc
        finally:
            os.close(fd)
    except BaseException:
        remove(made)
        raise
    return made


def remove(made: list[Path]) -> None:
    """Remove what ``create`` made, the last made first; whatever cannot go stays."""
    for path in reversed(made):
        with contextlib.suppress(OSError):
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()


def _open_directory(image: Path, owner: int, made: list[Path] | None = None) -> int:
    """An ``O_PATH`` descriptor on the image's directory, reached from ``/`` one directory at
    a time with ``O_NOFOLLOW``, each checked on its descriptor. With ``made``, a missing
    directory is created (root's, 0700) and appended to it."""
    at = Path("/")
    fd = os.open(at, _DIRECTORY)
    try:
        _check(image, at, os.fstat(fd), owner)
        for name in image.parts[1:-1]:
            at = at / name
            below = _open_below(fd, at, image, made)
            os.close(fd)
            fd = below
            _check(image, at, os.fstat(fd), owner)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_below(parent: int, at: Path, image: Path, made: list[Path] | None) -> int:
    """Open directory ``at`` (its name, below ``parent``), creating it if ``made`` allows."""
    try:
        return os.open(at.name, _DIRECTORY, dir_fd=parent)
    except FileNotFoundError as exc:
        if made is None:
            raise ImageError(f"{image}: {at} does not exist") from exc
        missing = made
    except OSError as exc:
        raise ImageError(_open_failure(image, at, parent, exc)) from exc
    try:
        os.mkdir(at.name, 0o700, dir_fd=parent)
        missing.append(at)
    except FileExistsError:
        pass  # made meanwhile by someone else: opened and checked as any other
    except OSError as exc:
        raise ImageError(f"{image}: cannot create {at}: {exc.strerror}") from exc
    return _open_below(parent, at, image, None)


def _lstat_below(parent: int, image: Path) -> os.stat_result:
    try:
        return os.stat(image.name, dir_fd=parent, follow_symlinks=False)
    except OSError as exc:
        raise ImageError(f"{image}: {exc.strerror}") from exc


def _open_failure(image: Path, at: Path, parent: int, exc: OSError) -> str:
    """Why opening ``at`` (its name, below ``parent``) failed; a symlink says where it points."""
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        with contextlib.suppress(OSError):
            return _symlink(image, at, os.readlink(at.name, dir_fd=parent))
    return f"{image}: {exc.strerror}" if at == image else f"{image}: {at}: {exc.strerror}"


def _check(image: Path, at: Path, st: os.stat_result, owner: int, share: bool = False) -> None:
    """ImageError if ``at`` (the image or share, or a directory above it) breaks a rule."""
    where = str(image) if at == image else f"{image}: {at}"
    if stat.S_ISLNK(st.st_mode):
        target = "?"
        with contextlib.suppress(OSError):
            target = os.readlink(at)
        raise ImageError(_symlink(image, at, target))
    if (at != image or share) and not stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{where} is not a directory")
    if at == image and not share and not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{where} is not a regular file")
    if share and at == image:
        return  # its owner is whom the domain reads and writes it as (backends/p9back)
    if st.st_uid not in (ROOT_UID, owner):
        who = "share" if share else "disk"
        allowed = "root" if owner == ROOT_UID else f"root or uid {owner} (who asked for the {who})"
        raise ImageError(f"{where} belongs to uid {st.st_uid}; only {allowed} may own it")
    if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
        return  # sticky: nobody can rename or remove another user's entry
    if st.st_mode & stat.S_IWOTH:
        raise ImageError(f"{where} is writable by every user")
    if st.st_mode & stat.S_IWGRP and st.st_gid != ROOT_GID:
        raise ImageError(f"{where} is writable by group {st.st_gid}")


def _symlink(image: Path, at: Path, target: str) -> str:
    return f"{image} is reached through a symlink: {at} -> {target}"
