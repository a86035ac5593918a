"""One spawn path: a fork server that starts hyper's Python processes without an interpreter start.

Why. A process started as ``python -m xenstored.relay`` pays the interpreter's start (36 ms here)
and then imports what it needs (250-400 ms for pydantic, pyroute2 and channels), and each keeps a
private copy of every module it imported (20-30 MiB PSS). A fork server imports those modules
once, while it is still small and single-threaded, and forks one child per request: the child
starts with everything imported and shares those pages with the server and its siblings for as
long as nobody writes them (``gc.freeze`` keeps the collector from writing them).

Who runs one. Every process that starts others runs its own, as its child, started early
(``ForkServer.start``), so a child has its requester's privileges, namespaces and cgroup to
start from and nothing of what the requester learnt later: hyperd's (host root: dom0, the domain
boot processes, the fd keeper), dom0's (host root: relays, data-path workers, which drop their
privilege themselves) and a domain kernel's (inside the sandbox: its FUSE servers).

A child is the requester's child, not the server's. The server creates it with
``clone(CLONE_PARENT | CLONE_PIDFD)``: the kernel makes the server's parent (the requester) the
child's parent, so the requester's ``waitpid``, SIGCHLD and child-subreaper handling and a
child's ``getppid()`` (a relay watches dom0 through it) work as with ``subprocess.Popen``; the
pidfd the clone returns goes back to the requester, which waits on it (``waitid(P_PIDFD)``) and
signals through it with no pid-reuse race. Rejected:

- ``os.fork()`` in the server, which reaps and reports exit statuses: the requester's SIGCHLD
  and ``waitpid`` would see nothing, hyperd's reaping of domains, a relay's watch on dom0 and a
  domain kernel's reaper would all change, and statuses would arrive after pidfd readiness.
- a double fork into a requester that is a child subreaper: real ``fork(2)`` semantics, but
  two forks, and every requester would have to adopt every orphan beneath it.

The cost of CLONE_PARENT: ``fork(2)`` of glibc is bypassed, so the C library's ``pthread_atfork``
handlers do not run in the child, and the thread descriptor of the child's main thread keeps the
server's tid. glibc's own handlers only re-initialise locks that are free in a single-threaded
server; CPython's after-fork work runs (``PyOS_BeforeFork`` / ``PyOS_AfterFork_Child``, the
public API for "fork() or any similar function": threading, the import lock, ``random``'s reseed,
``os.register_at_fork`` hooks); the tid is read with ``gettid(2)`` by CPython and by glibc's
``raise``. A C library that relies on its own atfork handler (OpenSSL's random generator) must not
be preloaded. The server is single-threaded by construction (it starts no thread), which is what
makes forking it safe at all.

What a child gets, and nothing else: exactly the descriptors the request carried (SCM_RIGHTS),
at the numbers it named, every other one closed (``close_range``), the fork server's socket
included; the environment it named (``os.environ``: what the interpreter read at start, such as
``PYTHONHASHSEED``, is the server's); then, as the request says, the cgroup it joins before it
runs (``cgroup.procs`` files, v1 or v2), a new session, a umask, a directory, a name for ``ps``.
Signal dispositions and the signal mask are a fresh interpreter's. The child then calls the
entry point ``module:function`` (default ``main``) with its arguments (what follows the program
name, as ``argparse`` takes them) and exits with what it returns, as ``python -m`` would: non-daemon
threads joined, ``atexit`` run, stdio flushed, then ``os._exit``. Not ``runpy`` as ``__main__``:
that would run the module's body again (a second copy of each of its classes, its import-time
work again, its code read from disk, which a sandboxed child may not reach), where calling the
already-imported function costs nothing and the server can check that it exists before forking.

What the server never does: run code a request names. It reads a request, checks it (the entry
must be a module it already imported: nothing is imported on request), forks, and waits for the
child to finish its setup (a pipe the child closes, or writes why it failed to): so a spawn
fails with the reason, as ``Popen`` does when ``exec`` fails, and a request it cannot use gets an
error reply, never its death. It dies with its requester: ``PR_SET_PDEATHSIG`` (the requester
thread that started it must live as long: start it from the main thread) and end of file on its
socket. Idle, it sleeps in ``recvmsg``.

Two ways to start it. ``exec`` (the default) runs ``python -c`` of this module with a minimal
environment: safe from a requester with threads, and a child carries nothing of the requester's
memory. ``fork`` forks the requester itself, which must be single-threaded: no interpreter start
and no second copy of the modules, for a requester whose memory is its children's to see (a
domain kernel, whose FUSE servers serve the same domain).

Wire (one SOCK_SEQPACKET message each way, JSON): the server says ``{"ready": pid}`` (or
``{"error", "kind"}``) once it has imported its modules; then per request ``{"entry", "argv",
"env", "fds": [target numbers, in the order of the SCM_RIGHTS descriptors], "cwd", "session",
"cgroup_procs", "comm", "umask", "fresh"}``, answered by ``{"pid"}`` with the child's pidfd
attached, or ``{"error", "kind"}`` (with ``pid`` and the pidfd too if a child was made and must
be reaped).
"""

from __future__ import annotations

import array
import atexit
import contextlib
import ctypes
import fcntl
import gc
import importlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, NoReturn

from channels import linux
from channels.errors import KINDS, BadInput, Closed, HyperError
from channels.waiting import readable

PIPE: Final = subprocess.PIPE
DEVNULL: Final = subprocess.DEVNULL
STDOUT: Final = subprocess.STDOUT

#: The largest request or reply (argv and environment included): below a SOCK_SEQPACKET
#: socket's default send buffer, so a message is never too large for the kernel.
MAX_MESSAGE = 1 << 17
#: Descriptors one message carries (the kernel's SCM_MAX_FD).
SCM_MAX_FD = 253
#: Target descriptor numbers a request may name (the kernel's default ``fs.nr_open``).
MAX_FD_NUMBER = 1 << 20
#: How long a client waits for its server to have imported its modules.
READY_TIMEOUT = 60.0
#: The exit status of a child whose setup failed (the requester sees the reason instead).
SETUP_FAILED = 127

# <linux/sched.h>, <asm/unistd.h>
CLONE_PIDFD = 0x00001000
CLONE_PARENT = 0x00008000
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(os.uname().machine)
_SYS_CLOSE_RANGE = 436  # every architecture (the common syscall table)

_ENTRY = re.compile(r"[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?\Z")
_SOURCE_ROOT = str(Path(__file__).resolve().parents[1])
_SERVER_CODE = "import sys; from channels.forkserver import main; sys.exit(main(sys.argv[1:]))"
_FRESH_CODE = (
    "import sys; from channels.forkserver import fresh_main; sys.exit(fresh_main(sys.argv[1:]))"
)

# PyDLL: the GIL stays held across the clone, as os.fork holds it across fork(2).
_pysys = ctypes.PyDLL(None, use_errno=True)
_syscall = _pysys.syscall
_syscall.restype = ctypes.c_long
for _name in ("PyOS_BeforeFork", "PyOS_AfterFork_Parent", "PyOS_AfterFork_Child"):
    getattr(ctypes.pythonapi, _name).restype = None
    getattr(ctypes.pythonapi, _name).argtypes = []


class ForkServerError(HyperError):
    """A child could not be started: its setup failed (the reason says which step)."""


# -- the requester's side -------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildSetup:
    """What a child does before its entry point runs, besides taking its descriptors and
    environment. ``cgroup_procs``: ``cgroup.procs`` files it writes itself into (one per v1
    controller, or the v2 group's), so that it runs nothing outside its group."""

    cwd: str | None = None
    new_session: bool = False
    cgroup_procs: tuple[str, ...] = ()
    comm: str | None = None
    umask: int | None = None
    #: Set up as any child, then ``exec`` a new interpreter that imports the entry point and
    #: runs it: for a child that must not share the server's memory, the string-hash secret
    #: above all (dom0: the domains' kernels come from the same server and hash what dom0
    #: hashes). Costs an interpreter start and the imports.
    fresh_interpreter: bool = False


StdioSpec = int | IO[Any] | None


class Child:
    """A process a fork server started for us: ``subprocess.Popen``'s handle, less
    ``communicate``. It is our child (``waitpid`` works), and ``pidfd`` refers to it until its
    exit status is collected. As with ``Popen``, a child someone else reaped (a ``waitpid(-1)``
    loop) reads as exit status 0 unless that reaper sets ``returncode``."""

    def __init__(self, pid: int, pidfd: int, args: Sequence[str]) -> None:
        self.pid = pid
        self.pidfd: int | None = pidfd
        self.args = list(args)
        self.returncode: int | None = None
        self.stdin: IO[bytes] | None = None
        self.stdout: IO[bytes] | None = None
        self.stderr: IO[bytes] | None = None
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        return self._collect(0.0)

    def wait(self, timeout: float | None = None) -> int:
        """The exit status (negative: the signal that killed it); ``subprocess.TimeoutExpired``
        after ``timeout`` seconds, as ``Popen.wait``."""
        code = self._collect(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return code

    def _collect(self, timeout: float | None) -> int | None:
        pidfd = self.pidfd
        if self.returncode is not None or pidfd is None:
            return self.returncode
        # A pidfd is readable once the process has exited: no polling, no pid reuse. It stays
        # open until close(): another thread may be waiting on it right now, and a number
        # closed under a waiter could be reused by a descriptor that never becomes readable.
        if not readable([pidfd], timeout):
            return None
        with self._lock:
            if self.returncode is None and self.pidfd is not None:
                try:
                    result = os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG)
                except ChildProcessError:
                    result = None
                    self.returncode = 0  # collected by another waiter: what Popen says too
                if result is not None:
                    exited = result.si_code == os.CLD_EXITED
                    self.returncode = result.si_status if exited else -result.si_status
        return self.returncode

    def send_signal(self, signum: int) -> None:
        with self._lock:
            if self.returncode is None and self.pidfd is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self.pidfd, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _close_pidfd(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def close(self) -> None:
        """Our ends of its pipes, and the pidfd (the child is not waited for)."""
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        with self._lock:
            self._close_pidfd()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        """As ``Popen``'s: close our pipe ends, then wait for it."""
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self.wait()

    def __del__(self) -> None:
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)


class ForkServer:
    """Our fork server: start it early, ``spawn`` from any thread, ``close`` it (or just exit:
    it dies with us). A spawn is one round trip; concurrent ones take turns."""

    def __init__(self, sock: socket.socket, process: Child, mode: str) -> None:
        self._sock = sock
        self.process = process  # the server itself, our child
        self.mode = mode
        self._lock = threading.Lock()
        self._ready = False
        self._closed = False

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(
        cls,
        preload: Sequence[str],
        *,
        fork: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> ForkServer:
        """A fork server that has imported ``preload`` (and what they import). ``fork``: fork
        this process, which must be single-threaded (the module docstring says when); else run
        a new interpreter with ``env`` (default: PATH, and PYTHONPATH pointing at hyper's code).
        Returns at once; the first ``spawn`` (or ``wait_ready``) waits for the imports."""
        for module in preload:
            if not _ENTRY.match(module) or ":" in module:
                raise BadInput(f"fork server: {module!r} is no module name")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            if fork:
                process = _fork_server(ours, theirs, list(preload))
            else:
                process = _exec_server(theirs, list(preload), env)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(ours, process, "fork" if fork else "exec")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Once the server has imported its modules; Closed if it failed or died."""
        with self._lock:
            self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        if self._ready:
            return
        if self._closed:
            raise Closed("fork server: closed")
        if not readable([self._sock.fileno()], timeout):
            raise Closed(f"fork server {self.pid}: not ready after {timeout:.0f} s")
        message, fds = _receive(self._sock)
        _close_all(fds)
        if message is None or "ready" not in message:
            reason = message.get("error", "no reason") if message else "it exited"
            raise Closed(f"fork server {self.pid} did not start: {reason}")
        self._ready = True

    def spawn(
        self,
        entry: str,
        argv: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        stdin: StdioSpec = None,
        stdout: StdioSpec = None,
        stderr: StdioSpec = None,
        pass_fds: Sequence[int] | Mapping[int, int] = (),
        setup: ChildSetup = ChildSetup(),  # frozen: one shared default
    ) -> Child:
        """Run ``entry`` (``module:function``, or ``module`` for its ``main``) in a new child
        with ``argv``. ``env``: its whole environment (None: ours, now). Stdio as ``Popen``'s
        (None: ours; PIPE, DEVNULL, STDOUT for stderr, a descriptor or a file). ``pass_fds``:
        descriptors it keeps under the same numbers, or a mapping {its number: our descriptor}.
        BadInput for a request the server refuses, ForkServerError if the child's setup failed,
        Closed if the server is gone."""
        plan = _Plan()
        try:
            plan.stdio(0, stdin, readonly=True)
            plan.stdio(1, stdout, readonly=False)
            plan.stdio(2, stderr, readonly=False)
            items = (
                pass_fds.items() if isinstance(pass_fds, Mapping) else ((f, f) for f in pass_fds)
            )
            for target, source in items:
                plan.give(target, source)
            request = {
                "entry": entry,
                "argv": list(argv),
                "env": dict(os.environ if env is None else env),
                "fds": list(plan.targets),
                "cwd": setup.cwd,
                "session": setup.new_session,
                "cgroup_procs": list(setup.cgroup_procs),
                "comm": setup.comm,
                "umask": setup.umask,
                "fresh": setup.fresh_interpreter,
            }
            reply, fds = self._exchange(request, list(plan.targets.values()))
        except BaseException:
            plan.close_ours()
            raise
        finally:
            plan.close_theirs()
        return self._child(reply, fds, plan, [entry, *argv])

    def _exchange(
        self, request: dict[str, Any], fds: list[int]
    ) -> tuple[dict[str, Any], list[int]]:
        data = json.dumps(request).encode()
        if len(data) > MAX_MESSAGE:
            raise BadInput(f"fork server: a request of {len(data)} bytes (at most {MAX_MESSAGE})")
        for fd in fds:
            try:
                os.fstat(fd)
            except OSError as exc:
                raise BadInput(f"fork server: descriptor {fd} to pass: {exc.strerror}") from exc
        with self._lock:
            self._wait_ready(READY_TIMEOUT)
            try:
                _send(self._sock, data, fds)
                reply, received = _receive(self._sock)
            except OSError as exc:
                raise Closed(f"fork server {self.pid}: {exc.strerror or exc}") from exc
        if reply is None:
            raise Closed(f"fork server {self.pid} has exited")
        return reply, received

    def _exchange_raw(self, data: bytes) -> tuple[dict[str, Any], list[int]]:
        """Send ``data`` as a request, as is (the tests' malformed ones); the reply."""
        with self._lock:
            self._wait_ready(READY_TIMEOUT)
            _send(self._sock, data, [])
            reply, fds = _receive(self._sock)
        if reply is None:
            raise Closed(f"fork server {self.pid} has exited")
        return reply, fds

    def _child(self, reply: dict[str, Any], fds: list[int], plan: _Plan, args: list[str]) -> Child:
        pidfd = fds[0] if fds else None
        _close_all(fds[1:])
        child = Child(int(reply["pid"]), pidfd, args) if pidfd is not None else None
        if "error" in reply:
            plan.close_ours()
            if child is not None:
                child.wait()  # it exits as soon as it has said why
            kind = KINDS.get(str(reply.get("kind")), ForkServerError)
            if kind is HyperError:
                kind = ForkServerError
            raise kind(f"fork server: {reply['error']}")
        if child is None:
            raise Closed(f"fork server {self.pid}: a reply without the child's pidfd")
        child.stdin, child.stdout, child.stderr = plan.ours
        return child

    def close(self, timeout: float = 5.0) -> None:
        """Hang up; the server exits on end of file. Returns once it has (killed after
        ``timeout`` seconds)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._sock.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Spawner:
    """A process's fork server, started on first use and again if it died: what a long-lived
    requester (hyperd, dom0) holds. ``owns(pid)`` tells a ``waitpid(-1)`` loop that a status
    it collected was the server's, which is then started afresh at the next spawn."""

    def __init__(
        self, preload: Sequence[str], *, fork: bool = False, env: Mapping[str, str] | None = None
    ) -> None:
        self.preload = list(preload)
        self.fork = fork
        self.env = env
        self._server: ForkServer | None = None
        self._lock = threading.Lock()

    def server(self) -> ForkServer:
        with self._lock:
            server = self._server
            if server is None or server.process.poll() is not None:
                if server is not None:
                    server.close(timeout=0.0)
                    # Its requester may have threads by now: a new one is a new interpreter.
                    self.fork = False
                server = self._server = ForkServer.start(self.preload, fork=self.fork, env=self.env)
            return server

    def start(self) -> None:
        """Start the server now (its imports overlap whatever the requester does next). A
        fork server forks only a single-threaded requester: one with threads (dom0's main run
        inside a test, say) gets a new interpreter instead."""
        if self.fork and threading.active_count() > 1:
            self.fork = False
        self.server()

    def owns(self, pid: int) -> bool:
        server = self._server
        if server is None or server.pid != pid:
            return False
        server.process.returncode = 0  # collected by the caller's waitpid: it is gone
        return True

    def close(self) -> None:
        with self._lock:
            if self._server is not None:
                self._server.close()
                self._server = None


class _Plan:
    """The descriptors of one spawn: which of ours goes to which number of the child's; the
    ones opened for it (ours to close once sent) and our ends of its pipes."""

    def __init__(self) -> None:
        self.targets: dict[int, int] = {}
        self.opened: list[int] = []
        self.ours: list[IO[bytes] | None] = [None, None, None]

    def give(self, target: int, source: int) -> None:
        if target in self.targets:
            raise BadInput(f"fork server: descriptor {target} given twice")
        self.targets[target] = source

    def stdio(self, target: int, spec: StdioSpec, readonly: bool) -> None:
        if spec is None:
            if _is_open(target):
                self.give(target, target)
        elif spec == STDOUT and target == 2:
            if 1 in self.targets:
                self.give(2, self.targets[1])
        elif spec == DEVNULL:
            self.opened.append(os.open(os.devnull, os.O_RDONLY if readonly else os.O_WRONLY))
            self.give(target, self.opened[-1])
        elif spec == PIPE:
            r, w = os.pipe()
            self.opened.append(r if readonly else w)
            self.ours[target] = os.fdopen(w if readonly else r, "wb" if readonly else "rb")
            self.give(target, self.opened[-1])
        elif isinstance(spec, int):
            self.give(target, spec)
        else:
            self.give(target, spec.fileno())

    def close_theirs(self) -> None:
        _close_all(self.opened)
        self.opened = []

    def close_ours(self) -> None:
        for stream in self.ours:
            if stream is not None:
                stream.close()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _exec_server(theirs: socket.socket, preload: list[str], env: Mapping[str, str] | None) -> Child:
    """A new interpreter running the server on ``theirs`` (its descriptor 3)."""
    if env is None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": _SOURCE_ROOT}
    argv = [sys.executable, "-P", "-c", _SERVER_CODE, str(os.getpid()), *preload]
    # posix_spawn: no Popen object whose bookkeeping (subprocess._cleanup) could collect the
    # server's status behind our back; safe with threads (glibc spawns with CLONE_VFORK).
    pid = os.posix_spawn(
        sys.executable,
        argv,
        dict(env),
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, theirs.fileno(), 3),  # dup2 clears close-on-exec
        ],
        setsigmask=(),
        setsigdef=_catchable_signals(),
    )
    return Child(pid, os.pidfd_open(pid), argv)


def _fork_server(ours: socket.socket, theirs: socket.socket, preload: list[str]) -> Child:
    """Fork this process into the server (it must be single-threaded)."""
    tasks = len(os.listdir("/proc/self/task"))
    if tasks != 1 or threading.active_count() != 1:
        raise BadInput(f"fork server: cannot fork a process of {tasks} threads")
    requester = os.getpid()
    # What we hold now stays shared with the server only if neither side's collector writes
    # it: collect once, and freeze it here (in us) as the server does in itself.
    gc.collect()
    gc.freeze()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ours.detach()
            code = serve(theirs, preload, requester, forked=True)
        finally:
            os._exit(code)
    return Child(pid, os.pidfd_open(pid), ["forkserver", *preload])


# -- the server -----------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """The server run by ``ForkServer.start`` without ``fork``: ``REQUESTER_PID MODULE...``,
    its socket on descriptor 3."""
    return serve(socket.socket(fileno=3), argv[1:], int(argv[0]), forked=False)


def serve(sock: socket.socket, preload: list[str], requester: int, forked: bool) -> int:
    """Answer requests on ``sock`` until it reaches its end, or the requester dies."""
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != requester:
        return 0  # it died before the line above: nobody to serve
    with contextlib.suppress(OSError):
        linux.set_comm("hyper-forksrv")
    sock = _settle(sock, forked)
    try:
        for module in preload:
            importlib.import_module(module)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            _send(sock, _encode({"error": f"importing {module}: {exc!r}", "kind": "failed"}), [])
        return 1
    # Children share the server's pages until they write them: keep the collector from
    # writing the header of every object it scans. A forked server's requester collected and
    # froze before the fork (``_fork_server``); a collection here would write every page it
    # still shares with it. Freezing only moves the collector's lists: it writes no object.
    if not forked:
        gc.collect()
    gc.freeze()
    try:
        _send(sock, _encode({"ready": os.getpid()}), [])
        while True:
            request, fds = _receive(sock)
            if request is None:
                return 0
            try:
                reply, pidfd = _answer(sock, request, fds)
            except Exception as exc:  # a bug of ours: this request fails, the server stays
                reply, pidfd = {"error": f"internal error: {exc!r}", "kind": "failed"}, None
            try:
                _send(sock, _encode(reply), [pidfd] if pidfd is not None else [])
            finally:
                if pidfd is not None:
                    os.close(pidfd)
    except OSError:
        return 0  # the requester hung up or died


def _settle(sock: socket.socket, forked: bool) -> socket.socket:
    """Hold nothing of the requester's but the socket: no other descriptor (0-2 on /dev/null),
    default signal dispositions but SIGINT's (a terminal's ^C is the requester's to handle),
    no blocked signal; and, forked, none of its logging handlers or stdio objects."""
    fd = fcntl.fcntl(sock.detach(), fcntl.F_DUPFD_CLOEXEC, 3)
    if forked:
        signal.set_wakeup_fd(-1)
        if "logging" in sys.modules:
            _forget_logging()
    _close_all_but([fd])
    for target in (0, 1, 2):
        null = os.open(os.devnull, os.O_RDWR)
        if null != target:
            os.dup2(null, target)
            os.close(null)
    sys.stdin, sys.stdout, sys.stderr = _fresh_stdio({0, 1, 2})
    for signum in _catchable_signals():
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    return socket.socket(fileno=fd)


def _forget_logging() -> None:
    import logging

    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        if isinstance(logger, logging.Logger):
            for handler in list(logger.handlers):
                logger.removeHandler(handler)


def _answer(
    sock: socket.socket, request: dict[str, Any], fds: list[int]
) -> tuple[dict[str, Any], int | None]:
    """Start the child a request asks for: the reply, and the child's pidfd if there is one."""
    try:
        try:
            _check(request, fds)
        except ValueError as exc:
            return {"error": str(exc), "kind": BadInput.kind}, None
        errors_r, errors_w = os.pipe()
        try:
            pid, pidfd = _clone_parent()
        except OSError as exc:
            os.close(errors_r)
            os.close(errors_w)
            return {"error": f"clone: {exc.strerror}", "kind": "failed"}, None
        if pid == 0:
            _become_child(request, fds, errors_w, sock)
        os.close(errors_w)
        why = _read_to_end(errors_r)
        os.close(errors_r)
    finally:
        _close_all(fds)
    if why:
        return {"pid": pid, "error": why, "kind": "failed"}, pidfd
    return {"pid": pid}, pidfd


def _check(request: dict[str, Any], fds: list[int]) -> None:
    """ValueError unless the request is one the server can carry out."""
    entry = request.get("entry")
    if not isinstance(entry, str) or not _ENTRY.match(entry):
        raise ValueError(f"bad entry point {entry!r}")
    if request.get("fresh") is False:  # a fresh interpreter imports it itself
        _entry_point(entry)
    targets = request.get("fds")
    if not isinstance(targets, list) or len(targets) != len(fds):
        raise ValueError(f"{len(fds)} descriptors came for {targets!r}")
    if not all(type(t) is int and 0 <= t < MAX_FD_NUMBER for t in targets):
        raise ValueError(f"bad descriptor numbers {targets!r}")
    if len(set(targets)) != len(targets):
        raise ValueError(f"descriptor numbers given twice in {targets!r}")
    _check_strings(request.get("argv"), "argv")
    env = request.get("env")
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and "=" not in k for k, v in env.items()
    ):
        raise ValueError("env must map names to strings")
    _check_strings([*env, *env.values()], "env")
    _check_strings(request.get("cgroup_procs"), "cgroup_procs")
    for key, kind in (("cwd", str), ("comm", str), ("umask", int)):
        value = request.get(key)
        if value is not None and type(value) is not kind:
            raise ValueError(f"{key} must be a {kind.__name__}")
    for key in ("session", "fresh"):
        if not isinstance(request.get(key), bool):
            raise ValueError(f"{key} must be true or false")


def _check_strings(value: Any, what: str) -> None:
    if not isinstance(value, list) or not all(isinstance(s, str) and "\0" not in s for s in value):
        raise ValueError(f"{what} must be a list of strings without NUL")


def _entry_point(entry: str) -> Any:
    """The function ``entry`` names, looked up in a module already imported: nothing runs (no
    import, no module ``__getattr__``)."""
    module_name, _, function = entry.partition(":")
    module = sys.modules.get(module_name)
    if module is None:
        raise ValueError(f"{module_name} is not preloaded in this fork server")
    target = vars(module).get(function or "main")
    if not callable(target):
        raise ValueError(f"{module_name} has no function {function or 'main'}")
    return target


def _clone_parent() -> tuple[int, int]:
    """Fork this (single-threaded) process, the new one our parent's child: (pid, pidfd) here,
    (0, -1) in the child. CPython's own fork protocol around it, as os.fork does."""
    if _SYS_CLONE is None:
        raise OSError(0, f"clone: no syscall number known for {os.uname().machine}")
    pidfd = ctypes.c_int(-1)
    flags = CLONE_PARENT | CLONE_PIDFD | signal.SIGCHLD
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = _syscall(
        ctypes.c_long(_SYS_CLONE), ctypes.c_ulong(flags), None, ctypes.byref(pidfd), None, None
    )
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0, -1
    error = ctypes.get_errno()
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(error, os.strerror(error))
    return int(pid), pidfd.value


def _become_child(
    request: dict[str, Any], fds: list[int], errors: int, sock: socket.socket
) -> NoReturn:
    """The child: set up, say so by closing ``errors`` (or write why not to it), run the
    entry point, exit. Never returns into the server's loop."""
    code = SETUP_FAILED
    try:
        try:
            sock.detach()  # its number may become one of ours: the object must not close it
            # Above every number the child is given, where no dup2 of the setup lands.
            errors = fcntl.fcntl(errors, fcntl.F_DUPFD_CLOEXEC, max([*request["fds"], 2]) + 1)
            _set_up(request, fds, errors)
            if request["fresh"]:
                _exec_fresh(request)
            function = _entry_point(request["entry"])
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(errors, f"{type(exc).__name__}: {exc}".encode()[:4096])
            os._exit(SETUP_FAILED)
        os.close(errors)
        code = _run(function, request["argv"])
    finally:
        os._exit(code)


def _exec_fresh(request: dict[str, Any]) -> NoReturn:
    """Become a new interpreter that runs the entry point (``fresh_main``). ``errors`` is
    close-on-exec: a successful exec tells the server the setup is done."""
    entry, comm = request["entry"], request["comm"] or ""
    argv = [sys.executable, "-P", "-c", _FRESH_CODE, entry, comm, *request["argv"]]
    os.execve(sys.executable, argv, os.environ)


def fresh_main(argv: list[str]) -> int:
    """A ``fresh_interpreter`` child after its exec: ``ENTRY COMM ARGS...``. Imports the entry
    point's module, names the process again (exec took the name), and runs it."""
    entry, comm, *args = argv
    module_name, _, function = entry.partition(":")
    if comm:
        linux.set_comm(comm)
    sys.argv = [module_name, *args]
    target = getattr(importlib.import_module(module_name), function or "main")
    return _exit_status(target(args))


def _set_up(request: dict[str, Any], fds: list[int], errors: int) -> None:
    """Everything of the child's but its code (``errors``, above every target, stays open)."""
    for signum in _catchable_signals():
        signal.signal(signum, signal.SIG_DFL)
    # A fresh interpreter's: ^C raises KeyboardInterrupt, broken pipes are errors.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    for procs in request["cgroup_procs"]:
        with open(procs, "w") as f:
            f.write("0")  # 0: the writer itself
    targets: list[int] = request["fds"]
    above = max([*targets, 2]) + 1
    # Every source goes above every target first, so no dup2 overwrites one still needed.
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above) for fd in fds]
    for target, fd in zip(targets, moved, strict=True):
        os.dup2(fd, target, inheritable=True)
    _close_all_but([*targets, errors])
    os.environ.clear()
    os.environ.update(request["env"])
    if request["session"]:
        os.setsid()
    if request["umask"] is not None:
        os.umask(request["umask"])
    if request["cwd"] is not None:
        os.chdir(request["cwd"])
    if request["comm"] is not None:
        linux.set_comm(request["comm"])
    sys.stdin, sys.stdout, sys.stderr = _fresh_stdio(set(targets))
    sys.argv = [request["entry"].partition(":")[0], *request["argv"]]


def _fresh_stdio(open_fds: set[int]) -> tuple[Any, Any, Any]:
    """sys.stdin, stdout and stderr as a new interpreter makes them (None where closed)."""

    def stream(fd: int) -> io.TextIOWrapper | None:
        if fd not in open_fds:
            return None
        raw = io.FileIO(fd, "r" if fd == 0 else "w", closefd=False)
        buffered: io.BufferedReader | io.BufferedWriter
        buffered = io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw)
        # stderr is line-buffered and lets no error pass unprinted, as a new interpreter's.
        return io.TextIOWrapper(
            buffered,
            errors="backslashreplace" if fd == 2 else None,
            line_buffering=fd == 2 or os.isatty(fd),
            write_through=fd == 2,
        )

    return stream(0), stream(1), stream(2)


def _run(function: Any, argv: list[str]) -> int:
    """Call the entry point as ``python -m`` would run it: its result or SystemExit is the
    exit status, an exception is printed and is status 1."""
    try:
        code = _exit_status(function(list(argv)))
    except SystemExit as exc:
        code = _exit_status(exc.code)
    except BaseException:
        if sys.stderr is not None:
            traceback.print_exc()
        code = 1
    try:
        _shut_down()
    except BaseException:
        code = code or 1
    return code


def _exit_status(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    if sys.stderr is not None:
        print(value, file=sys.stderr)
    return 1


def _shut_down() -> None:
    """What the interpreter does at exit and ``os._exit`` does not: wait for the non-daemon
    threads, run ``atexit``, flush stdio. The rest of finalisation is no use to a process about
    to end, and may touch shared memory a peer broke."""
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()


# -- shared: descriptors and messages -------------------------------------------------------------


def _catchable_signals() -> list[int]:
    return [s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)]


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _close_all_but(keep: Sequence[int]) -> None:
    """Close every descriptor but ``keep``: close_range(2) over the gaps."""
    low = 0
    for fd in sorted(set(keep)):
        if low < fd:
            _close_range(low, fd - 1)
        low = fd + 1
    _close_range(low, 0xFFFFFFFF)


def _close_range(first: int, last: int) -> None:
    libc_syscall = _pysys.syscall
    if libc_syscall(ctypes.c_long(_SYS_CLOSE_RANGE), ctypes.c_uint(first), ctypes.c_uint(last), 0):
        # No close_range (a kernel before 5.9, or a seccomp filter): one at a time.
        for name in os.listdir("/proc/self/fd"):
            if first <= int(name) <= last:
                with contextlib.suppress(OSError):
                    os.close(int(name))


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


def _send(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], rights, socket.MSG_NOSIGNAL)


def _receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and the descriptors it carried; (None, []) at the end of the stream. A
    message that is not a JSON object reads as ``{}`` (the caller refuses it)."""
    space = socket.CMSG_SPACE(SCM_MAX_FD * array.array("i").itemsize)
    data, ancillary, flags, _ = sock.recvmsg(MAX_MESSAGE, space, socket.MSG_CMSG_CLOEXEC)
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data and not fds:
        return None, []
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        return {"truncated": True}, list(fds)
    try:
        message = json.loads(data)
    except ValueError:
        message = {}
    return (message if isinstance(message, dict) else {}), list(fds)


def _read_to_end(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


__all__ = [
    "DEVNULL",
    "PIPE",
    "STDOUT",
    "Child",
    "ChildSetup",
    "ForkServer",
    "ForkServerError",
]
