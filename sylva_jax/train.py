"""Training steps for any fine-tuning method and any optax optimizer (docs/algorithm.md,
training).

Two layers:

- :func:`make_step` ``(apply_fn, method, optimizer, ...) -> TrainStep``: PURE ``init`` /
  ``step`` / ``grads`` functions (nothing jitted) for a :class:`sylva_jax.methods.Method`
  and an ``optax.GradientTransformation``; callers ``jax.jit`` them (and shard them, see
  :func:`sylva_jax.sharding.sharded_step`).
- :func:`make_train_step` ``(model_or_graphdef, method="sylva" | "lora" | "full" | Method,
  ...) -> Trainer``: the convenience used by the experiment script: builds the method and
  its AdamW (or takes ``optimizer=``), jits the step with the state donated, and adds
  ``logits`` / ``eval_loss``.

State: :class:`TrainState` (params, optimizer state, the method's extras, step, rng, data
position), a pytree. ``step(state, batch) -> (state, metrics)`` is one optimizer update.

Loss: ``loss_fn(params, batch, linear_fn) -> scalar`` (default: the token-mean ``lm_loss`` of
``apply_fn``'s logits, :func:`lm_loss_fn`); swap it for e.g. a chunked LM-head loss.

Gradient accumulation. With ``accum_steps = k > 1`` every batch array is ``[k, b, T]`` (a
leading micro-batch axis) and the step's gradient is ``sum_i w_i g_i`` over the
micro-batches (:func:`accumulate`, one ``lax.scan`` inside the step; the loop mode of
:class:`Trainer` runs the same accumulation as jitted micro-steps). ``accum_reduction``
sets the weights:

- ``"tokens"`` (default): ``w_i = n_i / sum_j n_j`` (``n_i`` loss tokens of micro-batch i):
  the token mean over the union, i.e. exactly one step on the concatenated ``[k*b, T]``
  batch (what recent Hugging Face Trainer versions compute);
- ``"mean"``: ``w_i = 1 / k``, the mean of the micro-batch token-mean losses (the classic
  ``loss / accum_steps``), which weights short samples more.

Learning-rate schedules (:func:`make_schedule`): ``"linear"`` (0 -> lr over
``warmup_steps``, then linearly to 0 at ``total_steps``, as Hugging Face's
``get_linear_schedule_with_warmup``), ``"cosine"`` (warm-up then cosine to 0) and
``"constant"`` (after the warm-up); the schedule's argument counts optimizer updates.
With ``make_train_step(..., traced_lr=True)`` the schedule's peak is a value of the
optimizer state (:func:`with_learning_rate`), not a constant of the compiled step.

Metrics per step: ``loss`` (the differentiated loss), ``grad_norm`` (global norm of the
trainable gradient before clipping), ``tokens`` (loss tokens in the step) and ``lr`` (the
rate of this update) when the step knows the schedule.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from sylva_jax import host_memory, methods, optim
from sylva_jax.losses import IGNORE_INDEX, lm_loss
from sylva_jax.methods import Method

__all__ = ["TrainState", "TrainStep", "Trainer", "make_step", "make_train_step", "make_schedule",
           "with_learning_rate",
           "micro_weights", "accumulate", "zero_accumulator", "lm_loss_fn", "METHODS"]

# the method names make_train_step builds itself (any other method: pass a Method value)
METHODS = ("sylva", "lora", "full")

# optax.global_norm is deprecated in favour of optax.tree.norm in recent optax
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm

_BATCH_KEYS = ("input_ids", "attention_mask", "labels")


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree (saved whole by :mod:`checkpoint`).

    params:   model parameters (nested dict, as ``split`` returns).
    opt_state: optax state of the optimizer over the method's trainable pytree.
    extras:   the method's trainable values that are not model weights (``LoraParams`` for lora,
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


def make_schedule(kind: str, learning_rate, *, warmup_steps: int = 0,
                  total_steps: int | None = None) -> optax.Schedule:
    """An optax schedule of optimizer-update count -> learning rate (see module doc).

    ``learning_rate`` (the peak) is a float or a JAX scalar, possibly traced (the rate of
    :func:`sylva_jax.optim.traced_learning_rate`); the formula is the same for both."""
    lr = learning_rate if isinstance(learning_rate, jax.Array) else float(learning_rate)
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


def with_learning_rate(state: "TrainState", learning_rate) -> "TrainState":
    """``state`` with the traced (peak) learning rate of its optimizer set to
    ``learning_rate`` (:func:`sylva_jax.optim.with_learning_rate`; the optimizer must come
    from :func:`sylva_jax.optim.traced_learning_rate`, e.g. ``make_train_step(...,
    traced_lr=True)``)."""
    return state.replace(opt_state=optim.with_learning_rate(state.opt_state, learning_rate))


# --------------------------------------------------------------------------------------
# the pure core
# --------------------------------------------------------------------------------------


def lm_loss_fn(apply_fn: Callable) -> Callable:
    """``loss_fn(params, batch, linear_fn) -> scalar``: the token-mean ``lm_loss`` of
    ``apply_fn(params, input_ids, attention_mask, linear_fn=linear_fn) -> [B, T, V]``."""
    def loss_fn(params, batch, linear_fn):
        logits = apply_fn(params, batch["input_ids"], batch.get("attention_mask"), linear_fn=linear_fn)
        return lm_loss(logits, batch["labels"])

    return loss_fn


def _count_tokens(labels):
    return (labels[..., 1:] != IGNORE_INDEX).sum().astype(jnp.float32)


def micro_weights(labels: jax.Array, reduction: str = "tokens") -> tuple[jax.Array, jax.Array]:
    """``(w [k], total tokens)`` of micro-batch labels ``[k, b, T]`` (module doc)."""
    n = jax.vmap(_count_tokens)(labels)
    total = n.sum()
    if reduction == "tokens":
        return n / jnp.maximum(total, 1.0), total
    k = labels.shape[0]
    return jnp.full((k,), 1.0 / k, jnp.float32), total


def _acc_dtype(x):
    return jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype


def zero_accumulator(trainable: Any) -> tuple[Any, jax.Array]:
    """``(grads, loss)`` zeros for :func:`accumulate`: float32 for floating leaves."""
    return (jax.tree.map(lambda t: jnp.zeros(t.shape, _acc_dtype(t)), trainable),
            jnp.zeros((), jnp.float32))


def add_weighted(acc: tuple[Any, jax.Array], loss: jax.Array, grads: Any, w: jax.Array):
    """One accumulation term: ``(G + w g, L + w l)`` for ``acc = (G, L)``."""
    g_acc, l_acc = acc
    return jax.tree.map(lambda a, g: a + w * g.astype(a.dtype), g_acc, grads), l_acc + w * loss


def accumulate(micro_grad: Callable, acc: tuple[Any, jax.Array], batch: dict,
               weights: jax.Array) -> tuple[Any, jax.Array]:
    """``(sum_i w_i g_i, sum_i w_i l_i)`` over the micro-batches ``batch[name][i]`` with
    ``lax.scan``; ``micro_grad(micro_batch, i) -> (l_i, g_i)``, ``acc`` from
    :func:`zero_accumulator`."""
    k = weights.shape[0]

    def body(carry, xs):
        mb, w, i = xs
        loss, grads = micro_grad(mb, i)
        return add_weighted(carry, loss, grads, w), None

    acc, _ = jax.lax.scan(body, acc, (batch, weights, jnp.arange(k)))
    return acc


def _ordered_before_writes(grads):
    """``grads`` scaled by ``1 + 0 * ||grads||`` (exactly 1 for finite gradients; NaN/inf
    still propagate), for methods that write updates into buffers the backward reads.

    The in-place scatter of a weight's update must follow every read of the old weight;
    the backward's ``dx = dy W`` is such a read that is not an ancestor of that weight's own
    update, so XLA's copy insertion would copy every adapted weight. A dependency of every
    update on every gradient orders all reads before all writes (a layer's ``dx`` is an
    ancestor of the gradients of the layers below it). (``optimization_barrier`` does not
    survive to copy insertion.)"""
    one = 1.0 + 0.0 * _global_norm(grads)
    return jax.tree.map(lambda g: g * one.astype(g.dtype), grads)


class TrainStep(NamedTuple):
    """What :func:`make_step` returns: pure functions, nothing jitted.

    init: ``(params, *, seed=0, extras=None, data_pos=0) -> TrainState`` (``extras=None``:
      the method's fresh ones, drawn from ``seed``). The state owns ``params``.
    step: ``(state, batch) -> (state, metrics)``: one optimizer update (module doc).
    grads: ``(state, batch) -> (loss, grads)``: the differentiated loss and the trainable
      gradient of one step (accumulated, before clipping); nothing is updated.
    micro_step: ``(state, acc, micro_batch, w, i) -> acc``: one accumulation term of
      micro-batch ``i`` with weight ``w`` (for loops of jitted micro-steps).
    apply_gradients: ``(state, loss, grads, tokens, nsamples) -> (state, metrics)``: the
      update from accumulated gradients.
    zero_grads: ``state -> acc``: the zero accumulator of ``state``'s trainable pytree.
    merge: ``state -> params``: plain weights (``method.merge``).
    method: the :class:`Method`; optimizer: the optax transformation; accum_steps: ``k``;
    schedule: the learning-rate schedule reported as ``lr`` (``None``: not reported);
    peak_schedule: ``peak -> schedule`` reported at the state's traced rate instead.
    """

    init: Callable[..., "TrainState"]
    step: Callable
    grads: Callable
    micro_step: Callable
    apply_gradients: Callable
    zero_grads: Callable
    merge: Callable
    method: Method
    optimizer: optax.GradientTransformation
    accum_steps: int
    schedule: optax.Schedule | None = None
    peak_schedule: Callable[[jax.Array], optax.Schedule] | None = None


def _check_step_args(method, optimizer, accum_steps, accum_reduction):
    if not isinstance(method, Method):
        raise TypeError(f"method must be a sylva_jax.methods.Method (methods.sylva(adapter), methods.lora(), "
                        f"methods.full()); got {type(method).__name__}")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax.GradientTransformation; got {type(optimizer).__name__}")
    _check_accum(accum_steps, accum_reduction)


def _check_accum(accum_steps, accum_reduction):
    if not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"accum_steps must be a positive int, got {accum_steps!r}")
    if accum_reduction not in ("tokens", "mean"):
        raise ValueError(f"accum_reduction must be 'tokens' or 'mean', got {accum_reduction!r}")


def make_step(apply_fn: Callable, method: Method, optimizer: optax.GradientTransformation, *,
              accum_steps: int = 1, accum_reduction: str = "tokens",
              schedule: optax.Schedule | None = None,
              peak_schedule: Callable[[jax.Array], optax.Schedule] | None = None,
              loss_fn: Callable | None = None) -> TrainStep:
    """Pure training functions of ``method`` with ``optimizer`` (any optax transformation).

    Args:
      apply_fn: ``apply_fn(params, input_ids, attention_mask, *, linear_fn) -> [B, T, V]``
        (for our LLaMA: ``functools.partial(llama.apply, graphdef)``).
      method: a :class:`sylva_jax.methods.Method` (``methods.sylva(adapter)``, ...).
      optimizer: updates the method's trainable pytree (Sylva: tile stacks, e.g.
        ``optim.sparse_adamw``).
      accum_steps, accum_reduction: gradient accumulation (module doc).
      schedule: the learning-rate schedule inside ``optimizer``, only to report ``lr``.
      peak_schedule: with the peak rate traced in the optimizer state
        (:func:`sylva_jax.optim.traced_learning_rate`), ``peak -> schedule``; ``lr`` is
        then reported as ``peak_schedule(optim.learning_rate_of(opt_state))(step)``.
      loss_fn: ``(params, batch, linear_fn) -> scalar``; default ``lm_loss_fn(apply_fn)``.
    """
    _check_step_args(method, optimizer, accum_steps, accum_reduction)
    k = accum_steps
    loss_fn = lm_loss_fn(apply_fn) if loss_fn is None else loss_fn

    def loss_of(trainable, state, batch, rng):
        params, linear_fn = method.forward(state.params, state.extras, trainable, rng)
        return loss_fn(params, batch, linear_fn)

    grad_fn = jax.value_and_grad(loss_of)

    def trainable_of(state):
        return method.trainable(state.params, state.extras)

    def micro_grad_of(state, trainable):
        _, step_rng = jax.random.split(state.rng)
        return lambda mb, i: grad_fn(trainable, state, mb, jax.random.fold_in(step_rng, i))

    def gradients(state, batch):
        """(loss, grads (float32 when accumulated), tokens, samples) of one step's batch."""
        trainable = trainable_of(state)
        micro_grad = micro_grad_of(state, trainable)
        if k == 1:
            loss, grads = micro_grad(batch, 0)
            return loss, grads, _count_tokens(batch["labels"]), batch["input_ids"].shape[0]
        w, tokens = micro_weights(batch["labels"], accum_reduction)
        grads, loss = accumulate(micro_grad, zero_accumulator(trainable), batch, w)
        return loss, grads, tokens, k * batch["input_ids"].shape[1]

    def apply_gradients(state, loss, grads, tokens, nsamples):
        rng_next, _ = jax.random.split(state.rng)
        trainable = trainable_of(state)
        gnorm = _global_norm(grads)
        grads = jax.tree.map(lambda g, t: g.astype(t.dtype), grads, trainable)
        if method.in_place:
            grads = _ordered_before_writes(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
        params, extras = method.apply_updates(state.params, state.extras, updates)
        new = state.replace(params=params, extras=extras, opt_state=opt_state, step=state.step + 1,
                            rng=rng_next, data_pos=state.data_pos + jnp.asarray(nsamples, state.data_pos.dtype))
        metrics = {"loss": loss, "grad_norm": gnorm, "tokens": tokens}
        lr = _reported_lr(state, schedule, peak_schedule)
        if lr is not None:
            metrics["lr"] = lr
        return new, metrics

    def step(state, batch):
        return apply_gradients(state, *gradients(state, batch))

    def micro_step(state, acc, mb, w, i):
        loss, grads = micro_grad_of(state, trainable_of(state))(mb, i)
        return add_weighted(acc, loss, grads, w)

    return TrainStep(
        init=_state_init(method, optimizer, trainable_of), step=step,
        grads=lambda state, batch: gradients(state, batch)[:2],
        micro_step=micro_step, apply_gradients=apply_gradients,
        zero_grads=lambda state: zero_accumulator(jax.eval_shape(trainable_of, state)),
        merge=lambda state: method.merge(state.params, state.extras),
        method=method, optimizer=optimizer, accum_steps=k, schedule=schedule,
        peak_schedule=peak_schedule)


def _state_init(method: Method, optimizer, trainable_of) -> Callable[..., TrainState]:
    """``TrainStep.init``: a fresh :class:`TrainState` (extras from ``method.init`` unless
    given)."""
    def init(params, *, seed: int = 0, extras: Any = None, data_pos: int = 0) -> TrainState:
        key = jax.random.PRNGKey(seed)
        if extras is None:
            extras = method.init(params, jax.random.fold_in(key, 1))
        state = TrainState(params=params, opt_state=(), extras=extras, step=jnp.zeros((), jnp.int32),
                           rng=key, data_pos=jnp.asarray(data_pos, jnp.int32))
        return state.replace(opt_state=optimizer.init(trainable_of(state)))

    return init


def _reported_lr(state: TrainState, schedule, peak_schedule) -> jax.Array | None:
    """The rate of the update from ``state`` (``make_step``'s ``schedule`` /
    ``peak_schedule``), or ``None`` when the step does not know it."""
    if peak_schedule is not None:
        peak = optim.learning_rate_of(state.opt_state)
        if peak is None:
            raise ValueError("make_step got peak_schedule but the optimizer state has no traced "
                             "learning rate; build it with optim.traced_learning_rate")
        return jnp.asarray(peak_schedule(peak)(state.step), jnp.float32)
    if schedule is not None:
        return jnp.asarray(schedule(state.step), jnp.float32)
    return None


# --------------------------------------------------------------------------------------
# the convenience: methods by name, AdamW, jitted and donated
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Trainer:
    """What :func:`make_train_step` returns. ``step`` is jitted with the state DONATED (its
    buffers are reused for the new state; do not touch the old state afterwards).

    init: ``(params=None, *, seed=0, lora=None, data_pos=0, extras=None, learning_rate=None)
      -> TrainState`` (``lora`` / ``extras``: given extras, e.g. LoRA factors or traced tile
      coordinates, instead of fresh ones; ``learning_rate``: the traced peak rate); also sets
      ``num_trainable``.
    step, grads: the jitted :class:`TrainStep` functions (``step`` checks the batch, and
      compiles each new batch signature ahead of running it with the compiler's freed host
      heap handed back in between: :func:`sylva_jax.host_memory.compile_then_release`).
    logits: ``(state, input_ids, attention_mask=None, positions=None)`` -> ``[B, T, V]``, or
      ``[B, V]`` at ``positions [B]`` (the LM head then runs only there when ``apply_fn``
      takes ``logits_at=``); the method's evaluation forward.
    eval_loss: ``(state, batch) -> scalar`` token-mean loss; merge: ``state -> params``.
    step_fn: the single jitted, donated step (``.lower(state, batch)`` for compiled stats).
    core: the pure :class:`TrainStep` (``core.step`` for callers that jit it themselves).
    """

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
    step_fn: Callable | None = None
    core: TrainStep | None = None
    merge: Callable[[TrainState], Any] | None = None


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


def _default_loss_fn(graphdef, apply_fn, spec: Method) -> Callable | None:
    """Our LLaMA with a method that leaves the LM head alone: the head runs fused with the
    cross-entropy (:func:`sylva_jax.models.llama.loss`: no ``[B, T, V]`` float32 logits).
    Anything else: ``None``, the token-mean ``lm_loss`` of the logits (:func:`lm_loss_fn`)."""
    from sylva_jax.models import llama

    if apply_fn is not llama.apply or spec.adapts is None:
        return None
    hook_head = bool(spec.adapts("lm_head.weight"))

    def loss_fn(params, batch, linear_fn):
        return llama.loss(graphdef, params, batch["input_ids"], batch.get("attention_mask"),
                          batch["labels"], linear_fn=linear_fn, hook_head=hook_head)

    return loss_fn


def _takes_logits_at(apply_fn) -> bool:
    """Whether ``apply_fn`` accepts ``logits_at=`` (ours does; a custom one may not)."""
    try:
        params = inspect.signature(apply_fn).parameters
    except (TypeError, ValueError):
        return False
    return "logits_at" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _is_graphdef(obj) -> bool:
    try:
        from flax import nnx

        return isinstance(obj, nnx.GraphDef)
    except (ImportError, AttributeError):  # pragma: no cover - flax without GraphDef
        return True


def _check_batch(batch, k: int) -> dict:
    """The batch's ``input_ids`` / ``attention_mask`` / ``labels``, shapes checked."""
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
    return {name: batch[name] for name in _BATCH_KEYS if name in batch}


def _method_of(method, *, adapter, backend, scope, lora_rank, lora_alpha, lora_dropout,
               lora_dropout_impl) -> Method:
    """A :class:`Method` value from ``method`` (a value, or one of :data:`METHODS`)."""
    if isinstance(method, Method):
        return method
    builders = {
        "sylva": lambda: methods.sylva(adapter, backend=backend),
        "lora": lambda: methods.lora(scope=scope, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout,
                                     dropout_impl=lora_dropout_impl),
        "full": methods.full,
    }
    if method not in builders:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS} or pass a "
                         "sylva_jax.methods.Method value")
    return builders[method]()


def _loop_step(core: TrainStep, jit_step: Callable, donate: bool, accum_reduction: str) -> Callable:
    """``step(state, batch)`` as a Python loop of jitted micro-steps (accumulating into a
    donated buffer) and one jitted update: the numbers of the scanned step."""
    k = core.accum_steps
    jit_micro = jax.jit(core.micro_step, donate_argnums=(1,))
    jit_apply = jax.jit(core.apply_gradients, donate_argnums=(0,) if donate else (), static_argnums=(4,))
    jit_weights = jax.jit(functools.partial(micro_weights, reduction=accum_reduction))
    jit_zeros = jax.jit(core.zero_grads)

    def step(state, batch):
        batch = _check_batch(batch, k)
        if k == 1:
            return jit_step(state, batch)
        w, tokens = jit_weights(batch["labels"])
        acc = jit_zeros(state)
        for i in range(k):
            acc = jit_micro(state, acc, {name: arr[i] for name, arr in batch.items()}, w[i], i)
        grads, loss = acc
        return jit_apply(state, loss, grads, tokens, k * batch["input_ids"].shape[1])

    return step


def _logits_fn(apply: Callable, method: Method) -> Callable:
    """``logits(state, input_ids, attention_mask=None, positions=None)`` (see Trainer)."""
    at = _takes_logits_at(apply)

    def logits(state, input_ids, attention_mask=None, positions=None):
        params, fn = method.eval_forward(state.params, state.extras)
        if positions is None:
            return apply(params, input_ids, attention_mask, linear_fn=fn)
        if at:  # the LM head runs at the B positions only
            return apply(params, input_ids, attention_mask, linear_fn=fn, logits_at=positions)
        out = apply(params, input_ids, attention_mask, linear_fn=fn)
        return out[jnp.arange(out.shape[0]), positions]

    return logits


def _default_optimizer(method, *, learning_rate, schedule, warmup_steps, total_steps, b1, b2, eps,
                       weight_decay, traced_lr=False):
    """``(optimizer, schedule, peak_schedule)``: the method's AdamW on ``make_schedule(...)``;
    with ``traced_lr`` the peak ``learning_rate`` is a value of the optimizer state
    (``optim.traced_learning_rate``) and ``peak_schedule`` replaces ``schedule``."""
    def peak_schedule(peak):
        return make_schedule(schedule, peak, warmup_steps=warmup_steps, total_steps=total_steps)

    def build(learning_rate):
        return method.adamw(peak_schedule(learning_rate), b1=b1, b2=b2, eps=eps,
                            weight_decay=weight_decay)

    if traced_lr:
        peak_schedule(jnp.float32(learning_rate))    # bad schedule arguments fail here, not in jit
        return optim.traced_learning_rate(build, learning_rate), None, peak_schedule
    sched = peak_schedule(learning_rate)
    return method.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay), sched, None


def _optimizer_of(method, optimizer, *, max_grad_norm, traced_lr, **adamw_kw):
    """``(optimizer, schedule, peak_schedule)`` of :func:`make_train_step`: the given one or
    the method's AdamW (:func:`_default_optimizer`), after a global-norm clip if asked."""
    sched = peak_sched = None
    if optimizer is None:
        optimizer, sched, peak_sched = _default_optimizer(method, traced_lr=traced_lr, **adamw_kw)
    elif traced_lr:
        raise ValueError("traced_lr applies to the default optimizer; with optimizer= given, "
                         "build it with optim.traced_learning_rate yourself")
    if max_grad_norm is not None:
        optimizer = optax.chain(optax.clip_by_global_norm(float(max_grad_norm)), optimizer)
    return optimizer, sched, peak_sched


def make_train_step(
    model_or_graphdef: Any,
    *,
    method: str | Method,
    optimizer: optax.GradientTransformation | None = None,
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
    apply_fn: Callable | None = None,
    loss_fn: Callable | None = None,
    donate: bool = True,
    traced_lr: bool = False,
) -> Trainer:
    """The jitted training step of ``method`` (:func:`make_step` underneath).

    Args:
      model_or_graphdef: a ``LlamaForCausalLM`` (split here) or the graphdef from
        ``llama.split``; with ``apply_fn`` given, any object ``apply_fn`` accepts.
      method: ``"sylva"``, ``"lora"``, ``"full"`` (built from the arguments below), or any
        :class:`sylva_jax.methods.Method` value.
      optimizer: any optax transformation over the method's trainable pytree; default: the
        method's AdamW (``b1, b2, eps, weight_decay``; published defaults 0.9, 0.999, 1e-6,
        0) on :func:`make_schedule` (``learning_rate, schedule, warmup_steps,
        total_steps``), which is then also reported as ``lr``.
      adapter, backend: Sylva (``make_adapter(...)``; SDD backend of ``adapter.linear_fn``,
        ``None``: the adapter's default).
      scope, lora_rank, lora_alpha, lora_dropout, lora_dropout_impl: LoRA
        (:func:`sylva_jax.methods.lora`).
      max_grad_norm: clip the trainable gradient to this global norm before the optimizer
        (``None``: no clip).
      accum_steps, accum_reduction: gradient accumulation (module doc); ``accum_mode``:
        ``"scan"`` (one jitted step) or ``"loop"`` (jitted micro-steps, same numbers).
      apply_fn: ``apply(graphdef, params, input_ids, attention_mask, *, linear_fn) ->
        logits [B, T, V]``; default ``sylva_jax.models.llama.apply``.
      loss_fn: see :func:`make_step`; default: with our LLaMA and a method that leaves the
        LM head alone, the head fused with the cross-entropy (``llama.loss``), else the
        token-mean ``lm_loss`` of the logits.
      donate: donate the state to the jitted step (default; the old state is invalid after).
      traced_lr: the default optimizer's peak ``learning_rate`` becomes a value of the
        optimizer state (:func:`sylva_jax.optim.traced_learning_rate`): set it per run with
        ``init(..., learning_rate=)`` or :func:`with_learning_rate`, one compiled step for
        every rate (``Trainer.schedule`` is then ``None``; ``lr`` is still reported).
        With ``methods.sylva_traced`` and ``init(..., extras=coords)`` the tiles are
        traced too: one compilation per shape serves every arm.
    """
    spec = _method_of(method, adapter=adapter, backend=backend, scope=scope, lora_rank=lora_rank,
                      lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_dropout_impl=lora_dropout_impl)
    _check_accum(accum_steps, accum_reduction)
    if accum_mode not in ("scan", "loop"):
        raise ValueError(f"accum_mode must be 'scan' or 'loop', got {accum_mode!r}")
    graphdef, apply_fn, model_params = _resolve_model(model_or_graphdef, apply_fn)
    apply = functools.partial(apply_fn, graphdef)
    optimizer, sched, peak_sched = _optimizer_of(
        spec, optimizer, max_grad_norm=max_grad_norm, traced_lr=traced_lr, learning_rate=learning_rate,
        schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps, b1=b1, b2=b2, eps=eps,
        weight_decay=weight_decay)
    if loss_fn is None:
        loss_fn = _default_loss_fn(graphdef, apply_fn, spec)
    core = make_step(apply, spec, optimizer, accum_steps=accum_steps, accum_reduction=accum_reduction,
                     schedule=sched, peak_schedule=peak_sched, loss_fn=loss_fn)
    return _trainer(core, apply, model_params, accum_mode=accum_mode, accum_reduction=accum_reduction,
                    donate=donate)


def _trainer(core: TrainStep, apply: Callable, model_params: Any, *, accum_mode: str,
             accum_reduction: str, donate: bool) -> Trainer:
    """The :class:`Trainer` of ``core``: jitted (state donated), batches checked."""
    k, spec = core.accum_steps, core.method
    jit_step = jax.jit(core.step, donate_argnums=(0,) if donate else ())
    run_step = host_memory.compile_then_release(jit_step)  # the compiler's heap freed before step 1
    jit_grads = jax.jit(core.grads)
    jit_logits = jax.jit(_logits_fn(apply, spec))

    def init(params=None, *, seed: int = 0, lora: Any = None, data_pos: int = 0,
             extras: Any = None, learning_rate=None) -> TrainState:
        """A fresh state. The state OWNS ``params``: the donated step reuses their buffers,
        so copy them first (``jax.tree.map(jnp.copy, params)``) if you need the originals.
        ``extras``: the method's extras instead of fresh ones (``lora``: the same, named for
        LoRA factors; ``sylva_traced``: ``layout.coords(masks)``); ``learning_rate``: the
        traced peak rate of this state (``traced_lr=True`` only)."""
        params = model_params if params is None else params
        if params is None:
            raise ValueError("init needs params (make_train_step got a graphdef, not a model)")
        if lora is not None and extras is not None:
            raise ValueError("give the extras once: extras= (or lora= for LoRA factors)")
        state = core.init(params, seed=seed, extras=lora if extras is None else extras,
                          data_pos=data_pos)
        if learning_rate is not None:
            state = with_learning_rate(state, learning_rate)
        trainer.num_trainable = spec.num_trainable(state.params, state.extras)
        return state

    def eval_loss(state, batch):
        return lm_loss(jit_logits(state, batch["input_ids"], batch.get("attention_mask")), batch["labels"])

    trainer = Trainer(
        method=spec.name, init=init,
        step=(_loop_step(core, run_step, donate, accum_reduction) if accum_mode == "loop"
              else lambda state, batch: run_step(state, _check_batch(batch, k))),
        logits=jit_logits, eval_loss=eval_loss,
        grads=lambda state, batch: jit_grads(state, _check_batch(batch, k)),
        schedule=core.schedule, accum_steps=k, accum_mode=accum_mode, step_fn=jit_step, core=core,
        merge=core.merge)
    return trainer
