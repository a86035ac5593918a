"""A subverted data-path worker, for test_datapath_worker.py: ``python -m`` this as a device's
worker, and it talks to dom0 raw on its control socket, as its parameters' ``attack`` says, then
writes its parameters and what dom0 answered to the file its parameters name:

- ``ask_other`` (the default): asks for the grant pools of another domain's device;
- ``flood``: sends ``count`` refresh requests at once, then reads their answers;
- ``send``: sends ``raw`` (latin-1 text), then waits for dom0 to hang up;
- ``truncate``: tries to shrink, then to grow, the counter page dom0 reads;
- ``fork``: forks a child that drops to the worker's ids, as the worker would, and sleeps."""

from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backends import privilege
from backends.datapath_worker import worker_main

#: What the worker names in its request: a domain and a device that are not its own.
ASKED_GRANTER = 9
ASKED_DEVICE = "vbd/51712"
HANG_UP_TIMEOUT = 30.0


def ask_other(control: socket.socket, params: dict[str, Any]) -> Any:
    ask = {"granter": ASKED_GRANTER, "device": ASKED_DEVICE}
    control.sendall(json.dumps({"id": 1, "map_pools": ask, **ask}).encode() + b"\n")
    return json.loads(control.makefile("rb").readline())


def flood(control: socket.socket, params: dict[str, Any]) -> Any:
    requests = (json.dumps({"id": n, "map_pools": {}}) + "\n" for n in range(params["count"]))
    control.sendall("".join(requests).encode())
    replies = control.makefile("rb")
    return [json.loads(replies.readline()) for _ in range(params["count"])]


def send(control: socket.socket, params: dict[str, Any]) -> Any:
    """What dom0 sent back before hanging up, and whether it did."""
    control.sendall(params["raw"].encode("latin-1"))
    control.settimeout(HANG_UP_TIMEOUT)
    received = b""
    try:
        while data := control.recv(65536):
            received += data
    except TimeoutError:
        return {"hung_up": False, "received": received.decode()}
    return {"hung_up": True, "received": received.decode()}


def truncate(control: socket.socket, params: dict[str, Any]) -> Any:
    """How each resize of the counter page ended: "done", or the errno's name."""
    outcome = {}
    for what, size in (("shrunk", 0), ("grown", 2 * mmap.PAGESIZE)):
        try:
            os.ftruncate(params["counters_fd"], size)
            outcome[what] = "done"
        except OSError as exc:
            assert exc.errno is not None  # ftruncate's failures all carry one
            outcome[what] = errno.errorcode[exc.errno]
    return outcome


def fork(control: socket.socket, params: dict[str, Any]) -> Any:
    """The child's pid."""
    child = os.fork()
    if child == 0:
        os.setsid()  # nothing of the worker's process group goes with it
        privilege.drop(params["worker_id"], params["worker_gid"])
        while True:
            signal.pause()
    return {"child": child}


ATTACKS: dict[str, Callable[[socket.socket, dict[str, Any]], Any]] = {
    "ask_other": ask_other,
    "flood": flood,
    "send": send,
    "truncate": truncate,
    "fork": fork,
}


def run(params: dict[str, Any]) -> int:
    with socket.socket(fileno=params["control_fd"]) as control:
        answer = ATTACKS[params.get("attack", "ask_other")](control, params)
    mine = {key: params.get(key) for key in ("frontend", "device", "pools")}
    Path(params["answer"]).write_text(json.dumps({"params": mine, "answer": answer}))
    return 0


def main(argv: list[str]) -> int:
    """What dom0's fork server runs, as it runs a real worker's main."""
    worker_main(run)
    return 0


if __name__ == "__main__":
    main(sys.argv[1:])
