"""The Sylva adapter: tile layouts, tile coordinates and gather / scatter of tiles in the
weights.

`docs/algorithm.md` §5. The trainable tiles live *inside* the frozen weights: the
parameters are the merged model at all times and there is never a second copy of a
weight. A :class:`TileLayout` knows, per weight path, the weight's shape and HOW MANY
``bs x bs`` tiles train; given their coordinates (:data:`Coords`, arrays that may be
traced) it gathers the tiles (:meth:`TileLayout.tiles`), adds optimizer updates into them
(:meth:`TileLayout.apply_updates`) and builds the model's ``linear_fn`` hook
(:meth:`TileLayout.linear_fn`) whose backward pass produces gradients for the tiles only.
An :class:`Adapter` is a layout with its coordinates fixed (static, NumPy), offering the
same operations.

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

__all__ = ["Adapter", "TileLayout", "Coords", "make_adapter", "LAYOUTS"]

LAYOUTS = ("out_in", "in_out")


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


Coords = Mapping[str, tuple[Any, Any]]
"""``{path: (rows int32[k], cols int32[k])}``: tile coordinates in block units of the
``[out, in]`` weight (NumPy or JAX arrays, possibly traced)."""


def _digest(block_size: int, layout: str, shapes, views, extra) -> str:
    h = hashlib.sha1(f"{block_size}|{layout}".encode())
    for path in shapes:
        h.update(path.encode() + b"\0" + repr((shapes[path], views[path])).encode())
        for part in extra(path):
            h.update(part)
    return h.hexdigest()


def _matrix_view(path: str, shape, views) -> tuple[int, int]:
    """The stored weight as a matrix: itself when 2-D; an N-D kernel (DenseGeneral
    ``[in, heads, head_dim]``) is read as the free reshape ``views[path]``."""
    v = tuple(int(d) for d in (views or {}).get(path, shape))
    if len(v) != 2 or int(np.prod(v)) != int(np.prod(shape)):
        raise ValueError(f"{path!r}: matrix view {v} does not fit the stored shape {shape}")
    return v


class _Static:
    """A pytree node without leaves, the whole object its static aux data: it passes
    through ``jax.jit`` as a compile-time constant, and two are equal (and hash alike,
    one compile) when their ``_digest`` (a hash of everything they hold) is."""

    _digest: str

    def tree_flatten(self):
        return (), self

    @classmethod
    def tree_unflatten(cls, aux, children):
        del children
        return aux

    def __hash__(self):
        return hash(self._digest)

    def __eq__(self, other):
        return type(other) is type(self) and other._digest == self._digest


@jax.tree_util.register_pytree_node_class
class TileLayout(_Static):
    """A Sylva adapter without its coordinates: what a compiled step depends on.

    Per adapted weight path: the stored shape, its matrix view and the NUMBER ``k`` of
    ``bs x bs`` tiles; the block size and the storage layout. A pytree with no leaves
    (static, hashable). The coordinates are a separate pytree :data:`Coords` given to
    every method, so they may be traced arrays: one compiled training step serves every
    choice of tiles with the same per-weight counts (docs/algorithm.md §5, the tiles are
    fixed for a run, not for a program). :meth:`coords` builds them from masks and
    validates them on the host; under ``jit`` nothing can be checked, so coordinates
    built by hand go through :meth:`validate` first (out-of-range indices are clipped by
    XLA, duplicates break the scatter).
    """

    def __init__(self, counts: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]], *,
                 block_size: int, layout: str = "out_in",
                 views: Mapping[str, tuple[int, int]] | None = None):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
        self._block_size = int(block_size)
        self._layout = layout
        k, s, v = {}, {}, {}
        for path, n in counts.items():
            if int(n) <= 0:
                raise ValueError(f"{path!r}: a tile layout needs k >= 1 tiles; got {n} "
                                 "(leave weights without tiles out)")
            k[path] = int(n)
            s[path] = tuple(int(d) for d in shapes[path])
            v[path] = _matrix_view(path, s[path], views)
        self._counts = MappingProxyType(k)
        self._shapes = MappingProxyType(s)
        self._views = MappingProxyType(v)
        self._digest = _digest(self._block_size, layout, s, v, lambda p: (str(k[p]).encode(),))

    @classmethod
    def of(cls, adapter: "Adapter") -> "TileLayout":
        """The layout of ``adapter`` (same paths, shapes and per-weight counts)."""
        return adapter.tile_layout

    def __repr__(self):
        return (f"TileLayout({len(self._counts)} weights, {self.num_tiles} tiles of "
                f"{self._block_size}x{self._block_size}, layout={self._layout!r})")

    # -- static properties --------------------------------------------------------------
    @property
    def counts(self) -> Mapping[str, int]:
        return self._counts

    @property
    def shapes(self) -> Mapping[str, tuple[int, ...]]:
        return self._shapes

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def layout(self) -> str:
        return self._layout

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(self._counts)

    @property
    def num_tiles(self) -> int:
        return int(sum(self._counts.values()))

    @property
    def num_trainable(self) -> int:
        return self.num_tiles * self._block_size ** 2

    def out_in_shape(self, path: str) -> tuple[int, int]:
        """``(out, in)`` of the weight at ``path`` whatever the storage layout."""
        s = self._views[path]
        return s if self._layout == "out_in" else (s[1], s[0])

    def grid(self, path: str) -> tuple[int, int]:
        """``(out // bs, in // bs)``: the tile grid (mask shape) of the weight at ``path``."""
        out_dim, in_dim = self.out_in_shape(path)
        return out_dim // self._block_size, in_dim // self._block_size

    # -- coordinates (host side) --------------------------------------------------------
    def coords(self, masks: Mapping[str, Any]) -> dict[str, tuple[jax.Array, jax.Array]]:
        """Coordinates from boolean masks ``{path: bool[out // bs, in // bs]}``, row-major
        (as :func:`make_adapter`); each mask must select exactly ``counts[path]`` tiles.
        Masks of weights outside the layout must be all False."""
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks must be a mapping {{path: bool array}}; got {type(masks).__name__}")
        extra = [p for p, m in masks.items() if p not in self._counts and np.any(np.asarray(m))]
        if extra:
            raise ValueError(f"masks select tiles of {extra[:3]}, which the layout does not adapt; "
                             "build the layout from an adapter of these weights")
        out = {}
        for path in self._counts:
            if path not in masks:
                raise KeyError(f"masks lack adapted weight {path!r}; give one mask per path of "
                               "the layout")
            m = np.asarray(masks[path])
            if m.shape != self.grid(path):
                raise ValueError(f"mask for {path!r} has shape {m.shape}; the layout needs "
                                 f"{self.grid(path)} ([out // bs, in // bs])")
            rows, cols = np.nonzero(m.astype(bool))
            if rows.size != self._counts[path]:
                raise ValueError(
                    f"mask for {path!r} selects {rows.size} tiles but the layout has k = "
                    f"{self._counts[path]} there; every arm of one layout trains the same number "
                    "of tiles per weight (another count needs its own TileLayout and compilation)")
            out[path] = (rows, cols)
        return self.validate(out)

    def coords_of(self, adapter: "Adapter") -> dict[str, tuple[jax.Array, jax.Array]]:
        """``adapter``'s coordinates as arrays, for an adapter of this layout."""
        if adapter.tile_layout != self:
            raise ValueError(f"{adapter!r} does not have this layout ({self!r}): paths, "
                             "shapes and per-weight tile counts must all agree")
        return self.validate(adapter.coords)

    def adapter(self, coords: Coords) -> "Adapter":
        """The static :class:`Adapter` of this layout at concrete ``coords`` (for what
        takes an adapter: export, adapter checkpoints, the fused optimizer)."""
        c = self.validate(coords)
        return Adapter({p: tuple(np.asarray(a) for a in c[p]) for p in self._counts},
                       self._shapes, block_size=self._block_size, layout=self._layout,
                       views=dict(self._views))

    def validate(self, coords: Coords) -> dict[str, tuple[jax.Array, jax.Array]]:
        """Host-side check of concrete coordinates (one entry per path, ``k`` tiles each, in
        range, no tile twice); returns them as int32 JAX arrays."""
        self._check_coords(coords, "coords")
        out = {}
        for path, (rows, cols) in coords.items():
            if path not in self._counts:
                raise KeyError(f"coords has weight {path!r}, which the layout does not adapt")
            r, c = np.asarray(rows), np.asarray(cols)
            if not (np.issubdtype(r.dtype, np.integer) and np.issubdtype(c.dtype, np.integer)):
                raise TypeError(f"coords[{path!r}] must be integers; got {r.dtype}, {c.dtype}")
            n_r, n_c = self.grid(path)
            if r.min() < 0 or r.max() >= n_r or c.min() < 0 or c.max() >= n_c:
                raise ValueError(f"coords[{path!r}] out of range: rows must lie in [0, {n_r}) "
                                 f"and cols in [0, {n_c}) (out // bs, in // bs)")
            if np.unique(r.astype(np.int64) * n_c + c).shape[0] != r.shape[0]:
                raise ValueError(f"coords[{path!r}] names a tile twice; every tile once")
            out[path] = (jnp.asarray(r, jnp.int32), jnp.asarray(c, jnp.int32))
        return out

    # -- trace-safe checks --------------------------------------------------------------
    def _check_coords(self, coords: Coords, what: str):
        for path, k in self._counts.items():
            if path not in coords:
                raise KeyError(f"{what} has no entry for adapted weight {path!r}; expected "
                               "{path: (rows [k], cols [k])} like layout.coords(masks)")
            rows, cols = coords[path]
            if tuple(np.shape(rows)) != (k,) or tuple(np.shape(cols)) != (k,):
                raise ValueError(f"{what}[{path!r}] has shapes {np.shape(rows)}, {np.shape(cols)}; "
                                 f"the layout has k = {k} tiles there: expected ({k},) each")

    def _check_tree(self, flat: Mapping[str, Any], what: str):
        missing = [p for p in self._counts if p not in flat]
        if missing:
            raise KeyError(
                f"{what} lacks adapted weight(s) {missing[:3]}{'...' if len(missing) > 3 else ''}; "
                f"pass the same parameter tree the adapter was built from")

    def _check_tiles(self, tiles: Mapping[str, Any], what: str):
        for path, k in self._counts.items():
            if path not in tiles:
                raise KeyError(f"{what} has no entry for adapted weight {path!r}; expected a "
                               f"dict {{path: [nnz, bs, bs]}} like adapter.tiles(params)")
            shape = tuple(tiles[path].shape)
            want = (k, self._block_size, self._block_size)
            if shape != want:
                raise ValueError(f"{what}[{path!r}] has shape {shape}; expected {want}")

    # -- gather / scatter ---------------------------------------------------------------
    def _blocked(self, path: str, w, coords: Coords):
        """The stored weight as a free 4-D view ``[B0, bs, B1, bs]`` and the block indices
        into its axes 0 and 2 (``(rows, cols)`` for out_in, ``(cols, rows)`` for in_out)."""
        w = jnp.asarray(w)
        if tuple(w.shape) != self._shapes[path]:
            raise ValueError(
                f"weight {path!r} has shape {tuple(w.shape)} but the adapter was built for "
                f"{self._shapes[path]}; build the adapter from these parameters")
        bs = self._block_size
        rows, cols = coords[path]
        v0, v1 = self._views[path]
        w4 = w.reshape(v0 // bs, bs, v1 // bs, bs)
        if self._layout == "out_in":
            return w4, rows, cols
        return w4, cols, rows

    def _gather(self, path: str, w, coords: Coords) -> jax.Array:
        w4, i0, i2 = self._blocked(path, w, coords)
        t = w4[i0, :, i2, :]                                     # [k, bs, bs]
        return t if self._layout == "out_in" else jnp.swapaxes(t, 1, 2)

    def _scatter(self, path: str, w, coords: Coords, new_tiles) -> jax.Array:
        w4, i0, i2 = self._blocked(path, w, coords)
        t = new_tiles if self._layout == "out_in" else jnp.swapaxes(new_tiles, 1, 2)
        if i0.shape[0] == 1:
            # A one-tile scatter becomes a dynamic-update-slice through the 4-D view, a fusion
            # XLA cannot run in place (operand and result shapes differ): under jit with the
            # weights donated it copies the whole weight. Writing the same tile twice keeps it
            # a scatter, which is updated in place (seen in train's sylva step).
            xp = np if isinstance(i0, np.ndarray) else jnp
            i0, i2, t = xp.repeat(i0, 2), xp.repeat(i2, 2), jnp.concatenate([t, t])
            return w4.at[i0, :, i2, :].set(t.astype(w4.dtype)).reshape(self._shapes[path])
        w4 = w4.at[i0, :, i2, :].set(t.astype(w4.dtype), unique_indices=True)
        return w4.reshape(self._shapes[path])

    def tiles(self, params, coords: Coords) -> dict[str, jax.Array]:
        """Gather the trainable tiles: ``{path: [k, bs, bs]}`` in ``[out, in]`` orientation."""
        self._check_coords(coords, "coords")
        flat = tree_lib.flatten(params)
        self._check_tree(flat, "params")
        return {p: self._gather(p, flat[p], coords) for p in self._counts}

    def set_tiles(self, params, coords: Coords, tiles: Mapping[str, Any]):
        """``params`` with the tiles at ``coords`` replaced by ``tiles`` (scatter-set);
        every other leaf is returned as the same object."""
        self._check_coords(coords, "coords")
        self._check_tiles(tiles, "tiles")
        self._check_tree(tree_lib.flatten(params), "params")

        def fn(path, leaf):
            if path not in self._counts:
                return leaf
            return self._scatter(path, leaf, coords, tiles[path])

        return tree_lib.map_flat(fn, params)

    def apply_updates(self, params, coords: Coords, updates: Mapping[str, Any]):
        """``params`` with ``updates[path]`` ([k, bs, bs]) added into the tiles at ``coords``.

        The addition is done in float32 and rounded once to the weight dtype. Every other
        leaf is returned as the same object; under ``jax.jit`` with ``params`` donated the
        scatter updates the weights in place.
        """
        self._check_coords(coords, "coords")
        self._check_tiles(updates, "updates")
        self._check_tree(tree_lib.flatten(params), "params")

        def fn(path, leaf):
            if path not in self._counts:
                return leaf
            old = self._gather(path, leaf, coords).astype(jnp.float32)
            return self._scatter(path, leaf, coords, old + updates[path].astype(jnp.float32))

        return tree_lib.map_flat(fn, params)

    def linear_fn(self, coords: Coords, tiles: Mapping[str, jax.Array], *,
                  backend: str = "auto") -> Callable:
        """The model's ``linear_fn(name, x, w, b)`` hook (docs/ARCHITECTURE.md).

        Adapted weights go through :func:`sylva_jax.ops.embedded_linear` with
        ``tiles[name]`` at ``coords[name]`` (gradient for the tiles only); every other
        weight is a frozen dense product (``lax.stop_gradient`` on ``w`` and ``b``: only
        ``dx`` flows). ``w`` arrives ``[out, in]`` whatever the storage layout, and tiles
        are ``[out, in]`` blocks, so the hook works for both layouts. Every SDD backend
        takes the coordinates as arrays, so traced ``coords`` work with all of them.
        """
        self._check_coords(coords, "coords")
        self._check_tiles(tiles, "tiles")
        bs = self._block_size

        def hook(name: str, x: jax.Array, w: jax.Array, b: jax.Array | None = None):
            if name not in self._counts:
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


@jax.tree_util.register_pytree_node_class
class Adapter(_Static):
    """Static description of the trainable tiles of a model: a :class:`TileLayout` and
    its coordinates, fixed.

    A pytree with no leaves: everything (coordinates, block size, layout, weight shapes)
    is static treedef aux data, hashable and comparable, so an ``Adapter`` can be passed
    through ``jax.jit`` as an ordinary argument or closed over. (A jitted step then
    compiles once per choice of tiles; :class:`TileLayout` with traced coordinates
    compiles once per per-weight tile count.)

    Attributes:
      coords: ``{path: (rows int32[nnz], cols int32[nnz])}`` tile coordinates in block
        units of the ``[out, in]`` weight, row-major order (read-only NumPy arrays).
      block_size: tile side ``bs``.
      layout: ``"out_in"`` (Hugging Face / our LLaMA) or ``"in_out"`` (Linen kernels).
      paths: adapted weight paths (those with at least one tile), in parameter order.
      shapes: ``{path: stored weight shape}``.
      num_trainable: number of trainable scalars, ``sum(nnz) * bs**2``.
      tile_layout: the :class:`TileLayout` (coordinates left out).
    """

    def __init__(self, coords: Mapping[str, tuple[np.ndarray, np.ndarray]],
                 shapes: Mapping[str, tuple[int, ...]], *, block_size: int,
                 layout: str = "out_in", views: Mapping[str, tuple[int, int]] | None = None):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
        c: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for path, (rows, cols) in coords.items():
            rows = _readonly(np.asarray(rows, np.int32).reshape(-1))
            cols = _readonly(np.asarray(cols, np.int32).reshape(-1))
            if rows.shape != cols.shape:
                raise ValueError(f"{path!r}: rows and cols differ in length "
                                 f"({rows.shape[0]} vs {cols.shape[0]})")
            if rows.shape[0]:
                c[path] = (rows, cols)
        self._coords = MappingProxyType(c)
        self._tiles = TileLayout({p: r.shape[0] for p, (r, _) in c.items()},
                                 {p: shapes[p] for p in c}, block_size=block_size,
                                 layout=layout, views={p: v for p, v in (views or {}).items() if p in c})
        tl = self._tiles
        self._digest = _digest(tl.block_size, layout, tl.shapes, tl._views,
                               lambda p: (c[p][0].tobytes(), c[p][1].tobytes()))

    def __repr__(self):
        return (f"Adapter({len(self._coords)} weights, {self.num_tiles} tiles of "
                f"{self.block_size}x{self.block_size}, {self.num_trainable} trainable, "
                f"layout={self.layout!r})")

    # -- static properties --------------------------------------------------------------
    @property
    def coords(self) -> Mapping[str, tuple[np.ndarray, np.ndarray]]:
        return self._coords

    @property
    def tile_layout(self) -> TileLayout:
        return self._tiles

    @property
    def shapes(self) -> Mapping[str, tuple[int, int]]:
        return self._tiles.shapes

    @property
    def _views(self) -> Mapping[str, tuple[int, int]]:
        return self._tiles._views

    @property
    def block_size(self) -> int:
        return self._tiles.block_size

    @property
    def layout(self) -> str:
        return self._tiles.layout

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(self._coords)

    @property
    def num_tiles(self) -> int:
        return self._tiles.num_tiles

    @property
    def num_trainable(self) -> int:
        return self._tiles.num_trainable

    def out_in_shape(self, path: str) -> tuple[int, int]:
        """``(out, in)`` of the weight at ``path`` whatever the storage layout."""
        return self._tiles.out_in_shape(path)

    # -- gather / scatter (the layout's, at the fixed coordinates) ----------------------
    def tiles(self, params) -> dict[str, jax.Array]:
        """Gather the trainable tiles: ``{path: [nnz, bs, bs]}`` in ``[out, in]`` orientation."""
        return self._tiles.tiles(params, self._coords)

    def set_tiles(self, params, tiles: Mapping[str, Any]):
        """``params`` with the adapted tiles replaced by ``tiles`` (scatter-set); every
        other leaf is returned as the same object."""
        return self._tiles.set_tiles(params, self._coords, tiles)

    def apply_updates(self, params, updates: Mapping[str, Any]):
        """``params`` with ``updates[path]`` ([nnz, bs, bs]) added into the tiles.

        The addition is done in float32 and rounded once to the weight dtype. Every other
        leaf is returned as the same object; under ``jax.jit`` with ``params`` donated the
        scatter updates the weights in place.
        """
        return self._tiles.apply_updates(params, self._coords, updates)

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
        """The model's ``linear_fn(name, x, w, b)`` hook: :meth:`TileLayout.linear_fn` at
        this adapter's coordinates."""
        return self._tiles.linear_fn(self._coords, tiles, backend=backend)

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat ``{key: numpy array}``: ``block_size`` (int64 scalar), ``layout`` (0-d str
        array), and per adapted path ``rows/<path>``, ``cols/<path>`` (int32[nnz]) and
        ``shape/<path>`` (int64[2], stored weight shape)."""
        out: dict[str, np.ndarray] = {
            "block_size": np.asarray(self.block_size, np.int64),
            "layout": np.asarray(self.layout),
        }
        for path, (rows, cols) in self._coords.items():
            out[f"rows/{path}"] = np.array(rows)
            out[f"cols/{path}"] = np.array(cols)
            out[f"shape/{path}"] = np.asarray(self.shapes[path], np.int64)
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
