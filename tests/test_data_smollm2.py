"""sylva_jax.data with the real SmolLM2-135M-Instruct tokenizer and model (session fixture)."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from sylva_jax.data import evaluate_mmlu, load_mmlu, subset, tokenize_conversation
from sylva_jax.data.mmlu import build_prompt, choice_token_ids

VAL_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mmlu", "zero_shot_mmlu_val.json")
CONV = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."},
                     {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6, of course."}]}


def test_real_tokenizer_chat_and_plain_labels(smollm2):
    _, tok = smollm2
    ex = tokenize_conversation(tok, CONV, 512, template="chat")
    rendered = tok.apply_chat_template(CONV["messages"], tokenize=False)
    # SmolLM2's bos is <|im_start|>, which the template already starts with: nothing prepended,
    # and tokenizing segment by segment gives exactly the tokens of the whole rendered text
    assert tok.decode(ex["input_ids"]) == rendered
    np.testing.assert_array_equal(ex["input_ids"], tok.encode(rendered, add_special_tokens=False))
    lab = ex["labels"] != -100
    np.testing.assert_array_equal(ex["labels"][lab], ex["input_ids"][lab])
    assert tok.decode(ex["input_ids"][lab]) == "It is 4.<|im_end|>6, of course.<|im_end|>"
    plain = tokenize_conversation(tok, CONV, 512, template="plain")
    text = tok.decode(plain["input_ids"])
    assert text.endswith("### Human: And 3+3?\n### Assistant: 6, of course.<|im_end|>")
    assert tok.decode(plain["input_ids"][plain["labels"] != -100]) == " It is 4.<|im_end|> 6, of course.<|im_end|>"


def test_real_model_mmlu_padded_batch_equals_unpadded_reference(smollm2):
    model, tok = smollm2
    from sylva_jax.models.llama import apply, split

    ids = choice_token_ids(tok)
    assert [tok.decode([i]) for i in ids] == [" A", " B", " C", " D"]
    # the two shortest prompts of different subjects and lengths
    enc = lambda q: tok.encode(build_prompt(q), add_special_tokens=False)  # noqa: E731
    qs = sorted(load_mmlu(VAL_FILE).questions, key=lambda q: len(build_prompt(q)))[:40]
    qs.sort(key=lambda q: len(enc(q)))
    pair = [qs[0], next(q for q in qs if q["subject"] != qs[0]["subject"] and len(enc(q)) > len(enc(qs[0])))]
    toks = [enc(q) for q in pair]
    T = len(toks[1]) + 4
    graphdef, params = split(model)
    fwd = jax.jit(lambda p, i, m: apply(graphdef, p, i, m))
    # evaluated: both rows right-padded to T (mask 0 on padding)
    res = evaluate_mmlu(lambda i, m: fwd(params, i, m), tok, pair, batch_size=2, max_len=T, buckets=[T])
    # reference: no padding at all; each prompt is followed by *real* filler tokens up to T and
    # read at its own last position. A causal LM's logits there depend on the prompt only, so
    # this must agree with the padded evaluation (same [2, T] shape: one compilation). Reading
    # any later position (padding, or filler here) or a wrong letter id would disagree.
    filler = tok.encode(" The quick brown fox jumps over the lazy dog." * 4, add_special_tokens=False)
    batch = jnp.asarray([t + filler[: T - len(t)] for t in toks], jnp.int32)
    logits = np.asarray(fwd(params, batch, jnp.ones_like(batch)), np.float64)
    want = ["ABCD"[int(np.argmax(logits[b, len(t) - 1, ids]))] for b, t in enumerate(toks)]
    assert res["predictions"] == want and res["n"] == 2 and res["n_truncated"] == 0
