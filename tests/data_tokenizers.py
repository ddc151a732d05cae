"""Small, fast tokenizers implementing the protocol sylva_jax.data relies on (tests only).

``WordTokenizer`` splits text like a byte-level BPE would at word granularity: a word keeps
its leading space (``" A"`` is one token), punctuation and whitespace are single tokens, and
special-token strings are atomic. Ids are assigned on first sight, so ``decode(encode(s)) == s``
exactly and the vocabulary stays small.
"""
from __future__ import annotations

import re

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
_PATTERN = re.compile("|".join(re.escape(s) for s in SPECIALS) + r"| ?[A-Za-z0-9]+| ?[^\sA-Za-z0-9]|\s")


class WordTokenizer:
    vocab_limit = 4096

    def __init__(self, *, bos=True, eos="</s>", pad=True, chat=False, add_bos_token=None):
        self._ids = {s: i for i, s in enumerate(SPECIALS)}
        self._strs = list(SPECIALS)
        self.bos_token_id = self._ids["<s>"] if bos else None
        self.eos_token_id = self._ids[eos] if eos else None
        self.pad_token_id = self._ids["<pad>"] if pad else None
        if add_bos_token is not None:
            self.add_bos_token = add_bos_token
        self.chat_template = "chatml" if chat else None

    @property
    def vocab_size(self):
        return self.vocab_limit

    def _id(self, piece):
        if piece not in self._ids:
            if len(self._strs) >= self.vocab_limit:
                raise RuntimeError("test tokenizer vocabulary full")
            self._ids[piece] = len(self._strs)
            self._strs.append(piece)
        return self._ids[piece]

    def encode(self, text, add_special_tokens=False):
        pieces = _PATTERN.findall(text)
        assert "".join(pieces) == text, "tokenizer pattern must cover the text"
        ids = [self._id(p) for p in pieces]
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids):
        return "".join(self._strs[int(i)] for i in ids)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert not tokenize
        s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if add_generation_prompt:
            s += "<|im_start|>assistant\n"
        return s
