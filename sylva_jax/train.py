"""Training steps for Sylva, LoRA and full fine-tuning behind one API (ALGORITHM.md s. 4).

``make_train_step(model_or_graphdef, method=...)`` returns a :class:`Trainer` with

- ``init(params, *, seed=0) -> TrainState`` (a pytree: params, optimizer state, trainable
  extras such as LoRA factors, step, rng, data position);
- ``step(state, batch) -> (state, metrics)``: one optimizer update over ``accum_steps``
  micro-batches, jitted with the state DONATED (its buffers are reused for the new state;
  do not touch the old state afterwards);
- ``num_trainable``, ``logits(state, input_ids, attention_mask, positions=None)`` (``[B, T, V]``,
  or ``[B, V]`` at ``positions [B]``: the LM head then runs only there when ``apply_fn``
  takes ``logits_at=``), ``eval_loss(state, batch)``.

Methods (the loss is always the token-mean ``lm_loss`` of :mod:`sylva_jax.losses`):

``sylva``  gradients w.r.t. the adapter's tiles only: the forward uses
           ``adapter.linear_fn(tiles)`` whose ``embedded_linear`` returns ``dx`` dense and
           the tile gradients by SDD; no dense weight gradient exists anywhere. The update
           (``sparse_adamw`` over ``[nnz, bs, bs]`` tiles) is scatter-added into the donated
           weights (``adapter.apply_updates``): no second copy of any weight.
``lora``   LoRA factors (:mod:`sylva_jax.lora`) trained with AdamW, W frozen.
``full``   AdamW on every parameter (weight decay on >= 2-D weights only, as HF Trainer).
``floor``  benchmarks only: forward + backward down to the first decoder layer's inputs
           (the embedding output), no weight gradient and no update: the cheapest step
           any fine-tuning method can take.

Gradient accumulation. A batch for ``accum_steps = k > 1`` carries a leading micro-batch
axis: every array is ``[k, b, T]``. The micro-batches are scanned with ``lax.scan`` inside
the one jitted step (``accum_mode="scan"``, default) or run as a Python loop of jitted
micro-steps followed by one jitted update (``accum_mode="loop"``); both give the same
numbers. On the CPU they ran equally fast (SmolLM2-135M, sylva, 4 x 1x512 micro-batches:
scan 45.0 s, loop 43.0 s, overlapping ranges under machine load; experiments/bench_step.py
``--accum``), so the default is the scan: one program and one dispatch per step, and the
accumulator never leaves the compiled step. ``accum_reduction`` defines the loss that is differentiated:

- ``"tokens"`` (default): the token mean over the union of the k micro-batches, i.e.
  micro-batch i is weighted by ``n_i / sum_j n_j`` (``n_i`` its number of loss tokens).
  The step then equals ONE step on the concatenated ``[k*b, T]`` batch (what recent
  Hugging Face Trainer versions compute);
- ``"mean"``: the plain mean of the k micro-batch token-mean losses (the classic
  ``loss / accum_steps``), which weights short samples more.

Learning-rate schedules (``schedule=``): ``"linear"`` (the published default: 0 -> lr over
``warmup_steps``, then linearly to 0 at ``total_steps``, as Hugging Face's
``get_linear_schedule_with_warmup``), ``"cosine"`` (warm-up then cosine to 0 at
``total_steps``) and ``"constant"`` (after the warm-up). ``step`` in the schedule counts
optimizer updates.

Metrics per step: ``loss`` (the differentiated loss above), ``lr`` (the rate used for this
update), ``grad_norm`` (global norm of the trainable gradient before clipping),
``tokens`` (loss tokens in the step).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from sylva_jax import lora as lora_lib
from sylva_jax.losses import IGNORE_INDEX, lm_loss

__all__ = ["TrainState", "Trainer", "make_train_step", "make_schedule", "METHODS"]

METHODS = ("sylva", "lora", "full", "floor")

# optax.global_norm is deprecated in favour of optax.tree.norm in recent optax
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree (saved whole by :mod:`checkpoint`).

    params:   model parameters (nested dict, as ``split`` returns).
    opt_state: optax state of the method's optimizer (``()`` for ``floor``).
    extras:   trainable parameters that are not model weights (``LoraParams`` for lora,
              ``{}`` otherwise).
    step:     int32 ``[]``, optimizer updates done.
    rng:      uint32 ``[2]`` raw PRNG key, split once per step (dropout).
    data_pos: int32 ``[]``, samples consumed (``accum_steps * b`` per step); a data loader
              resumes from here.
    """

    params: Any
    opt_state: Any
    extras: Any
    step: jax.Array
    rng: jax.Array
    data_pos: jax.Array


def make_schedule(kind: str, learning_rate: float, *, warmup_steps: int = 0,
                  total_steps: int | None = None) -> optax.Schedule:
    """An optax schedule of optimizer-update count -> learning rate (see module doc)."""
    lr = float(learning_rate)
    warmup_steps = int(warmup_steps)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    warm = optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps > 0 else None
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind in ("linear", "cosine"):
        if total_steps is None or int(total_steps) <= warmup_steps:
            raise ValueError(
                f"schedule {kind!r} decays to 0 at total_steps, which must be given and exceed "
                f"warmup_steps={warmup_steps} (got total_steps={total_steps}); or use schedule='constant'")
        decay = int(total_steps) - warmup_steps
        if kind == "linear":
            after = optax.linear_schedule(lr, 0.0, decay)
        else:
            after = optax.cosine_decay_schedule(lr, decay, alpha=0.0)
    else:
        raise ValueError(f"unknown schedule {kind!r}; use 'linear', 'cosine' or 'constant'")
    if warm is None:
        return after
    return optax.join_schedules([warm, after], [warmup_steps])


def _decay_mask(tree):
    """Weight decay on >= 2-D weights only (no decay for norms and biases, as HF Trainer)."""
    return jax.tree.map(lambda x: x.ndim >= 2, tree)


@dataclasses.dataclass
class Trainer:
    """What :func:`make_train_step` returns. ``step`` is jitted with the state donated."""

    method: str
    init: Callable[..., TrainState]
    step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    logits: Callable[..., jax.Array]
    eval_loss: Callable[[TrainState, dict], jax.Array]
    grads: Callable[[TrainState, dict], tuple[jax.Array, Any]]
    schedule: optax.Schedule | None
    accum_steps: int
    accum_mode: str
    num_trainable: int | None = None
    step_fn: Callable | None = None  # the single jitted step (scan mode), for lowering/compiling


def _resolve_model(model_or_graphdef, apply_fn):
    """(graphdef, apply_fn, params-or-None) from an NNX model or a graphdef."""
    params = None
    graphdef = model_or_graphdef
    if apply_fn is None:
        from sylva_jax.models import llama

        apply_fn = llama.apply
        if not _is_graphdef(model_or_graphdef):
            graphdef, params = llama.split(model_or_graphdef)
    return graphdef, apply_fn, params


def _takes_logits_at(apply_fn) -> bool:
    """Whether ``apply_fn`` accepts ``logits_at=`` (ours does; a custom one may not)."""
    import inspect

    try:
        params = inspect.signature(apply_fn).parameters
    except (TypeError, ValueError):
        return False
    return "logits_at" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _llama():
    from sylva_jax.models import llama

    return llama


def _default_apply():
    return _llama().apply


def _is_graphdef(obj) -> bool:
    try:
        from flax import nnx

        return isinstance(obj, nnx.GraphDef)
    except (ImportError, AttributeError):  # pragma: no cover - flax without GraphDef
        return True


def _count_tokens(labels):
    return (labels[..., 1:] != IGNORE_INDEX).sum().astype(jnp.float32)


def make_train_step(
    model_or_graphdef: Any,
    *,
    method: str,
    adapter: Any = None,
    scope: str | list[str] = "self_attn",
    lora_rank: int = 16,
    lora_alpha: float = 32.0,
    lora_dropout: float = 0.0,
    lora_dropout_impl: str = "hash",
    learning_rate: float = 2e-4,
    schedule: str = "linear",
    warmup_steps: int = 100,
    total_steps: int | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    accum_steps: int = 1,
    accum_mode: str = "scan",
    accum_reduction: str = "tokens",
    backend: str | None = None,
    floor_probe: str = r"(^|\.)layers\.0\.",
    apply_fn: Callable | None = None,
    donate: bool = True,
) -> Trainer:
    """Build the training step of ``method`` (``"sylva"``, ``"lora"``, ``"full"``, ``"floor"``).

    Args:
      model_or_graphdef: a ``LlamaForCausalLM`` (split here) or the graphdef from
        ``llama.split``; with ``apply_fn`` given, any object ``apply_fn`` accepts.
      adapter: the ``Adapter`` (``make_adapter``); required for ``sylva``.
      scope, lora_rank, lora_alpha, lora_dropout, lora_dropout_impl: LoRA only (see
        :mod:`sylva_jax.lora`; ``"hash"`` dropout masks are a cheap counter-based generator,
        ``"threefry"`` uses ``jax.random.bernoulli``).
      learning_rate, schedule, warmup_steps, total_steps: see :func:`make_schedule`.
      b1, b2, eps, weight_decay: AdamW (published defaults 0.9, 0.999, 1e-6, 0).
      max_grad_norm: clip the trainable gradient to this global norm (``None``: no clip).
      accum_steps, accum_mode, accum_reduction: gradient accumulation (module doc).
      backend: SDD backend passed to ``adapter.linear_fn`` (``None``: the adapter's default).
      floor_probe: ``floor`` only; regex of the linear layers whose inputs receive the
        gradient (default: the first decoder layer, i.e. the whole backward to the
        embedding output).
      apply_fn: ``apply(graphdef, params, input_ids, attention_mask, *, linear_fn) ->
        logits [B, T, V]``; default ``sylva_jax.models.llama.apply``.
      donate: donate the state to the jitted step (default; the old state is invalid after).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if method == "sylva" and adapter is None:
        raise ValueError("method='sylva' needs adapter=make_adapter(params, masks, ...)")
    if not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"accum_steps must be a positive int, got {accum_steps!r}")
    if accum_mode not in ("scan", "loop"):
        raise ValueError(f"accum_mode must be 'scan' or 'loop', got {accum_mode!r}")
    if accum_reduction not in ("tokens", "mean"):
        raise ValueError(f"accum_reduction must be 'tokens' or 'mean', got {accum_reduction!r}")
    graphdef, apply_fn, model_params = _resolve_model(model_or_graphdef, apply_fn)
    k = accum_steps

    sched = None
    opt = None
    if method != "floor":
        sched = make_schedule(schedule, learning_rate, warmup_steps=warmup_steps, total_steps=total_steps)
        if method == "sylva":
            from sylva_jax.optim import sparse_adamw

            opt = sparse_adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
        else:
            opt = optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                              mask=_decay_mask)
        if max_grad_norm is not None:
            opt = optax.chain(optax.clip_by_global_norm(float(max_grad_norm)), opt)

    lin_kwargs = {} if backend is None else {"backend": backend}
    probe_re = re.compile(floor_probe)

    # ---- per-method pieces: trainable(state), loss(trainable, state, batch, rng), update
    def forward(params, batch, linear_fn):
        return apply_fn(graphdef, params, batch["input_ids"], batch.get("attention_mask"),
                        linear_fn=linear_fn)

    def trainable_of(state):
        if method == "sylva":
            return adapter.tiles(state.params)
        if method == "lora":
            return state.extras
        if method == "full":
            return state.params
        return jnp.zeros((), jnp.float32)  # floor: one scalar probe

    def forward_loss(params, batch, linear_fn, head_hooked):
        # our LLaMA with a plain head: the head runs fused with the loss (llama.loss), no
        # [B, T, V] float32 logits (experiments/bench_peer.py)
        if apply_fn is _default_apply() and not head_hooked:
            return _llama().loss(graphdef, params, batch["input_ids"], batch.get("attention_mask"),
                                 batch["labels"], linear_fn=linear_fn, hook_head=False)
        return lm_loss(forward(params, batch, linear_fn), batch["labels"])

    def loss_of(trainable, state, batch, rng):
        head = "lm_head.weight"
        if method == "sylva":
            return forward_loss(state.params, batch, adapter.linear_fn(trainable, **lin_kwargs),
                                head in adapter.paths)
        if method == "lora":
            fn = lora_lib.lora_linear_fn(trainable, dropout=lora_dropout,
                                         rng=rng if lora_dropout > 0 else None,
                                         dropout_impl=lora_dropout_impl)
            return forward_loss(state.params, batch, fn, head in trainable.factors)
        if method == "full":
            return forward_loss(trainable, batch, None, False)
        return forward_loss(state.params, batch, _floor_linear_fn(trainable, probe_re),
                            bool(probe_re.search(head)))

    def update(state, trainable, grads):
        if method == "floor":
            return state
        if method == "sylva":
            # The in-place scatter of a weight's tile update must come after every read of the
            # old weight. The backward's dx = dy W is such a read that is NOT an ancestor of
            # that weight's own update, so XLA's copy insertion copies every adapted weight
            # (measured: one extra copy of each adapted W in temporary memory). A data
            # dependency of every update on every gradient orders all reads before all writes
            # (a layer's dx is an ancestor of the gradients of the layers below it): scale
            # the gradients by (1 + 0 * global norm), exactly 1 for finite gradients (NaN/inf
            # still propagate). (optimization_barrier does not survive to copy insertion.)
            one = 1.0 + 0.0 * _global_norm(grads)
            grads = jax.tree.map(lambda g: g * one.astype(g.dtype), grads)
        updates, opt_state = opt.update(grads, state.opt_state, trainable)
        if method == "sylva":
            # scatter into the donated weights, in place (checked by
            # tests/test_train.py::test_sylva_step_has_no_dense_weight_gradient_or_weight_copy)
            return state.replace(params=adapter.apply_updates(state.params, updates), opt_state=opt_state)
        if method == "lora":
            return state.replace(extras=optax.apply_updates(trainable, updates), opt_state=opt_state)
        return state.replace(params=optax.apply_updates(trainable, updates), opt_state=opt_state)

    grad_fn = jax.value_and_grad(loss_of)

    # ---- batches and accumulation weights
    def check_batch(batch):
        if not isinstance(batch, dict) or "input_ids" not in batch or "labels" not in batch:
            raise ValueError("a batch is a dict with 'input_ids', 'labels' and optionally 'attention_mask' "
                             "(see sylva_jax/losses.py)")
        ids = batch["input_ids"]
        want = 3 if k > 1 else 2
        if ids.ndim != want or (k > 1 and ids.shape[0] != k):
            raise ValueError(
                f"with accum_steps={k} every batch array must be "
                + (f"[{k}, b, T] (a leading micro-batch axis)" if k > 1 else "[b, T]")
                + f"; got input_ids of shape {tuple(ids.shape)}")
        for name in ("attention_mask", "labels"):
            arr = batch.get(name)
            if arr is not None and arr.shape != ids.shape:
                raise ValueError(f"batch[{name!r}] has shape {tuple(arr.shape)}, input_ids {tuple(ids.shape)}")
        return {name: batch[name] for name in ("input_ids", "attention_mask", "labels") if name in batch}

    def micro_weights(labels):  # labels [k, b, T] -> weights [k], total tokens
        n = jax.vmap(_count_tokens)(labels)
        total = n.sum()
        if accum_reduction == "tokens":
            w = n / jnp.maximum(total, 1.0)
        else:
            w = jnp.full((k,), 1.0 / k, jnp.float32)
        return w, total

    def acc_dtype(x):
        return jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype

    def finish(state, trainable, loss, grads, tokens, nsamples, step_rng_next):
        gnorm = _global_norm(grads)
        grads = jax.tree.map(lambda g, t: g.astype(t.dtype), grads, trainable)
        lr = sched(state.step) if sched is not None else jnp.zeros((), jnp.float32)
        new = update(state, trainable, grads)
        new = new.replace(step=state.step + 1, rng=step_rng_next,
                          data_pos=state.data_pos + jnp.asarray(nsamples, state.data_pos.dtype))
        metrics = {"loss": loss, "lr": jnp.asarray(lr, jnp.float32), "grad_norm": gnorm, "tokens": tokens}
        return new, metrics

    def accumulate(state, batch):
        """(loss, grads (float32 when accumulated), tokens, samples) of one step's batch."""
        _, step_rng = jax.random.split(state.rng)
        trainable = trainable_of(state)
        if k == 1:
            loss, grads = grad_fn(trainable, state, batch, jax.random.fold_in(step_rng, 0))
            return loss, grads, _count_tokens(batch["labels"]), batch["input_ids"].shape[0]
        w, tokens = micro_weights(batch["labels"])
        zeros = jax.tree.map(lambda t: jnp.zeros(t.shape, acc_dtype(t)), trainable)

        def body(carry, xs):
            g_acc, l_acc = carry
            mb, wi, i = xs
            li, gi = grad_fn(trainable, state, mb, jax.random.fold_in(step_rng, i))
            g_acc = jax.tree.map(lambda a, g: a + wi * g.astype(a.dtype), g_acc, gi)
            return (g_acc, l_acc + wi * li), None

        (grads, loss), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)),
                                        (batch, w, jnp.arange(k)))
        return loss, grads, tokens, k * batch["input_ids"].shape[1]

    def scan_step(state, batch):
        rng_next, _ = jax.random.split(state.rng)
        loss, grads, tokens, nsamples = accumulate(state, batch)
        return finish(state, trainable_of(state), loss, grads, tokens, nsamples, rng_next)

    jit_grads = jax.jit(lambda state, batch: accumulate(state, batch)[:2])

    donate_args = (0,) if donate else ()
    jit_scan_step = jax.jit(scan_step, donate_argnums=donate_args)

    # loop mode: jitted micro-steps accumulating into a donated buffer, then one update
    def micro_step(state, acc, loss_acc, mb, wi, i):
        _, step_rng = jax.random.split(state.rng)
        trainable = trainable_of(state)
        li, gi = grad_fn(trainable, state, mb, jax.random.fold_in(step_rng, i))
        acc = jax.tree.map(lambda a, g: a + wi * g.astype(a.dtype), acc, gi)
        return acc, loss_acc + wi * li

    def apply_step(state, grads, loss, tokens, nsamples):
        rng_next, _ = jax.random.split(state.rng)
        return finish(state, trainable_of(state), loss, grads, tokens, nsamples, rng_next)

    jit_micro = jax.jit(micro_step, donate_argnums=(1, 2))
    jit_apply = jax.jit(apply_step, donate_argnums=donate_args, static_argnums=(4,))
    jit_weights = jax.jit(micro_weights)

    def zeros_like_trainable(state):
        return jax.tree.map(lambda t: jnp.zeros(t.shape, acc_dtype(t)), jax.eval_shape(trainable_of, state))

    jit_zeros = jax.jit(zeros_like_trainable)

    def loop_step(state, batch):
        batch = check_batch(batch)
        if k == 1:
            return jit_scan_step(state, batch)
        w, tokens = jit_weights(batch["labels"])
        acc = jit_zeros(state)
        loss = jnp.zeros((), jnp.float32)
        for i in range(k):
            mb = {name: arr[i] for name, arr in batch.items()}
            acc, loss = jit_micro(state, acc, loss, mb, w[i], i)
        return jit_apply(state, acc, loss, tokens, k * batch["input_ids"].shape[1])

    def step(state, batch):
        batch = check_batch(batch)
        return jit_scan_step(state, batch)

    def grads(state, batch):
        """``(loss, grads)``: the differentiated loss and the trainable gradient of one step
        (accumulated, before clipping) without updating anything; for tests and debugging."""
        return jit_grads(state, check_batch(batch))

    # ---- init, evaluation
    def init(params=None, *, seed: int = 0, lora: lora_lib.LoraParams | None = None,
             data_pos: int = 0) -> TrainState:
        """A fresh state. The state OWNS ``params``: the donated step reuses their buffers,
        so copy them first (``jax.tree.map(jnp.copy, params)``) if you need the originals."""
        if params is None:
            params = model_params
        if params is None:
            raise ValueError("init needs params (make_train_step got a graphdef, not a model)")
        key = jax.random.PRNGKey(seed)
        extras: Any = {}
        if method == "lora":
            extras = lora if lora is not None else lora_lib.init_lora(
                params, scope=scope, rank=lora_rank, alpha=lora_alpha, rng=jax.random.fold_in(key, 1))
        state = TrainState(params=params, opt_state=(), extras=extras,
                           step=jnp.zeros((), jnp.int32), rng=key,
                           data_pos=jnp.asarray(data_pos, jnp.int32))
        if opt is not None:
            state = state.replace(opt_state=opt.init(trainable_of(state)))
        trainer.num_trainable = _num_trainable(method, adapter, state)
        return state

    def logits(state, input_ids, attention_mask=None, positions=None):
        if method == "lora":
            fn = lora_lib.lora_linear_fn(state.extras, dropout=0.0)
        else:
            fn = None
        if positions is None:
            return apply_fn(graphdef, state.params, input_ids, attention_mask, linear_fn=fn)
        if _takes_logits_at(apply_fn):  # the LM head runs at the B positions only
            return apply_fn(graphdef, state.params, input_ids, attention_mask, linear_fn=fn,
                            logits_at=positions)
        out = apply_fn(graphdef, state.params, input_ids, attention_mask, linear_fn=fn)
        return out[jnp.arange(out.shape[0]), positions]

    jit_logits = jax.jit(logits)

    def eval_loss(state, batch):
        return lm_loss(jit_logits(state, batch["input_ids"], batch.get("attention_mask")), batch["labels"])

    trainer = Trainer(
        method=method, init=init,
        step=loop_step if accum_mode == "loop" else step,
        logits=jit_logits, eval_loss=eval_loss, grads=grads, schedule=sched,
        accum_steps=k, accum_mode=accum_mode,
        num_trainable={"sylva": lambda: int(adapter.num_trainable), "floor": lambda: 0}.get(
            method, lambda: None)(),
        step_fn=jit_scan_step,
    )
    return trainer


def _num_trainable(method, adapter, state) -> int:
    if method == "sylva":
        return int(adapter.num_trainable)
    if method == "lora":
        return lora_lib.num_lora_params(state.extras)
    if method == "full":
        return int(sum(x.size for x in jax.tree_util.tree_leaves(state.params)))
    return 0


def _floor_linear_fn(probe: jax.Array, probe_re: re.Pattern) -> Callable:
    """Plain frozen linear layers; inputs of layers matching ``probe_re`` are scaled by
    ``1 + probe`` (probe = 0) so that ``d loss / d probe`` needs the backward of every
    activation down to those inputs and nothing else (no weight gradient)."""
    from sylva_jax.ops import dense_linear

    def linear_fn(name, x, w, b=None):
        if probe_re.search(name):
            x = x * (1.0 + probe).astype(x.dtype)
        return dense_linear(x, jax.lax.stop_gradient(w), None if b is None else jax.lax.stop_gradient(b))

    return linear_fn
