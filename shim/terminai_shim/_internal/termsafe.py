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
  real terminal control belongs in a PTY session, which does not filter.
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
