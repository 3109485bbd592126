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
# it. Two kinds of sequence still reach past the screen, and are dropped:
# OSC 52, which reads or writes the user's clipboard (a guest could plant a
# command to be pasted into a host shell), and device control strings (DCS),
# which terminal multiplexers pass through to the terminal outside them
# (tmux's ``ESC P tmux;``) and which carry terminal-setting requests. Other
# OSC strings (the window title, hyperlinks, colours) pass.

_INTRODUCER = re.compile(rb"\x1b[\]P]|\xc2[\x90\x9d]")
_STRING_END = re.compile(rb"\x07|\x1b|\xc2\x9c|[\x18\x1a]")
_BLOCKED_OSC = {b"52"}
MAX_STRING = 4096  # longer OSC strings are dropped whole (nothing legitimate sends more to a terminal)


class PtyFilter:
    """One PTY stream: ``feed`` each chunk in order; sequences split across
    chunks are held until complete. Not thread-safe."""

    def __init__(self) -> None:
        self._pending = b""  # an incomplete introducer or string, held back
        self._string: bytearray | None = None  # inside an OSC or DCS string: its bytes so far
        self._osc = False
        self._too_long = False

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        self._pending = b""
        out = bytearray()
        pos = 0
        while pos < len(data):
            if self._string is None:
                found = _INTRODUCER.search(data, pos)
                # a lone ESC or 0xC2 at the very end may start an introducer: hold it
                end = found.start() if found else len(data)
                if found is None and data[-1:] in (b"\x1b", b"\xc2"):
                    end = len(data) - 1
                    self._pending = data[end:]
                out += data[pos:end]
                if found is None:
                    break
                introducer = found.group()
                self._osc = introducer in (b"\x1b]", b"\xc2\x9d")
                self._string = bytearray(introducer)
                self._too_long = False
                pos = found.end()
                continue
            end_match = _STRING_END.search(data, pos)
            if end_match is None:
                if data.endswith(b"\xc2"):  # perhaps the first half of a C1 string terminator
                    self._take(data[pos:-1])
                    self._pending = b"\xc2"
                else:
                    self._take(data[pos:])
                break
            self._take(data[pos : end_match.start()])
            terminator = end_match.group()
            if terminator == b"\x1b":
                if end_match.end() == len(data):  # ESC at the end: ST or not, the next chunk says
                    self._pending = b"\x1b"
                    break
                follows = data[end_match.end() : end_match.end() + 1]
                if follows == b"\\":
                    self._finish(out, b"\x1b\\")
                    pos = end_match.end() + 1
                elif follows == b"\x1b":  # a doubled ESC is data (how tmux passes sequences through)
                    self._take(b"\x1b\x1b")
                    pos = end_match.end() + 1
                else:  # ESC starts a new sequence: the string is abandoned (terminals do the same)
                    self._string = None
                    pos = end_match.start()
                continue
            if terminator == b"\x07" and not self._osc:  # BEL ends an OSC string only
                self._take(terminator)
            elif terminator in (b"\x18", b"\x1a"):  # CAN/SUB cancel the string
                self._string = None
            else:
                self._finish(out, terminator)
            pos = end_match.end()
        return bytes(out)

    def flush(self) -> bytes:
        """The end of the stream: an unfinished string is dropped; a held byte is shown."""
        held, self._pending, self._string = self._pending, b"", None
        return held if held != b"\x1b" else b""

    def _take(self, data: bytes) -> None:
        assert self._string is not None
        if self._too_long or len(self._string) + len(data) > MAX_STRING:
            self._too_long = True
            return
        self._string += data

    def _finish(self, out: bytearray, terminator: bytes) -> None:
        string, self._string = self._string, None
        assert string is not None
        if not self._osc or self._too_long:
            return
        body = bytes(string[2:])  # both introducers are two bytes
        if body.split(b";", 1)[0] in _BLOCKED_OSC:
            return
        out += string + terminator
