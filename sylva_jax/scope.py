"""Which weights a scope selects: substring, ``re:`` regular expression, or a list of those."""
from __future__ import annotations

import re
from typing import Callable, Iterable

__all__ = ["match_scope"]


def match_scope(scope, names: Iterable[str]) -> list[str]:
    """The names selected by ``scope``, in the order given.

    ``scope`` is
    - a plain string: a *substring* test (``"self_attn"``, ``"model.layers"``), the seed's
      semantics;
    - a string starting with ``"re:"`` or a compiled ``re.Pattern``: a regular expression
      matched with ``re.search`` (``"re:layers\\.(0|1)\\..*proj"``);
    - a sequence of the above: their union.
    Raises ``ValueError`` listing the available names when nothing matches.
    """
    names = list(names)
    preds = _scope_predicates(scope)
    chosen = [n for n in names if any(p(n) for p in preds)]
    if not chosen:
        listing = "\n  ".join(names) if names else "(none)"
        raise ValueError(
            f"scope {scope!r} matches no linear layer. Use a substring of one of these weight "
            f"names, or 're:<regex>' for a regular expression:\n  {listing}"
        )
    return chosen


def _scope_predicates(scope) -> list[Callable[[str], bool]]:
    if isinstance(scope, re.Pattern):
        return [lambda n, s=scope: s.search(n) is not None]
    if isinstance(scope, str):
        if not scope:
            raise ValueError("scope is empty; give a substring such as 'self_attn' or 'model.layers'")
        if scope.startswith("re:"):
            try:
                pat = re.compile(scope[3:])
            except re.error as e:
                raise ValueError(f"scope {scope!r}: invalid regular expression ({e})") from None
            return [lambda n, s=pat: s.search(n) is not None]
        return [lambda n, s=scope: s in n]
    if isinstance(scope, (list, tuple)) and scope:
        return [p for s in scope for p in _scope_predicates(s)]
    raise TypeError(
        f"scope must be a substring, 're:<regex>', a compiled re.Pattern or a list of those; "
        f"got {scope!r}"
    )
