"""hyperctl: the user's tool, shaped like Xen's xl. A thin table over the toolstack.

Every command except ``create --dry-run`` and ``cleanup`` talks to dom0's toolstack over its
root-only socket; ``create`` starts the hypervisor first when none runs. After hyperd was killed
(dom0 and the domains run on without it), a command that needs it fails at once saying so;
``start`` and ``create`` start it again (it re-adopts the running domains) and ``halt`` starts
it again to stop everything. Exit status: 0 on
success, 1 when the operation failed, 2 for bad input (usage, config errors), and for ``exec``
the status of the command run in the domain.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import stat
import struct
import subprocess
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from channels import control, linux
from channels.errors import BadInput, HyperError
from channels.kinds import KINDS, DeviceKind
from channels.waiting import readable
from hyper import api

#: What a domU, its kernel included, can and cannot do to the host: `hyperctl --help` ends with
#: it, and the README's sandbox section says exactly the same (tests/unit/test_readme.py).
CONTAINMENT = """\
What a domU can do, its kernel included (were it hostile):
- use the memory, CPU share and processes its config gives it, through its cgroup;
- send untagged frames on its bridge from its vif's MAC, and from its `ip` when the vif
  has one;
- read and write its own disks, and its own store nodes within its quota;
- ask hyperd for event channels and grant pools, at a bounded rate, with at most its
  memory's worth of pages granted;
- write its own log, `dom<N>.log`, which hyperd reads at 64 KiB/s and rotates at 512 KiB.

What it cannot do:
- see a host process, interface, file it could write, `/run/hyper` or the toolstack
  socket: the host's `/proc` and `/sys` lie under empty covers it cannot remove;
- write the host's `/dev/shm`: its own is a directory of links to its rings and doorbells,
  which it can open but not add to, so nothing it makes there outlives it;
- take the host's terminals: its ptys come from a devpts of its own (at most 64), its
  programs may make no user namespace to mount another, no devpts a domain mounts can
  use the ptys kept for host logins, and `hyperctl exec` never hands it a host terminal;
- spoof another address or reach another VLAN: frames from another MAC or with a VLAN
  tag, or from another IPv4, ARP or IPv6 source when the vif has an `ip`, are dropped and
  counted (`Spoof` in `network-list`);
- change a header netback checked (netback sends its own copy), or send a GSO size
  outside 88-65534;
- make dom0 hold its memory: a backend device maps only the grant pools set up for
  that device, at most what its protocol can use (2 MiB for a vif, for each of its
  queues; 32 MiB for a vbd),
  drops released pools, and 64 bad grant refs fail the device;
- grow the store: 1000 nodes and 2 MiB of names, values and permissions, 128 watches,
  10 transactions that together hold at most 2 MiB and each live at most 20 s; the
  store's files on disk stay within a few snapshots of the live store;
- keep hyperd busy: a call that changes hyperd's tables costs 10 of 200 credits a
  second, one that changes nothing 1; out of credit, it waits;
- reach another domain's pages, doorbells, store nodes or processes.
"""
DETACH = b"\x1d"  # Ctrl-]


# -- progress on a terminal ------------------------------------------------------------------


class Progress:
    """What a command waiting on the hypervisor shows while it waits (``progress``)."""

    def __init__(self, bar: Any = None, task: Any = None) -> None:
        self._bar, self._task = bar, task

    @property
    def visible(self) -> bool:
        """Whether anything is shown (standard error is a terminal)."""
        return self._bar is not None

    def update(
        self, text: str | None = None, done: int | None = None, total: int | None = None
    ) -> None:
        """Say ``text`` now, or that ``done`` of the ``total`` (given now or at the start)
        are done."""
        if self._bar is not None:
            self._bar.update(
                self._task, description=text, completed=done, total=total, refresh=True
            )


@contextlib.contextmanager
def progress(text: str, total: int | None = None, console: Any = None) -> Iterator[Progress]:
    """``text`` on standard error while the block runs, with a spinner and the seconds so far
    (with ``total``, a bar and how many are done), taken away when it ends: rich's, as xl's
    users see in apt and pip. Nothing at all when standard error is not a terminal (a
    script, a pipe, a CI log); ``console`` (a rich Console) stands for the terminal."""
    from rich.console import Console

    if console is None:  # rich would take FORCE_COLOR for a terminal: a CI log is none
        console = Console(stderr=True) if sys.stderr.isatty() else None
    if console is None or not console.is_terminal:
        yield Progress()
        return
    from rich import progress as bars

    columns: list[Any] = [bars.SpinnerColumn(), bars.TextColumn("{task.description}")]
    if total is not None:
        columns += [bars.BarColumn(), bars.MofNCompleteColumn()]
    columns.append(bars.TimeElapsedColumn())
    with bars.Progress(*columns, console=console, transient=True) as bar:
        yield Progress(bar, bar.add_task(text, total=total))


def cmd_start(args: argparse.Namespace) -> int:
    """Start the hypervisor (dom0 and hyperd), or a killed hyperd again, which re-adopts the
    domains that ran on without it; nothing to do when one runs."""
    run = api.run_dir()
    if api.hyperd_running():
        print("the hypervisor is already running")
        return 0
    adopting = api.hyperd_killed(run)
    api.ensure_hypervisor(args.store_domain)
    domus = [d for d in api.call(control.List()) if d["domid"] != 0]
    if adopting:
        # The store's place was chosen when it first started: its state says where it is.
        print(f"hyperd started again; it re-adopted {len(domus)} domain(s)")
    elif args.store_domain:
        print("the hypervisor is running, its store in the Xenstore domain")
    else:
        print("the hypervisor is running")
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    owner = api.invoking_uid()
    if args.dry_run or not api.hyperd_running():
        # Checked here only when there is no toolstack to check it (nothing starts for a bad
        # config): pydantic costs ~0.1 s of start-up, half of what a create may take.
        from channels.config import load_config

        config = load_config(args.file, owner=owner)  # a ConfigError is BadInput: exit 2
        if args.dry_run:
            print(config.normalised_json())
            return 0
        with progress("starting the hypervisor"):
            api.ensure_hypervisor(args.store_domain)
    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{args.file}: cannot read: {exc}") from exc
    request = control.Create(
        text=text, source=args.file, base_dir=str(path.resolve().parent), owner=owner
    )
    with progress(f"creating the domain of {args.file}"):
        info = api.call(request)
    print(f"Created domain {info['name']} (id {info['domid']})", file=sys.stderr)
    if args.console:
        return _console(str(info["domid"]))
    if args.foreground:
        return _wait_gone(info["domid"])
    return 0


def _wait_gone(domid: int) -> int:
    """Block until the domain is gone or stopped (xl create -F)."""
    with control.Connection(api.run_dir().toolstack_socket, timeout=None) as conn:
        conn.request(control.StoreWatch(path="@releaseDomain"))
        while True:
            alive = [
                d
                for d in api.call(control.List())
                if d["domid"] == domid and d["status"] in ("building", "running")
            ]
            if not alive:
                return 0
            if control.read_line(conn.sock, conn.buffer) is None:
                return 1


# -- list, top, info, dmesg --------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    domains = api.call(control.List())
    if args.json:
        print(json.dumps(domains, indent=2))
        return 0
    print(f"{'Name':<40}{'ID':>5}{'Mem':>7}{'VCPUs':>6}  {'State':<8}{'Time(s)':>9}")
    for d in domains:
        print(
            f"{d['name']:<40}{d['domid']:>5}{d['memory']:>7}{d['vcpus']:>6}  "
            f"{d['state']:<8}{d['cpu_time']:>9.1f}"
        )
    return 0


def _top_rows(
    before: dict[int, float],
    domains: list[dict[str, Any]],
    interval: float,
    devices: dict[str, list[dict[str, Any]]],
) -> list[list[Any]]:
    """One row per domain: xentop's columns, then each device kind's (channels/kinds.py)."""
    rows = []
    for d in domains:
        prev = before.get(d["domid"])
        pct = 0.0 if prev is None or interval <= 0 else 100.0 * (d["cpu_time"] - prev) / interval
        row = [
            d["name"],
            d["state"],
            round(float(d["cpu_time"]), 1),
            round(pct, 1),
            int(d.get("mem_usage", 0)) // 1024,
            int(d["memory"]) * 1024,
            int(d["vcpus"]),
        ]
        for kind in KINDS:
            mine = [v for v in devices[kind.xenbus_type] if v["domid"] == d["domid"]]
            row += [column.value(mine) for column in kind.top]
        rows.append(row)
    return rows


def _top_key(header: str) -> str:
    """A top column's name in JSON: ``CPU(sec)`` is ``cpu_seconds``, ``NETTX(k)``
    ``nettx_kib``."""
    for unit, suffix in (("(k)", "_kib"), ("(sec)", "_seconds"), ("(%)", "_percent")):
        header = header.replace(unit, suffix)
    return header.lower()


TOP_COLUMNS = [
    "NAME",
    "STATE",
    "CPU(sec)",
    "CPU(%)",
    "MEM(k)",
    "MAXMEM(k)",
    "VCPUS",
    *(column.header for kind in KINDS for column in kind.top),
]


def _cell(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _fitting(headers: list[str], rows: list[list[str]], width: int) -> int:
    """How many of the first columns fit in ``width`` characters, each as wide as its header
    or its widest cell, one space each side (as xentop does, the leftmost columns first)."""
    used = 0
    for n, header in enumerate(headers):
        used += max([len(header), *(len(row[n]) for row in rows)]) + 2
        if used > width:
            return max(n, 1)
    return len(headers)


def cmd_top(args: argparse.Namespace) -> int:
    if args.json and not args.batch:
        raise BadInput("top: --json needs -b (batch mode)")
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    def table(rows: list[list[str]]) -> Table:
        cells = [[_cell(value) for value in row] for row in rows]
        shown = _fitting(TOP_COLUMNS, cells, console.width)
        notes = [f"every {args.delay:g} s; q quits"] if keys is not None else []
        if shown < len(TOP_COLUMNS):
            notes.append(f"{len(TOP_COLUMNS) - shown} more columns in a wider terminal")
        t = Table(box=None, header_style="bold", caption="; ".join(notes) or None)
        for col in TOP_COLUMNS[:shown]:
            left = col in ("NAME", "STATE")
            t.add_column(col, justify="left" if left else "right", no_wrap=True)
        for row in cells:
            t.add_row(*row[:shown])
        return t

    before: dict[int, float] = {}
    last = time.monotonic()
    iteration = 0
    live: Live | None = None
    keys: Keys | None = None
    console = Console()
    try:
        if not args.batch:
            if sys.stdin.isatty():
                keys = Keys(sys.stdin.fileno())
            live = Live(table([]), console=console, auto_refresh=False)
            live.start()
        while args.iterations is None or iteration < args.iterations:
            domains = api.call(control.List())
            now = time.monotonic()
            devices = api.Hypervisor().device_stats()
            rows = _top_rows(before, domains, now - last, devices)
            before = {d["domid"]: d["cpu_time"] for d in domains}
            last = now
            iteration += 1
            if live is not None:
                live.update(table(rows), refresh=True)
            elif args.json:
                names = [_top_key(c) for c in TOP_COLUMNS]
                records = [dict(zip(names, row, strict=True)) for row in rows]
                print(json.dumps({"domains": records}), flush=True)
            else:
                print(" ".join(f"{c:>10}" for c in TOP_COLUMNS))
                for row in rows:
                    print(" ".join(f"{_cell(c):>10}" for c in row))
                print(flush=True)
            if args.iterations is not None and iteration >= args.iterations:
                break
            if keys is None:
                time.sleep(args.delay)
            else:
                typed = keys.wait(args.delay)
                if typed is None or "q" in typed.lower():
                    break
    except KeyboardInterrupt:
        pass
    finally:
        try:
            if live is not None:
                live.stop()
        finally:
            if keys is not None:
                keys.restore()
    return 0


class Keys:
    """A terminal's keys, one at a time as they are typed (cbreak mode: no echo, no line
    editing; Ctrl-C still interrupts) until ``restore``. SIGTERM and SIGHUP end the command
    as Ctrl-C does meanwhile, so that the terminal is restored whatever ends it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved = termios.tcgetattr(fd)
        self._handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
        for sig in self._handlers:
            signal.signal(sig, signal.default_int_handler)
        tty.setcbreak(fd)

    def wait(self, timeout: float) -> str | None:
        """What was typed within ``timeout`` seconds ("" if nothing), None once the terminal
        has hung up."""
        if not readable([self.fd], timeout):
            return ""
        try:
            typed = os.read(self.fd, 64)
        except OSError:  # EIO: the terminal went away
            return None
        return typed.decode(errors="replace") if typed else None

    def restore(self) -> None:
        with contextlib.suppress(termios.error):  # a terminal gone has nothing to restore
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)


def cmd_info(args: argparse.Namespace) -> int:
    info = api.call(control.Info())
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        print(f"{key:<20}: {value}")
    return 0


def cmd_dmesg(args: argparse.Namespace) -> int:
    lines = api.call(control.Dmesg(clear=args.clear))
    if args.json:
        print(json.dumps(lines, indent=2))
        return 0
    for line in lines:
        print(line)
    return 0


# -- lifecycle ---------------------------------------------------------------------------------


OnOneDomain = type[control.Destroy | control.Reboot | control.Pause | control.Unpause]


def cmd_simple(kind: OnOneDomain) -> Any:
    def run(args: argparse.Namespace) -> int:
        api.call(kind(domain=args.domain))
        return 0

    return run


def cmd_shutdown(args: argparse.Namespace) -> int:
    request = control.Shutdown(domain=args.domain, wait=args.wait, grace=args.timeout)
    waiting = f"waiting for {args.domain} to shut down (destroyed after {args.timeout:.0f} s)"
    with progress(waiting) if args.wait else contextlib.nullcontext():
        result = api.call(request, timeout=None)
    if args.wait and not result.get("cooperative", True):
        print(
            f"{args.domain} did not shut down in {args.timeout:.0f} s: destroyed", file=sys.stderr
        )
    return 0


def cmd_halt(args: argparse.Namespace) -> int:
    with progress("halting", total=0) as shown:
        halted = _halt_watched(shown) if shown.visible else api.halt()
    if not halted:
        print("hyperctl: the hypervisor is not running", file=sys.stderr)
    return 0


def _halt_watched(shown: Progress) -> bool:
    """api.halt() in a thread, showing how many of the domains are gone four times a second."""
    try:
        domains = {d["domid"] for d in api.call(control.List()) if d["domid"] != 0}
    except HyperError:  # not running, or killed: api.halt says what it does about it
        domains = set()
    shown.update(f"halting: destroying {len(domains)} domains", total=len(domains))
    outcome: list[bool | BaseException] = []

    def halt() -> None:
        try:
            outcome.append(api.halt())
        except BaseException as exc:  # raised again below, in the command's own thread
            outcome.append(exc)

    halting = threading.Thread(target=halt, name="halt", daemon=True)  # Ctrl-C leaves it
    halting.start()
    while halting.is_alive():
        halting.join(0.25)
        with contextlib.suppress(HyperError, OSError):  # busy or stopping: no answer now
            left = {d["domid"] for d in api.call(control.List(), timeout=1.0)}
            shown.update(done=len(domains - left))
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def cmd_cleanup(args: argparse.Namespace) -> int:
    from hyper.cleanup import cleanup

    for line in cleanup(api.run_dir()):  # HypervisorRunning when there is nothing to clean up
        print(line)
    return 0


def cmd_mem_set(args: argparse.Namespace) -> int:
    api.call(control.MemSet(domain=args.domain, memory=args.memory))
    return 0


def cmd_sched_credit(args: argparse.Namespace) -> int:
    result = api.call(control.SchedCredit(domain=args.domain, cpu_weight=args.weight, cap=args.cap))
    print(f"{'Name':<40}{'Weight':>8}{'Cap':>6}")
    print(f"{args.domain:<40}{result['cpu_weight']:>8}{result['cap']:>6}")
    return 0


# -- exec and console --------------------------------------------------------------------------


def cmd_exec(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise BadInput("exec: no command given (hyperctl exec NAME -- CMD...)")
    target = api.call(control.ExecTarget(domain=args.domain))
    env = {**api.EXEC_ENV, "TERM": os.environ.get("TERM", "dumb")}
    argv = api.exec_argv(int(target["pid"]), command, env)
    join_cgroup = api.entering(target["cgroup_procs"])
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    master, slave = -1, -1
    if interactive:
        try:
            master, slave = _domain_pty(int(target["pid"]))
        except OSError as exc:
            print(
                f"hyperctl: exec: no terminal in {args.domain} ({exc}); running without one",
                file=sys.stderr,
            )
            interactive = False

    def enter_domain() -> None:
        join_cgroup()
        if interactive:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    # A new session, our environment left behind, and never a descriptor of one of the host's
    # terminals: whatever a domain's process holds, its kernel can take (pidfd_getfd) and use to
    # read the caller's keystrokes or, with TIOCSTI, type into the caller's shell. On a terminal
    # the command gets a terminal of its own, from the domain's own devpts, which we relay, as
    # `docker exec -t` does; otherwise each of our standard descriptors that is a terminal is
    # relayed through a pipe, the others (files, pipes) are passed as they are.
    stdio: dict[str, Any] = {"stdin": slave, "stdout": slave, "stderr": slave}
    if not interactive:
        stdio = {name: subprocess.PIPE for fd, name in STDIO if os.isatty(fd)}
    proc = subprocess.Popen(
        argv, preexec_fn=enter_domain, close_fds=True, start_new_session=True, env={}, **stdio
    )
    if interactive:
        os.close(slave)
        _relay_pty(master, proc)
    relays = [] if interactive else _relay_pipes(proc)
    while True:
        try:
            code = proc.wait()
            break
        except KeyboardInterrupt:
            continue  # on a pipe, ^C reached the command's group too; wait for it
    for relay in relays:
        relay.join()  # what the command wrote before it ended
    return code if code >= 0 else 128 - code


STDIO = ((0, "stdin"), (1, "stdout"), (2, "stderr"))
PTMX = os.makedev(5, 2)
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441


def _domain_pty(pid: int) -> tuple[int, int]:
    """A pseudo-terminal pair from the devpts of the domain ``pid`` runs in: its ``/dev/ptmx``,
    opened below the domain's root without following any link the domain may have put there,
    and its peer through TIOCGPTPEER (no path lookup at all)."""
    root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        flags = os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK  # a FIFO: no hang
        resolve = linux.RESOLVE_IN_ROOT | linux.RESOLVE_NO_SYMLINKS | linux.RESOLVE_NO_MAGICLINKS
        master = linux.openat2(root, "dev/ptmx", flags, resolve)
    finally:
        os.close(root)
    try:
        if os.fstat(master).st_rdev != PTMX or not stat.S_ISCHR(os.fstat(master).st_mode):
            raise OSError(errno.ENODEV, "the domain's /dev/ptmx is not the ptmx device")
        os.set_blocking(master, True)
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
    except OSError:
        os.close(master)
        raise
    return master, slave


def _relay_pipes(proc: subprocess.Popen[bytes]) -> list[threading.Thread]:
    """Copy between our terminal descriptors and the pipes that stand in for them in the
    domain; returns the threads copying the command's output (to be joined at its end)."""
    outputs = []
    pairs = [(0, proc.stdin), (proc.stdout, 1), (proc.stderr, 2)]
    for source, sink in pairs:
        if source is None or sink is None:
            continue
        thread = threading.Thread(target=_copy, args=(source, sink), daemon=True)
        thread.start()
        if sink in (1, 2):
            outputs.append(thread)
    return outputs


def _copy(source: int | IO[bytes], sink: int | IO[bytes]) -> None:
    """Until end of file on ``source``; closes a pipe at either end."""
    read_fd = source if isinstance(source, int) else source.fileno()
    write_fd = sink if isinstance(sink, int) else sink.fileno()
    try:
        while data := os.read(read_fd, 65536):
            os.write(write_fd, data)
    except OSError:
        pass  # the command closed its input, or our output went away
    finally:
        for end in (source, sink):
            if not isinstance(end, int):
                end.close()


def _relay_pty(master: int, proc: subprocess.Popen[bytes]) -> None:
    """Copy between our terminal (raw) and the command's pty until the command's side closes."""
    saved = termios.tcgetattr(sys.stdin)
    with contextlib.suppress(OSError):
        fcntl.ioctl(master, termios.TIOCSWINSZ, fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8))
    tty.setraw(sys.stdin.fileno())
    try:
        stdin_open = True
        while True:
            fds = [master] + ([sys.stdin.fileno()] if stdin_open else [])
            readable, _, _ = select.select(fds, [], [])
            if master in readable:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    data = b""  # EIO: the command and all it started have closed the pty
                if not data:
                    return
                os.write(sys.stdout.fileno(), data)
            if sys.stdin.fileno() in readable:
                data = os.read(sys.stdin.fileno(), 4096)
                if data:
                    os.write(master, data)
                else:
                    stdin_open = False
    finally:
        termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)
        os.close(master)


def _console(domain: str) -> int:
    conn = control.Connection(api.run_dir().toolstack_socket, timeout=None)
    try:
        conn.request(control.Console(domain=domain))
    except HyperError:
        conn.close()
        raise
    interactive = sys.stdin.isatty()
    saved = termios.tcgetattr(sys.stdin) if interactive else None
    if interactive:
        tty.setraw(sys.stdin.fileno())
        # Said only once the terminal is raw: a Ctrl-] typed from now on reaches us at once.
        sys.stderr.write("(Ctrl-] detaches)\r\n")
        sys.stderr.flush()
    try:
        _relay(conn, interactive)
    finally:
        if saved is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)
        conn.close()
    return 0


def _relay(conn: control.Connection, interactive: bool) -> None:
    out = sys.stdout.buffer
    if conn.buffer:
        out.write(bytes(conn.buffer))
        out.flush()
    stdin_open = True
    while True:
        fds = [conn.sock] + ([sys.stdin] if stdin_open else [])
        readable, _, _ = select.select(fds, [], [])
        if conn.sock in readable:
            data = conn.sock.recv(65536)
            if not data:
                return
            out.write(data)
            out.flush()
        if sys.stdin in readable:
            data = os.read(sys.stdin.fileno(), 4096)
            if not data:
                stdin_open = False
                if not interactive:
                    return
                continue
            if DETACH in data:
                before = data.split(DETACH, 1)[0]
                if before:
                    conn.sock.sendall(before)
                return
            conn.sock.sendall(data)


def cmd_console(args: argparse.Namespace) -> int:
    return _console(args.domain)


# -- devices, one set of commands per kind in channels/kinds.py -----------------------------------


def cmd_device_attach(kind: DeviceKind) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        request = control.DeviceAttach(
            domain=args.domain,
            kind=kind.xenbus_type,
            spec=args.spec,
            base_dir=os.getcwd(),
            owner=api.invoking_uid(),
        )
        result = api.call(request)
        label = result.get(kind.name_field or "", result["devid"])
        print(f"{kind.xenbus_type} {result['domid']}/{label} attached", file=sys.stderr)
        return 0

    return run


def cmd_device_detach(kind: DeviceKind) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        request = control.DeviceDetach(
            domain=args.domain, kind=kind.xenbus_type, device=args.device
        )
        if not api.call(request)["clean"]:
            print(
                f"{kind.what} {args.device}: the backend did not close in time; removed anyway",
                file=sys.stderr,
            )
        return 0

    return run


def cmd_device_list(kind: DeviceKind) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        devices = api.call(control.DeviceList(domain=args.domain, kind=kind.xenbus_type))
        if args.json:
            print(json.dumps(devices, indent=2))
            return 0
        print(" ".join(column.cell(column.header) for column in kind.columns).rstrip())
        for device in devices:
            print(" ".join(column.cell(column.value(device)) for column in kind.columns).rstrip())
        return 0

    return run


# -- store -------------------------------------------------------------------------------------


def cmd_fault(args: argparse.Namespace) -> int:
    """``fault set DOMAIN DEVICE SPEC``, ``fault clear DOMAIN DEVICE``, ``fault list DOMAIN``."""
    wanted = {"set": 2, "clear": 1, "list": 0}[args.op]
    given = [a for a in (args.device, args.spec) if a is not None]
    if len(given) != wanted:
        usage = {"set": "DEVICE SPEC", "clear": "DEVICE", "list": "nothing more"}[args.op]
        raise BadInput(f"fault {args.op}: give {usage} after the domain")
    if args.op == "list":
        faults = api.call(control.FaultList(domain=args.domain))
        if args.json:
            print(json.dumps(faults, indent=2))
            return 0
        print(f"{'Device':<8} {'Injected':>9}  Faults")
        for entry in faults:
            print(f"{entry['device']:<8} {entry['injected']:>9}  {entry['faults'] or '-'}")
        return 0
    spec = args.spec if args.op == "set" else ""
    if args.op == "set" and not spec.strip():
        raise BadInput("fault set: the spec is empty (fault clear removes a device's faults)")
    api.call(control.FaultSet(domain=args.domain, device=args.device, spec=spec))
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    """``capture DOMAIN vif<N> [-w FILE] [-c COUNT] [--duration SECONDS]``: a pcap file."""
    _limits("capture", args.count, args.duration)
    domain = api.Hypervisor().domain(args.domain)
    if args.file in (None, "-"):
        if args.file is None and sys.stdout.isatty():
            raise BadInput(
                "capture: standard output is a terminal: give -w FILE, or pipe it into "
                "`tcpdump -r -`"
            )
        domain.capture(args.device, sys.stdout.buffer, args.count, args.duration)
        return 0
    with open(args.file, "wb") as out:
        domain.capture(args.device, out, args.count, args.duration)
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    """``trace DOMAIN VDEV [--json] [-c COUNT] [--duration SECONDS]``: one line per request
    and response."""
    _limits("trace", args.count, args.duration)
    domain = api.Hypervisor().domain(args.domain)

    def started() -> None:
        print(f"trace: {args.device} of {domain.name}: tracing", file=sys.stderr, flush=True)

    for record in domain.trace(args.device, args.count, args.duration, started):
        print(json.dumps(record) if args.json else _trace_line(record), flush=True)
    return 0


def _limits(command: str, count: int, duration: float) -> None:
    if count < 0:
        raise BadInput(f"{command}: -c: {count} is not a count of 0 or more")
    if duration < 0:
        raise BadInput(f"{command}: --duration: {duration} is not 0 or more seconds")


def _trace_line(record: dict[str, Any]) -> str:
    if record["ev"] == "lost":
        return f"lost {record['count']} records (the reader was too slow)"
    stamp = time.strftime("%H:%M:%S", time.localtime(record["t"]))
    fraction = f"{record['t'] % 1:.6f}"[1:]
    line = (
        f"{stamp}{fraction} {record['ev']:<3} {record['op']:<7} sector={record['sector']} "
        f"count={record['count']} id={record['id']}"
    )
    if record["ev"] == "rsp":
        line += f" {record['status']} {record['latency_us']}us"
    return line


def cmd_check(args: argparse.Namespace) -> int:
    """``check [--demo] [--quiet] [--json]``: what hyper needs of this host; 0 if it can run."""
    from hyper.check import OK, can_run, check

    findings = check(demo=args.demo)
    if args.json:
        print(json.dumps([vars(f) for f in findings], indent=2))
    else:
        for f in (f for f in findings if f.status != OK or not args.quiet):
            line = f"{f.status:<15}  {f.what:<16} {f.detail}"
            print(line + (f": {f.remedy}" if f.remedy and f.status != OK else ""))
    return 0 if can_run(findings) else 1


#: ``rings``' columns: a ring figure (channels/ring.py's RING_FIGURES) and its heading.
RING_COLUMNS = (
    ("requests", "Requests"),
    ("responses", "Responses"),
    ("notify_sent", "Notified"),
    ("notify_suppressed", "Suppressed"),
    ("wakeups", "Wakeups"),
    ("spurious_wakeups", "Spurious"),
    ("late_eoi_backoffs", "Backoffs"),
)


def cmd_rings(args: argparse.Namespace) -> int:
    """``rings [DOMAIN] [--json]``: each ring's figures, as its backend counts them."""
    rings = api.Hypervisor().rings(args.domain)
    if args.json:
        print(json.dumps(rings, indent=2))
        return 0
    heads = "".join(f" {head:>10}" for _, head in RING_COLUMNS)
    print(f"{'Domain':<16} {'Device':<8} {'Ring':<6}{heads}")
    for ring in rings:
        cells = "".join(f" {ring[name]:>10}" for name, _ in RING_COLUMNS)
        print(f"{ring['domain']:<16} {ring['device']:<8} {ring['ring']:<6}{cells}")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    """``metrics [--listen ADDR:PORT]``: the Prometheus text format, printed or served."""
    from hyper import metrics  # prometheus_client: only for this command

    hv = api.Hypervisor()
    if args.listen is None:
        sys.stdout.write(metrics.exposition(hv).decode())
        return 0
    address, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdecimal() or not 0 < int(port) < 65536:
        raise BadInput(
            f"metrics: --listen: {args.listen!r} is not ADDR:PORT, such as 127.0.0.1:9100"
        )
    hv.domains()  # fails now, with its one line, if no hypervisor runs
    try:
        metrics.serve(hv, address.strip("[]") or "0.0.0.0", int(port))
    except OSError as exc:
        raise BadInput(f"metrics: --listen {args.listen}: {exc.strerror}") from exc
    print(f"metrics: serving http://{args.listen}/metrics (Ctrl-C stops)", file=sys.stderr)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    if args.op == "ls":
        nodes = api.call(control.StoreLs(path=args.path))
        if args.json:
            print(json.dumps([{"path": path, "value": value} for path, value in nodes], indent=2))
            return 0
        for path, value in nodes:
            print(f"{path} = {json.dumps(value)}")
    elif args.op == "read":
        print(api.call(control.StoreRead(path=args.path)))
    elif args.op == "write":
        if args.value is None:
            raise BadInput("store write: a value is required")
        api.call(control.StoreWrite(path=args.path, value=args.value))
    elif args.op == "rm":
        api.call(control.StoreRm(path=args.path))
    elif args.op == "watch":
        with control.Connection(api.run_dir().toolstack_socket, timeout=None) as conn:
            conn.request(control.StoreWatch(path=args.path))
            count = 0
            while args.count is None or count < args.count:
                line = control.read_line(conn.sock, conn.buffer)
                if line is None:
                    break
                event = json.loads(line)
                print(f"{event['path']} {event['token']}", flush=True)
                count += 1
    return 0


# -- the table ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperctl",
        description="Manage hyper domains (an xl-shaped tool).",
        epilog=CONTAINMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("create", help="create a domain from a YAML config")
    p.add_argument("file")
    p.add_argument("-c", dest="console", action="store_true", help="attach the console")
    p.add_argument(
        "-F",
        dest="foreground",
        action="store_true",
        help="stay in the foreground until the domain dies",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the normalised config as JSON; create nothing"
    )
    p.add_argument(
        "--store-domain",
        action="store_true",
        help="if no hypervisor runs, start one with the store in a stub domain (Xenstore)",
    )
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("list", help="list domains")
    p.add_argument("--json", "-l", action="store_true")
    p.set_defaults(func=cmd_list)

    for name, helptext, method in (
        ("destroy", "kill a domain now", control.Destroy),
        ("pause", "pause a domain", control.Pause),
        ("unpause", "unpause a domain", control.Unpause),
        ("reboot", "reboot a domain", control.Reboot),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("domain")
        p.set_defaults(func=cmd_simple(method))

    p = sub.add_parser("shutdown", help="ask a domain to power off")
    p.add_argument("domain")
    p.add_argument("-w", dest="wait", action="store_true", help="wait until it is gone")
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="destroy it if it has not shut down after this many seconds",
    )
    p.set_defaults(func=cmd_shutdown)

    p = sub.add_parser("exec", help="run a command inside a domain")
    p.add_argument("domain")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_exec)

    p = sub.add_parser("console", help="attach to a domain's console (Ctrl-] detaches)")
    p.add_argument("domain")
    p.set_defaults(func=cmd_console)

    p = sub.add_parser("info", help="host and hypervisor information")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("dmesg", help="the hypervisor's log")
    p.add_argument("-c", dest="clear", action="store_true", help="clear it after printing")
    p.add_argument("--json", action="store_true", help="as a JSON list of lines")
    p.set_defaults(func=cmd_dmesg)

    p = sub.add_parser("top", help="per-domain CPU and memory, refreshing")
    p.add_argument("-b", dest="batch", action="store_true", help="batch output")
    p.add_argument(
        "--json", action="store_true", help="with -b: one JSON object a round (a line each)"
    )
    p.add_argument("-n", dest="iterations", type=int, default=None)
    p.add_argument("-d", dest="delay", type=float, default=3.0)
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("mem-set", help="change a domain's memory limit")
    p.add_argument("domain")
    p.add_argument("memory", help="MiB, or a size such as 256M or 1G")
    p.set_defaults(func=cmd_mem_set)

    p = sub.add_parser("sched-credit", help="show or set a domain's weight and cap")
    p.add_argument("-d", dest="domain", required=True)
    p.add_argument("-w", dest="weight", type=int, default=None)
    p.add_argument("-c", dest="cap", type=int, default=None)
    p.set_defaults(func=cmd_sched_credit)

    for kind in KINDS:
        p = sub.add_parser(f"{kind.cli}-attach", help=f"give a running domain a new {kind.what}")
        p.add_argument("domain")
        example = f"xl-style {kind.what} spec, e.g. {kind.spec_example}"
        p.add_argument("spec", metavar=kind.spec_name, help=example)
        p.set_defaults(func=cmd_device_attach(kind))

        p = sub.add_parser(f"{kind.cli}-detach", help=f"remove a {kind.what} from a domain")
        p.add_argument("domain")
        names = f"its {kind.name_field} or its devid" if kind.name_field else "its devid"
        p.add_argument(
            "device", metavar=kind.name_field or "devid", help=f"the {kind.what}: {names}"
        )
        p.set_defaults(func=cmd_device_detach(kind))

        p = sub.add_parser(f"{kind.cli}-list", help=f"a domain's {kind.what}s and their counters")
        p.add_argument("domain")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_device_list(kind))

    p = sub.add_parser(
        "fault", help="inject faults into a domain's vif or disk, clear them, list them"
    )
    p.add_argument("op", choices=["set", "clear", "list"])
    p.add_argument("domain")
    p.add_argument("device", nargs="?", help="vif<N>, or a disk's vdev such as xvda")
    p.add_argument("spec", nargs="?", help="such as drop=30,dir=rx or eio=100 (see README)")
    p.add_argument("--json", action="store_true", help="list: as JSON")
    p.set_defaults(func=cmd_fault)

    p = sub.add_parser("capture", help="write the frames crossing a domain's vif as pcap")
    p.add_argument("domain")
    p.add_argument("device", help="vif<N>")
    p.add_argument("-w", dest="file", default=None, help="the pcap file to write; - for stdout")
    p.add_argument("-c", dest="count", type=int, default=0, help="stop after COUNT frames")
    p.add_argument("--duration", type=float, default=0.0, help="stop after SECONDS")
    p.set_defaults(func=cmd_capture)

    p = sub.add_parser("trace", help="print each request and response of a domain's disk")
    p.add_argument("domain")
    p.add_argument("device", help="a disk's vdev, such as xvda")
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    p.add_argument("-c", dest="count", type=int, default=0, help="stop after COUNT responses")
    p.add_argument("--duration", type=float, default=0.0, help="stop after SECONDS")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("check", help="whether hyper can run on this host, and what it lacks")
    p.add_argument("--demo", action="store_true", help="also what the demo needs")
    p.add_argument("--quiet", action="store_true", help="only what is not ok")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("rings", help="each ring's figures: requests, notifications, wakeups")
    p.add_argument("domain", nargs="?", default=None, help="one domain's (default: every)")
    p.add_argument("--json", action="store_true", help="as a JSON list")
    p.set_defaults(func=cmd_rings)

    p = sub.add_parser("metrics", help="the hypervisor's figures for Prometheus")
    p.add_argument(
        "--listen", default=None, metavar="ADDR:PORT", help="serve them over HTTP until stopped"
    )
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("store", help="read and change the store")
    p.add_argument("op", choices=["ls", "read", "write", "rm", "watch"])
    p.add_argument("path")
    p.add_argument("value", nargs="?")
    p.add_argument("-n", dest="count", type=int, default=None, help="watch: stop after N events")
    p.add_argument("--json", action="store_true", help="ls: as a JSON list")
    p.set_defaults(func=cmd_store)

    p = sub.add_parser(
        "start", help="start the hypervisor (after a killed hyperd: it re-adopts the domains)"
    )
    p.add_argument(
        "--store-domain",
        action="store_true",
        help="run the store in a stub domain of its own (Xenstore) instead of in dom0",
    )
    p.set_defaults(func=cmd_start)
    sub.add_parser("halt", help="destroy every domain and stop the hypervisor").set_defaults(
        func=cmd_halt
    )
    sub.add_parser("cleanup", help="remove whatever a killed hypervisor left behind").set_defaults(
        func=cmd_cleanup
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0 and not getattr(args, "dry_run", False):
        print("hyperctl: must run as root", file=sys.stderr)
        return 1
    try:
        return int(args.func(args))
    except BadInput as exc:  # one line per problem, each naming the file or argument
        for line in exc.lines:
            print(line, file=sys.stderr)
        return 2
    except HyperError as exc:
        for line in exc.lines:
            print(f"hyperctl: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
