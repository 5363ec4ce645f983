"""A small byte-level BPE tokenizer with V4's special tokens, for tests of the chat format and the server.

``write_test_tokenizer(dir, vocab_size)`` writes ``tokenizer.json`` and ``tokenizer_config.json`` into
``dir`` (a random checkpoint's directory, say: ``v4c.compile`` copies ``tokenizer.json`` into the artifact
for ``v4c run --prompt`` and the server). Ids 0 and 1 are ``<｜begin▁of▁sentence｜>`` and
``<｜end▁of▁sentence｜>``, the checkpoints' ``bos_token_id`` / ``eos_token_id``; ``<｜User｜>`` and
``<｜Assistant｜>`` follow as special tokens; the think, tool-result and DSML tag pieces are added
(non-special) tokens at the end. Byte-level BPE encodes any text, so every string round-trips.
"""
from __future__ import annotations

import json
from pathlib import Path

from v4c.serve.chat import BOS, EOS, MARKUP_TOKENS, SPECIAL_TOKENS

# a few lines of plain text for the merges (the vocabulary is mostly single bytes anyway)
_TEXT = """\
The weather in Paris is mild today, with light rain in the evening.
You are a helpful assistant. Answer the question and keep the answer short.
What is the capital of France? The capital of France is Paris.
Please call the tool get_weather with the city name and the number of days.
def add(a, b):
    return a + b
print(add(2, 3))  # 5
{"city": "Paris", "days": 3, "unit": "celsius"}
One, two, three, four, five, six, seven, eight, nine, ten.
Think step by step, then write the final answer.
"""


def write_test_tokenizer(dir, vocab_size: int, *, model_max_length: int = 4096) -> Path:
    """Train the tokenizer (deterministic) and write it into ``dir``; returns ``dir``.

    The whole vocabulary, added tokens included, has at most ``vocab_size`` entries (at least 256 bytes
    plus the special and markup tokens: about 270)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    base = 256 + len(SPECIAL_TOKENS)
    if vocab_size < base + len(MARKUP_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is too small: the bytes and V4's tokens take "
                         f"{base + len(MARKUP_TOKENS)}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(MARKUP_TOKENS),  # counts the special tokens, not the ones added later
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TEXT.splitlines(keepends=True), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    n = tok.get_vocab_size(with_added_tokens=True)
    assert n <= vocab_size, (n, vocab_size)
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "model_max_length": model_max_length,
        "add_bos_token": False,  # the chat prompt spells the BOS out
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return d
