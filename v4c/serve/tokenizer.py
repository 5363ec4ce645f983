"""The artifact's tokenizer for the server, incremental detokenization and stop strings.

An artifact holds the checkpoint's ``tokenizer.json`` when the checkpoint had one (the compiler copies
it); without one the server takes prompts as token ids only. Streaming needs text per token, but a
token is not always whole characters (byte-level BPE splits a character's UTF-8 bytes over tokens),
so ``IncrementalDetokenizer`` decodes a short window of recent tokens and releases only text that
no later token can change. ``StopStrings`` finds stop strings in that text as it arrives, holding
back a tail that could still become one.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

REPLACEMENT = "\ufffd"  # what a decoder gives for an incomplete UTF-8 sequence
EOS_TEXT = "<｜end▁of▁sentence｜>"  # DeepSeek's end of a turn (and of a text)


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's character -> byte table: printable Latin-1 bytes stand for themselves, the
    other bytes for the characters from U+0100 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _is_byte_level(tok) -> bool:
    """Whether the decoder is byte-level BPE's (alone or in a sequence): its tokens spell bytes."""
    import json
    try:
        dec = json.loads(tok.to_str()).get("decoder") or {}
    except ValueError:
        return False
    return dec.get("type") == "ByteLevel" or any(d.get("type") == "ByteLevel" for d in dec.get("decoders") or ())


class ServeTokenizer:
    """A ``tokenizers.Tokenizer`` with what the server asks of it."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        added = tok.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if getattr(t, "special", False))
        self.added_ids = frozenset(added)
        self._byte_level = _is_byte_level(tok)
        self._bytes = lru_cache(maxsize=65536)(self._token_bytes)

    @classmethod
    def from_json(cls, text: str) -> "ServeTokenizer":
        from tokenizers import Tokenizer
        return cls(Tokenizer.from_str(text))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str) -> int | None:
        return self.tok.token_to_id(text)

    def eos_ids(self) -> tuple[int, ...]:
        """DeepSeek's end-of-sentence token, when this vocabulary has it."""
        i = self.token_id(EOS_TEXT)
        return () if i is None else (i,)

    def token_bytes(self, token: int) -> bytes:
        """The bytes token ``token`` stands for (a piece of a UTF-8 character for some tokens)."""
        return self._bytes(int(token))

    def _token_bytes(self, token: int) -> bytes:
        piece = self.tok.id_to_token(token)
        if piece is None:
            return b""
        if self._byte_level and token not in self.added_ids:
            table = _byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return self.decode([token]).encode("utf-8")

    def token_text(self, token: int) -> str:
        """How a logprobs entry names token ``token``: its text, or ``bytes:\\xNN...`` for a token
        that is not whole UTF-8 characters (as OpenAI does)."""
        if self.tok.id_to_token(int(token)) is None:  # beyond this tokenizer's vocabulary
            return f"token_id:{int(token)}"
        b = self.token_bytes(token)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


def load_tokenizer(artifact: str | os.PathLike) -> ServeTokenizer | None:
    """The artifact's tokenizer (checked against the manifest's hash), or None when it has none."""
    from ..artifact import open_artifact
    text = open_artifact(Path(artifact), verify=False).tokenizer()  # read_text checks the hash
    return None if text is None else ServeTokenizer.from_json(text)


class IncrementalDetokenizer:
    """Token ids in, text out, a piece per token; the pieces join to the decode of all the tokens.

    A new token can change how the tokens before it decode (a character split over byte tokens, a
    word-initial space a decoder strips at the start), so each step decodes the tokens from
    ``prefix`` (a few tokens of context, already released) to the end and releases what extends the
    text those context tokens gave, unless it ends in an incomplete character."""

    CONTEXT = 4  # prompt tokens kept as context for the first output tokens

    def __init__(self, tok: ServeTokenizer, prompt_ids=(), skip_special_tokens: bool = False):
        self.tok = tok
        self.skip = skip_special_tokens
        self.ids: list[int] = [int(i) for i in list(prompt_ids)[-self.CONTEXT:]]
        self.prefix = 0  # ids[prefix:read] decode to text already released (or prompt text)
        self.read = len(self.ids)

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith(REPLACEMENT) and now.startswith(before):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        if len(self.ids) - self.read > 16 and now.startswith(before):  # never waits forever on bad bytes
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """What is held back at the end (an incomplete character comes out as U+FFFD)."""
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):] if now.startswith(before) else now


class StopStrings:
    """Finds the first stop string in text that arrives in pieces.

    ``feed`` returns the text safe to release: everything before a stop string once one is found
    (``hit`` is then set and the rest is dropped), else everything but the longest tail that could be
    the start of a stop string."""

    def __init__(self, stops=()):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit: str | None = None

    def feed(self, piece: str) -> str:
        if self.hit is not None:
            return ""
        if not self.stops:
            return piece
        buf = self.pending + piece
        found = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if found:
            i, s = min(found)
            self.hit, self.pending = s, ""
            return buf[:i]
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold]

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return "" if self.hit is not None else out
