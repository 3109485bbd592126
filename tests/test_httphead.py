"""The proxy's request-head parser, fed what a hostile guest might send."""

from __future__ import annotations

import pytest
from terminai_shim._internal.httphead import (
    MAX_HEAD,
    MAX_HEADERS,
    HeadError,
    RequestHead,
    parse_request_head,
    split_head,
)

pytestmark = pytest.mark.unit

BAD = "400 Bad Request"
TOO_LARGE = "431 Request Header Fields Too Large"
NOT_IMPLEMENTED = "501 Not Implemented"
BAD_VERSION = "505 HTTP Version Not Supported"


def head(*lines: str) -> bytes:
    return "\r\n".join(lines).encode("latin-1")


def get(*fields: str, target: str = "http://example.com/", version: str = "HTTP/1.1") -> bytes:
    return head(f"GET {target} {version}", "Host: example.com", *fields)


def refused(data: bytes) -> str:
    with pytest.raises(HeadError) as info:
        parse_request_head(data)
    assert info.value.message
    return info.value.status


def split_refused(data: bytes) -> str:
    with pytest.raises(HeadError) as info:
        split_head(data)
    return info.value.status


# Valid requests, each field exact.


def test_plain_get() -> None:
    got = parse_request_head(head("GET http://Example.COM./a/b?x=1&y=%20 HTTP/1.1", "Host: example.com",
                                  "User-Agent:  curl/8.0 \t", "Accept:*/*"))  # fmt: skip
    assert got == RequestHead(
        method="GET",
        target="http://Example.COM./a/b?x=1&y=%20",
        version="HTTP/1.1",
        host="example.com",
        port=80,
        path="/a/b?x=1&y=%20",
        headers=(("Host", "example.com"), ("User-Agent", "curl/8.0"), ("Accept", "*/*")),
        content_length=0,
        chunked=False,
    )


def test_post_with_length_and_port() -> None:
    got = parse_request_head(head("POST http://10.0.2.2:8080 HTTP/1.0", "content-length: 0012"))
    assert (got.method, got.version, got.host, got.port, got.path) == ("POST", "HTTP/1.0", "10.0.2.2", 8080, "/")
    assert got.headers == (("content-length", "0012"),)
    assert (got.content_length, got.chunked) == (12, False)


def test_query_without_path_and_ipv6_host() -> None:
    got = parse_request_head(head("GET http://[2001:DB8::1]:81?q HTTP/1.1"))
    assert (got.host, got.port, got.path, got.headers) == ("2001:db8::1", 81, "/?q", ())


def test_chunked_post() -> None:
    got = parse_request_head(get("Transfer-Encoding: Chunked", target="http://example.com/up"))
    assert (got.method, got.chunked, got.content_length, got.path) == ("GET", True, 0, "/up")


def test_connect() -> None:
    got = parse_request_head(head("CONNECT pypi.org:443 HTTP/1.1", "Host: pypi.org:443"))
    assert got == RequestHead("CONNECT", "pypi.org:443", "HTTP/1.1", "pypi.org", 443, "",
                              (("Host", "pypi.org:443"),), 0, False)  # fmt: skip


def test_connect_ipv6_and_ipv4() -> None:
    got = parse_request_head(head("CONNECT [::1]:443 HTTP/1.1"))
    assert (got.host, got.port, got.path) == ("::1", 443, "")
    got = parse_request_head(head("CONNECT 93.184.215.14:65535 HTTP/1.1"))
    assert (got.host, got.port) == ("93.184.215.14", 65535)


def test_exactly_max_headers() -> None:
    fields = [f"X-{i}: {i}" for i in range(MAX_HEADERS - 1)]
    assert len(parse_request_head(get(*fields)).headers) == MAX_HEADERS


def test_obs_text_and_tab_inside_a_value() -> None:
    got = parse_request_head(get("X-Name: caf\xe9\tau lait"))
    assert got.headers[-1] == ("X-Name", "caf\xe9\tau lait")


# split_head: finding the end of the head.


def test_split_head() -> None:
    data = get() + b"\r\n\r\nbody\r\n\r\nmore"
    assert split_head(data) == (get(), b"body\r\n\r\nmore")
    assert split_head(get() + b"\r\n\r\n") == (get(), b"")


@pytest.mark.parametrize("cut", [0, 1, 10, -1, -2, -3])
def test_split_head_incomplete(cut: int) -> None:
    data = (get() + b"\r\n\r\n")[:cut]
    assert split_head(data) is None


def test_split_head_size_limit() -> None:
    filler = b"X-Pad: " + b"a" * (MAX_HEAD - 100)
    fits = get() + b"\r\n" + filler
    fits += b"b" * (MAX_HEAD - 4 - len(fits))
    assert split_head(fits + b"\r\n\r\nrest") == (fits, b"rest")
    assert parse_request_head(fits).headers[-1][0] == "X-Pad"
    assert split_refused(fits + b"b\r\n\r\n") == TOO_LARGE
    assert split_refused(b"GET " + b"a" * MAX_HEAD) == TOO_LARGE
    assert split_head(b"GET " + b"a" * (MAX_HEAD - 5)) is None


def test_head_over_max_head() -> None:
    assert refused(get("X-Pad: " + "a" * MAX_HEAD)) == TOO_LARGE


# Smuggling through bare line ends: the case that was forwarded as-is.


SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: internal.example\r\n\r\n"


def test_bare_lf_in_request_line_smuggles_nothing() -> None:
    data = b"GET http://allowed.example/ HTTP/1.1\nHost: internal.example\n\n" + SMUGGLED
    assert split_refused(data) == BAD
    assert refused(data.partition(b"\r\n\r\n")[0]) == BAD


def test_bare_lf_in_a_header_smuggles_nothing() -> None:
    data = b"GET http://allowed.example/ HTTP/1.1\r\nX-A: 1\nHost: internal.example\n\n" + SMUGGLED
    assert split_refused(data) == BAD
    assert refused(data.partition(b"\r\n\r\n")[0]) == BAD


@pytest.mark.parametrize(
    "data",
    [
        b"GET http://a/ HTTP/1.1\n\r\n\r\n",  # LF then CRLF CRLF: the boundary follows a bare LF
        b"GET http://a/ HTTP/1.1\r\n\n\r\n",  # CRLF LF CRLF: no CRLFCRLF at all
        b"GET http://a/ HTTP/1.1\r\n\nX: y",  # incomplete, already bad
        b"\nGET http://a/ HTTP/1.1\r\n\r\n",
        b"GET http://a/ HTTP/1.1\r\r\n\r\n",  # bare CR before the boundary
        b"GET http://a/ HTTP/1.1\r\nX: a\rb\r\n\r\n",
        b"GET http://a/\r HTTP/1.1\r\n\r\n",
        b"GET http://a/ HTTP/1.1\r\nX: a\r\r",  # incomplete, bare CR then CR
    ],
)
def test_split_head_bare_cr_lf(data: bytes) -> None:
    assert split_refused(data) == BAD


@pytest.mark.parametrize(
    "data",
    [
        b"GET http://a/ HTTP/1.1\nHost: a",
        b"GET http://a/ HTTP/1.1\r\nHost: a\n",
        b"GET http://a/ HTTP/1.1\r\nHost: a\r",
        b"GET http://a/ HTTP/1.1\r\nX: a\rHost: b",
        b"GET http://a/ HTTP/1.1\r\n\r\nGET http://b/ HTTP/1.1",  # an empty line inside the head
    ],
)
def test_parse_line_ends(data: bytes) -> None:
    assert refused(data) == BAD


# Header fields.


def test_obs_fold() -> None:
    assert refused(get("X-A: 1", " Host: evil")) == BAD
    assert refused(get("X-A: 1", "\tcontinued")) == BAD


@pytest.mark.parametrize("field", ["X-A: a\x00b", "X-A: \x01", "X-A: a\x7f", "X\x00A: 1", "X-A: a\x1bb"])
def test_control_characters(field: str) -> None:
    assert refused(get(field)) == BAD


@pytest.mark.parametrize("field", ["Host : a", "Host\t: a", "X A: 1", ": a", "no colon", "X-\xe9: 1", "X(A): 1"])
def test_bad_field_names(field: str) -> None:
    assert refused(get(field)) == BAD


def test_too_many_headers() -> None:
    fields = [f"X-{i}: {i}" for i in range(MAX_HEADERS)]
    assert refused(get(*fields)) == TOO_LARGE


def test_duplicate_host() -> None:
    assert refused(get("host: other.example")) == BAD
    assert refused(head("CONNECT a.example:443 HTTP/1.1", "Host: a", "Host: a")) == BAD


@pytest.mark.parametrize("field", ["Content_Length: 5", "transfer_encoding: chunked", "CONTENT_length: 0"])
def test_underscore_spellings_of_framing_fields(field: str) -> None:
    assert refused(get(field)) == BAD


def test_other_underscore_names_are_kept() -> None:
    assert parse_request_head(get("X_Forwarded: 1")).headers[-1] == ("X_Forwarded", "1")


# Content-Length and Transfer-Encoding.


def test_duplicate_content_length_equal() -> None:
    assert refused(get("Content-Length: 5", "Content-Length: 5")) == BAD


def test_duplicate_content_length_different() -> None:
    assert refused(get("Content-Length: 5", "content-length: 6")) == BAD


@pytest.mark.parametrize("value", ["-1", "+5", "5 5", "5,5", "0x10", "", "1e3", "1" * 19, "\xb2", "5a"])
def test_bad_content_length(value: str) -> None:
    assert refused(get(f"Content-Length: {value}")) == BAD


def test_largest_content_length() -> None:
    assert parse_request_head(get("Content-Length: " + "9" * 18)).content_length == 10**18 - 1


def test_content_length_and_transfer_encoding() -> None:
    assert refused(get("Content-Length: 5", "Transfer-Encoding: chunked")) == BAD
    assert refused(get("Transfer-Encoding: chunked", "Content-Length: 5")) == BAD


@pytest.mark.parametrize("value", ["gzip", "gzip, chunked", "chunked, chunked", "identity", "xchunked", "chunked;x=1"])
def test_transfer_encoding_not_chunked(value: str) -> None:
    assert refused(get(f"Transfer-Encoding: {value}")) == NOT_IMPLEMENTED


def test_transfer_encoding_twice_or_in_http_1_0() -> None:
    assert refused(get("Transfer-Encoding: chunked", "Transfer-Encoding: chunked")) == BAD
    assert refused(get("Transfer-Encoding: chunked", version="HTTP/1.0")) == BAD


# The request line.


@pytest.mark.parametrize("version", ["HTTP/0.9", "HTTP/2.0", "HTTP/2", "HTTP/1", "HTTP/1.2"])
def test_unsupported_versions(version: str) -> None:
    assert refused(get(version=version)) == BAD_VERSION


@pytest.mark.parametrize("version", ["http/1.1", "HTTP/1.1 ", "HTTP/1.10", "HTTP/11", "HTTPS/1.1", "HTTP/a.b"])
def test_malformed_versions(version: str) -> None:
    assert refused(head(f"GET http://a/ {version}")) == BAD


@pytest.mark.parametrize(
    "line",
    [
        "GET http://a/",  # HTTP/0.9 style: no version
        "GET  http://a/ HTTP/1.1",
        "GET http://a/  HTTP/1.1",
        " GET http://a/ HTTP/1.1",
        "GET\thttp://a/ HTTP/1.1",
        "GET http://a/\tHTTP/1.1",
        "GET http://a/ b HTTP/1.1",
        "G(T http://a/ HTTP/1.1",
        "GET http://a/\x00 HTTP/1.1",
        "GET http://a/\xe9 HTTP/1.1",
        "",
    ],
)
def test_bad_request_lines(line: str) -> None:
    assert refused(head(line)) == BAD


# Targets of plain requests.


@pytest.mark.parametrize(
    "target",
    [
        "/index.html",  # origin-form
        "*",
        "https://example.com/",
        "ftp://example.com/",
        "http:/example.com/",
        "example.com:80",
        "http://user@example.com/",
        "http://user:pw@example.com/",
        "http://allowed.example\\@evil.example/",
        "http://example.com/#frag",
        "http://example.com/a#",
        "http://example.com:0/",
        "http://example.com:65536/",
        "http://example.com:/",
        "http://example.com:080/",
        "http://example.com:+80/",
        "http://example.com:8o/",
        "http://",
        "http:///path",
        "http://exa%6dple.com/",
        "http://ex_ample.com/",
        "http://-example.com/",
        "http://example-.com/",
        "http://a..b/",
        "http://example.com../",
        "http://./",
        "http://" + "a" * 64 + ".com/",
        "http://" + ".".join(["a" * 63] * 4) + "/",  # 255 characters
        "http://127.1/",
        "http://0x7f.0.0.1/",
        "http://2130706433/",
        "http://127.0.0.01/",
        "http://1.2.3.256/",
        "http://[::1/",
        "http://[::1]x/",
        "http://[fe80::1%25eth0]/",
        "http://[v1.x]/",
        "http://[1.2.3.4]/",
        "http://::1/",
        "http://a.com:80:80/",
    ],
)
def test_bad_plain_targets(target: str) -> None:
    assert refused(get(target=target)) == BAD


def test_long_valid_names_and_scheme_case() -> None:
    name = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 characters
    got = parse_request_head(get(target=f"HTTP://{name.upper()}:65535"))
    assert (got.host, got.port, got.path) == (name, 65535, "/")
    assert parse_request_head(get(target="http://1.2.3.4./")).host == "1.2.3.4"
    assert parse_request_head(get(target="http://x-1.r3---sn.example/")).host == "x-1.r3---sn.example"


# CONNECT targets.


@pytest.mark.parametrize(
    "target",
    [
        "example.com",  # no port
        "example.com:",
        "example.com:0",
        "example.com:65536",
        "example.com:https",
        "example.com:44a",
        "example.com:-443",
        "example.com:0443",
        "example.com:443/",
        "example.com:443/path",
        "http://example.com:443",
        "user@example.com:443",
        "[::1]",
        "[::1]443",
        "::1:443",
        "[::g]:443",
        "[fe80::1%eth0]:443",
        ":443",
        "127.1:443",
        "exa%6dple.com:443",
    ],
)
def test_bad_connect_targets(target: str) -> None:
    assert refused(head(f"CONNECT {target} HTTP/1.1")) == BAD


def test_error_carries_status_and_message() -> None:
    with pytest.raises(HeadError) as info:
        parse_request_head(get(target="/"))
    assert isinstance(info.value, ValueError)
    assert info.value.status == BAD
    assert str(info.value) == info.value.message
