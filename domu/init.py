"""The workload's init: the process the domain's programs descend from.

Forked by the domain kernel before it starts any thread, it enters the workload mount namespace
(private /dev/shm, /tmp, /run), becomes the child subreaper of everything the workload starts,
and runs the config's ``command`` as the unprivileged workload user, its stdio on the console's
terminal. An idle domain (no command) gets a shell on the console instead, restarted when it
exits, as a getty would. `hyperctl exec` enters this process's namespaces, so it must live as
long as the domain; it stays privileged inside the domain so the workload cannot kill it.

It tells the kernel how the command ended with one line on the status pipe:
``exit <waitstatus>``.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from channels import linux
from domu import sandbox

IDLE_SHELL = ["/bin/sh", "-i"]
RESPAWN_BACKOFF = 1.0


def _spawn(argv: list[str], tty_fd: int, env: dict[str, str]) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            os.login_tty(tty_fd)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            sandbox.drop_to_workload_user()
            os.chdir("/tmp")
            os.execvpe(argv[0], argv, env)
        except OSError as exc:
            os.write(2, f"hyper: cannot run {argv[0]}: {exc.strerror}\r\n".encode())
        os._exit(127)
    return pid


def _stop_everything(grace: float = 3.0) -> None:
    """Poweroff: TERM every process of the domain we can see, then KILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 1.0)):
        try:
            os.kill(-1, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                time.sleep(0.05)


class _Stop(Exception):
    """SIGTERM from the kernel: the domain is shutting down."""


def _on_term(signum: int, frame: object) -> None:
    raise _Stop


def main(params: dict[str, Any], tty_fd: int, status_fd: int) -> int:
    linux.set_comm("hyper-init")
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    sandbox.enter_workload_mounts()
    command = params.get("command")
    argv = list(command) if command else IDLE_SHELL
    env = sandbox.workload_env(params.get("env") or {}, params["name"])
    signal.signal(signal.SIGTERM, _on_term)
    try:
        _supervise(argv, bool(command), tty_fd, status_fd, env)
    except _Stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _stop_everything()
    return 0


def _supervise(
    argv: list[str], report: bool, tty_fd: int, status_fd: int, env: dict[str, str]
) -> None:
    main_pid = _spawn(argv, tty_fd, env)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            # Nothing left to wait for (cannot happen while main_pid runs): wait for a signal.
            signal.pause()
            continue
        if pid != main_pid:
            continue  # an orphan we adopted as subreaper
        if report:
            os.write(status_fd, f"exit {status}\n".encode())
            return
        time.sleep(RESPAWN_BACKOFF)  # a shell that dies at once must not spin
        main_pid = _spawn(argv, tty_fd, env)
