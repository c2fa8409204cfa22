"""Incremental detokenization for streaming: each new token's text delta, and where a stop string ends it.

Only the current line is decoded again at each token (a token's text can depend on its neighbours, never
across a newline), so a long answer costs O(line) per token, not O(answer). A character split across
tokens, or text that may begin a stop string, waits for the next tokens before it is sent.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Detokenizer:
    """The text of one sample so far, grown one token at a time."""

    tokenizer: object
    stop: tuple[str, ...] = ()
    text: str = ""  # what the client has been sent
    line_start: int = 0  # tokens before this index are decoded into `text_before_line` for good
    text_before_line: str = ""

    def push(self, tokens: list[int], final: bool) -> tuple[str, bool]:
        """`tokens` is the whole sample, its newest token last; `final`: no token follows. Returns the text
        to send and whether a stop string ended the sample (the text then ends just before it). Text that
        may be the start of a stop string is held back until the next tokens tell, so what was sent never
        has to be taken back."""
        line = self.tokenizer.decode(tokens[self.line_start:], skip_special_tokens=True)
        full = self.text_before_line + line
        if line.endswith("\n"):
            self.line_start, self.text_before_line = len(tokens), full
        at = min((full.find(stop) for stop in self.stop if stop in full), default=-1)
        if at >= 0:
            shown = full[:at]
        elif final:
            shown = full
        else:
            shown = full.rstrip("\ufffd")  # a character split across tokens waits for its other bytes
            shown = shown[:len(shown) - self._maybe_stop(shown)]
        delta, self.text = shown[len(self.text):], shown
        return delta, at >= 0

    def _maybe_stop(self, text: str) -> int:
        """Length of the longest end of `text` that begins a stop string."""
        return max((k for stop in self.stop for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
