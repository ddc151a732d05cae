"""Pre-processing and training on a device mesh (one host or several), with JAX's own SPMD.

Nothing here re-implements parallelism: arrays are placed with ``jax.sharding.NamedSharding``
on a two-axis :class:`jax.sharding.Mesh` and XLA's SPMD partitioner turns the unchanged
single-device programs of :mod:`sylva_jax.capture` and :mod:`sylva_jax.train` into
per-device programs with the collectives they need (`docs/algorithm.md` §1 and §5 are
computed exactly as on one device; only the summation order of reductions changes).

Mesh axes
  ``data``: pure data parallelism (weights replicated across it).
  ``fsdp``: fully-sharded data parallelism: every weight (and every optimizer moment that
  mirrors a weight) is split over this axis, and the batch is split over it too, so the
  batch is split ``data * fsdp`` ways. Per-device weight memory falls as ``1 / fsdp``.

Sharding rules (:func:`weight_spec`, :func:`tile_spec`, :func:`state_shardings`)
  - a weight ``[out, in]`` (any array of rank >= 2 that is not a tile stack) is split over
    ``fsdp`` along its LARGER dimension; the split is tile-aligned (each shard holds whole
    ``bs x bs`` tiles: ``dim % (fsdp * bs) == 0``) whenever possible, else the other
    dimension is tried, else a plain split (``dim % fsdp == 0``, a tile may straddle two
    shards), else the array is replicated;
  - 0-/1-D arrays (norms, biases, step counters) are replicated;
  - a tile stack ``[nnz, bs, bs]`` (Sylva's trainable tiles and their AdamW ``mu``/``nu``)
    is split over ``fsdp`` along ``nnz`` when ``nnz % fsdp == 0``, never inside a tile,
    else replicated (it is small: that is the point of Sylva);
  - LoRA factors ``A [r, in]``, ``B [out, r]`` follow the weight rule (split along the big
    dimension);
  - batches ``[b, T]`` (``[k, b, T]`` with accumulation) are split along ``b`` over
    ``("data", "fsdp")``.

Because the tiles sit inside the weights (tile ``(r, c)`` is rows ``r*bs..`` of ``W``), a
tile-aligned split of ``W`` puts every tile wholly on one shard, and the Sylva update
(``Adapter.apply_updates``: gather, add, scatter) is a scatter into the donated, sharded
weight: each shard updates the tiles it owns in place.

Multi-host: :func:`initialize_distributed` wraps ``jax.distributed.initialize``; each
process reads only its own rows of every global batch (:func:`process_batch_slice`) and
:func:`shard_batch` assembles the global array from the process-local rows
(``jax.make_array_from_process_local_data``).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sylva_jax import capture, host_memory
from sylva_jax import tree as tree_lib
from sylva_jax.models import llama

__all__ = [
    "DATA", "FSDP", "BATCH_AXES",
    "make_mesh", "weight_spec", "tile_spec", "param_shardings", "state_shardings",
    "batch_sharding", "put", "replicate", "to_host", "sharded_model", "shard_params", "shard_state", "shard_batch", "process_batch_slice",
    "sharded_step", "preprocess", "initialize_distributed", "memory_per_device",
]

DATA = "data"
FSDP = "fsdp"
BATCH_AXES = (DATA, FSDP)


# --------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------


def make_mesh(data: int | None = None, fsdp: int = 1, *, devices=None) -> Mesh:
    """A ``[data, fsdp]`` mesh over ``devices`` (default: every device of every process).

    ``data=None`` takes all devices left: ``len(devices) // fsdp``. Devices are laid out in
    ``jax.devices()`` order (process by process), so the batch rows a process owns are one
    contiguous range (see :func:`process_batch_slice`). ``make_mesh(1, 1)`` is the
    single-device case.
    """
    devs = list(jax.devices() if devices is None else devices)
    fsdp = int(fsdp)
    if fsdp < 1:
        raise ValueError(f"fsdp must be a positive int, got {fsdp}")
    if data is None:
        if len(devs) % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {len(devs)} devices; pass data= "
                             "and fsdp= with data * fsdp <= number of devices")
        data = len(devs) // fsdp
    data = int(data)
    if data < 1:
        raise ValueError(f"data must be a positive int, got {data}")
    if data * fsdp > len(devs):
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices but only {len(devs)} "
            "are visible (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before "
            "jax starts; across hosts, call initialize_distributed first)")
    arr = np.empty((data, fsdp), dtype=object)
    for i, d in enumerate(devs[: data * fsdp]):
        arr[i // fsdp, i % fsdp] = d
    return Mesh(arr, (DATA, FSDP))


def _axis_size(mesh: Mesh, name: str) -> int:
    return int(dict(zip(mesh.axis_names, mesh.devices.shape)).get(name, 1))


def _batch_ways(mesh: Mesh) -> int:
    return _axis_size(mesh, DATA) * _axis_size(mesh, FSDP)


# --------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------


def weight_spec(shape: tuple[int, ...], fsdp: int, block_size: int = 64) -> P:
    """PartitionSpec of a weight of ``shape`` on a mesh whose ``fsdp`` axis has ``fsdp``
    devices: split the larger dimension, tile-aligned where possible (module doc)."""
    shape = tuple(int(d) for d in shape)
    if fsdp <= 1 or len(shape) < 2:
        return P()
    order = sorted(range(len(shape)), key=lambda i: (-shape[i], i))  # larger first
    bs = max(int(block_size), 1)
    for need in (fsdp * bs, fsdp):
        for i in order:
            if shape[i] % need == 0:
                return P(*[FSDP if j == i else None for j in range(len(shape))])
    return P()


def tile_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """PartitionSpec of a tile stack ``[nnz, bs, bs]``: split ``nnz`` over ``fsdp`` if it
    divides, never inside a tile."""
    if fsdp > 1 and len(shape) >= 1 and int(shape[0]) % fsdp == 0:
        return P(FSDP)
    return P()


def _is_tile_stack(x, block_size: int) -> bool:
    s = tuple(getattr(x, "shape", ()))
    return len(s) == 3 and s[1] == s[2] == block_size


def param_shardings(params: Any, mesh: Mesh, *, block_size: int = 64) -> Any:
    """A pytree like ``params`` of :class:`NamedSharding` (weight rule on every leaf)."""
    n = _axis_size(mesh, FSDP)
    return jax.tree.map(lambda x: NamedSharding(mesh, weight_spec(np.shape(x), n, block_size)), params)


def _leaf_sharding(x, mesh: Mesh, block_size: int, n: int) -> NamedSharding:
    if _is_tile_stack(x, block_size):
        return NamedSharding(mesh, tile_spec(np.shape(x), n))
    return NamedSharding(mesh, weight_spec(np.shape(x), n, block_size))


def state_shardings(state: Any, mesh: Mesh, *, block_size: int = 64) -> Any:
    """Shardings for a whole ``TrainState`` (or any pytree): params, optimizer state
    (AdamW moments mirror their parameter and get the same split; Sylva's ``[nnz, bs, bs]``
    moments get :func:`tile_spec`), LoRA factors, scalars replicated.

    ``state`` may hold arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``).
    """
    n = _axis_size(mesh, FSDP)
    if hasattr(state, "params") and hasattr(state, "opt_state"):
        params_sh = param_shardings(state.params, mesh, block_size=block_size)
        rest = jax.tree.map(lambda x: _leaf_sharding(x, mesh, block_size, n),
                            state.replace(params=None))
        return rest.replace(params=params_sh)
    return jax.tree.map(lambda x: _leaf_sharding(x, mesh, block_size, n), state)


def batch_sharding(mesh: Mesh, *, accum_steps: int = 1) -> NamedSharding:
    """Sharding of every batch array: ``[b, T]`` split along ``b`` over ``(data, fsdp)``;
    with ``accum_steps > 1`` the arrays are ``[k, b, T]`` and ``b`` (axis 1) is split."""
    spec = P(BATCH_AXES) if accum_steps == 1 else P(None, BATCH_AXES)
    return NamedSharding(mesh, spec)


def _put(tree, shardings):
    """``jax.device_put`` that also works across processes for host (NumPy) leaves that
    every process holds in full (each process keeps its addressable shards)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, s):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, s)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree.map(one, tree, shardings)


def put(tree: Any, shardings: Any) -> Any:
    """Place host (NumPy) leaves that every process holds in full with ``shardings`` (a
    pytree like ``tree``, or one sharding for all leaves); across processes each process
    keeps only its addressable shards."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return _put(tree, shardings)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host (NumPy) leaves that every process holds in full, as arrays replicated on every
    device of ``mesh`` (across processes too: a plain NumPy argument to a computation on a
    multi-process mesh is not enough)."""
    return put(tree, NamedSharding(mesh, P()))


def to_host(tree: Any) -> Any:
    """NumPy copies of every array leaf, on every process: fully addressable arrays are
    copied, replicated ones read from a local shard, sharded ones gathered across processes
    (``multihost_utils.process_allgather``; every process must call this together)."""
    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def shard_params(params: Any, mesh: Mesh, *, block_size: int = 64) -> Any:
    """``params`` placed on ``mesh`` by the weight rule."""
    return _put(params, param_shardings(params, mesh, block_size=block_size))


def shard_state(state: Any, mesh: Mesh, *, block_size: int = 64) -> Any:
    """A ``TrainState`` placed on ``mesh`` (:func:`state_shardings`)."""
    return _put(state, state_shardings(state, mesh, block_size=block_size))


def process_batch_slice(global_batch_size: int, mesh: Mesh) -> slice:
    """The rows ``[start, stop)`` of a global batch of ``global_batch_size`` samples that
    THIS process must read (its devices hold exactly those rows). One process: all rows."""
    ways = _batch_ways(mesh)
    if global_batch_size % ways:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by data*fsdp={ways}; "
            f"use a multiple of {ways}")
    sh = NamedSharding(mesh, P(BATCH_AXES))
    idx = sh.addressable_devices_indices_map((global_batch_size,))
    starts = [i[0].start or 0 for i in idx.values()]
    stops = [global_batch_size if i[0].stop is None else i[0].stop for i in idx.values()]
    lo, hi = min(starts), max(stops)
    per = global_batch_size // ways
    if hi - lo != per * len(set(starts)):
        raise ValueError("this process's devices do not own one contiguous range of batch rows; "
                         "build the mesh with sylva_jax.sharding.make_mesh")
    return slice(lo, hi)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, *, accum_steps: int = 1,
                global_batch_size: int | None = None) -> dict[str, jax.Array]:
    """Place a batch (dict of ``[b, T]`` or ``[k, b, T]`` arrays) split over
    ``(data, fsdp)``.

    One process: ``batch`` is the global batch. Several processes: ``batch`` holds only
    this process's rows (``process_batch_slice``) and ``global_batch_size`` the total
    ``b``; the global array is assembled without any host seeing all rows.
    """
    sh = batch_sharding(mesh, accum_steps=accum_steps)
    axis = 0 if accum_steps == 1 else 1
    out = {}
    for name, arr in batch.items():
        arr = np.asarray(arr)
        if jax.process_count() == 1 and global_batch_size in (None, arr.shape[axis]):
            if arr.shape[axis] % _batch_ways(mesh):
                raise ValueError(
                    f"batch[{name!r}] has {arr.shape[axis]} rows, not divisible by data*fsdp="
                    f"{_batch_ways(mesh)}; use a batch size that is a multiple of it")
            out[name] = jax.device_put(arr, sh)
        else:
            if global_batch_size is None:
                raise ValueError("with several processes pass global_batch_size= (each process "
                                 "gives only its own rows, see process_batch_slice)")
            gshape = list(arr.shape)
            gshape[axis] = int(global_batch_size)
            out[name] = jax.make_array_from_process_local_data(sh, arr, tuple(gshape))
    return out


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def sharded_step(trainer, mesh: Mesh, state: Any, *, block_size: int = 64,
                 donate: bool = True) -> tuple[Callable, Any]:
    """``(step, state)``: one training step compiled for ``mesh`` with explicit in/out
    shardings, and ``state`` placed accordingly (an abstract state of
    ``jax.ShapeDtypeStruct`` comes back with the shardings attached, for
    ``step.jitted.lower(state, batch)`` without memory).

    ``trainer``: a :class:`sylva_jax.train.Trainer` (its pure ``core.step``, accumulation
    included, is jitted here; ``accum_steps`` from it) or a
    :class:`sylva_jax.train.TrainStep` from ``make_step``.

    The step keeps the state's sharding from one call to the next (so the donated buffers
    are reused on every shard and nothing recompiles); metrics come back replicated.
    Batches must be placed with :func:`shard_batch` (``accum_steps=trainer.accum_steps``).
    Equivalent to ``trainer.step`` up to the summation order of cross-device reductions.
    """
    core = getattr(trainer, "core", None) or trainer
    if not callable(getattr(core, "step", None)) or not hasattr(core, "accum_steps"):
        raise ValueError("sharded_step takes a Trainer (sylva_jax.train.make_train_step) or a TrainStep "
                         "(sylva_jax.train.make_step)")
    st_sh = state_shardings(state, mesh, block_size=block_size)
    b_sh = batch_sharding(mesh, accum_steps=core.accum_steps)
    rep = NamedSharding(mesh, P())
    jitted = jax.jit(core.step, in_shardings=(st_sh, b_sh), out_shardings=(st_sh, rep),
                     donate_argnums=(0,) if donate else ())

    call = host_memory.compile_then_release(jitted)  # the compiler's heap freed before step 1

    def run(state, batch):
        batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}
        return call(state, batch)

    run.jitted = jitted  # for .lower(...).compile().memory_analysis()
    run.batch_sharding = b_sh
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state)):
        # abstract state (jax.eval_shape): attach the shardings, for lowering only
        return run, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                 state, st_sh)
    return run, _put(state, st_sh)


# --------------------------------------------------------------------------------------
# Pre-processing
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _sharded_apply(graphdef, mesh: Mesh) -> Callable:
    """``apply(params, ids, mask, *, linear_fn)`` for ``capture.preprocess`` whose inputs
    are constrained to the batch sharding: XLA then runs every sample's forward/backward
    on its own data shard (per-sample statistics stay on that shard) and inserts the
    reductions (gradient sums, dense/diagonal factor sums; the gathered ``[B, dim]``
    vectors for the sequential HODLR update)."""
    ways = _batch_ways(mesh)
    sh = NamedSharding(mesh, P(BATCH_AXES))

    def constrain(x):
        if x is None or x.ndim < 1 or x.shape[0] % ways:
            return x  # the abstract scope-discovery trace runs with batch 1
        return jax.lax.with_sharding_constraint(x, sh)

    def apply(params, input_ids, attention_mask=None, *, linear_fn=None):
        return llama.apply(graphdef, params, constrain(input_ids), constrain(attention_mask),
                           linear_fn=linear_fn)

    return apply


def sharded_model(graphdef, params: Any, mesh: Mesh, *, block_size: int = 64) -> tuple[Callable, Any]:
    """``(apply, params)`` for :func:`sylva_jax.capture.preprocess` or
    :func:`sylva_jax.importance.compute_masks` that runs on ``mesh``: the weights placed by
    the weight rule (already-placed ones kept) and the batch split over ``(data, fsdp)``."""
    leaves = jax.tree.leaves(params)
    placed = all(isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding)
                 and x.sharding.mesh == mesh for x in leaves)
    if not placed:
        params = shard_params(params, mesh, block_size=block_size)
    return _sharded_apply(graphdef, mesh), params


def preprocess(model, batches: Iterable[Mapping[str, Any]], mesh: Mesh, *, scope,
               block_size: int = 64, **kwargs):
    """:func:`sylva_jax.capture.preprocess` on ``mesh`` (`docs/algorithm.md` §1).

    model: ``(graphdef, params)`` from ``models.llama.split`` (params placed here by the
      weight rule; already-sharded params are used as they are).
    batches: the usual host batches ``[B, T]`` (every process passes the same global
      batches); ``B`` should be a multiple of ``data * fsdp`` for the work to split.
    kwargs: as ``capture.preprocess`` (``num_samples``, ``num_partition``, ``factor``, ...).

    Per-sample statistics are computed on each data shard; the factors are sums over
    samples (the HODLR update consumes the gathered per-sample vectors in the same sample
    order as on one device), so the result equals the single-device one up to float32
    summation order. Returns ``capture.Stats``.
    """
    if not (isinstance(model, tuple) and len(model) == 2):
        raise TypeError("sharding.preprocess takes (graphdef, params) from "
                        "sylva_jax.models.llama.split")
    graphdef, params = model
    return capture.preprocess(sharded_model(graphdef, params, mesh, block_size=block_size),
                              batches, scope=scope, **kwargs)


# --------------------------------------------------------------------------------------
# Multi-host
# --------------------------------------------------------------------------------------


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, timeout_s: int = 300) -> bool:
    """Join a multi-process JAX job (``jax.distributed.initialize``); returns whether it did.

    Arguments fall back to ``SYLVA_COORDINATOR`` / ``SYLVA_NUM_PROCESSES`` /
    ``SYLVA_PROCESS_ID``, then ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID``. With none of them set and one process requested (or nothing
    given), nothing is done: single-host runs need no call. On clusters that JAX detects by
    itself (SLURM, Open MPI, TPU pods, Kubernetes), pass ``num_processes=-1`` to let
    ``jax.distributed.initialize()`` find everything. On CPU the cross-process collectives
    are gloo.
    """
    env = os.environ
    coordinator = coordinator or env.get("SYLVA_COORDINATOR") or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None:
        v = env.get("SYLVA_NUM_PROCESSES") or env.get("JAX_NUM_PROCESSES")
        num_processes = int(v) if v else None
    if process_id is None:
        v = env.get("SYLVA_PROCESS_ID") or env.get("JAX_PROCESS_ID")
        process_id = int(v) if v else None
    if num_processes == -1:
        jax.distributed.initialize(initialization_timeout=int(timeout_s))
        return True
    if coordinator is None and (num_processes in (None, 1)):
        return False
    if coordinator is None or num_processes is None or process_id is None:
        raise ValueError(
            "multi-host run needs all of --coordinator HOST:PORT, --num_processes N and "
            f"--process_id I (or SYLVA_/JAX_ environment variables); got coordinator={coordinator!r}, "
            f"num_processes={num_processes!r}, process_id={process_id!r}")
    if not 0 <= int(process_id) < int(num_processes):
        raise ValueError(f"process_id must lie in [0, {num_processes}); got {process_id}")
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # noqa: BLE001 - the option is absent on JAX builds without CPU collectives
        pass
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(num_processes),
                               process_id=int(process_id), initialization_timeout=int(timeout_s))
    return True


# --------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------


def memory_per_device(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled program (``jax.jit(...).lower(...).compile()``):
    arguments, outputs, temporaries, aliased (donated) and generated code."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
    return {k.replace("_size_in_bytes", "_bytes"): int(getattr(m, k, 0) or 0) for k in keys}


def addressable_bytes(tree: Any) -> int:
    """Bytes that the FIRST local device holds of the arrays in ``tree`` (its shards)."""
    dev = jax.local_devices()[0]
    total = 0
    for x in jax.tree.leaves(tree):
        for s in getattr(x, "addressable_shards", ()):
            if s.device == dev:
                total += s.data.size * s.data.dtype.itemsize
    return total
