"""Benchmark: sylva_jax against Hugging Face transformers + PEFT on the same CPU.

What a user would otherwise run. SmolLM2-135M shapes (random weights by default, the same
values on both sides: our model is exported with ``save_pretrained`` and reloaded by
transformers; ``--pretrained`` uses the real SmolLM2-135M), float32, one process, every arm
interleaved round-robin after a warm-up; the median step time per arm and the ratios.

Training arms (one optimizer update on ``B x T`` random tokens, labels = inputs):
  peft_lora     PEFT LoRA, rank r on every linear in scope, dropout 0, torch AdamW
  peft_lora_do  the same with dropout 0.05
  hf_full       transformers full fine-tuning, torch AdamW
  sylva         sylva_jax sylva, 95% random tiles in scope (r chosen so that LoRA's
                trainable count ~ sylva's, as experiments/bench_step.py)
  lora, full    sylva_jax LoRA (rank r) and full fine-tuning
  floor         sylva_jax forward + input gradients only: ``jax.grad`` w.r.t. a probe that
                scales the embedding output (weights frozen), through the model and loss
                every other arm uses; the cheapest step any method can take

Scoring arms (forward only, MMLU-style: the logits at one position per row):
  score_jax       ``llama.apply(..., logits_at=pos)``, jitted
  score_hf        transformers, ``torch.no_grad``, ``logits_to_keep=1`` (pos = last token)

Also written: compiled FLOPs and memory of our steps, CPU time / wall time of each arm (the
threads it really keeps busy), a per-op profile of our sylva step (XLA thunks grouped by
kind) and of PEFT LoRA's (torch.profiler), and, with ``--memory``, the peak resident memory
of a process that runs only that arm (``VmHWM`` over two steps, one subprocess per arm).

Usage: python experiments/bench_peer.py [--cases model.layers:1x512,self_attn:1x512,...]
       [--rounds 5] [--memory] [--profile] [--pretrained] [--out experiments/results/peer.json]
Needs the ``peer`` extra (torch==2.13.0, transformers, peft).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
from bench_step import SMOLLM2, batch_of, random_masks, random_model  # noqa: E402

from sylva_jax.adapter import make_adapter  # noqa: E402
from sylva_jax.atomic import atomic_open  # noqa: E402
from sylva_jax.models import llama  # noqa: E402
from sylva_jax.lora import rank_for_budget  # noqa: E402
from sylva_jax.train import make_train_step  # noqa: E402

TARGETS = {"model.layers": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"]}
TRAIN_ARMS = ("peft_lora", "peft_lora_do", "hf_full", "sylva", "lora", "full", "floor")
LR = 1e-4


# ---------------------------------------------------------------------------- models
def jax_model(pretrained: bool, layers: int):
    if pretrained:
        from bench_step import pretrained_model

        return pretrained_model()
    return random_model(layers)


def export(graphdef, params, out_dir):
    from sylva_jax.models.loading import save_pretrained

    save_pretrained(llama.merge(graphdef, params), out_dir)
    return out_dir


def hf_model(path):
    import torch
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).train()


# ---------------------------------------------------------------------------- torch arms
class TorchArm:
    """One torch training step: forward with labels (HF's loss), backward, AdamW."""

    def __init__(self, path, kind, scope, rank):
        import torch

        model = hf_model(path)
        if kind.startswith("peft"):
            import peft

            cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS[scope],
                                  lora_dropout=0.05 if kind == "peft_lora_do" else 0.0, bias="none",
                                  task_type="CAUSAL_LM")
            model = peft.get_peft_model(model, cfg)
        self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.num_trainable = sum(p.numel() for p in self.trainable)
        self.opt = torch.optim.AdamW(self.trainable, lr=LR, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)

    def step(self, tb):
        self.opt.zero_grad(set_to_none=True)
        out = self.model(**tb)
        out.loss.backward()
        self.opt.step()
        return float(out.loss.detach())


def torch_batch(batch):
    import torch

    return {k: torch.as_tensor(np.asarray(v), dtype=torch.long) for k, v in batch.items()}


# ---------------------------------------------------------------------------- jax arms
def floor_step(graphdef):
    """Forward + backward to the embedding output, no weight gradient, no update."""
    from sylva_jax.models.llama import dense_linear

    def loss(probe, params, batch):
        def linear_fn(name, x, w, b):
            if ".layers.0." in name:  # the first layer's inputs: the embedding output
                x = x * (1.0 + probe).astype(x.dtype)
            return dense_linear(name, x, jax.lax.stop_gradient(w), b)

        return llama.loss(graphdef, params, batch["input_ids"], batch["attention_mask"], batch["labels"],
                          linear_fn=linear_fn, hook_head=False)

    grad = jax.jit(jax.value_and_grad(loss))
    zero = jnp.zeros((), jnp.float32)
    return lambda params, batch: grad(zero, params, batch)


class JaxArm:
    def __init__(self, graphdef, params, kind, scope, adapter, rank):
        self.kind = kind
        if kind == "floor":
            self.params, self.fn, self.num_trainable = params, floor_step(graphdef), 0
            self.trainer = None
            return
        common = dict(learning_rate=LR, schedule="constant", warmup_steps=0)
        spec = {"sylva": dict(method="sylva", adapter=adapter),
                "lora": dict(method="lora", scope=scope, lora_rank=rank, lora_alpha=2 * rank),
                "full": dict(method="full")}[kind]
        self.trainer = make_train_step(graphdef, **spec, **common)
        self.state = self.trainer.init(jax.tree.map(jnp.copy, params))
        self.num_trainable = self.trainer.num_trainable

    def compiled_stats(self, batch):
        if self.trainer is None:
            return {}
        compiled = self.trainer.step_fn.lower(self.state, batch).compile()
        cost = compiled.cost_analysis()
        cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
        mem = compiled.memory_analysis()
        out = {"flops": float(cost.get("flops", float("nan")))}
        if mem is not None:
            out["xla_memory_bytes"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                       - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
            out["xla_temp_bytes"] = mem.temp_size_in_bytes
        return out

    def step(self, batch):
        if self.trainer is None:
            loss, _ = self.fn(self.params, batch)
            return float(jax.block_until_ready(loss))
        self.state, m = self.trainer.step(self.state, batch)
        jax.block_until_ready(self.state)
        return float(m["loss"])


def make_arm(name, ctx):
    if name in ("peft_lora", "peft_lora_do", "hf_full"):
        return TorchArm(ctx["path"], name, ctx["scope"], ctx["rank"])
    return JaxArm(ctx["graphdef"], ctx["params"], name, ctx["scope"], ctx["adapter"], ctx["rank"])


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn):
    c0, t0 = cpu_seconds(), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    return out, wall, cpu_seconds() - c0


# ---------------------------------------------------------------------------- profiles
def _hlo_index(text):
    index = {}
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+)", line)
        if m:
            index.setdefault(m.group(1), line)
    return index


def _is_score_shape(shape, tokens):
    """A ``[..., query block, key prefix]`` array of ``llama.causal_attention`` (or ``[T, T]``)."""
    dims = re.search(r"\[([\d,]+)\]", shape)
    dims = [int(d) for d in dims.group(1).split(",")] if dims else []
    blocks = llama._blocks(tokens, llama.ATTN_BLOCK)
    return len(dims) >= 2 and (dims[-2:] == [tokens, tokens] or (
        dims[-1] in {stop for _, stop in blocks} and dims[-2] in {stop - start for start, stop in blocks}))


def _kind(name, line, vocab, tokens):
    shape = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (\S+)", line or "")
    shape = shape.group(1) if shape else ""
    is_dot = name.startswith(("ynn_fusion", "dot", "xnn_fusion", "onednn")) or " dot(" in (line or "")
    if str(vocab) in shape:
        return "lm_head+loss: dots" if is_dot else "lm_head+loss: softmax, copies"
    if _is_score_shape(shape, tokens):
        return "attention: scores/probs dots" if is_dot else "attention: mask, softmax"
    if is_dot:
        return "linear layers: dots"
    if "copy" in name or "transpose" in name:
        return "copies / transposes"
    if "scatter" in name or "gather" in name:
        return "gather / scatter (embedding, tiles)"
    return "elementwise (norms, RoPE, SwiGLU, residuals, optimizer)"


def profile_jax(arm, batch, vocab, tokens):
    """Per-op wall time of one step (XLA:CPU thunks from jax.profiler), grouped by kind."""
    text = arm.trainer.step_fn.lower(arm.state, batch).compile().as_text()
    index = _hlo_index(text)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            arm.step(batch)
        files = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
        events = json.load(gzip.open(files[0]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    kinds, top = collections.defaultdict(float), collections.defaultdict(float)
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name not in index:
            continue
        ms = e.get("dur", 0) / 1e3
        kinds[_kind(name, index[name], vocab, tokens)] += ms
        top[name] += ms
    total = sum(kinds.values())
    ops = sorted(top.items(), key=lambda kv: -kv[1])[:15]
    return {"total_op_ms": total,
            "by_kind_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "by_kind_share": {k: v / total for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": k, "ms": v, "hlo": index[k].strip()[:160]} for k, v in ops]}


def profile_torch(arm, tb):
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        arm.step(tb)
    rows = []
    for ev in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]:
        rows.append({"op": ev.key, "self_ms": ev.self_cpu_time_total / 1e3, "calls": ev.count})
    return {"total_self_ms": sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3, "top_ops": rows}


# ---------------------------------------------------------------------------- cases
def bench_train(ctx, arms, rounds, warmup, profile):
    b, t, scope = ctx["b"], ctx["t"], ctx["scope"]
    batch = batch_of(b, t)
    tb = torch_batch(batch)
    res, live = {}, {}
    for name in arms:
        t0 = time.perf_counter()
        arm = make_arm(name, ctx)
        res[name] = {"num_trainable": int(arm.num_trainable), "times_s": [], "cpu_over_wall": []}
        if isinstance(arm, JaxArm):
            res[name].update(arm.compiled_stats(batch))
        feed = tb if isinstance(arm, TorchArm) else batch
        for _ in range(warmup):
            res[name]["warmup_loss"] = arm.step(feed)  # the last warm-up step's loss
        res[name]["ready_s"] = time.perf_counter() - t0
        live[name] = (arm, feed)
        print(f"  {scope} {b}x{t} {name}: ready in {res[name]['ready_s']:.0f} s, loss {res[name]['warmup_loss']:.4f}",
              flush=True)
    for _ in range(rounds):
        for name, (arm, feed) in live.items():
            _, wall, cpu = timed(lambda: arm.step(feed))
            res[name]["times_s"].append(wall)
            res[name]["cpu_over_wall"].append(cpu / wall)
    for name in res:
        res[name]["median_s"] = statistics.median(res[name]["times_s"])
        res[name]["cpu_over_wall"] = statistics.median(res[name]["cpu_over_wall"])
    case = {"scope": scope, "batch": b, "tokens": t, "lora_rank": ctx["rank"],
            "sylva_tiles": ctx["n_tiles"], "rounds": rounds, "arms": res}
    if profile:
        case["profile"] = {}
        if "sylva" in live:
            case["profile"]["sylva_xla_ops"] = profile_jax(live["sylva"][0], batch, SMOLLM2["vocab_size"], t)
        if "peft_lora" in live:
            case["profile"]["peft_lora_torch_ops"] = profile_torch(live["peft_lora"][0], tb)
    case["loadavg"] = os.getloadavg()
    case["ratios"] = ratios(res)
    return case


def ratios(a):
    pairs = [("sylva", "peft_lora"), ("sylva", "peft_lora_do"), ("sylva", "hf_full"), ("full", "hf_full"),
             ("floor", "hf_full"), ("lora", "peft_lora"), ("sylva", "floor")]
    return {f"{x}_over_{y}": a[x]["median_s"] / a[y]["median_s"] for x, y in pairs if x in a and y in a}


def bench_score(ctx, rows, t, rounds):
    import torch

    graphdef, params = ctx["graphdef"], ctx["params"]
    batch = batch_of(rows, t)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos = jnp.full((rows,), t - 1, jnp.int32)
    score_jax = jax.jit(lambda p, i, m, q: llama.apply(graphdef, p, i, m, logits_at=q))
    hf = hf_model(ctx["path"]).eval()
    ti, tm = torch.as_tensor(np.asarray(ids), dtype=torch.long), torch.as_tensor(np.asarray(mask), dtype=torch.long)

    def run_hf():
        with torch.no_grad():
            return hf(input_ids=ti, attention_mask=tm, logits_to_keep=1).logits[:, -1].numpy()

    arms = {"score_jax": lambda: np.asarray(jax.block_until_ready(score_jax(params, ids, mask, pos))),
            "score_hf": run_hf}
    outs = {n: f() for n, f in arms.items()}
    outs = {n: f() for n, f in arms.items()}  # second warm-up
    res = {n: {"times_s": [], "cpu_over_wall": []} for n in arms}
    for _ in range(rounds):
        for n, f in arms.items():
            _, wall, cpu = timed(f)
            res[n]["times_s"].append(wall)
            res[n]["cpu_over_wall"].append(cpu / wall)
    for n in res:
        res[n]["median_s"] = statistics.median(res[n]["times_s"])
        res[n]["cpu_over_wall"] = statistics.median(res[n]["cpu_over_wall"])
    return {"rows": rows, "tokens": t, "rounds": rounds, "arms": res,
            "max_abs_logit_diff": float(np.abs(outs["score_jax"] - outs["score_hf"]).max()),
            "score_jax_over_score_hf": res["score_jax"]["median_s"] / res["score_hf"]["median_s"],
            "loadavg": os.getloadavg()}


# ---------------------------------------------------------------------------- memory (subprocess per arm)
def _rss_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(args):
    """Run one arm for 2 steps in this (fresh) process; print its resident memory.

    ``rss_before_steps_mb`` is the resident set once the arm is built (weights, optimizer
    state); ``step_peak_rss_mb`` the peak resident set during the two steps (``VmHWM``, reset
    through ``/proc/self/clear_refs`` just before them; ``ru_maxrss`` would carry the
    parent's peak across ``exec``). A torch arm never builds the JAX weights.
    """
    import gc

    torch_arm = args.memory_child in ("peft_lora", "peft_lora_do", "hf_full")
    ctx = build_ctx(args, args.memory_child_scope, with_params=not torch_arm)
    ctx.update(b=args.memory_child_b, t=args.memory_child_t)
    batch = batch_of(ctx["b"], ctx["t"])
    arm = make_arm(args.memory_child, ctx)
    feed = torch_batch(batch) if torch_arm else batch
    ctx.clear()  # the arm owns its own copy of the weights (the state is donated)
    gc.collect()
    before = _rss_mb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    for _ in range(2):
        arm.step(feed)
    print(json.dumps({"arm": args.memory_child, "rss_before_steps_mb": before,
                      "step_peak_rss_mb": _rss_mb("VmHWM") if reset else None, "num_trainable": arm.num_trainable}))


def bench_memory(args, scope, b, t, arms):
    out = {}
    for name in arms:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory_child", name, "--memory_child_scope", scope,
               "--memory_child_b", str(b), "--memory_child_t", str(t), "--model_dir", args.model_dir]
        if args.pretrained:
            cmd.append("--pretrained")
        cmd += ["--layers", str(args.layers)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  memory {scope} {b}x{t} {name}: {out[name]}", flush=True)
    res = {"scope": scope, "batch": b, "tokens": t, "arms": out}
    if "sylva" in out and "peft_lora" in out:
        if out["sylva"].get("step_peak_rss_mb") and out["peft_lora"].get("step_peak_rss_mb"):
            res["sylva_over_peft_lora"] = out["sylva"]["step_peak_rss_mb"] / out["peft_lora"]["step_peak_rss_mb"]
    return res


def build_ctx(args, scope, with_params=True):
    """Model, HF export, random sylva masks and the matching LoRA rank for one scope.

    ``with_params=False`` (memory runs of a torch arm): shapes only, nothing materialised.
    """
    if with_params:
        graphdef, params = jax_model(args.pretrained, args.layers)
        if not os.path.exists(os.path.join(args.model_dir, "model.safetensors")):
            export(graphdef, params, args.model_dir)
        masks = random_masks(params, scope)
        adapter = make_adapter(params, masks, block_size=64)
        n_tiles = adapter.num_tiles
    else:
        from flax import nnx

        cfg = llama.LlamaConfig(**{**SMOLLM2, "num_hidden_layers": args.layers})
        graphdef, params = llama.split(nnx.eval_shape(lambda: llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))))
        masks, adapter = random_masks(params, scope), None
        n_tiles = int(sum(m.sum() for m in masks.values()))
    rank = rank_for_budget(params, scope, n_tiles * 64 * 64)
    return {"graphdef": graphdef, "params": params if with_params else None, "path": args.model_dir,
            "scope": scope, "adapter": adapter, "rank": rank, "n_tiles": n_tiles}


def parse_cases(text):
    out = []
    for item in filter(None, text.split(",")):
        scope, _, size = item.strip().partition(":")
        b, _, t = size.partition("x")
        out.append((scope, int(b), int(t)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="model.layers:1x512,self_attn:1x512,model.layers:4x512,self_attn:4x512")
    ap.add_argument("--arms", default=",".join(TRAIN_ARMS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--score", default="4x512", help="rows x tokens of the forward-only scoring case ('' = skip)")
    ap.add_argument("--memory", action="store_true", help="peak RSS of sylva and PEFT LoRA, one process each")
    ap.add_argument("--profile", action="store_true", help="per-op profile of sylva (XLA) and PEFT LoRA (torch)")
    ap.add_argument("--pretrained", action="store_true")
    ap.add_argument("--layers", type=int, default=SMOLLM2["num_hidden_layers"], help="decoder layers (smoke runs)")
    ap.add_argument("--model_dir", default=None, help="where the HF export goes (default: a temp dir)")
    ap.add_argument("--append", action="store_true", help="merge into an existing --out (re-measured cases replace)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "peer.json"))
    ap.add_argument("--memory_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--memory_child_scope", default="model.layers", help=argparse.SUPPRESS)
    ap.add_argument("--memory_child_b", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--memory_child_t", type=int, default=512, help=argparse.SUPPRESS)
    args = ap.parse_args()
    tmp = None
    if args.model_dir is None:
        tmp = tempfile.TemporaryDirectory()
        args.model_dir = tmp.name
    if args.memory_child:
        return memory_child(args)
    import peft
    import torch
    import transformers

    out = {"benchmark": "sylva_jax vs transformers + PEFT, one process, interleaved",
           "model": "SmolLM2-135M " + ("pretrained" if args.pretrained else f"shapes, random weights, {args.layers} layers"),
           "dtype": "float32", "sparsity": 0.95, "block_size": 64,
           "versions": {"jax": jax.__version__, "torch": torch.__version__,
                        "transformers": transformers.__version__, "peft": peft.__version__},
           "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "threads": {"torch_intra_op": torch.get_num_threads(), "xla_flags": os.environ.get("XLA_FLAGS", "")},
           "note": "shared 2-core CPU (other jobs ran: see loadavg per case); arms interleaved round-robin; "
                   "cpu_over_wall = process CPU seconds / wall seconds per step (2.0 = both cores busy)",
           "cases": [], "scoring": None, "memory": None, "loadavg_start": os.getloadavg()}

    if args.append and os.path.exists(args.out):  # keep what this run does not redo
        with open(args.out) as f:
            old = json.load(f)
        out["_old_cases"] = old.get("cases", [])
        out.update(cases=old.get("cases", []), scoring=old.get("scoring"), memory=old.get("memory"),
                   earlier_loadavg_start=old.get("loadavg_start"))

    def save():
        with atomic_open(args.out, "w") as f:
            json.dump(out, f, indent=1)

    arms = [a for a in args.arms.split(",") if a]
    for i, (scope, b, t) in enumerate(parse_cases(args.cases)):
        ctx = build_ctx(args, scope)
        ctx.update(b=b, t=t)
        case = bench_train(ctx, arms, args.rounds, args.warmup, args.profile and i == 0)
        out["cases"] = [c for c in out["cases"] if (c["scope"], c["batch"], c["tokens"]) != (scope, b, t)]
        if args.append:  # a re-measured case keeps the earlier run's profile when it took none
            case.setdefault("profile", next((c.get("profile") for c in out.get("_old_cases", [])
                                             if (c["scope"], c["batch"], c["tokens"]) == (scope, b, t)), None))
        out["cases"].append(case)
        save()
        print(json.dumps({"scope": scope, "tokens": f"{b}x{t}",
                          **{a: round(v["median_s"], 3) for a, v in case["arms"].items()},
                          **{k: round(v, 3) for k, v in case["ratios"].items()}}), flush=True)
        if i == 0 and args.score:
            rows, tt = (int(x) for x in args.score.split("x"))
            out["scoring"] = bench_score(ctx, rows, tt, args.rounds)
            save()
            print(json.dumps({"scoring": f"{rows}x{tt}", "ratio": round(out["scoring"]["score_jax_over_score_hf"], 3),
                              "max_abs_logit_diff": out["scoring"]["max_abs_logit_diff"]}), flush=True)
        del ctx
    if args.memory:
        out["memory"] = bench_memory(args, "model.layers", 1, 512, ["sylva", "peft_lora"])
        save()
    out["loadavg_end"] = os.getloadavg()
    out.pop("_old_cases", None)
    save()


if __name__ == "__main__":
    main()
