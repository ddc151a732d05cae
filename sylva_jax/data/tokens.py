"""Tokenizer conventions shared by the instruction and MMLU encoders."""
from __future__ import annotations

__all__ = ["wants_bos"]


def wants_bos(tok, add_bos: bool | None = None) -> bool:
    """Whether to start sequences with ``tok.bos_token_id``: ``add_bos`` if given, else True
    when the tokenizer has a bos id and does not say ``add_bos_token = False``."""
    if getattr(tok, "bos_token_id", None) is None:
        if add_bos:
            raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
        return False
    if add_bos is not None:
        return bool(add_bos)
    return getattr(tok, "add_bos_token", True) is not False
