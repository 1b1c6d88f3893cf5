"""Pallas (Triton lowering) flash attention that also emits the block max-pooled probability map.

Contract: `attention_with_pooling_reference` in reference.py (DESIGN.md, Contracts).

Design. The max of the probabilities `exp(s[t, u] - lse[t])` over the keys u of a block only
needs the row's max logit in that block: `max_u exp(s[t, u] - lse[t]) = exp(max_u s[t, u] -
lse[t])`. One program per (query head, batch, tile of `block_q` query rows) runs a flash
attention loop over the visible key tiles of `block_k` rows (online softmax, base 2 with log2(e)
folded into the scale): out, m, l, hence the exact lse of every row. Each step already has every
row's max logit in its key tile; the lse is only known after the loop. Two ways to combine them:

  one-pass (`passes=1`): each step stores the rows' max logits (a contiguous [block_q] float32
    store) into a rowmax buffer `[B, Hq, S / block_k, T]`; after the kernel, plain jnp (one XLA
    reduction) takes `exp2(rowmax - lse)`, masks the (row, key tile) pairs with no visible key,
    and max-reduces over the rows of each pooling block. Costs the buffer (2 GiB at 32k for 32
    heads; query heads run in chunks of whole GQA groups when it is over ROWMAX_BUDGET_BYTES) and
    its write and read, no extra matmul.
  two-pass (`passes=2`): a second loop over the same key tiles recomputes `q kᵀ`, takes each
    row's max logit, `exp2(rowmax - lse)` (one exp per row, not per element), the max over the
    rows of each pooling block in the tile, and stores those scalars into the pooled map. Costs
    one extra `q kᵀ` matmul per visible tile, no buffer. Rows that must not count (padding of T,
    rows >= lengths[b]) get lse = +inf there, so they contribute exp2(-inf) = 0. Key tiles no
    row can see are never visited: the pooled row beyond them is zero-filled with wide masked
    stores, so every output element is written exactly once.

`passes=None` takes the one-pass path whenever one GQA group's buffer fits the budget. Rows that
do not count get zero output and lse = -inf.

Each loop is split into the key tiles every row of the program sees entirely (no mask) and the
few boundary tiles (causal diagonal, the tile holding min(S, lengths[b])) that are masked.

Tiles (`Tiling`, `default_tiling`). block_k divides the pooling block, so a key tile never
straddles two pooled columns; it is the block itself unless a K tile would pass 32 KiB (float32
with block * D > 8192, or D = 256 at block 128). block_q may hold several pooling blocks (128
query rows for 16-bit inputs with 64-row blocks, FlashAttention-2's forward tile: half the K/V
traffic and larger MMAs than 64 rows); each two-pass program then writes one pooled row per
block. When block_q or block_k is smaller than the block, the two-pass kernel writes a finer map
and the wrapper max-reduces it (exact: a max of maxes); the one-pass epilogue pools rows by
block whatever block_q is, and max-reduces the block's key tiles.

GQA: the K/V BlockSpec maps query head h to kv head h // G; K/V are never repeated. The grid is
(Hq, B, query tiles) with the head axis fastest and the query-tile axis slowest and reversed:
the programs with the longest causal rows start first, and the G heads of a group run side by
side on the same K/V tiles, so K/V reuse comes from L2. (One program per group would need G
times the accumulator registers of a G * block_q-row tile.)

T and S are padded with zeros outside the kernel to whole tiles (only when they are not already)
and masked inside; outputs are sliced back.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from seerjax.kernels.checks import AttentionShape, KernelInputError

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
# Finite, so a fully masked row gives exp2(mask - mask) = 1 (discarded later) instead of NaN.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# Widest zero-fill store for the invisible tail of a pooled row.
_MAX_FILL = 128
# Bytes of one K (or V) tile; above this the key tile is halved so pipelined K/V stages fit in
# shared memory (float32 with block * D > 8192; 16-bit with D = 256 at block 128).
_MAX_TILE_BYTES = 32 * 1024
# Largest rowmax buffer (float32 [B, Hq, S / block_k, T]) the one-pass path may allocate at once:
# 2 GiB for the Llama-3-8B shape at 32k, so 32k runs in one call; at 128k (32 GiB) the query heads
# go through in chunks (8 chunks of one GQA group of 4 heads).
ROWMAX_BUDGET_BYTES = 4 * 2**30
# The Triton lowering addresses an array with int32 element offsets, so one call's rowmax buffer
# must stay below 2**31 elements whatever the budget.
_MAX_ROWMAX_ELEMENTS = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Launch configuration of the kernel (tuning knob; `default_tiling` picks one).

    block_q: query rows per program, a power of 2 in [16, 256]; a multiple of block_size (each
      program then pools block_q // block_size query blocks) or a divisor of it (the wrapper
      max-reduces the finer map).
    block_k: key rows per inner step, a power of 2 >= 16 dividing block_size.
    num_warps, num_stages: Triton launch parameters.
    """

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


def default_tiling(shape: AttentionShape, dtype) -> Tiling:
    """Key tile = the pooling block (halved while one K tile is over 32 KiB). Query tile = 128
    rows for 16-bit inputs with 64-row key tiles (FlashAttention-2's 128 x 64 forward tile) when
    that needs no more padding of T than the block does; else the key tile."""
    itemsize = jnp.dtype(dtype).itemsize
    block_k = shape.block_size
    while block_k > 16 and block_k * shape.head_dim * itemsize > _MAX_TILE_BYTES:
        block_k //= 2
    block_q = block_k
    t_pad = -(-shape.q_len // shape.block_size) * shape.block_size
    if itemsize <= 2 and shape.head_dim <= 128 and block_k >= 64 and t_pad % 128 == 0:
        block_q = max(block_k, 128)
    num_warps = 8 if block_q * shape.head_dim >= 128 * 128 else 4
    num_stages = 3 if 2 * block_k * shape.head_dim * itemsize <= 32 * 1024 else 2
    if itemsize <= 2 and (block_q, block_k, shape.head_dim) == (128, 64, 128):
        # measured on an H100 at 32k (eval/tune_kernels.py pooled --rounds 5): 4 warps and 2 stages beat 8 and 3
        # in every one of 5 interleaved rounds, median 1.29x against 1.45x the time of cuDNN dense
        num_warps, num_stages = 4, 2
    tiling = Tiling(block_q, block_k, num_warps, num_stages)
    while tiling.num_stages > 1 and shared_memory_bytes(tiling, shape.head_dim, dtype) > gpu_shared_memory_limit():
        tiling = dataclasses.replace(tiling, num_stages=tiling.num_stages - 1)
    return tiling


def _check_tiling(tiling: Tiling, shape: AttentionShape) -> None:
    def pow2(x, lo, hi):
        return isinstance(x, int) and lo <= x <= hi and x & (x - 1) == 0

    bs = shape.block_size
    ok = (
        pow2(tiling.block_q, 16, 256)
        and pow2(tiling.block_k, 16, bs)
        and pow2(tiling.num_warps, 1, 16)
        and isinstance(tiling.num_stages, int)
        and tiling.num_stages >= 1
    )
    if not ok:
        raise KernelInputError(
            f"tiling must have power-of-2 block_q in [16, 256], block_k in [16, block_size={bs}], "
            f"num_warps in [1, 16] and num_stages >= 1; got {tiling}"
        )


def shared_memory_bytes(tiling: Tiling, head_dim: int, dtype) -> int:
    """What Triton's software pipeline holds in shared memory for the kernel: `num_stages` buffers of
    one K and one V tile (the H100 measured 262,656 bytes requested for 128 x 128 float32 tiles, D 128,
    2 stages: these 262,144 and a little)."""
    return tiling.num_stages * 2 * tiling.block_k * head_dim * jnp.dtype(dtype).itemsize


def gpu_shared_memory_limit() -> int:
    """Shared memory per block on this GPU, by compute capability (opt-in maximum)."""
    try:
        cc = str(getattr(jax.devices()[0], "compute_capability", "9.0"))
    except RuntimeError:
        cc = "9.0"
    major, minor = (int(x) for x in (cc.split(".") + ["0"])[:2])
    if major >= 9:
        return 232448  # 227 KiB: H100 / H200
    if (major, minor) in ((8, 0), (8, 7)):
        return 166912  # 163 KiB: A100
    return 101376  # 99 KiB: other Ampere / Ada


def _check_shared_memory(tiling: Tiling, shape: AttentionShape, dtype) -> None:
    need, limit = shared_memory_bytes(tiling, shape.head_dim, dtype), gpu_shared_memory_limit()
    if need > limit:
        raise KernelInputError(
            f"tiling {tiling} needs about {need:,} bytes of shared memory for head_dim={shape.head_dim} "
            f"{jnp.dtype(dtype).name} inputs (num_stages x K and V tiles), more than this GPU's {limit:,}: "
            "use a smaller block_k or fewer num_stages"
        )


def _dot_qk(q, k):
    """`q @ kᵀ` in float32; HIGHEST keeps float32 inputs off TF32 on GPU."""
    return lax.dot_general(
        q, k, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )


def _dot_pv(p, v):
    return lax.dot_general(
        p, v, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )


def _pooling_kernel(
    *refs,
    shape: AttentionShape,
    block_q: int,
    block_k: int,
    group_rows: int,
    num_q_tiles: int,
    pooled_width: int,
    fill: int,
    has_lengths: bool,
    masks_rows: bool,
    num_aliased: int,
    one_pass: bool,
):
    """One query tile. refs: q [block_q, D]; k, v [S_pad, D]; (length []); (aliased outputs);
    out [block_q, D]; lse2 [block_q] (base 2, -inf for rows that do not count); then
    two-pass: pooled [groups, pooled_width]: one row per `group_rows` query rows, one column per
    key tile, zero padded to a multiple of `fill`;
    one-pass: rowmax [num_k_tiles, block_q]: column j of row r is the max base-2 scaled logit of
    row r over the visible keys of key tile j (the mask value if none), written only for the
    visited tiles."""
    q_ref, k_ref, v_ref, *refs = refs
    length_ref = refs.pop(0) if has_lengths else None
    out_ref, lse_ref, map_ref = refs[num_aliased:]
    groups = block_q // group_rows

    i = num_q_tiles - 1 - pl.program_id(2)  # longest causal rows first
    first_row = i * block_q
    scale2 = shape.sm_scale * _LOG2E
    causal_offset = shape.kv_len - shape.q_len  # a multiple of block_size when causal

    if has_lengths:
        length = length_ref[...].astype(jnp.int32)
        kv_limit = jnp.clip(length, 0, shape.kv_len)
        q_limit = jnp.clip(length, 0, shape.q_len)
        num_kv = lax.div(kv_limit + (block_k - 1), block_k)
        num_kv_full = lax.div(kv_limit, block_k)
    else:
        kv_limit, q_limit = shape.kv_len, shape.q_len
        num_kv, num_kv_full = -(-kv_limit // block_k), kv_limit // block_k
    if shape.causal:
        # Key tile j is seen by the last row iff j * block_k <= last_row + offset, by every row
        # iff (j + 1) * block_k - 1 <= first_row + offset.
        n_end = jnp.minimum(lax.div(first_row + (block_q - 1 + causal_offset), block_k) + 1, num_kv)
        n_full = jnp.minimum(lax.div(first_row + (causal_offset + 1), block_k), num_kv_full)
    else:
        n_end, n_full = jnp.int32(num_kv), jnp.int32(num_kv_full)
    if masks_rows:  # a tile made only of padding rows visits nothing
        n_end = jnp.where(first_row < q_limit, n_end, 0)
    n_end = n_end.astype(jnp.int32)
    n_full = jnp.minimum(n_full, n_end).astype(jnp.int32)

    rows = first_row + jnp.arange(block_q, dtype=jnp.int32)  # query positions of this tile
    mask_kv_limit = has_lengths or shape.kv_len % block_k != 0

    def visible(j):
        """[block_q, block_k] visibility of key tile j (only called for boundary tiles)."""
        cols = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
        vis = jnp.ones((block_q, block_k), jnp.bool_)
        if shape.causal:
            vis = cols[None, :] <= rows[:, None] + causal_offset
        if mask_kv_limit:
            vis = vis & (cols[None, :] < kv_limit)
        return vis

    def kv_tile(ref, j):
        return ref[pl.ds(pl.multiple_of(j * block_k, block_k), block_k), :]

    q = q_ref[...]

    # Loop 1: flash attention. m, l in the base-2 domain of the scaled logits.
    def flash_step(j, carry, masked):
        acc, m, l = carry
        qk = _dot_qk(q, kv_tile(k_ref, j))
        if masked:
            s = jnp.where(visible(j), qk * scale2, _MASK_VALUE)
            row_max = jnp.max(s, axis=1)
            m_new = jnp.maximum(m, row_max)
            p = jnp.exp2(s - m_new[:, None])
        else:  # scale > 0 commutes with max; qk * scale2 - m fuses into one FMA
            row_max = jnp.max(qk, axis=1) * scale2
            m_new = jnp.maximum(m, row_max)
            p = jnp.exp2(qk * scale2 - m_new[:, None])
        if one_pass:  # one contiguous [block_q] store per key tile
            map_ref[j, :] = row_max
        alpha = jnp.exp2(m - m_new)
        l = l * alpha + jnp.sum(p, axis=1)
        v = kv_tile(v_ref, j)
        acc = acc * alpha[:, None] + _dot_pv(p.astype(v.dtype), v)
        return acc, m_new, l

    carry = (
        jnp.zeros((block_q, shape.head_dim), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    carry = lax.fori_loop(jnp.int32(0), n_full, functools.partial(flash_step, masked=False), carry)
    acc, m, l = lax.fori_loop(n_full, n_end, functools.partial(flash_step, masked=True), carry)

    l_safe = jnp.where(l > 0, l, 1.0)  # l == 0 only for rows of a tile that visited nothing
    lse2 = m + jnp.log2(l_safe)
    out = acc * (1.0 / l_safe)[:, None]
    pool_lse2 = lse2
    if masks_rows:
        row_valid = rows < q_limit
        out = jnp.where(row_valid[:, None], out, 0.0)
        lse_ref[...] = jnp.where(row_valid, lse2, -jnp.inf)
        pool_lse2 = jnp.where(row_valid, lse2, jnp.inf)  # exp2(x - inf) = 0: row does not count
    else:
        lse_ref[...] = lse2
    out_ref[...] = out.astype(out_ref.dtype)
    if one_pass:
        return
    pooled_ref = map_ref

    # Loop 2: pooled[g, j] = max over the rows of group g of exp2(rowmax_j - lse).
    local = jnp.arange(block_q, dtype=jnp.int32)
    in_group = [(local >= g * group_rows) & (local < (g + 1) * group_rows) for g in range(groups)]

    def pool_step(j, carry, masked):
        qk = _dot_qk(q, kv_tile(k_ref, j))
        if masked:
            row_max = jnp.max(jnp.where(visible(j), qk * scale2, _MASK_VALUE), axis=1)
        else:
            row_max = jnp.max(qk, axis=1) * scale2
        prob = jnp.exp2(row_max - pool_lse2)
        if groups == 1:
            pooled_ref[0, j] = jnp.max(prob)
        else:
            for g in range(groups):
                pooled_ref[g, j] = jnp.max(jnp.where(in_group[g], prob, 0.0))
        return carry

    lax.fori_loop(jnp.int32(0), n_full, functools.partial(pool_step, masked=False), None)
    lax.fori_loop(n_full, n_end, functools.partial(pool_step, masked=True), None)

    # Zero the key tiles never visited, in aligned chunks of `fill` (disjoint from the above).
    def fill_step(c, carry):
        idx = c * fill + jnp.arange(fill, dtype=jnp.int32)
        chunk = pooled_ref.at[:, pl.ds(pl.multiple_of(c * fill, fill), fill)]
        unvisited = jnp.broadcast_to((idx >= n_end)[None, :], (groups, fill))
        plgpu.store(chunk, jnp.zeros((groups, fill), pooled_ref.dtype), mask=unvisited)
        return carry

    lax.fori_loop(lax.div(n_end, fill), jnp.int32(pooled_width // fill), fill_step, None)


def _pad_seq(x, length: int):
    """Zero-pads axis 1 of `[B, L, H, D]` to `length`, only if needed."""
    if x.shape[1] == length:
        return x
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def _padded_rows(shape: AttentionShape, tiling: Tiling) -> int:
    """T padded to whole query tiles and whole pooling blocks."""
    step = max(tiling.block_q, shape.block_size)
    return -(-shape.q_len // step) * step


def rowmax_bytes(shape: AttentionShape, tiling: Tiling, q_heads: int | None = None) -> int:
    """Bytes of the one-pass kernel's float32 rowmax buffer for `q_heads` query heads (default all)."""
    heads = shape.q_heads if q_heads is None else q_heads
    num_k_tiles = shape.nk * shape.block_size // tiling.block_k
    return 4 * shape.batch * heads * _padded_rows(shape, tiling) * num_k_tiles


def heads_per_chunk(shape: AttentionShape, tiling: Tiling, budget: int) -> int | None:
    """Most query heads per one-pass call whose rowmax buffer fits in `budget` bytes (and in
    int32 offsets): a whole number of GQA groups dividing Hq; None when one group does not fit."""
    g, hkv = shape.group, shape.kv_heads
    limit = min(budget, 4 * _MAX_ROWMAX_ELEMENTS)
    fits = [g * m for m in range(1, hkv + 1) if hkv % m == 0 and rowmax_bytes(shape, tiling, g * m) <= limit]
    return max(fits) if fits else None


def _kernel_call(
    q, k, v, lengths, *, shape: AttentionShape, tiling: Tiling, interpret: bool, poison_outputs: bool, one_pass: bool
):
    """The pallas_call on padded inputs. Returns out `[B, T_pad, Hq, D]`, lse2 float32
    `[B, Hq, T_pad]` (base 2, -inf for rows that do not count) and the kernel's map: two-pass,
    pooled float32 `[B, Hq, T_pad / group_rows, pooled_width]`; one-pass, rowmax float32
    `[B, Hq, num_k_tiles, T_pad]` (key tile before row, so each per-tile store of a query tile's
    rows is contiguous)."""
    b, hq, d, group, bs = shape.batch, shape.q_heads, shape.head_dim, shape.group, shape.block_size
    block_q, block_k = tiling.block_q, tiling.block_k
    group_rows = min(block_q, bs)  # query rows pooled into one row of the two-pass map
    t_pad = _padded_rows(shape, tiling)
    s_pad = shape.nk * bs
    num_q_tiles, num_k_tiles = t_pad // block_q, s_pad // block_k
    fill = min(_MAX_FILL, pl.next_power_of_2(num_k_tiles))
    pooled_width = -(-num_k_tiles // fill) * fill

    def q_tile(ii):
        return num_q_tiles - 1 - ii

    q_spec = pl.BlockSpec((None, block_q, None, d), lambda h, bi, ii: (bi, q_tile(ii), h, 0))
    kv_spec = pl.BlockSpec((None, s_pad, None, d), lambda h, bi, ii: (bi, 0, h // group, 0))
    if one_pass:
        map_spec = pl.BlockSpec((None, None, num_k_tiles, block_q), lambda h, bi, ii: (bi, h, 0, q_tile(ii)))
        map_shape = (b, hq, num_k_tiles, t_pad)
    else:
        map_spec = pl.BlockSpec(
            (None, None, block_q // group_rows, pooled_width), lambda h, bi, ii: (bi, h, q_tile(ii), 0)
        )
        map_shape = (b, hq, t_pad // group_rows, pooled_width)
    out_specs = [q_spec, pl.BlockSpec((None, None, block_q), lambda h, bi, ii: (bi, h, q_tile(ii))), map_spec]
    out_shapes = [
        jax.ShapeDtypeStruct((b, t_pad, hq, d), q.dtype),
        jax.ShapeDtypeStruct((b, hq, t_pad), jnp.float32),
        jax.ShapeDtypeStruct(map_shape, jnp.float32),
    ]
    args = [_pad_seq(q, t_pad), _pad_seq(k, s_pad), _pad_seq(v, s_pad)]
    in_specs = [q_spec, kv_spec, kv_spec]
    if lengths is not None:
        args.append(lengths.astype(jnp.int32))
        in_specs.append(pl.BlockSpec((None,), lambda h, bi, ii: (bi,)))
    aliases = {}
    if poison_outputs:  # test hook: outputs start as NaN, so an unwritten element shows
        aliases = {len(args) + n: n for n in range(len(out_shapes))}
        args += [jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shapes]
        in_specs += out_specs

    kernel = functools.partial(
        _pooling_kernel,
        shape=shape,
        block_q=block_q,
        block_k=block_k,
        group_rows=group_rows,
        num_q_tiles=num_q_tiles,
        pooled_width=pooled_width,
        fill=fill,
        has_lengths=lengths is not None,
        masks_rows=lengths is not None or t_pad != shape.q_len,
        num_aliased=len(aliases),
        one_pass=one_pass,
    )
    return pl.pallas_call(
        kernel,
        grid=(hq, b, num_q_tiles),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shapes,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name="seerjax_attention_with_pooling" + ("_one_pass" if one_pass else ""),
    )(*args)


def _pool_rowmax(rowmax, lse2, lengths, shape: AttentionShape, tiling: Tiling, bands: int = 8):
    """One-pass epilogue (plain jnp; XLA fuses each band into one reduction over its part of the rowmax buffer):
    `pooled[b,h,i,j] = max` over the rows r of query block i that see a key of block j of
    `exp2(rowmax[b,h,j',r] - lse2[b,h,r])`, j' the key tiles of block j; 0 if no row does.
    Rows and tiles outside that set are masked here, so what the kernel left unwritten there
    (tiles it never visited, padding rows) never counts. Returns float32 `[B, Hq, nq, nk]`.

    Causal: the key blocks go in `bands` bands, and a band reads only the query blocks from the first one that
    sees its first key block (the rest of its pooled rows are 0): ~56% of the buffer with 8 bands, not all of it."""
    b, h, _, t_pad = rowmax.shape
    bs, block_k = shape.block_size, tiling.block_k
    ratio, nqb = bs // block_k, t_pad // bs
    offset = shape.kv_len - shape.q_len
    q_limit, kv_limit = shape.q_len, shape.kv_len
    if lengths is not None:
        length = lengths.astype(jnp.int32)[:, None, None, None]
        q_limit, kv_limit = jnp.clip(length, 0, q_limit), jnp.clip(length, 0, kv_limit)

    def band(j0, j1, r0):  # pooled `[B, Hq, j1 - j0, nqb - r0]` of key blocks [j0, j1) and query blocks [r0, nqb)
        rm = rowmax[:, :, j0 * ratio: j1 * ratio, r0 * bs:]
        rows = jnp.arange(r0 * bs, t_pad, dtype=jnp.int32)[None, None, None, :]
        first_key = (jnp.arange(j0 * ratio, j1 * ratio, dtype=jnp.int32) * block_k)[None, None, :, None]
        sees = (rows < q_limit) & (first_key < kv_limit)
        if shape.causal:
            sees = sees & (first_key <= rows + offset)
        prob = jnp.where(sees, jnp.exp2(rm - lse2[:, :, None, r0 * bs:]), 0.0)
        return prob.reshape(b, h, j1 - j0, ratio, nqb - r0, bs).max(axis=(3, 5))

    nk = shape.nk
    if not shape.causal or bands <= 1:
        pooled = band(0, nk, 0)
    else:
        per = -(-nk // bands)
        parts = []
        for j0 in range(0, nk, per):
            # the first query block with a row r that sees key block j0: j0·bs <= r + offset (< nqb, as every key
            # block before nk is seen by the last row: (nk - 1)·bs - offset < T)
            r0 = max(0, j0 * bs - offset) // bs
            parts.append(jnp.pad(band(j0, min(nk, j0 + per), r0), ((0, 0), (0, 0), (0, 0), (r0, 0))))
        pooled = jnp.concatenate(parts, axis=2)
    return jnp.swapaxes(pooled, 2, 3)[:, :, : shape.nq]


def _forward_two_pass(q, k, v, lengths, *, shape: AttentionShape, tiling: Tiling, **kwargs):
    out, lse2, pooled = _kernel_call(q, k, v, lengths, shape=shape, tiling=tiling, one_pass=False, **kwargs)
    b, hq, bs = shape.batch, shape.q_heads, shape.block_size
    t_pad = out.shape[1]
    group_rows = min(tiling.block_q, bs)
    num_k_tiles = shape.nk * bs // tiling.block_k
    if pooled.shape[-1] != num_k_tiles:
        pooled = pooled[..., :num_k_tiles]
    row_ratio, col_ratio = bs // group_rows, bs // tiling.block_k
    if row_ratio > 1 or col_ratio > 1:  # finer tiles than the pooling block: max of maxes
        pooled = pooled.reshape(b, hq, t_pad // bs, row_ratio, shape.nk, col_ratio).max(axis=(3, 5))
    return out, pooled[:, :, : shape.nq], lse2


def _forward_one_pass(q, k, v, lengths, *, shape: AttentionShape, tiling: Tiling, **kwargs):
    out, lse2, rowmax = _kernel_call(q, k, v, lengths, shape=shape, tiling=tiling, one_pass=True, **kwargs)
    return out, _pool_rowmax(rowmax, lse2, lengths, shape, tiling), lse2


def _forward_chunked(q, k, v, lengths, *, shape: AttentionShape, chunk: int, **kwargs):
    """One-pass over query heads in chunks of `chunk` (whole GQA groups), one after the other
    (`lax.map`), so only one chunk's rowmax buffer is alive at a time."""
    b, _, hq, d = q.shape
    n, kv_chunk = hq // chunk, chunk // shape.group
    sub = dataclasses.replace(shape, q_heads=chunk, kv_heads=kv_chunk)

    def split(x, c):  # [B, L, n * c, D] -> [n, B, L, c, D]
        return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1], n, c, d), 2, 0)

    def one(qkv):
        return _forward_one_pass(*qkv, lengths, shape=sub, **kwargs)

    out, pooled, lse2 = lax.map(one, (split(q, chunk), split(k, kv_chunk), split(v, kv_chunk)))
    out = jnp.moveaxis(out, 0, 2).reshape(b, out.shape[2], hq, d)
    pooled = jnp.moveaxis(pooled, 0, 1).reshape(b, hq, *pooled.shape[3:])
    lse2 = jnp.moveaxis(lse2, 0, 1).reshape(b, hq, lse2.shape[-1])
    return out, pooled, lse2


@functools.partial(jax.jit, static_argnames=("shape", "tiling", "interpret", "poison_outputs", "chunk"))
def _forward(q, k, v, lengths, *, shape: AttentionShape, tiling: Tiling, interpret: bool, poison_outputs: bool, chunk):
    """chunk: None for the two-pass kernel, else query heads per one-pass call. Returns out
    `[B,T,Hq,D]`, pooled float32 `[B,Hq,nq,nk]`, lse float32 `[B,Hq,T]`."""
    kwargs = {"tiling": tiling, "interpret": interpret, "poison_outputs": poison_outputs}
    if chunk is None:
        out, pooled, lse2 = _forward_two_pass(q, k, v, lengths, shape=shape, **kwargs)
    elif chunk == shape.q_heads:
        out, pooled, lse2 = _forward_one_pass(q, k, v, lengths, shape=shape, **kwargs)
    else:
        out, pooled, lse2 = _forward_chunked(q, k, v, lengths, shape=shape, chunk=chunk, **kwargs)
    return out[:, : shape.q_len], pooled, lse2[:, :, : shape.q_len] * _LN2


def attention_with_pooling_pallas(
    q,
    k,
    v,
    shape: AttentionShape,
    *,
    lengths=None,
    return_lse=False,
    interpret: bool,
    tiling: Tiling | None = None,
    passes: int | None = None,
    rowmax_budget: int = ROWMAX_BUDGET_BYTES,
    poison_outputs: bool = False,
):
    """Attention plus the block max-pooled probability map, as one Pallas Triton kernel.

    Args:
      q: `[B, T, Hq, D]`; k, v: `[B, S, Hkv, D]`, validated into `shape` by `check_attention_inputs`.
      lengths: optional int `[B]` right-padding lengths (T == S).
      return_lse: also return the float32 natural-log lse `[B, Hq, T]` (-inf for empty rows).
      interpret: run the kernel in Pallas interpret mode (CPU) instead of compiling it.
      tiling: launch configuration; default `default_tiling(shape, q.dtype)`.
      passes: 1 (one `q kᵀ` pass plus a rowmax buffer), 2 (two passes, no buffer) or None: 1 when
        one GQA group's rowmax buffer fits in `rowmax_budget`, else 2.
      rowmax_budget: bytes the one-pass rowmax buffer may take; above it, query heads run in
        chunks of whole GQA groups (with `passes=1`, one group per chunk even if that is over,
        as long as it has under 2**31 elements).
      poison_outputs: test hook; outputs start as NaN so an element the kernel skips shows.

    Returns:
      `(out, pooled)` or `(out, pooled, lse)`: out `[B, T, Hq, D]` in q's dtype, pooled float32
      `[B, Hq, nq, nk]`.
    """
    if tiling is None:
        tiling = default_tiling(shape, q.dtype)
    _check_tiling(tiling, shape)
    if not interpret:
        _check_shared_memory(tiling, shape, q.dtype)
    if passes not in (None, 1, 2):
        raise KernelInputError(f"passes must be None, 1 or 2, got {passes!r}")
    chunk = None
    if passes != 2:
        chunk = heads_per_chunk(shape, tiling, rowmax_budget)
        if chunk is None and passes == 1:
            if rowmax_bytes(shape, tiling, shape.group) > 4 * _MAX_ROWMAX_ELEMENTS:
                raise KernelInputError(
                    f"passes=1: the rowmax buffer of one GQA group ({shape.group} query heads, batch "
                    f"{shape.batch}, T={shape.q_len}, S={shape.kv_len}) has over 2**31 elements; use passes=2"
                )
            chunk = shape.group
    out, pooled, lse = _forward(
        q, k, v, lengths, shape=shape, tiling=tiling, interpret=bool(interpret), poison_outputs=bool(poison_outputs),
        chunk=chunk,
    )
    return (out, pooled, lse) if return_lse else (out, pooled)
