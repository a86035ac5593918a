"""The domU sandbox: what a domain's processes can see of the host.

A domain is built in three steps, each in a process of its own (see domu/boot.py):

1. As host root, in a fresh mount namespace owned by the host's user namespace, ``build_root``
   makes the domain's root file system: a recursive, read-only bind of the host's ``/``, private
   tmpfs on ``/tmp``, ``/run`` and ``/var/tmp`` (so neither the toolstack socket under /run/hyper
   nor any host scratch file is reachable), a ``/dev`` of the domain's own (a devpts instance of
   its own for its terminals, and as ``/dev/shm`` the directory of links to its own rings and
   doorbells, which it can open but not add to), and empty covers where the host's ``/proc``
   and ``/sys`` were. Directories the interpreter needs but the domain's unprivileged host uid
   could not traverse (``/root/.pyenv`` on some machines) are re-exposed read-only on a tmpfs
   that hides everything else in the hidden ancestor.
2. After the user namespace exists, a second mount namespace is unshared inside it; the kernel
   of the domain (pid 1) mounts its own ``/proc`` and ``/sys`` over the covers. Mounts copied
   from step 1 are locked there: nobody in the domain can unmount or move them to reveal what
   they cover, and what the kernel mounted itself covers nothing of the host's.
3. The workload runs in a third mount namespace (``enter_workload_mounts``) with a private, empty
   ``/dev/shm``: the workload never sees a ring or doorbell name, let alone opens one.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
from collections.abc import Iterable
from pathlib import Path

from channels import linux
from channels.ids import WORKLOAD_GID, WORKLOAD_UID

WORKLOAD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _others_can_enter(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & 0o001)
    except OSError:
        return False


def hidden_ancestor(path: Path) -> Path | None:
    """The highest ancestor of ``path`` that other users cannot traverse, if any."""
    for ancestor in reversed(path.parents):
        if ancestor != Path("/") and not _others_can_enter(ancestor):
            return ancestor
    return None


SCRATCH_DIRS = ("/tmp", "/run", "/var/tmp")
#: Where a domain's own lasting directory is bound (under /run, the domain's scratch tmpfs).
STATE_MOUNT = "/run/xenstored"


def _under_scratch(path: Path) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in SCRATCH_DIRS)


def interpreter_paths() -> list[Path]:
    """Directories the domain's Python must read after it has lost host root and its scratch
    directories were replaced: the interpreter, its site-packages and hyper's own source, when
    they lie behind a directory others cannot enter (/root/.pyenv) or under /tmp (a CI clone).
    The outermost of nested paths; "/" (sys.path's entry under `python -m` run in /) never."""
    here = Path(__file__).resolve().parent.parent
    candidates = {Path(sys.prefix), Path(sys.base_prefix), here}
    candidates.update(Path(p) for p in sys.path if p and Path(p).is_dir())
    resolved = sorted({p.resolve() for p in candidates} - {Path("/")})
    needed = [p for p in resolved if _under_scratch(p) or hidden_ancestor(p)]
    return [p for p in needed if not any(q != p and q in p.parents for q in needed)]


def _bind_readonly(path: Path, target: str) -> None:
    os.makedirs(target, mode=0o755, exist_ok=True)
    linux.mount(str(path), target, None, linux.MS_BIND | linux.MS_REC)
    linux.mount_setattr(target, set_=linux.MOUNT_ATTR_RDONLY, recursive=True)


def _expose_hidden(newroot: str, needed: Iterable[Path]) -> None:
    """Paths behind an ancestor others cannot enter: a tmpfs replaces that ancestor (hiding the
    rest of it) and only the needed paths are bound back."""
    covered: set[Path] = set()
    for path in needed:
        hidden = hidden_ancestor(path)
        if hidden is None or _under_scratch(path):
            continue
        if hidden not in covered:
            linux.mount("tmpfs", newroot + str(hidden), "tmpfs", linux.MS_NOSUID, "mode=0755")
            covered.add(hidden)
        _bind_readonly(path, newroot + str(path))


#: The domain's /dev is a small tmpfs of its own, never the host's: ordinary character devices
#: for programs (path, major, minor), all 0666 as on any Linux system ...
PROGRAM_DEVICES = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
    ("ptmx", 5, 2),
)
#: ... devices the domain kernel alone needs (its frontends create TAPs and serve FUSE), group:
#: the kernel's host gid, mode 0660, never usable by its workload.
KERNEL_DEVICES = (("net/tun", 10, 200), ("fuse", 10, 229))
DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
)
#: Pseudo-terminals a domain may hold at once. Its ptys come from a devpts instance of its own
#: (``/dev/ptmx`` finds the ``pts`` beside it), never the host's: the host's terminals are not
#: even listed, and a workload that opens ptys until it fails takes this many, not the host's
#: (the kernel's global ``pty.max`` still counts them; an instance mounted outside the host's
#: first mount namespace can never use the ``pty.reserve`` kept for host logins).
PTYS_MAX = 64


def _domain_dev(newroot: str, kernel_id: int, shm: str) -> None:
    """Cover the host's /dev with the domain's own. Its root belongs to the domain kernel, which
    makes the mount points of its disks there (``/dev/xvda``); its workload cannot."""
    dev = newroot + "/dev"
    linux.mount(
        "tmpfs",
        dev,
        "tmpfs",
        linux.MS_NOSUID | linux.MS_NOEXEC,
        f"mode=0755,uid={kernel_id},gid={kernel_id},size=256k,nr_inodes=1024",
    )
    for name, major, minor in PROGRAM_DEVICES:
        _mknod(f"{dev}/{name}", major, minor, 0, 0o666)
    for name, major, minor in KERNEL_DEVICES:
        if os.path.exists(f"/dev/{name}"):  # the host has no such device: neither has the domain
            os.makedirs(os.path.dirname(f"{dev}/{name}"), mode=0o755, exist_ok=True)
            _mknod(f"{dev}/{name}", major, minor, kernel_id, 0o660)
    os.mkdir(f"{dev}/pts", 0o755)
    linux.mount(
        "devpts",
        f"{dev}/pts",
        "devpts",
        linux.MS_NOSUID | linux.MS_NOEXEC,
        f"newinstance,ptmxmode=0666,mode=0620,max={PTYS_MAX}",
    )
    # The domain's shared memory: a directory hyperd made for it, holding a link to each of its
    # rings and doorbells (hyperd/resources.py). The kernel opens them there by name, read and
    # write, but cannot create, rename or remove anything: the directory is root's.
    os.mkdir(f"{dev}/shm", 0o755)
    linux.mount(shm, f"{dev}/shm", None, linux.MS_BIND)
    linux.mount_setattr(f"{dev}/shm", set_=linux.MOUNT_ATTR_NOSUID | linux.MOUNT_ATTR_NODEV)
    for name, target in DEV_LINKS:
        os.symlink(target, f"{dev}/{name}")


def _mknod(node: str, major: int, minor: int, gid: int, mode: int) -> None:
    os.mknod(node, mode | stat.S_IFCHR, os.makedev(major, minor))
    os.chown(node, 0, gid)
    os.chmod(node, mode)


def _hide_host_pseudo(newroot: str, name: str) -> None:
    """Replace the host's /proc (or /sys) in the domain's root by an empty, read-only tmpfs
    that the domain kernel mounts its own over.

    A user namespace may mount proc or sysfs only where the mount namespace already holds a
    fully visible mount of the same kind (the kernel's mnt_already_visible): one whose root is
    the file system's root and that no locked mount covers. Covering the host's copy at /proc
    with the domain's own would satisfy that, but then the domain kernel, which may unmount
    what it mounted itself, could unmount its /proc and look at the host's processes beneath.
    So the host's mount is bound one level down, at ``<name>/.host/fs``, with nothing on it,
    and an empty tmpfs covers ``.host``: the mount still satisfies the check (the check looks
    at the mount, not at whether a path reaches it), no path reaches it, and the covers are
    locked once the domain's user namespace copies this mount namespace (they can be neither
    unmounted nor moved there). Unmounting its own /proc shows the domain only these covers."""
    target = f"{newroot}/{name}"
    linux.umount(target, linux.MNT_DETACH)  # the recursive bind's copy, with its submounts
    linux.mount("tmpfs", target, "tmpfs", _PSEUDO_COVER, "mode=0555,size=4k,nr_inodes=4")
    os.makedirs(f"{target}/.host/fs", mode=0o555)
    linux.mount(f"/{name}", f"{target}/.host/fs", None, linux.MS_BIND)  # its root, no submounts
    linux.mount("tmpfs", f"{target}/.host", "tmpfs", _PSEUDO_COVER, "mode=0,size=4k,nr_inodes=1")
    linux.mount_setattr(target, set_=linux.MOUNT_ATTR_RDONLY)
    linux.mount_setattr(f"{target}/.host", set_=linux.MOUNT_ATTR_RDONLY)


_PSEUDO_COVER = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC


def build_root(newroot: str, kernel_id: int, shm: str, state: str | None = None) -> None:
    """Make the domain's root file system and pivot into it. Runs as host root in a new mount ns.
    ``shm``: the host directory holding links to the domain's rings and doorbells. ``state``: a
    host directory of the domain's own that outlives it (the store domain's journal), bound
    read-write at ``STATE_MOUNT``."""
    needed = interpreter_paths()
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    linux.mount("/", newroot, None, linux.MS_BIND | linux.MS_REC)
    _expose_hidden(newroot, needed)
    _domain_dev(newroot, kernel_id, shm)
    linux.mount_setattr(newroot, set_=linux.MOUNT_ATTR_RDONLY, recursive=True)
    linux.mount_setattr(newroot + "/dev", clear=linux.MOUNT_ATTR_RDONLY)
    linux.mount_setattr(newroot + "/dev/pts", clear=linux.MOUNT_ATTR_RDONLY)
    # Its rings and doorbells are opened read-write; the directory itself lets nobody write.
    linux.mount_setattr(newroot + "/dev/shm", clear=linux.MOUNT_ATTR_RDONLY)
    for pseudo in ("proc", "sys"):
        _hide_host_pseudo(newroot, pseudo)
    for scratch in SCRATCH_DIRS:
        if os.path.isdir(newroot + scratch):
            linux.mount(
                "tmpfs", newroot + scratch, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=1777"
            )
    # Code under a scratch directory (a checkout in /tmp) is bound back, read-only.
    for path in needed:
        if _under_scratch(path):
            _bind_readonly(path, newroot + str(path))
    if state is not None:
        os.makedirs(newroot + STATE_MOUNT, mode=0o755, exist_ok=True)
        linux.mount(state, newroot + STATE_MOUNT, None, linux.MS_BIND)
        linux.mount(
            None,
            newroot + STATE_MOUNT,
            None,
            linux.MS_REMOUNT | linux.MS_BIND | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
        )
    os.chdir(newroot)
    linux.pivot_root(".", ".")
    linux.umount(".", linux.MNT_DETACH)
    os.chdir("/")


def enter_kernel_mounts(hostname: str) -> None:
    """In the domain's pid 1: its own /proc and /sys, and its name as hostname."""
    linux.mount("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    try:
        # sysfs shows the network devices of the mounter's netns: mount our own so the
        # host's interfaces are not even listed.
        linux.mount(
            "sysfs",
            "/sys",
            "sysfs",
            linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC | linux.MS_RDONLY,
        )
    except OSError:
        pass  # the empty, read-only cover stays (build_root): no sysfs rather than the host's
    # The domain's programs may make no user namespace of their own: in one they could mount a
    # devpts instance without our limit (PTYS_MAX) and more. The limit is the domain's user
    # namespace's own; only a process privileged in it (this kernel) could raise it again.
    with open("/proc/sys/user/max_user_namespaces", "w") as limit:
        limit.write("0")
    socket.sethostname(hostname)
    # Disks are mounted on /dev/xvdX after the workload's mount namespace exists: a shared /dev
    # propagates them there (both namespaces belong to the domain's user namespace).
    linux.mount(None, "/dev", None, linux.MS_SHARED)
    # Shares (9pfs) are mounted on /mnt/<tag> the same way: on the kernel's own small tmpfs,
    # shared, which also hides whatever the host keeps in its /mnt.
    if os.path.isdir("/mnt"):
        flags = linux.MS_NOSUID | linux.MS_NODEV
        linux.mount("tmpfs", "/mnt", "tmpfs", flags, "mode=0755,size=64k,nr_inodes=256")
        linux.mount(None, "/mnt", None, linux.MS_SHARED)


def enter_workload_mounts() -> None:
    """A mount namespace for programs: private, empty /dev/shm, /tmp and /run."""
    linux.unshare(linux.CLONE_NEWNS)
    for scratch in ("/dev/shm", "/tmp", "/run"):
        linux.mount("tmpfs", scratch, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=1777")


def drop_to_workload_user() -> None:
    """Become the unprivileged workload user for good (no capabilities, no new privileges)."""
    os.setgroups([])
    os.setresgid(WORKLOAD_GID, WORKLOAD_GID, WORKLOAD_GID)
    os.setresuid(WORKLOAD_UID, WORKLOAD_UID, WORKLOAD_UID)
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)


def workload_env(extra: dict[str, str], hostname: str) -> dict[str, str]:
    env = {
        "PATH": WORKLOAD_PATH,
        "HOME": "/tmp",
        "HOSTNAME": hostname,
        "TERM": os.environ.get("TERM", "xterm"),
        "LANG": "C.UTF-8",
    }
    env.update(extra)
    return env
