"""The domain boot process: from a host-root child of hyperd to the domain's pid 1.

Started by hyperd's fork server (channels/forkserver.py) as ``domu.boot:main HYPERCALL_FD
SYNC_FD`` (``python -m domu.boot HYPERCALL_FD SYNC_FD`` does the same), in the domain's cgroup
from its first instruction; the boot parameters arrive as one JSON line on
the sync socket. Steps:

1. import everything the domain kernel needs, while host files are still readable;
2. build the sandbox root in a new mount namespace and pivot into it (domu/sandbox.py);
3. create the user namespace and ask hyperd to map it (``needs_id_map`` / ``mapped``);
4. become the namespace's root (host uid: the domain's private range), drop every host group;
5. unshare the mount, net, uts, ipc, pid and cgroup namespaces; a driver domain with ``nics``
   has hyperd move them into the new network namespace (``needs_nics`` / ``nics_given``);
6. fork the kernel, pid 1 of the new pid namespace; report its host pid (``kernel_pid N``) and
   exit. hyperd, the child subreaper, adopts the kernel.
"""

from __future__ import annotations

import json
import os
import socket
import sys

from channels import linux
from channels.ids import uid_base
from domu import kernel, sandbox

NAMESPACES = (
    linux.CLONE_NEWNS
    | linux.CLONE_NEWNET
    | linux.CLONE_NEWUTS
    | linux.CLONE_NEWIPC
    | linux.CLONE_NEWPID
    | linux.CLONE_NEWCGROUP
)


def _read_line(sync: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sync.recv(65536)
        if not chunk:
            raise ConnectionError("hyperd closed the boot sync socket")
        data += chunk
    return data


def main(argv: list[str]) -> int:
    """``argv``: the hypercall and sync descriptors' numbers."""
    hypercall_fd, sync_fd = int(argv[0]), int(argv[1])
    sync = socket.socket(fileno=sync_fd)
    params = json.loads(_read_line(sync))
    os.umask(0o022)  # hyperd's umask is private; the sandbox's directories must not be

    linux.unshare(linux.CLONE_NEWNS)
    sandbox.build_root(
        params["rootfs"], uid_base(int(params["domid"])), params["shm"], params.get("state_dir")
    )

    linux.unshare(linux.CLONE_NEWUSER)
    sync.sendall(b"needs_id_map\n")
    if _read_line(sync).strip() != b"mapped":
        raise ConnectionError("hyperd did not map the user namespace")
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)

    linux.unshare(NAMESPACES)
    if params.get("nics"):  # a driver domain's host interfaces, moved in before the kernel runs
        sync.sendall(b"needs_nics\n")
        if _read_line(sync).strip() != b"nics_given":
            raise ConnectionError("hyperd could not give the domain its nics (see its log)")
    pid = os.fork()
    if pid == 0:
        sync.close()
        try:
            if params.get("role") == "xenstore":  # the store's stub domain
                from domu import stubdom

                code = stubdom.main(params, hypercall_fd)
            else:
                code = kernel.main(params, hypercall_fd)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    sync.sendall(f"kernel_pid {pid}\n".encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
