"""One user's generated text, token by token, with OpenAI's stop strings.

`push(token)` returns the text that can be sent now, and whether a stop string has
appeared. Text that might be the beginning of a stop string is held back until the next
tokens show it is not, so a client never receives any part of a stop string; when one
appears, the text ends just before it. Incomplete UTF-8 characters are held back too
(Tokenizer.stream_decoder). At the end, `flush()` gives what was held back.
"""
from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stops=()):
        self._push = tokenizer.stream_decoder()
        self.stops = [s for s in stops if s]
        self.text = ""  # everything decoded so far (up to a stop string once one is found)
        self.sent = 0  # characters of `text` already returned
        self.stopped = False

    def push(self, token_id: int) -> tuple[str, bool]:
        """The token's new sendable text, and True once a stop string has appeared."""
        if self.stopped:
            return "", True
        self.text += self._push(token_id)
        cut = self._first_stop()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self._take(cut), True
        return self._take(len(self.text) - self._held()), False

    def flush(self) -> str:
        """What remains to send when generation ends without a stop string."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out

    def _first_stop(self) -> int | None:
        """Where the earliest stop string starts. Only unsent text can hold one: every
        ending of the sent text that begins a stop string was held back."""
        found = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _held(self) -> int:
        """Characters at the end of the text that start some stop string."""
        held = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:n]):
                    held = n
                    break
        return held
