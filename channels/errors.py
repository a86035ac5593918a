"""The error vocabulary every layer of hyper shares: one base, five meanings.

Each error hyper raises on purpose is a ``HyperError`` of one of these kinds, so that whoever
catches it knows what to do without knowing where it came from:

- ``BadInput``: what was asked is malformed (a config, an argument, a request). The CLI prints
  its ``lines``, one per problem, and exits with status 2; nothing was created.
- ``NotFound``: what it names does not exist (a domain, a device, a store node).
- ``NotAllowed``: the caller may not do it (a hypercall's privilege, a store permission).
- ``ProtocolViolation``: the peer broke the protocol (an impossible ring index, a bad grant
  beyond what an error response answers, malformed framing). Only the device or connection
  that carried it is dropped; everything else carries on.
- ``Closed``: the other end is gone or was shut (a connection, a device, the hypervisor).

The kind also crosses the toolstack's control socket (``kind`` in an error reply), so an
error raised in dom0 is raised again as the same kind in ``hyperctl`` or the Python client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar


class HyperError(Exception):
    """Base of every error hyper raises on purpose; ``lines`` are user-facing, one problem each."""

    kind: ClassVar[str] = "failed"

    def __init__(self, message: str, lines: Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.summary = message
        self.lines: list[str] = list(lines) if lines else [message]

    def __str__(self) -> str:
        """The summary, and the problems when they say more (a program's traceback shows
        them, as hyperctl prints them)."""
        if self.lines == [self.summary]:
            return self.summary
        return f"{self.summary}: {'; '.join(self.lines)}"


class BadInput(HyperError):
    """Malformed input: a config, an argument, a request. Nothing was done."""

    kind = "bad_input"


class NotFound(HyperError):
    """What the request names does not exist."""

    kind = "not_found"


class NotAllowed(HyperError):
    """The caller may not do this."""

    kind = "not_allowed"


class ProtocolViolation(HyperError):
    """The peer broke the protocol: drop the device or connection that carried it, only it."""

    kind = "protocol"


class Closed(HyperError):
    """The other end is gone, or this end was shut."""

    kind = "closed"


KINDS: dict[str, type[HyperError]] = {
    cls.kind: cls for cls in (HyperError, BadInput, NotFound, NotAllowed, ProtocolViolation, Closed)
}

#: What an errno name from a hypercall or a store reply means in this vocabulary.
ERRNO_KINDS: dict[str, type[HyperError]] = {
    "EINVAL": BadInput,
    "E2BIG": BadInput,
    "ENOENT": NotFound,
    "ESRCH": NotFound,
    "EPERM": NotAllowed,
    "EACCES": NotAllowed,
    "ENOTCONN": Closed,
    "EPIPE": Closed,
}


def error_of_kind(kind: str, message: str, lines: Sequence[str] | None = None) -> HyperError:
    """The error a reply of ``kind`` stands for (an unknown kind is a plain HyperError)."""
    return KINDS.get(kind, HyperError)(message, lines)
