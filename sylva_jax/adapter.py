"""The Sylva adapter: static tile coordinates and gather / scatter of tiles in the weights.

`docs/algorithm.md` §5. The trainable tiles live *inside* the frozen weights: the
parameters are the merged model at all times and there is never a second copy of a
weight. An :class:`Adapter` only knows, per weight path, which ``bs x bs`` tiles train;
it gathers them (:meth:`Adapter.tiles`), adds optimizer updates into them
(:meth:`Adapter.apply_updates`) and builds the model's ``linear_fn`` hook
(:meth:`Adapter.linear_fn`) whose backward pass produces gradients for the tiles only.

Conventions (docs/ARCHITECTURE.md): weights are named by their '.'-joined key path
(:func:`sylva_jax.tree.flatten`); masks, coordinates and tiles are always in ``[out, in]``
terms: tile ``(r, c)`` is ``W[r*bs:(r+1)*bs, c*bs:(c+1)*bs]`` of the ``[out, in]`` weight.
With ``layout="in_out"`` (Flax Linen kernels stored ``[in, out]``) the stored array is
the transpose; coordinates are swapped and tiles transposed internally so that tiles are
still ``[out, in]`` blocks.
"""
from __future__ import annotations

import difflib
import hashlib
from types import MappingProxyType
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sylva_jax import tree as tree_lib
from sylva_jax.ops import dense_linear, embedded_linear

__all__ = ["Adapter", "make_adapter", "LAYOUTS"]

LAYOUTS = ("out_in", "in_out")


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


@jax.tree_util.register_pytree_node_class
class Adapter:
    """Static description of the trainable tiles of a model.

    A pytree with no leaves: everything (coordinates, block size, layout, weight shapes)
    is static treedef aux data, hashable and comparable, so an ``Adapter`` can be passed
    through ``jax.jit`` as an ordinary argument or closed over.

    Attributes:
      coords: ``{path: (rows int32[nnz], cols int32[nnz])}`` tile coordinates in block
        units of the ``[out, in]`` weight, row-major order (read-only NumPy arrays).
      block_size: tile side ``bs``.
      layout: ``"out_in"`` (Hugging Face / our LLaMA) or ``"in_out"`` (Linen kernels).
      paths: adapted weight paths (those with at least one tile), in parameter order.
      shapes: ``{path: stored weight shape}``.
      num_trainable: number of trainable scalars, ``sum(nnz) * bs**2``.
    """

    def __init__(self, coords: Mapping[str, tuple[np.ndarray, np.ndarray]],
                 shapes: Mapping[str, tuple[int, ...]], *, block_size: int,
                 layout: str = "out_in", views: Mapping[str, tuple[int, int]] | None = None):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
        self._block_size = int(block_size)
        self._layout = layout
        c: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        s: dict[str, tuple[int, ...]] = {}
        v: dict[str, tuple[int, int]] = {}
        for path, (rows, cols) in coords.items():
            rows = _readonly(np.asarray(rows, np.int32).reshape(-1))
            cols = _readonly(np.asarray(cols, np.int32).reshape(-1))
            if rows.shape != cols.shape:
                raise ValueError(f"{path!r}: rows and cols differ in length "
                                 f"({rows.shape[0]} vs {cols.shape[0]})")
            if rows.shape[0] == 0:
                continue
            c[path] = (rows, cols)
            s[path] = tuple(int(d) for d in shapes[path])
            # the stored weight as a matrix: itself when 2-D; an N-D kernel (DenseGeneral
            # [in, heads, head_dim]) is read as the free reshape views[path]
            v[path] = tuple(int(d) for d in (views or {}).get(path, s[path]))
            if len(v[path]) != 2 or int(np.prod(v[path])) != int(np.prod(s[path])):
                raise ValueError(f"{path!r}: matrix view {v[path]} does not fit the stored "
                                 f"shape {s[path]}")
        self._coords = MappingProxyType(c)
        self._shapes = MappingProxyType(s)
        self._views = MappingProxyType(v)
        h = hashlib.sha1(f"{self._block_size}|{layout}".encode())
        for path in c:
            h.update(path.encode() + b"\0" + repr((s[path], v[path])).encode())
            h.update(c[path][0].tobytes())
            h.update(c[path][1].tobytes())
        self._digest = h.hexdigest()

    # -- pytree / hashing ---------------------------------------------------------------
    def tree_flatten(self):
        return (), self

    @classmethod
    def tree_unflatten(cls, aux, children):
        del children
        return aux

    def __hash__(self):
        return hash(self._digest)

    def __eq__(self, other):
        return isinstance(other, Adapter) and other._digest == self._digest

    def __repr__(self):
        return (f"Adapter({len(self._coords)} weights, {self.num_tiles} tiles of "
                f"{self._block_size}x{self._block_size}, {self.num_trainable} trainable, "
                f"layout={self._layout!r})")

    # -- static properties --------------------------------------------------------------
    @property
    def coords(self) -> Mapping[str, tuple[np.ndarray, np.ndarray]]:
        return self._coords

    @property
    def shapes(self) -> Mapping[str, tuple[int, int]]:
        return self._shapes

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def layout(self) -> str:
        return self._layout

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(self._coords)

    @property
    def num_tiles(self) -> int:
        return int(sum(r.shape[0] for r, _ in self._coords.values()))

    @property
    def num_trainable(self) -> int:
        return self.num_tiles * self._block_size ** 2

    def out_in_shape(self, path: str) -> tuple[int, int]:
        """``(out, in)`` of the weight at ``path`` whatever the storage layout."""
        s = self._views[path]
        return s if self._layout == "out_in" else (s[1], s[0])

    # -- gather / scatter ---------------------------------------------------------------
    def _blocked(self, path: str, w) -> tuple[jax.Array, np.ndarray, np.ndarray]:
        """The stored weight as a free 4-D view ``[B0, bs, B1, bs]`` and the block indices
        into its axes 0 and 2 (``(rows, cols)`` for out_in, ``(cols, rows)`` for in_out)."""
        w = jnp.asarray(w)
        if tuple(w.shape) != self._shapes[path]:
            raise ValueError(
                f"weight {path!r} has shape {tuple(w.shape)} but the adapter was built for "
                f"{self._shapes[path]}; build the adapter from these parameters")
        bs = self._block_size
        rows, cols = self._coords[path]
        v0, v1 = self._views[path]
        w4 = w.reshape(v0 // bs, bs, v1 // bs, bs)
        if self._layout == "out_in":
            return w4, rows, cols
        return w4, cols, rows

    def _gather(self, path: str, w) -> jax.Array:
        w4, i0, i2 = self._blocked(path, w)
        t = w4[i0, :, i2, :]                                     # [nnz, bs, bs]
        return t if self._layout == "out_in" else jnp.swapaxes(t, 1, 2)

    def _scatter(self, path: str, w, new_tiles) -> jax.Array:
        w4, i0, i2 = self._blocked(path, w)
        t = new_tiles if self._layout == "out_in" else jnp.swapaxes(new_tiles, 1, 2)
        if i0.shape[0] == 1:
            # A one-tile scatter becomes a dynamic-update-slice through the 4-D view, a fusion
            # XLA cannot run in place (operand and result shapes differ): under jit with the
            # weights donated it copies the whole weight. Writing the same tile twice keeps it
            # a scatter, which is updated in place (seen in train's sylva step).
            i0, i2, t = np.repeat(i0, 2), np.repeat(i2, 2), jnp.concatenate([t, t])
            return w4.at[i0, :, i2, :].set(t.astype(w4.dtype)).reshape(self._shapes[path])
        w4 = w4.at[i0, :, i2, :].set(t.astype(w4.dtype), unique_indices=True)
        return w4.reshape(self._shapes[path])

    def _check_tree(self, flat: Mapping[str, Any], what: str):
        missing = [p for p in self._coords if p not in flat]
        if missing:
            raise KeyError(
                f"{what} lacks adapted weight(s) {missing[:3]}{'...' if len(missing) > 3 else ''}; "
                f"pass the same parameter tree the adapter was built from")

    def _check_tiles(self, tiles: Mapping[str, Any], what: str):
        for path, (rows, _) in self._coords.items():
            if path not in tiles:
                raise KeyError(f"{what} has no entry for adapted weight {path!r}; expected a "
                               f"dict {{path: [nnz, bs, bs]}} like adapter.tiles(params)")
            shape = tuple(tiles[path].shape)
            want = (rows.shape[0], self._block_size, self._block_size)
            if shape != want:
                raise ValueError(f"{what}[{path!r}] has shape {shape}; expected {want}")

    def tiles(self, params) -> dict[str, jax.Array]:
        """Gather the trainable tiles: ``{path: [nnz, bs, bs]}`` in ``[out, in]`` orientation."""
        flat = tree_lib.flatten(params)
        self._check_tree(flat, "params")
        return {p: self._gather(p, flat[p]) for p in self._coords}

    def set_tiles(self, params, tiles: Mapping[str, Any]):
        """``params`` with the adapted tiles replaced by ``tiles`` (scatter-set); every
        other leaf is returned as the same object."""
        self._check_tiles(tiles, "tiles")
        self._check_tree(tree_lib.flatten(params), "params")

        def fn(path, leaf):
            if path not in self._coords:
                return leaf
            return self._scatter(path, leaf, tiles[path])

        return tree_lib.map_flat(fn, params)

    def apply_updates(self, params, updates: Mapping[str, Any]):
        """``params`` with ``updates[path]`` ([nnz, bs, bs]) added into the tiles.

        The addition is done in float32 and rounded once to the weight dtype. Every other
        leaf is returned as the same object; under ``jax.jit`` with ``params`` donated the
        scatter updates the weights in place.
        """
        self._check_tiles(updates, "updates")
        self._check_tree(tree_lib.flatten(params), "params")

        def fn(path, leaf):
            if path not in self._coords:
                return leaf
            old = self._gather(path, leaf).astype(jnp.float32)
            return self._scatter(path, leaf, old + updates[path].astype(jnp.float32))

        return tree_lib.map_flat(fn, params)

    def unmerge(self, params, base_tiles: Mapping[str, Any]):
        """Put the base model's tiles back (``base_tiles = adapter.tiles(base_params)``
        taken before training): returns the base model."""
        return self.set_tiles(params, base_tiles)

    def trainable_mask(self, params):
        """Pytree like ``params`` of Python bools, True exactly for adapted weights (for
        ``optax.masked`` users; note it selects whole weights, not tiles)."""
        return tree_lib.map_flat(lambda path, leaf: path in self._coords, params)

    # -- the model hook -----------------------------------------------------------------
    def linear_fn(self, tiles: Mapping[str, jax.Array], *, backend: str = "auto") -> Callable:
        """The model's ``linear_fn(name, x, w, b)`` hook (docs/ARCHITECTURE.md).

        Adapted weights go through :func:`sylva_jax.ops.embedded_linear` with
        ``tiles[name]`` (gradient for the tiles only); every other weight is a frozen dense
        product (``lax.stop_gradient`` on ``w`` and ``b``: only ``dx`` flows). ``w`` arrives
        ``[out, in]`` whatever the storage layout, and tiles are ``[out, in]`` blocks, so
        the hook works for both layouts.
        """
        self._check_tiles(tiles, "tiles")
        bs = self._block_size
        coords = self._coords

        def hook(name: str, x: jax.Array, w: jax.Array, b: jax.Array | None = None):
            if name not in coords:
                return dense_linear(x, jax.lax.stop_gradient(w),
                                    None if b is None else jax.lax.stop_gradient(b))
            if tuple(w.shape) != self.out_in_shape(name):
                raise ValueError(
                    f"linear_fn got weight {name!r} with shape {tuple(w.shape)} but the adapter "
                    f"expects [out, in] = {self.out_in_shape(name)}")
            rows, cols = coords[name]
            return embedded_linear(x, w, tiles[name], rows, cols,
                                   None if b is None else jax.lax.stop_gradient(b),
                                   block_size=bs, backend=backend)

        return hook

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat ``{key: numpy array}``: ``block_size`` (int64 scalar), ``layout`` (0-d str
        array), and per adapted path ``rows/<path>``, ``cols/<path>`` (int32[nnz]) and
        ``shape/<path>`` (int64[2], stored weight shape)."""
        out: dict[str, np.ndarray] = {
            "block_size": np.asarray(self._block_size, np.int64),
            "layout": np.asarray(self._layout),
        }
        for path, (rows, cols) in self._coords.items():
            out[f"rows/{path}"] = np.array(rows)
            out[f"cols/{path}"] = np.array(cols)
            out[f"shape/{path}"] = np.asarray(self._shapes[path], np.int64)
            out[f"view/{path}"] = np.asarray(self._views[path], np.int64)
        return out

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "Adapter":
        """Inverse of :meth:`state_dict` (accepts NumPy or JAX arrays, or plain scalars)."""
        for key in ("block_size", "layout"):
            if key not in state:
                raise KeyError(f"adapter state lacks {key!r}; expected the output of "
                               "Adapter.state_dict()")
        layout = state["layout"]
        layout = str(layout.item() if hasattr(layout, "item") else layout)
        coords, shapes, views = {}, {}, {}
        for key in state:
            if key.startswith("rows/"):
                path = key[len("rows/"):]
                for part in ("cols", "shape"):
                    if f"{part}/{path}" not in state:
                        raise KeyError(f"adapter state has rows/{path} but no {part}/{path}")
                coords[path] = (np.asarray(state[key]), np.asarray(state[f"cols/{path}"]))
                shapes[path] = tuple(int(d) for d in np.asarray(state[f"shape/{path}"]))
                if f"view/{path}" in state:
                    views[path] = tuple(int(d) for d in np.asarray(state[f"view/{path}"]))
        return cls(coords, shapes, block_size=int(np.asarray(state["block_size"])),
                   layout=layout, views=views)


def make_adapter(params, masks: Mapping[str, Any], *, block_size: int = 64,
                 layout: str = "out_in") -> Adapter:
    """Build an :class:`Adapter` from boolean tile masks.

    Args:
      params: any pytree of parameters (nested dict, NNX ``State``, ...); only the shapes
        of the masked weights are read.
      masks: ``{path: bool[out // bs, in // bs]}`` keyed by ``tree.flatten`` names, always
        in ``[out, in]`` terms. An all-False mask leaves that weight out of the adapter.
      block_size: tile side ``bs`` (must divide both dimensions of every masked weight).
      layout: ``"out_in"`` (weights stored ``[out, in]``) or ``"in_out"`` (Linen kernels).

    Returns:
      The adapter; coordinates per weight in row-major order of the mask.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    bs = int(block_size)
    if bs <= 0:
        raise ValueError(f"block_size must be a positive integer; got {block_size}")
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping {{path: bool array}}; got {type(masks).__name__}")
    flat = tree_lib.flatten(params)
    coords, shapes, views = {}, {}, {}
    for path, mask in masks.items():
        if path not in flat:
            close = difflib.get_close_matches(path, list(flat), n=3)
            raise KeyError(
                f"mask key {path!r} is not a parameter path"
                + (f"; did you mean {close}?" if close else "")
                + " (keys are '.'-joined paths as produced by sylva_jax.tree.flatten)")
        shape = tuple(np.shape(flat[path]))
        m = np.asarray(mask)
        if len(shape) < 2:
            raise ValueError(f"mask key {path!r} names a parameter of shape {shape}; only 2-D "
                             "weights (or N-D kernels read as matrices) can be adapted")
        if len(shape) == 2:
            view = shape
        else:
            view = _nd_view(path, shape, m.shape, bs, layout)
        out_dim, in_dim = view if layout == "out_in" else (view[1], view[0])
        if out_dim % bs or in_dim % bs:
            raise ValueError(
                f"block_size {bs} does not divide weight {path!r} of shape {shape} "
                f"([out, in] = ({out_dim}, {in_dim})); choose a block size dividing both")
        expected = (out_dim // bs, in_dim // bs)
        if m.shape != expected:
            raise ValueError(
                f"mask for {path!r} has shape {m.shape}; weight shape {shape} (layout "
                f"{layout!r}) with block_size {bs} needs a mask of shape {expected} "
                "([out // bs, in // bs])")
        if not (m.dtype == np.bool_ or np.issubdtype(m.dtype, np.integer)):
            raise TypeError(f"mask for {path!r} must be boolean; got dtype {m.dtype}")
        rows, cols = np.nonzero(m.astype(bool))
        if rows.size:
            coords[path] = (rows.astype(np.int32), cols.astype(np.int32))
            shapes[path] = shape
            views[path] = view
    order = {p: i for i, p in enumerate(flat)}
    coords = dict(sorted(coords.items(), key=lambda kv: order[kv[0]]))
    return Adapter(coords, shapes, block_size=bs, layout=layout, views=views)


def _nd_view(path, shape, mask_shape, bs, layout):
    """The stored matrix view of an N-D kernel, read from its mask ``[out/bs, in/bs]``:
    ``(in, out)`` for ``in_out`` (contracted axes lead, e.g. DenseGeneral ``[in, heads,
    head_dim]`` or ``[heads, head_dim, out]``), ``(out, in)`` for ``out_in``."""
    if len(mask_shape) != 2:
        raise ValueError(f"mask for {path!r} must be 2-D [out // bs, in // bs]; got {mask_shape}")
    out_dim, in_dim = mask_shape[0] * bs, mask_shape[1] * bs
    first, second = (in_dim, out_dim) if layout == "in_out" else (out_dim, in_dim)
    splits = [int(np.prod(shape[:k])) for k in range(1, len(shape))]
    if first not in splits or first * second != int(np.prod(shape)):
        raise ValueError(
            f"mask for {path!r} has shape {tuple(mask_shape)} ([out, in] = ({out_dim}, "
            f"{in_dim}) with block_size {bs}), which is no split of the {len(shape)}-D weight "
            f"{shape} into {'leading in / trailing out' if layout == 'in_out' else 'leading out / trailing in'} axes")
    return (first, second)
