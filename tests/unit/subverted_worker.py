"""A subverted data-path worker, for test_datapath_worker.py: ``python -m`` this as a device's
worker, and it asks dom0, raw on its control socket, for the grant pools of another domain's
device, then writes its parameters and dom0's answer to the file its parameters name."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from dom0.datapath_worker import worker_main

#: What the worker names in its request: a domain and a device that are not its own.
ASKED_GRANTER = 9
ASKED_DEVICE = "vbd/51712"


def run(params: dict[str, Any]) -> int:
    ask = {"granter": ASKED_GRANTER, "device": ASKED_DEVICE}
    with socket.socket(fileno=params["control_fd"]) as control:
        control.sendall(json.dumps({"id": 1, "map_pools": ask, **ask}).encode() + b"\n")
        answer = json.loads(control.makefile("rb").readline())
    mine = {key: params.get(key) for key in ("frontend", "device", "pools")}
    Path(params["answer"]).write_text(json.dumps({"params": mine, "answer": answer}))
    return 0


if __name__ == "__main__":
    worker_main(run)
