"""Strict parsing of the request head a guest sends to the network proxy.

The guest is hostile, and the proxy forwards what this parser returns to a
server on the allowlist. Anything two HTTP implementations could read
differently is refused, never repaired: a bare CR or LF, an obs-fold, a second
Content-Length, Transfer-Encoding beside Content-Length, a host that some
resolver reads as another. A lax parser here let the guest hand an allowed
server its own ``Host`` and a second, smuggled request.

RFC 9112 and RFC 9110, with these strict choices:

- Lines end in CRLF only; an empty head, a bare CR or LF, or any control
  character other than HTAB inside a field value is 400. Field values may hold
  obs-text (0x80-0xFF, kept as latin-1 so it round-trips); the request line and
  field names may not.
- The request target is visible ASCII only, with no fragment. Plain requests
  must be absolute-form ``http://`` (origin-form, asterisk-form and https are
  400: https goes through CONNECT); CONNECT takes authority-form only.
- Ports are 1-65535, written in decimal with no sign or leading zero. A host is
  an LDH name (as ``netpolicy`` checks it), a dotted-quad IPv4 address, or an
  IPv6 address in brackets (no zone id). A name whose last label is numeric
  (``127.1``, ``0x7f.1``) must be a dotted quad: ``inet_aton`` reads those as
  addresses.
- Transfer-Encoding other than exactly ``chunked`` is 501 (RFC 9112 6.1); a
  second Transfer-Encoding field, one in an HTTP/1.0 request, or one beside
  Content-Length is 400. Whether a chunked body is then proxied (or refused with
  411) is the caller's choice.
- A field name that becomes Content-Length or Transfer-Encoding when
  ``_`` is read as ``-`` (as CGI-style servers do) is 400.

Pure: bytes in, a ``RequestHead`` or a ``HeadError`` out.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

MAX_HEAD = 64 * 1024  # the head and its blank line, in bytes
MAX_HEADERS = 100

BAD_REQUEST = "400 Bad Request"
TOO_LARGE = "431 Request Header Fields Too Large"
NOT_IMPLEMENTED = "501 Not Implemented"
BAD_VERSION = "505 HTTP Version Not Supported"

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 tchar
_TARGET = re.compile(r"[\x21-\x7e]+")
_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_SOME_VERSION = re.compile(r"HTTP/[0-9](\.[0-9])?")  # well formed but not 1.0/1.1: 505
_PORT = re.compile(r"[1-9][0-9]{0,4}")
_LENGTH = re.compile(r"[0-9]{1,18}")
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_NUMERIC = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")
_IPV6 = re.compile(r"[0-9A-Fa-f:.]+")
_FRAMING = {"content-length", "transfer-encoding"}


class HeadError(ValueError):
    """A request head the proxy refuses, with the status line to answer it with."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    target: str  # as sent
    version: str  # "HTTP/1.0" or "HTTP/1.1"
    host: str  # lower-case, no trailing dot, IPv6 without brackets
    port: int
    path: str  # origin-form path and query to forward; "" for CONNECT
    headers: tuple[tuple[str, str], ...]  # name as sent, value without surrounding OWS
    content_length: int  # 0 when absent
    chunked: bool


def _bad(message: str) -> HeadError:
    return HeadError(BAD_REQUEST, message)


def _no_bare_cr_lf(data: bytes) -> None:
    # Each CRLF pair is removed whole (pairs cannot overlap), so any CR or LF left was bare.
    rest = data.replace(b"\r\n", b"")
    if b"\r" in rest or b"\n" in rest:
        raise _bad("a bare CR or LF in the request head")


def split_head(buffer: bytes) -> tuple[bytes, bytes] | None:
    """(head, rest) around the first blank line, or None while it may still come.

    Bare CR and LF are refused as soon as they arrive, so the caller never reads
    on past a head that is already bad; no blank line within MAX_HEAD is 431.
    """
    end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD)
    scanned = buffer[:end] if end >= 0 else buffer[:MAX_HEAD]
    if end < 0 and scanned.endswith(b"\r"):
        scanned = scanned[:-1]  # its LF may be in the next read
    _no_bare_cr_lf(scanned)
    if end >= 0:
        return buffer[:end], buffer[end + 4 :]
    if len(buffer) >= MAX_HEAD:
        raise HeadError(TOO_LARGE, f"no end of the request head within {MAX_HEAD} bytes")
    return None


def parse_request_head(head: bytes) -> RequestHead:
    """The request in ``head`` (everything before the blank line), or HeadError."""
    if len(head) > MAX_HEAD:
        raise HeadError(TOO_LARGE, f"request head over {MAX_HEAD} bytes")
    _no_bare_cr_lf(head)
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, target, version = _request_line(request_line)
    if method == "CONNECT":
        host, port = _authority(target, None)
        path = ""
    else:
        host, port, path = _absolute(target)
    headers, length, chunked = _fields(lines, version)
    return RequestHead(method, target, version, host, port, path, headers, length, chunked)


def _request_line(line: str) -> tuple[str, str, str]:
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise _bad("the request line is not METHOD SP TARGET SP VERSION")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        if _SOME_VERSION.fullmatch(version):
            raise HeadError(BAD_VERSION, f"{version} is not supported: HTTP/1.0 and HTTP/1.1 only")
        raise _bad(f"{version!r} is not an HTTP version")
    if not _TOKEN.fullmatch(method):
        raise _bad(f"{method!r} is not a method")
    if not _TARGET.fullmatch(target):
        raise _bad("the request target holds a character that is not visible ASCII")
    if "#" in target:
        raise _bad("the request target holds a fragment")
    return method, target, version


def _absolute(target: str) -> tuple[str, int, str]:
    """host, port and origin-form path of an absolute-form ``http://`` target."""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() != "http":
        raise _bad(f"only absolute http:// URLs and CONNECT are proxied, not {target!r}")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    host, port = _authority(rest[:cut], 80)
    path = rest[cut:]
    return host, port, path if path.startswith("/") else "/" + path


def _authority(text: str, default_port: int | None) -> tuple[str, int]:
    """host and port of ``host[:port]``; the port is required when there is no default."""
    if "@" in text:
        raise _bad("userinfo in the request target")
    if text.startswith("["):
        inner, close, tail = text[1:].partition("]")
        if not close or (tail and not tail.startswith(":")):
            raise _bad(f"{text!r} is not [IPV6]:PORT")
        host = _ipv6(inner)
    else:
        name = text.partition(":")[0]
        tail = text[len(name) :]
        host = _name(name)
    if not tail:
        if default_port is None:
            raise _bad(f"the CONNECT target {text!r} is not HOST:PORT")
        return host, default_port
    port = tail[1:]
    if not _PORT.fullmatch(port) or int(port) > 65535:
        raise _bad(f"{port!r} is not a port (1-65535)")
    return host, int(port)


def _ipv6(text: str) -> str:
    if not _IPV6.fullmatch(text):  # no zone id, no IPvFuture
        raise _bad(f"[{text}] is not an IPv6 address")
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        raise _bad(f"[{text}] is not an IPv6 address") from None
    return text.lower()


def _name(text: str) -> str:
    name = text.removesuffix(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise _bad(f"{text!r} is not a valid host name")
    name = name.lower()
    if _NUMERIC.fullmatch(labels[-1]):
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            raise _bad(f"{text!r} is neither a host name nor a dotted-quad IPv4 address") from None
    return name


def _fields(lines: list[str], version: str) -> tuple[tuple[tuple[str, str], ...], int, bool]:
    """The header fields, the body's Content-Length and whether it is chunked."""
    if len(lines) > MAX_HEADERS:
        raise HeadError(TOO_LARGE, f"more than {MAX_HEADERS} header fields")
    headers: list[tuple[str, str]] = []
    length: int | None = None
    chunked: bool | None = None
    hosts = 0
    for line in lines:
        if line.startswith((" ", "\t")):
            raise _bad("obs-fold (a header line starting with whitespace)")
        name, colon, raw = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise _bad(f"{name!r} is not a header field name followed by a colon")
        if not _VALUE.fullmatch(raw):
            raise _bad(f"a control character in the {name} header")
        value = raw.strip(" \t")
        key = name.lower()
        if "_" in key and key.replace("_", "-") in _FRAMING:
            raise _bad(f"{name!r} could be read as {key.replace('_', '-')}")
        if key == "content-length":
            if length is not None:
                raise _bad("more than one Content-Length")
            if not _LENGTH.fullmatch(value):
                raise _bad(f"Content-Length {value!r} is not 1-18 decimal digits")
            length = int(value)
        elif key == "transfer-encoding":
            if chunked is not None:
                raise _bad("more than one Transfer-Encoding")
            if version == "HTTP/1.0":
                raise _bad("Transfer-Encoding in an HTTP/1.0 request")
            if value.lower() != "chunked":
                raise HeadError(NOT_IMPLEMENTED, f"Transfer-Encoding {value!r}: only chunked is supported")
            chunked = True
        elif key == "host":
            hosts += 1
            if hosts > 1:
                raise _bad("more than one Host")
        headers.append((name, value))
    if length is not None and chunked:
        raise _bad("both Content-Length and Transfer-Encoding")
    return tuple(headers), length or 0, bool(chunked)
