"""Guest output shown on a terminal cannot drive it: escape sequences and
controls come out visible and inert, text comes out byte for byte."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
from terminai_shim import run
from terminai_shim._internal.termsafe import TerminalFilter

pytestmark = pytest.mark.unit


def filtered(*chunks: bytes) -> bytes:
    f = TerminalFilter()
    return b"".join(f.feed(c) for c in chunks) + f.flush()


@pytest.mark.parametrize(
    ("sent", "shown"),
    [
        pytest.param(b"\x1b]0;pwned\x07ok", b"^[]0;pwned^Gok", id="osc0-title"),
        pytest.param(b"\x1b]2;pwned\x1b\\", b"^[]2;pwned^[\\", id="osc2-title-st"),
        pytest.param(b"\x1b]52;c;cm0gLXJmIH4K\x07", b"^[]52;c;cm0gLXJmIH4K^G", id="osc52-clipboard"),
        pytest.param(
            b"\x1b]8;;http://evil/\x1b\\x\x1b]8;;\x1b\\", b"^[]8;;http://evil/^[\\x^[]8;;^[\\", id="osc8-link"
        ),
        pytest.param(b"\x1b[2J\x1b[H", b"^[[2J^[[H", id="csi-clear-home"),
        pytest.param(b"\x1b[6n\x1b[c", b"^[[6n^[[c", id="csi-queries"),
        pytest.param(b"\x1bP+q544e\x1b\\", b"^[P+q544e^[\\", id="dcs"),
        pytest.param(b"\x1b_apc\x1b\\\x1b^pm\x1b\\\x1bXsos\x1b\\", b"^[_apc^[\\^[^pm^[\\^[Xsos^[\\", id="apc-pm-sos"),
        pytest.param(b"\x9b2J", b"<9b>2J", id="8bit-csi"),
        pytest.param(b"\x9d0;t\x9c\x90x\x9c", b"<9d>0;t<9c><90>x<9c>", id="8bit-osc-dcs-st"),
        pytest.param(b"\xc2\x9b2J", b"<9b>2J", id="u009b-as-utf8"),
        pytest.param(b"\xc2\x80\xc2\x9f", b"<80><9f>", id="c1-range-ends-as-utf8"),
        pytest.param(b"ding\x07", b"ding^G", id="bel"),
        pytest.param(b"a\x7fb", b"a^?b", id="del"),
        pytest.param(b"\x00\x08\x0b\x0c\x0e\x1f", b"^@^H^K^L^N^_", id="other-c0"),
        pytest.param(b"\xff", b"<ff>", id="invalid-ff"),
        pytest.param(b"\x80x", b"<80>x", id="lone-continuation"),
        pytest.param(b"\xc3(", b"<c3>(", id="bad-continuation"),
        pytest.param(b"\xc0\x9b[2J", b"<c0><9b>[2J", id="overlong-esc"),
        pytest.param(b"\xed\xa0\x80", b"<ed><a0><80>", id="surrogate"),
        pytest.param(b"\xf4\x90\x80\x80", b"<f4><90><80><80>", id="above-10ffff"),
    ],
)
def test_controls_and_invalid_bytes_are_shown_not_sent(sent: bytes, shown: bytes):
    assert filtered(sent) == shown


@pytest.mark.parametrize(
    "text",
    [
        b"plain ascii, printable: ~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./ 0123456789",
        "café naïve ÿ — “quoted” 你好，世界 한국어 🎉👍🏽 \u00a0nbsp".encode(),
        b"line one\r\nline two\n\tindented\rprogress 50%\rprogress 100%\n",
    ],
    ids=["ascii", "non-ascii", "kept-controls"],
)
def test_text_passes_byte_for_byte(text: bytes):
    assert filtered(text) == text


def test_plain_ascii_is_returned_as_is():
    chunk = b"hello\tworld\r\n" * 1000
    assert TerminalFilter().feed(chunk) is chunk


@pytest.mark.parametrize("char", ["é", "你", "🎉", "\u009b"])
def test_utf8_character_split_at_every_point(char: str):
    whole = b"x" + char.encode() + b"y"
    expected = b"x<9b>y" if char == "\u009b" else whole
    for cut in range(1, len(whole)):
        f = TerminalFilter()
        first = f.feed(whole[:cut])
        assert first == (b"x" if cut <= len(char.encode()) else expected[:-1]), cut  # nothing leaks before it is whole
        assert first + f.feed(whole[cut:]) + f.flush() == expected, cut


def test_utf8_character_fed_one_byte_at_a_time():
    whole = "a🎉é你b".encode()
    f = TerminalFilter()
    assert b"".join(f.feed(whole[i : i + 1]) for i in range(len(whole))) == whole
    assert f.flush() == b""


def test_escape_split_across_feeds():
    f = TerminalFilter()
    assert f.feed(b"before\x1b") == b"before^["
    assert f.feed(b"]0;ti") == b"]0;ti"
    assert f.feed(b"tle\x07after") == b"tle^Gafter"
    assert f.flush() == b""


def test_incomplete_character_at_the_end_is_shown_by_flush():
    f = TerminalFilter()
    assert f.feed(b"ok\xe2\x82") == b"ok"
    assert f.flush() == b"<e2><82>"
    assert f.feed(b"\xac") == b"<ac>"  # the held bytes went out with the flush; nothing joins them later


class FakeTerminal:
    """Test double for a binary stream on a terminal: isatty() says True,
    writes are recorded (no real terminal exists in CI)."""

    def __init__(self, tty: bool = True) -> None:
        self.tty = tty
        self.data = b""

    def isatty(self) -> bool:
        return self.tty

    def write(self, data: bytes) -> int:
        self.data += data
        return len(data)

    def flush(self) -> None:
        pass


def test_guest_output_filters_only_a_terminal_and_not_raw():
    hostile = [b"\x1b]52;c;eA==\x07caf\xc3", b"\xa9\n"]
    for stream, raw, expected in [
        (FakeTerminal(tty=True), False, b"^[]52;c;eA==^Gcaf\xc3\xa9\n"),
        (FakeTerminal(tty=True), True, b"".join(hostile)),
        (FakeTerminal(tty=False), False, b"".join(hostile)),
    ]:
        out = run.GuestOutput(stream, raw=raw)  # type: ignore[arg-type]
        for chunk in hostile:
            out.write(chunk)
        out.finish()
        assert stream.data == expected, (stream.tty, raw)


class FakeSession:
    """Test double for Session: its command emits ``chunks`` as output events, then exits or fails."""

    def __init__(self, chunks: list[tuple[str, bytes]], fail: bool) -> None:
        self.client = self
        self.chunks = chunks
        self.fail = fail

    def weaker_tier_notice(self):
        return None

    def exec(self, command: list[str], **kwargs):
        for name, data in self.chunks:
            kwargs["on_event"](name, data)
        return self

    def wait(self):
        if self.fail:
            raise RuntimeError("the channel broke")
        return SimpleNamespace(timed_out=False, exit_code=3, truncated=[])


@pytest.mark.parametrize("fail", [False, True], ids=["exits", "raises"])
@pytest.mark.parametrize("raw_output", [False, True], ids=["filtered", "raw"])
def test_run_command_filters_each_terminal_stream(monkeypatch, fail: bool, raw_output: bool):
    chunks = [
        ("stdout", b"\x1b]0;t\x07out \xe4\xbd"),
        ("stderr", b"\x9b2Jerr \xe4\xbd"),
        ("stdout", b"\xa0"),
        ("exit", b""),
    ]
    session = FakeSession(chunks, fail)
    config = SimpleNamespace(workspace=None, workspace_mount=None)
    launch = SimpleNamespace(config=config, choice=None, boot=lambda: contextlib.nullcontext(session))
    monkeypatch.setattr(run, "resolve", lambda request, progress=None: launch)  # a stand-in tier: the filter is tested
    stdout, stderr = FakeTerminal(), FakeTerminal()
    monkeypatch.setattr(run.sys, "stdout", SimpleNamespace(buffer=stdout))
    monkeypatch.setattr(run.sys, "stderr", SimpleNamespace(buffer=stderr))
    monkeypatch.setattr(run.sys, "stdin", SimpleNamespace(closed=False, isatty=lambda: True))

    def go() -> int:
        return run.run_command(
            None, ["x"], shell=False, timeout=None, verbose=False, raw_output=raw_output, tty=False, interactive=False
        )  # type: ignore[arg-type]

    if fail:
        with pytest.raises(RuntimeError):
            go()
    else:
        assert go() == 3
    if raw_output:
        assert stdout.data == b"\x1b]0;t\x07out \xe4\xbd\xa0"
        assert stderr.data == b"\x9b2Jerr \xe4\xbd"
    else:  # one filter per stream: stdout's half character is completed by stdout, stderr's is flushed at the end
        assert stdout.data == "^[]0;t^Gout 你".encode()
        assert stderr.data == b"<9b>2Jerr <e4><bd>"
