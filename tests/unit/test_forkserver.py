"""The fork server (channels/forkserver.py): a child runs what it was asked to with exactly what
it was given, is its requester's child, and a bad request costs the server nothing. No root
needed; each child's entry point is in tests/unit/forkserver_children.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from channels.errors import BadInput, Closed
from channels.forkserver import DEVNULL, PIPE, STDOUT, ChildSetup, ForkServer, ForkServerError
from channels.waiting import readable

CHILDREN = "tests.unit.forkserver_children"
# A module the test process has no reason to import: seen in a child, it came from the server.
UNUSED = "colorsys"
PRELOAD = [CHILDREN, UNUSED]
REPORT_FD = 7
TIMEOUT = 30.0
REPO = Path(__file__).resolve().parents[2]


def _other_threads(timeout: float = 5.0) -> list[str]:
    """The names of this process's other threads, once those that are ending have ended (an
    earlier test's threads may still be on their way out; /proc/self/task lags a join)."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))
    me = str(threading.get_native_id())
    while True:
        others = [t for t in os.listdir("/proc/self/task") if t != me]
        if not others or time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    names = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    for tid in others:
        with contextlib.suppress(OSError):
            names.append(f"task {tid} ({Path(f'/proc/self/task/{tid}/comm').read_text().strip()})")
    return names if others else []


# Fork first: a thread of an earlier test may not have left the process yet (/proc/self/task).
@pytest.fixture(params=["fork", "exec"])
def server(request: pytest.FixtureRequest) -> Iterator[ForkServer]:
    if request.param == "fork" and (others := _other_threads()):
        pytest.skip(f"a fork-mode server needs a single-threaded requester; alive: {others}")
    fs = ForkServer.start(PRELOAD, fork=request.param == "fork")
    try:
        fs.wait_ready(TIMEOUT)
        yield fs
    finally:
        fs.close()


@pytest.fixture
def exec_server() -> Iterator[ForkServer]:
    with ForkServer.start(PRELOAD) as fs:
        fs.wait_ready(TIMEOUT)
        yield fs


def read_to_end(fd: int) -> bytes:
    data = b""
    while True:
        assert readable([fd], TIMEOUT), "the child did not finish writing"
        chunk = os.read(fd, 65536)
        if not chunk:
            return data
        data += chunk


def report(fs: ForkServer, *extra: str, **spawn: Any) -> dict[str, Any]:
    """Run the reporting child with ``spawn``'s arguments; what it saw of itself."""
    r, w = os.pipe()
    try:
        fds = {REPORT_FD: w, **spawn.pop("pass_fds", {})}
        child = fs.spawn(f"{CHILDREN}:report", [str(REPORT_FD), *extra], pass_fds=fds, **spawn)
        os.close(w)
        w = -1
        data = read_to_end(r)
        assert child.wait(TIMEOUT) == 0
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    result: dict[str, Any] = json.loads(data)
    return result


def zombies() -> list[int]:
    """Our children that have exited and were not collected."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state == "Z" and int(ppid) == os.getpid():
            found.append(int(entry.name))
    return found


def link(fd: int, pid: int | str = "self") -> str:
    return os.readlink(f"/proc/{pid}/fd/{fd}")


# -- running, and being the requester's child --------------------------------------------------


def test_exit_status_reaches_the_requester(server: ForkServer) -> None:
    child = server.spawn(f"{CHILDREN}:exit_with", ["42"])
    assert child.wait(TIMEOUT) == 42
    assert child.returncode == 42
    child.close()
    assert child.pidfd is None


def test_two_threads_waiting_on_one_child_both_see_its_status(server: ForkServer) -> None:
    """The pidfd stays open while anyone may wait on it: a second waiter never polls a closed
    (and maybe reused) descriptor."""
    child = server.spawn(f"{CHILDREN}:exit_with", ["7"])
    codes: list[int] = []
    waiters = [threading.Thread(target=lambda: codes.append(child.wait(TIMEOUT))) for _ in range(2)]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join(TIMEOUT)
    assert codes == [7, 7]
    child.close()


def test_child_is_the_requesters_child(server: ForkServer) -> None:
    seen = report(server)
    assert seen["ppid"] == os.getpid()
    child = server.spawn(f"{CHILDREN}:exit_with", ["5"])
    pid, status = os.waitpid(child.pid, 0)  # as hyperd's SIGCHLD loop does
    assert pid == child.pid and os.waitstatus_to_exitcode(status) == 5
    child.close()


def test_exception_is_printed_and_is_status_1(server: ForkServer) -> None:
    child = server.spawn(f"{CHILDREN}:fail", stdout=DEVNULL, stderr=PIPE)
    assert child.stderr is not None
    assert b"RuntimeError: this child fails on purpose" in child.stderr.read()
    assert child.wait(TIMEOUT) == 1
    child.close()


def test_kill_is_seen_as_the_signal(server: ForkServer) -> None:
    r, w = os.pipe()
    child = server.spawn(f"{CHILDREN}:wait_for_eof", ["9"], stdin=PIPE, pass_fds={9: w})
    os.close(w)
    assert read_to_end(r) == b"r"  # it runs
    os.close(r)
    assert child.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(0)
    child.kill()
    assert child.wait(TIMEOUT) == -signal.SIGKILL
    child.close()


def test_pipes_as_popen(server: ForkServer) -> None:
    child = server.spawn(f"{CHILDREN}:echo", stdin=PIPE, stdout=PIPE, stderr=PIPE)
    assert child.stdin and child.stdout and child.stderr
    child.stdin.write(b"ring\n")
    child.stdin.close()
    assert child.stdout.read() == b"RING\n"
    assert child.stderr.read() == b"echoed\n"
    assert child.wait(TIMEOUT) == 0
    child.close()


def test_child_can_start_threads_fork_and_run_programs(server: ForkServer) -> None:
    assert server.spawn(f"{CHILDREN}:threads_and_fork").wait(TIMEOUT) == 0


# -- what a child holds ----------------------------------------------------------------------------


def test_child_holds_exactly_the_descriptors_it_was_given(server: ForkServer) -> None:
    given_r, given_w = os.pipe()
    ours, theirs = socket.socketpair()
    stray = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(stray, True)  # Popen(close_fds=False) would leak this one
    # The server's end of its socket, as the server holds it (its only socket).
    server_fds = os.listdir(f"/proc/{server.pid}/fd")
    server_sockets = {link(int(fd), server.pid) for fd in server_fds} - {"/dev/null"}
    try:
        seen = report(
            server,
            stdin=DEVNULL,
            stdout=given_w,
            stderr=STDOUT,
            pass_fds={12: theirs.fileno(), 40: given_r},
        )
    finally:
        for fd in (given_r, given_w, stray):
            os.close(fd)
        ours.close()
        theirs.close()
    assert seen["fds"] == [0, 1, 2, REPORT_FD, 12, 40]
    links = seen["fd_links"]
    assert links["0"] == "/dev/null"
    assert links["1"] == links["2"] and links["1"].startswith("pipe:")
    assert links["12"].startswith("socket:")
    assert len(server_sockets) == 1 and next(iter(server_sockets)).startswith("socket:")
    assert not server_sockets & set(links.values())


def test_no_stdio_unless_given(exec_server: ForkServer) -> None:
    r, w = os.pipe()
    saved = [os.dup(fd) for fd in (0, 1, 2)]
    try:
        for fd in (0, 1, 2):  # a requester with no stdio of its own passes none
            os.close(fd)
        child = exec_server.spawn(f"{CHILDREN}:report", ["9"], pass_fds={9: w})
        os.close(w)
        data = read_to_end(r)
        assert child.wait(TIMEOUT) == 0
        child.close()  # before its pidfd's number (0, 1 or 2) is ours again
    finally:
        for fd, copy in zip((0, 1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(r)
    seen = json.loads(data)
    assert seen["fds"] == [9] and seen["stdio"] == [False, False, False]


def test_environment_is_exactly_the_one_asked(server: ForkServer) -> None:
    seen = report(server, env={"ONLY": "this", "EMPTY": ""})
    assert seen["env"] == {"ONLY": "this", "EMPTY": ""}


def test_requester_environment_stays_out_of_an_exec_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not even in the start-up environment block a child inherits from the server."""
    monkeypatch.setenv("HYPER_TEST_SECRET", "do-not-copy")
    with ForkServer.start(PRELOAD) as fs:
        seen = report(fs, env={"ONLY": "this"})
    assert "HYPER_TEST_SECRET" not in seen["proc_environ"]
    assert seen["env"] == {"ONLY": "this"}


def test_preloaded_modules_are_already_imported(server: ForkServer) -> None:
    if UNUSED in sys.modules:
        pytest.skip(f"this test process imported {UNUSED} itself")
    seen = report(server, UNUSED, "channels.forkserver")
    assert seen["preloaded"] == [UNUSED, "channels.forkserver"]
    assert seen["argv"] == [CHILDREN, str(REPORT_FD), UNUSED, "channels.forkserver"]


def test_setup_is_applied(server: ForkServer, tmp_path: Path) -> None:
    setup = ChildSetup(cwd=str(tmp_path), new_session=True, comm="hyper-test", umask=0o027)
    seen = report(server, setup=setup)
    assert seen["cwd"] == str(tmp_path)
    assert seen["sid"] == seen["pid"] != os.getsid(0)
    assert seen["comm"] == "hyper-test"
    assert seen["umask"] == 0o027
    assert seen["sigint"] == repr(signal.default_int_handler)
    assert seen["sigterm"] == repr(signal.SIG_DFL)


def test_a_fresh_interpreter_child_shares_nothing_of_the_servers_memory(
    exec_server: ForkServer, tmp_path: Path
) -> None:
    """Set up as any child (descriptors, name, directory, still our child), but a new
    interpreter: it imports its entry point itself and hashes strings with a secret of its own,
    where two forked children share the server's."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    env["PYTHONPATH"] = str(REPO)
    forked = [report(exec_server, UNUSED, env=env) for _ in range(2)]
    setup = ChildSetup(cwd=str(tmp_path), comm="hyper-fresh", fresh_interpreter=True)
    fresh = report(exec_server, UNUSED, env=env, stdin=DEVNULL, setup=setup)
    assert forked[0]["str_hash"] == forked[1]["str_hash"]
    assert fresh["str_hash"] != forked[0]["str_hash"]
    assert forked[0]["preloaded"] == [UNUSED] and fresh["preloaded"] == []
    assert fresh["ppid"] == os.getpid()
    assert fresh["fds"] == [0, 1, 2, REPORT_FD]
    assert fresh["comm"] == "hyper-fresh"
    assert fresh["cwd"] == str(tmp_path)
    assert fresh["argv"] == [CHILDREN, str(REPORT_FD), UNUSED]


# -- bad requests ---------------------------------------------------------------------------------


def assert_still_serves(fs: ForkServer) -> None:
    assert fs.spawn(f"{CHILDREN}:exit_with", ["3"]).wait(TIMEOUT) == 3


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("no.such.module", "not preloaded"),
        (f"{CHILDREN}:no_such_function", "has no function"),
        (f"{CHILDREN}:json", "has no function"),  # a module is no entry point
        ("os; import this", "bad entry point"),
        ("", "bad entry point"),
    ],
)
def test_unknown_entry_is_refused(exec_server: ForkServer, entry: str, why: str) -> None:
    with pytest.raises(BadInput, match=why):
        exec_server.spawn(entry)
    assert_still_serves(exec_server)


def test_bad_descriptors_are_refused(exec_server: ForkServer) -> None:
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(BadInput, match="descriptor"):
        exec_server.spawn(f"{CHILDREN}:exit_with", ["0"], pass_fds={5: w})  # closed
    with pytest.raises(BadInput, match="descriptor numbers"):
        exec_server.spawn(f"{CHILDREN}:exit_with", ["0"], pass_fds={-1: r})
    with pytest.raises(BadInput, match="given twice"):
        exec_server.spawn(f"{CHILDREN}:exit_with", ["0"], stdin=r, pass_fds={0: r})
    os.close(r)
    assert_still_serves(exec_server)


def test_malformed_messages_get_an_error_reply(exec_server: ForkServer) -> None:
    exec_server.wait_ready()
    for raw in (b"not json", b"[1, 2]", json.dumps({"entry": f"{CHILDREN}:report"}).encode()):
        reply, fds = exec_server._exchange_raw(raw)
        assert fds == [] and reply["kind"] == "bad_input", reply
    assert_still_serves(exec_server)


def test_failed_setup_is_an_error_and_leaves_no_zombie(exec_server: ForkServer) -> None:
    with pytest.raises(ForkServerError, match="No such file"):
        exec_server.spawn(f"{CHILDREN}:exit_with", ["0"], setup=ChildSetup(cwd="/nonexistent"))
    with pytest.raises(ForkServerError, match=r"cgroup\.procs"):
        exec_server.spawn(
            f"{CHILDREN}:exit_with", ["0"], setup=ChildSetup(cgroup_procs=("/no/cgroup.procs",))
        )
    assert zombies() == []  # both were collected
    assert_still_serves(exec_server)


# -- the server's own life ------------------------------------------------------------------------


def test_server_goes_away_when_closed() -> None:
    fs = ForkServer.start(PRELOAD)
    fs.wait_ready(TIMEOUT)
    fs.close()
    assert fs.process.returncode == 0
    with pytest.raises(Closed):
        fs.spawn(f"{CHILDREN}:exit_with", ["0"])


@pytest.mark.parametrize("mode", ["exec", "fork"])
def test_server_dies_with_its_requester(mode: str) -> None:
    r, w = os.pipe()
    requester = subprocess.Popen(
        [sys.executable, "-m", CHILDREN, str(w), mode],
        pass_fds=[w],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    os.close(w)
    try:
        line = b""
        while not line.endswith(b"\n"):
            assert readable([r], TIMEOUT), "the requester did not start its server"
            chunk = os.read(r, 64)
            assert chunk, "the requester ended early"
            line += chunk
        server_pid = int(line)
        pidfd = os.pidfd_open(server_pid)
        assert not readable([pidfd], 0)
        requester.kill()
        assert readable([pidfd], TIMEOUT), "the fork server outlived its requester"
        os.close(pidfd)
    finally:
        os.close(r)
        requester.kill()
        requester.wait()


def test_many_children_from_several_threads(server: ForkServer) -> None:
    def run(n: int) -> int:
        return server.spawn(f"{CHILDREN}:exit_with", [str(n)]).wait(TIMEOUT)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, range(40)))
    assert results == list(range(40))


def test_fork_mode_refuses_a_threaded_requester() -> None:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        with pytest.raises(BadInput, match="threads"):
            ForkServer.start(PRELOAD, fork=True)
    finally:
        stop.set()
        thread.join()
