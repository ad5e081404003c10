"""Generated ids -> the reply's text: incremental detokenising, `stop` strings, and the split of GLM's
`<think>...</think><answer>...</answer>` into reasoning and a clean content (no tags, the box markers dropped and
their coordinates kept), the same for a streamed reply as for a whole one. The one splitter of the package: the
CLI's display, the server's replies and `strip_thinking` (a chat's history) all read it.

Rule (vLLM's glm45 parser, plus the <answer> tags it leaves in): a reply that starts with <think> is reasoning
until </think>, then content; one that does not is all content. What might still become a tag or a stop string
is held back until the next token tells.
"""
from __future__ import annotations

from .boxes import BEGIN_BOX, END_BOX

THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
_TAGS = (THINK, END_THINK, ANSWER, END_ANSWER, BEGIN_BOX, END_BOX)


def split(text: str) -> tuple[str, str]:
    """(reasoning, content) of a reply's text, tags removed (box markers kept: parse them from content first)."""
    t = text.lstrip()
    if t.startswith(THINK):
        body = t[len(THINK):]
        reasoning, sep, rest = body.partition(END_THINK)
        if not sep:
            return reasoning.lstrip(), ""
        return reasoning.lstrip(), _clean(rest).lstrip()
    return "", _clean(t)


def _clean(s: str) -> str:
    return s.replace(ANSWER, "").replace(END_ANSWER, "").replace(THINK, "").replace(END_THINK, "")


def _held(text: str, stops) -> int:
    """How many trailing characters might still be the start of a tag or a stop string."""
    n = 0
    for word in (*_TAGS, *stops):
        for k in range(min(len(word) - 1, len(text)), n, -1):
            if text.endswith(word[:k]):
                n = k
                break
    return n


class Reply:
    """Feed token ids as they come; read the deltas to send. `stopped` turns True when a stop string appears
    (the text is cut before it)."""

    def __init__(self, tokenizer, stops=()):
        self.tok, self.stops = tokenizer, [s for s in stops if s]
        self.ids = []
        self.text = ""            # the reply so far, tags included, cut at a stop string
        self._text, self._pending, self._window = "", "", (0, 0)
        self.sent = ("", "")      # (reasoning, content) already sent
        self.stopped = False

    def add(self, token: int, final: bool = False) -> tuple[str, str]:
        if token is not None and not self.stopped:
            self.ids.append(int(token))
            # decode a short window, not the whole reply per token (quadratic over a long reply): the text of
            # ids[p:] minus that of ids[p:r], the ids already turned into text, once it is whole UTF-8
            p, r = self._window
            done = self.tok.decode(self.ids[p:r], skip_special_tokens=True)
            full = self.tok.decode(self.ids[p:], skip_special_tokens=True)
            if not full.endswith("\ufffd") or final:
                self._text += full[len(done):]
                self._window = (r, len(self.ids))
                self._pending = ""
            else:
                self._pending = full[len(done):]
            self.text = self._text + self._pending
            for s in self.stops:
                i = self.text.find(s)
                if i >= 0:
                    self.text, self.stopped = self.text[:i], True
        return self._delta(final or self.stopped)

    def finish(self) -> tuple[str, str]:
        return self._delta(True)

    def _delta(self, final: bool) -> tuple[str, str]:
        text = self.text
        if not final:
            text = text.rstrip("\ufffd")      # an incomplete UTF-8 sequence: wait for its next token
            text = text[:len(text) - _held(text, self.stops)]
        r, c = split(text)
        r = strip_boxes(r)
        c = strip_boxes(c)
        if not final:   # trailing whitespace may end a section: send it once more text follows
            r, c = (r.rstrip(), "") if not c else (r, c.rstrip())
        dr, dc = r[len(self.sent[0]):], c[len(self.sent[1]):]
        if r.startswith(self.sent[0]) and c.startswith(self.sent[1]):
            self.sent = (r, c)
            return dr, dc
        return "", ""

    def result(self) -> tuple[str, str]:
        """(reasoning, content) of the whole reply, stripped (the non-streamed message)."""
        r, c = split(self.text)
        return strip_boxes(r).strip(), strip_boxes(c).strip()


def strip_boxes(s: str) -> str:
    return s.replace(BEGIN_BOX, "").replace(END_BOX, "")
