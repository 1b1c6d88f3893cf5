"""Block pooling of q and k for the gate, in one read of the input (Pallas, Triton lowering).

The gate pools `[B, T, H, D]` over blocks of `block_size` positions (avg, max and min, concatenated on
channels) into `[B, n, H, len(kinds)·D]` float32. XLA runs each kind as its own reduction over the input
(and, with padding or `lengths`, through a masked copy of it): on an H100 pooling k `[1, 32768, 8, 128]`
bf16 by (max, min, avg) read 67 MB in 0.23 ms, 0.3 TB/s, and q `[1, 32768, 32, 128]` by avg 268 MB in
0.22 ms. Here one program loads one `[block_size, heads_tile, D]` tile once and writes every kind of it.

How the work is laid out:

* Grid `(H / heads_tile, n, B)`; the head tiles vary fastest, so neighbouring programs read neighbouring
  memory (a tile's rows are `heads_tile·D` contiguous elements, `H·D` apart).
* A program walks its tile in chunks of `[rows, heads_tile, cols]` elements (powers of 2: Triton's loads
  must have power-of-2 sizes; rows divides block_size, cols divides D), so any block_size and head_dim
  work; at the usual shapes (block 64, D 128) one chunk is the whole tile.
* Valid lengths (`min(T, lengths[b])`, int32 `[B]`) come in as a small input. When some block can be
  partial (T not a multiple of block_size, or `lengths` given) rows at positions >= the valid length are
  *not loaded* (masked load), then filled per kind: 0 for avg, -inf for max, +inf for min. T is never
  padded: the last block's rows past T are masked loads, which touch no memory.
* avg = sum / max(count, 1); a block with no valid token gives 0 for every kind, as the XLA version.

Measured on an H200 (jax 0.11.2, bf16, block 64, median of 5 runs of 100 back-to-back calls), XLA → Pallas:
q `[1, 32768, 32, 128]` avg 0.082 → 0.073 ms (3.7 TB/s), with `lengths` 0.21 → 0.069 ms; k `[1, 32768, 8,
128]` (max, min, avg) 0.076 → 0.030 ms, with `lengths` 0.14 → 0.038 ms; k at 131072 tokens 0.29 → 0.091 ms
(3.0 TB/s). Launch shapes within 10% of the best of 12 tried.

Results equal :func:`pool_blocks_xla` exactly for max and min and to float32 rounding of the summation
order for avg. `block_pool_pallas` has a custom VJP: the backward is the VJP of :func:`pool_blocks_xla`
(the gate pools stop_gradient'ed q and k, so it does not run there; it keeps the function differentiable).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

KINDS = ("max", "min", "avg")
IMPLEMENTATIONS = ("pallas", "pallas_interpret", "xla")

# Elements per program and per load. About 16k elements of a 16-bit input per program (32 KB) keeps the
# loads of 4 warps in flight without spilling: 64 float32 values per thread for 8k-element loads.
_TILE_ELEMENTS = 16384
_LOAD_ELEMENTS = 8192


class BlockPoolError(ValueError):
    """Bad arguments to block pooling."""


def check_pool_args(x, block_size, kinds, lengths=None) -> tuple[str, ...]:
    """Validates the arguments of block pooling; returns kinds as a tuple."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise BlockPoolError(f"block_size must be a positive int, got {block_size!r}")
    if isinstance(kinds, str) or not isinstance(kinds, (tuple, list)):
        raise BlockPoolError(f"kinds must be a tuple of names from {KINDS}, got {kinds!r}")
    kinds = tuple(kinds)
    if not kinds or any(k not in KINDS for k in kinds):
        raise BlockPoolError(f"kinds must be a non-empty tuple of names from {KINDS}, got {kinds!r}")
    if len(x.shape) != 4:
        raise BlockPoolError(f"x must be [B, T, H, D], got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise BlockPoolError(f"x must be a float array, got dtype {x.dtype}")
    if lengths is not None and (
        tuple(lengths.shape) != (x.shape[0],) or not jnp.issubdtype(lengths.dtype, jnp.integer)
    ):
        raise BlockPoolError(
            f"lengths must be an int array of shape ({x.shape[0]},) (the batch of x), got {lengths.dtype}"
            f"{list(lengths.shape)}"
        )
    return kinds


# --------------------------------------------------------------------------------------------------
# Reference (XLA)
# --------------------------------------------------------------------------------------------------


def pool_blocks_xla(x_bthd: jax.Array, block_size: int, kinds: tuple[str, ...], lengths=None) -> jax.Array:
    """Pools `[B, T, H, D]` over blocks of the sequence → `[B, n, H, len(kinds)·D]` (float32), in jnp.

    The last partial block (and blocks cut by `lengths`) pool over their valid tokens only; blocks
    with no valid token give zeros. The specification of the kernel, and its backward.
    """
    b, t, h, d = x_bthd.shape
    n = -(-t // block_size)
    pad = n * block_size - t
    # Pool in the input dtype with float32 accumulation: converting q (268 MB in bf16 at 32k tokens for
    # Llama-3-8B) to float32 first would write and read twice that per layer.
    x = x_bthd if pad == 0 else jnp.pad(x_bthd, ((0, 0), (0, pad), (0, 0), (0, 0)))
    x = x.reshape(b, n, block_size, h, d)
    valid, count = None, block_size  # every block full: no masking needed
    if lengths is not None or pad:
        limit = jnp.full((b,), t, jnp.int32) if lengths is None else jnp.minimum(lengths.astype(jnp.int32), t)
        pos = jnp.arange(n * block_size).reshape(n, block_size)
        valid = (pos[None] < limit[:, None, None])[..., None, None]  # [B, n, bs, 1, 1]
        count = jnp.sum(valid, axis=2)  # [B, n, 1, 1]
    fill = {"avg": 0, "max": -jnp.inf, "min": jnp.inf}
    outs = []
    for kind in kinds:
        src = x if valid is None else jnp.where(valid, x, fill[kind])
        if kind == "avg":
            pooled = jnp.sum(src, axis=2, dtype=jnp.float32) / jnp.maximum(count, 1)
        else:
            pooled = (jnp.max if kind == "max" else jnp.min)(src, axis=2).astype(jnp.float32)
        outs.append(pooled if valid is None else jnp.where(count > 0, pooled, 0.0))
    return jnp.concatenate(outs, axis=-1)


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------


def _pow2_divisor(n: int) -> int:
    """The largest power of 2 that divides n (n >= 1)."""
    return n & -n


def _floor_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def default_tiles(block_size: int, heads: int, head_dim: int) -> tuple[int, int, int]:
    """(heads_tile, rows, cols): heads per program and the `[rows, heads_tile, cols]` chunk it loads at once.

    All powers of 2; heads_tile divides H, rows divides block_size, cols divides D. A program holds about
    `_TILE_ELEMENTS` elements (at least one head's block), a load at most `_LOAD_ELEMENTS`.
    """
    cols = min(_pow2_divisor(head_dim), _LOAD_ELEMENTS)
    heads_tile = min(_pow2_divisor(heads), _floor_pow2(_TILE_ELEMENTS // (block_size * head_dim)))
    heads_tile = max(1, min(heads_tile, _floor_pow2(_LOAD_ELEMENTS // cols)))
    rows = max(1, min(_pow2_divisor(block_size), _floor_pow2(_LOAD_ELEMENTS // (heads_tile * cols))))
    return heads_tile, rows, cols


def _combine(kind, acc, part):
    if acc is None:
        return part
    if kind == "avg":
        return acc + part
    return jnp.maximum(acc, part) if kind == "max" else jnp.minimum(acc, part)


def _kernel(limit_ref, x_ref, o_ref, *, block_size: int, kinds, rows: int, cols: int, masked: bool):
    """One `[block_size, heads_tile, D]` tile of x → `[heads_tile, len(kinds)·D]` pooled values."""
    _, heads_tile, d = x_ref.shape
    if masked:
        start = pl.program_id(1) * block_size
        limit = limit_ref[...]
        count = jnp.clip(limit - start, 0, block_size)
    for c0 in range(0, d, cols):
        acc = dict.fromkeys(kinds)
        for r0 in range(0, block_size, rows):
            view = x_ref.at[pl.ds(r0, rows), :, pl.ds(c0, cols)]
            if masked:
                pos = start + r0 + lax.broadcasted_iota(jnp.int32, (rows, heads_tile, cols), 0)
                valid = pos < limit
                x = pl_triton.load(view, mask=valid, other=0).astype(jnp.float32)
            else:
                x = view[...].astype(jnp.float32)
            for kind in acc:
                if kind == "avg":
                    part = jnp.sum(x, axis=0)
                elif kind == "max":
                    part = jnp.max(jnp.where(valid, x, -jnp.inf) if masked else x, axis=0)
                else:
                    part = jnp.min(jnp.where(valid, x, jnp.inf) if masked else x, axis=0)
                acc[kind] = _combine(kind, acc[kind], part)
        for k, kind in enumerate(kinds):
            v = acc[kind]
            if kind == "avg":
                v = v / (jnp.maximum(count, 1).astype(jnp.float32) if masked else jnp.float32(block_size))
            if masked:
                v = jnp.where(count > 0, v, 0.0)
            o_ref[:, pl.ds(k * d + c0, cols)] = v


def _pallas_forward(x, limit, block_size: int, kinds, masked: bool, interpret: bool, tiles=None, num_warps=None):
    b, t, h, d = x.shape
    n = -(-t // block_size)
    heads_tile, rows, cols = default_tiles(block_size, h, d) if tiles is None else tiles
    if num_warps is None:
        num_warps = 4 if rows * heads_tile * cols <= 8192 else 8
    kernel = functools.partial(_kernel, block_size=block_size, kinds=kinds, rows=rows, cols=cols, masked=masked)
    return pl.pallas_call(
        kernel,
        grid=(h // heads_tile, n, b),
        in_specs=[
            pl.BlockSpec((None,), lambda c, i, bb: (bb,)),
            pl.BlockSpec((None, block_size, heads_tile, d), lambda c, i, bb: (bb, i, c, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, heads_tile, len(kinds) * d), lambda c, i, bb: (bb, i, c, 0)),
        out_shape=jax.ShapeDtypeStruct((b, n, h, len(kinds) * d), jnp.float32),
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="seerjax_block_pool",
    )(limit, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _pool(x, limit, block_size, kinds, masked, interpret, tiles, num_warps):
    return _pallas_forward(x, limit, block_size, kinds, masked, interpret, tiles, num_warps)


def _pool_fwd(x, limit, block_size, kinds, masked, interpret, tiles, num_warps):
    return _pallas_forward(x, limit, block_size, kinds, masked, interpret, tiles, num_warps), (x, limit)


def _pool_bwd(block_size, kinds, masked, interpret, tiles, num_warps, res, g):
    x, limit = res
    _, vjp = jax.vjp(lambda x_: pool_blocks_xla(x_, block_size, kinds, limit if masked else None), x)
    return vjp(g)[0], None


_pool.defvjp(_pool_fwd, _pool_bwd)


@functools.partial(jax.jit, static_argnames=("block_size", "kinds", "interpret", "tiles", "num_warps"))
def _block_pool_jit(x, lengths, *, block_size, kinds, interpret, tiles, num_warps):
    b, t = x.shape[:2]
    masked = lengths is not None or t % block_size != 0
    limit = jnp.full((b,), t, jnp.int32)
    if lengths is not None:
        limit = jnp.minimum(lengths.astype(jnp.int32), t)
    return _pool(x, limit, block_size, kinds, masked, interpret, tiles, num_warps)


def block_pool_pallas(x, block_size: int, kinds, lengths=None, *, interpret: bool = False, tiles=None, num_warps=None):
    """Pallas block pooling: `[B, T, H, D]` (float) → `[B, n, H, len(kinds)·D]` float32, n = ceil(T / block_size).

    Same results as :func:`pool_blocks_xla` (avg to float32 rounding). `tiles` `(heads_tile, rows, cols)` and
    `num_warps` override the launch shape (for tuning; powers of 2 dividing H, block_size and D).
    """
    kinds = check_pool_args(x, block_size, kinds, lengths)
    if tiles is not None:
        tiles = tuple(int(v) for v in tiles)
        ht, rows, cols = tiles
        h, d = x.shape[2], x.shape[3]
        for name, v, whole in (("heads_tile", ht, h), ("rows", rows, block_size), ("cols", cols, d)):
            if v < 1 or v & (v - 1) or whole % v:
                raise BlockPoolError(f"tiles: {name} must be a power of 2 dividing {whole}, got {v}")
    return _block_pool_jit(x, lengths, block_size=block_size, kinds=kinds, interpret=interpret, tiles=tiles,
                           num_warps=num_warps)


def pool_blocks_kernel(x, block_size: int, kinds, lengths=None, implementation: str | None = None):
    """Block pooling for the gate (see :func:`pool_blocks_xla` for the semantics).

    implementation: None (the Pallas kernel on GPU, XLA elsewhere), "pallas", "pallas_interpret" or "xla".
    """
    kinds = check_pool_args(x, block_size, kinds, lengths)
    if implementation is None:
        implementation = "pallas" if jax.default_backend() == "gpu" else "xla"
    if implementation == "pallas":
        return block_pool_pallas(x, block_size, kinds, lengths)
    if implementation == "pallas_interpret":
        return block_pool_pallas(x, block_size, kinds, lengths, interpret=True)
    if implementation == "xla":
        return pool_blocks_xla(x, block_size, kinds, lengths)
    raise BlockPoolError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")
