"""XenStore wire protocol: the xs_wire.h of hyper, shared by the store client and the store server.

Framing. Every message is a 16-byte header followed by ``len`` bytes of payload::

    offset 0   u32 type     XsType below
    offset 4   u32 req_id   chosen by the client, echoed in the reply
    offset 8   u32 tx_id    0, or the transaction the request belongs to; echoed in the reply
    offset 12  u32 len      payload length, at most XENSTORE_PAYLOAD_MAX (4096)

All integers are little-endian (the x86_64 ABI). A header whose ``len`` exceeds 4096, or whose
``type`` is not a known message type, is a protocol violation: the peer is buggy or malicious and
the connection is dropped (``ProtocolViolation``), never answered.

Payloads are NUL-separated strings. Request payloads, by type::

    DIRECTORY            path\\0                      -> child names, each NUL-terminated
    READ                 path\\0                      -> raw value (no NUL added)
    GET_PERMS            path\\0                      -> perm strings "b0\\0r5\\0"
    WATCH                path\\0token\\0[depth\\0]      -> "OK\\0", then one WATCH_EVENT at once
    UNWATCH              path\\0token\\0               -> "OK\\0"
    TRANSACTION_START    \\0                          -> tx_id as a decimal string + NUL
    TRANSACTION_END      "T\\0" commit | "F\\0" abort -> "OK\\0" or ERROR EAGAIN
    INTRODUCE            domid\\0gfn\\0port\\0          -> "OK\\0"  (dom0 only)
    RELEASE              domid\\0                     -> "OK\\0"  (dom0 only)
    GET_DOMAIN_PATH      domid\\0                     -> "/local/domain/<domid>\\0"
    WRITE                path\\0value                 -> "OK\\0"  (creates missing parents)
    MKDIR                path\\0                      -> "OK\\0"
    RM                   path\\0                      -> "OK\\0"  (recursive; OK if absent)
    SET_PERMS            path\\0perm\\0perm\\0...        -> "OK\\0"
    IS_DOMAIN_INTRODUCED domid\\0                     -> "T\\0" or "F\\0"  (dom0 only)
    RESET_WATCHES        (empty)                     -> "OK\\0"

Server to client only: WATCH_EVENT ``changed-path\\0token\\0`` with req_id = tx_id = 0, and
ERROR ``"EXXX\\0"`` (an errno name from XSD_ERRORS) in place of the reply. Replies echo the
request's type, req_id and tx_id; a client matches them by req_id.

A permission string is one letter then a decimal domid: ``n`` none, ``r`` read, ``w`` write,
``b`` both. The first entry of a node's list names its owner and, through its letter, the access
of every domain not listed.

The guest transport (xenstore-ring.txt: two 1 KiB byte rings in one page) is laid out in
channels/bytering.py; this module is only the framing that runs over it, or over a socket.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Literal, TypeGuard, get_args

from channels.errors import HyperError, ProtocolViolation

XENSTORE_PAYLOAD_MAX = 4096
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048

HEADER = struct.Struct("<IIII")
HEADER_SIZE = HEADER.size  # 16

OK_PAYLOAD = b"OK\0"


class XsType(IntEnum):
    """enum xsd_sockmsg_type, with Xen's numbers (the XS_ prefix dropped)."""

    CONTROL = 0  # was DEBUG
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESTRICT = 20  # obsolete in Xen, kept so the number is never reused
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    GET_FEATURE = 23
    SET_FEATURE = 24
    GET_QUOTA = 25
    SET_QUOTA = 26


class XsErrno(StrEnum):
    """xsd_errors[]: the errno names an ERROR reply may carry, in Xen's table order."""

    EINVAL = "EINVAL"
    EACCES = "EACCES"
    EEXIST = "EEXIST"
    EISDIR = "EISDIR"
    ENOENT = "ENOENT"
    ENOMEM = "ENOMEM"
    ENOSPC = "ENOSPC"
    EIO = "EIO"
    ENOTEMPTY = "ENOTEMPTY"
    ENOSYS = "ENOSYS"
    EROFS = "EROFS"
    EBUSY = "EBUSY"
    EAGAIN = "EAGAIN"
    EISCONN = "EISCONN"
    E2BIG = "E2BIG"
    EPERM = "EPERM"

    @property
    def errno(self) -> int:
        """The host's numeric errno for this name."""
        return int(getattr(errno, self.value))


XSD_ERRORS: tuple[str, ...] = tuple(e.value for e in XsErrno)


class XsError(HyperError):
    """The store refused a request: carries the errno name of an ERROR reply and the path involved.

    Raised by the client for an ERROR reply, and inside the server to produce one.
    """

    def __init__(self, errno_name: str, path: str = "", detail: str = "") -> None:
        self.errno_name = errno_name
        self.path = path
        self.detail = detail
        where = f" on {path}" if path else ""
        why = f": {detail}" if detail else ""
        super().__init__(f"store error {errno_name}{where}{why}")


PermChar = Literal["n", "r", "w", "b"]
_PERM_CHARS: frozenset[str] = frozenset(get_args(PermChar))


def _is_perm_char(letter: str) -> TypeGuard[PermChar]:
    return letter in _PERM_CHARS


DOMID_FIRST_RESERVED = 0x7FF0


def check_domid(domid: int) -> int:
    """Return ``domid`` if it names an ordinary domain (0 .. 0x7FEF), else raise ValueError."""
    if (
        isinstance(domid, bool)
        or not isinstance(domid, int)
        or not 0 <= domid < DOMID_FIRST_RESERVED
    ):
        raise ValueError(
            f"invalid domid {domid!r}: must be an int in 0..{DOMID_FIRST_RESERVED - 1}"
        )
    return domid


@dataclass(frozen=True, slots=True)
class Perm:
    """One entry of a node's permission list: ``domid`` gets ``perm`` (n, r, w or b).

    In a list, the first entry names the owner (who always has full access) and its ``perm`` is
    the access of every domain not listed.
    """

    domid: int
    perm: PermChar

    def __post_init__(self) -> None:
        check_domid(self.domid)
        if self.perm not in _PERM_CHARS:
            raise ValueError(f"invalid permission {self.perm!r} for domid {self.domid}")

    @property
    def can_read(self) -> bool:
        return self.perm in ("r", "b")

    @property
    def can_write(self) -> bool:
        return self.perm in ("w", "b")

    def encode(self) -> str:
        """The wire form, e.g. ``"r5"``."""
        return f"{self.perm}{self.domid}"

    @classmethod
    def parse(cls, text: str) -> Perm:
        """Parse the wire form; ValueError if it is not a letter n/r/w/b then a decimal domid."""
        if len(text) < 2 or not text[1:].isdecimal() or not text[1:].isascii():
            raise ValueError(f"malformed permission {text!r}")
        if len(text) > 6:  # a letter and at most 5 digits: anything longer is not a domid
            raise ValueError(f"malformed permission {text!r}")
        letter = text[0]
        if not _is_perm_char(letter):
            raise ValueError(f"malformed permission {text!r}")
        return cls(int(text[1:]), letter)


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded message: header fields plus the raw payload."""

    type: XsType
    req_id: int
    tx_id: int
    payload: bytes

    def encode(self) -> bytes:
        return encode(self.type, self.payload, req_id=self.req_id, tx_id=self.tx_id)

    def strings(self) -> list[str]:
        """The payload split into its NUL-terminated strings (see ``split_strings``)."""
        return split_strings(self.payload)


def encode(msg_type: XsType, payload: bytes = b"", *, req_id: int = 0, tx_id: int = 0) -> bytes:
    """Frame one message; ValueError if the payload exceeds XENSTORE_PAYLOAD_MAX."""
    if len(payload) > XENSTORE_PAYLOAD_MAX:
        raise ValueError(
            f"store {msg_type.name} payload of {len(payload)} bytes exceeds {XENSTORE_PAYLOAD_MAX}"
        )
    return HEADER.pack(int(msg_type), req_id, tx_id, len(payload)) + payload


def _to_bytes(part: str | bytes) -> bytes:
    return part if isinstance(part, bytes) else part.encode("utf-8", "surrogateescape")


def join_strings(*parts: str | bytes) -> bytes:
    """Payload of NUL-terminated strings: ``join_strings("a", "b") == b"a\\0b\\0"``."""
    return b"".join(_to_bytes(p) + b"\0" for p in parts)


def split_strings(payload: bytes) -> list[str]:
    """Split a payload into strings at NULs, dropping the final terminator.

    Bytes that are not UTF-8 survive as surrogate escapes, so decoding never raises and
    ``join_strings(*split_strings(p)) == p`` for any NUL-terminated ``p``.
    """
    if not payload:
        return []
    parts = payload.split(b"\0")
    if parts[-1] == b"":
        parts.pop()
    return [p.decode("utf-8", "surrogateescape") for p in parts]


def error_payload(errno_name: str) -> bytes:
    return join_strings(errno_name)


class Decoder:
    """Incremental message decoder for one byte stream.

    ``feed`` accepts any chunking and returns the messages completed by it. A framing violation
    raises ProtocolViolation; the decoder then stays broken, since the stream has lost its framing.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._broken: ProtocolViolation | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete message."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        if self._broken is not None:
            raise self._broken
        self._buf += data
        messages: list[Message] = []
        while len(self._buf) >= HEADER_SIZE:
            raw_type, req_id, tx_id, length = HEADER.unpack_from(self._buf)
            msg_type = self._check_header(raw_type, length)
            end = HEADER_SIZE + length
            if len(self._buf) < end:
                break
            payload = bytes(self._buf[HEADER_SIZE:end])
            del self._buf[:end]
            messages.append(Message(msg_type, req_id, tx_id, payload))
        return messages

    def _check_header(self, raw_type: int, length: int) -> XsType:
        if length > XENSTORE_PAYLOAD_MAX:
            self._broken = ProtocolViolation(
                f"store message payload length {length} exceeds {XENSTORE_PAYLOAD_MAX}"
            )
            raise self._broken
        try:
            return XsType(raw_type)
        except ValueError:
            self._broken = ProtocolViolation(f"store message has unknown type {raw_type}")
            raise self._broken from None
