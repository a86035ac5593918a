"""hyper's Python API: what `hyperctl` is built on, for programs and tests that drive domains.

::

    from hyper import api

    hv = api.connect()                     # the running hypervisor; api.start() starts one
    web = hv.create({"name": "web", "vif": [{"bridge": "br0", "ip": "10.0.0.2/24"}]})
    result = web.exec(["ping", "-c", "1", "10.0.0.1"], timeout=10)
    assert result.status == 0, result.stderr
    web.attach("vbd", "target=/tmp/data.img,size=64M,vdev=xvdb")
    web.destroy()

Every call goes to dom0's toolstack over its root-only socket, as `hyperctl`'s do, so the same
rules hold (root, one line per problem) and the same errors come back, raised as the project's
vocabulary (channels/errors.py): ``BadInput`` for a config or spec that is wrong (its ``lines``
name the file and field), ``NotFound``, ``NotAllowed``, ``Closed``, and ``HyperError`` for the
rest. Results are typed: ``DomainInfo`` for a listing, ``ExecResult`` for a command run inside.

Importing this module imports no pydantic: a config given as a dict or a model is sent as the
YAML text it stands for, which dom0 validates (with the host checks) as it does a file's.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from channels import control
from channels.control import NotRunning
from channels.errors import BadInput, HyperError, NotFound
from channels.kinds import BY_TYPE, DeviceKind
from channels.paths import RunDir

if TYPE_CHECKING:
    from typing import TypeAlias

    from pydantic import BaseModel

    #: A config: a YAML file's path, a dict of its keys, or a config model.
    Config: TypeAlias = str | Path | Mapping[str, Any] | BaseModel

HYPERD_START_TIMEOUT = 30.0
HYPERD_DOWN = (
    "the hypervisor (hyperd) is not running, but dom0 and the domains are: "
    "`hyperctl start` starts it again and it re-adopts them; `hyperctl halt` stops them all"
)
WORKLOAD_UID = 1000
#: The environment of a command `exec` runs in a domain: nothing of the caller's but TERM.
EXEC_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/tmp",
    "LANG": "C.UTF-8",
}


# -- the hypervisor's process ------------------------------------------------------------------


def run_dir() -> RunDir:
    return RunDir()


def call(request: control.Request, timeout: float | None = 120.0) -> Any:
    """One request to dom0's toolstack; its result, or its error raised again."""
    return Hypervisor().call(request, timeout)


def hyperd_killed(run: RunDir) -> bool:
    """hyperd is not running, but its state file says a run is not over: it was killed, and
    dom0 and the domains may run on without it."""
    return run.state_file.exists() and not run.hyperd_alive()


def require_hyperd() -> None:
    """Fail at once instead of waiting for a hypercall that no hyperd will answer (dom0's
    toolstack still answers, but its hypercalls wait)."""
    if hyperd_killed(run_dir()):
        raise HyperError(HYPERD_DOWN)


def hyperd_running() -> bool:
    run = run_dir()
    if not run.hyperd_alive():
        return False
    try:
        control.Connection(run.toolstack_socket, timeout=5.0).close()
    except NotRunning:
        return False
    return True


def ensure_hypervisor(store_domain: bool = False) -> None:
    """Start hyperd in the background unless one runs; one started after a hyperd was killed
    re-adopts the domains that run on (hyperd/adopt.py). ``store_domain``: a new hypervisor runs
    the store in a stub domain. Returns once dom0 answers."""
    run = run_dir()
    if hyperd_running():
        return
    if not run.hyperd_alive():
        _start_hyperd(run, store_domain)
    deadline = time.monotonic() + HYPERD_START_TIMEOUT
    while time.monotonic() < deadline:
        if hyperd_running():
            return
        time.sleep(0.1)
    raise HyperError(f"the hypervisor did not start; see {run.log('hyperd')}")


def _start_hyperd(run: RunDir, store_domain: bool) -> None:
    subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hyperd.hypervisor",
            "--run-dir",
            str(run.root),
            *(["--store-domain"] if store_domain else []),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )


def halt(timeout: float = 60.0) -> bool:
    """Destroy every domain and stop the hypervisor; False if none was running."""
    if hyperd_killed(run_dir()):
        ensure_hypervisor()  # it re-adopts what runs, so that the halt can stop it all
    try:
        control.call(run_dir().toolstack_socket, control.Halt(), timeout=timeout)
    except NotRunning:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run_dir().pidfile.exists():
        time.sleep(0.1)
    return True


def invoking_uid() -> int:
    """The user hyper acts for: under sudo, the one who ran sudo (``SUDO_UID``, believed only
    when we are root: root could act as anyone anyway); else our real uid. Their disk images
    are accepted besides root's (channels/images.py)."""
    sudo_uid = os.environ.get("SUDO_UID", "")
    if os.getuid() == 0 and sudo_uid.isdecimal():
        return int(sudo_uid)
    return os.getuid()


# -- running a command inside a domain ----------------------------------------------------------


def exec_argv(pid: int, command: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The host command that runs ``command`` in the domain whose kernel is ``pid``: in all its
    namespaces, as the workload user with no new privileges, in the domain's /tmp, with ``env``
    alone."""
    return [
        shutil.which("nsenter") or "nsenter",
        f"--target={pid}",
        "--user",
        "--mount",
        "--net",
        "--pid",
        "--uts",
        "--ipc",
        "--cgroup",
        # No --wd: nsenter opens its directory before entering, which would give the command
        # the host's /tmp (and through "..", the host's tree). env changes directory inside.
        "--",
        shutil.which("setpriv") or "/usr/bin/setpriv",
        f"--reuid={WORKLOAD_UID}",
        f"--regid={WORKLOAD_UID}",
        "--clear-groups",
        "--no-new-privs",
        "--",
        shutil.which("env") or "/usr/bin/env",
        "-i",
        "--chdir=/tmp",
        *(f"{name}={value}" for name, value in env.items()),
        *command,
    ]


def entering(cgroup_procs: Sequence[str]) -> Callable[[], None]:
    """What the child runs before the command: it joins the domain's cgroup, so that nothing a
    command does escapes the domain's limits."""

    def enter() -> None:
        for path in cgroup_procs:
            Path(path).write_text(f"{os.getpid()}\n")

    return enter


@dataclass(frozen=True)
class ExecResult:
    """How a command run in a domain ended: its exit status (128 + N when signal N killed
    it), and what it wrote."""

    status: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")


class ExecTimeout(HyperError, TimeoutError):
    """The command did not end in time; it was killed, and this is what it wrote until then."""

    def __init__(self, argv: Sequence[str], timeout: float, stdout: bytes, stderr: bytes):
        super().__init__(f"{' '.join(argv)}: still running after {timeout:g} s; killed")
        self.stdout = stdout
        self.stderr = stderr


# -- typed results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainInfo:
    """One domain as `hyperctl list --json` shows it."""

    domid: int
    name: str
    uuid: str
    status: str  # building, running, shutdown, crashed, dying
    state: str  # xl's letters: r b p s c d
    memory: int  # MiB
    vcpus: int
    cpu_time: float  # seconds
    pid: int | None
    shutdown_reason: str | None
    exit_code: int | None
    raw: Mapping[str, Any]  # every field, as dom0 sent it

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DomainInfo:
        return cls(
            domid=int(data["domid"]),
            name=str(data["name"]),
            uuid=str(data["uuid"]),
            status=str(data["status"]),
            state=str(data["state"]),
            memory=int(data["memory"]),
            vcpus=int(data["vcpus"]),
            cpu_time=float(data["cpu_time"]),
            pid=None if data.get("pid") is None else int(data["pid"]),
            shutdown_reason=data.get("shutdown_reason"),
            exit_code=None if data.get("exit_code") is None else int(data["exit_code"]),
            raw=dict(data),
        )


# -- the hypervisor and its domains ---------------------------------------------------------------


class Hypervisor:
    """A running hypervisor, reached through dom0's toolstack."""

    def __init__(self, run: RunDir | None = None) -> None:
        self.run = run or run_dir()

    def call(self, request: control.Request, timeout: float | None = 120.0) -> Any:
        """One request to this hypervisor's toolstack (see ``call``)."""
        if hyperd_killed(self.run):
            raise HyperError(HYPERD_DOWN)
        return control.call(self.run.toolstack_socket, request, timeout=timeout)

    def domains(self) -> list[DomainInfo]:
        """Every domain, dom0 included."""
        return [DomainInfo.from_dict(d) for d in self.call(control.List())]

    def domain(self, name: str | int) -> Domain:
        """A domain by name or domid; NotFound if there is none."""
        for info in self.domains():
            if str(name) in (info.name, str(info.domid)):
                return Domain(self, info.name, info.domid)
        raise NotFound(f"no domain {name!r}")

    def create(
        self, config: Config, *, base_dir: str | Path | None = None, owner: int | None = None
    ) -> Domain:
        """Create a domain from a YAML file's path, a dict of the config's keys, or a config
        model; returns once its workload runs and its devices are connected. Relative paths in
        the config are relative to the file's directory, or to ``base_dir`` (default: the
        current directory). BadInput, one line per problem, for a config that is wrong."""
        text, source, where = _config_text(config)
        request = control.Create(
            text=text,
            source=source,
            base_dir=str(Path(base_dir).resolve()) if base_dir is not None else where,
            owner=invoking_uid() if owner is None else owner,
        )
        info = self.call(request)
        return Domain(self, str(info["name"]), int(info["domid"]))

    def info(self) -> dict[str, Any]:
        """Host and hypervisor facts (`hyperctl info`)."""
        return dict(self.call(control.Info()))

    def dmesg(self) -> str:
        """The hypervisor's log (`hyperctl dmesg`)."""
        return "\n".join(self.call(control.Dmesg(clear=False)))

    def store_read(self, path: str) -> str:
        return str(self.call(control.StoreRead(path=path)))

    def store_write(self, path: str, value: str) -> None:
        self.call(control.StoreWrite(path=path, value=value))

    def store_ls(self, path: str) -> list[tuple[str, str]]:
        return [(p, v) for p, v in self.call(control.StoreLs(path=path))]

    def halt(self) -> None:
        """Destroy every domain and stop the hypervisor."""
        halt()

    def rings(self, domain: str | int | None = None) -> list[dict[str, Any]]:
        """The figures of each ring a backend serves (of ``domain``'s devices, or every
        domain's): see ``ring_rows``."""
        names = {info.domid: info.name for info in self.domains()}
        wanted = None if domain is None else self.domain(domain).domid
        rows = ring_rows(names, self.device_stats())
        return [r for r in rows if wanted in (None, r["domid"])]

    def device_stats(self) -> dict[str, list[dict[str, Any]]]:
        """Every device's counters (and its rings' figures), kind by kind (``vif``, ...)."""
        return {kind: list(self.call(control.DeviceStats(kind=kind))) for kind in BY_TYPE}


def ring_rows(
    names: Mapping[int, str], stats: Mapping[str, Sequence[Mapping[str, Any]]]
) -> list[dict[str, Any]]:
    """One row per ring of the devices in ``stats`` (each kind's DeviceStats): ``domain`` (from
    ``names``, by domid), ``domid``, ``kind``, ``device`` (``vif<N>``, a disk's vdev, a share's
    tag), ``ring`` (a vif's ``q<N>-tx``/``-rx``), then channels/ring.py's RING_FIGURES. A
    device a driver domain serves has none (they are that domain's)."""
    rows = []
    for kind, devices in stats.items():
        for device in devices:
            domid = int(device["domid"])
            who = {
                "domain": names.get(domid, str(domid)),
                "domid": domid,
                "kind": kind,
                "device": BY_TYPE[kind].label(device),
            }
            rows += [{**who, **ring} for ring in device.get("rings", [])]
    return rows


class Domain:
    """One domain of a hypervisor, by name (its domid as of when it was looked up)."""

    def __init__(self, hv: Hypervisor, name: str, domid: int) -> None:
        self.hv = hv
        self.name = name
        self.domid = domid

    def __repr__(self) -> str:
        return f"Domain({self.name!r}, domid={self.domid})"

    def info(self) -> DomainInfo:
        for info in self.hv.domains():
            if info.name == self.name:
                return info
        raise NotFound(f"no domain {self.name!r}")

    def exists(self) -> bool:
        return any(info.name == self.name for info in self.hv.domains())

    def exec(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes = b"",
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> ExecResult:
        """Run ``argv`` inside the domain as its workload user (`hyperctl exec`), feeding it
        ``stdin``; its status and output. ExecTimeout (the command killed) past ``timeout``."""
        if not argv:
            raise BadInput("exec: no command given")
        target = self.hv.call(control.ExecTarget(domain=self.name))
        command = exec_argv(int(target["pid"]), argv, {**EXEC_ENV, **(env or {})})
        proc = subprocess.Popen(
            command,
            preexec_fn=entering(target["cgroup_procs"]),
            close_fds=True,
            start_new_session=True,
            env={},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise ExecTimeout(argv, timeout or 0.0, out, err) from None
        code = proc.returncode
        return ExecResult(code if code >= 0 else 128 - code, out, err)

    def console_output(self, wait: float = 0.5) -> bytes:
        """What the domain wrote on its console lately (the backend keeps the last of it),
        and what it writes within ``wait`` seconds."""
        conn = control.Connection(self.hv.run.toolstack_socket, timeout=None)
        try:
            conn.request(control.Console(domain=self.name))
            data = bytearray(conn.buffer)
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0:
                readable, _, _ = select.select([conn.sock], [], [], left)
                if not readable:
                    break
                chunk = conn.sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            return bytes(data)
        finally:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()

    def pause(self) -> None:
        self.hv.call(control.Pause(domain=self.name))

    def unpause(self) -> None:
        self.hv.call(control.Unpause(domain=self.name))

    def shutdown(self, wait: bool = True, grace: float = 30.0) -> bool:
        """Ask it to power off; with ``wait``, return once it is gone. False if it had to be
        destroyed after ``grace`` seconds."""
        result = self.hv.call(
            control.Shutdown(domain=self.name, wait=wait, grace=grace), timeout=None
        )
        return bool(result.get("cooperative", True))

    def reboot(self) -> None:
        self.hv.call(control.Reboot(domain=self.name))

    def destroy(self) -> None:
        """Kill it now; returns once dom0's backends have let its devices go."""
        self.hv.call(control.Destroy(domain=self.name))

    def attach(self, kind: str, spec: str, *, base_dir: str | Path | None = None) -> str:
        """Give the running domain a device of ``kind`` (vif, vbd, p9) from an xl-style spec
        (`hyperctl network-attach` and its kin); returns once it is connected, with its name
        (a vif's devid, a disk's vdev, a share's tag). Relative paths are relative to
        ``base_dir`` (default: the current directory)."""
        device_kind = _kind(kind)
        request = control.DeviceAttach(
            domain=self.name,
            kind=device_kind.xenbus_type,
            spec=spec,
            base_dir=str(Path(base_dir or os.getcwd()).resolve()),
            owner=invoking_uid(),
        )
        result = self.hv.call(request)
        return str(result.get(device_kind.name_field or "", result["devid"]))

    def detach(self, kind: str, device: str) -> bool:
        """Close a device through XenBus and remove it; False if its backend did not close in
        time (it is removed anyway)."""
        request = control.DeviceDetach(
            domain=self.name, kind=_kind(kind).xenbus_type, device=device
        )
        return bool(self.hv.call(request)["clean"])

    def set_faults(self, device: str, spec: str) -> None:
        """Inject ``spec``'s faults (channels/faults.py; such as ``drop=30,dir=rx`` or
        ``eio=100,sectors=0-2047``) into the frames of the vif ``device`` (``vif<N>``) or the
        requests of the disk ``device`` (its vdev), from the next on (`hyperctl fault set`)."""
        if not spec.strip():
            raise BadInput("set_faults: the spec is empty (clear_faults removes them)")
        self.hv.call(control.FaultSet(domain=self.name, device=device, spec=spec))

    def clear_faults(self, device: str) -> None:
        self.hv.call(control.FaultSet(domain=self.name, device=device, spec=""))

    def faults(self) -> dict[str, tuple[str, int]]:
        """Each vif's and disk's faults (the canonical spec, "" for none) and how many frames
        or requests they hit."""
        listing = self.hv.call(control.FaultList(domain=self.name))
        return {e["device"]: (str(e["faults"]), int(e["injected"])) for e in listing}

    def capture(self, device: str, out: BinaryIO, count: int = 0, duration: float = 0.0) -> int:
        """Write the frames crossing the vif ``device`` (``vif<N>``), both ways, to ``out`` as
        a pcap file (tcpdump, tshark and Wireshark read it), until ``count`` frames or
        ``duration`` seconds (0: no limit) have passed (or a KeyboardInterrupt, which closes
        the connection: dom0 stops too); the bytes written. The pcap header is written (and
        ``out`` flushed) as soon as the capture runs."""
        request = control.Capture(domain=self.name, device=device, count=count, duration=duration)
        written = 0
        for chunk in self._stream(request):
            out.write(chunk)
            out.flush()
            written += len(chunk)
        return written

    def trace(
        self,
        device: str,
        count: int = 0,
        duration: float = 0.0,
        started: Callable[[], None] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Each blkif request and response of the disk ``device`` (its vdev, served by dom0)
        as blkback handles it: ``ev`` ("req" or "rsp"), ``op``, ``id``, ``sector``, ``count``
        (sectors), ``t`` (the host's clock) and, for a response, ``status`` and
        ``latency_us``; until ``count`` responses or ``duration`` seconds (0: no limit), or
        the caller stops iterating. A last ``{"ev": "lost", "count": N}`` says how many records
        a slow reader missed. ``started()`` is called once dom0 traces."""
        request = control.Trace(domain=self.name, device=device, count=count, duration=duration)
        pending = b""
        for chunk in self._stream(request, started):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                yield json.loads(line)

    def _stream(
        self, request: control.Request, started: Callable[[], None] | None = None
    ) -> Iterator[bytes]:
        """What dom0 streams after its reply to ``request`` (then ``started()``), until it
        ends the stream; the connection is closed when the caller stops (dom0 stops too)."""
        conn = control.Connection(self.hv.run.toolstack_socket, timeout=None)
        try:
            conn.request(request)
            if started is not None:
                started()
            if conn.buffer:
                yield bytes(conn.buffer)
            while chunk := conn.sock.recv(65536):
                yield chunk
        finally:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()

    def devices(self, kind: str) -> list[dict[str, Any]]:
        """Its devices of ``kind``, with their configuration, state and counters."""
        request = control.DeviceList(domain=self.name, kind=_kind(kind).xenbus_type)
        return list(self.hv.call(request))


def connect() -> Hypervisor:
    """The hypervisor running on this host; Closed (NotRunning) if there is none."""
    if not hyperd_running():
        require_hyperd()
        raise NotRunning("the hypervisor is not running (`hyperctl start`, or api.start())")
    return Hypervisor()


def start(store_domain: bool = False) -> Hypervisor:
    """The hypervisor running on this host, started first if none runs."""
    ensure_hypervisor(store_domain)
    return Hypervisor()


def _kind(name: str) -> DeviceKind:
    kind = BY_TYPE.get(name)
    if kind is None:
        raise BadInput(f"no device kind {name!r}: one of {', '.join(sorted(BY_TYPE))}")
    return kind


def _config_text(config: Config) -> tuple[str, str, str]:
    """The YAML text a config stands for, the source to name in errors, and the directory its
    relative paths are relative to."""
    import yaml

    if isinstance(config, str | Path):
        path = Path(config)
        try:
            return path.read_text(encoding="utf-8"), str(path), str(path.resolve().parent)
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInput(f"{path}: cannot read: {exc}") from exc
    if isinstance(config, Mapping):
        data = dict(config)
    else:
        data = config.model_dump(mode="json", exclude_unset=True)
    return yaml.safe_dump(data, sort_keys=False), "<config>", os.getcwd()
