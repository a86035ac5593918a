"""hyperd's persisted state: what a restarted hyperd re-adopts its running domains from.

After every change to its tables hyperd writes them, as one JSON object, to
``<run dir>/hyperd.state`` (channels/paths.py). The object:

    {"version": 2, "last_domid": 5, "dom0_restarts": 0, "halting": false,
     "domains": [Domain.to_dict(), ...],      hyperd/domain.py (with its Resources)
     "evtchn": EventChannels.to_dict(),       hyperd/evtchn.py
     "gnttab": GrantTables.to_dict(),         hyperd/gnttab.py
     "links": DeviceLinks.to_dict()}          hyperd/devlinks.py

Each class serialises itself next to the data it holds; this module frames, writes and reads.
A write goes to a temporary file in the same directory, is flushed to it, then renamed over the
old file: a reader sees the old state or the new one, never part of either. A missing file is a
first start; a file that is not such an object (cut short, edited by hand, from another version)
is a ``StateError``, and hyperd refuses to start rather than guess which domains exist.

``VERSION`` changes with the form of any table (2: each grant pool names its device, issue 12;
3: the device links between domUs, and the peers of each domain's objects; 4: the devices a
dead driver domain served, among the links, issue 15; 5: the store's stub domain, if any),
so that a hyperd upgraded while domains run says which version it found, instead of failing on
the first field it misses.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from channels.errors import HyperError

VERSION = 5
KEYS = (
    "last_domid",
    "dom0_restarts",
    "store_domid",
    "halting",
    "domains",
    "evtchn",
    "gnttab",
    "links",
)


class StateError(HyperError):
    """The state file exists but cannot be used: it names the file and the fault."""


def encode(tables: dict[str, Any]) -> bytes:
    """The file's bytes for ``tables`` (the KEYS above). Deterministic, so that hyperd can skip
    a write that would change nothing."""
    return json.dumps({"version": VERSION, **tables}, sort_keys=True).encode()


def write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (mode 0600)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read(path: Path) -> dict[str, Any] | None:
    """The state in ``path``; None when there is none (a first start)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        state = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise StateError(f"{path}: not JSON (cut short?): {exc}") from exc
    if not isinstance(state, dict):
        raise StateError(f"{path}: not a JSON object")
    found = state.get("version")
    if found != VERSION:
        raise StateError(
            f"{path}: version {found!r:.20}, this hyperd reads version {VERSION}: not "
            "re-adopting the domains it describes (to stop them cleanly, use the hyper that "
            "wrote it: `hyperctl halt`)"
        )
    missing = [key for key in KEYS if key not in state]
    if missing:
        raise StateError(f"{path}: no {', '.join(missing)}")
    return state
