"""The TerminAI agent wire protocol, version 1 (docs/protocol.md).

This module is the only implementation: the guest agent and the host shim
both import it. It is standard library only and cheap to import, because
the agent's start-up time is the VM's boot-to-ready time.

A frame is ``MAGIC | u32 total | u32 header_len | header | body``: the header
is a UTF-8 JSON object, the body raw bytes (command output, file contents),
so binary data travels without base64. ``total`` counts header and body and
may not exceed the receiver's frame limit. The magic lets a receiver
resynchronise after garbage on a stream that has no message boundaries of
its own (a virtio-serial port).
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False  # not typing's: importing typing costs ~15 ms at boot
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

MAGIC = b"TAI1"
AGENT_PROTOCOL_VERSION = 1  # host and guest agent (docs/protocol.md); serve and the broker have their own
SUPPORTED_VERSIONS = (1,)
DEFAULT_MAX_FRAME = 1 << 20
MIN_MAX_FRAME = 4096
CHUNK = 64 * 1024
MAX_WINDOW = 10000  # a terminal's columns or rows (exec's pty, resize)
_PREFIX = struct.Struct("!4sII")
PREFIX_SIZE = _PREFIX.size

# Message kinds.
REQUEST = "req"
RESULT = "res"
ERROR = "err"
EVENT = "evt"

# Operations.
OPS = (
    "hello", "ping", "exec", "write_stdin", "close_stdin", "signal", "resize",
    "read", "write", "stat", "list", "remove", "mkdir", "rename",
    "mount", "freshen", "prepare", "shutdown",
)  # fmt: skip

# Error codes. ``ran`` on an error says whether a command may have run.
BAD_FRAME = "BAD_FRAME"
FRAME_TOO_LARGE = "FRAME_TOO_LARGE"
BAD_REQUEST = "BAD_REQUEST"
UNKNOWN_OP = "UNKNOWN_OP"
HELLO_REQUIRED = "HELLO_REQUIRED"
VERSION_MISMATCH = "VERSION_MISMATCH"
NO_SUCH_PROCESS = "NO_SUCH_PROCESS"
SPAWN_FAILED = "SPAWN_FAILED"
NOT_FOUND = "NOT_FOUND"
IO_ERROR = "IO_ERROR"
INTERNAL = "INTERNAL"


class _StrictJSON:
    """The settings CPython's C scanner reads from a ``json.JSONDecoder``:
    plain dicts, ``float``/``int`` numbers, strict strings, and no NaN or
    Infinity (they are not JSON, and no message of this protocol has them)."""

    def __init__(self) -> None:
        self.strict = True
        self.object_hook = None
        self.object_pairs_hook = None
        self.parse_float = float
        self.parse_int = int
        self.parse_constant = self._refuse

    @staticmethod
    def _refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")


def _not_serializable(value: object) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _json_codec() -> tuple[Callable[[Any], str], Callable[[bytes], Any]]:
    """Headers are read and written by CPython's own C JSON scanner and
    encoder, the very code ``json.loads``/``json.dumps`` run, but without the
    ``json`` package's Python layer: that imports ``re``, ``enum``,
    ``functools`` and ``collections``, about 0.1 s of the agent's start under
    TCG. An interpreter without ``_json`` (or with another signature) gets
    the ``json`` package instead: same bytes, slower start."""
    try:
        from _json import encode_basestring_ascii, make_encoder, make_scanner

        encoder = make_encoder({}, _not_serializable, encode_basestring_ascii, None, ":", ",", False, False, False)
        scanner = make_scanner(_StrictJSON())  # type: ignore[arg-type]  # typeshed wants a JSONDecoder
    except (ImportError, TypeError):
        import json

        def dumps(value: Any) -> str:
            return json.dumps(value, separators=(",", ":"), allow_nan=False)

        return dumps, json.loads

    def c_dumps(value: Any) -> str:
        return "".join(encoder(value, 0))

    def c_loads(data: bytes) -> Any:
        text = data.decode("utf-8")
        start = len(text) - len(text.lstrip(" \t\n\r"))
        try:
            value, end = scanner(text, start)
        except StopIteration:
            raise ValueError(f"expecting a JSON value at offset {start}") from None
        if text[end:].strip(" \t\n\r"):
            raise ValueError(f"extra data after the JSON value at offset {end}")
        return value

    return c_dumps, c_loads


dumps_header, loads_header = _json_codec()


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Frame:
    """One decoded frame. (Plain classes here, not dataclasses: importing
    ``dataclasses`` costs the agent tens of milliseconds under emulation.)"""

    __slots__ = ("body", "header")

    def __init__(self, header: dict[str, Any], body: bytes = b"") -> None:
        self.header = header
        self.body = body

    def __repr__(self) -> str:
        return f"Frame({self.header!r}, {len(self.body)} bytes)"

    @property
    def kind(self) -> str:
        return str(self.header.get("kind", ""))

    @property
    def id(self) -> int:
        value = self.header.get("id", 0)
        return value if isinstance(value, int) else 0


def encode(header: dict[str, Any], body: bytes = b"", max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    return b"".join(encode_parts(header, body, max_frame))


def encode_parts(header: dict[str, Any], body: bytes = b"", max_frame: int = DEFAULT_MAX_FRAME) -> tuple[bytes, bytes]:
    """A frame as (prefix and header, body): a large body is sent as it is, not copied behind its header."""
    head = dumps_header(header).encode()
    total = len(head) + len(body)
    if total > max_frame:
        raise ProtocolError(FRAME_TOO_LARGE, f"frame of {total} bytes exceeds the limit of {max_frame}")
    return _PREFIX.pack(MAGIC, total, len(head)) + head, body


def request(id: int, op: str, body: bytes = b"", limit: int = DEFAULT_MAX_FRAME, **fields: Any) -> bytes:
    return encode({"kind": REQUEST, "id": id, "op": op, **fields}, body, limit)


def result(id: int, body: bytes = b"", **fields: Any) -> bytes:
    return encode({"kind": RESULT, "id": id, **fields}, body)


def error(id: int, code: str, message: str, ran: bool = False, **fields: Any) -> bytes:
    return encode({"kind": ERROR, "id": id, "code": code, "message": message, "ran": ran, **fields})


def event(id: int, name: str, body: bytes = b"", **fields: Any) -> bytes:
    return encode({"kind": EVENT, "id": id, "event": name, **fields}, body)


def event_parts(id: int, name: str, body: bytes = b"", **fields: Any) -> tuple[bytes, bytes]:
    return encode_parts({"kind": EVENT, "id": id, "event": name, **fields}, body)


class Decoder:
    """Incremental decoder: feed bytes, take frames and errors in order.

    Garbage before a magic is skipped and reported once per run; a frame
    over the limit, or with a header that is not a JSON object, is reported
    and the decoder resynchronises at the next magic. It never raises.
    """

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def reset(self) -> None:
        self._buf.clear()

    def feed(self, data: bytes) -> list[Frame | ProtocolError]:
        self._buf += data
        out: list[Frame | ProtocolError] = []
        buf = self._buf
        while True:
            start = buf.find(MAGIC)
            if start != 0:
                # Keep a tail that may be the beginning of a magic.
                skip = start if start > 0 else max(0, len(buf) - (len(MAGIC) - 1))
                if skip:
                    out.append(ProtocolError(BAD_FRAME, f"skipped {skip} bytes that are not a frame"))
                    del buf[:skip]
                if start < 0:
                    break
            if len(buf) < PREFIX_SIZE:
                break
            _magic, total, head_len = _PREFIX.unpack_from(buf)
            if total > self.max_frame or head_len > total:
                out.append(
                    ProtocolError(
                        FRAME_TOO_LARGE if total > self.max_frame else BAD_FRAME,
                        f"frame of {total} bytes (header {head_len}) refused; limit {self.max_frame}",
                    )
                )
                del buf[: len(MAGIC)]
                continue
            if len(buf) < PREFIX_SIZE + total:
                break
            head = bytes(buf[PREFIX_SIZE : PREFIX_SIZE + head_len])
            body = bytes(buf[PREFIX_SIZE + head_len : PREFIX_SIZE + total])
            del buf[: PREFIX_SIZE + total]
            try:
                header = loads_header(head)
            except (ValueError, RecursionError) as exc:
                out.append(ProtocolError(BAD_FRAME, f"frame header is not JSON: {exc}"))
                continue
            if not isinstance(header, dict):
                out.append(ProtocolError(BAD_FRAME, "frame header is not a JSON object"))
                continue
            out.append(Frame(header, body))
        return out
