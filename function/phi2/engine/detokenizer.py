"""Token ids to text, one token at a time: what a stream may send now, and where a stop string ends it.

Byte-level BPE tokens are not characters: one emoji may take three tokens, and a token may end halfway
through a UTF-8 sequence. Decoding each token alone would send broken characters, so a row decodes a
short window of recent tokens and emits only what the window adds once it no longer ends in a partial
character (the approach of TGI's and vLLM's incremental detokenizers). Text that could be the start of
a stop string is held back until the following text shows it is not one, so a stream never sends text
that the buffered answer would have cut. Buffered and streamed answers both come from this class, so
they are the same text.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    """The growing text of one generated row."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._prefix = 0  # the window starts here: tokens decoded for context only
        self._read = 0  # tokens whose text is already in self._text
        self._text = ""
        self._sent = 0  # characters of self._text already handed out
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add a generated token; return the text that is now final (possibly empty).

        After a stop string completes, `stopped` is True, the text ends before the stop string, and
        further tokens are ignored.
        """
        if self.stopped:
            return ""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        if len(window) > len(before) and not window.endswith(REPLACEMENT):
            self._append(before, window)
        return self._release(final=self.stopped)

    def finish(self) -> str:
        """The row ended (end-of-text, length, deadline): return everything not handed out yet."""
        if not self.stopped and self._read < len(self._ids):
            # A partial character at the very end: the buffered answer decodes it as U+FFFD too.
            self._append(self._decode(self._ids[self._prefix : self._read]), self._decode(self._ids[self._prefix :]))
        return self._release(final=True)

    def _append(self, before: str, window: str) -> None:
        # A stop string may straddle the old end: search from where it could begin.
        searched_from = max(0, len(self._text) - max((len(s) for s in self._stop), default=0) + 1)
        self._text += window[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._check_stop(searched_from)

    def _check_stop(self, searched_from: int) -> None:
        cut = min((i for i in (self._text.find(s, searched_from) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self._text = self._text[:cut]
            self.stopped = True

    def _release(self, *, final: bool) -> str:
        end = len(self._text) if final else len(self._text) - self._held_back()
        end = max(end, self._sent)
        out, self._sent = self._text[self._sent : end], end
        return out

    def _held_back(self) -> int:
        """Characters at the end that could begin a stop string."""
        longest = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    @property
    def text(self) -> str:
        """All text so far (including any held back), cut before a completed stop string."""
        return self._text

    @property
    def token_count(self) -> int:
        """Tokens pushed until now (a stop string's last token included)."""
        return len(self._ids)
