"""The physfarm instrument protocol (version 1): length-prefixed frames over TCP.

Every frame, in both directions (docs/instrument-protocol.md is the full description):

    offset  size  field
    0       4     magic b"PFI1"
    4       1     protocol version (1)
    5       1     frame type (below)
    6       2     flags (reserved, 0)
    8       4     header length H (bytes of UTF-8 JSON), big-endian unsigned
    12      4     payload length P (bytes), big-endian unsigned
    16      H     header: a JSON object
    16+H    P     payload: raw little-endian float32 values, row-major

H is at most 64 KiB and 16 + H + P at most the receiver's max frame size (64 MiB by default); a
receiver refuses a larger frame before reading it. Requests carry an "id" in the header, replies
echo it. A reply's type is the request's type | 0x80, or ERROR.
"""
from __future__ import annotations

import json
import socket
import struct

MAGIC = b"PFI1"
VERSION = 1
PREFIX = struct.Struct("!4sBBHII")  # magic, version, type, flags, header length, payload length
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024

HELLO, SPEC, FORWARD, RESET = 0x01, 0x02, 0x03, 0x04
REPLY = 0x80  # reply type = request type | REPLY
ERROR = 0x7F
NAMES = {HELLO: "HELLO", SPEC: "SPEC", FORWARD: "FORWARD", RESET: "RESET", ERROR: "ERROR"}
REQUESTS = (HELLO, SPEC, FORWARD, RESET)

# Error codes carried by an ERROR frame's header {"code": ..., "message": ...}.
E_PROTOCOL = "protocol"  # malformed or unexpected frame (the connection is closed after a framing error)
E_AUTH = "auth"  # missing HELLO or wrong token (the connection is closed)
E_ENVELOPE = "envelope"  # request refused: wrong shape, non-finite or outside the safe envelope
E_DEVICE = "device"  # the device failed while serving a valid request (retrying may succeed)
E_INTERNAL = "internal"  # a bug or unexpected failure on the server


class ProtocolError(Exception):
    """A frame that does not follow the protocol (bad magic, version, sizes or JSON)."""


class ConnectionClosed(EOFError):
    """The peer closed the connection cleanly between frames."""


def type_name(ftype: int) -> str:
    base = ftype & ~REPLY if ftype != ERROR else ftype
    name = NAMES.get(base, f"0x{ftype:02x}")
    return name + ("_REPLY" if ftype != ERROR and ftype & REPLY else "")


def encode_frame(ftype: int, header: dict, payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    return PREFIX.pack(MAGIC, VERSION, ftype, 0, len(head), len(payload)) + head + payload


def recv_exact(sock: socket.socket, n: int, *, at_boundary: bool = False) -> bytes:
    """Read exactly n bytes. EOF before the first byte of a frame raises ConnectionClosed, EOF inside
    a frame raises ProtocolError (a truncated frame)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            if at_boundary and got == 0:
                raise ConnectionClosed("connection closed by peer")
            raise ProtocolError(f"connection closed inside a frame ({got} of {n} bytes read)")
        got += k
    return bytes(buf)


def read_frame(sock: socket.socket, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> tuple[int, dict, bytes]:
    """Read one frame: (type, header dict, payload bytes). Refuses oversize frames before reading them."""
    prefix = recv_exact(sock, PREFIX.size, at_boundary=True)
    magic, version, ftype, _flags, hlen, plen = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r} (expected {MAGIC!r}): not a physfarm instrument frame")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} not supported (this side speaks {VERSION})")
    if hlen > MAX_HEADER_BYTES:
        raise ProtocolError(f"header length {hlen} exceeds {MAX_HEADER_BYTES} bytes")
    if PREFIX.size + hlen + plen > max_frame_bytes:
        raise ProtocolError(f"frame of {PREFIX.size + hlen + plen} bytes exceeds the maximum "
                            f"{max_frame_bytes}; send fewer rows per request")
    head = recv_exact(sock, hlen) if hlen else b"{}"
    try:
        header = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"header is not UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a JSON object, got {type(header).__name__}")
    payload = recv_exact(sock, plen) if plen else b""
    return ftype, header, payload


def error_frame(code: str, message: str, request_id=None) -> bytes:
    return encode_frame(ERROR, {"id": request_id, "code": code, "message": message})
