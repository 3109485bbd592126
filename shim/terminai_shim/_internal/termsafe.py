"""Guest output made safe to show on the user's terminal.

A terminal obeys the bytes it is sent: an escape sequence can retitle the
window, write the clipboard (OSC 52), plant hyperlinks, clear or redraw the
screen, or ask the terminal a question whose answer it types back as if the
user had. A guest is untrusted, so its output must never be able to drive the
terminal of the user who runs it; it must still be readable, and a user
should see that something tried.

So every control that a terminal acts on is shown instead of sent, in a
visible notation, and nothing printable is dropped:

* ``^X`` (caret notation) for a C0 control or DEL: ESC is ``^[``, BEL ``^G``,
  backspace ``^H``, DEL ``^?``. Kept as they are: ``\\n``, ``\\t`` and ``\\r``
  (line endings and progress bars; ``\\r`` can rewrite the current line,
  which is the price of progress bars). Backspace is not kept: in-line
  overwriting adds nothing ``\\r`` does not, and every program that needs
  real terminal control belongs in a PTY session, which has its own,
  narrower filter (``PtyFilter``, below).
* ``<hh>`` (two lower-case hex digits) for a C1 control, U+0080..U+009F,
  whether it came as one 8-bit byte (``\\x9b`` is ``<9b>``) or as UTF-8
  (``\\xc2\\x9b`` is ``<9b>`` too), and for each byte that is not part of valid
  UTF-8 (``\\xff`` is ``<ff>``), since a terminal may read such bytes as C1.

Every other character of valid UTF-8 passes through byte for byte. An escape
sequence split across chunks needs no state, as its introducer is neutralised
on its own; a UTF-8 character split across chunks is held back until it is
whole.
"""

from __future__ import annotations

import codecs
import re

_SAFE_C0 = b"\t\n\r"
# Every byte that is not plain printable ASCII (or a kept control): a chunk without one needs no work.
_NOT_PLAIN = bytes(b for b in range(256) if (b < 0x20 and b not in _SAFE_C0) or b >= 0x7F)
# After decoding with surrogateescape, a byte that was not valid UTF-8 is U+DC80..U+DCFF.
_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\udc80-\udcff]")


def _visible(cp: int) -> str:
    if cp < 0x20 or cp == 0x7F:
        return "^" + chr(cp ^ 0x40)
    return f"<{cp & 0xFF:02x}>"


_SHOWN = {chr(cp): _visible(cp) for cp in [*range(0x20), *range(0x7F, 0xA0), *range(0xDC80, 0xDD00)]}


class TerminalFilter:
    """One output stream's filter: ``feed`` each chunk in order, ``flush`` at the end.

    Not thread-safe: give each stream its own, used by one writer at a time."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")

    def feed(self, chunk: bytes) -> bytes:
        if len(chunk.translate(None, _NOT_PLAIN)) == len(chunk) and not self._decoder.getstate()[0]:
            return chunk  # plain ASCII and no character pending: the fast path
        return self._render(self._decoder.decode(chunk))

    def flush(self) -> bytes:
        """The end of the stream: a character still incomplete is shown as its bytes."""
        return self._render(self._decoder.decode(b"", final=True))

    @staticmethod
    def _render(text: str) -> bytes:
        # One replace per distinct control (usually just ESC) beats a Python call per match; what
        # replaces a control is printable ASCII, so the replacements cannot interact.
        for char in set(_UNSAFE.findall(text)):
            text = text.replace(char, _SHOWN[char])
        return text.encode("utf-8")


# -- a PTY session ------------------------------------------------------------------
# There the guest is meant to drive the terminal (cursor, colours, the
# alternate screen, a full-screen editor), so the filter above would break
# it. Control strings still reach past the screen: OSC 52 reads or writes
# the user's clipboard (a guest could plant a command to be pasted into a
# host shell); device control strings (DCS) are what terminal multiplexers
# pass through to the terminal outside them (tmux's ``ESC P tmux;``) and
# carry terminal-setting requests; SOS, PM and APC strings are extensions'
# (file transfer, graphics). So every control string is parsed the way a
# terminal parses it (ECMA-48, as xterm and tmux do): it starts at its
# introducer in 7-bit form (``ESC ]``, ``ESC P``, ``ESC X``, ``ESC ^``,
# ``ESC _``), as a C1 character in UTF-8, or as a raw 8-bit C1 byte; it
# ends at ST, at BEL (OSC), and at the first other ESC (which starts the
# next sequence: a doubled ESC is no escape); CAN and SUB cancel it. An
# OSC's number is a number (``052`` is 52). Only OSC strings whose number
# is on ``PASSED_OSC`` pass (titles, colours, the working directory,
# hyperlinks, shell marks), re-sent in 7-bit form; every other string is
# dropped whole.

_STRING_START = re.compile("\x1b[\\]PX^_]|[\x90\x98\x9d\x9e\x9f\udc90\udc98\udc9d\udc9e\udc9f]")
_STRAY_ST = re.compile("\x1b\\\\|[\x9c\udc9c]")
_STRING_END = re.compile("[\x07\x18\x1a\x1b\x9c\udc9c]")
_OSC_INTRODUCERS = ("\x1b]", "\x9d", "\udc9d")
_OSC_NUMBER = re.compile("([0-9]+)(?:;|$)")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\udc80-\udcff]")
PASSED_OSC = frozenset({0, 1, 2, 4, 7, 8, 104, 133, *range(10, 20), *range(110, 120)})
MAX_STRING = 4096  # longer OSC strings are dropped whole (nothing legitimate sends more to a terminal)


class PtyFilter:
    """One PTY stream: ``feed`` each chunk in order; sequences and UTF-8
    characters split across chunks are held until complete. Not thread-safe."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self._pending = ""  # a lone ESC at the end of a chunk: what follows decides
        self._string: list[str] | None = None  # inside a control string: its text so far
        self._osc = False
        self._size = 0

    def feed(self, chunk: bytes) -> bytes:
        return self._run(self._pending + self._decoder.decode(chunk)).encode("utf-8", "surrogateescape")

    def flush(self) -> bytes:
        """The end of the stream: an unfinished string is dropped, and so is a lone ESC."""
        rest = self._decoder.decode(b"", final=True)
        out = self._run(self._pending + rest) if rest else ""
        self._pending, self._string = "", None
        return out.encode("utf-8", "surrogateescape")

    def _run(self, text: str) -> str:
        self._pending = ""
        out: list[str] = []
        pos = 0
        while pos < len(text):
            if self._string is None:
                found = _STRING_START.search(text, pos)
                end = found.start() if found else len(text)
                plain = text[pos:end]
                if found is None and plain.endswith("\x1b"):  # the start of an introducer, perhaps
                    plain, self._pending = plain[:-1], "\x1b"
                out.append(_STRAY_ST.sub("", plain))
                if found is None:
                    break
                self._osc = found.group() in _OSC_INTRODUCERS
                self._string, self._size = [], 0
                pos = found.end()
                continue
            found = _STRING_END.search(text, pos)
            if found is None:
                self._take(text[pos:])
                break
            self._take(text[pos : found.start()])
            stop = found.group()
            if stop == "\x1b":
                if found.end() == len(text):  # ST or a new sequence: the next chunk says
                    self._pending = "\x1b"
                    break
                if text[found.end()] == "\\":
                    self._finish(out, "\x1b\\")
                    pos = found.end() + 1
                else:  # any other ESC ends the string unfinished and starts the next sequence
                    self._string = None
                    # (an ESC right after it starts that sequence over, as in a terminal's parser)
                    pos = found.end() if text[found.end()] == "\x1b" else found.start()
                continue
            if stop == "\x07" and not self._osc:  # BEL ends an OSC only; elsewhere it is the string's
                self._take(stop)
            elif stop in ("\x18", "\x1a"):  # CAN and SUB cancel the string
                self._string = None
            else:
                self._finish(out, "\x07" if stop == "\x07" else "\x1b\\")
            pos = found.end()
        return "".join(out)

    def _take(self, text: str) -> None:
        assert self._string is not None
        self._size += len(text)
        if self._size <= MAX_STRING:
            self._string.append(text)

    def _finish(self, out: list[str], terminator: str) -> None:
        parts, self._string = self._string, None
        assert parts is not None
        if not self._osc or self._size > MAX_STRING:
            return
        body = "".join(parts)
        number = _OSC_NUMBER.match(body)
        if number is None or int(number[1]) not in PASSED_OSC or _CONTROL.search(body):
            return
        out.append("\x1b]" + body + terminator)
