"""Block-sparse flash attention in Pallas (Triton lowering), forward and backward.

Semantics are those of :func:`seerjax.kernels.reference.block_sparse_attention_reference`.

How the work is laid out:

* Outside the kernels (jnp, inside jit) the block mask `[B, Hm, nq, nk]` is ANDed with the block-level
  causal and padding visibility, then turned into *compact lists*: for each (batch, mask head, query
  block) the selected key blocks, in increasing order, plus `(lo, hi, count)` spans. The kernel's key loop
  runs exactly `count` iterations (times the tiles per block); it never visits an invisible block. The
  backward's dk/dv kernel uses the *transposed* lists (for each key block, the query blocks that selected
  it).
* Entries `[lo, hi)` of a list are tiles in which every (query, key) pair is visible: those iterations run
  without any element mask. Only the others (the causal diagonal, the partial last key block, the query
  block cut by `lengths`) build one. For row lists `lo == 0` (the masked tiles are a suffix); for
  transposed lists the masked tiles are a prefix (diagonal) and a suffix (padding).
* Per-KV-head masks (Hm == Hkv): one program takes `heads` query heads of a GQA group (up to all G) as
  one query tile of `q_rows * heads` rows (row r = query position r // heads, head r % heads), so each K/V
  tile is loaded once for them. Per-query-head masks: one program per query head, K/V head h // G.
* Tiles are powers of 2 that divide block_size: usually a tile is a whole block; for large blocks (128
  keys, D = 256, float32) a block is walked as several tiles, still only the selected blocks.
* Logits are kept in base 2: `log2(e) * sm_scale` is folded into one multiply-add with the running max, and
  the saved log-sum-exp is base 2 too. A row with no visible key stores lse = +inf, so the backward's
  `exp2(s - lse)` is 0 there without a test.
* T and S that are not multiples of block_size are padded (zeros) outside the kernels, only in that case:
  every load is then in bounds; the padded keys are masked, padded query rows are sliced off.

Triton lowering rules followed here: every array a kernel loads or stores has a power-of-2 size; no scalar
prefetch (lists and spans are loaded from refs inside the kernel); loops have dynamic trip counts.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from seerjax.kernels.checks import AttentionShape, KernelInputError

LOG2_E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Launch shape of one kernel; it changes speed, never results.

    Attributes:
      q_rows: query positions per tile (a power of 2 dividing block_size).
      heads: query heads per tile: members of one GQA group that share a mask head (divides G; 1 for
        per-query-head masks). A tile has q_rows * heads rows.
      kv_rows: key positions per tile (a power of 2 dividing block_size).
      warps, stages: Triton num_warps and num_stages.
    """

    q_rows: int
    heads: int
    kv_rows: int
    warps: int
    stages: int


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tiles of the forward, dq and dk/dv kernels."""

    fwd: Tiles
    dq: Tiles
    dkdv: Tiles


def default_tiling(shape: AttentionShape, mask_heads: int, dtype) -> Tiling:
    """Tiles sized for H100 registers and shared memory.

    FlashAttention-2-like: about 128 x 64 score tiles per 4-8 warps at D <= 128 in 16-bit types, half the
    rows for D = 256 or float32. Key tiles are the block (at most 64 keys), so each list entry is one step.
    Checked to compile for sm_90 within shared memory and without register spills (Triton 3.6 + ptxas,
    test_production_kernels_compile_for_sm90_with_triton); not yet tuned by timing. At the production
    shape (D 128, block 64, bf16, G 4) a forward tile takes 2 of the 4 heads of a group: 4 heads (256
    rows) spilled registers at 8 warps.
    """
    d, bs = shape.head_dim, shape.block_size
    # D = 256 and float32 tiles hold twice the bytes per row: halve the rows for each.
    halvings = int(d > 128) + int(jnp.dtype(dtype).itemsize > 2)
    rows = 128 >> halvings
    kv_rows = min(bs, 64 >> halvings)

    def tiles(max_rows: int, stages: int, accumulator_rows=None, max_heads=None) -> Tiles:
        q_rows = min(bs, max_rows)
        heads = 1
        if mask_heads == shape.kv_heads and shape.group > 1:
            heads = _largest_pow2_divisor(shape.group)
            if max_heads is not None:
                # More heads of the group per tile, fewer positions: each K/V block is loaded once for
                # all of them (measured: 4 heads x 32 rows beat 2 x 64 by 14% at 32k, density 0.1).
                heads = min(heads, max_heads)
                q_rows = max(16, min(q_rows, max_rows // heads))
            heads = max(1, min(heads, max_rows // q_rows))
        m = q_rows * heads
        acc = (m if accumulator_rows is None else accumulator_rows) * d * (2 if halvings else 1)
        # 8 warps once the float32 accumulators or the score tile would pass ~128 registers a thread at 4.
        warps = 8 if acc >= 128 * 128 or m * kv_rows >= 128 * 64 else 4
        return Tiles(q_rows, heads, kv_rows, warps, stages)

    fwd = tiles(rows, 3 if d <= 64 else 2, max_heads=4)
    if halvings == 0 and d == 128:
        # Swept on an H100 (eval/tune_block_sparse.py, 32k, density 0.1): 4 warps and 2 stages were fastest
        # for both mask kinds at 128-row tiles (2.69 ms vs 3.14 ms with 8 warps).
        fwd = dataclasses.replace(fwd, warps=4, stages=2)
    return Tiling(
        fwd=fwd,
        dq=tiles(rows, 2),
        dkdv=tiles(rows // 2, 2, accumulator_rows=2 * kv_rows),  # dk and dv: two [kv_rows, D] accumulators
    )


def _largest_pow2_divisor(n: int) -> int:
    return n & -n


# --------------------------------------------------------------------------------------------------
# Block tables (jnp, outside the kernels)
# --------------------------------------------------------------------------------------------------


def valid_lengths(shape: AttentionShape, lengths) -> jax.Array:
    """int32 `[B]`: keys (and, with lengths, query rows) at positions >= this are invisible."""
    if lengths is None:
        return jnp.full((shape.batch,), shape.kv_len, jnp.int32)
    return jnp.clip(lengths.astype(jnp.int32), 0, shape.kv_len)


def block_tables(block_mask: jax.Array, shape: AttentionShape, lengths=None):
    """Effective block mask and full-tile map.

    Returns:
      visible: bool `[B, Hm, nq, nk]`, block_mask AND block-level causal/padding visibility: a block is
        kept iff at least one of its (query, key) pairs is visible.
      full: bool `[B, 1, nq, nk]`: every (query, key) pair of the tile is visible (no element mask needed).
    """
    bs = shape.block_size
    i = jnp.arange(shape.nq, dtype=jnp.int32)[:, None]
    j = jnp.arange(shape.nk, dtype=jnp.int32)[None, :]
    valid = valid_lengths(shape, lengths)[:, None, None, None]
    vis = j * bs < valid
    full = (j + 1) * bs <= valid
    if lengths is not None:
        vis = vis & (i * bs < valid)
        full = full & ((i + 1) * bs <= valid)
    if shape.causal:
        vis = vis & (j <= i + shape.block_offset)
        full = full & (j < i + shape.block_offset)
    return block_mask & vis, full


def _partition_positions(m, n: int):
    """Where each entry of a row goes in its compact list (int32, same shape as `m` `[..., n]`): the
    selected entries first, in order, then the others in order — a stable partition (a permutation)."""
    c = jnp.cumsum(m.astype(jnp.int32), axis=-1)  # selected entries up to and including j
    count = jnp.sum(m.astype(jnp.int32), axis=-1, keepdims=True)
    j = lax.broadcasted_iota(jnp.int32, m.shape, m.ndim - 1)
    return jnp.where(m, c - 1, count + j - c)


def _lists_kernel(m_ref, o_ref, *, n: int):
    m = m_ref[...] != 0  # [R, n]
    pos = _partition_positions(m, n)
    rows = lax.broadcasted_iota(jnp.int32, m.shape, 0)
    o_ref[rows, pos] = lax.broadcasted_iota(jnp.int32, m.shape, 1)


@functools.partial(jax.jit, static_argnames=("interpret",))
def _lists_pallas(mask, *, interpret: bool = False):
    """Compact lists of `mask` `[..., n]` by a Pallas kernel: one read of the mask, one write of the lists.

    Each program takes a few whole rows: one scan (prefix count) per row and a scatter of the indices to
    their places; every slot is written exactly once, so there is no ordering hazard between threads."""
    lead, n = mask.shape[:-1], mask.shape[-1]
    rows = math.prod(lead)
    n_pad = 1 << max(0, (n - 1).bit_length())
    r = max(1, min(64, 8192 // n_pad))
    rows_pad = -(-max(rows, 1) // r) * r
    flat = mask.reshape(rows, n).astype(jnp.int8)
    if rows_pad != rows or n_pad != n:
        # Padded entries are unselected: they land after every real entry of their row.
        flat = jnp.pad(flat, ((0, rows_pad - rows), (0, n_pad - n)))
    out = pl.pallas_call(
        functools.partial(_lists_kernel, n=n_pad),
        grid=(rows_pad // r,),
        in_specs=[pl.BlockSpec((r, n_pad), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((r, n_pad), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((rows_pad, n_pad), jnp.int32),
        compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="block_sparse_lists",
    )(flat)
    if rows_pad != rows or n_pad != n:
        out = out[:rows, :n]
    return out.reshape(mask.shape)


def _lists_xla(mask):
    n = mask.shape[-1]
    pos = _partition_positions(mask, n).reshape(-1, n)
    rows = jnp.arange(pos.shape[0], dtype=jnp.int32)[:, None]
    idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), pos.shape)
    return jnp.zeros_like(pos).at[rows, pos].set(idx, unique_indices=True).reshape(mask.shape)


LIST_IMPLEMENTATIONS = ("pallas", "pallas_interpret", "xla")


def compact_block_lists(mask: jax.Array, full: jax.Array, *, implementation: str | None = None):
    """Compact lists of the selected entries along the last axis.

    Args:
      mask: bool `[..., n]`, the selected blocks.
      full: bool, broadcastable to mask: tiles that need no element mask. Among the selected entries the
        full ones must be contiguous (true for causal/padding visibility in both directions).
      implementation: how the lists are built — "pallas" (a kernel: one read of the mask, one write of
        the lists), "pallas_interpret", or "xla" (prefix sums and a scatter); None picks "pallas" on GPU.
        All give the same result.

    Returns:
      lists: int32 `[..., n]`, the selected indices first, in increasing order, then the others in
        increasing order (never read by the kernels, but always valid block indices).
      spans: int32 `[..., 3]` = (lo, hi, count): entries [lo, hi) of the list are full tiles (lo = hi = 0
        when there is none).
    """
    if implementation is None:
        implementation = "pallas" if jax.default_backend() == "gpu" else "xla"
    if implementation not in LIST_IMPLEMENTATIONS:
        raise KernelInputError(f"implementation must be None or one of {LIST_IMPLEMENTATIONS}, got {implementation!r}")
    n = mask.shape[-1]
    if implementation == "xla":
        lists = _lists_xla(mask)
    else:
        lists = _lists_pallas(mask, interpret=implementation == "pallas_interpret")
    full = jnp.broadcast_to(full, mask.shape) & mask
    idx = jnp.arange(n, dtype=jnp.int32)
    count = jnp.sum(mask, axis=-1, dtype=jnp.int32)
    n_full = jnp.sum(full, axis=-1, dtype=jnp.int32)
    first_full = jnp.min(jnp.where(full, idx, n), axis=-1)
    lo = jnp.sum(mask & (idx < first_full[..., None]), axis=-1, dtype=jnp.int32)
    lo = jnp.where(n_full > 0, lo, 0)  # no full tile: every entry goes to the masked suffix
    hi = lo + n_full
    return lists, jnp.stack([lo, hi, count], axis=-1)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


def _dot_nt(a, b):
    """a `[m, d]` · b `[n, d]`ᵀ → float32 `[m, n]`."""
    # HIGHEST: float32 inputs get full-precision dots on the GPU, not TF32 (no effect on 16-bit inputs).
    return lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )


def _dot(a, b):
    return lax.dot_general(
        a, b, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )


def _row_key_limit(t_pos, valid, *, causal: bool, offset: int, has_lengths: bool):
    """Last visible key position for each query row (-1: none); vis(t, s) <=> s <= limit[t]."""
    limit = jnp.full(t_pos.shape, valid - 1, jnp.int32)
    if causal:
        limit = jnp.minimum(limit, t_pos + offset)
    if has_lengths:
        limit = jnp.where(t_pos < valid, limit, -1)
    return limit


def _query_positions(start, q_rows: int, heads: int):
    """Query position of each row of a `[q_rows * heads]` tile (row r: position start + r // heads)."""
    rows = lax.broadcasted_iota(jnp.int32, (q_rows * heads,), 0)
    if heads > 1:
        rows = lax.shift_right_logical(rows, jnp.int32(heads.bit_length() - 1))
    return start + rows


def _tile_start(list_ref, it, *, block_size: int, tile: int):
    """Start position of step `it` of a list walk: block list[it // n] tile it % n, n = block_size // tile."""
    n = block_size // tile
    if n == 1:
        return pl.multiple_of(list_ref(it) * block_size, block_size)
    shift = jnp.int32(n.bit_length() - 1)
    block = list_ref(lax.shift_right_logical(it, shift))
    return pl.multiple_of(block * block_size + lax.bitwise_and(it, jnp.int32(n - 1)) * tile, tile)


def _sweep(spans, tiles_per_block: int, masked_step, plain_step, carry, *, masked_prefix: bool, any_masked: bool):
    """Walks list entries [lo, hi) without element mask, [0, lo) and [hi, count) with it.

    Each list entry is `tiles_per_block` steps (tiles of one block); the loops run exactly that many
    times the number of selected blocks.
    """
    lo, hi, count = (x * tiles_per_block if tiles_per_block > 1 else x for x in spans)
    if not any_masked:
        return lax.fori_loop(jnp.int32(0), count, plain_step, carry)
    if masked_prefix:
        carry = lax.fori_loop(jnp.int32(0), lo, masked_step, carry)
    carry = lax.fori_loop(lo, hi, plain_step, carry)
    return lax.fori_loop(hi, count, masked_step, carry)


def _two_steps(step):
    """(masked, plain) loop bodies of one step function step(it, carry, masked)."""
    return functools.partial(_call_step, step, True), functools.partial(_call_step, step, False)


def _call_step(step, masked, it, carry):
    return step(it, carry, masked)


def _fwd_kernel(
    lists_ref, spans_ref, valid_ref, q_ref, k_ref, v_ref, *refs,
    block_size, q_rows, heads, kv_rows, n_tiles, scale2, causal, offset, has_lengths, any_masked,
):
    """One (query tile, batch, head chunk): out `[q_rows, heads, D]` and base-2 lse `[q_rows, heads]`."""
    o_ref, lse_ref = refs[-2:]  # refs before them are aliased poison buffers (test hook), unused
    tile = n_tiles - 1 - pl.program_id(0)  # heavy causal tiles first
    m_rows = q_rows * heads
    d = q_ref.shape[-1]
    q = q_ref[...].reshape(m_rows, d)
    limit = _row_key_limit(
        _query_positions(tile * q_rows, q_rows, heads), valid_ref[...],
        causal=causal, offset=offset, has_lengths=has_lengths,
    )
    cols = lax.broadcasted_iota(jnp.int32, (kv_rows,), 0)

    def step(it, carry, masked):
        acc, m_prev, l_prev = carry
        start = _tile_start(lambda n: lists_ref[n], it, block_size=block_size, tile=kv_rows)
        keys = pl.ds(start, kv_rows)
        s = _dot_nt(q, k_ref[keys, :])
        if masked:
            s = jnp.where((start + cols)[None, :] <= limit[:, None], s, -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1) * scale2)
        if masked:  # a row may still have seen nothing: keep exp2 away from (-inf) - (-inf)
            m_use = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        else:
            m_use = m_next
        p = jnp.exp2(s * scale2 - m_use[:, None])
        alpha = jnp.exp2(m_prev - m_use)
        v = v_ref[keys, :]
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_next, l_prev * alpha + jnp.sum(p, axis=1)

    carry = (
        jnp.zeros((m_rows, d), jnp.float32),
        jnp.full((m_rows,), -jnp.inf, jnp.float32),
        jnp.zeros((m_rows,), jnp.float32),
    )
    spans = (spans_ref[0], spans_ref[1], spans_ref[2])
    acc, m, l = _sweep(
        spans, block_size // kv_rows, *_two_steps(step), carry, masked_prefix=False, any_masked=any_masked
    )
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).reshape(q_rows, heads, d).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(l_safe)).reshape(q_rows, heads)


def _dq_kernel(
    lists_ref, spans_ref, valid_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
    block_size, q_rows, heads, kv_rows, n_tiles, scale2, sm_scale, causal, offset, has_lengths, any_masked,
):
    """dq of one (query tile, batch, head chunk), walking the same lists as the forward."""
    dq_ref = refs[-1]
    tile = n_tiles - 1 - pl.program_id(0)
    m_rows = q_rows * heads
    d = q_ref.shape[-1]
    q = q_ref[...].reshape(m_rows, d)
    do = do_ref[...].reshape(m_rows, d)
    lse = lse_ref[...].reshape(m_rows)
    delta = delta_ref[...].reshape(m_rows)
    limit = _row_key_limit(
        _query_positions(tile * q_rows, q_rows, heads), valid_ref[...],
        causal=causal, offset=offset, has_lengths=has_lengths,
    )
    cols = lax.broadcasted_iota(jnp.int32, (kv_rows,), 0)

    def step(it, dq, masked):
        start = _tile_start(lambda n: lists_ref[n], it, block_size=block_size, tile=kv_rows)
        keys = pl.ds(start, kv_rows)
        k = k_ref[keys, :]
        s = _dot_nt(q, k)
        if masked:
            s = jnp.where((start + cols)[None, :] <= limit[:, None], s, -jnp.inf)
        p = jnp.exp2(s * scale2 - lse[:, None])  # lse = +inf on empty rows: p = 0
        ds = p * (_dot_nt(do, v_ref[keys, :]) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    spans = (spans_ref[0], spans_ref[1], spans_ref[2])
    dq = _sweep(
        spans, block_size // kv_rows, *_two_steps(step), jnp.zeros((m_rows, d), jnp.float32),
        masked_prefix=False, any_masked=any_masked,
    )
    dq_ref[...] = (dq * sm_scale).reshape(q_rows, heads, d).astype(dq_ref.dtype)


def _dkdv_kernel(
    tlists_ref, tspans_ref, valid_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
    block_size, q_rows, heads, kv_rows, group, mask_rows, scale2, sm_scale, causal, offset, has_lengths,
    any_masked,
):
    """dk, dv of one (key tile, batch, KV head), over the query blocks that selected the key block.

    The G query heads of the group are visited `heads` at a time; each visit walks the transposed list of
    its mask head (one shared list for a per-KV-head mask).
    """
    dk_ref, dv_ref = refs[-2:]
    m_rows = q_rows * heads
    d = k_ref.shape[-1]
    k = k_ref[...]
    v = v_ref[...]
    keys = pl.program_id(0) * kv_rows + lax.broadcasted_iota(jnp.int32, (kv_rows,), 0)
    valid = valid_ref[...]

    def head_step(h, carry):
        row = h if mask_rows > 1 else 0
        head_slice = pl.ds(h * heads, heads)

        def step(it, carry, masked):
            dk, dv = carry
            start = _tile_start(lambda n: tlists_ref[row, n], it, block_size=block_size, tile=q_rows)
            rows = pl.ds(start, q_rows)
            q = q_ref[rows, head_slice, :].reshape(m_rows, d)
            do = do_ref[rows, head_slice, :].reshape(m_rows, d)
            lse = lse_ref[rows, head_slice].reshape(m_rows)
            delta = delta_ref[rows, head_slice].reshape(m_rows)
            s_t = _dot_nt(k, q)  # [keys, query rows]
            if masked:
                limit = _row_key_limit(
                    _query_positions(start, q_rows, heads), valid,
                    causal=causal, offset=offset, has_lengths=has_lengths,
                )
                s_t = jnp.where(keys[:, None] <= limit[None, :], s_t, -jnp.inf)
            p_t = jnp.exp2(s_t * scale2 - lse[None, :])
            dv = dv + _dot(p_t.astype(do.dtype), do)
            ds_t = p_t * (_dot_nt(v, do) - delta[None, :])
            dk = dk + _dot(ds_t.astype(q.dtype), q)
            return dk, dv

        spans = (tspans_ref[row, 0], tspans_ref[row, 1], tspans_ref[row, 2])
        return _sweep(
            spans, block_size // q_rows, *_two_steps(step), carry, masked_prefix=True, any_masked=any_masked
        )

    carry = (jnp.zeros((kv_rows, d), jnp.float32), jnp.zeros((kv_rows, d), jnp.float32))
    visits = group // heads
    if visits == 1:
        dk, dv = head_step(jnp.int32(0), carry)
    else:
        dk, dv = lax.fori_loop(jnp.int32(0), jnp.int32(visits), head_step, carry)
    dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# --------------------------------------------------------------------------------------------------
# pallas_call wrappers
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static facts shared by the three kernels of one call."""

    shape: AttentionShape
    mask_heads: int
    has_lengths: bool
    interpret: bool
    tiling: Tiling

    @property
    def t_pad(self) -> int:
        return self.shape.nq * self.shape.block_size

    @property
    def s_pad(self) -> int:
        return self.shape.nk * self.shape.block_size

    @property
    def any_masked(self) -> bool:
        sh = self.shape
        return sh.causal or self.has_lengths or sh.kv_len % sh.block_size != 0

    def kernel_args(self) -> dict:
        sh = self.shape
        return dict(
            block_size=sh.block_size, scale2=sh.sm_scale * LOG2_E, causal=sh.causal,
            offset=sh.kv_len - sh.q_len, has_lengths=self.has_lengths, any_masked=self.any_masked,
        )

    def mask_head(self, c, tiles: Tiles):
        """Mask head of head chunk c (query heads [c * heads, (c + 1) * heads) share it)."""
        return _div(c * tiles.heads, self.shape.q_heads // self.mask_heads)

    def kv_head(self, c, tiles: Tiles):
        return _div(c * tiles.heads, self.shape.group)


def _div(x, n: int):
    return x if n == 1 else lax.div(x, n)


def _params(tiles: Tiles):
    return pl_triton.CompilerParams(num_warps=tiles.warps, num_stages=tiles.stages)


def _with_poison(in_specs, out_specs, out_shapes, args, poison: bool):
    """Test hook: NaN-filled output buffers passed in and aliased to the outputs, so a tile that no
    program writes keeps its NaNs (on GPU too, where fresh output memory is arbitrary)."""
    if not poison:
        return in_specs, args, {}
    buffers = [jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shapes]
    aliases = {len(args) + n: n for n in range(len(buffers))}
    return [*in_specs, *out_specs], [*args, *buffers], aliases


def _row_specs(plan: _Plan, tiles: Tiles):
    """Grid and BlockSpecs shared by the forward and dq kernels: one program per (query tile, batch, head
    chunk); query tiles in reverse order, so that the long causal rows start first."""
    sh = plan.shape
    d, nk = sh.head_dim, sh.nk
    n_tiles = plan.t_pad // tiles.q_rows
    per_block = sh.block_size // tiles.q_rows
    grid = (n_tiles, sh.batch, sh.q_heads // tiles.heads)

    def tile(p):
        return n_tiles - 1 - p

    def block(p):
        return _div(tile(p), per_block)

    specs = dict(
        lists=pl.BlockSpec((None, None, None, nk), lambda p, b, c: (b, plan.mask_head(c, tiles), block(p), 0)),
        spans=pl.BlockSpec((None, None, None, 3), lambda p, b, c: (b, plan.mask_head(c, tiles), block(p), 0)),
        valid=pl.BlockSpec((None,), lambda p, b, c: (b,)),
        rows=pl.BlockSpec((None, tiles.q_rows, tiles.heads, d), lambda p, b, c: (b, tile(p), c, 0)),
        stats=pl.BlockSpec((None, tiles.q_rows, tiles.heads), lambda p, b, c: (b, tile(p), c)),
        kv=pl.BlockSpec((None, plan.s_pad, None, d), lambda p, b, c: (b, 0, plan.kv_head(c, tiles), 0)),
    )
    return grid, n_tiles, specs


def _forward_call(plan: _Plan, lists, spans, valid, q, k, v, *, poison=False):
    """Padded q `[B,Tp,Hq,D]`, k/v `[B,Sp,Hkv,D]` → out `[B,Tp,Hq,D]`, lse float32 `[B,Tp,Hq]` (base 2)."""
    tiles = plan.tiling.fwd
    grid, n_tiles, sp = _row_specs(plan, tiles)
    in_specs = [sp["lists"], sp["spans"], sp["valid"], sp["rows"], sp["kv"], sp["kv"]]
    out_specs = [sp["rows"], sp["stats"]]
    out_shapes = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(q.shape[:3], jnp.float32)]
    in_specs, args, aliases = _with_poison(in_specs, out_specs, out_shapes, [lists, spans, valid, q, k, v], poison)
    kernel = functools.partial(
        _fwd_kernel, q_rows=tiles.q_rows, heads=tiles.heads, kv_rows=tiles.kv_rows, n_tiles=n_tiles,
        **plan.kernel_args(),
    )
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shapes,
        input_output_aliases=aliases,
        compiler_params=_params(tiles),
        interpret=plan.interpret,
        name="block_sparse_fwd",
    )(*args)


def _dq_call(plan: _Plan, lists, spans, valid, q, k, v, do, lse, delta, *, poison=False):
    tiles = plan.tiling.dq
    grid, n_tiles, sp = _row_specs(plan, tiles)
    in_specs = [
        sp["lists"], sp["spans"], sp["valid"], sp["rows"], sp["kv"], sp["kv"], sp["rows"], sp["stats"], sp["stats"]
    ]
    out_specs = [sp["rows"]]
    out_shapes = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    in_specs, args, aliases = _with_poison(
        in_specs, out_specs, out_shapes, [lists, spans, valid, q, k, v, do, lse, delta], poison
    )
    kernel = functools.partial(
        _dq_kernel, q_rows=tiles.q_rows, heads=tiles.heads, kv_rows=tiles.kv_rows, n_tiles=n_tiles,
        sm_scale=plan.shape.sm_scale, **plan.kernel_args(),
    )
    (dq,) = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shapes,
        input_output_aliases=aliases,
        compiler_params=_params(tiles),
        interpret=plan.interpret,
        name="block_sparse_dq",
    )(*args)
    return dq


def _dkdv_call(plan: _Plan, tlists, tspans, valid, q, k, v, do, lse, delta, *, poison=False):
    """One program per (key tile, batch, KV head); q, dO, lse, delta of the whole group are its inputs."""
    sh = plan.shape
    tiles = plan.tiling.dkdv
    d, g, nq = sh.head_dim, sh.group, sh.nq
    mask_rows = plan.mask_heads // sh.kv_heads  # mask heads per KV head: 1 or G
    per_block = sh.block_size // tiles.kv_rows
    grid = (plan.s_pad // tiles.kv_rows, sh.batch, sh.kv_heads)
    kv_tile = pl.BlockSpec((None, tiles.kv_rows, None, d), lambda r, b, h: (b, r, h, 0))
    group_rows = pl.BlockSpec((None, plan.t_pad, g, d), lambda r, b, h: (b, 0, h, 0))
    group_stats = pl.BlockSpec((None, plan.t_pad, g), lambda r, b, h: (b, 0, h))
    in_specs = [
        pl.BlockSpec((None, mask_rows, None, nq), lambda r, b, h: (b, h, _div(r, per_block), 0)),
        pl.BlockSpec((None, mask_rows, None, 3), lambda r, b, h: (b, h, _div(r, per_block), 0)),
        pl.BlockSpec((None,), lambda r, b, h: (b,)),
        group_rows,
        kv_tile,
        kv_tile,
        group_rows,
        group_stats,
        group_stats,
    ]
    out_specs = [kv_tile, kv_tile]
    out_shapes = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    in_specs, args, aliases = _with_poison(
        in_specs, out_specs, out_shapes, [tlists, tspans, valid, q, k, v, do, lse, delta], poison
    )
    kernel = functools.partial(
        _dkdv_kernel, q_rows=tiles.q_rows, heads=tiles.heads, kv_rows=tiles.kv_rows, group=g,
        mask_rows=mask_rows, sm_scale=sh.sm_scale, **plan.kernel_args(),
    )
    dk, dv = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shapes,
        input_output_aliases=aliases,
        compiler_params=_params(tiles),
        interpret=plan.interpret,
        name="block_sparse_dkdv",
    )(*args)
    return dk, dv


# --------------------------------------------------------------------------------------------------
# custom VJP
# --------------------------------------------------------------------------------------------------


def _pad_seq(x, length: int):
    if x.shape[1] == length:
        return x
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def _forward(q, k, v, block_mask, lengths, plan: _Plan, poison: bool):
    sh = plan.shape
    visible, full = block_tables(block_mask, sh, lengths)
    lists_impl = "pallas_interpret" if plan.interpret else "pallas"
    lists, spans = compact_block_lists(visible, full, implementation=lists_impl)
    valid = valid_lengths(sh, lengths)
    q_p, k_p, v_p = _pad_seq(q, plan.t_pad), _pad_seq(k, plan.s_pad), _pad_seq(v, plan.s_pad)
    out_p, lse = _forward_call(plan, lists, spans, valid, q_p, k_p, v_p, poison=poison)
    residuals = (q_p, k_p, v_p, out_p, lse, lists, spans, valid, visible, full)
    return out_p[:, : sh.q_len], residuals


def _backward(plan: _Plan, poison: bool, residuals, d_out):
    sh = plan.shape
    q_p, k_p, v_p, out_p, lse, lists, spans, valid, visible, full = residuals
    do_p = _pad_seq(d_out.astype(q_p.dtype), plan.t_pad)
    delta = jnp.einsum("bthd,bthd->bth", do_p.astype(jnp.float32), out_p.astype(jnp.float32))
    dq = _dq_call(plan, lists, spans, valid, q_p, k_p, v_p, do_p, lse, delta, poison=poison)
    lists_impl = "pallas_interpret" if plan.interpret else "pallas"
    tlists, tspans = compact_block_lists(jnp.swapaxes(visible, 2, 3), jnp.swapaxes(full, 2, 3), implementation=lists_impl)
    dk, dv = _dkdv_call(plan, tlists, tspans, valid, q_p, k_p, v_p, do_p, lse, delta, poison=poison)
    return dq[:, : sh.q_len], dk[:, : sh.kv_len], dv[:, : sh.kv_len]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, block_mask, lengths, plan: _Plan, poison: bool):
    return _forward(q, k, v, block_mask, lengths, plan, poison)[0]


def _attention_fwd(q, k, v, block_mask, lengths, plan, poison):
    return _forward(q, k, v, block_mask, lengths, plan, poison)


def _attention_bwd(plan, poison, residuals, d_out):
    dq, dk, dv = _backward(plan, poison, residuals, d_out)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.jit, static_argnames=("plan", "poison"))
def _attention_jit(q, k, v, block_mask, lengths, plan: _Plan, poison: bool = False):
    return _attention(q, k, v, block_mask, lengths, plan, poison)


def check_tiling(tiling: Tiling, shape: AttentionShape, mask_heads: int) -> None:
    """Raises KernelInputError unless every tile fits the call (powers of 2 dividing the block, a head
    count that divides the group and shares one mask head)."""
    bs = shape.block_size
    shared_mask = mask_heads == shape.kv_heads
    for name in ("fwd", "dq", "dkdv"):
        t = getattr(tiling, name)
        for field, value in (("q_rows", t.q_rows), ("kv_rows", t.kv_rows)):
            if value < 16 or value > bs or bs % value or value & (value - 1):
                raise KernelInputError(
                    f"tiling.{name}.{field} must be a power of 2 in [16, block_size={bs}], got {value}"
                )
        if t.heads < 1 or shape.group % t.heads or t.heads & (t.heads - 1) or (t.heads > 1 and not shared_mask):
            raise KernelInputError(
                f"tiling.{name}.heads must be a power of 2 dividing the group size {shape.group}, and 1 for a "
                f"per-query-head mask (mask heads {mask_heads}, kv heads {shape.kv_heads}); got {t.heads}"
            )


def make_plan(
    block_mask, shape: AttentionShape, lengths, dtype, *, interpret: bool, tiling: Tiling | None = None
) -> _Plan:
    """Static plan of one call; `tiling` replaces the default tiles (tuning, tests)."""
    mask_heads = int(block_mask.shape[1])
    if tiling is None:
        tiling = default_tiling(shape, mask_heads, dtype)
    check_tiling(tiling, shape, mask_heads)
    return _Plan(
        shape=shape, mask_heads=mask_heads, has_lengths=lengths is not None, interpret=bool(interpret), tiling=tiling
    )


def block_sparse_attention_pallas(
    q, k, v, block_mask, shape: AttentionShape, *, lengths=None, interpret: bool, tiling: Tiling | None = None
):
    """Block-sparse attention (Pallas, Triton lowering); differentiable in q, k and v.

    Args:
      q: `[B, T, Hq, D]`; k, v: `[B, S, Hkv, D]` (validated; `shape` is their AttentionShape).
      block_mask: bool `[B, Hm, nq, nk]`, Hm in {Hq, Hkv}.
      lengths: optional int `[B]` right-padding lengths.
      interpret: run the kernels in Pallas interpret mode (CPU).
      tiling: launch tiles (benchmarks); None picks `default_tiling`.

    Returns:
      out `[B, T, Hq, D]` in q's dtype; rows with no visible selected key are zero.
    """
    plan = make_plan(block_mask, shape, lengths, q.dtype, interpret=interpret, tiling=tiling)
    if lengths is not None:
        lengths = jnp.asarray(lengths, jnp.int32)
    return _attention_jit(q, k, v, block_mask, lengths, plan)
