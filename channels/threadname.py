"""Kernel names for Python threads, so that per-thread figures say which thread is which.

Python 3.11 names a ``threading.Thread`` for Python only: the kernel shows every thread of a
process under the process's own name (``python3``) in ``/proc/<pid>/task/<tid>/comm``, ``top
-H`` and the benchmarks' per-stage tables, until the thread names itself with
prctl(PR_SET_NAME), which names the calling thread alone, in at most 15 bytes.

Two ways in: call ``set_native_name(name)`` at the top of a thread's target, or start the
thread as a ``NamedThread(..., native_name=name)``. Threads doing the same job share one name
(``blkback-io``, not ``blkback-io7``), so that figures grouped by name add them up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from typing import Any

PR_SET_NAME = 15  # <linux/prctl.h>
COMM_BYTES = 15  # TASK_COMM_LEN (16) less its NUL

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def native_name(name: str) -> bytes:
    """``name`` as the kernel keeps it: UTF-8, cut to 15 bytes on a character boundary."""
    return name.encode()[:COMM_BYTES].decode(errors="ignore").encode()


def set_native_name(name: str) -> None:
    """Name the calling thread ``name`` for the kernel (cut to 15 bytes).

    Best effort: a name is for people reading figures, so a failure (only EFAULT is possible)
    is ignored rather than raised into a data path."""
    _libc.prctl(
        ctypes.c_int(PR_SET_NAME),
        ctypes.c_char_p(native_name(name)),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
    )


class NamedThread(threading.Thread):
    """A ``threading.Thread`` that names itself for the kernel as it starts: ``native_name``,
    or else its Python ``name``."""

    def __init__(self, *args: Any, native_name: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.native_name = native_name

    def run(self) -> None:
        set_native_name(self.native_name or self.name)
        super().run()
