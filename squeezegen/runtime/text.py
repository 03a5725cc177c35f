"""Tokens back to text, one row at a time: streaming pieces, EOS and stop strings."""

from __future__ import annotations


class Detokenizer:
    """Turns one row's growing token list into text pieces without re-decoding everything."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # tokens before this are settled text
        self._read = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix :], skip_special_tokens=True)
        if after.endswith("\ufffd") or len(after) <= len(before):  # mid-character, or nothing visible
            return ""
        piece = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += piece
        return piece


class RowText(Detokenizer):
    """One generated row as text: `add` returns the piece to stream and sets `finish` ("eos" at an
    EOS or stop token, "stop" when a stop string appears; the caller sets "length"). Within the first
    `min_tokens` tokens neither ends it (vLLM's min_tokens)."""

    def __init__(self, tokenizer, eos: set[int], stops: list[str], min_tokens: int = 0) -> None:
        super().__init__(tokenizer)
        self.eos, self.stops, self.min_tokens = eos, stops, min_tokens
        self.longest_stop = max((len(s) for s in stops), default=0)
        self.finish: str | None = None

    def add(self, token: int) -> str:
        piece = super().add(token)
        if len(self.ids) <= self.min_tokens:
            return piece
        if token in self.eos:
            self.finish = "eos"
            return ""
        if self.stops and any(s in self.text[-(len(piece) + self.longest_stop) :] for s in self.stops):
            self.finish = "stop"
            return ""
        return piece

    def final(self) -> str:
        """The text, cut before the first stop string if one ended it."""
        if self.finish != "stop":
            return self.text
        return self.text[: min(self.text.find(s) for s in self.stops if s in self.text)]
